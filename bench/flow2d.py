"""Benchmark of the flow core on 2-D targets: 1-RF, 2-RF, distilled 2-RF and shortcut x steps.

    python -m bench.flow2d [--budget small|full] [--target 8gaussians|moons] [--seed 0]

For each model and number of Euler steps: sliced Wasserstein-2 distance to held-out target samples (and
the floor: the distance between two independent target samples), the straightness of the flow, training
wall time and sampling wall time. Saves bench/results/flow2d.{json,md,png}.
"""

from __future__ import annotations

import argparse
import time

import torch

import flowpolicy as fp
from agents.loop import fit
from bench.common import RESULTS, save_figure, save_results
from flowpolicy.metrics import sliced_wasserstein
from flowpolicy.toy import TARGETS

BUDGETS = {
    "small": {"rf_steps": 1000, "reflow_steps": 500, "distill_steps": 300, "sc_steps": 1000, "couplings": 4096},
    "full": {"rf_steps": 5000, "reflow_steps": 3000, "distill_steps": 2000, "sc_steps": 5000, "couplings": 20000},
}
STEPS = (1, 2, 4, 8, 32)


def _net(step_input=False):
    return fp.MLPVelocity((2,), hidden=256, depth=3, emb_dim=64, step_input=step_input)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument("--target", choices=sorted(TARGETS), default="8gaussians")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    b = BUDGETS[args.budget]
    sample_target = TARGETS[args.target]
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()
    n_eval = 2000
    target = sample_target(n_eval, generator=torch.Generator().manual_seed(10_000 + args.seed))
    floor = sliced_wasserstein(sample_target(n_eval, generator=torch.Generator().manual_seed(20_000)), target)
    x0_eval = torch.randn(n_eval, 2, generator=torch.Generator().manual_seed(30_000 + args.seed))

    models, train_s = {}, {}
    t0 = time.perf_counter()
    rf = fp.RectifiedFlow(_net(), (2,))
    fit(rf, lambda i: rf.loss(sample_target(args.batch, generator=g), generator=g), b["rf_steps"], lr=2e-3,
        progress=True, desc="1-RF")
    models["1-RF"], train_s["1-RF"] = rf, time.perf_counter() - t0

    t0 = time.perf_counter()
    x0c, x1c = fp.make_couplings(rf, b["couplings"], steps=100, generator=g)
    rf2 = fp.RectifiedFlow(_net(), (2,))
    rf2.net.load_state_dict(rf.net.state_dict())

    def pairs():
        idx = torch.randint(0, b["couplings"], (args.batch,), generator=g)
        return x0c[idx], x1c[idx]

    def reflow_loss(i):
        x0, x1 = pairs()
        return rf2.loss(x1, x0=x0, generator=g)

    fit(rf2, reflow_loss, b["reflow_steps"], lr=1e-3, progress=True, desc="2-RF")
    models["2-RF"], train_s["2-RF"] = rf2, train_s["1-RF"] + time.perf_counter() - t0

    t0 = time.perf_counter()
    dist = fp.RectifiedFlow(_net(), (2,))
    dist.net.load_state_dict(rf2.net.state_dict())

    def distill_loss(i):
        x0, x1 = pairs()
        return fp.distillation_loss(dist, x0, x1, steps=1, generator=g)

    fit(dist, distill_loss, b["distill_steps"], lr=5e-4, progress=True, desc="distill")
    models["2-RF distilled (1 step)"] = dist
    train_s["2-RF distilled (1 step)"] = train_s["2-RF"] + time.perf_counter() - t0

    t0 = time.perf_counter()
    sc = fp.ShortcutFlow(_net(step_input=True), (2,), max_level=5, ema_decay=0.99)
    fit(sc, lambda i: sc.loss(sample_target(args.batch, generator=g), generator=g), b["sc_steps"], lr=2e-3,
        progress=True, desc="shortcut")
    models["shortcut"], train_s["shortcut"] = sc, time.perf_counter() - t0

    rows, samples = [], {}
    for name, m in models.items():
        with torch.no_grad():
            s_val = fp.straightness(m, 1000, steps=32) if not isinstance(m, fp.ShortcutFlow) else None
            for k in STEPS:
                t0 = time.perf_counter()
                x = m.sample(steps=k, x0=x0_eval)
                samp_ms = 1000 * (time.perf_counter() - t0)
                samples[(name, k)] = x
                rows.append({"method": name, "steps": k, "sw2": sliced_wasserstein(x, target), "sw2_floor": floor,
                             "straightness": s_val, "train_s": round(train_s[name], 1),
                             "sample_ms_2000": round(samp_ms, 2), "seed": args.seed})
    wall = time.perf_counter() - t_start
    _plot(samples, target, list(models), RESULTS / "flow2d.png")
    return save_results("flow2d", rows, ["method", "steps", "sw2", "sw2_floor", "straightness", "train_s",
                                         "sample_ms_2000"],
                        {"budget": args.budget, **b, "target": args.target, "batch": args.batch,
                         "net": "MLP 3x256", "seed": args.seed, "threads": 1}, wall,
                        extra_md="\nsw2: sliced Wasserstein-2 to 2,000 held-out target samples (lower is better); "
                                 "sw2_floor: the same distance between two independent target samples. "
                                 "train_s is cumulative (2-RF includes 1-RF's training).\n")


def _plot(samples, target, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), len(STEPS) + 1, figsize=(2.2 * (len(STEPS) + 1), 2.2 * len(names)))
    for r, name in enumerate(names):
        axes[r, 0].scatter(target[:, 0], target[:, 1], s=1, c="gray")
        axes[r, 0].set_title("target", fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=8)
        for c, k in enumerate(STEPS, start=1):
            x = samples[(name, k)]
            axes[r, c].scatter(x[:, 0], x[:, 1], s=1)
            axes[r, c].set_title(f"{k} step{'s' if k > 1 else ''}", fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)


if __name__ == "__main__":
    main()
