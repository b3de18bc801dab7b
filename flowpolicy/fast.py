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


def euler_uncached(net: nn.Module, cond: torch.Tensor | None, steps: int, x0: torch.Tensor) -> torch.Tensor:
    """:meth:`FastEuler.sample` without its cache: the same arithmetic in the same order, every embedding
    recomputed from the weights (what a CUDA graph replays, so in-place weight updates are seen)."""
    b, emb_mod = x0.shape[0], net.embed
    grid = time_grid(int(steps)).tolist()
    ce = None
    if emb_mod.cond_embed is not None:
        ce = emb_mod.cond_embed(cond.reshape(cond.shape[0], -1))
    x = x0
    for k in range(len(grid) - 1):
        e = emb_mod.t_embed(torch.full((b,), grid[k], device=x0.device, dtype=torch.float32))
        if ce is not None:
            e = e + ce
        if emb_mod.d_embed is not None:
            dd = torch.full((b,), grid[k + 1] - grid[k], device=x0.device, dtype=torch.float32)
            e = e + emb_mod.d_embed(torch.log2(1.0 / dd.clamp_min(1e-6)))
        x = x + (grid[k + 1] - grid[k]) * net.forward_emb(x, e)
    return x


class CudaGraphChunk:
    """A flow policy's whole ``predict_action_chunk`` (normalize, K Euler steps, clamp, unnormalize) captured as
    one CUDA graph per (K, batch, observation shape).

    A call copies the observations and the initial noise into static buffers, replays the graph and returns
    the static output: the host launches three copies and one graph instead of ~10 kernels per step. The
    initial noise is drawn outside the graph exactly as the eager path draws it, so actions equal the eager
    ones (tested on a GPU). The graph reads the weights where they live, so in-place updates (an optimizer
    step, ``load_state_dict``) are seen; a weight that moved (``.to()``) or a normalizer that changed
    re-captures. Any capture failure turns the path off for that policy with one warning (eager stays)."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, tuple] = {}
        self.failed: str | None = None

    def __deepcopy__(self, memo) -> CudaGraphChunk:
        return CudaGraphChunk()  # a copy of a policy captures its own graphs (they point at its own weights)

    def __getstate__(self) -> dict:
        return {"_graphs": {}, "failed": None}

    @staticmethod
    def _key(policy, steps: int, obs_shape: tuple) -> tuple:
        ptrs = tuple(t.data_ptr() for t in list(policy.flow.net.parameters()) + list(policy.flow.net.buffers()))
        norms = tuple((t.data_ptr(), t._version) for t in (policy.obs_norm.low, policy.obs_norm.high,
                                                             policy.act_norm.low, policy.act_norm.high,
                                                             policy.act_limit_low, policy.act_limit_high))
        return (int(steps), tuple(obs_shape), ptrs, norms)

    def _capture(self, policy, steps: int, obs: torch.Tensor, x0: torch.Tensor):
        net = policy.flow.net

        def fn(o, z):
            cond = policy.obs_norm.normalize(o).reshape(o.shape[0], -1)
            return policy.act_norm.unnormalize(policy.clamp_normalized(euler_uncached(net, cond, steps, z)))

        dev = x0.device  # the observations may arrive on the host: the buffer lives on the GPU
        o_buf, z_buf = obs.to(dev, torch.float32, copy=True), x0.clone()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph requires
            for _ in range(3):
                fn(o_buf, z_buf)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(o_buf, z_buf)
        return graph, o_buf, z_buf, out

    @torch.no_grad()
    def run(self, policy, obs: torch.Tensor, steps: int, x0: torch.Tensor) -> torch.Tensor | None:
        """Actions (B, Ta, Da) on the policy's GPU, or None when the graph path is off (the caller goes eager)."""
        if self.failed is not None:
            return None
        key = self._key(policy, steps, obs.shape)
        hit = self._graphs.get(key)
        if hit is None:
            try:
                hit = self._capture(policy, steps, obs, x0)
            except Exception as e:  # a net or driver the capture cannot handle: eager from now on
                import warnings

                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph sampling is off for this policy ({self.failed}); sampling eagerly",
                              stacklevel=3)
                return None
            if len(self._graphs) >= _MAX_ENTRIES:
                self._graphs.clear()
            self._graphs[key] = hit
        graph, o_buf, z_buf, out = hit
        o_buf.copy_(obs, non_blocking=True)
        z_buf.copy_(x0)
        graph.replay()
        return out.clone()  # the static output is overwritten by the next replay
