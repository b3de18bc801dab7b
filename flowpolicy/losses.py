"""Per-sample regression losses between a predicted and a target velocity."""

from __future__ import annotations

import torch


def _flat_sq(d: torch.Tensor) -> torch.Tensor:
    return d.reshape(d.shape[0], -1).pow(2)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: (B, ...) -> (B,), averaged over all non-batch dims."""
    return _flat_sq(pred - target).mean(dim=1)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber per sample, sqrt(||d||^2 + c^2) - c (Lee et al. 2024; their code uses c = 0.00054 * dim).

    Returns (B,). ``c`` is explicit on purpose: its right value depends on the data dimension.
    """
    if c <= 0:
        raise ValueError(f"pseudo_huber: c must be positive, got {c}")
    sq = _flat_sq(pred - target).sum(dim=1)
    return torch.sqrt(sq + c * c) - c


def per_sample_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, huber_c: float | None = None):
    """Dispatch by name: ``mse`` or ``pseudo_huber`` (needs ``huber_c``)."""
    if kind == "mse":
        return mse(pred, target)
    if kind == "pseudo_huber":
        if huber_c is None:
            raise ValueError("pseudo_huber loss needs an explicit huber_c")
        return pseudo_huber(pred, target, huber_c)
    raise ValueError(f"unknown loss {kind!r}; choose 'mse' or 'pseudo_huber'")
