"""Alignment settings and preference data: :class:`AlignConfig`, :class:`Trajectory`, and the trajectories
and (winner, loser) pairs from the policy's rollouts, a demo file or a labels file (the sources: see
:mod:`agents.align`, which re-exports all of it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.episodes import run_episodes
from envs.factory import make_vec_env
from flowpolicy.policy import FlowPolicy

from .errors import check_at_least, check_positive
from .renamed import unknown_with_hints

METHODS = ("dpo", "rwr", "sft")
SOURCES = ("rollouts", "branches", "dataset", "labels")
PREFER = ("return", "success")
PAIRINGS = ("best_worst", "all")


@dataclass
class AlignConfig:
    """Settings of policy alignment: the schema of ``configs/stage/align.yaml`` (agents.config_schema)."""

    method: str = "dpo"
    source: str = "rollouts"
    dataset: str | None = None        # demo file for source=dataset|labels (None: the task's demos)
    labels: str | None = None         # JSON/CSV preference file for source=labels
    # preference data from the policy's own rollouts
    num_start_states: int = 32
    rollouts_per_state: int = 4
    rollout_seed: int = 0             # start state i uses env seed rollout_seed + i
    rollout_envs: int = 16            # parallel envs while collecting
    pairing: str = "best_worst"
    min_return_gap: float = 50.0
    prefer: str = "return"            # rollouts|branches: rank by return, or pair successes with failures
    # source=branches (agents.align_branches): pairs from the same restored state, not just the same start
    branch_points: int = 4            # restored states per start state, spread over its reference episode
    branch_chunks: int | None = None  # chunks each copy runs on after the branch (None: to the episode's end)
    branch_span: float = 1.0          # branch points spread over this leading fraction of the reference episode
    branch_noise: str = "independent"  # shared: the copies of a branch point share all later chunks' flow noise
    denoise_steps: int | None = None  # K, for rollouts and evaluation (None: the policy's default)
    # online rounds (source=rollouts|branches): each round collects fresh pairs from the current policy, on new
    # start states (rollout_seed + round * num_start_states + i), and aligns it with itself as DPO's reference
    rounds: int = 1
    # losses
    beta: float = 2000.0              # Flow-DPO beta, on the per-dimension mean squared velocity error
    beta_schedule: str = "constant"   # constant | diffusion_dpo (beta t^2 in our convention)
    chunks_per_pair: int = 4
    rwr_beta: float | None = None     # RWR temperature in return units (None: the std of the returns)
    rwr_max_weight: float | None = 20.0
    # optimization
    grad_steps: int = 300
    batch_pairs: int = 32             # pairs per DPO step (each with chunks_per_pair samples)
    batch_size: int = 256             # chunks per RWR/SFT step
    lr: float = 3.0e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # evaluation before and after
    eval_denoise_steps: list[int] | None = None  # None: [denoise_steps]
    eval_episodes: int = 30
    eval_num_envs: int = 4
    eval_seed: int = 100_000
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlignConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown align settings {unknown_with_hints(unknown, 'align')}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"stage.method must be one of {METHODS} for policies, got {self.method!r}")
        if self.source not in SOURCES:
            raise ValueError(f"stage.source must be one of {SOURCES}, got {self.source!r}")
        if self.prefer not in PREFER:
            raise ValueError(f"stage.prefer must be one of {PREFER}, got {self.prefer!r}")
        if self.prefer == "success" and self.source not in ("rollouts", "branches"):
            raise ValueError("stage.prefer=success ranks the policy's own rollouts: use source=rollouts|branches")
        if self.branch_chunks is not None and int(self.branch_chunks) < 1:
            raise ValueError(f"stage.branch_chunks must be >= 1 or null, got {self.branch_chunks}")
        if not 0.0 < float(self.branch_span) <= 1.0:
            raise ValueError(f"stage.branch_span must be in (0, 1], got {self.branch_span}")
        if self.branch_noise not in ("independent", "shared"):
            raise ValueError(f"stage.branch_noise must be independent or shared, got {self.branch_noise!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"stage.pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.source == "labels" and not self.labels:
            raise ValueError("stage.source=labels needs stage.labels=<path to a JSON or CSV file of pairs>")
        if int(self.rounds) < 1:
            raise ValueError(f"stage.rounds must be >= 1, got {self.rounds}")
        if int(self.rounds) > 1 and self.source not in ("rollouts", "branches"):
            raise ValueError(f"stage.rounds={self.rounds} collects new pairs from the policy each round: use "
                             f"source=rollouts|branches (source={self.source} gives the same pairs every round)")
        check_at_least({name: getattr(self, name) for name in ("num_start_states", "grad_steps", "batch_pairs",
                        "batch_size", "chunks_per_pair", "rollout_envs", "eval_num_envs", "branch_points")},
                       1, "stage.")
        if self.rollouts_per_state < 2:
            raise ValueError(f"stage.rollouts_per_state must be >= 2 to rank rollouts, got "
                             f"{self.rollouts_per_state}")
        check_positive({"lr": self.lr, "beta": self.beta}, "stage.")
        if self.rwr_beta is not None and not self.rwr_beta > 0:
            raise ValueError(f"stage.rwr_beta must be positive or null, got {self.rwr_beta}")
        if self.denoise_steps is not None and int(self.denoise_steps) < 1:
            raise ValueError(f"stage.denoise_steps must be >= 1, got {self.denoise_steps}")
        if self.eval_episodes < 0:
            raise ValueError(f"stage.eval_episodes must be >= 0, got {self.eval_episodes}")
        lo, hi = int(self.rollout_seed), int(self.rollout_seed) + int(self.rounds) * int(self.num_start_states)
        elo, ehi = int(self.eval_seed), int(self.eval_seed) + int(self.eval_episodes)
        if self.source in ("rollouts", "branches") and lo < ehi and elo < hi:
            raise ValueError(f"align start states (env seeds {lo}-{hi - 1}) overlap the evaluation episodes "
                             f"(env seeds {elo}-{ehi - 1}): move rollout_seed or eval_seed so that the "
                             "evaluation stays held out")


@dataclass
class Trajectory:
    """One episode as the policy saw it: observation histories and action chunks, in environment units.

    ``obs`` (N, To, Do), ``actions`` (N, Ta, Da), ``ret`` the episode return, ``group`` the start state (-1
    when episodes are not grouped), ``name`` e.g. ``demo_3`` or ``state2_rollout1``.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    ret: float
    success: bool | None = None
    group: int = -1
    name: str = ""


# --- preference data ----------------------------------------------------------------------------------------


@torch.no_grad()
def collect_rollouts(policy: FlowPolicy, env_name: str, num_start_states: int, rollouts_per_state: int,
                     steps: int | None = None, seed: int = 0, max_episode_steps: int | None = None,
                     num_envs: int = 16) -> list[Trajectory]:
    """``rollouts_per_state`` episodes from each of ``num_start_states`` start states (env seed ``seed + i``).

    Rollouts of one state differ only in the flow's initial noise (drawn from a generator seeded by ``seed``).
    Each env runs one episode per batch (:func:`envs.episodes.run_episodes`, the runner of every evaluator);
    the policy acts with ``steps`` denoising steps and every (observation history, whole chunk) is kept.
    """
    per_batch = max(1, num_envs // rollouts_per_state)
    n = per_batch * rollouts_per_state
    envs = make_vec_env(env_name, n, seed=None, obs_horizon=policy.obs_horizon,
                        action_horizon=policy.exec_horizon, max_episode_steps=max_episode_steps)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    policy.eval()
    out: list[Trajectory] = []
    try:
        for first in range(0, num_start_states, per_batch):
            states = [first + j // rollouts_per_state for j in range(n)]
            obs_buf: list[list[np.ndarray]] = [[] for _ in range(n)]
            act_buf: list[list[np.ndarray]] = [[] for _ in range(n)]
            last: dict[str, np.ndarray] = {}

            def act(obs, last=last):
                chunk = policy.predict_action_chunk(obs, steps=steps, generator=gen).cpu().numpy()
                last["chunk"], last["hist"] = chunk, (obs if obs.ndim == 3 else obs[:, None])
                a = chunk[:, : policy.exec_horizon]
                return a[:, 0] if policy.exec_horizon == 1 else a

            def record(active, last=last, obs_buf=obs_buf, act_buf=act_buf):
                for i in np.flatnonzero(active):
                    obs_buf[i].append(last["hist"][i])
                    act_buf[i].append(last["chunk"][i])

            res = run_episodes(envs, act, n, [seed + s for s in states], quotas=np.ones(n, int), on_step=record,
                               default_chunk_steps=policy.exec_horizon)
            ends = {i: (r, s) for i, r, s in zip(res["envs"], res["returns"], res["successes"])}
            for i, s in enumerate(states):
                if s >= num_start_states:
                    continue
                out.append(Trajectory(torch.as_tensor(np.stack(obs_buf[i])),
                                      torch.as_tensor(np.stack(act_buf[i])), float(ends[i][0]), bool(ends[i][1]),
                                      s, f"state{s}_rollout{i % rollouts_per_state}"))
    finally:
        envs.close()
    return out


def dataset_trajectories(path: str | Path, obs_horizon: int, action_horizon: int) -> list[Trajectory]:
    """Every episode of a demo file as a :class:`Trajectory` of its (history, chunk) windows, ungrouped."""
    from envs.dataset import DemoDataset

    ds = DemoDataset(path, obs_horizon, action_horizon, filter_key=None)
    trajs, start = [], 0
    for ep in ds.episodes:
        items = [ds[i] for i in range(start, start + len(ep))]
        start += len(ep)
        trajs.append(Trajectory(torch.stack([it["obs"] for it in items]),
                                torch.stack([it["action"] for it in items]), ep.episode_return, ep.success,
                                -1, ep.name))
    if start != len(ds):  # DemoDataset concatenates episodes in file order; this checks that assumption
        raise RuntimeError(f"{path}: {len(ds)} windows but the episodes hold {start} steps")
    return trajs


def preference_pairs(trajs: list[Trajectory], min_return_gap: float = 0.0,
                     pairing: str = "best_worst") -> list[tuple[int, int]]:
    """(winner, loser) indices into ``trajs``, ranked by return.

    Grouped trajectories (``group >= 0``, one group per start state) are only compared within their group:
    best against worst (``best_worst``) or every pair (``all``). Ungrouped ones (``group == -1``) are sorted
    together and the k-th best is paired with the k-th worst (``best_worst``) or all pairs are used. A pair
    needs a return gap larger than ``min_return_gap``.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    groups: dict[int, list[int]] = {}
    for i, tr in enumerate(trajs):
        groups.setdefault(tr.group, []).append(i)
    pairs = []
    for g, idx in sorted(groups.items()):
        order = sorted(idx, key=lambda i: -trajs[i].ret)
        if pairing == "all":
            cand = [(a, b) for k, a in enumerate(order) for b in order[k + 1:]]
        elif g >= 0:
            cand = [(order[0], order[-1])] if len(order) >= 2 else []
        else:
            cand = [(order[k], order[-1 - k]) for k in range(len(order) // 2)]
        pairs += [(a, b) for a, b in cand if trajs[a].ret - trajs[b].ret > min_return_gap]
    return pairs


def read_preference_labels(path: str | Path, trajs: list[Trajectory]) -> list[tuple[int, int]]:
    """Pairs from a file naming trajectories by name (``demo_3``) or by index into ``trajs``.

    JSON: a list of ``{"winner": a, "loser": b}`` (or ``chosen``/``rejected``) objects or ``[a, b]`` lists,
    optionally under a top-level ``"pairs"`` key. CSV: a header row with ``winner,loser`` (or
    ``chosen,rejected``) columns.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"preference labels {str(path)!r} do not exist")
    text = path.read_text()
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        entries: list[Any] = rows
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); give a .json list of pairs or a .csv "
                             "file") from err
        entries = data["pairs"] if isinstance(data, dict) and "pairs" in data else data
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of pairs (or {{'pairs': [...]}}), got "
                             f"{type(entries).__name__}")
    by_name = {tr.name: i for i, tr in enumerate(trajs)}

    def resolve(ref, where: str) -> int:
        if isinstance(ref, str) and ref in by_name:
            return by_name[ref]
        try:
            i = int(ref)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {where}: {ref!r} names no trajectory (known: "
                             f"{list(by_name)[:5]}...)") from None
        if not 0 <= i < len(trajs):
            raise ValueError(f"{path}: {where}: index {i} out of range for {len(trajs)} trajectories")
        return i

    pairs = []
    for k, e in enumerate(entries):
        where = f"pair {k}"
        if isinstance(e, dict):
            keys = ("winner", "loser") if "winner" in e else ("chosen", "rejected")
            if keys[0] not in e or keys[1] not in e:
                raise ValueError(f"{path}: {where} needs winner/loser (or chosen/rejected) fields, got "
                                 f"{sorted(e)}")
            a, b = e[keys[0]], e[keys[1]]
        elif isinstance(e, (list, tuple)) and len(e) == 2:
            a, b = e
        else:
            raise ValueError(f"{path}: {where}: expected {{'winner', 'loser'}} or [winner, loser], got {e!r}")
        w, l = resolve(a, where), resolve(b, where)
        if w == l:
            raise ValueError(f"{path}: {where}: winner and loser are the same trajectory {a!r}")
        pairs.append((w, l))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs
