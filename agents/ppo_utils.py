"""PPO building blocks that know nothing about the policy: GAE, running reward scaling and schedules. Used by
:mod:`agents.finetune`. The vector-env stepper lives in :mod:`envs.episodes` (re-exported here).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch

from envs.episodes import StepResult, VecEnvStepper  # noqa: F401  (re-exported: moved to envs/)

# --- returns and advantages ---------------------------------------------------------------------------


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                dones: torch.Tensor, gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(lambda) over a rollout of T steps of N envs (all tensors (T, N)).

    ``next_values[t]`` is V of the true next observation of transition t (the episode's last observation when
    it ended there). A terminated transition does not bootstrap (its next value is multiplied by 0); a
    truncated one does. ``dones = terminated | truncated`` cuts the recursion between episodes. The last
    step of the rollout bootstraps from ``next_values[T - 1]``.

    Returns:
        advantages (T, N) and returns = advantages + values (T, N).
    """
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * gae_lambda * (1.0 - dones[t]) * last
        adv[t] = last
    return adv, adv + values


class RunningMeanStd:
    """Running mean and variance of a stream of scalars (parallel Welford update), float64."""

    def __init__(self, epsilon: float = 1e-4) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, float(epsilon)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size == 0:
            return
        b_mean, b_var, b_count = float(x.mean()), float(x.var()), float(x.size)
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean += delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var, self.count = m2 / total, total


class RunningRewardScaler:
    """Divides rewards by the running std of the discounted return (DPPO / ReinFlow reward scaling).

    Per env, R <- gamma * R + r; the running variance of R is updated with every step; the scaled reward
    is r / sqrt(var + eps). R restarts at 0 after an episode ends (and at :meth:`reset_returns`).
    """

    def __init__(self, num_envs: int, gamma: float, eps: float = 1e-8,
                 gather: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.gamma, self.eps = float(gamma), float(eps)
        self.rms = RunningMeanStd()
        self.ret = np.zeros(num_envs, dtype=np.float64)
        # gather: this process's returns -> every process's, in env order (data-parallel fine-tuning: the
        # statistics then see every env, and every process scales by the same number)
        self.gather = gather

    def __call__(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.ret = self.ret * self.gamma + reward
        self.rms.update(self.ret if self.gather is None else self.gather(self.ret))
        self.ret[np.asarray(done, bool)] = 0.0
        return reward / math.sqrt(self.rms.var + self.eps)

    def reset_returns(self) -> None:
        self.ret[:] = 0.0

    def state_dict(self) -> dict:
        return {"mean": torch.tensor(self.rms.mean, dtype=torch.float64),
                "var": torch.tensor(self.rms.var, dtype=torch.float64),
                "count": torch.tensor(self.rms.count, dtype=torch.float64),
                "ret": torch.from_numpy(self.ret.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.rms.mean, self.rms.var = float(state["mean"]), float(state["var"])
        self.rms.count = float(state["count"])
        ret = state["ret"].numpy().astype(np.float64)
        # another process count (resumed with a different world size): returns restart at 0, as after a reset
        self.ret = ret.copy() if ret.shape == self.ret.shape else np.zeros_like(self.ret)


# --- schedules -----------------------------------------------------------------------------------------

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, iteration: int, horizon: int, final_ratio: float) -> float:
    """Multiplier of the base learning rate at ``iteration``: 1 at 0, ``final_ratio`` from ``horizon`` on."""
    if schedule == "constant" or horizon <= 0:
        return 1.0
    p = min(iteration / horizon, 1.0)
    if schedule == "linear":
        return 1.0 + (final_ratio - 1.0) * p
    if schedule == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose from {LR_SCHEDULES}")


def hold_then_linear(iteration: int, start: float, end: float, hold: int, decay: int) -> float:
    """``start`` for the first ``hold`` iterations, then linear to ``end`` over ``decay`` iterations."""
    if iteration < hold:
        return start
    if decay <= 0:
        return end
    p = min((iteration - hold) / decay, 1.0)
    return start + (end - start) * p


def iteration_seed(seed: int, iteration: int) -> int:
    """A reset seed for the envs at the start of ``iteration``, derived from (seed, iteration) only."""
    return int(np.random.SeedSequence([int(seed), int(iteration)]).generate_state(1)[0] % (2**31 - 2**16))


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var[target - pred] / Var[target] (nan when the target is constant)."""
    var = target.var()
    return float("nan") if var == 0 else float(1.0 - (target - pred).var() / var)


def clone_module(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy (eval mode, no gradients), e.g. the pretrained reference policy."""
    frozen = copy.deepcopy(module).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _rows(obs, idx: np.ndarray):
    """Select env rows from an array or dict observation."""
    return {k: _rows(v, idx) for k, v in obs.items()} if isinstance(obs, dict) else np.asarray(obs)[idx]
