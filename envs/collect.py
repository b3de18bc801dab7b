"""Demonstration collectors: Meta-World and robosuite scripted experts, stable-baselines3 PPO experts.

``ensure_demos(name, num_demos, noise, seed)`` returns the cached demo file under ``data/demos/``
(collecting it first when missing); ``train.py`` calls it. CLI::

    python -m envs.collect metaworld/pick-place-v3 --num-demos 20 --noise 0.3
    python -m envs.collect robosuite/Lift --num-demos 20 --noise 0.3      # needs the robosuite extra
    python -m envs.collect Hopper-v5 --num-demos 20 --quality medium --expert-steps 700000

Meta-World: the task's scripted policy from ``metaworld.policies`` (it reads the raw 39-dim observation)
with Gaussian action noise (std ``noise``, actions clipped to [-1, 1]; the noisy action is the one executed
and recorded). An episode stops ``post_success_steps`` steps after the first successful step (so demos end
holding the goal briefly rather than wandering for the rest of the 500 steps); episodes that never succeed
are discarded (success filter).

robosuite (Lift, Can): the state machines of :mod:`envs.robosuite_experts` on the default low-dim observation,
with the same noise, early stop and success filter; failed attempts end at :data:`ROBOSUITE_COLLECT_STEPS`.
The file's ``env_args`` are robomimic's (``{"env_name": "Lift", "type": 1, "env_kwargs": {...}}``).

Locomotion: a PPO expert (8 envs) trained for a step budget, evaluated every ``eval_freq`` steps with a
checkpoint saved at each evaluation (PPO on Hopper is unstable late in training, so the final weights are
not trusted). ``quality="expert"`` rolls out the best evaluated checkpoint; ``"medium"`` the first one whose
evaluated return reaches ``medium_fraction`` of the best. Demos are whole episodes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from envs.factory import check_env_installed, env_meta, make_env, parse_env_name
from envs.hdf5 import DatasetError, Episode, env_args_for, read_demos, read_meta, write_demos

DEFAULT_NOISE = {"metaworld": 0.3, "locomotion": 0.0, "robosuite": 0.3}
# episode cap while collecting robosuite demos (the experts succeed in ~40-80 Lift / ~120-230 Can steps)
ROBOSUITE_COLLECT_STEPS = {"Lift": 150, "Can": 400}
DEFAULT_EXPERT_STEPS = 700_000
DEFAULT_MEDIUM_FRACTION = 1.0 / 3.0
# The least best-evaluated return that counts as "the PPO expert learned the task" (random policies score far
# below; SB3 PPO with default settings clears these within ~0.5-1M steps). Below it, no demos are made.
MIN_EXPERT_RETURN = {
    "Ant-v5": 500.0, "HalfCheetah-v5": 1000.0, "Hopper-v5": 1000.0, "Walker2d-v5": 1000.0, "Humanoid-v5": 600.0,
    "HumanoidStandup-v5": 60000.0, "InvertedDoublePendulum-v5": 5000.0, "InvertedPendulum-v5": 500.0,
    "Pusher-v5": -60.0, "Reacher-v5": -15.0, "Swimmer-v5": 30.0,
}


class ExpertError(ValueError):
    """The trained expert is too weak to make demonstrations from."""


class ScriptedDemoError(ValueError):
    """Too few of a scripted expert's episodes succeeded to make the demonstrations asked for."""


def _too_few(name: str, got: int, attempts: int, noise: float, wanted: int) -> ScriptedDemoError:
    return ScriptedDemoError(f"{name}: only {got} of {attempts} scripted episodes succeeded with noise {noise}; "
                             f"wanted {wanted}: lower the noise (--noise, or task.demos.noise in train.py)")


def check_expert(name: str, chosen: dict[str, Any], expert_steps: int, expert_dir: Path,
                 min_return: float | None = None) -> None:
    """Raise :class:`ExpertError` when the expert's best evaluated return is below ``min_return`` (default
    :data:`MIN_EXPERT_RETURN` for the env; no check for envs without a default)."""
    bar = MIN_EXPERT_RETURN.get(parse_env_name(name).canonical) if min_return is None else float(min_return)
    if bar is None or chosen["best_return"] >= bar:
        return
    raise ExpertError(
        f"the PPO expert for {name} did not learn: best evaluated return {chosen['best_return']:.1f} after "
        f"{expert_steps} steps, below {bar:g} ({expert_dir / 'evals.json'}); no demos were made. Train longer "
        f"(task.demos.expert_steps=..., or --expert-steps), lower the bar (task.demos.min_expert_return=...), or "
        f"give your own demos (task.demos.path=FILE)")


def default_data_dir() -> Path:
    """``$FLOWPOLICY_DATA_DIR`` if set, else ``data/`` at the repository root (gitignored)."""
    env_dir = os.environ.get("FLOWPOLICY_DATA_DIR")
    return Path(env_dir) if env_dir else Path(__file__).resolve().parents[1] / "data"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("gymnasium", "mujoco", "metaworld", "robosuite", "stable-baselines3", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _summary(episodes: list[Episode]) -> dict[str, Any]:
    returns = np.array([ep.episode_return for ep in episodes])
    lengths = np.array([len(ep) for ep in episodes])
    return {
        "num_demos": len(episodes),
        "num_steps": int(lengths.sum()),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "length_mean": float(lengths.mean()),
    }


def _rollout(
    env, act: Callable[[np.ndarray], np.ndarray], noise: float, rng: np.random.Generator,
    post_success_steps: int | None, on_reset: Callable[[], None] | None = None,
) -> Episode:
    """One episode with Gaussian action noise. ``post_success_steps=None``: run to the episode's end.
    ``on_reset`` is called after the env's reset (a stateful expert starts its episode)."""
    obs, _ = env.reset()
    if on_reset is not None:
        on_reset()
    observations, actions, rewards, next_observations = [], [], [], []
    success_step = None
    terminated = False
    while True:
        action = np.asarray(act(obs), dtype=np.float64)
        if noise > 0:
            action = action + noise * rng.standard_normal(action.shape)
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        next_obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
        next_observations.append(next_obs)
        obs = next_obs
        if info["success"] and success_step is None:
            success_step = len(actions) - 1
        if terminated or truncated:
            break
        if post_success_steps is not None and success_step is not None:
            if len(actions) - 1 - success_step >= post_success_steps:
                break
    return Episode(
        obs=np.stack(observations), actions=np.stack(actions), rewards=np.asarray(rewards),
        next_obs=np.stack(next_observations), success=success_step is not None, terminated=bool(terminated),
    )


def scripted_policy(task: str):
    """The Meta-World scripted expert for a v3 task name (e.g. ``SawyerPickPlaceV3Policy`` for
    ``pick-place-v3``); its ``get_action(obs)`` takes the raw flat observation, shape (39,)."""
    from metaworld.policies import ENV_POLICY_MAP

    if task not in ENV_POLICY_MAP:
        raise ValueError(f"no Meta-World scripted policy for {task!r}")
    return ENV_POLICY_MAP[task]()


def collect_metaworld_demos(
    name: str,
    num_demos: int,
    noise: float = DEFAULT_NOISE["metaworld"],
    seed: int = 0,
    max_episode_steps: int | None = None,
    post_success_steps: int = 5,
    max_attempts: int | None = None,
    progress: bool = True,
) -> tuple[list[Episode], dict[str, Any]]:
    """Collect ``num_demos`` successful scripted-expert demos; returns (episodes, meta for the file).

    Raises :class:`ScriptedDemoError` when fewer than ``num_demos`` of ``max_attempts`` (default
    3 * num_demos + 10)
    episodes succeed.
    """
    parsed = parse_env_name(name)
    if parsed.family != "metaworld":
        raise ValueError(f"{name!r} is not a Meta-World task")
    policy = scripted_policy(parsed.task)
    env = make_env(name, seed=seed, max_episode_steps=max_episode_steps)
    rng = np.random.default_rng(seed)
    max_attempts = max_attempts or 3 * num_demos + 10
    episodes: list[Episode] = []
    attempts = 0
    start = time.perf_counter()
    with warnings.catch_warnings(), tqdm(total=num_demos, desc=f"demos {parsed.canonical}", disable=not progress) as bar:
        # The scripted policies warn when their P-gain saturates; the env clips actions anyway.
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
        while len(episodes) < num_demos and attempts < max_attempts:
            attempts += 1
            ep = _rollout(env, policy.get_action, noise, rng, post_success_steps)
            if ep.success:
                episodes.append(ep)
                bar.update(1)
    env.close()
    if len(episodes) < num_demos:
        raise _too_few(name, len(episodes), attempts, noise, num_demos)
    meta = {
        "expert": f"metaworld.policies.{type(policy).__name__}",
        "noise": noise, "seed": seed, "post_success_steps": post_success_steps,
        "attempts": attempts, "success_rate": len(episodes) / attempts,
        "collection_s": time.perf_counter() - start,
        **_summary(episodes),
    }
    return episodes, meta


def collect_robosuite_demos(
    name: str,
    num_demos: int,
    noise: float = DEFAULT_NOISE["robosuite"],
    seed: int = 0,
    max_episode_steps: int | None = None,
    post_success_steps: int = 5,
    max_attempts: int | None = None,
    progress: bool = True,
) -> tuple[list[Episode], dict[str, Any]]:
    """Collect ``num_demos`` successful scripted-expert demos on robosuite Lift or Can (the default
    observation keys); returns (episodes, meta for the file). Raises :class:`ScriptedDemoError` when fewer than
    ``num_demos`` of ``max_attempts`` (default 3 * num_demos + 10) episodes succeed."""
    from envs.robosuite_experts import expert_for

    parsed = parse_env_name(name)
    if parsed.family != "robosuite" or parsed.obs_keys:
        raise ValueError(f"{name!r} is not a robosuite task with the default observation keys")
    env = make_env(parsed.canonical, seed=seed,
                   max_episode_steps=max_episode_steps or ROBOSUITE_COLLECT_STEPS[parsed.task])
    env.reset(seed=seed)
    expert = expert_for(env)
    rng = np.random.default_rng(seed)
    max_attempts = max_attempts or 3 * num_demos + 10
    episodes: list[Episode] = []
    attempts = 0
    start = time.perf_counter()
    with tqdm(total=num_demos, desc=f"demos {parsed.canonical}", disable=not progress) as bar:
        while len(episodes) < num_demos and attempts < max_attempts:
            attempts += 1
            ep = _rollout(env, expert, noise, rng, post_success_steps, on_reset=expert.reset)
            if ep.success:
                episodes.append(ep)
                bar.update(1)
    env.close()
    if len(episodes) < num_demos:
        raise _too_few(name, len(episodes), attempts, noise, num_demos)
    meta = {
        "expert": f"envs.robosuite_experts.{type(expert).__name__}",
        "noise": noise, "seed": seed, "post_success_steps": post_success_steps,
        "attempts": attempts, "success_rate": len(episodes) / attempts,
        "collection_s": time.perf_counter() - start,
        **_summary(episodes),
    }
    return episodes, meta


# ----------------------------------------------------------------------------- stable-baselines3 experts


def expert_dir_for(name: str, total_steps: int, seed: int, data_dir: str | os.PathLike | None = None) -> Path:
    """``data/experts/<env>_ppo_<steps>_seed<seed>/``."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    return root / "experts" / f"{parse_env_name(name).canonical.replace('/', '_')}_ppo_{total_steps}_seed{seed}"


def train_sb3_expert(
    name: str,
    total_steps: int = DEFAULT_EXPERT_STEPS,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    n_envs: int = 8,
    eval_freq: int = 25_000,
    n_eval_episodes: int = 5,
    ppo_kwargs: dict[str, Any] | None = None,
    max_episode_steps: int | None = None,
    torch_threads: int = 1,
    progress: bool = True,
) -> Path:
    """Train a stable-baselines3 PPO expert; evaluate and checkpoint every ``eval_freq`` env steps.

    Writes ``ckpt_<step>.zip`` files and ``evals.json`` (``{"env", "seed", "total_steps", "complete",
    "evals": [{"step", "return_mean", "return_std", "checkpoint"}]}``) into ``out_dir`` (default
    :func:`expert_dir_for`) and returns it. ``ppo_kwargs`` override SB3's PPO defaults.
    """
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    out = Path(out_dir) if out_dir is not None else expert_dir_for(name, total_steps, seed)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"env": parse_env_name(name).canonical, "seed": seed, "total_steps": total_steps,
                              "n_envs": n_envs, "ppo_kwargs": ppo_kwargs or {}, "complete": False, "evals": []}
    train_env = DummyVecEnv([
        (lambda i=i: Monitor(make_env(name, seed=seed + i, max_episode_steps=max_episode_steps)))
        for i in range(n_envs)
    ])
    eval_env = Monitor(make_env(name, seed=seed + 10_000, max_episode_steps=max_episode_steps))

    def write_record() -> None:
        tmp = out / "evals.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out / "evals.json")

    class EvalCheckpoint(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next_eval = eval_freq

        def _evaluate(self) -> None:
            mean, std = evaluate_policy(self.model, eval_env, n_eval_episodes=n_eval_episodes, deterministic=True)
            path = out / f"ckpt_{self.num_timesteps}.zip"
            self.model.save(path)
            record["evals"].append({"step": int(self.num_timesteps), "return_mean": float(mean),
                                    "return_std": float(std), "checkpoint": path.name})
            write_record()
            bar.set_postfix(eval_return=f"{mean:.0f}")

        def _on_step(self) -> bool:
            bar.update(min(self.num_timesteps, total_steps) - bar.n)
            if self.num_timesteps >= self.next_eval:
                self.next_eval += eval_freq
                self._evaluate()
            return True

        def _on_training_end(self) -> None:
            if not record["evals"] or record["evals"][-1]["step"] != self.num_timesteps:
                self._evaluate()

    torch.manual_seed(seed)
    model = PPO("MlpPolicy", train_env, seed=seed, verbose=0, device="cpu", **(ppo_kwargs or {}))
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # A 64x64 MLP gains nothing from intra-op threads, and on a busy machine their spin-waiting slows
    # PPO by an order of magnitude.
    torch.set_num_threads(torch_threads)
    try:
        with tqdm(total=total_steps, desc=f"PPO expert {name}", disable=not progress, mininterval=2.0) as bar:
            model.learn(total_timesteps=total_steps, callback=EvalCheckpoint())
    finally:
        torch.set_num_threads(threads)
    record["complete"] = True
    record["train_s"] = time.perf_counter() - start
    write_record()
    train_env.close()
    eval_env.close()
    return out


def select_checkpoint(
    expert_dir: str | os.PathLike, quality: str = "expert", medium_fraction: float = DEFAULT_MEDIUM_FRACTION
) -> dict[str, Any]:
    """Pick a checkpoint from ``evals.json``: ``"expert"`` = best evaluated return; ``"medium"`` = first
    evaluation whose return reaches ``medium_fraction * best``. Returns the eval record plus ``path``."""
    expert_dir = Path(expert_dir)
    evals_path = expert_dir / "evals.json"
    if not evals_path.exists():
        raise FileNotFoundError(f"{evals_path}: no expert evaluations (train it with train_sb3_expert)")
    evals = json.loads(evals_path.read_text())["evals"]
    if not evals:
        raise ValueError(f"{evals_path}: no evaluations recorded")
    best = max(evals, key=lambda e: e["return_mean"])
    if quality == "expert":
        chosen = best
    elif quality == "medium":
        threshold = medium_fraction * best["return_mean"]
        chosen = next(e for e in evals if e["return_mean"] >= threshold)
    else:
        raise ValueError(f"quality must be 'expert' or 'medium', got {quality!r}")
    return {**chosen, "path": str(expert_dir / chosen["checkpoint"]), "best_return": best["return_mean"]}


def collect_sb3_demos(
    name: str,
    checkpoint: str | os.PathLike,
    num_demos: int,
    noise: float = DEFAULT_NOISE["locomotion"],
    seed: int = 0,
    max_episode_steps: int | None = None,
    progress: bool = True,
) -> tuple[list[Episode], dict[str, Any]]:
    """Roll out a saved SB3 PPO policy (deterministic actions plus Gaussian noise ``noise``, clipped to
    [-1, 1]) for ``num_demos`` whole episodes; returns (episodes, meta for the file)."""
    from stable_baselines3 import PPO

    model = PPO.load(checkpoint, device="cpu")
    env = make_env(name, seed=seed, max_episode_steps=max_episode_steps)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    episodes = [
        _rollout(env, lambda o: model.predict(o, deterministic=True)[0], noise, rng, post_success_steps=None)
        for _ in tqdm(range(num_demos), desc=f"demos {name}", disable=not progress)
    ]
    env.close()
    meta = {"expert": f"stable_baselines3.PPO:{Path(checkpoint).name}", "noise": noise, "seed": seed,
            "success_rate": None, "collection_s": time.perf_counter() - start, **_summary(episodes)}
    return episodes, meta


# ----------------------------------------------------------------------------- cached datasets


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_collect_settings(
    num_demos: Any, noise: Any = None, seed: Any = 0, quality: Any = "expert", expert_steps: Any = DEFAULT_EXPERT_STEPS,
    medium_fraction: Any = DEFAULT_MEDIUM_FRACTION, max_episode_steps: Any = None, min_expert_return: Any = None,
    names: dict[str, str] | None = None,
) -> None:
    """A ValueError naming the first bad setting of :func:`ensure_demos` (as ``names`` calls it: a CLI option or a
    config key; else the parameter's name), raised before any env is built or expert trained. A ValueError from
    this module's own checks is a user error (:func:`agents.errors.is_user_error`): one line, exit 2."""
    checks = (
        ("num_demos", num_demos, _is_int(num_demos) and num_demos >= 1, "an integer >= 1"),
        ("noise", noise, noise is None or (_is_real(noise) and noise >= 0), "a number >= 0 (the action noise std)"),
        ("seed", seed, _is_int(seed) and seed >= 0, "an integer >= 0"),
        ("quality", quality, quality in ("expert", "medium"), "'expert' or 'medium'"),
        ("expert_steps", expert_steps, _is_int(expert_steps) and expert_steps >= 1, "an integer >= 1"),
        ("medium_fraction", medium_fraction, _is_real(medium_fraction) and 0 < medium_fraction <= 1,
         "in (0, 1] (a fraction of the best evaluated return)"),
        ("max_episode_steps", max_episode_steps, max_episode_steps is None
         or (_is_int(max_episode_steps) and max_episode_steps >= 1), "an integer >= 1"),
        ("min_expert_return", min_expert_return, min_expert_return is None or (
            isinstance(min_expert_return, numbers.Real) and not isinstance(min_expert_return, bool)
            and -math.inf <= min_expert_return < math.inf), "a number (-inf: accept any expert)"),
    )
    for key, value, ok, what in checks:
        if not ok:
            raise ValueError(f"{(names or {}).get(key, key)} must be {what}, got {value!r}")


def demo_path(
    name: str, num_demos: int, noise: float, seed: int, quality: str = "expert",
    expert_steps: int = DEFAULT_EXPERT_STEPS, data_dir: str | os.PathLike | None = None,
) -> Path:
    """Cache path of a demo file: ``data/demos/<env>[_ppo<steps>_<quality>]_n<N>_noise<noise>_seed<seed>.hdf5``."""
    parsed = parse_env_name(name)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    stem = parsed.canonical.replace("/", "_")
    if parsed.family == "locomotion":
        stem += f"_ppo{expert_steps}_{quality}"
    return root / "demos" / f"{stem}_n{num_demos}_noise{noise:g}_seed{seed}.hdf5"


def ensure_demos(
    task_name: str,
    num_demos: int = 20,
    noise: float | None = None,
    seed: int = 0,
    quality: str = "expert",
    data_dir: str | os.PathLike | None = None,
    expert_steps: int = DEFAULT_EXPERT_STEPS,
    medium_fraction: float = DEFAULT_MEDIUM_FRACTION,
    max_episode_steps: int | None = None,
    force: bool = False,
    retrain_expert: bool = False,
    progress: bool = True,
    expert_kwargs: dict[str, Any] | None = None,
    min_expert_return: float | None = None,
) -> Path:
    """Return the demo file for these settings, collecting it (and training an SB3 expert) when missing.

    ``noise`` defaults to 0.3 for Meta-World and robosuite, 0.0 for locomotion. An existing file is validated and
    returned; an invalid one raises :class:`envs.hdf5.DatasetError` (pass ``force=True`` to recollect). A
    locomotion expert is trained once per (env, steps, seed) and reused unless ``retrain_expert``.
    ``expert_kwargs`` go to :func:`train_sb3_expert` (e.g. ``n_envs``, ``eval_freq``, ``ppo_kwargs``).
    An expert whose best evaluated return is below ``min_expert_return`` (default: :data:`MIN_EXPERT_RETURN`)
    raises :class:`ExpertError` instead of making demos. Bad settings raise a ValueError before any work
    (:func:`check_collect_settings`).
    """
    parsed = parse_env_name(task_name)
    if parsed.family not in DEFAULT_NOISE:
        raise NotImplementedError(
            f"{task_name}: no demo collector for the {parsed.family} family; read a robomimic low-dim HDF5 "
            "file with envs.dataset.DemoDataset(path, obs_keys=[...]) instead"
        )
    check_collect_settings(num_demos, noise, seed, quality, expert_steps, medium_fraction, max_episode_steps,
                           min_expert_return)
    noise = DEFAULT_NOISE[parsed.family] if noise is None else float(noise)
    path = demo_path(task_name, num_demos, noise, seed, quality, expert_steps, data_dir)
    if path.exists() and not force:
        try:
            read_demos(path, demos=None)
        except DatasetError as err:
            raise DatasetError(f"{err}\n(cached demo file is invalid; rerun with force=True / --force)") from err
        return path
    meta_env = env_meta(parsed.canonical, max_episode_steps=max_episode_steps)
    if parsed.family in ("metaworld", "robosuite"):
        collect = collect_metaworld_demos if parsed.family == "metaworld" else collect_robosuite_demos
        episodes, meta = collect(
            parsed.canonical, num_demos, noise, seed, max_episode_steps=max_episode_steps, progress=progress
        )
    else:
        expert_dir = expert_dir_for(task_name, expert_steps, seed, data_dir)
        evals = expert_dir / "evals.json"
        if retrain_expert or not evals.exists() or not json.loads(evals.read_text()).get("complete"):
            train_sb3_expert(task_name, expert_steps, seed, expert_dir, progress=progress, **(expert_kwargs or {}))
        chosen = select_checkpoint(expert_dir, quality, medium_fraction)
        check_expert(task_name, chosen, expert_steps, expert_dir, min_expert_return)
        episodes, meta = collect_sb3_demos(
            parsed.canonical, chosen["path"], num_demos, noise, seed,
            max_episode_steps=max_episode_steps, progress=progress,
        )
        meta.update(quality=quality, medium_fraction=medium_fraction, expert_steps=expert_steps,
                    expert_checkpoint_step=chosen["step"], expert_eval_return=chosen["return_mean"],
                    expert_best_return=chosen["best_return"])
    meta.update(env=meta_env, created=datetime.datetime.now().isoformat(timespec="seconds"), versions=_versions())
    return write_demos(path, episodes, env_args_for(meta_env), meta=meta, split_seed=seed)


# the CLI's option for each setting of check_collect_settings
CLI_NAMES = {"num_demos": "--num-demos", "noise": "--noise", "seed": "--seed", "quality": "--quality",
             "expert_steps": "--expert-steps", "medium_fraction": "--medium-fraction",
             "max_episode_steps": "--max-episode-steps", "min_expert_return": "--min-expert-return"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own code), like the other user errors
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m envs.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="env name, e.g. metaworld/pick-place-v3, robosuite/Lift or Hopper-v5")
    p.add_argument("--num-demos", type=int, default=20)
    p.add_argument("--noise", type=float, default=None, help="Gaussian action noise std (default per family)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", choices=["expert", "medium"], default="expert", help="locomotion expert quality")
    p.add_argument("--medium-fraction", type=float, default=DEFAULT_MEDIUM_FRACTION)
    p.add_argument("--expert-steps", type=int, default=DEFAULT_EXPERT_STEPS, help="PPO expert training budget")
    p.add_argument("--min-expert-return", type=float, default=None,
                   help="least best return that counts as a learned expert (default per env)")
    p.add_argument("--max-episode-steps", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="default: $FLOWPOLICY_DATA_DIR or <repo>/data")
    p.add_argument("--force", action="store_true", help="recollect the demos even if cached")
    p.add_argument("--retrain-expert", action="store_true", help="retrain the PPO expert even if cached")
    return p.parse_args(argv)


def _collect(args: argparse.Namespace) -> Path:
    """Check every argument (and that the env's simulator is installed), then collect: bad input is refused
    before an expert is trained or an env built."""
    check_collect_settings(args.num_demos, args.noise, args.seed, args.quality, args.expert_steps,
                           args.medium_fraction, args.max_episode_steps, args.min_expert_return, names=CLI_NAMES)
    if args.data_dir is not None and Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is a file, not a folder")
    try:
        check_env_installed(args.name)  # an unknown name: a ValueError listing the families
    except ImportError as err:
        raise ValueError(f"{args.name}: {err}") from err
    return ensure_demos(
        args.name, args.num_demos, args.noise, args.seed, quality=args.quality, data_dir=args.data_dir,
        expert_steps=args.expert_steps, medium_fraction=args.medium_fraction,
        max_episode_steps=args.max_episode_steps, force=args.force, retrain_expert=args.retrain_expert,
        min_expert_return=args.min_expert_return,
    )


def main(argv: list[str] | None = None) -> None:
    """The CLI. A user error (bad argument, unknown env, missing robosuite, bad cached file, weak expert) prints
    one line ``error: ...`` and exits 2, as train.py does; ``HYDRA_FULL_ERROR=1`` shows the traceback."""
    args = _parse_args(argv)
    try:
        path = _collect(args)
    except Exception as err:
        from agents.errors import EXIT_USER_ERROR, full_traceback_wanted, is_user_error, one_line

        if full_traceback_wanted() or not is_user_error(err):
            raise
        print(one_line(err), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    meta = read_meta(path)
    keys = ("num_demos", "num_steps", "return_mean", "return_std", "success_rate", "collection_s")
    print(path)
    print(json.dumps({k: meta.get(k) for k in keys}, indent=1))

if __name__ == "__main__":
    main()
