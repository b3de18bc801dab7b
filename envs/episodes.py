"""Stepping vectorized envs and running evaluation episodes: the one set of rules every loop uses.

- :class:`VecEnvStepper`: one vector step with episode ends made explicit, in any autoreset mode (no dummy
  "reset step" ever reaches the policy). PPO's rollout collection steps envs through it.
- :func:`episode_quotas`: how evaluation episodes are shared among envs (spare episodes to the last envs).
- :func:`run_episodes`: deterministic or stochastic evaluation episodes through the stepper, with actions
  clipped to the action space. Every evaluator calls it: ``agents.evaluate.rollout_episodes`` (stage=eval,
  pretraining), fine-tuning's ``ReinFlowPPO.evaluate`` and the benchmark's SB3 evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np


def episode_quotas(episodes: int, num_envs: int, first_env: int = 0, total_envs: int | None = None) -> np.ndarray:
    """Episodes run by envs ``first_env .. first_env + num_envs - 1`` of ``total_envs`` envs sharing ``episodes``.

    Env g runs ``(episodes + g) // total_envs``: every env runs the same number, and the spare
    ``episodes % total_envs`` go to the last envs. Each env stops after its quota, so episodes that end early are
    not over-represented. ``first_env`` and ``total_envs`` let a process of a data-parallel job compute its
    share of the global envs (default: all of them).
    """
    total = num_envs if total_envs is None else int(total_envs)
    if episodes < 0 or num_envs < 1 or not 0 <= first_env <= total - num_envs:
        raise ValueError(f"bad episode split: {episodes} episodes, envs {first_env}..{first_env + num_envs - 1} "
                         f"of {total}")
    return np.array([(int(episodes) + first_env + i) // total for i in range(num_envs)], dtype=int)


def _info_array(info: dict, key: str, n: int, default, dtype) -> np.ndarray:
    """Read a per-env entry of a Gymnasium vector ``info`` dict (values plus a ``_key`` mask)."""
    out = np.full(n, default, dtype=dtype)
    if key in info:
        vals = np.asarray(info[key])
        mask = np.asarray(info.get("_" + key, np.ones(n, bool)), dtype=bool)
        out[mask] = vals[mask].astype(dtype)
    return out


def _copy_tree(obs):
    return {k: _copy_tree(v) for k, v in obs.items()} if isinstance(obs, dict) else np.array(obs, copy=True)


def _set_row(obs, i: int, value) -> None:
    if isinstance(obs, dict):
        for k in obs:
            _set_row(obs[k], i, value[k])
    else:
        obs[i] = value


@dataclass
class StepResult:
    """One vector step, with episode ends made explicit (shapes: N = number of envs).

    ``obs`` are the observations to act on next (a fresh episode's first observation where one ended);
    ``final_obs`` equals ``obs`` except where an episode ended, where it holds that episode's last observation
    (what a truncated transition bootstraps from). ``success`` and ``chunk_steps`` are of the step taken.
    """

    obs: Any
    reward: np.ndarray  # (N,) float64, env units
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    final_obs: Any
    success: np.ndarray  # (N,) bool
    chunk_steps: np.ndarray  # (N,) int, env steps executed (1 unless the env executes action chunks)


class VecEnvStepper:
    """Steps a Gymnasium ``VectorEnv`` in any autoreset mode and returns :class:`StepResult`.

    - ``SAME_STEP``: the env resets itself; the last observation comes from ``info["final_obs"]`` and the
      ended step's success / chunk length from ``info["final_info"]``.
    - ``NEXT_STEP`` (Gymnasium's default) and ``DISABLED``: the step returns the last observation; the ended
      envs are then reset at once with ``reset(options={"reset_mask": done})`` (supported by Sync and Async
      vector envs), so no dummy "reset step" with a discarded action is ever stored.

    Args:
        envs: the vector env. ``default_chunk_steps`` counts env steps per vector step when the env does not
        report ``info["chunk_steps"]`` (e.g. Ta for an env that takes (Ta, Da) chunks).
    """

    def __init__(self, envs: gym.vector.VectorEnv, default_chunk_steps: int = 1) -> None:
        self.envs = envs
        self.n = envs.num_envs
        mode = envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
        self.mode = gym.vector.AutoresetMode(mode) if not isinstance(mode, gym.vector.AutoresetMode) else mode
        self.default_chunk_steps = int(default_chunk_steps)

    def reset(self, seed: int | None = None):
        """Reset all envs (env i gets ``seed + i``); returns the observations."""
        obs, _ = self.envs.reset(seed=seed)
        return obs

    def step(self, actions: np.ndarray) -> StepResult:
        obs, reward, terminated, truncated, info = self.envs.step(actions)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        done = terminated | truncated
        reward = np.asarray(reward, dtype=np.float64)
        success = _info_array(info, "success", self.n, False, bool)
        chunk = _info_array(info, "chunk_steps", self.n, self.default_chunk_steps, np.int64)
        final_obs = _copy_tree(obs)
        if done.any():
            if self.mode == gym.vector.AutoresetMode.SAME_STEP:
                final_info = info.get("final_info", {})
                f_success = _info_array(final_info, "success", self.n, False, bool)
                f_chunk = _info_array(final_info, "chunk_steps", self.n, self.default_chunk_steps, np.int64)
                for i in np.flatnonzero(done):
                    _set_row(final_obs, i, info["final_obs"][i])
                    success[i], chunk[i] = f_success[i], f_chunk[i]
            else:
                obs, _ = self.envs.reset(options={"reset_mask": done})
        return StepResult(obs, reward, terminated, truncated, final_obs, success, chunk)


def run_episodes(envs: gym.vector.VectorEnv, act: Callable[[Any], np.ndarray], episodes: int,
                 seed: int | Sequence[int] | None, first_env: int = 0, total_envs: int | None = None,
                 default_chunk_steps: int = 1, on_episode: Callable[[], None] | None = None,
                 quotas: Sequence[int] | None = None,
                 on_step: Callable[[np.ndarray], None] | None = None) -> dict[str, list]:
    """Run ``episodes`` episodes on ``envs`` (this process's share when ``first_env``/``total_envs`` are given).

    ``act(obs) -> actions`` is called once per vector step on every env's observation (also for envs that
    finished their quota, so the draws of a seeded sampler do not depend on episode lengths); the actions are
    clipped to the action space. Envs are reset once with ``seed + first_env`` (env i gets ``+ i``), or with
    ``seed[i]`` when ``seed`` is a list; episode ends go through :class:`VecEnvStepper`. ``quotas`` (one per
    env) replaces the split of ``episodes``. ``on_step(active)`` runs after each ``act`` call with the mask of
    envs whose steps count (still within their quota). Returns per-episode ``returns``, ``successes``,
    ``lengths`` (env steps) and ``envs`` (the env index), in the order the episodes ended.
    """
    n = envs.num_envs
    quota = (episode_quotas(episodes, n, first_env, total_envs) if quotas is None
             else np.asarray(quotas, int).reshape(n))
    stepper = VecEnvStepper(envs, default_chunk_steps)
    space = envs.single_action_space
    if seed is not None and not isinstance(seed, (int, np.integer)):
        seed = [int(x) for x in seed]
        if len(seed) != n:
            raise ValueError(f"run_episodes: {len(seed)} seeds for {n} envs")
    elif seed is not None:
        seed = int(seed) + first_env
    obs = stepper.reset(seed=seed)
    ep_ret, ep_len, ep_succ = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, bool)
    done_count = np.zeros(n, int)
    returns: list[float] = []
    successes: list[bool] = []
    lengths: list[int] = []
    env_ids: list[int] = []
    while (done_count < quota).any():
        a = np.asarray(act(obs))
        if on_step is not None:
            on_step(done_count < quota)
        if isinstance(space, gym.spaces.Box):
            a = np.clip(a, space.low, space.high).astype(space.dtype)
        res = stepper.step(a)
        ep_ret += res.reward
        ep_len += res.chunk_steps
        ep_succ |= res.success
        for i in np.flatnonzero(res.terminated | res.truncated):
            if done_count[i] < quota[i]:
                returns.append(float(ep_ret[i]))
                successes.append(bool(ep_succ[i]))
                lengths.append(int(ep_len[i]))
                env_ids.append(int(i))
                if on_episode is not None:
                    on_episode()
            done_count[i] += 1
            ep_ret[i], ep_len[i], ep_succ[i] = 0.0, 0, False
        obs = res.obs
    return {"returns": returns, "successes": successes, "lengths": lengths, "envs": env_ids}
