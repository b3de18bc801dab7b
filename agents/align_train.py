"""The alignment loop: :func:`align_policy` fine-tunes a copy of a flow policy by Flow-DPO, Flow-RWR or SFT
on the preference data of :mod:`agents.align_data` (:mod:`agents.align` re-exports it).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from flowpolicy.align import flow_dpo_loss, rwr_weights
from flowpolicy.flow import ShortcutFlow
from flowpolicy.policy import FlowPolicy

from .align_data import AlignConfig, Trajectory
from .loop import (
    History,
    LogScalars,
    NonFiniteGuard,
    ProgressBar,
    ShortcutTarget,
    StopOnCtrlC,
    SupervisedLoop,
    every,
)
from .tblog import Logger


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
                 logger: Logger | None = None, step_offset: int = 0) -> tuple[FlowPolicy, dict[str, Any]]:
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

    def loss_fn(step: int) -> tuple[torch.Tensor, dict]:
        if cfg.method == "dpo":
            p = pair_t[torch.randint(0, len(pair_t), (cfg.batch_pairs,), generator=gen).to(dev)]
            s = cfg.chunks_per_pair
            u = torch.rand(cfg.batch_pairs * s, generator=gen).to(dev)
            iw = data.at(p[:, 0].repeat_interleave(s), u)
            il = data.at(p[:, 1].repeat_interleave(s), u)
            return flow_dpo_loss(aligned.flow, ref_net, data.x[iw], data.x[il], data.cond[iw], data.cond[il],
                                 beta=cfg.beta, beta_schedule=cfg.beta_schedule, samples_per_pair=s,
                                 generator=gen)
        if cfg.method == "rwr":
            idx = torch.randint(0, data.x.shape[0], (cfg.batch_size,), generator=gen).to(dev)
            return aligned.flow.loss(data.x[idx], data.cond[idx], weights=chunk_w[idx], generator=gen)
        idx = pool[torch.randint(0, pool.numel(), (cfg.batch_size,), generator=gen).to(dev)]
        return aligned.flow.loss(data.x[idx], data.cond[idx], generator=gen)

    history = History(lambda s: {
        "train/loss": float(s.value), "train/grad_norm": float(s.grad_norm),
        **{"train/" + (k.split("/", 1)[-1] if k.startswith("loss/") else k.replace("/", "_")): v
           for k, v in s.info.items()}})
    loop = SupervisedLoop(params, opt, loss_fn, grad_clip=cfg.grad_clip, callbacks=[
        NonFiniteGuard(lambda s: f"align {cfg.method}: non-finite loss {float(s.value)} at step {s.index}; "
                                 "lower lr or beta"),
        ShortcutTarget(aligned.flow),
        history,
        LogScalars(logger, lambda s: history.records[-1], every(10, cfg.grad_steps, first=True),
                   at=lambda s: step_offset + s.index),
        ProgressBar(cfg.grad_steps, f"align {cfg.method}", disable=not cfg.progress, postfix_every=20),
        StopOnCtrlC(),  # Ctrl-C: stop after this step; the stage saves what was aligned so far
    ])
    done = loop.run(cfg.grad_steps)
    if loop.stopped:
        info["stopped_at"] = done
    history = history.records
    info["final"] = {k: float(np.mean([h[k] for h in history[-20:]])) for k in history[-1]}
    info["history"] = history
    return aligned.eval(), info

