"""Gymnasium wrappers: uniform success flag, observation history (To) and action chunks (Ta)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np


class SuccessInfo(gym.Wrapper):
    """Makes ``info["success"]`` a Python ``bool`` on every ``reset`` and ``step``.

    The flag comes from ``success_fn()`` when given (robosuite's ``_check_success``), else from the env's own
    ``info["success"]`` (Meta-World reports a float 0.0/1.0), else it is ``False`` (locomotion has no success).
    With ``terminate_on_success`` a successful step also sets ``terminated``. With ``success_reward`` set, the
    reward is that value on a successful step and 0 otherwise (a sparse reward; the env's own reward is kept
    in ``info["env_reward"]``).
    """

    def __init__(
        self, env: gym.Env, success_fn: Callable[[], Any] | None = None, terminate_on_success: bool = False,
        success_reward: float | None = None,
    ):
        super().__init__(env)
        self._success_fn = success_fn
        self._terminate_on_success = terminate_on_success
        self._success_reward = None if success_reward is None else float(success_reward)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        info["success"] = False
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        success = self._success_fn() if self._success_fn is not None else info.get("success", False)
        info["success"] = bool(success)
        if self._terminate_on_success and info["success"]:
            terminated = True
        if self._success_reward is not None:
            info["env_reward"] = reward
            reward = self._success_reward if info["success"] else 0.0
        return obs, reward, terminated, truncated, info


def _flat_box(space: gym.Space, what: str) -> gym.spaces.Box:
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise TypeError(f"{what} needs a flat Box space of shape (D,), got {space}")
    return space


def _stacked_box(space: gym.spaces.Box, n: int) -> gym.spaces.Box:
    """The (n, D) Box of n stacked copies of a flat (D,) Box."""
    return gym.spaces.Box(low=np.repeat(space.low[None], n, axis=0), high=np.repeat(space.high[None], n, axis=0),
                          dtype=space.dtype)


class ObservationHistory(gym.Wrapper):
    """Stacks the last ``To`` observations: space Box (To, Do), oldest first, newest last.

    At reset the history is filled by repeating the first observation (diffusion_policy's convention), so
    every observation has the full (To, Do) shape from the first step.
    """

    def __init__(self, env: gym.Env, obs_horizon: int):
        super().__init__(env)
        if obs_horizon < 1:
            raise ValueError(f"obs_horizon must be >= 1, got {obs_horizon}")
        space = _flat_box(env.observation_space, "ObservationHistory")
        self.obs_horizon = obs_horizon
        self.observation_space = _stacked_box(space, obs_horizon)
        self._history: deque[np.ndarray] = deque(maxlen=obs_horizon)

    def _stacked(self) -> np.ndarray:
        return np.stack(self._history, axis=0)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._history.clear()
        self._history.extend([obs] * self.obs_horizon)
        return self._stacked(), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._history.append(obs)
        return self._stacked(), reward, terminated, truncated, info


class ActionChunk(gym.Wrapper):
    """Takes an action chunk (Ta, Da) and executes its actions one env step at a time.

    Rewards of the executed steps are summed. Execution stops early when the episode ends inside the chunk;
    ``terminated`` and ``truncated`` are those of the last executed step (kept apart, so value bootstrapping
    still knows a time limit from a failure). ``info`` is the last step's info plus ``chunk_steps`` (number of
    env steps executed, 1..Ta) and ``success`` (True if any executed step succeeded). The returned observation
    is the one after the last executed step (the full history when an ObservationHistory is inside).
    """

    def __init__(self, env: gym.Env, action_horizon: int):
        super().__init__(env)
        if action_horizon < 1:
            raise ValueError(f"action_horizon must be >= 1, got {action_horizon}")
        space = _flat_box(env.action_space, "ActionChunk")
        self.action_horizon = action_horizon
        self.action_space = _stacked_box(space, action_horizon)

    def step(self, action):
        chunk = np.asarray(action)
        if chunk.shape != self.action_space.shape:
            raise ValueError(f"ActionChunk expects an action of shape {self.action_space.shape}, got {chunk.shape}")
        total_reward = 0.0
        success = False
        for i in range(self.action_horizon):
            obs, reward, terminated, truncated, info = self.env.step(chunk[i])
            total_reward += float(reward)
            success = success or bool(info.get("success", False))
            if terminated or truncated:
                break
        info = dict(info)
        info["chunk_steps"] = i + 1
        info["success"] = success
        return obs, total_reward, terminated, truncated, info
