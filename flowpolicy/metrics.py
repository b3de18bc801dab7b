"""Sample distances between point clouds (B, D): RBF-kernel MMD and sliced Wasserstein-2."""

from __future__ import annotations

import torch


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Biased MMD^2 estimate with a sum of RBF kernels exp(-||a - b||^2 / (2 h^2)); 0 for equal samples."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    k = sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    n = x.shape[0]
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced W2 distance over random unit directions (fixed seed, so deterministic). Needs len(x) == len(y)."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    return float((px - py).pow(2).mean().sqrt())
