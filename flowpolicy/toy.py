"""2-D toy targets for tests, benchmarks and the quick demo."""

from __future__ import annotations

import math

import torch


def eight_gaussians(n: int, radius: float = 2.0, std: float = 0.1, generator=None) -> torch.Tensor:
    """(n, 2) points from 8 Gaussians on a circle."""
    idx = torch.randint(0, 8, (n,), generator=generator)
    ang = idx.float() * (2 * math.pi / 8)
    centers = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
    return centers + std * torch.randn(n, 2, generator=generator)


def two_moons(n: int, noise: float = 0.05, generator=None) -> torch.Tensor:
    """(n, 2) points from two interleaved half circles, centered near the origin."""
    u = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, u.cos(), 1 - u.cos())
    y = torch.where(upper, u.sin(), 0.5 - u.sin())
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
    return pts + noise * torch.randn(n, 2, generator=generator)


TARGETS = {"8gaussians": eight_gaussians, "moons": two_moons}
