"""Benchmark of data-parallel training (torchrun): throughput and equivalence for 1, 2, ... processes.

    python -m bench.scaling                                   # 1 and 2 processes, this machine
    python -m bench.scaling --procs 1 2 4 8 16 --ft-envs 16   # a 16-core machine
    python -m bench.scaling --procs 1 2 4 8 --ft-envs 2 --ft-weak   # fine-tuning with 2 envs per process

For each process count N it launches ``torchrun --standalone --nproc_per_node N -m bench.scaling --worker``
(N = 1: one plain process, the same code path as ``python train.py``), each process on one CPU thread:

* **BC pretraining** of a ReFlow policy (256 x 3 MLP) on the cached pick-place demos with the same global
  batch for ``--steps`` gradient steps: samples/s (global batch x steps / training wall time, checkpoint
  writes included, start-up excluded);
* **PPO fine-tuning** (ReinFlow, K = 4) of the one-process BC policy on pick-place with ``--ft-envs`` envs in
  all, split across the processes, for ``--ft-iterations`` iterations: env steps/s (rollouts and updates).

Each row also gives the speed-up over one process, the efficiency (speed-up / N) and the largest parameter
difference from the one-process run: data-parallel training makes the one-process update (the same global
batch, noise, envs and minibatches), so in BC the difference stays at float rounding; in fine-tuning the
simulator amplifies the float rounding of smaller per-process batches (see the table's note). Writes
bench/results/scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = "metaworld/pick-place-v3"


def _worker(kind: str, cfg_path: str, out_path: str) -> None:
    import torch

    from agents import distributed

    torch.set_num_threads(1)
    info = distributed.init("cpu")
    cfg = json.loads(Path(cfg_path).read_text())
    if kind == "bc":
        from agents.pretrain import PretrainConfig, Pretrainer

        tr = Pretrainer(PretrainConfig(**cfg))
        distributed.barrier()
        t0 = time.perf_counter()
        out = tr.run()
        distributed.barrier()
        wall, params = time.perf_counter() - t0, list(tr.policy.parameters())
        res = {"work": cfg["grad_steps"] * cfg["batch_size"], "val_loss": out.get("val/loss")}
    else:
        from agents.finetune import FinetuneConfig, ReinFlowPPO
        from agents.policies import policy_from_checkpoint
        from envs.factory import make_vec_env

        policy, _ = policy_from_checkpoint(cfg.pop("checkpoint"))
        iterations = cfg.pop("iterations")
        fc = FinetuneConfig(**cfg)
        envs = make_vec_env(ENV, fc.num_envs // info.world_size, seed=0, action_horizon=policy.exec_horizon,
                            max_episode_steps=200)
        agent = ReinFlowPPO(policy, envs, None, fc)
        distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(iterations):
            m = agent.train_iteration()
        distributed.barrier()
        wall, params = time.perf_counter() - t0, list(agent.actor.parameters()) + list(agent.critic.parameters())
        res = {"work": agent.env_steps, "rollout_return": m.get("rollout/return_mean")}
        envs.close()
    if info.is_main:
        torch.save(torch.cat([p.detach().flatten() for p in params]), Path(out_path).with_suffix(".pt"))
        Path(out_path).write_text(json.dumps({"train_s": wall, "world_size": info.world_size, **res}))
    distributed.shutdown()


def _launch(kind: str, n: int, cfg: dict, out_path: Path) -> tuple[dict, object]:
    import torch

    cfg_path = out_path.with_suffix(".cfg.json")
    cfg_path.write_text(json.dumps(cfg))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep the caller's entries
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "--max_restarts=0", "-m", "bench.scaling", "--worker", kind, str(cfg_path), str(out_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {kind} with {n} processes failed:\n{proc.stderr[-2000:]}")
    return json.loads(out_path.read_text()), torch.load(out_path.with_suffix(".pt"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=300, help="BC gradient steps")
    p.add_argument("--batch-size", type=int, default=1024, help="global BC batch (split across processes)")
    p.add_argument("--ft-envs", type=int, default=8, help="fine-tuning envs in all (split across processes)")
    p.add_argument("--ft-weak", action="store_true",
                   help="fine-tuning with --ft-envs envs per process (weak scaling: N processes do N times the "
                        "work; ideal throughput N x one process) instead of --ft-envs in all")
    p.add_argument("--ft-iterations", type=int, default=3, help="fine-tuning iterations (0: BC only)")
    p.add_argument("--repeats", type=int, default=2, help="runs per process count (the median is reported)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--worker", nargs=3, metavar=("KIND", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        from agents import distributed

        _worker(*args.worker)
        distributed.exit_process(0)

    import numpy as np

    from bench.common import RESULTS, check_out_dir, save_figure, save_results
    from envs.collect import ensure_demos

    # every argument is checked before the first run: a child process's traceback, or results that cannot be
    # written after the whole run, are not an error message
    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--ft-envs", args.ft_envs, 1), ("--ft-iterations", args.ft_iterations, 0),
                             ("--repeats", args.repeats, 1)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    check_out_dir(args.out or RESULTS)
    bad = [n for n in args.procs if n < 1 or args.batch_size % n
           or (args.ft_iterations and not args.ft_weak and args.ft_envs % n)]
    if bad:
        p.error(f"--procs {bad}: each count must be >= 1 and divide --batch-size and --ft-envs")
    if 1 not in args.procs:
        p.error("--procs must include 1 (the reference every other count is compared with)")
    t_start = time.perf_counter()
    demos = str(ensure_demos(ENV, num_demos=20, noise=0.3, seed=0, progress=False))
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowpolicy_scaling_") as tmp:
        stages = [("bc", "pretrain (BC)", "samples/s")]
        if args.ft_iterations:
            stages.append(("ft", "finetune (PPO, envs per process fixed)" if args.ft_weak else "finetune (PPO)",
                           "env steps/s"))
        ckpt = None
        for kind, label, unit in stages:
            ref = None
            for n in sorted(args.procs):
                runs = []
                for r in range(args.repeats):
                    run_dir = Path(tmp) / f"{kind}_n{n}_r{r}"
                    if kind == "bc":
                        cfg = dict(dataset=demos, env_name=ENV, run_dir=str(run_dir),
                                   policy={"kind": "reflow", "network": "mlp", "hidden": 256, "depth": 3,
                                           "default_steps": 4},
                                   obs_horizon=1, action_horizon=4, exec_horizon=2, grad_steps=args.steps,
                                   batch_size=args.batch_size, eval_every=0, eval_episodes=0,
                                   val_every=args.steps, save_every=args.steps, max_episode_steps=200,
                                   progress=False, tensorboard=False)
                    else:
                        cfg = dict(checkpoint=ckpt, iterations=args.ft_iterations,
                                   num_envs=args.ft_envs * (n if args.ft_weak else 1),
                                   n_steps=100, steps=4, eval_every=0, critic_warmup_iters=1, seed=0,
                                   sigma_min=0.05, sigma_max=0.10)
                    res, params = _launch(kind, n, cfg, run_dir.with_suffix(".out.json"))
                    if ref is None:
                        ref = params
                        if kind == "bc":
                            ckpt = str(run_dir / "checkpoints" / "last")
                    # weak scaling: N processes train on other envs than one process; no equivalence to check
                    res["max_param_diff"] = (float("nan") if kind == "ft" and args.ft_weak and n > 1
                                             else float((params - ref).abs().max()))
                    runs.append(res)
                    print(f"{label}, {n} process(es), run {r}: {res['work'] / res['train_s']:.0f} {unit}")
                train_s = float(np.median([x["train_s"] for x in runs]))
                rows.append({"stage": label, "procs": n, "unit": unit, "throughput": runs[0]["work"] / train_s,
                             "train_s": train_s, "train_s_runs": [round(x["train_s"], 2) for x in runs],
                             "max_param_diff_vs_1proc": f"{max(x['max_param_diff'] for x in runs):.1e}"})
            base = next(r["throughput"] for r in rows if r["stage"] == label and r["procs"] == 1)
            for r in rows:
                if r["stage"] == label:
                    r["speedup"] = r["throughput"] / base
                    r["efficiency"] = r["speedup"] / r["procs"]
    cols = ["stage", "procs", "throughput", "unit", "speedup", "efficiency", "train_s", "max_param_diff_vs_1proc"]
    note = (f"\nBC: ReFlow 256x3 MLP on pick-place demos (20, noise 0.3), global batch {args.batch_size}, "
            f"{args.steps} steps. Fine-tuning: ReinFlow K=4 from the one-process BC policy, {args.ft_envs} "
            f"pick-place envs {'per process (weak scaling)' if args.ft_weak else 'in all'}, 100 chunk steps per "
            f"env per iteration, {args.ft_iterations} iterations "
            f"(the first trains only the critic). One CPU thread per process, median of {args.repeats} runs. "
            "max_param_diff_vs_1proc: the largest |parameter difference| from the first one-process run. "
            "BC: float rounding (the same update). Fine-tuning: the policy's forward on N times fewer rows per "
            "process can round differently (batched matrix products), and pick-place's contact dynamics can "
            "amplify such differences into different trajectories; the exact equivalence of the update is "
            "tested on a smooth task (tests/test_distributed.py: 2 vs 1 processes within 1e-5). "
            f"Machine: {os.cpu_count()} CPUs, so counts above that share cores.\n")
    out = Path(args.out) if args.out else RESULTS
    save_results("scaling", rows, cols, vars(args), time.perf_counter() - t_start, extra_md=note, out_dir=out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label in dict.fromkeys(r["stage"] for r in rows):
        rs = [r for r in rows if r["stage"] == label]
        ax.plot([r["procs"] for r in rs], [r["speedup"] for r in rs], "o-", label=label)
    ns = sorted(args.procs)
    ax.plot(ns, ns, "--", color="gray", label="linear")
    ax.set_xlabel("processes")
    ax.set_ylabel("speed-up over 1 process")
    ax.set_title("data-parallel training (torchrun)")
    ax.legend()
    save_figure(fig, out / "scaling.png")


if __name__ == "__main__":
    main()
