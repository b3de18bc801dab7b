"""Policy latency: eager vs fast K-step sampling, against K bare network forwards, and policy-in-the-loop
rollouts against the raw vector-env step rate.

    python -m bench.latency                    # CPU, one thread (and CUDA rows where a GPU exists)
    python -m bench.latency --budget small     # fewer calls per point

Rows (one per kind x device x K x batch): median microseconds per ``predict_action_chunk`` call (numpy
observations in, actions out, as an env loop calls it) with ``fast_sampling`` off (eager) and on (fast), the
median of one bare velocity-network forward at that batch (``net(x, t, cond)``, conditioning included), and
the ratios fast / (K bare forwards) and eager / fast. The networks are the Hopper-sized policies of
``bench.finetune`` (MLP 256 x 3 residual blocks, Ta = 4, Da = 3, Do = 11) with random weights: latency does not
depend on the weights. Rollout rows: env steps/s of a pick-place policy (K = 4, exec horizon 2) stepping N sync
envs, beside the same envs stepped with random actions. Writes bench/results/latency.{json,md,png}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

BUDGETS = {"small": {"seconds": 0.3, "min_calls": 20, "rollout_steps": 200},
           "full": {"seconds": 1.5, "min_calls": 100, "rollout_steps": 1000}}


def _median_us(fn, seconds: float, min_calls: int, sync=None) -> float:
    for _ in range(5):
        fn()
    if sync:
        sync()
    t0, times = time.perf_counter(), []
    while len(times) < min_calls or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
        if len(times) >= 20 * min_calls:
            break
    return float(np.median(times) * 1e6)


def _policy(kind: str, device: str):
    import torch

    from flowpolicy.flow import RectifiedFlow, ShortcutFlow
    from flowpolicy.nets import MLPVelocity
    from flowpolicy.policy import FlowPolicy

    torch.manual_seed(0)
    net = MLPVelocity((4, 3), cond_dim=11, hidden=256, depth=3, step_input=kind == "shortcut")
    flow = ShortcutFlow(net, (4, 3), max_level=5) if kind == "shortcut" else RectifiedFlow(net, (4, 3))
    return FlowPolicy(flow, 11, 3, 1, 4, obs_stats=(np.full(11, -5.0), np.full(11, 5.0)),
                      action_stats=(np.full(3, -1.0), np.full(3, 1.0))).eval().to(device)


def latency_rows(devices, batches, ks, seconds, min_calls) -> list[dict]:
    import torch

    rows = []
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else None
        for kind in ("reflow", "shortcut"):
            policy = _policy(kind, device)
            net = policy.flow.net
            for b in batches:
                obs = np.random.default_rng(0).normal(size=(b, 11)).astype(np.float32)
                x = torch.randn(b, 4, 3, device=device)
                t = torch.zeros(b, device=device)
                cond = torch.randn(b, 11, device=device)
                d = torch.full((b,), 0.25, device=device)
                args = (x, t, cond, d) if kind == "shortcut" else (x, t, cond)
                with torch.no_grad():
                    bare = _median_us(lambda net=net, args=args: net(*args), seconds, min_calls, sync)
                for k in ks:
                    res = {}
                    modes = ("eager", "fast", "graph") if device == "cuda" else ("eager", "fast")
                    for mode in modes:
                        policy.fast_sampling = mode != "eager"
                        policy.cuda_graphs = mode == "graph"
                        res[mode] = _median_us(lambda k=k, p=policy, o=obs: p.predict_action_chunk(o, steps=k).cpu(),
                                               seconds, min_calls, sync)
                    best = res.get("graph", res["fast"])
                    rows.append({"device": device, "kind": kind, "K": k, "batch": b, "eager_us": res["eager"],
                                 "fast_us": res["fast"], "graph_us": res.get("graph"), "bare_forward_us": bare,
                                 "fast_over_K_forwards": best / (k * bare),
                                 "eager_over_K_forwards": res["eager"] / (k * bare),
                                 "speedup": res["eager"] / best})
                    print(rows[-1], flush=True)
            policy.fast_sampling = policy.cuda_graphs = True
    return rows


def rollout_rows(num_envs_list, steps: int, env: str = "metaworld/pick-place-v3", asynchronous: bool = False,
                 device: str = "cpu") -> list[dict]:
    """Env steps/s: random actions vs a K=4 policy (on ``device``) acting every exec-horizon (2) steps."""
    import torch

    from envs.factory import make_vec_env
    from flowpolicy.flow import RectifiedFlow
    from flowpolicy.nets import MLPVelocity
    from flowpolicy.policy import FlowPolicy

    rows = []
    for n in num_envs_list:
        envs = make_vec_env(env, n, seed=0, asynchronous=asynchronous, action_horizon=2, max_episode_steps=200)
        try:
            obs_dim, act_dim = envs.single_observation_space.shape[-1], envs.single_action_space.shape[-1]
            torch.manual_seed(0)
            net = MLPVelocity((4, act_dim), cond_dim=obs_dim, hidden=256, depth=3)
            policy = FlowPolicy(RectifiedFlow(net, (4, act_dim)), obs_dim, act_dim, 1, 4, exec_horizon=2,
                                obs_stats=(np.full(obs_dim, -3.0), np.full(obs_dim, 3.0)),
                                action_stats=(np.full(act_dim, -1.0), np.full(act_dim, 1.0)),
                                default_steps=4).eval().to(device)
            out = {"env": env, "num_envs": n, "vector": "async" if asynchronous else "sync", "policy_device": device}
            for mode in ("random", "eager", "fast"):
                obs, _ = envs.reset(seed=0)
                policy.fast_sampling = policy.cuda_graphs = mode == "fast"
                t0 = time.perf_counter()
                for _ in range(steps):
                    if mode == "random":
                        act = np.stack([envs.single_action_space.sample() for _ in range(n)])
                    else:
                        act = policy.predict_action_chunk(obs).cpu().numpy()[:, :2]
                    obs, *_ = envs.step(np.clip(act, -1, 1).astype(np.float32))
                out[f"{mode}_steps_per_s"] = steps * n * 2 / (time.perf_counter() - t0)
            out["fast_over_random"] = out["fast_steps_per_s"] / out["random_steps_per_s"]
            out["eager_over_random"] = out["eager_steps_per_s"] / out["random_steps_per_s"]
            rows.append(out)
            print(out, flush=True)
        finally:
            envs.close()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--num-envs", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rollout-env", default="metaworld/pick-place-v3", help="env of the policy-in-the-loop rows")
    p.add_argument("--async-envs", action="store_true", help="rollout envs in worker processes (one per env)")
    p.add_argument("--rollout-device", default="cpu", help="device of the policy in the rollout rows")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    import torch

    from bench.common import RESULTS, check_out_dir, markdown_table, save_results

    # every argument is checked before measuring: a mistake found after it would cost the whole measurement
    for flag, values in (("--threads", [args.threads]), ("--batches", args.batches), ("--ks", args.ks),
                         ("--num-envs", args.num_envs)):
        if min(values) < 1:
            p.error(f"{flag} must be >= 1, got {values if len(values) > 1 else values[0]}")
    check_out_dir(args.out or RESULTS)
    try:
        dev = torch.device(args.rollout_device)
    except RuntimeError:
        p.error(f"--rollout-device {args.rollout_device!r}: not a torch device (e.g. cpu, cuda, cuda:0)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--rollout-device {args.rollout_device}: CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--rollout-device {args.rollout_device}: use cpu or cuda")
    from envs.factory import make_env

    try:  # the name, and that the env can be made here (its package installed)
        make_env(args.rollout_env).close()
    except (ValueError, ImportError) as e:
        p.error(f"--rollout-env: {str(e).splitlines()[0]}")
    torch.set_num_threads(args.threads)
    b = BUDGETS[args.budget]
    t0 = time.perf_counter()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = latency_rows(devices, args.batches, args.ks, b["seconds"], b["min_calls"])
    roll = rollout_rows(args.num_envs, b["rollout_steps"], args.rollout_env, args.async_envs, args.rollout_device)
    wall = time.perf_counter() - t0
    cols = ["device", "kind", "K", "batch", "eager_us", "fast_us", "graph_us", "bare_forward_us",
            "fast_over_K_forwards", "eager_over_K_forwards", "speedup"]
    rcols = ["env", "num_envs", "vector", "policy_device", "random_steps_per_s", "eager_steps_per_s",
             "fast_steps_per_s", "fast_over_random", "eager_over_random"]
    extra = (f"\nCPU with {args.threads} torch thread(s). Median of >= {b['min_calls']} calls (or {b['seconds']} s) "
             "per point; `bare_forward_us` is one velocity-network forward (conditioning included) at that batch; "
             "`fast_over_K_forwards` <= 1 means the whole call, normalization included, costs less than its K "
             "forwards; on CUDA `graph_us` is the whole call replayed as one CUDA graph (normalization included), and "
             "`fast_over_K_forwards` and `speedup` (eager / optimized) use the graph time there.\n\n"
             f"**Policy in the loop** ({'async' if args.async_envs else 'sync'} vector env, {args.rollout_env}, "
             "K = 4, 2 executed actions per call; env steps/s):\n\n" + markdown_table(roll, rcols, ".2f") + "\n")
    save_results("latency", rows, cols, {"budget": args.budget, "threads": args.threads, "batches": args.batches,
                                         "ks": args.ks, "rollout": roll}, wall, extra_md=extra,
                 out_dir=args.out, module="bench.latency")
    _plot(rows, args)


def _plot(rows, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import RESULTS, save_figure

    fig, axes = plt.subplots(1, len(args.batches), figsize=(5 * len(args.batches), 4), squeeze=False)
    for ax, b in zip(axes[0], args.batches):
        for i, (dev, kind) in enumerate(sorted({(r["device"], r["kind"]) for r in rows})):
            sel = [r for r in rows if r["batch"] == b and r["device"] == dev and r["kind"] == kind]
            ks = [r["K"] for r in sel]
            ax.plot(ks, [r["eager_us"] for r in sel], "--o", color=f"C{i}", label=f"{dev} {kind} eager")
            ax.plot(ks, [r["fast_us"] for r in sel], "-o", color=f"C{i}", label=f"{dev} {kind} fast")
            ax.plot(ks, [r["K"] * r["bare_forward_us"] for r in sel], ":", color=f"C{i}", label=f"{dev} {kind} K forwards")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (denoising steps)")
        ax.set_ylabel("µs per call (median)")
        ax.set_title(f"batch {b}")
        ax.legend(fontsize=6)
    from pathlib import Path

    save_figure(fig, Path(args.out or RESULTS) / "latency.png")


if __name__ == "__main__":
    main()
