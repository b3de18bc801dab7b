"""Rollout videos: frames from ``render_mode="rgb_array"`` written as mp4 (imageio-ffmpeg) or GIF.

MuJoCo picks its OpenGL backend from ``MUJOCO_GL`` when it is first imported: ``egl`` (GPU, headless),
``osmesa`` (CPU, headless; needs the system library, e.g. Debian's ``libosmesa6``) or ``glfw`` (a display).
Set it before importing gymnasium/mujoco/metaworld, e.g. ``MUJOCO_GL=osmesa python train.py ...``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

RENDER_HINT = (
    "rendering failed (MUJOCO_GL={value!r}). MuJoCo needs an OpenGL backend chosen before it is imported: "
    "set MUJOCO_GL=egl (needs a GPU with EGL drivers) or MUJOCO_GL=osmesa (CPU; install the library, "
    "e.g. `apt-get install libosmesa6`), and PYOPENGL_PLATFORM to the same value if it is set."
)


def has_ffmpeg() -> bool:
    """Whether imageio can write mp4 (the imageio-ffmpeg plugin is installed)."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def render_frame(env: gym.Env) -> np.ndarray:
    """``env.render()`` as an (H, W, 3) uint8 array, or a RuntimeError that says how to make rendering work."""
    if env.render_mode != "rgb_array":
        raise ValueError(f"env must be made with render_mode='rgb_array', got {env.render_mode!r}")
    try:
        frame = env.render()
    except Exception as err:  # the GL backends fail with many exception types (EGLError, FatalError, ...)
        raise RuntimeError(RENDER_HINT.format(value=os.environ.get("MUJOCO_GL"))) from err
    if frame is None:
        raise RuntimeError(RENDER_HINT.format(value=os.environ.get("MUJOCO_GL")))
    return np.asarray(frame, dtype=np.uint8)


class VideoRecorder:
    """Collects frames and writes them to ``path`` on :meth:`close`.

    ``.mp4`` needs imageio-ffmpeg; without it the video is written as a GIF beside it (``.gif`` suffix).
    """

    def __init__(self, path: str | os.PathLike, fps: int = 30):
        self.path = Path(path)
        self.fps = fps
        self.frames: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 frame."""
        self.frames.append(np.asarray(frame, dtype=np.uint8))

    def close(self) -> Path:
        """Write the video and return its path (the ``.gif`` fallback path when mp4 is not available)."""
        import imageio

        if not self.frames:
            raise ValueError(f"{self.path}: no frames to write")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        path = self.path
        if path.suffix == ".mp4" and not has_ffmpeg():
            path = path.with_suffix(".gif")
        if path.suffix == ".mp4":
            imageio.mimsave(path, self.frames, fps=self.fps, macro_block_size=1)
        else:
            imageio.mimsave(path, self.frames, duration=1000.0 / self.fps, loop=0)
        self.frames = []
        return path


def record_rollouts(
    env_name: str,
    policy: Callable[[np.ndarray], np.ndarray],
    path: str | os.PathLike,
    num_episodes: int = 1,
    seed: int = 0,
    max_steps: int | None = None,
    fps: int = 30,
    reset: Callable[[], None] | None = None,
    **make_env_kwargs: Any,
) -> dict[str, Any]:
    """Roll ``policy`` out in ``make_env(env_name, render_mode="rgb_array", ...)`` and save one video.

    ``policy(obs) -> action`` is called once per env step (a chunked policy keeps its own action queue, e.g.
    its ``select_action``); ``reset()`` is called at each episode start. Episodes follow each other in one
    video. Returns ``{"path", "returns", "successes", "num_frames"}``.
    """
    from envs.factory import make_env

    env = make_env(env_name, seed=seed, render_mode="rgb_array", **make_env_kwargs)
    recorder = VideoRecorder(path, fps=fps)
    returns, successes = [], []
    try:
        for _ in range(num_episodes):
            if reset is not None:
                reset()
            obs, _ = env.reset()
            recorder.add(render_frame(env))
            total, success, steps = 0.0, False, 0
            while True:
                obs, reward, terminated, truncated, info = env.step(policy(obs))
                recorder.add(render_frame(env))
                total += float(reward)
                success = success or info["success"]
                steps += 1
                if terminated or truncated or (max_steps is not None and steps >= max_steps):
                    break
            returns.append(total)
            successes.append(success)
    finally:
        env.close()
    num_frames = len(recorder.frames)
    out = recorder.close()
    return {"path": str(out), "returns": returns, "successes": successes, "num_frames": num_frames}
