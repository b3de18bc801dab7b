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
