"""Benchmark of behavior-cloning pretraining: few-step quality and latency of flow policies against BC peers.

    python -m bench.pretrain [--budget small|full] [--task pick_place|hopper_medium|both] [--seeds 0 1 2]

Tasks: Meta-World pick-place-v3 with 20 noisy scripted demos (noise 0.3), and Hopper-v5 with 50 "medium"
demos (a stable-baselines3 PPO expert is trained once for them, ~4+ min, cached under data/). Methods, all
trained on the same HDF5 file with the same gradient steps and batch size:

- ReFlow (1-RF), pretrained by ``agents.pretrain.Pretrainer`` (EMA weights evaluated);
- 2-ReFlow: reflow of the 1-RF on its own couplings over the training observations, and its 1-step
  distillation (``agents.policy_reflow``; extra steps on top of the 1-RF's, listed in the config);
- Shortcut; Gaussian BC; robomimic's own BC (``agents.robomimic_bc``, robomimic's defaults otherwise).

Evaluated at K in {1, 2, 4, 8, 20} denoising steps (shortcut: {1, 2, 4, 8, 16}; Gaussian/robomimic: one row),
on the same evaluation seeds: return mean/std, success rate, latency per policy call at batch 1, the bare
velocity forward and the ratio latency / (K x bare forward), and the demos' mean return for reference.
Writes bench/results/pretrain.{json,md,png} (or under ``--out``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from agents.evaluate import evaluate_policy_steps, measure_latency
from agents.policies import policy_from_checkpoint
from agents.policy_reflow import (
    PolicyReflowConfig,
    dataset_observations,
    rectify_policy,
    save_reflow_checkpoint,
)
from agents.pretrain import PretrainConfig, Pretrainer
from agents.robomimic_bc import RobomimicBCConfig, RobomimicUnavailable, train_robomimic_bc
from bench.common import RESULTS, check_out_dir, save_figure, save_results
from envs.collect import ensure_demos
from envs.dataset import DemoDataset
from flowpolicy.policy import FlowPolicy

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "outputs" / "bench" / "pretrain"

BUDGETS: dict[str, dict[str, Any]] = {
    "small": {"steps": 1000, "batch_size": 256, "eval_episodes": 10, "num_envs": 5, "seeds": [0],
              "pairs_per_obs": 2, "coupling_steps": 50, "reflow_steps": 500, "distill_steps": 300},
    "full": {"steps": 4000, "batch_size": 256, "eval_episodes": 30, "num_envs": 5, "seeds": [0, 1, 2],
             "pairs_per_obs": 8, "coupling_steps": 100, "reflow_steps": 3000, "distill_steps": 2000},
}
TASKS: dict[str, dict[str, Any]] = {
    "pick_place": {"env": "metaworld/pick-place-v3", "demos": {"num_demos": 20, "noise": 0.3, "seed": 0},
                   "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 2, "max_episode_steps": 200,
                   "metric": "success_rate"},
    "hopper_medium": {"env": "Hopper-v5", "demos": {"num_demos": 50, "noise": 0.0, "seed": 0, "quality": "medium"},
                      "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 4, "max_episode_steps": 1000,
                      "metric": "return_mean"},
}
FLOW_STEPS = [1, 2, 4, 8, 20]
SHORTCUT_STEPS = [1, 2, 4, 8, 16]
METHODS = ["ReFlow", "2-ReFlow", "2-ReFlow distilled", "Shortcut", "Gaussian BC", "robomimic BC"]
COLUMNS = ["task", "method", "steps", "seed", "episodes", "success_rate", "return_mean", "return_std",
           "return_vs_data", "latency_us_per_call", "bare_forward_us", "latency_ratio", "cpu_us_per_call",
           "cpu_latency_ratio", "train_s"]
REFLOW_LR, DISTILL_LR = 3e-4, 1e-4


def policy_spec(kind: str) -> dict[str, Any]:
    """The ``policy`` config group's defaults (configs/policy/<kind>.yaml), so the benchmark trains what
    ``train.py`` trains."""
    return yaml.safe_load((ROOT / "configs" / "policy" / f"{kind}.yaml").read_text())


def log(msg: str) -> None:
    print(f"[bench.pretrain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pretrain(task: dict, dataset: str, kind: str, b: dict, seed: int, run_dir: Path):
    cfg = PretrainConfig(dataset=dataset, env_name=task["env"], run_dir=str(run_dir), policy=policy_spec(kind),
                         obs_horizon=task["obs_horizon"], action_horizon=task["action_horizon"],
                         exec_horizon=task["exec_horizon"], grad_steps=b["steps"], batch_size=b["batch_size"],
                         eval_every=0, eval_episodes=0, max_episode_steps=task["max_episode_steps"],
                         save_every=b["steps"], seed=seed, resume=False, progress=False, tensorboard=False)
    t0 = time.perf_counter()
    out = Pretrainer(cfg).run()
    train_s = time.perf_counter() - t0
    policy, ckpt = policy_from_checkpoint(out["checkpoint"])
    return policy, ckpt, train_s


def run_task(name: str, b: dict, seed: int) -> tuple[list[dict], dict]:
    task = TASKS[name]
    dataset = str(ensure_demos(task["env"], progress=False, **task["demos"]))
    demos = DemoDataset(dataset, filter_key=None).info()
    runs = RUNS / name / f"seed{seed}"
    shutil.rmtree(runs, ignore_errors=True)
    policies: dict[str, Any] = {}
    train_s: dict[str, float] = {}
    notes: dict[str, str] = {}

    for method, kind in (("ReFlow", "reflow"), ("Shortcut", "shortcut"), ("Gaussian BC", "gaussian")):
        log(f"{name} seed {seed}: pretraining {method} ({b['steps']} steps)")
        policies[method], ckpt, train_s[method] = pretrain(task, dataset, kind, b, seed, runs / kind)
        if method == "ReFlow":
            reflow_ckpt = ckpt

    log(f"{name} seed {seed}: 2-ReFlow ({b['reflow_steps']} steps) + distillation ({b['distill_steps']} steps)")
    rcfg = PolicyReflowConfig(pairs_per_obs=b["pairs_per_obs"], coupling_steps=b["coupling_steps"],
                              reflow_steps=b["reflow_steps"], reflow_lr=REFLOW_LR, distill_steps=b["distill_steps"],
                              distill_lr=DISTILL_LR, batch_size=b["batch_size"], seed=seed)
    obs = dataset_observations(dataset, task["obs_horizon"], "train", split_seed=seed)
    rf = rectify_policy(policies["ReFlow"], obs, rcfg)
    spec = reflow_ckpt["config"]["policy"]
    common = {"coupling_steps": rcfg.coupling_steps, "num_couplings": len(rf.couplings),
              "source": str(reflow_ckpt["path"])}
    save_reflow_checkpoint(rf.rectified, spec, runs / "reflow2" / "checkpoints", step=rcfg.reflow_steps,
                           env_meta=reflow_ckpt["env_meta"], extra_config=common)
    save_reflow_checkpoint(rf.distilled, spec, runs / "reflow2_distilled" / "checkpoints",
                           step=rcfg.reflow_steps + rcfg.distill_steps, distilled_steps=1,
                           env_meta=reflow_ckpt["env_meta"], extra_config=common)
    policies["2-ReFlow"], policies["2-ReFlow distilled"] = rf.rectified, rf.distilled
    train_s["2-ReFlow"] = train_s["ReFlow"] + rf.info["couplings_s"] + rf.info["reflow_s"]
    train_s["2-ReFlow distilled"] = train_s["2-ReFlow"] + rf.info["distill_s"]

    log(f"{name} seed {seed}: robomimic BC ({b['steps']} steps)")
    try:
        policies["robomimic BC"], info = train_robomimic_bc(RobomimicBCConfig(
            dataset=dataset, grad_steps=b["steps"], batch_size=b["batch_size"], seed=seed))
        train_s["robomimic BC"] = info["train_s"]
        notes["robomimic"] = info["note"] or ""
        notes["robomimic_config"] = info["config"]
        notes["robomimic_final_loss"] = info["final_loss"]
    except RobomimicUnavailable as err:
        log(f"robomimic BC skipped: {err}")
        notes["robomimic"] = f"unavailable: {err}"

    rows: list[dict] = []
    for method in METHODS:
        if method not in policies:
            continue
        policy = policies[method]
        ks = SHORTCUT_STEPS if method == "Shortcut" else FLOW_STEPS
        log(f"{name} seed {seed}: evaluating {method}")
        # flow policies draw their noise from torch's global RNG: reseed so that each method's rows do not
        # depend on what ran before it
        torch.manual_seed(10_000 + seed)
        for r in evaluate_policy_steps(policy, task["env"], ks, episodes=b["eval_episodes"], num_envs=b["num_envs"],
                                       seed=100_000 + 1000 * seed, max_episode_steps=task["max_episode_steps"],
                                       label=method):
            _robust_latency(policy, r)
            k, bare = r["steps"], r.get("bare_forward_us")
            r.update(task=name, method=method, seed=seed, train_s=round(train_s[method], 1),
                     return_vs_data=r["return_mean"] / demos["return_mean"],
                     latency_ratio=(r["latency_us_per_call"] / (k * bare)) if k and bare else None)
            rows.append(r)
    info = {"dataset": dataset, "demo_return_mean": demos["return_mean"], "demo_return_std": demos["return_std"],
            "demo_episodes": demos["num_episodes"], "demo_steps": demos["num_steps"],
            "reflow": {k: v for k, v in rf.info.items() if k != "config"}, **notes}
    return rows, info


def _robust_latency(policy, row: dict, extra: int = 2) -> None:
    """Replace the row's wall-clock latencies by the minimum of the median over ``1 + extra`` measurements
    (other processes on a shared machine only ever add time), and add CPU-time latencies."""
    for _ in range(extra):
        lat = measure_latency(policy, row["steps"])
        for key, val in lat.items():
            row[key] = min(row.get(key, val), val)
    row.update(cpu_latency(policy, row["steps"]))


@torch.no_grad()
def cpu_latency(policy, steps: int | None, repeats: int = 50) -> dict[str, float]:
    """Median thread CPU microseconds per ``predict_action_chunk`` call at batch 1, and per bare velocity
    forward (same inputs as ``agents.evaluate.measure_latency``). With one torch thread the work runs on the
    calling thread, so this is the call's cost without the time that other processes take from it: on a
    loaded machine a call longer than the scheduler's time slice is preempted and its wall time doubles."""

    def median_us(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.thread_time_ns()
            fn()
            times.append(time.thread_time_ns() - t0)
        return float(np.median(times)) / 1e3

    obs = torch.zeros(1, policy.obs_horizon, policy.obs_dim, device=policy.device)
    out = {"cpu_us_per_call": median_us(lambda: policy.predict_action_chunk(obs, steps=steps))}
    if isinstance(policy, FlowPolicy) and steps:
        cond = policy.encode_obs(obs)
        x = torch.zeros(1, policy.action_horizon, policy.act_dim, device=policy.device)
        t = torch.zeros(1, device=policy.device)
        d = torch.full_like(t, 0.25)
        out["cpu_bare_forward_us"] = median_us(lambda: policy.flow.velocity(x, t, cond, d))
        out["cpu_latency_ratio"] = out["cpu_us_per_call"] / (steps * out["cpu_bare_forward_us"])
    return out


def _mean(rows, task, method, steps, key):
    vals = [r[key] for r in rows if r["task"] == task and r["method"] == method and r["steps"] == steps
            and r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def targets(rows: list[dict], name: str, data_return: float) -> dict[str, Any]:
    """The README's targets, measured (reported, not enforced)."""
    metric = TASKS[name]["metric"]
    sc1, rf20 = _mean(rows, name, "Shortcut", 1, metric), _mean(rows, name, "ReFlow", 20, metric)
    rf4 = _mean(rows, name, "ReFlow", 4, "return_mean")
    lat = {k: _mean(rows, name, "ReFlow", k, "latency_ratio") for k in FLOW_STEPS}
    cpu = {k: _mean(rows, name, "ReFlow", k, "cpu_latency_ratio") for k in FLOW_STEPS}
    return {
        "metric": metric,
        "shortcut_1_vs_reflow_20": (sc1 / rf20) if sc1 is not None and rf20 else None,
        "shortcut_1_vs_reflow_20_target": 0.95,
        "reflow_4_return_vs_data": rf4 / data_return if rf4 is not None else None,
        "reflow_4_return_vs_data_target": 0.90,
        "reflow_latency_ratio_by_K": lat,
        "reflow_cpu_latency_ratio_by_K": cpu,
        "latency_ratio_target": 1.15,
    }


def _fmt(x, pct=False):
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.2f}"


def targets_md(name: str, t: dict, info: dict) -> str:
    lat = ", ".join(f"K={k}: {_fmt(v)}" for k, v in t["reflow_latency_ratio_by_K"].items())
    cpu = ", ".join(f"K={k}: {_fmt(v)}" for k, v in t["reflow_cpu_latency_ratio_by_K"].items())
    ref = ("the demos stop 5 steps after success, so their return is not comparable to 200-step evaluation "
           "episodes; success rate is the measure here" if name == "pick_place" else "whole episodes")
    return (f"\n**{name}** (demos: {info['demo_episodes']} episodes, {info['demo_steps']} steps, mean return "
            f"{info['demo_return_mean']:.1f}; {ref}).\n"
            f"- Shortcut at 1 step / ReFlow at 20 steps ({t['metric']}): {_fmt(t['shortcut_1_vs_reflow_20'], True)} "
            f"(target >= 95%)\n"
            f"- ReFlow at K=4 return / demos' mean return: {_fmt(t['reflow_4_return_vs_data'], True)} "
            f"(target >= 90% on Hopper medium)\n"
            f"- ReFlow latency per call / (K x bare forward), wall clock: {lat}; CPU time: {cpu} "
            f"(target <= 1.15)\n")


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument("--task", choices=[*TASKS, "both"], default="pick_place")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the budget's seeds")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    # checked before anything trains: results that cannot be written would be lost after the whole run
    if args.seeds and (min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds)):
        p.error(f"--seeds must be distinct and >= 0, got {args.seeds}")
    out = check_out_dir(args.out or RESULTS)
    torch.set_num_threads(1)
    b = dict(BUDGETS[args.budget])
    if args.seeds:
        b["seeds"] = list(args.seeds)
    names = list(TASKS) if args.task == "both" else [args.task]
    t_start = time.perf_counter()
    rows: list[dict] = []
    infos: dict[str, Any] = {}
    for name in names:
        for seed in b["seeds"]:
            r, info = run_task(name, b, seed)
            rows += r
            infos.setdefault(name, {})[f"seed{seed}"] = info
    wall = time.perf_counter() - t_start
    extra = "\n## Targets (measured, not enforced)\n"
    summary = {}
    for name in names:
        first = next(iter(infos[name].values()))
        summary[name] = targets(rows, name, first["demo_return_mean"])
        extra += targets_md(name, summary[name], first)
    extra += ("\nsteps: denoising steps K per policy call (empty for one-shot policies). latency_us_per_call: "
              "median wall-clock microseconds per `predict_action_chunk` call at batch 1 (1 thread; the minimum "
              "over 3 medians of 50 calls, as other processes only add time); bare_forward_us: one velocity "
              "network forward; latency_ratio = latency / (K x bare forward). cpu_*: the same in thread CPU time "
              "(median of 50), which excludes time taken by other processes. return_vs_data: return / demos' "
              "mean return. train_s: cumulative training wall time (2-ReFlow includes the 1-RF's pretraining "
              "and the couplings). All methods: same HDF5 file, gradient steps and batch size; robomimic BC "
              "keeps robomimic's defaults otherwise (MLP 1024x1024, Adam 1e-4, raw observations, one action "
              "per call).\n")
    config = {"budget": args.budget, "tasks": {n: TASKS[n] for n in names}, **b, "reflow_lr": REFLOW_LR,
              "distill_lr": DISTILL_LR, "flow_steps": FLOW_STEPS, "shortcut_steps": SHORTCUT_STEPS,
              "policy_specs": {k: policy_spec(k) for k in ("reflow", "shortcut", "gaussian")}, "threads": 1,
              "runs": str(RUNS), "per_task": infos, "targets": summary}
    name = "pretrain" if len(names) > 1 else f"pretrain_{names[0]}"
    _plot(rows, names, out / f"{name}.png")
    return save_results(name, rows, COLUMNS, config, wall, extra_md=extra, out_dir=out, module="bench.pretrain")


def _plot(rows: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        metric = TASKS[name]["metric"]
        ax, axl = axes[i]
        for method in METHODS:
            ks = sorted({r["steps"] for r in rows if r["task"] == name and r["method"] == method and r["steps"]})
            if ks:
                ax.plot(ks, [_mean(rows, name, method, k, metric) for k in ks], "o-", label=method)
                axl.plot(ks, [_mean(rows, name, method, k, "latency_us_per_call") for k in ks], "o-", label=method)
            elif any(r["task"] == name and r["method"] == method for r in rows):
                ax.axhline(_mean(rows, name, method, None, metric), ls="--", lw=1.2,
                           color="gray" if method == "Gaussian BC" else "black", label=method)
        bare = _mean(rows, name, "ReFlow", 1, "bare_forward_us")
        if bare:
            axl.plot(FLOW_STEPS, [k * bare for k in FLOW_STEPS], "k:", label="K x bare forward (ReFlow)")
            axl.plot(FLOW_STEPS, [_mean(rows, name, "ReFlow", k, "cpu_us_per_call") for k in FLOW_STEPS], "k--",
                     lw=1, label="ReFlow, CPU time per call")
        ticks = sorted(set(FLOW_STEPS + SHORTCUT_STEPS))
        for a in (ax, axl):
            a.set_xscale("log", base=2)
            a.set_xticks(ticks, [str(k) for k in ticks])
            a.set_xlabel("denoising steps K")
        if metric == "success_rate":
            ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(metric)
        ax.set_title(f"{name}: {metric} vs steps")
        axl.set_yscale("log")
        axl.set_ylabel("latency per call (us, batch 1)")
        axl.set_title(f"{name}: latency vs K")
        ax.legend(fontsize=7)
        axl.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
