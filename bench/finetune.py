"""Benchmark of online fine-tuning: ReinFlow (ReFlow K=4, Shortcut K=1) beside a Gaussian BC policy fine-tuned
with the same PPO, and stable-baselines3 PPO from scratch, on the same env-step budget, in one command.

    python -m bench.finetune --task hopper_medium --budget small --seeds 0 --workers 2
    python -m bench.finetune --task hopper_medium --budget full --seeds 0 1 2 --workers 16   # GPU box CPUs
    python -m bench.finetune --task pick_place --methods reflow --variant lowsig:sigma_min=0.02,sigma_max=0.06

Steps: demos (cached) -> BC pretraining of each policy kind -> fine-tuning runs (method x variant x seed) in
parallel worker processes, each on one CPU thread -> deterministic evaluation curves (return / success vs env
steps). Writes bench/results/finetune_<task>.{json,md,png}: final and best return, net growth over the
pretrained policy in %, and wall time per 100k env steps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

BUDGETS = {
    # env steps of fine-tuning, BC gradient steps
    "small": {"env_steps": 40_000, "pretrain_steps": 1500},
    "full": {"env_steps": 1_000_000, "pretrain_steps": 4000},
}
TASKS = {
    "hopper_medium": {"env": "Hopper-v5", "demos": {"num_demos": 20, "quality": "medium", "noise": 0.0},
                      "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 4, "max_episode_steps": 1000},
    "walker2d_medium": {"env": "Walker2d-v5", "demos": {"num_demos": 20, "quality": "medium", "noise": 0.0},
                        "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 4, "max_episode_steps": 1000},
    "pick_place": {"env": "metaworld/pick-place-v3", "demos": {"num_demos": 20, "noise": 0.3},
                   "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 2, "max_episode_steps": 200},
}
POLICY_SPECS = {
    "reflow": {"kind": "reflow", "network": "mlp", "hidden": 256, "depth": 3, "default_steps": 4},
    "shortcut": {"kind": "shortcut", "network": "mlp", "hidden": 256, "depth": 3, "default_steps": 1,
                 "max_level": 5},
    "gaussian": {"kind": "gaussian", "hidden": 256, "depth": 2},
}
K_FOR = {"reflow": 4, "shortcut": 1, "gaussian": 1}


def _task_finetune_defaults(task: str) -> dict:
    """The task's `finetune:` section of configs/task/<task>.yaml (the same defaults train.py uses)."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "task" / f"{task}.yaml"
    d = dict(yaml.safe_load(path.read_text()).get("finetune") or {})
    d.pop("total_env_steps", None)
    return d


def _pretrain(args):
    kind, task, dataset, out_dir, steps, seed = args
    import torch

    torch.set_num_threads(1)
    from agents.pretrain import PretrainConfig, Pretrainer

    t = TASKS[task]
    cfg = PretrainConfig(dataset=dataset, env_name=t["env"], run_dir=str(out_dir), policy=POLICY_SPECS[kind],
                         obs_horizon=t["obs_horizon"], action_horizon=t["action_horizon"],
                         exec_horizon=t["exec_horizon"], steps=steps, eval_every=0, eval_episodes=0,
                         save_every=steps, max_episode_steps=t["max_episode_steps"], seed=seed, progress=False,
                         tensorboard=False, resume=False)
    t0 = time.perf_counter()
    out = Pretrainer(cfg).run()
    return kind, out["checkpoint"], time.perf_counter() - t0


def _finetune(args):
    method, variant, overrides, seed, task, ckpt, env_steps = args
    import torch

    torch.set_num_threads(1)
    from agents.finetune import FinetuneConfig, ReinFlowPPO
    from agents.policies import policy_from_checkpoint
    from envs.factory import make_vec_env

    t = TASKS[task]
    fc = {**_task_finetune_defaults(task), "steps": K_FOR[method], "seed": seed, **overrides}
    cfg = FinetuneConfig.from_dict(fc)
    policy, _ = policy_from_checkpoint(ckpt)
    envs = make_vec_env(t["env"], cfg.num_envs, seed=1000 * seed, action_horizon=policy.exec_horizon,
                        max_episode_steps=t["max_episode_steps"])
    eval_envs = make_vec_env(t["env"], cfg.eval_num_envs, seed=cfg.eval_seed, action_horizon=policy.exec_horizon,
                             max_episode_steps=t["max_episode_steps"])
    agent = ReinFlowPPO(policy, envs, eval_envs, cfg)
    curve = []
    t0 = time.perf_counter()

    def cb(a, m):
        if "eval/return_mean" in m:
            curve.append({"env_steps": int(m["charts/env_steps"]), "return": m["eval/return_mean"],
                          "success": m["eval/success_rate"], "wall_s": time.perf_counter() - t0})

    agent.learn(env_steps, callback=cb, progress=False)
    if not curve or curve[-1]["env_steps"] != agent.env_steps:
        m = agent.evaluate()
        curve.append({"env_steps": agent.env_steps, "return": m["eval/return_mean"],
                      "success": m["eval/success_rate"], "wall_s": time.perf_counter() - t0})
    return {"method": method, "variant": variant, "seed": seed, "curve": curve,
            "wall_s": time.perf_counter() - t0, "env_steps": agent.env_steps}


def _sb3_ppo(args):
    seed, task, env_steps, eval_every_steps, eval_episodes = args
    import torch

    torch.set_num_threads(1)
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from envs.factory import make_env

    t = TASKS[task]
    venv = DummyVecEnv([lambda i=i: Monitor(make_env(t["env"], seed=1000 * seed + i,
                                                     max_episode_steps=t["max_episode_steps"]))
                        for i in range(8)])
    eval_env = DummyVecEnv([lambda: Monitor(make_env(t["env"], seed=100_000,
                                                     max_episode_steps=t["max_episode_steps"]))])
    curve = []
    t0 = time.perf_counter()

    class Eval(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next = 0

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next:
                self.next += eval_every_steps
                mean, _ = evaluate_policy(self.model, eval_env, n_eval_episodes=eval_episodes, deterministic=True)
                curve.append({"env_steps": int(self.num_timesteps), "return": float(mean), "success": None,
                              "wall_s": time.perf_counter() - t0})
            return True

    model = PPO("MlpPolicy", venv, seed=seed, verbose=0, device="cpu")
    model.learn(env_steps, callback=Eval())
    mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True)
    curve.append({"env_steps": int(model.num_timesteps), "return": float(mean), "success": None,
                  "wall_s": time.perf_counter() - t0})
    return {"method": "sb3_ppo", "variant": "default", "seed": seed, "curve": curve,
            "wall_s": time.perf_counter() - t0, "env_steps": int(model.num_timesteps)}


def _parse_variant(text: str) -> tuple[str, dict]:
    import yaml

    name, _, kv = text.partition(":")
    over = {}
    for item in filter(None, kv.split(",")):
        k, _, v = item.partition("=")
        over[k] = yaml.safe_load(v)
    return name, over


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="hopper_medium")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument("--env-steps", type=int, default=None, help="override the budget's fine-tuning env steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=["reflow", "shortcut", "gaussian", "sb3_ppo"])
    p.add_argument("--variant", action="append", default=[],
                   help="name:key=value,... extra fine-tuning settings to compare (default variant always runs)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--work", default="/tmp/flowpolicy_bench", help="folder for pretraining checkpoints")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the budget's BC gradient steps")
    args = p.parse_args(argv)
    from bench.common import RESULTS, save_results
    from envs.collect import ensure_demos

    budget = dict(BUDGETS[args.budget])
    if args.env_steps:
        budget["env_steps"] = args.env_steps
    if args.pretrain_steps:
        budget["pretrain_steps"] = args.pretrain_steps
    t_start = time.perf_counter()
    t = TASKS[args.task]
    dataset = str(ensure_demos(t["env"], seed=0, progress=False, **t["demos"]))
    from envs.hdf5 import read_demos

    demo_returns = [ep.episode_return for ep in read_demos(dataset)]
    work = Path(args.work) / args.task
    kinds = [m for m in args.methods if m in POLICY_SPECS]
    variants = [("default", {})] + [_parse_variant(v) for v in args.variant]
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        pre = pool.map(_pretrain, [(k, args.task, dataset, work / k, budget["pretrain_steps"], 0) for k in kinds])
        ckpts = {k: c for k, c, _ in pre}
        pre_wall = {k: w for k, _, w in pre}
        ft_defaults = _task_finetune_defaults(args.task)
        eval_every_steps = int(ft_defaults.get("eval_every", 10)) * int(ft_defaults.get("n_steps", 256)) * \
            int(ft_defaults.get("num_envs", 16)) * t["exec_horizon"]
        jobs = [(m, vn, vo, s, args.task, ckpts[m], budget["env_steps"]) for m in kinds for vn, vo in variants
                for s in args.seeds]
        async_ft = pool.map_async(_finetune, jobs)
        async_sb3 = pool.map_async(_sb3_ppo, [(s, args.task, budget["env_steps"], eval_every_steps,
                                               int(ft_defaults.get("eval_episodes", 10))) for s in args.seeds]) \
            if "sb3_ppo" in args.methods else None
        runs = async_ft.get() + (async_sb3.get() if async_sb3 else [])
    has_success = t["env"].startswith("metaworld")
    rows = []
    sb3_final = {r["seed"]: r["curve"][-1]["return"] for r in runs if r["method"] == "sb3_ppo"}
    for r in runs:
        c = r["curve"]
        init, final = c[0]["return"], c[-1]["return"]
        best = max(x["return"] for x in c)
        row = {"method": r["method"], "variant": r["variant"], "seed": r["seed"], "env_steps": r["env_steps"],
               "initial_return": init, "final_return": final, "best_return": best,
               "growth_pct": 100.0 * (final - init) / abs(init) if r["method"] != "sb3_ppo" and init else None,
               "wall_s": round(r["wall_s"], 1), "wall_s_per_100k": round(100_000 * r["wall_s"] / max(r["env_steps"], 1), 1)}
        if has_success:
            row["initial_success"], row["final_success"] = c[0]["success"], c[-1]["success"]
            row["best_success"] = max(x["success"] for x in c)
        if r["seed"] in sb3_final and r["method"] != "sb3_ppo":
            row["final_vs_sb3_ppo"] = final / sb3_final[r["seed"]] if sb3_final[r["seed"]] else None
        rows.append(row)
    wall = time.perf_counter() - t_start
    name = f"finetune_{args.task}"
    out_dir = Path(args.out) if args.out else None
    (Path(args.out or RESULTS) / f"{name}_curves.json").write_text(json.dumps(runs, indent=1))
    _plot(runs, Path(args.out or RESULTS) / f"{name}.png", args.task, has_success)
    cols = ["method", "variant", "seed", "env_steps", "initial_return", "final_return", "best_return", "growth_pct",
            "final_vs_sb3_ppo", "wall_s_per_100k"]
    if has_success:
        cols[7:7] = ["initial_success", "final_success", "best_success"]
    save_results(name, rows, cols, {"task": args.task, "budget": args.budget, **budget, "seeds": args.seeds,
                                    "methods": args.methods, "variants": dict(variants),
                                    "finetune_defaults": ft_defaults, "pretrain_wall_s": pre_wall,
                                    "dataset": dataset, "demo_return_mean": float(np.mean(demo_returns)),
                                    "workers": args.workers},
                 wall, extra_md=f"\nDemo mean return {np.mean(demo_returns):.1f}; each run on one CPU thread, "
                                f"{args.workers} worker processes in parallel. growth_pct: final vs the pretrained "
                                "policy's deterministic return at the same K.\n", out_dir=out_dir,
                 module="bench.finetune")


def _plot(runs, path, task, has_success):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import save_figure

    keys = ["return"] + (["success"] if has_success else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in runs:
            pts = [(x["env_steps"], x[key]) for x in r["curve"] if x[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=f"{r['method']}/{r['variant']}/s{r['seed']}")
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"eval {key} (deterministic)")
        ax.set_title(task)
        ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
