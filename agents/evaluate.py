"""Evaluation of any policy in vectorized environments at several numbers of denoising steps.

For each K: return mean +- std, success rate, episode length, and latency (microseconds per policy call at
batch 1 on the current device, and per environment step = per call / executed actions per call). Videos of
the first episodes are written when rendering works (``MUJOCO_GL``); otherwise a warning says why not.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.episodes import run_episodes
from envs.factory import env_base_name, make_vec_env
from flowpolicy.policy import BasePolicy, FlowPolicy

from .checkpoint import atomic_write_json, atomic_write_text


@torch.no_grad()
def rollout_episodes(policy: BasePolicy, env_name: str, episodes: int, steps: int | None = None, num_envs: int = 4,
                     seed: int = 100_000, max_episode_steps: int | None = None, envs=None,
                     progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Run ``episodes`` deterministic episodes (split over ``num_envs`` sync envs by
    :func:`envs.episodes.run_episodes`, the runner every evaluator uses). Returns per-episode returns,
    successes and lengths. ``progress`` shows a bar of finished episodes."""
    from tqdm.auto import tqdm

    own = envs is None
    if own:
        envs = make_vec_env(env_name, num_envs, seed=seed, obs_horizon=policy.obs_horizon,
                            action_horizon=policy.exec_horizon, max_episode_steps=max_episode_steps)
    policy.eval()
    # the flows' initial noise comes from a generator seeded like the envs, so an evaluation does not depend
    # on what used the global RNG before it
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    kw = {"generator": gen} if isinstance(policy, FlowPolicy) else {}

    def act(obs):
        chunk = policy.predict_action_chunk(obs, steps=steps, **kw).cpu().numpy()[:, : policy.exec_horizon]
        return chunk[:, 0] if policy.exec_horizon == 1 else chunk

    bar = tqdm(total=episodes, desc=desc, disable=not progress, mininterval=1.0, leave=False)
    try:
        with torch.no_grad():
            out = run_episodes(envs, act, episodes, seed, default_chunk_steps=policy.exec_horizon,
                               on_episode=lambda: bar.update(1))
    finally:
        bar.close()
        if own:
            envs.close()
    return out


@torch.no_grad()
def measure_latency(policy: BasePolicy, steps: int | None = None, repeats: int = 50) -> dict[str, float]:
    """Median microseconds per ``predict_action_chunk`` call at batch 1, and per bare velocity forward."""
    obs = torch.zeros(1, policy.obs_horizon, policy.obs_dim, device=policy.device)
    for _ in range(5):
        policy.predict_action_chunk(obs, steps=steps)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.predict_action_chunk(obs, steps=steps)
        times.append(time.perf_counter() - t0)
    out = {"latency_us_per_call": 1e6 * float(np.median(times))}
    out["latency_us_per_env_step"] = out["latency_us_per_call"] / policy.exec_horizon
    if isinstance(policy, FlowPolicy):
        cond = policy.encode_obs(obs)
        x = torch.zeros(1, policy.action_horizon, policy.act_dim, device=policy.device)
        t = torch.zeros(1, device=policy.device)
        fwd = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            policy.flow.velocity(x, t, cond, torch.full_like(t, 0.25))
            fwd.append(time.perf_counter() - t0)
        out["bare_forward_us"] = 1e6 * float(np.median(fwd))
    return out


def video_name(env_name: str, steps: int | None, episode: int, prefix: str = "") -> str:
    """``<prefix>_<env>_K<steps>_ep<i>.mp4``; the prefix (the evaluation's name, e.g. ``eval_pretrained`` or
    ``eval_finetuned``) keeps the videos of different stages of one run apart."""
    env = env_base_name(env_name).replace("/", "_").replace(":", "_")
    return f"{prefix + '_' if prefix else ''}{env}_K{steps}_ep{episode}.mp4"


def record_videos(policy: BasePolicy, env_name: str, out_dir: Path, episodes: int = 2, steps: int | None = None,
                  seed: int = 100_000, max_episode_steps: int | None = None, prefix: str = "") -> list[str]:
    """mp4/GIF videos of ``episodes`` episodes (env seeds ``seed + i``), named by :func:`video_name`; [] with a
    warning when no renderer is available.

    The episodes run through :func:`envs.episodes.run_episodes` (the runner of every evaluator: its reset and
    clipping rules), one env per episode stepping one action at a time so every frame is rendered; the flows'
    initial noise comes from a generator seeded with ``seed``, so a video is reproducible."""
    from collections import deque

    from envs.video import VideoRecorder, render_frame

    paths: list[str] = []
    if os.environ.get("MUJOCO_GL") not in ("egl", "osmesa") and not os.environ.get("DISPLAY"):
        warnings.warn("no videos: no display and MUJOCO_GL is not egl/osmesa (train.py picks osmesa when "
                      "libOSMesa is installed: apt-get install libosmesa6)", stacklevel=2)
        return paths
    if episodes < 1:
        return paths
    try:
        envs = make_vec_env(env_name, episodes, seed=None, render_mode="rgb_array", obs_horizon=policy.obs_horizon,
                            action_horizon=1, max_episode_steps=max_episode_steps, render_size=(160, 160))
    except Exception as err:  # noqa: BLE001 - report, never lose the evaluation
        warnings.warn(f"no videos: {err}", stacklevel=2)
        return paths
    policy.eval()
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    kw = {"generator": gen} if isinstance(policy, FlowPolicy) else {}
    queue: deque = deque()  # the executed actions of the current chunk, one per env step

    def act(obs):
        if not queue:
            chunk = policy.predict_action_chunk(obs, steps=steps, **kw).cpu().numpy()
            queue.extend(chunk[:, : policy.exec_horizon].transpose(1, 0, 2))
        return queue.popleft()

    recorders = [VideoRecorder(Path(out_dir) / video_name(env_name, steps, i, prefix)) for i in range(episodes)]

    def film(active):
        for i in np.flatnonzero(active):
            recorders[i].add(render_frame(envs.envs[i]))

    try:
        with torch.no_grad():
            run_episodes(envs, act, episodes, seed, quotas=np.ones(episodes, int), on_step=film)
        paths = [str(rec.close()) for rec in recorders]
    except RuntimeError as err:
        warnings.warn(f"no videos: {err}", stacklevel=2)
    finally:
        envs.close()
    return paths


def env_has_success(env_name: str) -> bool:
    """Whether the env reports task success (Meta-World, robosuite, gym envs whose info has "success")."""
    from envs.factory import env_meta, parse_env_name

    family = parse_env_name(env_name).family
    if family in ("metaworld", "robosuite"):
        return True
    return family == "gym" and bool(env_meta(env_name)["has_success"])


def evaluate_policy_steps(policy: BasePolicy, env_name: str, steps_list, episodes: int = 20, num_envs: int = 4,
                          seed: int = 100_000, max_episode_steps: int | None = None, videos: int = 0,
                          out_dir: str | Path | None = None, label: str = "", has_success: bool | None = None,
                          video_prefix: str = "", progress: bool = False) -> list[dict[str, Any]]:
    """One row per K in ``steps_list`` (Gaussian policies ignore K: one row with steps=None). Each row names
    the env; ``success_rate`` is None for envs without a success signal (``has_success``; default: from the
    env family)."""
    rows = []
    if has_success is None:
        has_success = env_has_success(env_name)
    ks = list(steps_list) if isinstance(policy, FlowPolicy) else [None]
    for k in ks:
        record = videos and out_dir is not None and k == ks[-1]  # videos at the largest K only (rendering is slow)
        r = rollout_episodes(policy, env_name, episodes, k, num_envs, seed, max_episode_steps, progress=progress,
                             desc=f"eval {env_name.split('@')[0]} K={k}")
        lat = measure_latency(policy, k)
        row = {"policy": label or policy.kind, "env": env_name, "steps": k, "episodes": len(r["returns"]),
               "return_mean": float(np.mean(r["returns"])), "return_std": float(np.std(r["returns"])),
               "success_rate": float(np.mean(r["successes"])) if has_success else None,
               "length_mean": float(np.mean(r["lengths"])), **lat}
        if record:
            row["videos"] = record_videos(policy, env_name, Path(out_dir) / "videos", videos, k, seed,
                                          max_episode_steps, prefix=video_prefix)
        rows.append(row)
    return rows


def write_eval(rows: list[dict[str, Any]], out_dir: str | Path, name: str = "eval") -> str:
    """Save rows as JSON and Markdown in ``out_dir``; return the Markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", rows)
    cols = ["policy", "env", "steps", "episodes", "return_mean", "return_std", "success_rate", "length_mean",
            "latency_us_per_call", "latency_us_per_env_step"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    atomic_write_text(out / f"{name}.md", md + "\n")
    return md
