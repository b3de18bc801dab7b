"""Image generation benchmark on scikit-learn's digits: few-step quality of 1-RF, 2-RF, distilled 2-RF and
shortcut models, with the rectified-flow-pytorch package as a peer on the same network, data and budget.

    python -m bench.images [--budget small|full]

Every model samples the same evaluation noise. Quality is the Fréchet distance (FD) of the digits
classifier's penultimate features (agents/images/classifier.py) between generated and all real images; the
``data`` row scores real images (a subset of the reference) for the floor. Straightness is
flowpolicy.reflow.straightness. Writes bench/results/images.{json,md,png} (``images-small.*`` for the small
budget) and prints the table. "training s" is each model's own stage: the 2-RF's includes solving its
couplings; the distilled students start from the trained 2-RF, which starts from the 1-RF.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf

from agents.images.classifier import FrechetScorer, load_or_train_classifier
from agents.images.data import load_digits
from agents.images.trainer import (
    TrainedModel,
    eval_noise,
    evaluate,
    image_grid,
    train_base,
    train_distilled,
    train_reflow,
)
from flowpolicy import EMA, RectifiedFlow, make_network

ROOT = Path(__file__).resolve().parents[1]
RF_STEPS = [1, 2, 4, 8, 100]
REFLOW_STEPS = [1, 2]
SHORTCUT_STEPS = [1, 4, 128]
# per budget: overrides of configs/stage/image.yaml
BUDGETS = {
    "small": {"train_steps": 300, "reflow": {"couplings": 2000, "steps": 300}, "distill": {"steps": 300},
              "eval": {"samples": 500, "straightness_samples": 200, "straightness_steps": 16}},
    "full": {"train_steps": 3000, "reflow": {"couplings": 20000, "steps": 3000}, "distill": {"steps": 3000},
             "eval": {"samples": 1000, "straightness_samples": 500, "straightness_steps": 32}},
}


# --- the peer --------------------------------------------------------------------------------------------------


def _import_peer() -> tuple[types.ModuleType | None, str]:
    """Import rectified_flow_pytorch; returns (module or None, a note saying how or why not).

    The package imports torchvision at module level for image saving and an optional LPIPS loss. When the
    installed torchvision cannot load its compiled ops against this torch (a CUDA torchvision beside a CPU
    torch), that import fails; the peer's flow, loss and sampler need no torchvision, so a stub that fails
    loudly if any torchvision function is called stands in for it, and the note says so.
    """
    try:
        import rectified_flow_pytorch

        return rectified_flow_pytorch, "imported as installed"
    except ImportError as e:
        return None, f"not installed ({e}); pip install rectified-flow-pytorch"
    except Exception as e:  # torchvision's compiled ops fail at import with a RuntimeError
        reason = f"{type(e).__name__}: {e}"
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name in [m for m in sys.modules if m.startswith("rectified_flow_pytorch")]:
        del sys.modules[name]

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is unavailable in this environment (stubbed by bench.images)")

    tv = types.ModuleType("torchvision")
    tv.utils = types.ModuleType("torchvision.utils")
    tv.utils.save_image = unavailable
    tv.models = types.ModuleType("torchvision.models")
    tv.models.vgg16 = unavailable
    tv.models.VGG16_Weights = types.SimpleNamespace(DEFAULT=None)
    tv.transforms = types.ModuleType("torchvision.transforms")
    sys.modules.update({"torchvision": tv, "torchvision.utils": tv.utils, "torchvision.models": tv.models,
                        "torchvision.transforms": tv.transforms})
    try:
        import rectified_flow_pytorch
    except Exception as e:
        return None, f"does not import: {reason}; with a torchvision stub: {type(e).__name__}: {e}"
    return rectified_flow_pytorch, (f"installed; the venv's torchvision does not import ({reason[:120]}), so a "
                                    "stub stands in for it (the peer's flow, loss and Euler sampler do not use it)")


class _PeerNet(torch.nn.Module):
    """Our ImageUNet behind the peer's calling convention ``model(x, times=t)`` (same time convention)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        return self.net(x, times)


class PeerModel:
    """rectified-flow-pytorch's RectifiedFlow (its MSE flow loss, its torchdiffeq Euler sampler) on our U-Net,
    trained with the same optimizer, batches, gradient clipping and EMA as ours."""

    def __init__(self, rfp: types.ModuleType, x_shape: tuple[int, ...], stage) -> None:
        net_cfg = OmegaConf.to_container(stage.net, resolve=True)
        kind = net_cfg.pop("kind")
        net_cfg["channels"] = tuple(net_cfg["channels"])
        self.rfp, self.x_shape, self.name = rfp, tuple(x_shape), "peer_1rf"
        self.net = _PeerNet(make_network(kind, x_shape, **net_cfg))
        # data is already in [-1, 1]: identity (None) instead of the peer's [0, 1] -> [-1, 1] maps
        self.flow = rfp.RectifiedFlow(self.net, data_normalize_fn=None, data_unnormalize_fn=None,
                                      odeint_kwargs={"method": "euler"}, data_shape=self.x_shape)
        self.ema = EMA(self.net, decay=float(stage.ema_decay))
        self.train_s = 0.0

    def train(self, images: torch.Tensor, steps: int, batch_size: int, lr: float, grad_clip: float,
              schedule: str = "constant") -> None:
        """The peer's loss ``flow(x1)``; Adam, clipping, lr schedule and EMA as in agents.images.trainer.fit."""
        start = time.perf_counter()
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps)) if schedule == "cosine" else None
        self.net.train()
        for _ in range(steps):
            loss = self.flow(images[torch.randint(0, images.shape[0], (batch_size,))])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            self.ema.update(self.net)
        self.train_s += time.perf_counter() - start

    @torch.no_grad()
    def generate(self, x0: torch.Tensor, steps: int, batch: int = 1000) -> torch.Tensor:
        # the peer's sample() always runs its own .model: wrap the EMA network in a second peer flow
        sampler = self.rfp.RectifiedFlow(self.ema.model, data_normalize_fn=None, data_unnormalize_fn=None,
                                         odeint_kwargs={"method": "euler"}, data_shape=self.x_shape)
        # the peer's `steps` counts time points: K Euler steps need K + 1
        return torch.cat([sampler.sample(batch_size=x0[i : i + batch].shape[0], steps=steps + 1,
                                         noise=x0[i : i + batch]) for i in range(0, x0.shape[0], batch)])


def _evaluate_peer(peer: PeerModel, x0, steps_list, scorer) -> tuple[dict, dict]:
    metrics, samples = {"fd": {}, "sample_s": {}}, {}
    for k in steps_list:
        start = time.perf_counter()
        samples[k] = peer.generate(x0, k)
        metrics["sample_s"][k] = time.perf_counter() - start
        metrics["fd"][k] = scorer(samples[k])
    return metrics, samples


# --- the benchmark --------------------------------------------------------------------------------------------


LABELS = {"1rf": "1-RF", "2rf": "2-RF", "shortcut": "shortcut", "peer_1rf": "1-RF (rectified-flow-pytorch)",
          "data": "data (real images)"}


def _label(name: str, info: dict | None = None) -> str:
    """Row label; a distilled student also says whose pairs it learned (``distill.pairs``)."""
    info = info or {}
    if "k" in info:
        pairs = {"reflow": "1-RF pairs", "teacher": "2-RF pairs"}.get(info.get("pairs"), info.get("pairs"))
        return f"2-RF + distill (k={info['k']}, {pairs})"
    return LABELS.get(name, name)


def _rows_for(name: str, impl: str, metrics: dict, train_s: float, extra: dict | None = None) -> list[dict]:
    return [{"method": _label(name, extra), "model": name, "impl": impl, "steps": k, "nfe": k, "fd": metrics["fd"][k],
             "sample_s": metrics["sample_s"][k], "train_s": train_s, "straightness": metrics.get("straightness"),
             "seed": 0, **(extra or {})} for k in metrics["fd"]]


def _straightness(rows: list[dict], model: str) -> float | None:
    """The straightness recorded for ``model`` (None if it has none)."""
    return next((r["straightness"] for r in rows if r["model"] == model), None)


def _markdown(rows: list[dict]) -> str:
    lines = ["| method | impl | steps | FD (lower is better) | sampling s | training s | straightness |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = "" if r.get("straightness") is None else f"{r['straightness']:.4f}"
        train = "" if r["train_s"] is None else f"{r['train_s']:.1f}"
        samp = "" if r["sample_s"] is None else f"{r['sample_s']:.2f}"
        lines.append(f"| {r['method']} | {r['impl']} | {r['steps']} | {r['fd']:.2f} | {samp} | {train} | {s} |")
    return "\n".join(lines)


def _plot(strips: list[tuple[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(strips), 1, figsize=(8, 0.5 * len(strips) + 0.4))
    for ax, (label, imgs) in zip(axes, strips):
        ax.imshow(image_grid([imgs], scale=1), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("digits samples from the same noise (rows: model @ Euler steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--no-peer", action="store_true", help="skip rectified-flow-pytorch")
    parser.add_argument("--progress", action="store_true", help="tqdm bars while training")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    seed = 0
    stage = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "stage" / "image.yaml"),
                            OmegaConf.create(BUDGETS[args.budget]))
    stage.progress = args.progress
    data = load_digits()
    shape = data.image_shape

    start = time.perf_counter()
    clf, cinfo = load_or_train_classifier(data, cache_dir=ROOT / "data" / "classifiers",
                                          steps=int(stage.classifier.steps), seed=int(stage.classifier.seed))
    cinfo["wall_s"] = time.perf_counter() - start
    scorer = FrechetScorer(clf, data.images)
    n_eval = int(stage.eval.samples)
    x0 = eval_noise(n_eval, shape, seed + 12345)
    ev = {"straightness_samples": int(stage.eval.straightness_samples),
          "straightness_steps": int(stage.eval.straightness_steps), "seed": seed}

    rows, strips = [], []
    real = data.images[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n_eval]]
    rows += _rows_for("data", "-", {"fd": {0: scorer(real)}, "sample_s": {0: None}}, None)
    strips.append(("data", real[:16]))

    def record(model: TrainedModel, steps_list, impl="flowpolicy", straight=True):
        metrics, samples = evaluate(model, x0, steps_list, scorer, **(ev if straight else {"seed": seed}))
        rows.extend(_rows_for(model.name, impl, metrics, model.train_s, model.info))
        strips.extend((f"{_label(model.name, model.info)} @ {k}", samples[k][:16]) for k in steps_list)
        print(f"[{time.perf_counter() - wall:6.0f}s] {model.name}: train {model.train_s:.0f}s, "
              f"FD {({k: round(v, 2) for k, v in metrics['fd'].items()})}", flush=True)

    torch.manual_seed(seed)
    rf1 = train_base("1rf", "rf", data, stage, "cpu", progress=args.progress)
    record(rf1, RF_STEPS)
    rf2 = train_reflow(rf1, stage, seed, progress=args.progress)
    record(rf2, REFLOW_STEPS)
    students = train_distilled(rf2, stage, seed, progress=args.progress)
    for student in students:
        record(student, REFLOW_STEPS, straight=False)
    torch.manual_seed(seed)
    shortcut = train_base("shortcut", "shortcut", data, stage, "cpu", progress=args.progress)
    record(shortcut, SHORTCUT_STEPS)

    rfp, peer_note = (None, "skipped (--no-peer)") if args.no_peer else _import_peer()
    if rfp is not None:
        torch.manual_seed(seed)
        peer = PeerModel(rfp, shape, stage)
        # same network, same convention: before training, the peer's sampler must reproduce ours exactly
        ours = RectifiedFlow(peer.ema.model.net, shape).sample(steps=4, x0=x0[:64])
        if not torch.allclose(peer.generate(x0[:64], 4), ours, atol=1e-5):
            raise RuntimeError("rectified-flow-pytorch's Euler sampler disagrees with flowpolicy's on one network")
        peer.train(data.images, int(stage.train_steps), int(stage.batch_size), float(stage.lr),
                   float(stage.grad_clip), str(stage.lr_schedule))
        metrics, samples = _evaluate_peer(peer, x0, RF_STEPS, scorer)
        rows.extend(_rows_for(peer.name, "rectified-flow-pytorch", metrics, peer.train_s))
        strips.extend((f"{_label(peer.name)} @ {k}", samples[k][:16]) for k in RF_STEPS)
        print(f"[{time.perf_counter() - wall:6.0f}s] peer: FD {metrics['fd']}", flush=True)

    def fd(model, k):
        return next(r["fd"] for r in rows if r["model"] == model and r["steps"] == k)

    reference = fd("1rf", 100)
    one_step = {m: fd(m, 1) for m in [s.name for s in students] + ["shortcut"]}
    best = min(one_step, key=one_step.get)
    best_label = next(r["method"] for r in rows if r["model"] == best)
    summary = {
        "fd_1rf_100_steps": reference,
        "best_one_step": {"model": best, "fd": one_step[best], "ratio_to_1rf_100_steps": one_step[best] / reference},
        "target": "1-step FD of distilled 2-RF or shortcut <= 1.5 x the 100-step FD of 1-RF",
        "target_met": one_step[best] <= 1.5 * reference,
        "straightness": {m: _straightness(rows, m) for m in ("1rf", "2rf")},
        "peer": peer_note,
        "classifier": cinfo,
    }
    out = Path(args.out)
    # the full budget's files feed the README; a quick check must not overwrite them
    stem = "images" if args.budget == "full" else f"images-{args.budget}"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "name": "images",
        "command": "python -m bench.images " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - wall,
        "config": {"budget": args.budget, "dataset": data.name, "eval_samples": n_eval, "seed": seed,
                   "stage": OmegaConf.to_container(stage, resolve=True)},
        "rows": rows,
        "summary": summary,
    }
    table = _markdown(rows)
    notes = (f"\n\nFD: Fréchet distance of digits-classifier features to all {len(data)} real images, "
             f"{n_eval} samples per row, same noise for every model; classifier held-out accuracy "
             f"{cinfo['holdout_accuracy']:.3f}. Best 1-step: {best_label} FD {one_step[best]:.2f} = "
             f"{summary['best_one_step']['ratio_to_1rf_100_steps']:.2f} x the 1-RF 100-step FD {reference:.2f} "
             f"(target <= 1.5x: {'met' if summary['target_met'] else 'not met'}). Peer: {peer_note}. "
             f"Budget {args.budget}, wall {result['wall_s']:.0f} s on {os.cpu_count()} CPUs.\n")
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(table + notes)
    _plot(strips, out / f"{stem}.png")
    print(table + notes)
    return result


if __name__ == "__main__":
    main()
