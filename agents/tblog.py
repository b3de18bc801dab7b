"""Scalar logging to TensorBoard (default) with stable metric names; a no-op when disabled."""

from __future__ import annotations

from pathlib import Path


class Logger:
    """``log({"train/loss": 0.1}, step)``. W&B, when asked for, mirrors TensorBoard (``wandb.init(sync_tensorboard)``)."""

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
