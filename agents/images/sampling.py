"""Sampling from trained image generators: the fixed evaluation noise, :func:`evaluate` (FD, sampling time,
straightness), sample grids, and generator checkpoints (:func:`save_checkpoint`, :func:`load_generator`).
:mod:`agents.images.trainer` re-exports all of it.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import flowpolicy
from flowpolicy import RectifiedFlow, ShortcutFlow, make_network, make_time_sampler, straightness

from .classifier import FrechetScorer
from .data import to_uint8
from .fitting import CHECKPOINT_FORMAT, TrainedModel, _SamplingView

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


# --- evaluation --------------------------------------------------------------------------------------------


def eval_noise(num: int, x_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fixed evaluation noise (num, *x_shape), drawn on the CPU from ``seed`` (same for every model)."""
    return torch.randn((num, *x_shape), generator=torch.Generator().manual_seed(seed))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: TrainedModel, x0: torch.Tensor, steps_list, scorer: FrechetScorer | None,
             straightness_samples: int = 0, straightness_steps: int = 32,
             seed: int = 0) -> tuple[dict, dict[int, torch.Tensor]]:
    """FD and sampling time at each number of steps (+ straightness for rectified flows).

    Returns (metrics, samples) with metrics ``{"fd": {K: float}, "sample_s": {K: seconds}, "straightness"}``
    and samples ``{K: (N, C, H, W) on the CPU}``.
    """
    dev = next(model.ema.model.parameters()).device
    metrics: dict = {"fd": {}, "sample_s": {}}
    samples = {}
    for k in steps_list:
        _sync(dev)
        start = time.perf_counter()
        x = model.generate(x0, int(k))
        _sync(dev)
        metrics["sample_s"][int(k)] = time.perf_counter() - start
        samples[int(k)] = x.cpu()
        if scorer is not None:
            metrics["fd"][int(k)] = scorer(samples[int(k)])
    if straightness_samples and not isinstance(model.flow, ShortcutFlow):
        # straightness() places its time tensors on the CPU when there is no condition: evaluate a CPU copy
        view = _SamplingView(copy.deepcopy(model.ema.model).cpu(), model.flow.x_shape)
        metrics["straightness"] = straightness(view, num=straightness_samples, steps=straightness_steps,
                                               generator=torch.Generator().manual_seed(seed))
    return metrics, samples


def check_steps(method: str, steps_list) -> list[int]:
    """Validate the evaluation step counts before any training (shortcut models need powers of two)."""
    steps = [int(k) for k in steps_list]
    if not steps or any(k < 1 for k in steps):
        raise ValueError(f"eval steps must be positive integers, got {list(steps_list)}")
    if method == "shortcut":
        bad = [k for k in steps if k & (k - 1)]
        if bad:
            raise ValueError(f"shortcut models sample with powers of two steps; {bad} are not (stage.eval.steps)")
    return steps


# --- images and checkpoints -------------------------------------------------------------------------------


def image_grid(rows: list[torch.Tensor], scale: int = 4, pad: int = 1) -> PILImage:
    """A PIL image tiling ``rows`` (each (n, C, H, W) in [-1, 1]) with ``pad`` px gaps, upscaled ``scale``x."""
    from PIL import Image

    n_cols = max(r.shape[0] for r in rows)
    c, h, w = rows[0].shape[1:]
    canvas = np.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(to_uint8(r)):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = img
    mode = "L" if c == 1 else "RGB"
    pil = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode)
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)


def save_checkpoint(model: TrainedModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``path/{model.safetensors, config.yaml}`` atomically (temp dir, then rename).

    ``model.safetensors`` holds ``ema.*`` (sampling weights) and ``net.*`` (training weights).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {f"ema.{k}": v.detach().cpu().contiguous() for k, v in model.ema.model.state_dict().items()}
    tensors.update({f"net.{k}": v.detach().cpu().contiguous() for k, v in model.flow.net.state_dict().items()})
    save_file(tensors, str(tmp / "model.safetensors"))
    cfg = {"format_version": CHECKPOINT_FORMAT, "flowpolicy_version": flowpolicy.__version__,
           "kind": "image_generator", "model": model.name, "flow": model.spec, "train_s": model.train_s,
           "ema_updates": model.ema.num_updates, **(extra or {})}
    OmegaConf.save(OmegaConf.create(cfg), tmp / "config.yaml")
    if path.exists():
        old = path.parent / f".{path.name}.old{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[RectifiedFlow, DictConfig]:
    """Rebuild a saved generator with its EMA (sampling) weights as ``flow.net``; returns (flow, config).

    Sample with ``flow.sample(steps=K, batch=N)`` (images (N, C, H, W) in [-1, 1]).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.yaml").exists() or not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{str(path)!r} is not an image generator checkpoint (config.yaml + "
                                "model.safetensors)")
    cfg = OmegaConf.load(path / "config.yaml")
    if cfg.get("format_version") != CHECKPOINT_FORMAT or cfg.get("kind") != "image_generator":
        raise ValueError(f"{str(path)!r}: unsupported checkpoint (kind={cfg.get('kind')}, "
                         f"format_version={cfg.get('format_version')})")
    spec = OmegaConf.to_container(cfg.flow, resolve=True)
    net_cfg = dict(spec["net"])
    kind, step_input = net_cfg.pop("kind"), net_cfg.pop("step_input")
    if "channels" in net_cfg:
        net_cfg["channels"] = tuple(net_cfg["channels"])
    x_shape = tuple(spec["x_shape"])
    net = make_network(kind, x_shape, cond_dim=0, step_input=step_input, **net_cfg)
    weights = load_file(str(path / "model.safetensors"))
    net.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("ema.")})
    sampler = make_time_sampler(spec["time_sampler"])
    if spec["class"] == "ShortcutFlow":
        flow = ShortcutFlow(net, x_shape, max_level=spec["max_level"], sc_fraction=spec["sc_fraction"],
                            time_sampler=sampler, loss=spec["loss"], huber_c=spec["huber_c"])
    else:
        flow = RectifiedFlow(net, x_shape, time_sampler=sampler, loss=spec["loss"], huber_c=spec["huber_c"])
    return flow.to(device).eval(), cfg

