"""The task's data, resolved from a composed config: the env to act in and the demo file (validated, or
collected and cached on first use). Shared by the stages (``agents.stages``) and alignment (``agents.align``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from envs.collect import DEFAULT_EXPERT_STEPS, ensure_demos

from .errors import UserError


def note(msg: str) -> None:
    """A one-line notice on stderr (kept out of the result tables on stdout)."""
    print(f"note: {msg}", file=sys.stderr)


@dataclass
class TaskData:
    """What pretraining reads: the env to act in, the demo file (None: collected on first use), obs keys."""

    env: str
    dataset: str | None
    obs_keys: list[str] | None


def resolve_task(cfg: DictConfig) -> TaskData:
    """The env and demo file of a policy task, validated before any work: a given ``task.demos.path`` is read
    in full (every demo, train and valid: truncated files, non-numeric values, NaN/Inf are errors), its env
    comes from ``task.env`` or else the file's ``env_args``, and its dims must fit that env."""
    from envs.factory import check_env_installed, parse_env_name
    from envs.hdf5 import describe, read_demos

    task = cfg.task
    keys = list(task.obs_keys) if task.get("obs_keys") else None
    d = task.demos
    if not d.get("path"):
        if not task.get("env"):
            raise UserError(f"task={task.name} needs task.demos.path=<robomimic low-dim HDF5 file> (or task.env=<env> "
                            "to collect demos)")
        if keys:
            raise UserError("task.obs_keys applies to a given demo file (task.demos.path); collected demos have "
                            "one key, 'state'")
        env = parse_env_name(task.env).canonical
        try:  # demos are collected in the env (and the policy evaluated there): refused before any work
            check_env_installed(env)
        except ImportError as err:
            raise UserError(f"task={task.name} (env {task.env}): {err}") from err
        return TaskData(env, None, None)
    path = Path(str(d.path)).expanduser()
    if not path.exists():
        raise UserError(f"task.demos.path={str(path)!r} does not exist; give a robomimic-layout HDF5 demo file")
    info = describe(path)
    if keys:
        missing = [k for k in keys if k not in info["obs_keys"]]
        if missing:
            raise UserError(f"{path}: task.obs_keys {missing} are not low-dim obs keys of the file (it has "
                            f"{info['obs_keys']})")
    used = keys or info["obs_keys"]
    read_demos(path, obs_keys=used)  # every demo: NaN/Inf, strings, shapes
    if info["action_dtype"] != "float32":
        note(f"{path}: actions are {info['action_dtype']}; converted to float32")
    from envs.factory import env_name_from_env_args

    ignored: list[str] = []
    try:
        file_env = env_name_from_env_args(info["env_args"], None if info["ours"] else used, where=str(path),
                                          ignored=ignored) if info["env_args"].get("env_name") else None
    except (ImportError, ValueError) as err:
        if task.get("env"):  # the user named the env: the file's env_args are not used
            note(f"{err}; using task.env={task.env} (not the file's env_args)")
            file_env = None
        elif isinstance(err, ImportError):
            raise UserError(f"{path} (its env_args name a robosuite env) needs robosuite: {err}") from err
        else:
            raise
    if ignored and not info["ours"]:
        note(f"{path}: env_args env_kwargs {ignored} are set by flowpolicy's env factory (rendering, camera "
             "observations, episode length: task.max_episode_steps), not taken from the file")
    if task.get("env"):
        env = parse_env_name(task.env).canonical
        if file_env and file_env.split("@")[0] != env.split("@")[0]:
            note(f"{path} was made for {file_env} (its env_args); using task.env={env}")
    elif file_env:
        env = file_env
    else:
        raise UserError(f"{path}: its data.attrs['env_args'] name no env; set task.env=<env name>")
    _check_dims(path, info, used, env, file_env)
    return TaskData(env, str(path), keys)


def _env_meta_for(env: str, what: str) -> dict[str, Any]:
    from envs.factory import env_meta

    try:
        return env_meta(env)
    except ImportError as err:
        raise UserError(f"{what} needs env {env}: {err}") from err


def _check_dims(path: Path, info: dict, keys: list[str], env: str, file_env: str | None) -> None:
    obs_dim = sum(info["obs_dims"][k] for k in keys)
    made = f" (the file's env_args name {file_env})" if file_env else ""
    meta = _env_meta_for(env, f"{path}{made}")
    for what, got, want in (("obs_dim", obs_dim, meta["obs_dim"]), ("act_dim", info["action_dim"], meta["act_dim"])):
        if int(got) != int(want):
            raise UserError(f"{path}: dataset {what}={got} (obs keys {keys}) but env {env} has {want}{made}; "
                            "choose the keys with task.obs_keys=[...] or the env with task.env=...")


def demos_for(cfg: DictConfig, data: TaskData | None = None) -> str:
    """The task's demo file: ``task.demos.path`` if given (validated), else collected/cached."""
    data = data or resolve_task(cfg)
    if data.dataset:
        return data.dataset
    d = cfg.task.demos
    return str(ensure_demos(data.env, num_demos=int(d.num), noise=d.get("noise"), seed=int(d.seed),
                            quality=d.get("quality", "expert"), data_dir=cfg.get("data_dir"),
                            expert_steps=int(d.get("expert_steps") or DEFAULT_EXPERT_STEPS),
                            min_expert_return=d.get("min_expert_return"), progress=bool(cfg.progress)))
