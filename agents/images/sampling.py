"""Sampling from trained image generators: the fixed evaluation noise, :func:`evaluate` (FD, sampling time,
straightness), sample grids, and generator checkpoints (:func:`save_checkpoint`, :func:`load_generator`).
:mod:`agents.images.trainer` re-exports all of it.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from flowpolicy import RectifiedFlow, ShortcutFlow, make_network, make_time_sampler, straightness

from ..checkpoint_load import load_checkpoint, resolve
from ..checkpoint_save import FORMAT_VERSION
from ..checkpoint_save import save_checkpoint as write_checkpoint
from ..runfiles import CheckpointError
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
            raise ValueError(f"shortcut models sample with powers of two steps; {bad} are not (stage.eval.denoise_steps)")
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


def save_checkpoint(model: TrainedModel, path: str | Path, extra: dict | None = None,
                    training_state: dict | None = None) -> Path:
    """Save ``model`` under ``path`` with the policies' atomic writer (:func:`agents.checkpoint.save_checkpoint`):
    a verified ``path/step_<N>`` directory (N: the model's EMA updates) that ``path/last`` points at, with
    ``model.safetensors`` (the training weights), ``extra/ema.safetensors`` (the sampling weights) and a
    ``config.yaml`` of kind ``image_generator``. Saving again replaces it. Returns ``path``.
    """
    cfg = {"kind": "image_generator", "model": model.name, "flow": model.spec, "train_s": model.train_s,
           "ema_updates": model.ema.num_updates, **(extra or {})}
    write_checkpoint(path, model.ema.num_updates, cfg, model.flow.net, training_state=training_state,
                     extra_modules={"ema": model.ema.model}, keep_last=1)
    return Path(path)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[RectifiedFlow, DictConfig]:
    """Rebuild a saved generator with its EMA (sampling) weights as ``flow.net``; returns (flow, config).

    ``path``: what :func:`save_checkpoint` returned, one of its ``step_*`` directories, or a generator saved
    before image generators used the policies' format (``config.yaml`` + ``model.safetensors`` with ``ema.*``
    and ``net.*`` weights, format 1). Sample with ``flow.sample(steps=K, batch=N)`` (images (N, C, H, W) in
    [-1, 1]).
    """
    try:
        resolve(path)
    except CheckpointError as err:
        raise FileNotFoundError(f"{str(path)!r} is not an image generator checkpoint ({err})") from None
    ck = load_checkpoint(path)
    cfg = OmegaConf.create(ck["config"])
    if cfg.get("kind") != "image_generator" or cfg.get("format_version") not in (CHECKPOINT_FORMAT, FORMAT_VERSION):
        raise ValueError(f"{str(path)!r}: unsupported checkpoint (kind={cfg.get('kind')}, "
                         f"format_version={cfg.get('format_version')})")
    if "ema" in ck["extras"]:
        weights = ck["extras"]["ema"]
    else:  # format 1: one file, ema.* and net.*
        weights = {k[4:]: v for k, v in ck["model"].items() if k.startswith("ema.")}
    spec = OmegaConf.to_container(cfg.flow, resolve=True)
    net_cfg = dict(spec["net"])
    kind, step_input = net_cfg.pop("kind"), net_cfg.pop("step_input")
    if "channels" in net_cfg:
        net_cfg["channels"] = tuple(net_cfg["channels"])
    x_shape = tuple(spec["x_shape"])
    net = make_network(kind, x_shape, cond_dim=0, step_input=step_input, **net_cfg)
    net.load_state_dict(weights)
    sampler = make_time_sampler(spec["time_sampler"])
    if spec["class"] == "ShortcutFlow":
        flow = ShortcutFlow(net, x_shape, max_level=spec["max_level"], sc_fraction=spec["sc_fraction"],
                            time_sampler=sampler, loss=spec["loss"], huber_c=spec["huber_c"])
    else:
        flow = RectifiedFlow(net, x_shape, time_sampler=sampler, loss=spec["loss"], huber_c=spec["huber_c"])
    return flow.to(device).eval(), cfg

