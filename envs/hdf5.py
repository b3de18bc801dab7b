"""Demonstration files in robomimic's HDF5 layout: writer, validating reader, split masks.

Layout (robomimic's, so robomimic's own ``SequenceDataset`` reads our files and we read its low-dim files)::

    data                      attrs: total (int, all steps), env_args (JSON: env_name, type, env_kwargs)
    data/demo_<i>/obs/<key>   (T, D) float32; our low-dim key is "state", a flat vector
    data/demo_<i>/next_obs/<key>  (T, D) observation after each action (written when known)
    data/demo_<i>/actions     (T, Da) float32 in [-1, 1]
    data/demo_<i>/rewards     (T,) float32
    data/demo_<i>/dones       (T,) uint8, 1 at the last step of the demo
                              attrs: num_samples (T), plus ours: success, terminated
    mask/train, mask/valid    arrays of demo names as bytes (b"demo_0", ...)
    /                         attrs: flowpolicy_format (int), flowpolicy_meta (JSON: how the file was made)

Reading validates every demo and names the file, demo and key in its :class:`DatasetError`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
DEFAULT_OBS_KEY = "state"
# robomimic's EnvType values (robomimic.envs.env_base.EnvType).
ROBOMIMIC_ENV_TYPE = {"robosuite": 1, "locomotion": 2, "metaworld": 2}
_ACTION_BOUND_TOL = 1e-6


class DatasetError(ValueError):
    """A demonstration file that is missing, unreadable or inconsistent; the message names file, demo and key."""


@dataclass
class Episode:
    """One demonstration. T steps; ``obs[t]`` is seen before ``actions[t]``, ``next_obs[t]`` after it.

    Attributes:
        obs: (T, Do) float32.
        actions: (T, Da) float32, in [-1, 1].
        rewards: (T,) float32.
        dones: (T,) uint8; 1 at the last step (robomimic's convention).
        next_obs: (T, Do) float32 or None when unknown.
        success: whether the demo reached success (None: the family has no success signal).
        terminated: whether the last step was a true termination (not a time limit or a cut).
        name: ``demo_<i>`` once written or read.
    """

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray | None = None
    next_obs: np.ndarray | None = None
    success: bool | None = None
    terminated: bool = False
    name: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.obs = np.asarray(self.obs, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32).reshape(-1)
        if self.dones is None:
            self.dones = np.zeros(len(self.rewards), dtype=np.uint8)
            if len(self.dones):
                self.dones[-1] = 1
        self.dones = np.asarray(self.dones, dtype=np.uint8).reshape(-1)
        if self.next_obs is not None:
            self.next_obs = np.asarray(self.next_obs, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def episode_return(self) -> float:
        """Sum of rewards (undiscounted)."""
        return float(self.rewards.sum(dtype=np.float64))


def env_args_for(meta: Mapping[str, Any]) -> dict[str, Any]:
    """robomimic-style ``env_args`` from :func:`envs.factory.env_meta`: ``{"env_name", "type", "env_kwargs"}``.

    robosuite envs get robomimic's own form: robosuite's env name (``Lift``, ``PickPlaceCan``) and the
    ``robosuite.make`` keywords of the env (the factory's defaults, the name's keywords, ``horizon``), so
    robomimic can rebuild it and :func:`envs.factory.env_name_from_env_args` reads the same env back."""
    if meta["family"] == "robosuite":
        from envs.factory import _ROBOSUITE_ENV_NAMES, ROBOSUITE_DEFAULT_KWARGS, parse_env_name

        parsed = parse_env_name(meta["name"])
        ours = ("terminate_on_success", "success_reward", "render_size", "camera_name")  # wrapper options
        task_kwargs = {k: v for k, v in meta.get("task_kwargs", {}).items() if k not in ours}
        env_kwargs = {**ROBOSUITE_DEFAULT_KWARGS, **parsed.env_kwargs, **task_kwargs,
                      "horizon": meta.get("max_episode_steps"), "has_renderer": False,
                      "has_offscreen_renderer": False, "use_camera_obs": False, "ignore_done": True}
        return {"env_name": _ROBOSUITE_ENV_NAMES[parsed.task], "type": ROBOMIMIC_ENV_TYPE["robosuite"],
                "env_kwargs": env_kwargs}
    env_kwargs = dict(meta.get("task_kwargs", {}))
    env_kwargs["max_episode_steps"] = meta.get("max_episode_steps")
    return {"env_name": meta["name"], "type": ROBOMIMIC_ENV_TYPE[meta["family"]], "env_kwargs": env_kwargs}


def split_demo_names(names: Sequence[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train/valid split of demo names. At least one train demo; at least one valid demo when
    ``valid_fraction > 0`` and there are two or more demos. Both lists keep file order."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    n = len(names)
    n_valid = int(round(valid_fraction * n))
    if valid_fraction > 0 and n >= 2:
        n_valid = max(n_valid, 1)
    n_valid = min(n_valid, n - 1) if n else 0
    order = np.random.default_rng(seed).permutation(n)
    valid = set(order[:n_valid].tolist())
    return [s for i, s in enumerate(names) if i not in valid], [s for i, s in enumerate(names) if i in valid]


def _demo_sort_key(name: str) -> tuple[int, str]:
    match = re.fullmatch(r"demo_(\d+)", name)
    return (int(match.group(1)), name) if match else (1 << 62, name)


def _check_episode(ep: Episode, where: str, expected_obs_dim: int | None, expected_act_dim: int | None,
                   check_action_bounds: bool) -> None:
    """Raise DatasetError for an inconsistent demo; ``where`` is "<file>: data/<demo>"."""
    if ep.actions.ndim != 2:
        raise DatasetError(f"{where}/actions: expected shape (T, Da), got {ep.actions.shape}")
    if len(ep) == 0:
        raise DatasetError(f"{where}: empty demo (0 steps)")
    if ep.obs.ndim != 2:
        raise DatasetError(f"{where}/obs: expected shape (T, Do), got {ep.obs.shape}")
    if ep.obs.shape[0] != len(ep):
        raise DatasetError(f"{where}/obs: {ep.obs.shape[0]} observations but {len(ep)} actions")
    for key, arr in (("rewards", ep.rewards), ("dones", ep.dones)):
        if arr.shape[0] != len(ep):
            raise DatasetError(f"{where}/{key}: length {arr.shape[0]} but {len(ep)} actions")
    if ep.next_obs is not None and ep.next_obs.shape != ep.obs.shape:
        raise DatasetError(f"{where}/next_obs: shape {ep.next_obs.shape} differs from obs {ep.obs.shape}")
    if expected_obs_dim is not None and ep.obs.shape[1] != expected_obs_dim:
        raise DatasetError(f"{where}/obs: obs dim {ep.obs.shape[1]}, expected {expected_obs_dim}")
    if expected_act_dim is not None and ep.actions.shape[1] != expected_act_dim:
        raise DatasetError(f"{where}/actions: action dim {ep.actions.shape[1]}, expected {expected_act_dim}")
    arrays = {"obs": ep.obs, "actions": ep.actions, "rewards": ep.rewards}
    if ep.next_obs is not None:
        arrays["next_obs"] = ep.next_obs
    for key, arr in arrays.items():
        bad = ~np.isfinite(arr)
        if bad.any():
            step = int(np.argwhere(bad)[0][0])
            raise DatasetError(f"{where}/{key}: contains NaN or Inf (first at step {step})")
    if check_action_bounds:
        worst = float(np.abs(ep.actions).max())
        if worst > 1.0 + _ACTION_BOUND_TOL:
            step = int(np.argwhere(np.abs(ep.actions) > 1.0 + _ACTION_BOUND_TOL)[0][0])
            raise DatasetError(
                f"{where}/actions: values outside [-1, 1] (max |a| = {worst:.4g}, first at step {step}); "
                "actions must be normalized to the env's [-1, 1] action space"
            )


def write_demos(
    path: str | os.PathLike,
    episodes: Sequence[Episode],
    env_args: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    valid_fraction: float = 0.1,
    split_seed: int = 0,
    obs_key: str = DEFAULT_OBS_KEY,
) -> Path:
    """Validate ``episodes`` and write them as ``data/demo_<i>`` with train/valid masks.

    The file is written to a temporary file beside ``path`` and renamed into place, so an existing file is
    never left half-written. ``meta`` (how the file was made) is stored as JSON in the ``flowpolicy_meta``
    file attribute. Returns the path.
    """
    path = Path(path)
    if not episodes:
        raise DatasetError(f"{path}: no episodes to write")
    for i, ep in enumerate(episodes):
        _check_episode(ep, f"{path}: data/demo_{i}", None, episodes[0].actions.shape[-1], True)
        if ep.obs.shape[1] != episodes[0].obs.shape[1]:
            raise DatasetError(f"{path}: data/demo_{i}/obs: obs dim {ep.obs.shape[1]} differs from demo_0")
    names = [f"demo_{i}" for i in range(len(episodes))]
    train, valid = split_demo_names(names, valid_fraction, split_seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # a file, or a link to nowhere, where a folder must be
        raise DatasetError(f"{path}: cannot create the folder {path.parent}: {e.filename} exists but is not a "
                           "folder (a file or a broken symlink?)") from e
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with h5py.File(tmp_name, "w") as f:
            f.attrs["flowpolicy_format"] = FORMAT_VERSION
            f.attrs["flowpolicy_meta"] = json.dumps(dict(meta or {}))
            data = f.create_group("data")
            data.attrs["total"] = int(sum(len(ep) for ep in episodes))
            data.attrs["env_args"] = json.dumps(dict(env_args))
            for name, ep in zip(names, episodes):
                g = data.create_group(name)
                g.create_dataset(f"obs/{obs_key}", data=ep.obs)
                if ep.next_obs is not None:
                    g.create_dataset(f"next_obs/{obs_key}", data=ep.next_obs)
                g.create_dataset("actions", data=ep.actions)
                g.create_dataset("rewards", data=ep.rewards)
                g.create_dataset("dones", data=ep.dones)
                g.attrs["num_samples"] = len(ep)
                g.attrs["terminated"] = bool(ep.terminated)
                if ep.success is not None:
                    g.attrs["success"] = bool(ep.success)
            f.create_dataset("mask/train", data=np.array(train, dtype="S"))
            f.create_dataset("mask/valid", data=np.array(valid, dtype="S"))
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    return path


def _open(path: str | os.PathLike) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: dataset file does not exist; check task.demos.path")
    if not path.is_file() or not h5py.is_hdf5(path):
        raise DatasetError(f"{path}: not an HDF5 file; give a robomimic-layout .hdf5 demo file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read as HDF5, the file is truncated or corrupt ({err}); copy or "
                           "regenerate it") from err


def low_dim_keys(obs_group: h5py.Group) -> list[str]:
    """The low-dim observation keys of one demo's ``obs`` group, sorted: arrays of shape (T,) or (T, D)
    (image keys, (T, H, W, C), are left out). This is the default observation of a robomimic file."""
    return sorted(k for k, v in obs_group.items() if isinstance(v, h5py.Dataset) and v.ndim <= 2)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What a demo file holds, read from its first demo: ``{"num_demos", "obs_keys"`` (low-dim, sorted),
    ``"obs_dims"``, ``"other_obs_keys"`` (images...), ``"action_dim"``, ``"action_dtype"``, ``"env_args"``,
    ``"ours"`` (written by flowpolicy)``}``."""
    path = Path(path)
    names = list_demos(path)
    if not names:
        raise DatasetError(f"{path}: no demos in data")
    with _open(path) as f:
        g = _data_group(f, path)[names[0]]
        where = f"{path}: data/{names[0]}"
        if "obs" not in g or "actions" not in g:
            raise DatasetError(f"{where}: needs 'obs' and 'actions' (robomimic layout)")
        keys = low_dim_keys(g["obs"])
        dims = {k: int(np.prod(g["obs"][k].shape[1:])) for k in keys}
        out = {"num_demos": len(names), "obs_keys": keys, "obs_dims": dims,
               "other_obs_keys": sorted(set(g["obs"].keys()) - set(keys)),
               "action_dim": int(np.prod(g["actions"].shape[1:])), "action_dtype": str(g["actions"].dtype),
               "ours": "flowpolicy_format" in f.attrs}
    out["env_args"] = read_env_args(path)
    return out


def _data_group(f: h5py.File, path: Path) -> h5py.Group:
    if "data" not in f or not isinstance(f["data"], h5py.Group):
        raise DatasetError(f"{path}: missing 'data' group (not a robomimic-style demo file)")
    return f["data"]


def list_demos(path: str | os.PathLike, filter_key: str | None = None) -> list[str]:
    """Demo names in numeric order; with ``filter_key``, those listed in ``mask/<filter_key>``."""
    path = Path(path)
    with _open(path) as f:
        data = _data_group(f, path)
        names = sorted(data.keys(), key=_demo_sort_key)
        if filter_key is None:
            return names
        masks = read_masks(path)
        if filter_key not in masks:
            raise DatasetError(f"{path}: no mask/{filter_key} (masks: {sorted(masks)})")
        missing = [n for n in masks[filter_key] if n not in data]
        if missing:
            raise DatasetError(f"{path}: mask/{filter_key} names demos not in data: {missing[:5]}")
        return sorted(masks[filter_key], key=_demo_sort_key)


def read_masks(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{filter_key: [demo names]}`` from the ``mask`` group (empty dict when there is none)."""
    path = Path(path)
    with _open(path) as f:
        if "mask" not in f:
            return {}
        return {key: [_to_str(v) for v in np.asarray(f["mask"][key][()]).reshape(-1)] for key in f["mask"]}


def _to_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes | np.bytes_) else str(value)


def read_env_args(path: str | os.PathLike) -> dict[str, Any]:
    """The ``data`` attribute ``env_args`` parsed from JSON ({} when absent)."""
    path = Path(path)
    with _open(path) as f:
        raw = _data_group(f, path).attrs.get("env_args")
    return _parse_json(raw, path, "data.attrs['env_args']")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``flowpolicy_meta`` file attribute parsed from JSON ({} for files made by other tools)."""
    path = Path(path)
    with _open(path) as f:
        raw = f.attrs.get("flowpolicy_meta")
    return _parse_json(raw, path, "attrs['flowpolicy_meta']")


def _parse_json(raw: Any, path: Path, what: str) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        return json.loads(_to_str(raw))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: {what} is not valid JSON: {err}") from err


def _numeric(ds: h5py.Dataset, where: str) -> np.ndarray:
    """A dataset as float32; a DatasetError naming it when its values are not numbers (strings, objects)."""
    if ds.dtype.kind not in "biuf":
        raise DatasetError(f"{where}: holds {ds.dtype} values, not numbers; store numeric arrays (float32)")
    return np.asarray(ds[()], dtype=np.float32)


def _read_obs(g: h5py.Group, group: str, obs_keys: Sequence[str] | None, where: str) -> np.ndarray:
    if group not in g:
        raise DatasetError(f"{where}: missing '{group}' group")
    if obs_keys is None:
        obs_keys = low_dim_keys(g[group])
        if not obs_keys:
            raise DatasetError(f"{where}/{group}: no low-dim observation keys")
    parts = []
    for key in obs_keys:
        if key not in g[group]:
            raise DatasetError(f"{where}/{group}/{key}: missing obs key (available: {sorted(g[group].keys())}); "
                               "set task.obs_keys=[...] to keys the file has")
        arr = _numeric(g[group][key], f"{where}/{group}/{key}")
        if arr.ndim == 0:
            raise DatasetError(f"{where}/{group}/{key}: expected shape (T, ...), got a scalar")
        parts.append(arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:]))))  # (T, ...) -> (T, D)
    if len(parts) == 1:
        return parts[0]
    lengths = {p.shape[0] for p in parts}
    if len(lengths) != 1:
        raise DatasetError(f"{where}/{group}: obs keys {list(obs_keys)} have different lengths {sorted(lengths)}")
    return np.concatenate(parts, axis=1)


def read_demos(
    path: str | os.PathLike,
    obs_keys: Sequence[str] | None = (DEFAULT_OBS_KEY,),
    filter_key: str | None = None,
    demos: Sequence[str] | None = None,
    expected_obs_dim: int | None = None,
    expected_act_dim: int | None = None,
    check_action_bounds: bool = True,
    load_next_obs: bool = False,
) -> list[Episode]:
    """Read and validate demos.

    Args:
        obs_keys: ``obs/<key>`` arrays concatenated (in this order) into the flat (T, Do) observation;
            for a real robomimic low-dim file e.g. ``("object", "robot0_eef_pos", ...)``. None: every
            low-dim key of the file, sorted (:func:`low_dim_keys`).
        filter_key: read only the demos in ``mask/<filter_key>``; ``demos``: read exactly these.
        expected_obs_dim / expected_act_dim: checked against every demo when given.
        check_action_bounds: reject actions outside [-1, 1].
        load_next_obs: also read ``next_obs`` (None for demos that have none).

    Raises:
        DatasetError: naming the file, demo and key, for a missing file, a non-HDF5 file, a missing group or
            key, mismatched lengths or dims, NaN/Inf, empty demos, no demos, or out-of-bound actions.
    """
    path = Path(path)
    names = list(demos) if demos is not None else list_demos(path, filter_key)
    if not names:
        which = f"mask/{filter_key}" if filter_key else "data"
        raise DatasetError(f"{path}: no demos in {which}")
    episodes = []
    with _open(path) as f:
        try:
            _read_all(f, path, names, obs_keys, expected_obs_dim, expected_act_dim, check_action_bounds,
                      load_next_obs, episodes)
        except OSError as err:  # h5py reads lazily: a truncated file fails here, not at open
            raise DatasetError(f"{path}: cannot be read, the file is truncated or corrupt ({err}); copy or "
                               "regenerate it") from err
    return episodes


def _read_all(f, path, names, obs_keys, expected_obs_dim, expected_act_dim, check_action_bounds, load_next_obs,
              episodes) -> None:
    data = _data_group(f, path)
    for name in names:
        where = f"{path}: data/{name}"
        if name not in data:
            raise DatasetError(f"{where}: no such demo")
        g = data[name]
        if "actions" not in g:
            raise DatasetError(f"{where}/actions: missing")
        actions = _numeric(g["actions"], f"{where}/actions")
        n = actions.shape[0] if actions.ndim else 0
        rewards = _numeric(g["rewards"], f"{where}/rewards") if "rewards" in g else np.zeros(n, np.float32)
        dones = np.asarray(g["dones"][()]) if "dones" in g else None
        obs = _read_obs(g, "obs", obs_keys, where)
        next_obs = _read_obs(g, "next_obs", obs_keys, where) if load_next_obs and "next_obs" in g else None
        success = bool(g.attrs["success"]) if "success" in g.attrs else None
        ep = Episode(
            obs=obs, actions=actions, rewards=rewards, dones=dones, next_obs=next_obs, success=success,
            terminated=bool(g.attrs.get("terminated", False)), name=name,
            attrs={k: _to_str(v) if isinstance(v, bytes) else v for k, v in g.attrs.items()},
        )
        _check_episode(ep, where, expected_obs_dim, expected_act_dim, check_action_bounds)
        if expected_obs_dim is None:
            expected_obs_dim = ep.obs.shape[1]
        if expected_act_dim is None:
            expected_act_dim = ep.actions.shape[1]
        episodes.append(ep)
