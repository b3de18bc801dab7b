"""Rectified flow (Liu et al. 2023) and shortcut models (Frans et al. 2025) on top of any velocity network.

Convention: x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I) at t = 0 and data x1 at t = 1; target v* = x1 - x0.
The same objects train action policies (x = action chunk, cond = observation features) and image
generators (x = image, cond = class or None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import rng
from .ema import EMA
from .losses import per_sample_loss
from .solvers import integrate, time_grid
from .time_samplers import UniformTime


@dataclass
class PathSample:
    """A point on the straight path between a noise sample x0 and a data sample x1."""

    x0: torch.Tensor
    x1: torch.Tensor
    t: torch.Tensor  # (B,)
    x_t: torch.Tensor
    dx_t: torch.Tensor  # the target velocity x1 - x0


def net_device(net: nn.Module) -> torch.device:
    """The device of a network's first parameter (CPU for a network without parameters)."""
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def linear_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
    """x_t = (1 - t) x0 + t x1, target x1 - x0."""
    tb = _bcast(t, x1)
    return PathSample(x0=x0, x1=x1, t=t, x_t=(1 - tb) * x0 + tb * x1, dx_t=x1 - x0)


class RectifiedFlow(nn.Module):
    """A velocity network trained by flow matching, sampled by an ODE solver on an explicit grid.

    Args:
        net: any module with ``forward(x, t, cond=None, d=None)``.
        x_shape: shape of one sample (without batch).
        time_sampler: callable ``(n, generator, device) -> t`` for training (default U[0, 1]).
        loss: ``mse`` or ``pseudo_huber`` (with an explicit ``huber_c``).
    """

    def __init__(self, net: nn.Module, x_shape, time_sampler=None, loss: str = "mse", huber_c=None) -> None:
        super().__init__()
        self.net = net
        self.x_shape = tuple(x_shape)
        self.time_sampler = time_sampler or UniformTime()
        self.loss_kind = loss
        self.huber_c = huber_c
        per_sample_loss(loss, torch.zeros(1, 1), torch.zeros(1, 1), huber_c)  # validate early

    # --- the velocity field -------------------------------------------------------------------------
    def velocity(self, x, t, cond=None, d=None, net: nn.Module | None = None) -> torch.Tensor:
        """v(x, t | cond). ``d`` is ignored unless the network takes a step size."""
        net = net or self.net
        if getattr(net, "step_input", False):
            return net(x, t, cond, d)
        return net(x, t, cond)

    # --- training -----------------------------------------------------------------------------------
    def loss(self, x1: torch.Tensor, cond=None, x0=None, t=None, weights=None, generator=None):
        """Flow-matching loss. ``x0`` given (e.g. reflow couplings) replaces fresh noise.

        Returns (loss scalar, info dict). ``weights`` (B,) reweights samples (e.g. Flow-RWR).
        """
        b = x1.shape[0]
        if x0 is None:
            x0 = rng.randn(x1.shape, generator, x1.device, x1.dtype)
        if t is None:
            t = self.time_sampler(b, generator=generator, device=x1.device)
        path = linear_path(x0, x1, t)
        pred = self.velocity(path.x_t, t, cond, torch.zeros_like(t))
        per = per_sample_loss(self.loss_kind, pred, path.dx_t, self.huber_c)
        loss = per.mean() if weights is None else (weights * per).sum() / weights.sum().clamp_min(1e-8)
        return loss, {"loss/flow": float(loss.detach())}

    # --- sampling -----------------------------------------------------------------------------------
    def noise(self, batch: int, device="cpu", generator=None) -> torch.Tensor:
        return rng.randn((batch, *self.x_shape), generator, device)

    def sample(
        self,
        cond=None,
        steps: int = 1,
        solver: str = "euler",
        x0=None,
        batch: int | None = None,
        grid=None,
        return_trajectory: bool = False,
        generator=None,
        net: nn.Module | None = None,
    ):
        """Integrate from noise x0 (drawn if None) to data with exactly ``steps`` solver steps.

        ``grid`` (steps + 1 increasing times) overrides the uniform grid. Batch size comes from x0, cond or
        ``batch``, in that order.
        """
        if x0 is None:
            if batch is None:
                if cond is None:
                    raise ValueError("sample: give x0, cond or batch to fix the batch size")
                batch = cond.shape[0]
            device = cond.device if cond is not None else net_device(self.net)
            x0 = self.noise(batch, device, generator)
        if grid is None:
            grid = time_grid(steps, device="cpu")
        elif len(grid) != steps + 1:
            raise ValueError(f"grid has {len(grid)} points but steps={steps} needs {steps + 1}")

        def v(x, t, d):
            return self.velocity(x, t, cond, d, net=net)

        return integrate(v, x0, grid, solver, return_trajectory)


class ShortcutFlow(RectifiedFlow):
    """Shortcut model (Frans et al. 2025): the network also takes the step size d = 1 / 2^k, k = 0..M.

    Most of each batch trains plain flow matching at the finest level d = 1 / 2^M; a fraction
    ``sc_fraction`` trains self-consistency: s(x_t, t, 2d) -> sg[(s(x_t, t, d) + s(x'_{t+d}, t+d, d)) / 2],
    x'_{t+d} = x_t + d s(x_t, t, d), with the target from the EMA network and t on the grid of step 2d.
    """

    def __init__(
        self,
        net: nn.Module,
        x_shape,
        max_level: int = 7,
        sc_fraction: float = 0.25,
        ema_decay: float = 0.999,
        time_sampler=None,
        loss: str = "mse",
        huber_c=None,
    ) -> None:
        super().__init__(net, x_shape, time_sampler, loss, huber_c)
        if not getattr(net, "step_input", False):
            raise ValueError("ShortcutFlow needs a network built with step_input=True")
        if not 0.0 <= sc_fraction < 1.0:
            raise ValueError(f"sc_fraction must be in [0, 1), got {sc_fraction}")
        if max_level < 1:
            raise ValueError(f"max_level must be >= 1, got {max_level}")
        self.max_level = max_level
        self.sc_fraction = sc_fraction
        self.ema = EMA(net, decay=ema_decay)

    @property
    def finest_step(self) -> float:
        return 1.0 / 2**self.max_level

    def update_ema(self) -> None:
        self.ema.update(self.net)

    def _apply(self, fn, recurse=True):
        """``.to(device/dtype)``, ``.cuda()``, ``.double()`` ... move the EMA copy too (it is not a submodule,
        so that the flow's state_dict stays the online network's; checkpoints save the EMA separately)."""
        super()._apply(fn, recurse)
        self.ema.model._apply(fn, recurse)
        return self

    def loss(self, x1, cond=None, x0=None, t=None, weights=None, generator=None):
        b = x1.shape[0]
        dev = x1.device
        if x0 is None:
            x0 = rng.randn(x1.shape, generator, dev, x1.dtype)
        n_sc = int(round(self.sc_fraction * b)) if b > 1 else 0
        n_fm = b - n_sc
        # flow-matching part, finest level
        t_fm = self.time_sampler(n_fm, generator=generator, device=dev) if t is None else t[:n_fm]
        path = linear_path(x0[:n_fm], x1[:n_fm], t_fm)
        d_fm = torch.full((n_fm,), self.finest_step, device=dev)
        c_fm = None if cond is None else cond[:n_fm]
        pred = self.velocity(path.x_t, t_fm, c_fm, d_fm)
        per_fm = per_sample_loss(self.loss_kind, pred, path.dx_t, self.huber_c)
        info = {"loss/flow": float(per_fm.mean().detach())}
        if n_sc == 0:
            loss = per_fm.mean() if weights is None else (weights * per_fm).sum() / weights.sum()
            return loss, info
        # self-consistency part: big step 2d = 1 / 2^k for k in 0..M-1, small step d = 1 / 2^(k+1)
        k = rng.randint(0, self.max_level, (n_sc,), generator, dev)
        d_big = 1.0 / (2.0**k)
        d_small = d_big / 2
        n_cells = (1.0 / d_big).long()
        j = (rng.rand((n_sc,), generator, dev) * n_cells).floor().clamp(max=n_cells - 1)
        t_sc = j * d_big
        path_sc = linear_path(x0[n_fm:], x1[n_fm:], t_sc)
        c_sc = None if cond is None else cond[n_fm:]
        with torch.no_grad():
            ema_net = self.ema.model
            s1 = self.velocity(path_sc.x_t, t_sc, c_sc, d_small, net=ema_net)
            x_next = path_sc.x_t + _bcast(d_small, s1) * s1
            s2 = self.velocity(x_next, t_sc + d_small, c_sc, d_small, net=ema_net)
            target = 0.5 * (s1 + s2)
        pred_sc = self.velocity(path_sc.x_t, t_sc, c_sc, d_big)
        per_sc = per_sample_loss(self.loss_kind, pred_sc, target, self.huber_c)
        per = torch.cat([per_fm, per_sc])
        loss = per.mean() if weights is None else (weights * per).sum() / weights.sum()
        info["loss/self_consistency"] = float(per_sc.mean().detach())
        return loss, info

    def sample(self, cond=None, steps: int = 1, solver: str = "euler", x0=None, batch=None, grid=None,
               return_trajectory=False, generator=None, net=None):
        """Shortcut sampling: ``steps`` must be a power of two; d = 1/steps (clamped to the finest level)."""
        if steps < 1 or (steps & (steps - 1)) != 0:
            raise ValueError(f"shortcut models sample with a power-of-two number of steps, got {steps}")
        if grid is not None:
            raise ValueError("shortcut models use the uniform grid that matches their step size")
        if solver != "euler":
            raise ValueError("shortcut models are trained for Euler jumps; use solver='euler'")
        return super().sample(cond, steps, "euler", x0, batch, None, return_trajectory, generator, net)

    def velocity(self, x, t, cond=None, d=None, net=None):
        if d is not None:
            d = d.clamp_min(self.finest_step)
        return super().velocity(x, t, cond, d, net)

