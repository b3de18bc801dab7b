"""Benchmark of data-parallel BC pretraining: throughput and equivalence for 1, 2, ... processes (torchrun).

    python -m bench.scaling                              # 1 and 2 processes, this machine
    python -m bench.scaling --procs 1 2 4 8 16 --steps 600   # a 16-core machine

For each process count N it launches ``torchrun --standalone --nproc_per_node N -m bench.scaling --worker``
(N = 1: one plain process, the same code path as ``python train.py``), which pretrains the task's ReFlow
policy (256 x 3 MLP) on the cached demos with the same global batch for ``--steps`` gradient steps, each
process on one CPU thread, and reports:

* samples/s (global batch x steps / training wall time, checkpoint writes included, start-up excluded),
  speed-up over one process and efficiency (speed-up / N);
* the final validation loss and the largest parameter difference from the one-process run: data-parallel
  training makes the same update as one process with the whole batch, so both stay at float rounding.

Writes bench/results/scaling.{json,md,png}. PPO fine-tuning runs in one process today (its envs are
vectorized inside that process); this benchmark covers the stage that torchrun parallelizes.
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


def _worker(cfg_path: str, out_path: str) -> None:
    import torch

    from agents import distributed
    from agents.pretrain import PretrainConfig, Pretrainer

    torch.set_num_threads(1)
    info = distributed.init("cpu")
    tr = Pretrainer(PretrainConfig(**json.loads(Path(cfg_path).read_text())))
    distributed.barrier()
    t0 = time.perf_counter()
    out = tr.run()
    distributed.barrier()
    wall = time.perf_counter() - t0
    if info.is_main:
        params = torch.cat([p.detach().flatten() for p in tr.policy.parameters()])
        torch.save(params, Path(out_path).with_suffix(".pt"))
        Path(out_path).write_text(json.dumps({"train_s": wall, "world_size": info.world_size,
                                              "val_loss": out.get("val/loss"), "step": out["step"]}))
    distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=1024, help="global batch (split across processes)")
    p.add_argument("--repeats", type=int, default=2, help="runs per process count (the median is reported)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        from agents import distributed

        _worker(*args.worker)
        distributed.exit_process(0)

    import numpy as np
    import torch

    from bench.common import RESULTS, save_figure, save_results
    from envs.collect import ensure_demos

    bad = [n for n in args.procs if n < 1 or args.batch_size % n]
    if bad:
        p.error(f"--procs {bad}: each count must be >= 1 and divide --batch-size {args.batch_size}")
    t_start = time.perf_counter()
    env = "metaworld/pick-place-v3"
    demos = str(ensure_demos(env, num_demos=20, noise=0.3, seed=0, progress=False))
    rows, ref = [], None
    with tempfile.TemporaryDirectory(prefix="flowpolicy_scaling_") as tmp:
        for n in args.procs:
            runs = []
            for r in range(args.repeats):
                run_dir = Path(tmp) / f"n{n}_r{r}"
                cfg = dict(dataset=demos, env_name=env, run_dir=str(run_dir),
                           policy={"kind": "reflow", "network": "mlp", "hidden": 256, "depth": 3,
                                   "default_steps": 4},
                           obs_horizon=1, action_horizon=4, exec_horizon=2, steps=args.steps,
                           batch_size=args.batch_size, eval_every=0, eval_episodes=0, val_every=args.steps,
                           save_every=args.steps, max_episode_steps=200, progress=False, tensorboard=False)
                cfg_path, out_path = run_dir.with_suffix(".json"), run_dir.with_suffix(".out.json")
                cfg_path.write_text(json.dumps(cfg))
                penv = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       "--max_restarts=0", "-m", "bench.scaling", "--worker", str(cfg_path), str(out_path)]
                proc = subprocess.run(cmd, cwd=ROOT, env=penv, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"error: {n} processes failed:\n{proc.stderr[-2000:]}")
                res = json.loads(out_path.read_text())
                params = torch.load(out_path.with_suffix(".pt"))
                if ref is None:
                    ref = params
                res["max_param_diff"] = float((params - ref).abs().max())
                runs.append(res)
                print(f"{n} process(es), run {r}: {args.steps * args.batch_size / res['train_s']:.0f} samples/s")
            train_s = float(np.median([x["train_s"] for x in runs]))
            diff = max(x["max_param_diff"] for x in runs)
            rows.append({"procs": n, "samples_per_s": args.steps * args.batch_size / train_s, "train_s": train_s,
                         "train_s_runs": [round(x["train_s"], 2) for x in runs],
                         "val_loss": runs[0]["val_loss"], "max_param_diff_vs_1proc": f"{diff:.1e}"})
    base = next((r["samples_per_s"] for r in rows if r["procs"] == 1), None)
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base if base else None
        r["efficiency"] = r["speedup"] / r["procs"] if base else None
    cols = ["procs", "samples_per_s", "speedup", "efficiency", "train_s", "val_loss", "max_param_diff_vs_1proc"]
    note = (f"\nReFlow 256x3 MLP on pick-place demos (20, noise 0.3); global batch {args.batch_size}, "
            f"{args.steps} steps, one CPU thread per process, median of {args.repeats} runs. "
            "max_param_diff_vs_1proc: largest |parameter difference| from the first one-process run after "
            "training (0 up to float rounding: the same update).\n")
    out = Path(args.out) if args.out else RESULTS
    save_results("scaling", rows, cols, vars(args), time.perf_counter() - t_start, extra_md=note, out_dir=out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ns = [r["procs"] for r in rows]
    ax.plot(ns, [r["samples_per_s"] for r in rows], "o-", label="measured")
    if base:
        ax.plot(ns, [base * n for n in ns], "--", color="gray", label="linear")
    ax.set_xlabel("processes")
    ax.set_ylabel("BC samples / s")
    ax.set_title("data-parallel BC pretraining")
    ax.legend()
    save_figure(fig, out / "scaling.png")


if __name__ == "__main__":
    main()
