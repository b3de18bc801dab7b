"""Rollout videos: mp4/GIF writing, real rendering where a GL backend works, and the no-renderer error."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from envs.video import VideoRecorder, has_ffmpeg, render_frame

ROLLOUT = textwrap.dedent("""
    import sys
    import numpy as np
    try:
        import mujoco  # noqa: F401 - the GL backend loads here (osmesa without libOSMesa fails at import)
    except Exception as err:
        print("BACKEND-UNAVAILABLE", type(err).__name__, err)
        raise SystemExit(4)
    from envs.video import record_rollouts
    try:
        out = record_rollouts("metaworld/pick-place-v3", lambda obs: np.zeros(4, np.float32), sys.argv[1],
                              max_steps=5, render_size=(64, 48))
    except RuntimeError as err:
        print("RENDER-ERROR", err)
        raise SystemExit(3)
    print("FRAMES", out["num_frames"], out["path"])
""")


def _run_rollout(tmp_path, backend):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "PYOPENGL_PLATFORM")}
    env["MUJOCO_GL"] = backend
    return subprocess.run([sys.executable, "-c", ROLLOUT, str(tmp_path / "rollout.mp4")], env=env,
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_video_recorder_writes_frames(tmp_path):
    frames = [np.full((32, 48, 3), 40 * i, np.uint8) for i in range(5)]
    rec = VideoRecorder(tmp_path / "v.gif", fps=10)
    for frame in frames:
        rec.add(frame)
    path = rec.close()
    import imageio

    read = imageio.mimread(path)
    assert path.suffix == ".gif" and len(read) == 5 and read[0].shape[:2] == (32, 48)
    if has_ffmpeg():
        rec = VideoRecorder(tmp_path / "v.mp4", fps=10)
        for frame in frames:
            rec.add(frame)
        assert rec.close().stat().st_size > 0
    with pytest.raises(ValueError, match="no frames"):
        VideoRecorder(tmp_path / "empty.mp4").close()


def test_render_frame_needs_rgb_array_mode():
    from envs.factory import make_env

    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        render_frame(make_env("Hopper-v5"))


def test_missing_renderer_gives_actionable_error(tmp_path):
    # glfw without a display cannot create a context on a headless machine.
    result = _run_rollout(tmp_path, "glfw")
    if result.returncode == 0:
        pytest.skip("a display is available, so glfw rendering works here")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "MUJOCO_GL='glfw'" in result.stdout and "MUJOCO_GL=egl" in result.stdout
    assert "MUJOCO_GL=osmesa" in result.stdout and "libosmesa6" in result.stdout


def test_offscreen_rollout_video(tmp_path):
    """Renders with whichever headless backend works here (EGL, also through Mesa on a CPU-only machine, then
    OSMesa); skips only when none does. A failure other than a missing backend fails the test."""
    tried = []
    for backend in ("egl", "osmesa"):
        result = _run_rollout(tmp_path, backend)
        if result.returncode in (3, 4):  # no such backend here, or it cannot make a context
            tried.append(f"{backend}: {(result.stdout.strip() or result.stderr.strip())[-200:]}")
            continue
        assert result.returncode == 0, result.stderr[-2000:]
        frames, path = result.stdout.split("FRAMES")[1].split()
        assert int(frames) == 6  # reset frame + 5 steps
        import imageio

        video = imageio.mimread(path)
        assert len(video) == 6 and video[0].shape == (48, 64, 3) and video[0].std() > 0
        return
    pytest.skip("no headless GL backend renders here (" + " | ".join(tried) + "); install Mesa's EGL "
                "(libegl1 libgl1-mesa-dri) or libosmesa6")


RECORD = textwrap.dedent("""
    import sys
    import numpy as np
    try:
        import mujoco  # noqa: F401
    except Exception as err:
        print("BACKEND-UNAVAILABLE", err)
        raise SystemExit(4)
    import warnings
    import imageio
    import torch
    from agents.evaluate import record_videos, rollout_episodes
    from flowpolicy.flow import RectifiedFlow
    from flowpolicy.nets import MLPVelocity
    from flowpolicy.policy import FlowPolicy

    torch.manual_seed(0)
    net = MLPVelocity((4, 4), cond_dim=39, hidden=32, depth=1)
    policy = FlowPolicy(RectifiedFlow(net, (4, 4)), 39, 4, 1, 4, exec_horizon=2, default_steps=2,
                        action_stats=(np.full(4, -1.0), np.full(4, 1.0)))
    env = "metaworld/pick-place-v3"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = record_videos(policy, env, sys.argv[1] + "/a", episodes=2, seed=5, max_episode_steps=7)
        b = record_videos(policy, env, sys.argv[1] + "/b", episodes=2, seed=5, max_episode_steps=7)
    if not a:
        print("RENDER-ERROR", [str(x.message) for x in w])
        raise SystemExit(3)
    va, vb = [[imageio.mimread(p) for p in v] for v in (a, b)]
    ev = rollout_episodes(policy, env, 2, num_envs=2, seed=5, max_episode_steps=7)
    print("FRAMES", [len(v) for v in va], "SAME", all(np.array_equal(x, y) for p, q in zip(va, vb) for x, y in zip(p, q)),
          "LENGTHS", [dict(zip(ev["envs"], ev["lengths"]))[i] for i in range(2)])
""")


def test_record_videos_runs_the_evaluation_runner_and_is_reproducible(tmp_path):
    """Videos come from the one episode runner: one video per episode, a frame per env step (the episode
    length the evaluation runner reports for the same seeds), and the same frames when recorded again."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "PYOPENGL_PLATFORM")}
    env["MUJOCO_GL"] = "egl"
    out = subprocess.run([sys.executable, "-c", RECORD, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=180, cwd=os.path.dirname(os.path.dirname(__file__)))
    if out.returncode in (3, 4):
        pytest.skip(f"no EGL rendering here: {out.stdout.strip()[-200:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.split("FRAMES")[1]
    assert "[7, 7]" in line.split("SAME")[0] and "SAME True" in line and "LENGTHS [7, 7]" in line, out.stdout
