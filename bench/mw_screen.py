"""Screen Meta-World v3 tasks for fine-tuning: success of behavior cloning from noisy scripted demos.

    python -m bench.mw_screen --tasks door-open-v3 drawer-close-v3 push-v3 --episodes 50 --workers 2

Fine-tuning is worth measuring where BC leaves room: the fine-tuning issue asks for Meta-World tasks on
which BC from 20 noisy demos starts at or below 70% success. Each task gets exactly the setup that
``python -m bench.finetune --task metaworld/<task>`` uses (20 scripted-expert demos with action noise 0.3,
Ta = 4, Te = 2, 200-step episodes, the ReFlow MLP pretrained for ``--pretrain-steps``), then ``--episodes``
deterministic episodes at K = 4. The episodes start from ``--eval-seed`` (default 200000): NOT the env seeds
that bench.finetune reports (100000), so choosing tasks here does not tune on the reported evaluation.

Writes bench/results/mw_screen.{json,md,png}: per task the demos' mean length, BC success with a 95%
Wilson interval, and whether it is at or below ``--max-success``.

``--methods reflow gaussian`` screens the Gaussian BC baseline beside the flow (same demos, steps and
episodes); ``--init-noise-scales 1 0.25 0`` evaluates each flow policy with its chains started from
x0 ~ N(0, tau^2 I) for each tau (the flow's "deterministic" action at tau = 1 still samples the demos' spread;
the Gaussian's is its mean).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

from bench.stats import wilson_interval


def _screen(args):
    task, method, pretrain_steps, episodes, eval_seed, work, taus = args
    import torch

    torch.set_num_threads(1)
    from agents.evaluate import rollout_episodes
    from agents.policies import policy_from_checkpoint
    from bench.finetune import K_FOR, _pretrain, task_spec
    from envs.collect import ensure_demos
    from envs.hdf5 import read_demos

    name = f"metaworld/{task}"
    t = task_spec(name)
    t0 = time.perf_counter()
    try:
        dataset = str(ensure_demos(t["env"], seed=0, progress=False, **t["demos"]))
    except Exception as e:  # e.g. the scripted expert does not succeed often enough under the action noise
        return [{"task": task, "method": method, "error": f"{type(e).__name__}: {e}"[:200],
                 "wall_s": round(time.perf_counter() - t0, 1)}]
    demos = read_demos(dataset)
    _, ckpt, pre_s = _pretrain((method, name, dataset, Path(work) / task / method, pretrain_steps, 0, None))
    policy, _ = policy_from_checkpoint(ckpt)
    rows = []
    for tau in (taus if method != "gaussian" else [None]):
        te = time.perf_counter()
        if tau is not None:
            policy.init_noise_scale = float(tau)
        r = rollout_episodes(policy, t["env"], episodes, K_FOR[method], 8, eval_seed,
                             t["max_episode_steps"])
        succ = [bool(s) for s in r["successes"]]
        k = sum(succ)
        lo, hi = wilson_interval(k, len(succ))
        rows.append({"task": task, "method": method, "tau": "" if tau is None else tau,
                     "demo_len": sum(len(ep.actions) for ep in demos) / len(demos),
                     "bc_success": k / len(succ), "bc_ci95": f"[{lo:.2f}, {hi:.2f}]", "bc_low": lo, "bc_high": hi,
                     "episodes": len(succ), "bc_return": sum(r["returns"]) / len(r["returns"]),
                     "pretrain_s": round(pre_s, 1), "eval_s": round(time.perf_counter() - te, 1)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", required=True, help="Meta-World v3 task names, e.g. door-open-v3")
    p.add_argument("--pretrain-steps", type=int, default=3000, help="BC gradient steps (bench.finetune's)")
    p.add_argument("--methods", nargs="+", default=["reflow"], choices=["reflow", "shortcut", "gaussian"],
                   help="policies to pretrain and screen (bench.finetune's specs)")
    p.add_argument("--init-noise-scales", nargs="+", type=float, default=[1.0], metavar="TAU",
                   help="flow policies: evaluate with chains started from x0 ~ N(0, tau^2 I) for each tau")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--eval-seed", type=int, default=200_000)
    p.add_argument("--max-success", type=float, default=0.70, help="the bar BC must start at or below")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="/tmp/flowpolicy_bench", help="folder for pretraining checkpoints")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    from bench.common import check_out_dir, save_figure, save_results

    if args.out:
        check_out_dir(args.out)
    bad = [x for x in args.tasks if not x.endswith("-v3")]
    if bad:
        raise SystemExit(f"error: Meta-World v3 task names end in -v3 (e.g. door-open-v3), got {bad}")
    if any(not 0.0 <= x <= 1.0 for x in args.init_noise_scales):
        raise SystemExit(f"error: --init-noise-scales must lie in [0, 1], got {args.init_noise_scales}")
    t0 = time.perf_counter()
    jobs = [(x, m, args.pretrain_steps, args.episodes, args.eval_seed, args.work, args.init_noise_scales)
            for x in args.tasks for m in args.methods]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        rows = [r for rs in pool.map(_screen, jobs) for r in rs]
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    for row in rows:
        row["at_or_below_bar"] = row["bc_success"] <= args.max_success
    cols = ["task", "method", "tau", "demo_len", "bc_success", "bc_ci95", "bc_return", "episodes",
            "at_or_below_bar", "pretrain_s", "eval_s"]
    note = (f"\nBC of {', '.join(args.methods)} (bench.finetune's policies; ReFlow at K = 4, Shortcut at K = 1) "
            f"from 20 scripted demos (action noise 0.3), {args.pretrain_steps} gradient steps, "
            f"{args.episodes} deterministic episodes from env seed {args.eval_seed} (not the reported "
            f"evaluation seeds); 95% Wilson intervals. tau: a flow's chains start from x0 ~ N(0, tau^2 I) "
            f"(the Gaussian acts with its mean). Bar: BC success <= {args.max_success:.2f}.\n"
            + "".join(f"\n- {r['task']} ({r['method']}): no demos ({r['error']})" for r in failed)
            + ("\n" if failed else ""))
    path = save_results("mw_screen", rows, cols, {**vars(args), "failed": failed}, time.perf_counter() - t0, extra_md=note,
                        out_dir=Path(args.out) if args.out else None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(rows), 3.2))
    xs = range(len(rows))
    ax.bar(xs, [r["bc_success"] for r in rows], color="tab:blue")
    ax.errorbar(xs, [r["bc_success"] for r in rows],
                yerr=[[r["bc_success"] - r["bc_low"] for r in rows], [r["bc_high"] - r["bc_success"] for r in rows]],
                fmt="none", ecolor="k", capsize=3)
    ax.axhline(args.max_success, color="r", ls="--", lw=1, label=f"bar {args.max_success:.2f}")
    labels = [r["task"].removesuffix("-v3") + ("" if len(args.methods) == 1 else f" {r['method']}")
              + ("" if r["tau"] == "" or len(args.init_noise_scales) == 1 else f" tau={r['tau']:g}") for r in rows]
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel("BC success")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    save_figure(fig, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
