"""Training-time distributions over t in [0, 1] (our convention: t = 0 noise, t = 1 data).

Sources that put noise at t = 1 (SD3, rfpp) are converted at the formula: t_ours = 1 - t_theirs.
Every sampler maps ``(n, generator, device) -> (n,)`` float32 tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import rng


def _uniform(n: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    return rng.rand((n,), generator, device)


@dataclass
class UniformTime:
    """t ~ U[eps, 1] (rectified flow, Liu et al. 2023). ``eps`` keeps t away from pure noise."""

    eps: float = 0.0

    def __call__(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        return self.eps + (1.0 - self.eps) * _uniform(n, generator, device)


@dataclass
class LogitNormalTime:
    """SD3 logit-normal (Esser et al. 2024): u ~ N(m, s^2), t_noise = sigmoid(u).

    Converted: t = 1 - sigmoid(u) = sigmoid(-u). With m = 0 the density is symmetric about 1/2.
    """

    m: float = 0.0
    s: float = 1.0

    def __call__(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        u = self.m + self.s * rng.randn((n,), generator, device)
        return torch.sigmoid(-u)


@dataclass
class ModeHeavyTailTime:
    """SD3 mode sampling with heavy tails: t_noise = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U[0, 1].

    Converted: t = 1 - t_noise. ``s`` must lie in [-1, 2/(pi - 2)] for the map to stay monotone.
    """

    s: float = 1.29

    def __post_init__(self) -> None:
        if not -1.0 <= self.s <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"ModeHeavyTailTime: s={self.s} outside [-1, {2 / (math.pi - 2):.3f}]")

    def __call__(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        u = _uniform(n, generator, device)
        t_noise = 1.0 - u - self.s * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)
        return (1.0 - t_noise).clamp(0.0, 1.0)


@dataclass
class UShapedTime:
    """Improved RF (Lee et al. 2024): density proportional to exp(a t) + exp(a (1 - t)) on [0, 1].

    Symmetric, so identical in either convention. Sampled exactly by inverse CDF of one of the two
    exponential halves (chosen with probability 1/2 each, since both integrate to the same mass).
    """

    a: float = 4.0

    def __call__(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        if self.a == 0:
            return _uniform(n, generator, device)
        u = _uniform(n, generator, device)
        # inverse CDF of density a e^{a t} / (e^a - 1) on [0, 1]
        t = torch.log1p(u * math.expm1(self.a)) / self.a
        flip = _uniform(n, generator, device) < 0.5
        return torch.where(flip, 1.0 - t, t)

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """Normalized density at t (for tests and plots)."""
        z = 2.0 * math.expm1(self.a) / self.a
        return (torch.exp(self.a * t) + torch.exp(self.a * (1.0 - t))) / z


def shift_time(t: torch.Tensor, a: float) -> torch.Tensor:
    """SD3 resolution shift t_noise' = a t_noise / (1 + (a - 1) t_noise), converted to t = 1 - t_noise.

    ``a > 1`` moves mass (and sampling steps) towards noise, i.e. towards t = 0 in our convention.
    """
    if a <= 0:
        raise ValueError(f"shift_time: a must be positive, got {a}")
    t_noise = 1.0 - t
    return 1.0 - a * t_noise / (1.0 + (a - 1.0) * t_noise)


TIME_SAMPLERS = {
    "uniform": UniformTime,
    "logit_normal": LogitNormalTime,
    "mode": ModeHeavyTailTime,
    "u_shaped": UShapedTime,
}


def make_time_sampler(name: str, **kwargs):
    """Build a time sampler by name: uniform, logit_normal, mode, u_shaped."""
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; choose from {sorted(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name](**kwargs)
