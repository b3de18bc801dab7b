"""Environment factory: one name -> one seeded Gymnasium env, for every supported family.

Names (see ``FAMILY_EXAMPLES``):

- gymnasium MuJoCo v5: ``Hopper-v5``, ``Walker2d-v5``, ``HalfCheetah-v5``, ``Ant-v5`` and every other
  gymnasium MuJoCo v5 env (``Swimmer-v5``, ``Reacher-v5``, ``InvertedPendulum-v5``, ...), family "locomotion";
- Meta-World v3 single tasks: ``metaworld/<task>-v3`` (alias ``mw/<task>-v3``), e.g. ``metaworld/pick-place-v3``;
- robosuite tasks (optional extra ``pip install -e ".[robosuite]"``): ``robosuite/Lift``, ``robosuite/Can``;
- any other registered gymnasium env: ``gym/<id>``, also ``gym/<module>:<id>`` (the module is imported first
  and registers the id), e.g. an env of your own.

Envs with dict observations (robosuite, ``gym/`` envs with a ``Dict`` space) are flattened by concatenating
low-dim keys in sorted order, or in the order a name suffix states: ``robosuite/Lift@object,robot0_eef_pos``
(robomimic's key ``object`` is robosuite's ``object-state``). A demo file's keys and the env's keys then match.

Every env returned by :func:`make_env` has a float32 ``Box`` observation space, reports
``info["success"]`` as a Python ``bool`` on every step (always ``False`` for locomotion), and
uses its ``seed`` on the first ``reset()`` that is not given one (Gymnasium's convention that
``reset(seed=s)`` seeds the episode RNG is kept, also for Meta-World, which ignores it natively).

Shapes: with ``obs_horizon == 1`` and ``action_horizon == 1`` the spaces are the env's own flat
``(Do,)`` / ``(Da,)`` (what stable-baselines3 expects). ``obs_horizon = To > 1`` makes observations
``(To, Do)`` (:class:`envs.wrappers.ObservationHistory`); ``action_horizon = Ta > 1`` makes actions
``(Ta, Da)`` chunks executed step by step (:class:`envs.wrappers.ActionChunk`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from envs.wrappers import ActionChunk, ObservationHistory, SuccessInfo

LOCOMOTION_TASKS = ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Ant-v5")
# every gymnasium MuJoCo v5 env (family "locomotion": no success signal)
MUJOCO_TASKS = ("Ant-v5", "HalfCheetah-v5", "Hopper-v5", "Humanoid-v5", "HumanoidStandup-v5",
                "InvertedDoublePendulum-v5", "InvertedPendulum-v5", "Pusher-v5", "Reacher-v5", "Swimmer-v5",
                "Walker2d-v5")
ROBOSUITE_TASKS = ("Lift", "Can")
# robosuite's own environment class for each of our task names ("Can" is robomimic's name for PickPlaceCan).
_ROBOSUITE_ENV_NAMES = {"Lift": "Lift", "Can": "PickPlaceCan"}
FAMILY_EXAMPLES = {
    "locomotion": list(LOCOMOTION_TASKS),
    "metaworld": ["metaworld/pick-place-v3", "mw/reach-v3", "metaworld/<any Meta-World v3 task>"],
    "robosuite": [f"robosuite/{t}" for t in ROBOSUITE_TASKS],
    "gym": ["gym/<gymnasium id>", "gym/<module>:<id>"],
}
METAWORLD_DEFAULT_MAX_STEPS = 500
ROBOSUITE_DEFAULT_MAX_STEPS = 500
# Meta-World's MT1 benchmark draws its 50 object/goal placements from numpy's global RNG seeded with this
# value. It is fixed (not the episode seed) so that demos, training and evaluation share one task set.
METAWORLD_TASK_SEED = 0
ROBOSUITE_INSTALL_HINT = 'robosuite is not installed; install the optional extra: pip install -e ".[robosuite]"'


@dataclass(frozen=True)
class EnvName:
    """A parsed environment name: ``family`` in FAMILY_EXAMPLES, ``task`` the family's own task id."""

    family: str
    task: str
    obs_keys: tuple[str, ...] | None = None

    @property
    def canonical(self) -> str:
        """The name written to datasets and checkpoints (``mw/`` is spelled ``metaworld/``)."""
        base = self.task if self.family == "locomotion" else f"{self.family}/{self.task}"
        return base + ("@" + ",".join(self.obs_keys) if self.obs_keys else "")


def _unknown_name_error(name: str, detail: str = "") -> ValueError:
    families = "; ".join(f"{fam}: {', '.join(ex)}" for fam, ex in FAMILY_EXAMPLES.items())
    return ValueError(f"unknown environment name {name!r}{detail}. Known families and examples -- {families}")


def parse_env_name(name: str) -> EnvName:
    """Split ``name`` into family and task, raising a ValueError listing the families for unknown names."""
    name = str(name)
    if "@" in name:
        base, _, keys = name.partition("@")
        parsed = parse_env_name(base)
        obs_keys = tuple(k.strip() for k in keys.split(",") if k.strip())
        if not obs_keys:
            raise _unknown_name_error(name, " (no observation keys after '@')")
        if parsed.family not in ("robosuite", "gym"):
            raise _unknown_name_error(name, f" (observation keys '@...' apply to envs with dict observations, "
                                            f"not to {parsed.family} envs)")
        return EnvName(parsed.family, parsed.task, obs_keys)
    if name in LOCOMOTION_TASKS or name in MUJOCO_TASKS:
        return EnvName("locomotion", name)
    prefix, sep, task = name.partition("/")
    if sep and prefix == "gym":
        if not task:
            raise _unknown_name_error(name, " (give a gymnasium id after 'gym/')")
        return EnvName("gym", task)
    if sep and prefix in ("metaworld", "mw"):
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        if task not in ALL_V3_ENVIRONMENTS:
            close = [t for t in ALL_V3_ENVIRONMENTS if task.split("-v")[0] in t][:5]
            raise _unknown_name_error(name, f" (no Meta-World v3 task {task!r}; similar: {close})")
        return EnvName("metaworld", task)
    if sep and prefix == "robosuite":
        if task not in ROBOSUITE_TASKS:
            raise _unknown_name_error(name, f" (robosuite tasks: {list(ROBOSUITE_TASKS)})")
        return EnvName("robosuite", task)
    raise _unknown_name_error(name)


class _SeedOnFirstReset(gym.Wrapper):
    """Uses ``seed`` for the first ``reset()`` called without one."""

    def __init__(self, env: gym.Env, seed: int | None):
        super().__init__(env)
        self._pending_seed = seed

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


class _Float32Observation(gym.ObservationWrapper):
    """Casts flat Box observations to float32 (MuJoCo envs return float64)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Box(
            low=space.low.astype(np.float32), high=space.high.astype(np.float32), dtype=np.float32
        )

    def observation(self, observation):
        return np.asarray(observation, dtype=np.float32)


class _MetaWorldTask(gym.Wrapper):
    """Chooses a Meta-World task (object and goal placement) at each reset, from the episode RNG.

    Meta-World's ``reset`` ignores its ``seed`` argument and places objects from a frozen task vector set
    by ``set_task``; this wrapper maps Gymnasium seeding onto it: ``reset(seed=s)`` reseeds the env's RNG
    (``env.seed(s)``) and the placement is drawn from the seeded MT1 task list (or fixed by ``task_index``).
    """

    def __init__(self, env: gym.Env, tasks: list, task_index: int | None):
        super().__init__(env)
        if task_index is not None and not 0 <= task_index < len(tasks):
            raise ValueError(f"task_index must be in [0, {len(tasks)}), got {task_index}")
        self._tasks = tasks
        self._task_index = task_index
        self.current_task_index: int | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        base = self.env.unwrapped
        if seed is not None:
            base.seed(seed)
        if self._task_index is None:
            index = int(base.np_random.integers(len(self._tasks)))
        else:
            index = self._task_index
        base.set_task(self._tasks[index])
        self.current_task_index = index
        obs, info = self.env.reset(options=options)
        info["task_index"] = index
        return obs, info


class _FlipRender(gym.Wrapper):
    """Flips rendered frames vertically: Meta-World's cameras render upside down under MuJoCo 3."""

    def render(self):
        frame = self.env.render()
        return None if frame is None else np.ascontiguousarray(frame[::-1])


class _FlattenDict(gym.ObservationWrapper):
    """Concatenates the low-dim entries of a ``Dict`` observation in ``keys`` order (default: sorted)."""

    def __init__(self, env: gym.Env, keys: tuple[str, ...] | None):
        super().__init__(env)
        space = env.observation_space
        low_dim = sorted(k for k, v in space.spaces.items() if isinstance(v, gym.spaces.Box) and len(v.shape) <= 1)
        keys = tuple(keys) if keys else tuple(low_dim)
        missing = [k for k in keys if k not in low_dim]
        if missing:
            raise ValueError(f"observation keys {missing} are not low-dim keys of this env (it has {low_dim})")
        self.keys = keys
        lows = [np.broadcast_to(space[k].low, space[k].shape or (1,)).reshape(-1) for k in keys]
        highs = [np.broadcast_to(space[k].high, space[k].shape or (1,)).reshape(-1) for k in keys]
        self.observation_space = gym.spaces.Box(np.concatenate(lows).astype(np.float32),
                                                np.concatenate(highs).astype(np.float32), dtype=np.float32)

    def observation(self, observation):
        return np.concatenate([np.asarray(observation[k], np.float32).reshape(-1) for k in self.keys])


class _IsSuccess(gym.Wrapper):
    """Maps gymnasium-robotics' ``info["is_success"]`` onto ``info["success"]``."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if "success" not in info and "is_success" in info:
            info["success"] = bool(info["is_success"])
        return obs, reward, terminated, truncated, info


def _make_gym(task: str, render_mode: str | None, max_episode_steps: int | None,
              obs_keys: tuple[str, ...] | None = None, render_size: tuple[int, int] | None = None, **kwargs: Any):
    try:
        env = gym.make(task, render_mode=render_mode, max_episode_steps=max_episode_steps, **kwargs)
    except (gym.error.Error, ModuleNotFoundError, ImportError) as err:
        raise ValueError(f"gym/{task}: gymnasium cannot make this env ({err}); give a registered id, or "
                         "gym/<module>:<id> with a module that registers it") from err
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = _FlattenDict(env, obs_keys)
    elif obs_keys:
        raise ValueError(f"gym/{task}: observation keys {list(obs_keys)} given, but its observations are not a dict")
    return SuccessInfo(_IsSuccess(env))


def _make_locomotion(task: str, render_mode: str | None, max_episode_steps: int | None, **kwargs: Any):
    width, height = kwargs.pop("render_size", (256, 256))
    render_kwargs = {"width": width, "height": height} if render_mode is not None else {}
    env = gym.make(task, render_mode=render_mode, max_episode_steps=max_episode_steps, **render_kwargs, **kwargs)
    return SuccessInfo(env)


@functools.cache
def _metaworld_tasks(task: str) -> tuple[type, tuple]:
    """(env class, MT1's 50 seeded tasks); cached because MT1 builds and resets an env 50 times (~0.4 s)."""
    import metaworld

    benchmark = metaworld.MT1(task, seed=METAWORLD_TASK_SEED)
    return benchmark.train_classes[task], tuple(benchmark.train_tasks)


def _make_metaworld(
    task: str,
    render_mode: str | None,
    max_episode_steps: int | None,
    task_index: int | None = None,
    terminate_on_success: bool = False,
    render_size: tuple[int, int] = (256, 256),
    camera_name: str = "corner",
    success_reward: float | None = None,
):
    env_cls, tasks = _metaworld_tasks(task)
    width, height = render_size
    kwargs = {"render_mode": render_mode, "width": width, "height": height}
    if render_mode is not None:
        kwargs["camera_name"] = camera_name
    base = env_cls(**kwargs)
    # Meta-World's step() raises once curr_path_length reaches max_path_length and reports truncated=True at
    # that step; align its counter with the TimeLimit so both end the episode at the same step.
    steps = max_episode_steps or METAWORLD_DEFAULT_MAX_STEPS
    base.max_path_length = steps
    env = gym.wrappers.TimeLimit(base, steps)
    env = _MetaWorldTask(env, list(tasks), task_index)
    if render_mode is not None:
        env = _FlipRender(env)
    return SuccessInfo(env, terminate_on_success=terminate_on_success, success_reward=success_reward)


def _make_robosuite(
    task: str,
    render_mode: str | None,
    max_episode_steps: int | None,
    robots: str = "Panda",
    terminate_on_success: bool = False,
    render_size: tuple[int, int] = (256, 256),
    camera_name: str = "agentview",
    obs_keys: tuple[str, ...] | None = None,
    success_reward: float | None = None,
    **kwargs: Any,
):
    try:
        import robosuite
        from robosuite.wrappers import GymWrapper
    except ImportError as err:
        raise ImportError(ROBOSUITE_INSTALL_HINT) from err
    width, height = render_size
    steps = max_episode_steps or ROBOSUITE_DEFAULT_MAX_STEPS
    rs_env = robosuite.make(
        _ROBOSUITE_ENV_NAMES[task],
        robots=robots,
        has_renderer=False,
        has_offscreen_renderer=render_mode is not None,
        use_camera_obs=False,
        reward_shaping=True,
        control_freq=20,
        horizon=steps,
        ignore_done=True,  # robosuite's only "done" is its horizon: a time limit, left to the TimeLimit below
        render_camera=camera_name,
        camera_names=camera_name,
        camera_widths=width,
        camera_heights=height,
        **kwargs,
    )
    # robomimic names robosuite's "object-state" key "object"
    keys = [("object-state" if k == "object" else k) for k in obs_keys] if obs_keys else None
    env = _RobosuiteGym(GymWrapper(rs_env, keys=keys), rs_env, render_mode, camera_name, width, height)
    env = gym.wrappers.TimeLimit(env, steps)
    return SuccessInfo(env, success_fn=rs_env._check_success, terminate_on_success=terminate_on_success,
                       success_reward=success_reward)


class _RobosuiteGym(gym.Wrapper):
    """Adds Gymnasium seeding and ``render_mode="rgb_array"`` rendering to robosuite's GymWrapper.

    robosuite draws object placements from ``env.rng`` (a Generator created once, and shared by reference
    with its placement samplers) and robot init noise from numpy's global RNG, which GymWrapper seeds;
    ``reset(seed=s)`` reseeds both.
    """

    def __init__(self, env: gym.Env, rs_env: Any, render_mode: str | None, camera: str, width: int, height: int):
        super().__init__(env)
        self._rs_env = rs_env
        self._render_mode = render_mode
        self._camera, self._width, self._height = camera, width, height

    @property
    def render_mode(self) -> str | None:
        return self._render_mode

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            # Reseed in place: the samplers hold a reference to this Generator object.
            self._rs_env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        return self.env.reset(seed=seed, options=options)

    def render(self):
        if self._render_mode != "rgb_array":
            return None
        frame = self._rs_env.sim.render(camera_name=self._camera, width=self._width, height=self._height)
        return frame[::-1]  # robosuite's offscreen images are upside down (OpenGL origin).


def make_env(
    name: str,
    seed: int | None = None,
    render_mode: str | None = None,
    obs_horizon: int = 1,
    action_horizon: int = 1,
    max_episode_steps: int | None = None,
    **task_kwargs: Any,
) -> gym.Env:
    """Build one environment.

    Args:
        name: environment name (see module docstring); unknown names raise ValueError.
        seed: used by the first ``reset()`` that is called without a seed, and for the action space.
        render_mode: ``None`` or ``"rgb_array"`` (frames of ``render_size``, default (256, 256)).
        obs_horizon: To; > 1 gives observations of shape (To, Do), padded at reset with the first obs.
        action_horizon: Ta; > 1 gives actions of shape (Ta, Da), executed until the chunk or episode ends.
        max_episode_steps: episode length in env steps (default: 1000 locomotion, 500 Meta-World/robosuite).
        task_kwargs: family options. Meta-World: ``task_index`` (None: draw one of MT1's 50 seeded
            placements each reset from the episode RNG; int: always that one), ``terminate_on_success``,
            ``success_reward`` (a sparse reward: this value on a successful step, else 0), ``render_size``,
            ``camera_name``. Locomotion: any ``gym.make`` keyword. robosuite: ``robots``,
            ``terminate_on_success``, ``success_reward``, ``render_size``, ``camera_name`` and
            ``robosuite.make`` keywords.

    Returns:
        A Gymnasium env with float32 observations and a bool ``info["success"]``.
    """
    if obs_horizon < 1 or action_horizon < 1:
        raise ValueError(f"obs_horizon and action_horizon must be >= 1, got {obs_horizon}, {action_horizon}")
    if render_mode not in (None, "rgb_array"):
        raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
    parsed = parse_env_name(name)
    builders = {"locomotion": _make_locomotion, "metaworld": _make_metaworld, "robosuite": _make_robosuite,
                "gym": _make_gym}
    if parsed.obs_keys:
        task_kwargs["obs_keys"] = parsed.obs_keys
    env = builders[parsed.family](parsed.task, render_mode, max_episode_steps, **task_kwargs)
    env = _Float32Observation(env)
    env = _SeedOnFirstReset(env, seed)
    if obs_horizon > 1:
        env = ObservationHistory(env, obs_horizon)
    if action_horizon > 1:
        env = ActionChunk(env, action_horizon)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def make_vec_env(
    name: str,
    num_envs: int,
    seed: int | None = None,
    asynchronous: bool = False,
    obs_horizon: int = 1,
    action_horizon: int = 1,
    max_episode_steps: int | None = None,
    render_mode: str | None = None,
    **task_kwargs: Any,
) -> gym.vector.VectorEnv:
    """Gymnasium's own ``SyncVectorEnv`` / ``AsyncVectorEnv`` of :func:`make_env` copies; env i uses seed + i.

    Autoreset follows Gymnasium's default (next-step): the step after an episode ends resets that env.
    ``AsyncVectorEnv`` starts worker processes: call it under ``if __name__ == "__main__":`` in scripts.
    Observations are batched to (num_envs, Do) or (num_envs, To, Do); actions (num_envs, Da) or
    (num_envs, Ta, Da).
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    parse_env_name(name)  # fail here, not inside a worker process
    fns = [
        functools.partial(
            make_env,
            name,
            seed=None if seed is None else seed + i,
            render_mode=render_mode,
            obs_horizon=obs_horizon,
            action_horizon=action_horizon,
            max_episode_steps=max_episode_steps,
            **task_kwargs,
        )
        for i in range(num_envs)
    ]
    if asynchronous:  # a dead or frozen worker is an error within a timeout, not a hang
        from .async_guard import GuardedAsyncVectorEnv

        return GuardedAsyncVectorEnv(fns)
    return gym.vector.SyncVectorEnv(fns)


def env_meta(name: str, max_episode_steps: int | None = None, **task_kwargs: Any) -> dict[str, Any]:
    """JSON-serializable facts about an env, stored in dataset attrs and checkpoints.

    Returns:
        ``{"name", "family", "task", "obs_dim", "act_dim", "max_episode_steps", "has_success", ...}``,
        with ``metaworld_task_seed`` for Meta-World. Dims are of the flat per-step spaces.
    """
    parsed = parse_env_name(name)
    env = make_env(name, max_episode_steps=max_episode_steps, **task_kwargs)
    try:
        meta: dict[str, Any] = {
            "name": parsed.canonical,
            "family": parsed.family,
            "task": parsed.task,
            "obs_dim": int(np.prod(env.observation_space.shape)),
            "act_dim": int(np.prod(env.action_space.shape)),
            "max_episode_steps": _max_episode_steps(env),
            "has_success": parsed.family in ("metaworld", "robosuite"),
        }
        if parsed.family == "gym":  # a gym env has success when its step info reports one
            env.reset(seed=0)
            meta["has_success"] = "success" in _base_info(env)
    finally:
        env.close()
    if parsed.family == "metaworld":
        meta["metaworld_task_seed"] = METAWORLD_TASK_SEED
    task_kwargs.pop("obs_keys", None)
    if task_kwargs:
        meta["task_kwargs"] = {k: _jsonable(v) for k, v in task_kwargs.items()}
    return meta


def _base_info(env: gym.Env) -> dict:
    """The info of one random step of ``env`` as the base env reports it (before SuccessInfo fills in False)."""
    inner = env
    while isinstance(inner, gym.Wrapper) and not isinstance(inner, SuccessInfo):
        inner = inner.env
    inner = inner.env if isinstance(inner, SuccessInfo) else inner
    return inner.step(inner.action_space.sample())[4]


def env_name_from_env_args(env_args: dict[str, Any], obs_keys=None, where: str = "") -> str:
    """Our env name for a robomimic ``env_args`` (``{"env_name", "type", "env_kwargs"}``): robosuite (type 1)
    ``Lift``/``PickPlaceCan`` -> ``robosuite/Lift``/``robosuite/Can``; gym (type 2) names we know (``Hopper-v5``,
    ``metaworld/...``) as they are, other gymnasium ids as ``gym/<id>``. ``obs_keys`` are appended for envs with
    dict observations (``@k1,k2``) so the env flattens them in the dataset's order."""
    if not env_args or "env_name" not in env_args:
        raise ValueError(f"{where}: data.attrs['env_args'] has no env_name; name the env with task.env=<name>")
    raw, kind = str(env_args["env_name"]), env_args.get("type")
    keys = list(obs_keys or [])
    if kind == 1 or raw in _ROBOSUITE_ENV_NAMES.values():
        task = {v: k for k, v in _ROBOSUITE_ENV_NAMES.items()}.get(raw, raw)
        if task not in ROBOSUITE_TASKS:
            raise ValueError(f"{where}: env_args name the robosuite env {raw!r}; supported: "
                             f"{sorted(_ROBOSUITE_ENV_NAMES.values())}")
        return f"robosuite/{task}" + ("@" + ",".join(keys) if keys else "")
    if kind not in (None, 2):
        raise ValueError(f"{where}: env_args type {kind} (env {raw!r}) is not supported; robosuite (1) and "
                         "gym (2) are")
    try:
        parsed = parse_env_name(raw)
    except ValueError:
        parsed = EnvName("gym", raw)
    if parsed.family == "gym" and keys and keys != ["flat"]:
        return parsed.canonical + "@" + ",".join(keys)
    return parsed.canonical


def _max_episode_steps(env: gym.Env) -> int | None:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return int(env._max_episode_steps)
        env = env.env
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
