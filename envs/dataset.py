"""``DemoDataset``: (observation history, action chunk) windows over robomimic-layout demo files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.hdf5 import (
    DatasetError,
    Episode,
    list_demos,
    read_demos,
    read_masks,
    split_demo_names,
)


class DemoDataset(torch.utils.data.Dataset):
    """One item per demo step t: the observation history ending at t and the action chunk starting at t.

    Item ``i`` is ``{"obs": (To, Do) float32, "action": (Ta, Da) float32, "action_mask": (Ta,) bool}``:
    ``obs`` holds steps t-To+1 .. t, padded at the episode start by repeating the first observation;
    ``action`` holds steps t .. t+Ta-1, padded at the episode end by repeating the last action
    (diffusion_policy's convention); ``action_mask`` is False on padded action steps.

    Args:
        path: robomimic-layout HDF5 file (see :mod:`envs.hdf5`).
        obs_horizon: To. action_horizon: Ta.
        filter_key: ``"train"``/``"valid"``/any mask name, or None for all demos. When the file has no
            ``mask/train``/``mask/valid``, those two keys split the demos by ``valid_fraction`` and
            ``split_seed`` (the same split as :func:`envs.hdf5.write_demos` would write).
        obs_keys: ``obs/<key>`` arrays concatenated, in this order, into the flat observation. None (default):
            every low-dim key of the file in sorted order (``["state"]`` for the files flowpolicy writes;
            e.g. ``["object", "robot0_eef_pos", ...]`` for a robomimic low-dim file).
        expected_obs_dim / expected_act_dim: validated against the file when given.

    Attributes:
        episodes: the loaded :class:`envs.hdf5.Episode` list (obs, actions, rewards, ...; per-demo returns
            via ``episode.episode_return``).
        obs_dim, act_dim: Do and Da.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        obs_horizon: int = 1,
        action_horizon: int = 1,
        filter_key: str | None = "train",
        obs_keys: Sequence[str] | None = None,
        valid_fraction: float = 0.1,
        split_seed: int = 0,
        expected_obs_dim: int | None = None,
        expected_act_dim: int | None = None,
    ):
        if obs_horizon < 1 or action_horizon < 1:
            raise ValueError(f"obs_horizon and action_horizon must be >= 1, got {obs_horizon}, {action_horizon}")
        self.path = Path(path)
        self.obs_horizon = obs_horizon
        self.action_horizon = action_horizon
        self.filter_key = filter_key
        names = self._select_demos(filter_key, valid_fraction, split_seed)
        self.episodes: list[Episode] = read_demos(
            self.path, obs_keys=obs_keys, demos=names,
            expected_obs_dim=expected_obs_dim, expected_act_dim=expected_act_dim,
        )
        self.obs_dim = int(self.episodes[0].obs.shape[1])
        self.act_dim = int(self.episodes[0].actions.shape[1])
        self._obs = np.concatenate([ep.obs for ep in self.episodes])
        self._actions = np.concatenate([ep.actions for ep in self.episodes])
        lengths = np.array([len(ep) for ep in self.episodes])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        # For each flat step: the flat index range [episode start, episode end) it belongs to.
        self._ep_start = np.repeat(starts, lengths)
        self._ep_last = np.repeat(starts + lengths - 1, lengths)
        self._obs_offsets = np.arange(-obs_horizon + 1, 1)
        self._action_offsets = np.arange(action_horizon)

    def _select_demos(self, filter_key: str | None, valid_fraction: float, split_seed: int) -> list[str]:
        if filter_key is None:
            return list_demos(self.path)
        masks = read_masks(self.path)
        if filter_key in masks:
            names = list_demos(self.path, filter_key)
            if not names:
                raise DatasetError(f"{self.path}: mask/{filter_key} is empty")
            return names
        if filter_key in ("train", "valid"):
            train, valid = split_demo_names(list_demos(self.path), valid_fraction, split_seed)
            names = train if filter_key == "train" else valid
            if not names:
                raise DatasetError(f"{self.path}: no demos for filter_key={filter_key!r} "
                                   f"(valid_fraction={valid_fraction}, no masks in file)")
            return names
        raise DatasetError(f"{self.path}: no mask/{filter_key} (masks: {sorted(masks)})")

    def __len__(self) -> int:
        return int(self._obs.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = int(index) % len(self)
        obs_idx = np.maximum(index + self._obs_offsets, self._ep_start[index])
        raw_action_idx = index + self._action_offsets
        action_idx = np.minimum(raw_action_idx, self._ep_last[index])
        return {
            "obs": torch.from_numpy(self._obs[obs_idx]),
            "action": torch.from_numpy(self._actions[action_idx]),
            "action_mask": torch.from_numpy(raw_action_idx <= self._ep_last[index]),
        }

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    def episode_returns(self) -> np.ndarray:
        """(num_episodes,) undiscounted return of each loaded demo."""
        return np.array([ep.episode_return for ep in self.episodes], dtype=np.float64)

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-dimension statistics of the loaded demos (the train demos for ``filter_key="train"``).

        Returns:
            ``{"obs": {"min", "max", "mean", "std"}, "action": {...}}``, each a float32 array of shape (Do,)
            or (Da,); min and max are the policies' normalizer statistics
            (:class:`flowpolicy.policy.MinMaxNormalizer`).
        """
        return {"obs": _array_stats(self._obs), "action": _array_stats(self._actions)}

    def info(self) -> dict[str, Any]:
        """Small JSON-serializable summary (for logs)."""
        returns = self.episode_returns()
        return {
            "path": str(self.path), "filter_key": self.filter_key, "num_episodes": self.num_episodes,
            "num_steps": len(self), "obs_dim": self.obs_dim, "act_dim": self.act_dim,
            "return_mean": float(returns.mean()), "return_std": float(returns.std()),
        }


def _array_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    x64 = x.astype(np.float64)
    return {
        "min": x.min(axis=0).astype(np.float32),
        "max": x.max(axis=0).astype(np.float32),
        "mean": x64.mean(axis=0).astype(np.float32),
        "std": x64.std(axis=0).astype(np.float32),
    }
