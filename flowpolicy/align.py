"""Reward and preference alignment of a flow: Flow-DPO, Flow-RWR, reward-guided sampling, FlowChef steering.

Pure torch and agnostic of what x is (action chunks, images, points). Convention (:mod:`flowpolicy.flow`'s
docstring): t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1, target velocity v* = x1 - x0.

- :func:`flow_dpo_loss` (Flow-DPO, Liu et al. 2025 "VideoAlign"): winner w and loser l share the noise x0 and
  the time t; with e(x) = ||v* - v(x_t, t)||^2 per sample, Delta = (e_theta(w) - e_ref(w)) - (e_theta(l) -
  e_ref(l)) and L = -log sigmoid(-(beta / 2) Delta). The reference network is frozen.
- :func:`rwr_weights` / :func:`flow_rwr_loss` (Flow-RWR): flow matching weighted by exp(r / beta), normalized
  and clipped, or by a softmax of the rewards within a group; it reuses ``RectifiedFlow.loss(weights=)``.
- :func:`guided_sample` (reward guidance in the spirit of Flow-NRG):
  v~ = v + g(t) grad_x sum_i w_i r_i(x1_hat) with x1_hat = x_t + (1 - t) v, integrated by
  :mod:`flowpolicy.solvers` on the same explicit time grid as ``RectifiedFlow.sample``; all weights 0 give the
  unguided sampler exactly.
- :func:`flowchef_sample` (FlowChef, gradient-free w.r.t. the network): per Euler step, move x_t along the
  reward gradient at x1_hat with v held constant, then take the Euler step with that same v.

A reward is any callable ``r(x) -> (B,)`` that is differentiable in x (B, *x_shape) for guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import rng
from .flow import RectifiedFlow, ShortcutFlow, linear_path
from .losses import mse
from .solvers import SOLVERS, check_grid, integrate, time_grid

RewardFn = Callable[[torch.Tensor], torch.Tensor]
BETA_SCHEDULES = ("constant", "diffusion_dpo")
GUIDANCE_SCHEDULES = ("constant", "linear", "one_minus_t", "quadratic")


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


# --- Flow-DPO -----------------------------------------------------------------------------------------------


def dpo_beta(t: torch.Tensor, beta: float, schedule: str = "constant") -> torch.Tensor:
    """Per-sample beta_t (B,) for Flow-DPO.

    ``constant``: beta (VideoAlign's choice; they found time weighting invites reward hacking).
    ``diffusion_dpo``: the weighting that Diffusion-DPO (Wallace et al. 2024) puts on the noise-prediction
    error, converted to velocity errors. The noise estimate of a velocity v is x0_hat = x_t - t v, so
    ||x0 - x0_hat||^2 = t^2 ||v* - v||^2 and beta_t = beta t^2 here. VideoAlign (t = 1 is noise) writes the
    same weight as beta (1 - t)^2; with t -> 1 - t it is beta t^2 in our convention.
    """
    if schedule == "constant":
        return torch.full_like(t, float(beta))
    if schedule == "diffusion_dpo":
        return float(beta) * t.pow(2)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose from {BETA_SCHEDULES}")


def velocity_errors(flow: RectifiedFlow, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, cond=None,
                    net: nn.Module | None = None) -> torch.Tensor:
    """e(x1) = mean over dimensions of (v* - v(x_t, t))^2, shape (B,), for given noise x0 and times t (B,).

    The mean (not the sum) over dimensions keeps beta's scale independent of the data size; a beta for the
    summed norm equals this beta divided by the number of dimensions. Always the squared error, also for flows
    trained with pseudo-Huber: the DPO derivation needs the Gaussian ELBO term.
    """
    path = linear_path(x0, x1, t)
    pred = flow.velocity(path.x_t, t, cond, torch.zeros_like(t), net=net)
    return mse(pred, path.dx_t)


def flow_dpo_loss(
    flow: RectifiedFlow,
    ref_net: nn.Module,
    x_w: torch.Tensor,
    x_l: torch.Tensor,
    cond_w=None,
    cond_l=None,
    beta: float = 1000.0,
    beta_schedule: str = "constant",
    samples_per_pair: int = 1,
    x0: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-DPO loss of ``flow.net`` against the frozen ``ref_net`` on preference pairs.

    Args:
        x_w, x_l: winners and losers (N, *x_shape); row i of each forms one sample of a pair.
        cond_w, cond_l: their conditions (N, Dc) or None; ``cond_l`` defaults to ``cond_w`` (same prompt or
            state). Trajectory pairs from one start state have different states per chunk: give both.
        beta: inverse temperature on the per-dimension mean squared error (see :func:`velocity_errors`).
        beta_schedule: ``constant`` or ``diffusion_dpo`` (see :func:`dpo_beta`).
        samples_per_pair: S; consecutive blocks of S rows belong to one pair (e.g. S chunks of a winner and a
            loser trajectory), and their scaled Delta is averaged inside the sigmoid, a Monte Carlo estimate
            of the pair's summed log-likelihood ratio as in Diffusion-DPO's treatment of time steps.
        x0, t: shared noise (N, *x_shape) and times (N,); drawn when None (t from ``flow.time_sampler``).

    Returns:
        (loss, info) with info ``loss/dpo``, ``dpo/accuracy`` (fraction of pairs whose implicit reward ranks
        the winner first), ``dpo/delta`` (mean Delta) and ``dpo/logit`` (mean -(beta_t / 2) Delta).
        With flow.net == ref_net the loss is log 2.
    """
    if x_w.shape != x_l.shape:
        raise ValueError(f"winners {tuple(x_w.shape)} and losers {tuple(x_l.shape)} must have the same shape")
    n = x_w.shape[0]
    if samples_per_pair < 1 or n % samples_per_pair:
        raise ValueError(f"{n} rows do not split into pairs of samples_per_pair={samples_per_pair}")
    if cond_l is None:
        cond_l = cond_w
    if (cond_w is None) != (cond_l is None):
        raise ValueError("give conditions for both winners and losers, or for neither")
    if x0 is None:
        x0 = rng.randn(x_w.shape, generator, x_w.device, x_w.dtype)
    if t is None:
        t = flow.time_sampler(n, generator=generator, device=x_w.device)
    # one forward per network over [winners; losers], sharing x0 and t between the two halves
    x1 = torch.cat([x_w, x_l])
    x0_2, t_2 = torch.cat([x0, x0]), torch.cat([t, t])
    cond = None if cond_w is None else torch.cat([cond_w, cond_l])
    err = velocity_errors(flow, x1, x0_2, t_2, cond)
    with torch.no_grad():
        err_ref = velocity_errors(flow, x1, x0_2, t_2, cond, net=ref_net)
    e_w, e_l = err[:n], err[n:]
    r_w, r_l = err_ref[:n], err_ref[n:]
    delta = (e_w - r_w) - (e_l - r_l)
    logits = (-0.5 * dpo_beta(t, beta, beta_schedule) * delta).reshape(-1, samples_per_pair).mean(dim=1)
    loss = -F.logsigmoid(logits).mean()
    info = {"loss/dpo": float(loss.detach()), "dpo/accuracy": float((logits > 0).float().mean()),
            "dpo/delta": float(delta.detach().mean()), "dpo/logit": float(logits.detach().mean())}
    return loss, info


# --- Flow-RWR -----------------------------------------------------------------------------------------------


def rwr_weights(rewards: torch.Tensor, beta: float, groups: torch.Tensor | None = None,
                normalize: bool = True, max_weight: float | None = None) -> torch.Tensor:
    """Reward-weighted-regression weights (B,) float32 from rewards (B,).

    Without ``groups``: w = exp(r / beta), divided by its mean when ``normalize`` (mean weight 1).
    With ``groups`` (B,) integer ids: a softmax of r / beta within each group, times the group's size (each
    group keeps mean weight 1, so only the ranking inside a group matters, e.g. rollouts of one start state).
    ``max_weight`` then clips every weight from above. Computed in float64 with the maximum subtracted, so
    large r / beta does not overflow.
    """
    if beta <= 0:
        raise ValueError(f"RWR beta must be positive, got {beta}")
    r = rewards.detach().reshape(-1).double()
    if not bool(torch.isfinite(r).all()):
        raise ValueError("RWR rewards contain NaN or inf")
    if groups is None:
        w = torch.exp((r - r.max()) / beta)
        if normalize:
            w = w / w.mean()
    else:
        groups = torch.as_tensor(groups, device=r.device).reshape(-1)
        if groups.shape != r.shape:
            raise ValueError(f"groups {tuple(groups.shape)} must match rewards {tuple(r.shape)}")
        w = torch.empty_like(r)
        for g in torch.unique(groups):
            m = groups == g
            w[m] = torch.softmax(r[m] / beta, dim=0) * m.sum()
    if max_weight is not None:
        w = w.clamp(max=float(max_weight))
    return w.to(torch.float32)


def flow_rwr_loss(flow: RectifiedFlow, x1: torch.Tensor, rewards: torch.Tensor, cond=None, beta: float = 1.0,
                  groups: torch.Tensor | None = None, max_weight: float | None = None, x0=None, t=None,
                  generator=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-RWR: ``flow.loss`` weighted by :func:`rwr_weights`; equal rewards give plain flow matching."""
    w = rwr_weights(rewards, beta, groups, max_weight=max_weight).to(x1.device)
    loss, info = flow.loss(x1, cond, x0=x0, t=t, weights=w, generator=generator)
    ess = float(w.sum() ** 2 / (w.pow(2).sum() * len(w)))  # effective sample size, as a fraction of the batch
    info.update({"rwr/weight_max": float(w.max()), "rwr/ess": ess})
    return loss, info


# --- reward guidance at sampling time ----------------------------------------------------------------------


TimeFn = Callable[[torch.Tensor], torch.Tensor]


def guidance_schedule(name: str | TimeFn) -> TimeFn:
    """g(t) for t (B,): ``constant`` 1, ``linear`` t, ``one_minus_t`` 1 - t, ``quadratic`` t^2, or a callable.

    Late schedules (``linear``, ``quadratic``) guide where x1_hat is accurate; early ones (``one_minus_t``)
    guide where the flow can still pull a pushed sample back towards the data.
    """
    if callable(name):
        return name
    table = {"constant": torch.ones_like, "linear": lambda t: t, "one_minus_t": lambda t: 1.0 - t,
             "quadratic": lambda t: t * t}
    if name not in table:
        raise ValueError(f"unknown guidance schedule {name!r}; choose from {GUIDANCE_SCHEDULES} or give "
                         "a callable g(t)")
    return table[name]


def _weighted_reward_grad(rewards: Sequence[RewardFn], weights: Sequence[float], x1_hat: torch.Tensor,
                          wrt: torch.Tensor, max_grad_norm: float | None) -> torch.Tensor:
    """grad_wrt sum_i w_i sum_b r_i(x1_hat)_b, optionally clipped per sample to ``max_grad_norm``."""
    total = x1_hat.new_zeros(())
    for fn, w in zip(rewards, weights, strict=True):
        r = fn(x1_hat)
        if r.shape != x1_hat.shape[:1]:
            raise ValueError(f"a reward must return shape (B,) = {tuple(x1_hat.shape[:1])}, got "
                             f"{tuple(r.shape)}")
        total = total + float(w) * r.sum()
    (grad,) = torch.autograd.grad(total, wrt, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(wrt)
    if max_grad_norm is not None:
        norm = grad.reshape(grad.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        grad = grad * _bcast((max_grad_norm / norm).clamp(max=1.0), grad)
    return grad.detach()


def _check_rewards(rewards, weights) -> tuple[list, list[float]]:
    rewards = [rewards] if callable(rewards) else list(rewards)
    weights = [weights] if isinstance(weights, (int, float)) else [float(w) for w in weights]
    if not rewards or len(rewards) != len(weights):
        raise ValueError(f"give one weight per reward: {len(rewards)} rewards, {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"guidance weights must be finite, got {weights}")
    return rewards, weights


def _start(flow: RectifiedFlow, cond, x0, batch, steps: int, solver: str, grid, generator):
    """The noise and grid that ``RectifiedFlow.sample`` would use (same validation, same defaults)."""
    if isinstance(flow, ShortcutFlow):
        if steps < 1 or steps & (steps - 1) or grid is not None or solver != "euler":
            raise ValueError("shortcut models sample with Euler on a uniform power-of-two grid")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
    if x0 is None:
        if batch is None:
            if cond is None:
                raise ValueError("guided sampling: give x0, cond or batch to fix the batch size")
            batch = cond.shape[0]
        x0 = flow.noise(batch, cond.device if cond is not None else "cpu", generator)
    if grid is None:
        grid = time_grid(steps, device="cpu")
    elif len(grid) != steps + 1:
        raise ValueError(f"grid has {len(grid)} points but steps={steps} needs {steps + 1}")
    return x0, check_grid(grid)


def guided_sample(
    flow: RectifiedFlow,
    rewards: RewardFn | Sequence[RewardFn],
    weights: float | Sequence[float],
    cond=None,
    steps: int = 1,
    solver: str = "euler",
    x0: torch.Tensor | None = None,
    batch: int | None = None,
    grid=None,
    schedule: str | Callable = "constant",
    through_velocity: bool = False,
    max_grad_norm: float | None = None,
    return_trajectory: bool = False,
    generator: torch.Generator | None = None,
    net: nn.Module | None = None,
) -> torch.Tensor:
    """Sample with the guided velocity v~(x, t) = v + g(t) grad_x sum_i w_i r_i(x1_hat), x1_hat = x + (1-t) v.

    Integration is :func:`flowpolicy.solvers.integrate` over the grid ``RectifiedFlow.sample`` would use (or
    ``grid``), with any of its solvers: every velocity evaluation is guided. ``through_velocity=False``
    treats v as constant in x1_hat (grad_x r(x1_hat) = grad r at x1_hat; one network call per evaluation,
    no backpropagation through it); ``True`` differentiates through the network as well. ``weights`` are
    per objective, in units of velocity per unit of reward gradient. All weights 0 reproduce
    ``flow.sample`` with the same noise bit for bit. Returns x at t = 1, or the trajectory.
    """
    rewards, weights = _check_rewards(rewards, weights)
    g_of_t = guidance_schedule(schedule)
    x0, grid = _start(flow, cond, x0, batch, steps, solver, grid, generator)

    def velocity(x: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            if through_velocity:
                xg = x.detach().requires_grad_(True)
                v = flow.velocity(xg, t, cond, d, net=net)
                x1_hat = xg + _bcast(1.0 - t, xg) * v
                grad = _weighted_reward_grad(rewards, weights, x1_hat, xg, max_grad_norm)
                v = v.detach()
            else:
                with torch.no_grad():
                    v = flow.velocity(x, t, cond, d, net=net)
                x1_hat = (x + _bcast(1.0 - t, x) * v).detach().requires_grad_(True)
                grad = _weighted_reward_grad(rewards, weights, x1_hat, x1_hat, max_grad_norm)
        return v + _bcast(g_of_t(t).to(v.dtype), v) * grad

    return integrate(velocity, x0, grid, solver, return_trajectory)


@torch.no_grad()
def flowchef_sample(
    flow: RectifiedFlow,
    rewards: RewardFn | Sequence[RewardFn],
    weights: float | Sequence[float],
    step_size: float,
    cond=None,
    steps: int = 1,
    x0: torch.Tensor | None = None,
    batch: int | None = None,
    grid=None,
    schedule: str | Callable = "constant",
    max_grad_norm: float | None = None,
    generator: torch.Generator | None = None,
    net: nn.Module | None = None,
) -> torch.Tensor:
    """FlowChef steering (Euler only): per step, v = v(x_t, t); x1_hat = x_t + (1 - t) v;
    x_t <- x_t + step_size g(t) grad sum_i w_i r_i(x1_hat) (ascent on the reward = descent on a loss -r) with
    v held constant, so no gradient flows through the network; then x_{t+h} = x_t + h v with that same v.

    Unlike :func:`guided_sample`, the steering move does not scale with the step h. ``step_size=0`` gives the
    Euler sampler exactly.
    """
    rewards, weights = _check_rewards(rewards, weights)
    g_of_t = guidance_schedule(schedule)
    x, grid = _start(flow, cond, x0, batch, steps, "euler", grid, generator)
    ts = grid.tolist()
    b = x.shape[0]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        tt = torch.full((b,), t0, device=x.device, dtype=torch.float32)
        v = flow.velocity(x, tt, cond, torch.full_like(tt, h), net=net)
        with torch.enable_grad():
            x1_hat = (x + (1.0 - t0) * v).requires_grad_(True)
            grad = _weighted_reward_grad(rewards, weights, x1_hat, x1_hat, max_grad_norm)
        x = x + float(step_size) * _bcast(g_of_t(tt).to(x.dtype), x) * grad
        x = x + h * v
    return x
