"""Fast K-step Euler sampling: what does not change between the K steps is computed once.

A K-step Euler call of an :class:`~flowpolicy.nets.MLPVelocity` policy spends a fixed share of every step on
the conditioning: the time embedding (a sinusoid and two linear layers), the condition embedding and, for
shortcut models, the step-size embedding. For a given (K, batch size) the time and step-size embeddings depend
only on the weights, so they are cached (and recomputed when the weights change); the condition embedding is
computed once per call instead of K times. The arithmetic is the same, in the same order, as
``RectifiedFlow.sample(..., solver="euler")``, so the actions are bit-identical (tested); only the repeated work
is gone. Used by :meth:`flowpolicy.policy.FlowPolicy.predict_normalized` when ``fast_sampling`` is on and no
gradient is needed.
"""

from __future__ import annotations

import torch
from torch import nn

from .solvers import time_grid

_MAX_ENTRIES = 64


def supports(net: nn.Module) -> bool:
    """True for velocity nets that split into ``embed`` and ``forward_emb`` (MLPVelocity)."""
    embed = getattr(net, "embed", None)
    return hasattr(net, "forward_emb") and embed is not None and hasattr(embed, "t_embed")


def _weights_key(*modules: nn.Module | None) -> tuple:
    """Identity and in-place version of every tensor of the modules: changes whenever a weight does."""
    key = []
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            key.append((t.data_ptr(), t._version, t.dtype))
    return tuple(key)


class FastEuler:
    """Per-policy cache of the step-invariant embeddings; ``sample`` runs the K Euler steps."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple] = {}

    def _time_terms(self, net: nn.Module, steps: int, b: int, device: torch.device):
        emb = net.embed
        key = (steps, b, str(device), _weights_key(emb.t_embed, emb.d_embed))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        grid = time_grid(steps).tolist()  # the grid RectifiedFlow.sample uses, as Python floats
        te, de = [], []
        for k in range(steps):
            # the same tensors solvers.step builds: t and d as float32 (B,) filled with the grid values
            tt = torch.full((b,), grid[k], device=device, dtype=torch.float32)
            te.append(emb.t_embed(tt))
            if emb.d_embed is not None:
                dd = torch.full((b,), grid[k + 1] - grid[k], device=device, dtype=torch.float32)
                de.append(emb.d_embed(torch.log2(1.0 / dd.clamp_min(1e-6))))
        if len(self._cache) >= _MAX_ENTRIES:
            self._cache.clear()
        hit = (grid, te, de)
        self._cache[key] = hit
        return hit

    @torch.no_grad()
    def sample(self, net: nn.Module, cond: torch.Tensor | None, steps: int, x0: torch.Tensor) -> torch.Tensor:
        """K Euler steps from x0 on the uniform grid; equals ``flow.sample(cond, steps, "euler", x0=x0)``."""
        b = x0.shape[0]
        grid, te, de = self._time_terms(net, int(steps), b, x0.device)
        emb_mod = net.embed
        ce = None
        if emb_mod.cond_embed is not None:
            if cond is None:
                raise ValueError(f"network expects a condition of dim {emb_mod.cond_dim}, got None")
            ce = emb_mod.cond_embed(cond.reshape(cond.shape[0], -1))
        x = x0
        for k in range(len(grid) - 1):
            e = te[k] if ce is None else te[k] + ce
            if de:
                e = e + de[k]
            h = grid[k + 1] - grid[k]
            x = x + h * net.forward_emb(x, e)
        return x
