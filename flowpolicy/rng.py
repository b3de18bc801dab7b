"""Random draws that work with any (generator, device) pair.

A ``torch.Generator`` lives on one device, and ``torch.randn(..., generator=g, device=d)`` raises when the two
differ (a CPU generator feeding CUDA tensors: "Expected a 'cuda' device type for generator but found 'cpu'").
Every seeded draw in flowpolicy and agents goes through these helpers: the numbers are drawn on the
generator's own device and then moved to ``device``. A seeded CPU generator therefore gives the same numbers
whatever device the model is on; without a generator the draw happens directly on ``device``.

Data-parallel training (:func:`shard`): inside ``with shard(rank, world):`` a seeded draw of a batch-shaped
tensor (leading dimension = the local batch) draws the global tensor, ``world`` times as many rows, and keeps
this rank's rows. Every rank consumes the same generator state, so ``world`` ranks with local batches of
B / world see exactly the numbers one process with batch B sees. ``shard(..., unseeded=True)`` shards the
draws without a generator too (the global RNG, which every rank must then hold in the same state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_Device = torch.device | str | None


_SHARD: tuple[int, int, bool] = (0, 1, False)  # (rank, world, unseeded) of the active shard() context


@contextlib.contextmanager
def shard(rank: int, world: int, unseeded: bool = False) -> Iterator[None]:
    """Seeded batch-shaped draws inside the block return rank's slice of a draw ``world`` times as large;
    with ``unseeded``, draws from the global RNG (no generator) too."""
    global _SHARD
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    prev, _SHARD = _SHARD, (int(rank), int(world), bool(unseeded))
    try:
        yield
    finally:
        _SHARD = prev


def _global_shape(shape, generator) -> tuple[tuple[int, ...], slice | None]:
    shape = tuple(shape)
    rank, world, unseeded = _SHARD
    if world == 1 or (generator is None and not unseeded) or not shape:
        return shape, None
    n = shape[0]
    return (n * world, *shape[1:]), slice(rank * n, (rank + 1) * n)


def _draw_device(generator: torch.Generator | None, device: _Device) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device("cpu") if device is None else torch.device(device)


def randn(shape, generator: torch.Generator | None = None, device: _Device = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal samples of ``shape`` on ``device`` (drawn on the generator's device)."""
    full, rows = _global_shape(shape, generator)
    x = torch.randn(full, generator=generator, device=_draw_device(generator, device), dtype=dtype)
    x = x if rows is None else x[rows]
    return x if device is None else x.to(device)


def rand(shape, generator: torch.Generator | None = None, device: _Device = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """U[0, 1) samples of ``shape`` on ``device`` (drawn on the generator's device)."""
    full, rows = _global_shape(shape, generator)
    x = torch.rand(full, generator=generator, device=_draw_device(generator, device), dtype=dtype)
    x = x if rows is None else x[rows]
    return x if device is None else x.to(device)


def randint(low: int, high: int, shape, generator: torch.Generator | None = None,
            device: _Device = None) -> torch.Tensor:
    """Integers in [low, high) of ``shape`` on ``device`` (drawn on the generator's device)."""
    full, rows = _global_shape(shape, generator)
    x = torch.randint(low, high, full, generator=generator, device=_draw_device(generator, device))
    x = x if rows is None else x[rows]
    return x if device is None else x.to(device)


def randperm(n: int, generator: torch.Generator | None = None, device: _Device = None) -> torch.Tensor:
    """A permutation of range(n) on ``device`` (drawn on the generator's device)."""
    x = torch.randperm(n, generator=generator, device=_draw_device(generator, device))
    return x if device is None else x.to(device)
