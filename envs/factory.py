"""Environment factory: one name -> one seeded Gymnasium env, for every supported family.

Names (see ``FAMILY_EXAMPLES``):

- gymnasium MuJoCo v5: ``Hopper-v5``, ``Walker2d-v5``, ``HalfCheetah-v5``, ``Ant-v5`` and every other
  gymnasium MuJoCo v5 env (``Swimmer-v5``, ``Reacher-v5``, ``InvertedPendulum-v5``, ...), family "locomotion";
- Meta-World v3 single tasks: ``metaworld/<task>-v3`` (alias ``mw/<task>-v3``), e.g. ``metaworld/pick-place-v3``;
- robosuite tasks (optional extra ``pip install -e ".[robosuite]"``): ``robosuite/Lift``, ``robosuite/Can``;
  ``robosuite.make`` keywords other than the factory's defaults ride in the name as compact JSON after the task,
  ``robosuite/Lift{"reward_shaping":false}`` (a robomimic file's ``env_args["env_kwargs"]``, see
  :func:`env_name_from_env_args`), so a checkpoint's env name rebuilds the same env everywhere;
- any other registered gymnasium env: ``gym/<id>``, also ``gym/<module>:<id>`` (the module is imported first
  and registers the id), e.g. an env of your own.

Envs with dict observations (robosuite, ``gym/`` envs with a ``Dict`` space) are flattened by concatenating
low-dim keys in sorted order, or in the order a name suffix states: ``robosuite/Lift@object,robot0_eef_pos``
(robomimic's key ``object`` is robosuite's ``object-state``). A demo file's keys and the env's keys then match.
robosuite's default keys are robomimic's low-dim set, :data:`ROBOSUITE_DEFAULT_KEYS` (sorted).

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
import json
import warnings
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
# robomimic's low-dim observation of its robosuite datasets: a robosuite env's observation without '@keys'
ROBOSUITE_DEFAULT_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
# robosuite.make settings of the factory; a name's JSON kwargs override them (``robosuite/Lift{"robots":"Sawyer"}``)
ROBOSUITE_DEFAULT_KWARGS = {"robots": "Panda", "reward_shaping": True, "control_freq": 20}
# robosuite.make keywords the factory sets itself (rendering, low-dim observations, episode length: the
# TimeLimit's max_episode_steps); a file's env_kwargs may hold them (robomimic writes them), they are not used
ROBOSUITE_FACTORY_KEYS = frozenset({
    "has_renderer", "has_offscreen_renderer", "use_camera_obs", "use_object_obs", "render_camera", "camera_names",
    "camera_heights", "camera_widths", "camera_depths", "camera_segmentations", "renderer", "renderer_config",
    "render_gpu_device_id", "render_collision_mesh", "render_visual_mesh", "horizon", "ignore_done", "hard_reset",
    "max_episode_steps"})
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
    kwargs: str | None = None  # robosuite.make keywords as compact JSON with sorted keys (hashable)

    @property
    def canonical(self) -> str:
        """The name written to datasets and checkpoints (``mw/`` is spelled ``metaworld/``)."""
        base = self.task if self.family == "locomotion" else f"{self.family}/{self.task}"
        return base + (self.kwargs or "") + ("@" + ",".join(self.obs_keys) if self.obs_keys else "")

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """The keywords the name carries (``{}`` when none)."""
        return json.loads(self.kwargs) if self.kwargs else {}


def kwargs_json(kwargs: dict[str, Any]) -> str:
    """The compact, key-sorted JSON that :class:`EnvName` carries (``{"reward_shaping":false}``)."""
    return json.dumps(kwargs, sort_keys=True, separators=(",", ":"))


def env_base_name(name: str) -> str:
    """``name`` without its keywords and observation keys: ``robosuite/Lift{...}@object`` -> ``robosuite/Lift``."""
    return str(name).split("@")[0].split("{")[0]


def _unknown_name_error(name: str, detail: str = "") -> ValueError:
    families = "; ".join(f"{fam}: {', '.join(ex)}" for fam, ex in FAMILY_EXAMPLES.items())
    return ValueError(f"unknown environment name {name!r}{detail}. Known families and examples -- {families}")


def parse_env_name(name: str) -> EnvName:
    """Split ``name`` into family and task, raising a ValueError listing the families for unknown names."""
    name = str(name)
    if "{" in name:  # robosuite.make keywords: robosuite/<task>{json}[@keys]
        start = name.index("{")
        try:
            kwargs, end = json.JSONDecoder().raw_decode(name, start)
        except json.JSONDecodeError as err:
            raise _unknown_name_error(name, f" (the keywords after the task are not valid JSON: {err})") from err
        if not isinstance(kwargs, dict):
            raise _unknown_name_error(name, " (the keywords after the task must be a JSON object)")
        parsed = parse_env_name(name[:start] + name[end:])
        if parsed.family != "robosuite":
            raise _unknown_name_error(name, f" (keywords in the name apply to robosuite envs, not to {parsed.family})")
        return EnvName(parsed.family, parsed.task, parsed.obs_keys, kwargs_json(kwargs) if kwargs else None)
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


def check_env_installed(name: str) -> None:
    """Raise an ImportError with the install hint when ``name``'s family needs a package that is missing (robosuite,
    an optional extra), so callers can refuse before any work; it imports the package and builds no env."""
    if parse_env_name(name).family == "robosuite":
        try:
            import robosuite  # noqa: F401
        except ImportError as err:
            raise ImportError(ROBOSUITE_INSTALL_HINT) from err


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
    terminate_on_success: bool = False,
    render_size: tuple[int, int] = (256, 256),
    camera_name: str = "agentview",
    obs_keys: tuple[str, ...] | None = None,
    success_reward: float | None = None,
    **kwargs: Any,
):
    try:
        import robosuite
        from robosuite.utils.log_utils import ROBOSUITE_DEFAULT_LOGGER
        from robosuite.wrappers import GymWrapper
    except ImportError as err:
        raise ImportError(ROBOSUITE_INSTALL_HINT) from err
    ROBOSUITE_DEFAULT_LOGGER.setLevel("WARNING")  # not one "Loading controller configuration" line per env
    width, height = render_size
    steps = max_episode_steps or ROBOSUITE_DEFAULT_MAX_STEPS
    fixed = sorted(set(kwargs) & ROBOSUITE_FACTORY_KEYS)
    if fixed:
        raise ValueError(f"robosuite/{task}: {fixed} are set by the env factory (rendering, low-dim observations, "
                         "episode length: max_episode_steps); leave them out")
    make_kwargs = {**ROBOSUITE_DEFAULT_KWARGS, **kwargs}
    controller = make_kwargs.get("controller_configs")
    if isinstance(controller, dict) and "body_parts" not in controller:  # robosuite <= 1.4's format (robomimic's)
        from robosuite.controllers.composite.composite_controller_factory import (
            refactor_composite_controller_config,
        )

        robot = make_kwargs["robots"]
        robot = robot[0] if isinstance(robot, list | tuple) else robot
        make_kwargs["controller_configs"] = refactor_composite_controller_config(controller, robot, ["right"])
    rs_env = robosuite.make(
        _ROBOSUITE_ENV_NAMES[task],
        has_renderer=False,
        has_offscreen_renderer=render_mode is not None,
        use_camera_obs=False,
        horizon=steps,
        ignore_done=True,  # robosuite's only "done" is its horizon: a time limit, left to the TimeLimit below
        hard_reset=False,  # reset in place (True reloads the model from XML at every reset: ~5x slower episodes)
        render_camera=camera_name,
        camera_names=camera_name,
        camera_widths=width,
        camera_heights=height,
        **make_kwargs,
    )
    # robomimic names robosuite's "object-state" key "object"
    keys = [("object-state" if k == "object" else k) for k in (obs_keys or ROBOSUITE_DEFAULT_KEYS)]
    with warnings.catch_warnings():  # GymWrapper builds float32 Boxes from float64 bounds (gymnasium warns)
        warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")
        wrapped = GymWrapper(rs_env, keys=keys)
    env = _RobosuiteGym(wrapped, rs_env, render_mode, camera_name, width, height)
    env = gym.wrappers.TimeLimit(env, steps)
    return SuccessInfo(env, success_fn=rs_env._check_success, terminate_on_success=terminate_on_success,
                       success_reward=success_reward)


def robosuite_make_kwargs(task: str) -> set[str]:
    """The keywords ``robosuite.make`` accepts for one of our robosuite tasks: the parameters of its env class
    and of the base classes it passes ``**kwargs`` on to."""
    import inspect

    from robosuite.environments.base import REGISTERED_ENVS

    accepted: set[str] = set()
    for cls in REGISTERED_ENVS[_ROBOSUITE_ENV_NAMES[task]].__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters
        accepted |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return accepted


def robosuite_env_kwargs(task: str, env_kwargs: dict[str, Any] | None, where: str = "") -> tuple[dict, list[str]]:
    """The keywords of a robomimic file's ``env_kwargs`` that our robosuite env takes, and the ones it ignores.

    Keys the factory sets itself (:data:`ROBOSUITE_FACTORY_KEYS`: rendering, camera observations, episode
    length) are ignored and listed; values equal to the factory's defaults (``robots`` ``"Panda"`` or
    ``["Panda"]``, ``reward_shaping`` true, ``control_freq`` 20) are dropped, so files made by this project name
    the plain ``robosuite/<task>``. Any other key must be a keyword ``robosuite.make`` accepts for the task, else
    a ValueError names it. Needs robosuite (ImportError with the install hint otherwise)."""
    try:
        accepted = robosuite_make_kwargs(task)
    except ImportError as err:
        raise ImportError(ROBOSUITE_INSTALL_HINT) from err
    kept, ignored = {}, []
    for key, value in sorted((env_kwargs or {}).items()):
        if key in ROBOSUITE_FACTORY_KEYS:
            ignored.append(key)
            continue
        if key not in accepted:
            raise ValueError(f"{where}: env_args['env_kwargs'] has {key!r}, which robosuite.make("
                             f"{_ROBOSUITE_ENV_NAMES[task]!r}) does not accept (a file may set "
                             f"{sorted(accepted - ROBOSUITE_FACTORY_KEYS)}); "
                             "remove it from the file's env_args, or name the env with task.env=robosuite/"
                             f"{task}")
        default = ROBOSUITE_DEFAULT_KWARGS.get(key, object())
        if value == default or (key == "robots" and value == [default]):
            continue
        kept[key] = value
    return kept, ignored


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
        # robosuite's GymWrapper leaves metadata None; vector envs copy it
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": int(getattr(rs_env, "control_freq", 20))}
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
            ``camera_name``. Locomotion: any ``gym.make`` keyword. robosuite: ``terminate_on_success``,
            ``success_reward``, ``render_size``, ``camera_name`` and ``robosuite.make`` keywords (``robots``,
            ``reward_shaping``, ``controller_configs``, ...; also from the name, ``robosuite/Lift{...}``).

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
    if parsed.kwargs:  # keywords given to make_env win over the name's
        task_kwargs = {**parsed.env_kwargs, **task_kwargs}
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


def env_name_from_env_args(env_args: dict[str, Any], obs_keys=None, where: str = "",
                           ignored: list[str] | None = None) -> str:
    """Our env name for a robomimic ``env_args`` (``{"env_name", "type", "env_kwargs"}``): robosuite (type 1)
    ``Lift``/``PickPlaceCan`` -> ``robosuite/Lift``/``robosuite/Can``; gym (type 2) names we know (``Hopper-v5``,
    ``metaworld/...``) as they are, other gymnasium ids as ``gym/<id>``. ``obs_keys`` are appended for envs with
    dict observations (``@k1,k2``) so the env flattens them in the dataset's order.

    A robosuite env's ``env_kwargs`` are kept in the name as JSON (``robosuite/Lift{"reward_shaping":false}``)
    when they differ from the factory's defaults (:func:`robosuite_env_kwargs`: keys ``robosuite.make`` does not
    accept are a ValueError; rendering and episode-length keys are left to the factory and appended to
    ``ignored``). Gym envs' ``env_kwargs`` are not used (the task config sets ``max_episode_steps``)."""
    if not env_args or "env_name" not in env_args:
        raise ValueError(f"{where}: data.attrs['env_args'] has no env_name; name the env with task.env=<name>")
    raw, kind = str(env_args["env_name"]), env_args.get("type")
    keys = list(obs_keys or [])
    if kind == 1 or raw in _ROBOSUITE_ENV_NAMES.values() or raw.startswith("robosuite/"):
        task = {v: k for k, v in _ROBOSUITE_ENV_NAMES.items()}.get(raw, raw.removeprefix("robosuite/"))
        if task not in ROBOSUITE_TASKS:
            raise ValueError(f"{where}: env_args name the robosuite env {raw!r}; supported: "
                             f"{sorted(_ROBOSUITE_ENV_NAMES.values())}")
        env_kwargs = env_args.get("env_kwargs") or {}
        if not isinstance(env_kwargs, dict):
            raise ValueError(f"{where}: env_args['env_kwargs'] is a {type(env_kwargs).__name__}, not a JSON object")
        kept, skipped = robosuite_env_kwargs(task, env_kwargs, where) if env_kwargs else ({}, [])
        if ignored is not None:
            ignored.extend(skipped)
        return f"robosuite/{task}" + (kwargs_json(kept) if kept else "") + ("@" + ",".join(keys) if keys else "")
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
