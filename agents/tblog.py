"""Scalar logging to TensorBoard (default) with stable metric names; a no-op when disabled.

``logger=wandb`` writes the same TensorBoard files and mirrors them to Weights & Biases: :func:`start_wandb`
opens one W&B run per ``train.py`` run with ``wandb.init(project=, mode=, sync_tensorboard=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class Logger:
    """``log({"train/loss": 0.1}, step)``. W&B, when asked for, mirrors TensorBoard (:func:`start_wandb`)."""

    def __init__(self, log_dir: str | Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_wanted(cfg) -> bool:
    """Whether a stage writes TensorBoard files: not for ``logger=none``; for ``logger=tensorboard`` or ``wandb``
    (which mirrors them), and for a config without a logger (the Python API)."""
    logger = cfg.get("logger")
    return logger is None or logger.get("name") != "none"


def import_wandb():
    """The ``wandb`` module, or an ImportError that says how to get it."""
    try:
        import wandb
    except ImportError as err:
        raise ImportError("logger=wandb needs the wandb package (pip install wandb); or use logger=tensorboard") \
            from err
    return wandb


def start_wandb(logger_cfg, run_dir: str | Path, config: dict[str, Any] | None = None):
    """For ``logger=wandb``: a W&B run in ``run_dir`` that mirrors the TensorBoard scalars the stages write
    (``sync_tensorboard``), in the config's ``project`` and ``mode`` (``WANDB_MODE``, when set, wins over
    ``mode``: the config's default is offline, which needs no network). ``config`` is recorded with the run.
    Returns the run (call ``.finish()``), or None for any other logger."""
    if logger_cfg is None or logger_cfg.get("name") != "wandb":
        return None
    wandb = import_wandb()
    mode = os.environ.get("WANDB_MODE") or logger_cfg.get("mode") or "offline"
    return wandb.init(project=logger_cfg.get("project") or "flowpolicy", mode=str(mode), dir=str(run_dir),
                      config=config, sync_tensorboard=True)
