"""robosuite Lift and Can end to end: scripted-expert demos -> BC pretraining -> evaluation -> ReinFlow
fine-tuning -> evaluation, success before and after (needs the extra: pip install -e ".[robosuite]").

    python -m bench.robosuite --tasks Lift Can --seeds 0 1 --env-steps 20000 --pretrain-steps 2000

Each task runs :mod:`bench.finetune` (``--task robosuite_<task> --methods reflow``: demos collected once and
cached, one ReFlow K=4 BC policy pretrained with seed 0, then one ReinFlow fine-tuning run per seed on one
CPU thread, deterministic evaluations on the same episodes, env seeds from 100000). Its files go to
``bench/results/robosuite/``; this command writes ``bench/results/robosuite.{json,md,png}``: per task the
success rate before (the pretrained policy, ``--eval-episodes`` episodes) and after fine-tuning (every
seed's final policy on the same episodes, pooled), each with a 95% Wilson interval. The pooled interval
treats the seeds' episodes as independent trials, so it leaves out the spread between seeds: the per-seed
rates are listed beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

TASKS = {"Lift": "robosuite_lift", "Can": "robosuite_can"}


def _env_steps(spec: list[str], task: str) -> int:
    """``--env-steps 20000`` for every task, or ``Lift=20000 Can=30000`` per task."""
    default = None
    for item in spec:
        name, sep, value = item.partition("=")
        if not sep:
            default = int(name)
        elif name == task:
            return int(value)
    if default is None:
        raise SystemExit(f"error: --env-steps gives no budget for {task}; e.g. --env-steps 20000 or {task}=20000")
    return default


def _task_row(task: str, record: dict, curves: list[dict], episodes: int) -> dict:
    from bench.stats import wilson_interval
    from envs.hdf5 import read_meta

    runs = sorted(curves, key=lambda r: r["seed"])
    # every seed's run evaluates the one pretrained policy first (same episodes, the run's own sampler noise)
    k_before = [int(round(r["curve"][0]["success"] * episodes)) for r in runs]
    k_after = [int(round(r["curve"][-1]["success"] * episodes)) for r in runs]
    n = episodes * len(runs)
    lo_b, hi_b = wilson_interval(sum(k_before), n)
    lo_a, hi_a = wilson_interval(sum(k_after), n)
    demo_meta = read_meta(record["config"]["dataset"])
    cfg = record["config"]
    return {
        "task": task, "env": f"robosuite/{task}", "demos": demo_meta.get("num_demos"),
        "demo_noise": demo_meta.get("noise"), "expert_success": demo_meta.get("success_rate"),
        "pretrain_steps": cfg["pretrain_steps"], "env_steps": int(np.mean([r["env_steps"] for r in runs])),
        "seeds": len(runs), "episodes": episodes,
        "success_before": sum(k_before) / n, "before_ci95": f"[{lo_b:.2f}, {hi_b:.2f}]",
        "before_per_seed": " ".join(f"{k / episodes:.2f}" for k in k_before),
        "success_after": sum(k_after) / n, "after_ci95": f"[{lo_a:.2f}, {hi_a:.2f}]",
        "after_per_seed": " ".join(f"{k / episodes:.2f}" for k in k_after),
        "return_before": float(np.mean([r["curve"][0]["return"] for r in runs])),
        "return_after": float(np.mean([r["curve"][-1]["return"] for r in runs])),
        "success_before_ci": [lo_b, hi_b], "success_after_ci": [lo_a, hi_a],
        "pretrain_wall_s": round(sum(cfg["pretrain_wall_s"].values()), 1),
        "finetune_wall_s": round(sum(r["wall_s"] for r in runs), 1), "task_wall_s": record["wall_s"],
    }


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import save_figure

    fig, ax = plt.subplots(figsize=(2.6 * len(rows) + 2, 4))
    for i, r in enumerate(rows):
        for j, (key, label, color) in enumerate((("before", "BC (pretrained)", "C0"),
                                                 ("after", "ReinFlow fine-tuned", "C1"))):
            x = i + (j - 0.5) * 0.35
            p = r[f"success_{key}"]
            lo, hi = r[f"success_{key}_ci"]
            ax.bar(x, p, width=0.33, color=color, label=label if i == 0 else None)
            ax.errorbar(x, p, yerr=[[p - lo], [hi - p]], color="k", capsize=4)
            seeds = [float(v) for v in r[f"{key}_per_seed"].split()]
            ax.scatter([x] * len(seeds), seeds, color="k", s=12, zorder=3,
                       label="per seed" if i == 0 and j == 0 else None)
    ax.set_xticks(range(len(rows)), [f"{r['task']}\n{r['env_steps']} env steps" for r in rows])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% Wilson interval)")
    ax.set_title("robosuite: BC -> ReinFlow (ReFlow K=4)")
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["Lift", "Can"], choices=sorted(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--env-steps", nargs="+", default=["20000"],
                   help="fine-tuning env steps: one number for every task, or TASK=N per task")
    p.add_argument("--pretrain-steps", type=int, default=2000, help="BC gradient steps")
    p.add_argument("--eval-episodes", type=int, default=30, help="deterministic episodes per evaluation")
    p.add_argument("--eval-points", type=int, default=1,
                   help="evaluations along each run after the initial one (1: the final one only)")
    p.add_argument("--workers", type=int, default=1, help="parallel fine-tuning runs (one CPU thread each)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--reuse", nargs="*", default=[], choices=sorted(TASKS),
                   help="tasks whose per-task files in <out>/robosuite/ come from an earlier command: read, not run "
                        "(the table says so)")
    args = p.parse_args(argv)
    if args.out:
        from bench.common import check_out_dir

        check_out_dir(args.out)
    if set(args.tasks) - set(args.reuse):
        try:
            import robosuite  # noqa: F401
        except ImportError:
            raise SystemExit('error: robosuite is not installed; pip install -e ".[robosuite]"') from None
    from bench import finetune
    from bench.common import RESULTS, markdown_table, save_results

    out = Path(args.out) if args.out else RESULTS
    work = out / "robosuite"
    t0 = time.perf_counter()
    rows = []
    for task in args.tasks:
        name = TASKS[task]
        if task in args.reuse:
            record = json.loads((work / f"finetune_{name}.json").read_text())
            curves = json.loads((work / f"finetune_{name}_curves.json").read_text())
            rows.append({**_task_row(task, record, curves, record["config"]["eval"]["eval_episodes"]),
                         "command": record["command"]})
            continue
        sub = ["--task", name, "--methods", "reflow", "--seeds", *map(str, args.seeds),
               "--env-steps", str(_env_steps(args.env_steps, task)), "--pretrain-steps", str(args.pretrain_steps),
               "--eval-episodes", str(args.eval_episodes), "--eval-points", str(args.eval_points),
               "--workers", str(args.workers), "--out", str(work)]
        argv_before = sys.argv
        sys.argv = [argv_before[0], *sub]  # the per-task files record the bench.finetune command they ran
        try:
            finetune.main(sub)
        finally:
            sys.argv = argv_before
        record = json.loads((work / f"finetune_{name}.json").read_text())
        curves = json.loads((work / f"finetune_{name}_curves.json").read_text())
        rows.append({**_task_row(task, record, curves, args.eval_episodes), "command": record["command"]})
    wall = time.perf_counter() - t0
    _plot(rows, out / "robosuite.png")
    cols = ["task", "demos", "demo_noise", "expert_success", "pretrain_steps", "env_steps", "seeds", "episodes",
            "success_before", "before_ci95", "before_per_seed", "success_after", "after_ci95", "after_per_seed",
            "return_before",
            "return_after", "task_wall_s"]
    extra = ("\nsuccess_before: the BC policy (ReFlow K=4, pretrained once, seed 0) evaluated at the start of "
             "every seed's run on `episodes` deterministic episodes (the same env seeds; each run's own sampler "
             "noise), pooled; success_after: each seed's fine-tuned policy on the same episodes, pooled. The 95% "
             "Wilson intervals are over episodes x seeds and leave out the spread between seeds (listed per seed). "
             "expert_success: the noisy scripted expert's success while collecting (failed attempts are "
             "discarded). Per-run files: " + ", ".join(f"robosuite/finetune_{TASKS[t]}.md" for t in args.tasks)
             + ". Fine-tuning settings: configs/task/robosuite_<task>.yaml (Meta-World's, not tuned on robosuite)."
             "\n\n" + markdown_table(rows, ["task", "pretrain_wall_s", "finetune_wall_s", "task_wall_s", "command"])
             + "\n")
    if args.reuse:
        extra += (f"\nTasks {args.reuse} were read from the files of the earlier command in their row (`--reuse`), "
                  "not run by this one; this command's wall time leaves them out.\n")
    save_results("robosuite", rows, cols, {"tasks": args.tasks, "seeds": args.seeds, "env_steps": args.env_steps,
                                           "pretrain_steps": args.pretrain_steps,
                                           "eval_episodes": args.eval_episodes, "eval_points": args.eval_points,
                                           "workers": args.workers, "reuse": args.reuse}, wall, extra_md=extra, out_dir=out,
                 module="bench.robosuite")


if __name__ == "__main__":
    main()
