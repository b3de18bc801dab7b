"""Random draws that work with any (generator, device) pair.

A ``torch.Generator`` lives on one device, and ``torch.randn(..., generator=g, device=d)`` raises when the two
differ (a CPU generator feeding CUDA tensors: "Expected a 'cuda' device type for generator but found 'cpu'").
Every seeded draw in flowpolicy and agents goes through these helpers: the numbers are drawn on the
generator's own device and then moved to ``device``. A seeded CPU generator therefore gives the same numbers
whatever device the model is on; without a generator the draw happens directly on ``device``.
"""

from __future__ import annotations

import torch

_Device = torch.device | str | None


def _draw_device(generator: torch.Generator | None, device: _Device) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device("cpu") if device is None else torch.device(device)


def randn(shape, generator: torch.Generator | None = None, device: _Device = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal samples of ``shape`` on ``device`` (drawn on the generator's device)."""
    x = torch.randn(tuple(shape), generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return x if device is None else x.to(device)


def rand(shape, generator: torch.Generator | None = None, device: _Device = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """U[0, 1) samples of ``shape`` on ``device`` (drawn on the generator's device)."""
    x = torch.rand(tuple(shape), generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return x if device is None else x.to(device)


def randint(low: int, high: int, shape, generator: torch.Generator | None = None,
            device: _Device = None) -> torch.Tensor:
    """Integers in [low, high) of ``shape`` on ``device`` (drawn on the generator's device)."""
    x = torch.randint(low, high, tuple(shape), generator=generator, device=_draw_device(generator, device))
    return x if device is None else x.to(device)


def randperm(n: int, generator: torch.Generator | None = None, device: _Device = None) -> torch.Tensor:
    """A permutation of range(n) on ``device`` (drawn on the generator's device)."""
    x = torch.randperm(n, generator=generator, device=_draw_device(generator, device))
    return x if device is None else x.to(device)
