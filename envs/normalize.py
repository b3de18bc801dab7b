"""Min/max normalization of observations and actions to [-1, 1], numpy only.

``stats`` is a dict with at least ``"min"`` and ``"max"`` arrays of shape (D,) (as returned by
:meth:`envs.dataset.DemoDataset.stats` for ``"obs"`` or ``"action"``). Dimensions whose range is below
``eps`` (constant in the data) map to 0 and back to their constant value, instead of dividing by ~0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

DEFAULT_EPS = 1e-6


def _scale_offset(stats: Mapping[str, np.ndarray], eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    low = np.asarray(stats["min"], dtype=np.float64)
    high = np.asarray(stats["max"], dtype=np.float64)
    if low.shape != high.shape:
        raise ValueError(f"stats min and max shapes differ: {low.shape} vs {high.shape}")
    constant = (high - low) < eps
    half_range = np.where(constant, 1.0, (high - low) / 2.0)
    center = np.where(constant, low, (high + low) / 2.0)
    return half_range, center, constant


def normalize(x: np.ndarray, stats: Mapping[str, np.ndarray], eps: float = DEFAULT_EPS) -> np.ndarray:
    """Map ``x`` of shape (..., D) from [min, max] to [-1, 1] per dimension (float32)."""
    half_range, center, constant = _scale_offset(stats, eps)
    y = (np.asarray(x, dtype=np.float64) - center) / half_range
    return np.where(constant, 0.0, y).astype(np.float32)


def unnormalize(y: np.ndarray, stats: Mapping[str, np.ndarray], eps: float = DEFAULT_EPS) -> np.ndarray:
    """Inverse of :func:`normalize`: map ``y`` of shape (..., D) from [-1, 1] back to [min, max] (float32)."""
    half_range, center, constant = _scale_offset(stats, eps)
    x = np.asarray(y, dtype=np.float64) * half_range + center
    return np.where(constant, center, x).astype(np.float32)
