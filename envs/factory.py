"""Environment factory: one name -> one seeded Gymnasium env, for every supported family.

Names (see ``FAMILY_EXAMPLES``):

- gymnasium MuJoCo locomotion: ``Hopper-v5``, ``Walker2d-v5``, ``HalfCheetah-v5``, ``Ant-v5``;
- Meta-World v3 single tasks: ``metaworld/<task>-v3`` (alias ``mw/<task>-v3``), e.g. ``metaworld/pick-place-v3``;
- robosuite tasks (optional extra ``pip install -e ".[robosuite]"``): ``robosuite/Lift``, ``robosuite/Can``.

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
ROBOSUITE_TASKS = ("Lift", "Can")
# robosuite's own environment class for each of our task names ("Can" is robomimic's name for PickPlaceCan).
_ROBOSUITE_ENV_NAMES = {"Lift": "Lift", "Can": "PickPlaceCan"}
FAMILY_EXAMPLES = {
    "locomotion": list(LOCOMOTION_TASKS),
    "metaworld": ["metaworld/pick-place-v3", "mw/reach-v3", "metaworld/<any Meta-World v3 task>"],
    "robosuite": [f"robosuite/{t}" for t in ROBOSUITE_TASKS],
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

    @property
    def canonical(self) -> str:
        """The name written to datasets and checkpoints (``mw/`` is spelled ``metaworld/``)."""
        return self.task if self.family == "locomotion" else f"{self.family}/{self.task}"


def _unknown_name_error(name: str, detail: str = "") -> ValueError:
    families = "; ".join(f"{fam}: {', '.join(ex)}" for fam, ex in FAMILY_EXAMPLES.items())
    return ValueError(f"unknown environment name {name!r}{detail}. Known families and examples -- {families}")


def parse_env_name(name: str) -> EnvName:
    """Split ``name`` into family and task, raising a ValueError listing the families for unknown names."""
    if name in LOCOMOTION_TASKS:
        return EnvName("locomotion", name)
    prefix, sep, task = name.partition("/")
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
    return SuccessInfo(env, terminate_on_success=terminate_on_success)


def _make_robosuite(
    task: str,
    render_mode: str | None,
    max_episode_steps: int | None,
    robots: str = "Panda",
    terminate_on_success: bool = False,
    render_size: tuple[int, int] = (256, 256),
    camera_name: str = "agentview",
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
    env = _RobosuiteGym(GymWrapper(rs_env), rs_env, render_mode, camera_name, width, height)
    env = gym.wrappers.TimeLimit(env, steps)
    return SuccessInfo(env, success_fn=rs_env._check_success, terminate_on_success=terminate_on_success)


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
            ``render_size``, ``camera_name``. Locomotion: any ``gym.make`` keyword. robosuite: ``robots``,
            ``terminate_on_success``, ``render_size``, ``camera_name`` and ``robosuite.make`` keywords.

    Returns:
        A Gymnasium env with float32 observations and a bool ``info["success"]``.
    """
    if obs_horizon < 1 or action_horizon < 1:
        raise ValueError(f"obs_horizon and action_horizon must be >= 1, got {obs_horizon}, {action_horizon}")
    if render_mode not in (None, "rgb_array"):
        raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
    parsed = parse_env_name(name)
    builders = {"locomotion": _make_locomotion, "metaworld": _make_metaworld, "robosuite": _make_robosuite}
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
    if asynchronous:
        return gym.vector.AsyncVectorEnv(fns)
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
            "has_success": parsed.family != "locomotion",
        }
    finally:
        env.close()
    if parsed.family == "metaworld":
        meta["metaworld_task_seed"] = METAWORLD_TASK_SEED
    if task_kwargs:
        meta["task_kwargs"] = {k: _jsonable(v) for k, v in task_kwargs.items()}
    return meta


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
