"""Alignment of flow policies with returns and preferences: Flow-DPO, Flow-RWR, and SFT on winners.

``python train.py stage=align checkpoint=<pretrained run or checkpoint> stage.method=dpo|rwr|sft``

The losses live in :mod:`flowpolicy.align`; this module builds the preference data, runs the optimizer,
evaluates with :mod:`agents.evaluate` before and after at K denoising steps, and writes the aligned checkpoint
(same policy spec; no ``policy_ema`` extra, so loading picks the aligned weights) and ``align.json``.

Preference data (``source``):

- ``rollouts`` (default): from each of ``num_start_states`` start states (env seeds ``rollout_seed + i``, far
  from the evaluation seeds), the policy runs ``rollouts_per_state`` episodes that differ only in the flow's
  initial noise. Ranked by return, the best and the worst rollout of a state form a pair when their returns
  differ by more than ``min_return_gap`` (``pairing=all``: every ordered pair of the state). A trajectory is
  the sequence of (observation history, generated action chunk) of its policy calls.
- ``dataset``: the episodes of a demo file (``DemoDataset``, default: the task's demos) ranked by return; the
  k-th best is paired with the k-th worst. Chunks are the dataset's windows.
- ``labels``: pairs read from a JSON or CSV file that names episodes of the demo file (see
  :func:`read_preference_labels`).

Methods: ``dpo`` (Flow-DPO on trajectory pairs: each sample takes a chunk at the same relative position of the
winner and the loser with shared noise and time, and ``chunks_per_pair`` samples per pair are averaged inside
the sigmoid), ``rwr`` (flow matching on every chunk, weighted by exp(R / beta) of its trajectory's return R;
with rollouts a softmax within each start state), ``sft`` (plain flow matching on the winners' chunks: the
baseline Flow-DPO is compared against).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.episodes import run_episodes
from envs.factory import make_vec_env
from flowpolicy.align import flow_dpo_loss, rwr_weights
from flowpolicy.flow import ShortcutFlow
from flowpolicy.policy import FlowPolicy

from .checkpoint import (
    StopOnInterrupt,
    TrainingInterrupted,
    atomic_write_json,
    save_checkpoint,
    seed_everything,
    stop_requested,
)
from .evaluate import evaluate_policy_steps, write_eval
from .policies import extra_modules, policy_config, policy_from_checkpoint
from .tasks import demos_for
from .tblog import Logger

METHODS = ("dpo", "rwr", "sft")
SOURCES = ("rollouts", "dataset", "labels")
PAIRINGS = ("best_worst", "all")


@dataclass
class AlignConfig:
    """Settings of policy alignment (``configs/stage/align.yaml`` mirrors them one to one)."""

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
    K: int | None = None              # denoising steps, rollouts and evaluation (None: the policy's default)
    # losses
    beta: float = 2000.0              # Flow-DPO beta, on the per-dimension mean squared velocity error
    beta_schedule: str = "constant"   # constant | diffusion_dpo (beta t^2 in our convention)
    chunks_per_pair: int = 4
    rwr_beta: float | None = None     # RWR temperature in return units (None: the std of the returns)
    rwr_max_weight: float | None = 20.0
    # optimization
    steps: int = 300
    batch_pairs: int = 32             # pairs per DPO step (each with chunks_per_pair samples)
    batch_size: int = 256             # chunks per RWR/SFT step
    lr: float = 3.0e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # evaluation before and after
    eval_steps: list[int] | None = None   # None: [K]
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
            raise ValueError(f"unknown align settings {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"align method must be one of {METHODS} for policies, got {self.method!r}")
        if self.source not in SOURCES:
            raise ValueError(f"align source must be one of {SOURCES}, got {self.source!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"align pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.source == "labels" and not self.labels:
            raise ValueError("source=labels needs labels=<path to a JSON or CSV file of pairs>")
        for name in ("num_start_states", "steps", "batch_pairs", "batch_size", "chunks_per_pair",
                     "rollout_envs", "eval_num_envs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"align {name} must be >= 1, got {getattr(self, name)}")
        if self.rollouts_per_state < 2:
            raise ValueError(f"rollouts_per_state must be >= 2 to rank rollouts, got "
                             f"{self.rollouts_per_state}")
        if not self.lr > 0 or not self.beta > 0:
            raise ValueError(f"align lr and beta must be positive, got lr={self.lr}, beta={self.beta}")
        if self.rwr_beta is not None and not self.rwr_beta > 0:
            raise ValueError(f"rwr_beta must be positive or null, got {self.rwr_beta}")
        if self.K is not None and int(self.K) < 1:
            raise ValueError(f"align K must be >= 1, got {self.K}")
        if self.eval_episodes < 0:
            raise ValueError(f"eval_episodes must be >= 0, got {self.eval_episodes}")


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


# --- training -----------------------------------------------------------------------------------------------


class _Chunks:
    """All chunks of all trajectories as normalized tensors, with per-trajectory offsets."""

    def __init__(self, policy: FlowPolicy, trajs: list[Trajectory]) -> None:
        dev = policy.device
        for tr in trajs:
            if tuple(tr.actions.shape[1:]) != (policy.action_horizon, policy.act_dim):
                raise ValueError(f"trajectory {tr.name}: chunks {tuple(tr.actions.shape[1:])} do not match "
                                 f"the policy's (Ta={policy.action_horizon}, Da={policy.act_dim})")
            if tuple(tr.obs.shape[1:]) != (policy.obs_horizon, policy.obs_dim):
                raise ValueError(f"trajectory {tr.name}: observations {tuple(tr.obs.shape[1:])} do not match "
                                 f"the policy's (To={policy.obs_horizon}, Do={policy.obs_dim})")
        with torch.no_grad():
            self.cond = policy.encode_obs(torch.cat([tr.obs for tr in trajs]).to(dev))
            self.x = policy.act_norm.normalize(torch.cat([tr.actions for tr in trajs]).to(dev, torch.float32))
        lengths = torch.tensor([len(tr.actions) for tr in trajs], device=dev)
        self.length = lengths
        self.start = torch.cumsum(lengths, 0) - lengths
        self.traj = torch.repeat_interleave(torch.arange(len(trajs), device=dev), lengths)

    def at(self, traj: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Flat chunk indices at relative positions u in [0, 1) of trajectories ``traj``."""
        return self.start[traj] + (u * self.length[traj]).long().clamp(max=self.length[traj] - 1)


def trajectory_weights(trajs: list[Trajectory], beta: float | None,
                       max_weight: float | None) -> tuple[torch.Tensor, float]:
    """RWR weights per trajectory from returns (a softmax within start states when grouped), and the beta."""
    rets = torch.tensor([tr.ret for tr in trajs], dtype=torch.float64)
    if beta is None:
        beta = float(rets.std()) if len(rets) > 1 and float(rets.std()) > 0 else 1.0
    grouped = all(tr.group >= 0 for tr in trajs)
    groups = torch.tensor([tr.group for tr in trajs]) if grouped else None
    return rwr_weights(rets, beta, groups, max_weight=max_weight), beta


def align_policy(policy: FlowPolicy, trajs: list[Trajectory], pairs: list[tuple[int, int]], cfg: AlignConfig,
                 logger: Logger | None = None) -> tuple[FlowPolicy, dict[str, Any]]:
    """Fine-tune a copy of ``policy`` by ``cfg.method``; the original stays untouched and is DPO's reference.

    Returns (aligned policy in eval mode, info with the loss history and data sizes).
    """
    if not isinstance(policy, FlowPolicy):
        raise ValueError(f"alignment needs a flow policy, got a {policy.kind!r} policy")
    if cfg.method == "dpo" and isinstance(policy.flow, ShortcutFlow):
        raise ValueError("Flow-DPO trains the flow-matching velocity; a shortcut policy's few-step jumps "
                         "would not follow it. Align a reflow policy, or use method=rwr|sft")
    if cfg.method in ("dpo", "sft") and not pairs:
        raise ValueError(f"method={cfg.method} needs preference pairs but there are none (all rollouts of a "
                         "start state had equal returns, or min_return_gap is too large): use more start "
                         "states")
    aligned = copy.deepcopy(policy).train()
    ref_net = copy.deepcopy(policy.flow.net).eval()
    for p in ref_net.parameters():
        p.requires_grad_(False)
    data = _Chunks(aligned, trajs)
    dev = aligned.device
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    pair_t = torch.tensor(pairs, dtype=torch.long, device=dev).reshape(-1, 2)
    info: dict[str, Any] = {"method": cfg.method, "trajectories": len(trajs), "pairs": len(pairs),
                            "chunks": int(data.x.shape[0])}
    if cfg.method == "rwr":
        traj_w, beta_used = trajectory_weights(trajs, cfg.rwr_beta, cfg.rwr_max_weight)
        chunk_w = traj_w.to(dev)[data.traj]
        info.update({"rwr_beta": beta_used, "rwr_weight_max": float(traj_w.max())})
    if cfg.method == "sft":
        winners = torch.unique(pair_t[:, 0])
        pool = torch.cat([torch.arange(int(data.start[w]), int(data.start[w] + data.length[w]), device=dev)
                          for w in winners])
        info["winner_chunks"] = int(pool.numel())
    params = list(aligned.flow.net.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []
    from tqdm.auto import tqdm

    bar = tqdm(range(cfg.steps), desc=f"align {cfg.method}", disable=not cfg.progress, mininterval=1.0)
    for step in bar:
        if cfg.method == "dpo":
            p = pair_t[torch.randint(0, len(pair_t), (cfg.batch_pairs,), generator=gen).to(dev)]
            s = cfg.chunks_per_pair
            u = torch.rand(cfg.batch_pairs * s, generator=gen).to(dev)
            iw = data.at(p[:, 0].repeat_interleave(s), u)
            il = data.at(p[:, 1].repeat_interleave(s), u)
            loss, linfo = flow_dpo_loss(aligned.flow, ref_net, data.x[iw], data.x[il], data.cond[iw],
                                        data.cond[il], beta=cfg.beta, beta_schedule=cfg.beta_schedule,
                                        samples_per_pair=s, generator=gen)
        elif cfg.method == "rwr":
            idx = torch.randint(0, data.x.shape[0], (cfg.batch_size,), generator=gen).to(dev)
            loss, linfo = aligned.flow.loss(data.x[idx], data.cond[idx], weights=chunk_w[idx], generator=gen)
        else:
            idx = pool[torch.randint(0, pool.numel(), (cfg.batch_size,), generator=gen).to(dev)]
            loss, linfo = aligned.flow.loss(data.x[idx], data.cond[idx], generator=gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"align {cfg.method}: non-finite loss {float(loss)} at step {step}; "
                                     "lower lr or beta")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if isinstance(aligned.flow, ShortcutFlow):
            aligned.flow.update_ema()
        rec = {"train/loss": float(loss.detach()), "train/grad_norm": float(gnorm),
               **{"train/" + (k.split("/", 1)[-1] if k.startswith("loss/") else k.replace("/", "_")): v
                  for k, v in linfo.items()}}
        history.append(rec)
        if logger is not None and (step % 10 == 0 or step == cfg.steps - 1):
            logger.log(rec, step)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{rec['train/loss']:.4f}")
        if stop_requested():  # Ctrl-C: stop after this step; the stage saves what was aligned so far
            info["stopped_at"] = step + 1
            break
    bar.close()
    info["final"] = {k: float(np.mean([h[k] for h in history[-20:]])) for k in history[-1]}
    info["history"] = history
    return aligned.eval(), info


# --- the stage ----------------------------------------------------------------------------------------------


def preference_data(policy: FlowPolicy, cfg: AlignConfig, env_name: str, max_episode_steps: int | None,
                    dataset: str | None) -> tuple[list[Trajectory], list[tuple[int, int]], dict[str, Any]]:
    """Trajectories and (winner, loser) pairs from ``cfg.source``; plus a JSON-able description."""
    t0 = time.perf_counter()
    if cfg.source == "rollouts":
        trajs = collect_rollouts(policy, env_name, cfg.num_start_states, cfg.rollouts_per_state, cfg.K,
                                 cfg.rollout_seed, max_episode_steps, cfg.rollout_envs)
    else:
        if not dataset:
            raise ValueError(f"source={cfg.source} needs a demo file (stage.dataset=...)")
        trajs = dataset_trajectories(dataset, policy.obs_horizon, policy.action_horizon)
    if cfg.source == "labels":
        pairs = read_preference_labels(cfg.labels, trajs)
    else:
        pairs = preference_pairs(trajs, cfg.min_return_gap, cfg.pairing)
    rets = np.array([tr.ret for tr in trajs])
    desc = {"source": cfg.source, "trajectories": len(trajs), "pairs": len(pairs),
            "return_mean": float(rets.mean()), "return_std": float(rets.std()),
            "success_rate": float(np.mean([bool(tr.success) for tr in trajs])),
            "winner_return_mean": float(np.mean([trajs[w].ret for w, _ in pairs])) if pairs else None,
            "loser_return_mean": float(np.mean([trajs[l].ret for _, l in pairs])) if pairs else None,
            "collect_s": time.perf_counter() - t0}
    if cfg.source != "rollouts":
        desc["dataset"] = str(dataset)
    return trajs, pairs, desc


def evaluate(policy: FlowPolicy, env_name: str, cfg: AlignConfig, max_episode_steps: int | None,
             label: str) -> list[dict[str, Any]]:
    """Deterministic evaluation at ``cfg.eval_steps`` (default [K]) with agents.evaluate."""
    ks = cfg.eval_steps or [cfg.K or policy.default_steps]
    return evaluate_policy_steps(policy, env_name, ks, episodes=cfg.eval_episodes, num_envs=cfg.eval_num_envs,
                                 seed=cfg.eval_seed, max_episode_steps=max_episode_steps, label=label)


def run_align_stage(cfg, run_dir: str | Path, checkpoint: str) -> dict[str, Any]:
    """``stage=align``: preference data, evaluation before, alignment, evaluation after, checkpoint, JSON.

    Image tasks (``task.kind=image``) go to :func:`agents.images.align.run_image_align` with a generator
    checkpoint. Returns a summary and writes ``align.json``, ``eval_before.*`` and ``eval_after.*`` in
    ``run_dir`` and the aligned checkpoint under ``run_dir/checkpoints``.
    """
    from omegaconf import DictConfig, OmegaConf

    if cfg.task.get("kind", "policy") == "image":
        from .images.align import run_image_align

        return run_image_align(cfg, run_dir, checkpoint)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stage = cfg.stage
    s = OmegaConf.to_container(stage, resolve=True) if isinstance(stage, DictConfig) else dict(stage)
    for key in ("name", "image"):
        s.pop(key, None)
    s.setdefault("device", cfg.get("device", "cpu"))
    s.setdefault("progress", bool(cfg.get("progress", True)))
    acfg = AlignConfig.from_dict(s)
    acfg.validate()
    t_start = time.perf_counter()
    seed_everything(acfg.seed)
    policy, ck = policy_from_checkpoint(checkpoint, device=acfg.device)
    if not isinstance(policy, FlowPolicy):
        raise ValueError(f"{checkpoint}: alignment needs a flow policy (reflow or shortcut), got "
                         f"{policy.kind!r}")
    env_name = ck["env_meta"].get("name") or cfg.task.env
    max_steps = cfg.task.get("max_episode_steps")
    dataset = acfg.dataset
    if acfg.source != "rollouts" and not dataset:
        dataset = demos_for(cfg)
    trajs, pairs, data_desc = preference_data(policy, acfg, env_name, max_steps, dataset)
    evaluated = acfg.eval_episodes > 0
    before = evaluate(policy, env_name, acfg, max_steps, f"{policy.kind} (before)") if evaluated else []
    logger = Logger(run_dir / "tb" if cfg.get("logger", {}).get("name", "none") != "none" else None)
    try:
        t0 = time.perf_counter()
        with StopOnInterrupt("alignment"):
            aligned, info = align_policy(policy, trajs, pairs, acfg, logger)
        train_s = time.perf_counter() - t0
    finally:
        logger.close()
    spec = dict(ck["config"]["policy"])
    if acfg.K:  # the aligned policy acts with the K it was aligned and evaluated at
        spec["default_steps"] = aligned.default_steps = int(acfg.K)
    cfg_out = {**policy_config(aligned, spec), "stage": "align", "aligned_from": str(ck["path"]),
               "align": acfg.to_dict(), "preference_data": data_desc}
    if "stopped_at" in info:  # Ctrl-C: save the policy as aligned so far, once, and stop
        n = info["stopped_at"]
        path = save_checkpoint(run_dir / "checkpoints", n, {**cfg_out, "stopped_at_step": n}, aligned,
                               ck["env_meta"], {"step": n}, extra_modules(aligned), tags=("last",))
        atomic_write_json(run_dir / "align_history.json", info["history"], indent=None)
        raise TrainingInterrupted(f"stopped at step {n}; saved {path}")
    label = f"{policy.kind} ({acfg.method})"
    after = evaluate(aligned, env_name, acfg, max_steps, label) if evaluated else []
    path = save_checkpoint(run_dir / "checkpoints", acfg.steps, cfg_out, aligned, ck["env_meta"],
                           {"step": acfg.steps}, extra_modules(aligned), tags=("last",))
    md = []
    if before:
        md.append(write_eval(before, run_dir, "eval_before"))
        md.append(write_eval(after, run_dir, "eval_after"))
    summary = {"method": acfg.method, "checkpoint": str(path), "pretrained": str(ck["path"]), "env": env_name,
               "preference_data": data_desc, "train": {k: v for k, v in info.items() if k != "history"},
               "train_s": train_s, "eval_before": before, "eval_after": after,
               "wall_s": time.perf_counter() - t_start, "config": acfg.to_dict()}
    atomic_write_json(run_dir / "align.json", summary, default=str)
    atomic_write_json(run_dir / "align_history.json", info["history"], indent=None)
    summary["markdown"] = "\n\n".join(md)
    return summary
