"""Reflow, distillation and straightness (Liu et al. 2023), for any RectifiedFlow.

- ``make_couplings``: draw x0, solve the trained ODE to x1_hat; the fixed pairs train the next rectification
  (``RectifiedFlow.loss(x1_hat, cond, x0=x0)``).
- ``distillation_loss``: K-step distillation on the pairs with t restricted to {0, 1/K, ..., (K-1)/K}.
- ``straightness``: S = int_0^1 E||(x1 - x0) - v(x_t, t)||^2 dt along the flow's own trajectories.
"""

from __future__ import annotations

import torch

from .flow import RectifiedFlow, linear_path, net_device
from .losses import per_sample_loss
from .solvers import time_grid


@torch.no_grad()
def make_couplings(
    flow: RectifiedFlow,
    num: int,
    cond: torch.Tensor | None = None,
    steps: int = 100,
    solver: str = "euler",
    batch_size: int = 4096,
    generator: torch.Generator | None = None,
):
    """Return (x0, x1_hat) pairs of ``num`` samples; ``cond`` (num, Dc) pairs each sample with a condition."""
    if cond is not None and cond.shape[0] != num:
        raise ValueError(f"make_couplings: cond has {cond.shape[0]} rows for num={num}")
    x0s, x1s = [], []
    for i in range(0, num, batch_size):
        n = min(batch_size, num - i)
        c = None if cond is None else cond[i : i + n]
        device = c.device if c is not None else net_device(flow.net)
        x0 = flow.noise(n, "cpu" if generator is not None else device, generator).to(device)
        x0s.append(x0)
        x1s.append(flow.sample(c, steps=steps, solver=solver, x0=x0))
    return torch.cat(x0s), torch.cat(x1s)


def distillation_loss(flow: RectifiedFlow, x0, x1, cond=None, steps: int = 1, generator=None):
    """K-step distillation on fixed pairs: t on the K-step grid, target the straight pair velocity x1 - x0.

    With steps = 1 this is the paper's 1-step distillation with an L2 loss (the paper used LPIPS on images).
    """
    b = x1.shape[0]
    k = torch.randint(0, steps, (b,), generator=generator).to(x1.device)
    t = k.float() / steps
    path = linear_path(x0, x1, t)
    pred = flow.velocity(path.x_t, t, cond, torch.full_like(t, 1.0 / steps))
    per = per_sample_loss(flow.loss_kind, pred, path.dx_t, flow.huber_c)
    loss = per.mean()
    return loss, {"loss/distill": float(loss.detach())}


@torch.no_grad()
def straightness(flow: RectifiedFlow, num: int = 1024, cond=None, steps: int = 64, generator=None) -> float:
    """Estimate S along Euler trajectories with ``steps`` steps: mean over grid points of
    E||(x1 - x0) - v(x_t, t)||^2 / dim. Zero for a perfectly straight flow."""
    device = cond.device if cond is not None else net_device(flow.net)
    x0 = flow.noise(num, "cpu" if generator is not None else device, generator).to(device)
    grid = time_grid(steps)
    traj = flow.sample(cond, steps=steps, x0=x0, grid=grid, return_trajectory=True)
    x1 = traj[-1]
    total = 0.0
    for i in range(steps):
        t = torch.full((num,), float(grid[i]), device=device)
        v = flow.velocity(traj[i], t, cond, torch.full_like(t, 1.0 / steps))
        total += float(((x1 - x0) - v).reshape(num, -1).pow(2).mean(1).mean())
    return total / steps
