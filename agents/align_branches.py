"""Preference pairs from the same simulator state (``stage.source=branches``).

Rollout pairs from one start state (``source=rollouts``) compare chunks from different states once the two
episodes diverge. Here every pair shares its state exactly:

1. From each start state (env seed ``rollout_seed + i``) the policy runs one reference episode.
2. At ``branch_points`` chunk positions spread over the first ``branch_span`` of that episode (the start
   state first; in pick-place the outcome is mostly decided in the first half), the state is
   restored ``rollouts_per_state`` times by resetting with the same seed and replaying the reference's executed
   actions. MuJoCo is deterministic, so the replay lands on the same state. The observation is checked against
   the recorded one, and an env that does not reproduce it stops with one error line.
3. Each restored copy samples its own chunk (its own flow noise) and runs on with the policy for
   ``branch_chunks`` chunks (None: to the episode's end).
4. The branch chunk is a one-chunk :class:`Trajectory` in a group per branch point. ``ret`` is the return from
   the branch on, and ``success`` means success after the branch. :func:`agents.align_data.preference_pairs`
   ranks the copies of one branch point by return (``prefer=return``), or
   :func:`success_pairs` pairs a copy that succeeded with one that did not (``prefer=success``).

Replay is generic (any seeded, deterministic env): it costs the prefix's env steps again, no simulator-specific
state copy. :func:`preference_data` picks the source of every ``stage=align`` run (here, so that
:mod:`agents.align_data` does not import this module back).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from envs.factory import make_env
from flowpolicy.policy import FlowPolicy

from .align_data import (
    AlignConfig,
    Trajectory,
    collect_rollouts,
    dataset_trajectories,
    preference_pairs,
    read_preference_labels,
)


class _Runner:
    """Single envs stepped side by side, with one batched policy call per chunk for the envs still running."""

    def __init__(self, policy: FlowPolicy, env_name: str, n: int, max_episode_steps: int | None) -> None:
        self.policy = policy
        self.envs = [make_env(env_name, obs_horizon=policy.obs_horizon, action_horizon=policy.exec_horizon,
                              max_episode_steps=max_episode_steps) for _ in range(n)]
        space = self.envs[0].action_space
        self.low, self.high, self.dtype = space.low, space.high, space.dtype

    def close(self) -> None:
        for e in self.envs:
            e.close()

    def run(self, seeds: list[int], prefixes: list[list[np.ndarray]], horizon: int | None, steps: int | None,
            gen: torch.Generator, expect: list[np.ndarray] | None = None,
            noise_keys: list[int] | None = None) -> list[dict]:
        """Env i: reset with ``seeds[i]``, replay ``prefixes[i]`` (executed actions), then act for ``horizon``
        chunks (None: to the end). Returns per env the observation histories, chunks and executed actions of
        the policy's part, its return and whether it succeeded.

        ``noise_keys``: after its first chunk, env i draws the flow's initial noise of its t-th chunk from a
        generator seeded by (``noise_keys[i]``, t), so envs with the same key share every later chunk's noise
        (common random numbers); the first chunk's noise comes from ``gen`` and differs."""
        n = len(seeds)
        obs, alive = [], np.ones(n, bool)
        for i in range(n):
            o, _ = self.envs[i].reset(seed=int(seeds[i]))
            for a in prefixes[i]:
                o, _, term, trunc, _ = self.envs[i].step(a)
                if term or trunc:
                    raise RuntimeError(f"replay: the episode of seed {seeds[i]} ended inside its recorded prefix")
            if expect is not None:
                diff = float(np.max(np.abs(np.asarray(o, np.float64).reshape(expect[i].shape) - expect[i])))
                if not diff <= 1e-6:
                    raise ValueError(f"source=branches: replaying seed {seeds[i]}'s recorded actions did not "
                                     f"restore its state (observation differs by {diff:.3g}); this env is not "
                                     "deterministic under replay, so use source=rollouts")
            obs.append(np.asarray(o))
        out = [{"hist": [], "chunks": [], "executed": [], "ret": 0.0, "success": False} for _ in range(n)]
        t = 0
        while alive.any() and (horizon is None or t < horizon):
            idx = np.flatnonzero(alive)
            batch = np.stack([obs[i] for i in idx])
            if noise_keys is None or t == 0:
                chunks = self.policy.predict_action_chunk(batch, steps=steps, generator=gen)
            else:
                x0 = torch.cat([self.policy.flow.noise(1, "cpu", torch.Generator().manual_seed(
                    int(noise_keys[i]) * 100_003 + t)) for i in idx]).to(self.policy.device)
                chunks = self.policy.predict_action_chunk(batch, steps=steps, x0=x0 * self.policy.init_noise_scale)
            chunks = chunks.cpu().numpy()
            for j, i in enumerate(idx):
                a = chunks[j, : self.policy.exec_horizon]
                a = np.clip(a[0] if self.policy.exec_horizon == 1 else a, self.low, self.high).astype(self.dtype)
                out[i]["hist"].append(obs[i] if obs[i].ndim == 2 else obs[i][None])
                out[i]["chunks"].append(chunks[j])
                out[i]["executed"].append(a)
                obs[i], r, term, trunc, info = self.envs[i].step(a)
                obs[i] = np.asarray(obs[i])
                out[i]["ret"] += float(r)
                out[i]["success"] = out[i]["success"] or bool(info.get("success", False))
                if term or trunc:
                    alive[i] = False
            t += 1
        return out


@torch.no_grad()
def collect_branches(policy: FlowPolicy, env_name: str, num_start_states: int, branches: int, branch_points: int,
                     branch_chunks: int | None = None, steps: int | None = None, seed: int = 0,
                     max_episode_steps: int | None = None, num_envs: int = 16,
                     branch_span: float = 1.0, shared_noise: bool = False) -> list[Trajectory]:
    """``branches`` one-chunk trajectories at each of ``branch_points`` restored states of each start state,
    spread evenly over the leading ``branch_span`` fraction of its reference episode (chunk 0 first).

    ``shared_noise``: the copies of a branch point draw the same flow noise for every chunk after their own
    (common random numbers), so a difference in what followed comes from the branch chunk, less from later noise.

    Returns the branch chunks as :class:`Trajectory` objects (``group`` = branch point, numbered from 0),
    each with the return and success from that chunk on.
    """
    if not 0.0 < branch_span <= 1.0:
        raise ValueError(f"branch_span must be in (0, 1], got {branch_span}")
    if branches < 2 or branch_points < 1:
        raise ValueError(f"source=branches needs rollouts_per_state >= 2 and branch_points >= 1, got "
                         f"{branches} and {branch_points}")
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    policy.eval()
    runner = _Runner(policy, env_name, max(num_envs, branches), max_episode_steps)
    out: list[Trajectory] = []
    try:
        refs = []
        for first in range(0, num_start_states, num_envs):
            seeds = [seed + s for s in range(first, min(num_start_states, first + num_envs))]
            refs += runner.run(seeds, [[] for _ in seeds], None, steps, gen)
        tasks = []  # (start state, chunk index where the copies branch)
        for s, ref in enumerate(refs):
            span = max(1, int(len(ref["chunks"]) * branch_span))
            tasks += [(s, c) for c in sorted({j * span // branch_points for j in range(branch_points)})]
        per_batch = max(1, num_envs // branches)
        for first in range(0, len(tasks), per_batch):
            batch = tasks[first: first + per_batch]
            rows = [(s, c) for s, c in batch for _ in range(branches)]
            keys = [seed * 1_000 + (first + k // branches) for k in range(len(rows))] if shared_noise else None
            res = runner.run([seed + s for s, _ in rows], [refs[s]["executed"][:c] for s, c in rows], branch_chunks,
                             steps, gen, expect=[refs[s]["hist"][c] for s, c in rows], noise_keys=keys)
            for k, ((s, c), r) in enumerate(zip(rows, res)):
                out.append(Trajectory(torch.as_tensor(np.stack(r["hist"][:1])), torch.as_tensor(r["chunks"][0][None]),
                                      r["ret"], r["success"], first + k // branches,
                                      f"state{s}_chunk{c}_branch{k % branches}"))
    finally:
        runner.close()
    return out


def success_pairs(trajs: list[Trajectory]) -> list[tuple[int, int]]:
    """(winner, loser) within each group: every copy that succeeded against every copy that did not."""
    groups: dict[int, list[int]] = {}
    for i, tr in enumerate(trajs):
        groups.setdefault(tr.group, []).append(i)
    return [(a, b) for _, idx in sorted(groups.items()) for a in idx for b in idx
            if trajs[a].success and not trajs[b].success]


def preference_data(policy: FlowPolicy, cfg: AlignConfig, env_name: str, max_episode_steps: int | None,
                    dataset: str | None) -> tuple[list[Trajectory], list[tuple[int, int]], dict[str, Any]]:
    """Trajectories and (winner, loser) pairs from ``cfg.source``; plus a JSON-able description."""
    t0 = time.perf_counter()
    if cfg.source == "rollouts":
        trajs = collect_rollouts(policy, env_name, cfg.num_start_states, cfg.rollouts_per_state, cfg.denoise_steps,
                                 cfg.rollout_seed, max_episode_steps, cfg.rollout_envs)
    elif cfg.source == "branches":
        trajs = collect_branches(policy, env_name, cfg.num_start_states, cfg.rollouts_per_state, cfg.branch_points,
                                 cfg.branch_chunks, cfg.denoise_steps, cfg.rollout_seed, max_episode_steps,
                                 cfg.rollout_envs, cfg.branch_span, cfg.branch_noise == "shared")
    else:
        if not dataset:
            raise ValueError(f"source={cfg.source} needs a demo file (stage.dataset=...)")
        trajs = dataset_trajectories(dataset, policy.obs_horizon, policy.action_horizon)
    if cfg.source == "labels":
        pairs = read_preference_labels(cfg.labels, trajs)
    elif cfg.prefer == "success":
        pairs = success_pairs(trajs)
    else:
        pairs = preference_pairs(trajs, cfg.min_return_gap, cfg.pairing)
    rets = np.array([tr.ret for tr in trajs])
    desc = {"source": cfg.source, "prefer": cfg.prefer, "trajectories": len(trajs), "pairs": len(pairs),
            "return_mean": float(rets.mean()), "return_std": float(rets.std()),
            "success_rate": float(np.mean([bool(tr.success) for tr in trajs])),
            "winner_return_mean": float(np.mean([trajs[w].ret for w, _ in pairs])) if pairs else None,
            "loser_return_mean": float(np.mean([trajs[l].ret for _, l in pairs])) if pairs else None,
            "collect_s": time.perf_counter() - t0}
    if cfg.source != "rollouts":
        desc["dataset"] = str(dataset)
    return trajs, pairs, desc
