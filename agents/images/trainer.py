"""Train image generators with the flowpolicy core: 1-RF, reflow (2-RF) + distillation, shortcut models.

The flow math lives in ``flowpolicy`` only: ``RectifiedFlow.loss``/``sample``, ``make_couplings``,
``distillation_loss``, ``straightness``, ``ShortcutFlow``. This module only feeds batches, runs Adam, keeps an
EMA of the weights (used for every sample), logs, evaluates and writes checkpoints: building and fitting in
:mod:`agents.images.fitting`, evaluation, sample grids and checkpoints in :mod:`agents.images.sampling`, the
stage (:func:`run`) here; this module re-exports the names of both.

Methods (``stage.method``):

- ``rf``: 1-rectified flow on the data.
- ``reflow``: 1-RF; couplings (x0, ODE(x0)) from its EMA network; 2-RF initialized from 1-RF and trained on
  the fixed pairs; then couplings from the 2-RF and K-step distillations of it (``2rf_distill_k<K>``).
- ``shortcut``: a shortcut model (network also takes the step size), sampled with powers-of-two steps.

A run directory receives ``checkpoints/<model>/`` (the policies' atomic checkpoint format, kind
``image_generator``: ``last`` -> ``step_<N>/``; see :func:`save_checkpoint`), ``samples/<model>.png``
(one row per number of sampling steps, same noise for every model and row), TensorBoard scalars under ``tb/``
and ``eval.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from .. import distributed
from ..checkpoint import StopOnInterrupt, TrainingInterrupted, atomic_write_json, seed_everything
from .classifier import FrechetScorer, load_or_train_classifier
from .data import load_dataset
from .fitting import (  # noqa: F401 - agents.images.trainer API
    CHECKPOINT_FORMAT,
    METHODS,
    TrainedModel,
    _Logger,
    _Stopped,
    build_flow,
    distill_ks,
    fit,
    train_base,
    train_distilled,
    train_reflow,
)
from .sampling import (  # noqa: F401 - agents.images.trainer API
    check_steps,
    eval_noise,
    evaluate,
    image_grid,
    load_generator,
    save_checkpoint,
)

# --- the entry point ----------------------------------------------------------------------------------------


def _run_dir(cfg: DictConfig, run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except ImportError:
        pass
    return Path(cfg.get("run_dir") or os.getcwd())


def _abs_path(p: str) -> Path:
    """Relative paths resolve against the launch directory, also under Hydra with ``job.chdir=True``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import to_absolute_path

        if HydraConfig.initialized():
            return Path(to_absolute_path(p))
    except ImportError:
        pass
    return Path(p)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Train and evaluate image generators as ``cfg.stage`` says, on ``cfg.task``'s dataset.

    ``cfg`` needs ``task`` (dataset, path, image_size, channels), ``stage`` (see configs/stage/image.yaml),
    and optionally ``seed`` and ``device``. ``run_dir``: explicit output folder; else Hydra's run dir, else
    ``cfg.run_dir``, else the working directory. Returns (and writes to ``eval.json``) a summary:
    ``{"method", "run_dir", "dataset", "classifier", "models": {name: {"fd": {K: FD}, "sample_s": {K: s},
    "straightness", "train_s", "checkpoint", "samples"}}}``.
    """
    task, stage = cfg.task, cfg.stage
    method = str(stage.method)
    if method not in METHODS:
        raise ValueError(f"unknown stage.method {method!r}; choose from {METHODS}")
    steps_list = check_steps(method, stage.eval.steps)
    if method == "reflow":
        distill_ks(stage)
    out = _run_dir(cfg, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    # torchrun: every rank trains (data-parallel, agents.images.fitting.fit); rank 0 alone evaluates and writes
    main = distributed.info().is_main
    seed = int(cfg.get("seed", 0))
    device = torch.device(str(cfg.get("device", "cpu")))
    progress = bool(stage.get("progress") if stage.get("progress") is not None else cfg.get("progress", True))
    seed_everything(seed)

    data = load_dataset(str(task.dataset), task.get("path"), task.get("image_size"), int(task.get("channels", 3)))
    summary: dict = {"method": method, "run_dir": str(out), "seed": seed, "device": str(device),
                     "dataset": {"name": data.name, "num_images": len(data), "image_shape": list(data.image_shape),
                                 "num_classes": data.num_classes},
                     "models": {}}
    scorer = None
    if stage.eval.get("fd", True) and main:
        ccfg = stage.classifier
        cache = ccfg.get("cache_dir")
        clf, cinfo = load_or_train_classifier(data, cache_dir=_abs_path(cache) if cache else None,
                                              steps=int(ccfg.steps), seed=int(ccfg.get("seed", 0)))
        scorer = FrechetScorer(clf, data.images)
        summary["classifier"] = cinfo
    x0_eval = eval_noise(int(stage.eval.samples), data.image_shape, seed + 12345)
    logger = _Logger(out / "tb") if main else None
    data_meta = {"data": {"dataset": str(task.dataset), "name": data.name, "range": [-1.0, 1.0],
                          "num_classes": data.num_classes, "class_names": data.class_names}}

    def finish(model: TrainedModel) -> None:
        if not main:
            return
        metrics, samples = evaluate(model, x0_eval, steps_list, scorer,
                                    int(stage.eval.get("straightness_samples", 0)),
                                    int(stage.eval.get("straightness_steps", 32)), seed)
        for k, v in metrics["fd"].items():
            logger.scalar(f"eval/{model.name}/fd_steps_{k}", v)
        if "straightness" in metrics:
            logger.scalar(f"eval/{model.name}/straightness", metrics["straightness"])
        cols = int(stage.get("grid_cols", 16))
        png = out / "samples" / f"{model.name}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        image_grid([samples[k][:cols] for k in steps_list]).save(png)
        entry = {**metrics, "train_s": model.train_s, "samples": str(png), **model.info}
        if stage.get("checkpoint", True):
            entry["checkpoint"] = str(save_checkpoint(model, out / "checkpoints" / model.name,
                                                      {**data_meta, "method": method, "seed": seed}))
        summary["models"][model.name] = entry

    stop = StopOnInterrupt("image training").__enter__()
    try:
        if method == "shortcut":
            finish(train_base("shortcut", "shortcut", data, stage, device, logger, progress))
        else:
            rf1 = train_base("1rf", "rf", data, stage, device, logger, progress)
            finish(rf1)
            if method == "reflow":
                rf2 = train_reflow(rf1, stage, seed, logger, progress)
                finish(rf2)
                if int(stage.distill.get("steps", 0)) > 0:
                    for student in train_distilled(rf2, stage, seed, logger, progress):
                        finish(student)
    except _Stopped as s:  # Ctrl-C: save the model being trained, once, with the step it reached
        if not main:
            raise TrainingInterrupted(f"stopped at step {s.step}; rank 0 saves") from None
        path = save_checkpoint(s.model, out / "checkpoints" / s.model.name,
                               {**data_meta, "method": method, "seed": seed, "stopped_at_step": s.step})
        summary["stopped"] = {"model": s.model.name, "step": s.step, "checkpoint": str(path)}
        atomic_write_json(out / "eval.json", summary)
        raise TrainingInterrupted(f"stopped at step {s.step}; saved {path}") from None
    finally:
        stop.__exit__()
        if logger is not None:
            logger.close()
    if main:
        atomic_write_json(out / "eval.json", summary)
    return summary

