"""ODE solvers over explicit time grids (t = 0 noise -> t = 1 data).

The number of steps is always explicit: a grid of K steps has K + 1 points. A velocity function has the
signature ``velocity(x, t, d) -> v`` with t a (B,) tensor and d the (B,) step size (used by shortcut models).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SOLVERS = ("euler", "midpoint", "heun")


def time_grid(steps: int, kind: str = "uniform", shift: float = 1.0, device="cpu") -> torch.Tensor:
    """A grid of ``steps + 1`` increasing times from 0 to 1.

    kind: ``uniform``, or ``shifted`` (SD3 shift with factor ``shift``; > 1 puts more steps near noise).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    grid = torch.linspace(0.0, 1.0, steps + 1, device=device)
    if kind == "uniform":
        return grid
    if kind == "shifted":
        from .time_samplers import shift_time

        return shift_time(grid, shift)
    raise ValueError(f"unknown time grid {kind!r}; choose 'uniform' or 'shifted'")


def check_grid(grid: torch.Tensor) -> torch.Tensor:
    """Validate a custom grid: 1-D, at least 2 points, strictly increasing, inside [0, 1]."""
    grid = torch.as_tensor(grid, dtype=torch.float32)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"time grid must be 1-D with >= 2 points, got shape {tuple(grid.shape)}")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"time grid must be strictly increasing, got {grid.tolist()}")
    if grid[0] < 0 or grid[-1] > 1:
        raise ValueError(f"time grid must lie in [0, 1], got {grid.tolist()}")
    return grid


def step(velocity: VelocityFn, x: torch.Tensor, t0: float, t1: float, method: str = "euler") -> torch.Tensor:
    """One solver step from time t0 to t1."""
    b = x.shape[0]
    h = t1 - t0
    tt = torch.full((b,), t0, device=x.device, dtype=torch.float32)
    dd = torch.full((b,), h, device=x.device, dtype=torch.float32)
    v0 = velocity(x, tt, dd)
    if method == "euler":
        return x + h * v0
    if method == "midpoint":
        # RF-Solver's second-order update x + h v + (h^2/2) dv/dt equals this explicit midpoint rule
        x_mid = x + 0.5 * h * v0
        return x + h * velocity(x_mid, tt + 0.5 * h, dd)
    if method == "heun":
        x_pred = x + h * v0
        v1 = velocity(x_pred, tt + h, dd)
        return x + 0.5 * h * (v0 + v1)
    raise ValueError(f"unknown solver {method!r}; choose from {SOLVERS}")


def integrate(
    velocity: VelocityFn,
    x0: torch.Tensor,
    grid: torch.Tensor,
    method: str = "euler",
    return_trajectory: bool = False,
):
    """Integrate dx/dt = velocity from grid[0] to grid[-1].

    Returns x at the last grid point, or the trajectory (len(grid), *x0.shape) if ``return_trajectory``.
    """
    grid = check_grid(grid)
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose from {SOLVERS}")
    ts = grid.tolist()
    x = x0
    traj = [x0] if return_trajectory else None
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = step(velocity, x, t0, t1, method)
        if traj is not None:
            traj.append(x)
    return torch.stack(traj) if traj is not None else x
