"""Reflow for action policies (Liu et al. 2023): 2-rectified flow and its 1-step distillation.

From a pretrained ReFlow policy (the 1-rectified flow, 1-RF):

1. couplings: for dataset observations o, draw x0 ~ N(0, I) and solve the 1-RF's ODE to x1_hat, all in the
   policy's normalized space (condition ``policy.encode_obs(o)``, action chunk in [-1, 1] units, unclipped);
2. 2-RF: a deep copy of the policy, initialized from its weights, trained by flow matching on the fixed pairs
   (``policy.flow.loss(x1_hat, cond, x0=x0)``); its paths are straighter, so few Euler steps lose less;
3. distillation: a copy of the 2-RF trained to jump x0 -> x1 in one step (``flowpolicy.distillation_loss``) on
   pairs drawn from the 2-RF's own ODE (as InstaFlow does; ``distill_on="reflow"`` reuses the 1-RF pairs).

Every result is a new :class:`flowpolicy.policy.FlowPolicy` (kind stays ``reflow``), saved by
:func:`save_reflow_checkpoint` as an ordinary policy checkpoint that ``policy_from_checkpoint`` loads, with
``reflow: {rectification, distilled_steps, ...}`` recorded in its ``config.yaml``.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from envs.dataset import DemoDataset
from flowpolicy import ShortcutFlow, distillation_loss, make_couplings
from flowpolicy.policy import FlowPolicy

from .checkpoint import save_checkpoint
from .errors import check_at_least, check_positive
from .loop import fit
from .policies import policy_config


@dataclass
class PolicyReflowConfig:
    """Settings of :func:`rectify_policy`.

    Args:
        pairs_per_obs: couplings drawn per dataset observation (different noise each).
        coupling_steps, coupling_solver: ODE solve that produces x1_hat (fine grid: the pairs are the teacher).
        reflow_steps, reflow_lr: 2-RF training (AdamW, cosine decay to 5 %, gradient clipping).
        distill_steps, distill_lr: 1-step distillation of the 2-RF; ``distill_steps=0`` skips it.
        distill_on: ``"rectified"`` (pairs from the 2-RF's own ODE, same x0) or ``"reflow"`` (the 1-RF pairs).
        batch_size: pairs per gradient step.
    """

    pairs_per_obs: int = 4
    coupling_steps: int = 100
    coupling_solver: str = "euler"
    reflow_steps: int = 2000
    reflow_lr: float = 3e-4
    distill_steps: int = 1000
    distill_lr: float = 1e-4
    distill_on: str = "rectified"
    batch_size: int = 256
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    progress: bool = False

    def validate(self) -> None:
        check_at_least({name: getattr(self, name) for name in ("pairs_per_obs", "coupling_steps", "reflow_steps",
                                                                "batch_size")}, 1, "reflow.")
        check_at_least({"distill_steps": self.distill_steps}, 0, "reflow.")  # 0: no distillation
        check_positive({"reflow_lr": self.reflow_lr, "distill_lr": self.distill_lr}, "reflow.")
        if self.distill_on not in ("rectified", "reflow"):
            raise ValueError(f"reflow.distill_on must be 'rectified' or 'reflow', got {self.distill_on!r}")


@dataclass
class PolicyCouplings:
    """Fixed (noise, action) pairs in the policy's normalized space.

    cond: (N, To * Do) normalized condition; x0: (N, Ta, Da) noise; x1: (N, Ta, Da) the ODE's endpoint.
    """

    cond: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def sample(self, batch_size: int, generator: torch.Generator | None = None):
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.cond[idx], self.x0[idx], self.x1[idx]


@dataclass
class PolicyReflowResult:
    """``rectified``: the 2-RF policy; ``distilled``: its 1-step distillation (None when skipped);
    ``couplings``: the 1-RF pairs the 2-RF trained on; ``distill_couplings``: the pairs distilled on."""

    rectified: FlowPolicy
    distilled: FlowPolicy | None
    couplings: PolicyCouplings
    distill_couplings: PolicyCouplings | None
    info: dict[str, Any]


def _check_reflow_policy(policy) -> None:
    if not isinstance(policy, FlowPolicy) or isinstance(policy.flow, ShortcutFlow):
        kind = getattr(policy, "kind", type(policy).__name__)
        raise ValueError(f"reflow needs a pretrained ReFlow policy (FlowPolicy of kind 'reflow'), got {kind!r}")


def dataset_observations(path: str | os.PathLike, obs_horizon: int = 1, filter_key: str | None = "train",
                         split_seed: int = 0, obs_keys=None) -> torch.Tensor:
    """All observation histories of a demo file, (N, To, Do) in environment units (the pretraining inputs).
    ``obs_keys``: the file's obs keys in the pretraining's order (None: every low-dim key, sorted)."""
    ds = DemoDataset(path, obs_horizon, 1, filter_key=filter_key, split_seed=split_seed, obs_keys=obs_keys)
    return torch.stack([ds[i]["obs"] for i in range(len(ds))])


@torch.no_grad()
def policy_couplings(policy: FlowPolicy, obs, pairs_per_obs: int = 1, steps: int = 100, solver: str = "euler",
                     generator: torch.Generator | None = None, x0: torch.Tensor | None = None) -> PolicyCouplings:
    """Couplings of ``policy``'s ODE on observations ``obs`` (N, To, Do) (raw), each repeated ``pairs_per_obs``
    times. ``x0`` (N * pairs_per_obs, Ta, Da) reuses given noise (e.g. to re-solve the same pairs with
    another flow); otherwise fresh noise comes from ``generator``."""
    _check_reflow_policy(policy)
    policy.eval()
    cond = policy.encode_obs(obs).repeat_interleave(int(pairs_per_obs), dim=0)
    if x0 is None:
        x0, x1 = make_couplings(policy.flow, cond.shape[0], cond, steps=steps, solver=solver, generator=generator)
    else:
        if x0.shape[0] != cond.shape[0]:
            raise ValueError(f"policy_couplings: x0 has {x0.shape[0]} rows for {cond.shape[0]} conditions")
        x0 = x0.to(cond.device)
        x1 = torch.cat([policy.flow.sample(cond[i:i + 4096], steps=steps, solver=solver, x0=x0[i:i + 4096])
                        for i in range(0, cond.shape[0], 4096)])
    return PolicyCouplings(cond=cond, x0=x0, x1=x1)


def _train_copy(policy: FlowPolicy, couplings: PolicyCouplings, loss_of, steps: int, lr: float,
                cfg: PolicyReflowConfig, generator: torch.Generator, desc: str) -> tuple[FlowPolicy, list[float]]:
    new = copy.deepcopy(policy)
    new.reset()
    new.train()

    def loss_fn(i):
        cond, x0, x1 = couplings.sample(cfg.batch_size, generator)
        return loss_of(new, cond, x0, x1)

    history = fit(new.flow, loss_fn, steps, lr=lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                  progress=cfg.progress, desc=desc)
    return new.eval(), history


def reflow_on_couplings(policy: FlowPolicy, couplings: PolicyCouplings, cfg: PolicyReflowConfig,
                        generator: torch.Generator | None = None) -> tuple[FlowPolicy, list[float]]:
    """A copy of ``policy`` trained by flow matching on the fixed pairs (the next rectification)."""
    _check_reflow_policy(policy)
    g = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)

    def loss_of(p, cond, x0, x1):
        return p.flow.loss(x1, cond, x0=x0, generator=g)

    return _train_copy(policy, couplings, loss_of, cfg.reflow_steps, cfg.reflow_lr, cfg, g, "2-RF")


def distill_on_couplings(policy: FlowPolicy, couplings: PolicyCouplings, cfg: PolicyReflowConfig, steps: int = 1,
                         generator: torch.Generator | None = None) -> tuple[FlowPolicy, list[float]]:
    """A copy of ``policy`` distilled to ``steps`` Euler steps on the fixed pairs; its ``default_steps``
    becomes ``steps``."""
    _check_reflow_policy(policy)
    g = generator if generator is not None else torch.Generator().manual_seed(cfg.seed + 1)

    def loss_of(p, cond, x0, x1):
        return distillation_loss(p.flow, x0, x1, cond, steps=steps, generator=g)

    new, history = _train_copy(policy, couplings, loss_of, cfg.distill_steps, cfg.distill_lr, cfg, g, "distill")
    new.default_steps = int(steps)
    return new, history


def rectify_policy(policy: FlowPolicy, obs, cfg: PolicyReflowConfig | None = None) -> PolicyReflowResult:
    """1-RF policy + dataset observations (N, To, Do) -> 2-RF policy and its 1-step distillation (new objects;
    ``policy`` is left unchanged)."""
    cfg = cfg or PolicyReflowConfig()
    cfg.validate()
    _check_reflow_policy(policy)
    g = torch.Generator().manual_seed(cfg.seed)
    info: dict[str, Any] = {"config": asdict(cfg)}
    t0 = time.perf_counter()
    pairs = policy_couplings(policy, obs, cfg.pairs_per_obs, cfg.coupling_steps, cfg.coupling_solver, g)
    info["num_couplings"] = len(pairs)
    info["couplings_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rectified, hist = reflow_on_couplings(policy, pairs, cfg, g)
    info["reflow_s"] = time.perf_counter() - t0
    info["reflow_final_loss"] = float(sum(hist[-50:]) / len(hist[-50:]))
    distilled, dpairs = None, None
    if cfg.distill_steps > 0:
        t0 = time.perf_counter()
        if cfg.distill_on == "rectified":
            dpairs = policy_couplings(rectified, obs, cfg.pairs_per_obs, cfg.coupling_steps, cfg.coupling_solver,
                                      x0=pairs.x0)
        else:
            dpairs = pairs
        distilled, dhist = distill_on_couplings(rectified, dpairs, cfg, steps=1, generator=g)
        info["distill_s"] = time.perf_counter() - t0
        info["distill_final_loss"] = float(sum(dhist[-50:]) / len(dhist[-50:]))
    return PolicyReflowResult(rectified, distilled, pairs, dpairs, info)


def save_reflow_checkpoint(policy: FlowPolicy, spec: dict[str, Any], root: str | os.PathLike, step: int,
                           rectification: int = 2, distilled_steps: int | None = None,
                           env_meta: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None,
                           tags: tuple[str, ...] = ("last", "best")) -> Path:
    """Save a reflowed policy under ``root`` (a checkpoints folder) as an ordinary ReFlow policy checkpoint.

    The stored spec is ``spec`` with ``default_steps`` set to the policy's (1 for a 1-step distillation); the
    config records ``reflow: {rectification, distilled_steps, ...extra_config}``. Returns the checkpoint dir.
    """
    _check_reflow_policy(policy)
    if spec.get("kind", "reflow") != "reflow":
        raise ValueError(f"a reflowed policy keeps kind 'reflow'; spec has kind {spec.get('kind')!r}")
    spec = {**spec, "kind": "reflow", "default_steps": int(policy.default_steps)}
    reflow = {"rectification": int(rectification), "distilled_steps": distilled_steps, **(extra_config or {})}
    cfg = {**policy_config(policy, spec), "stage": "reflow", "reflow": reflow}
    return save_checkpoint(root, step, cfg, policy, env_meta, tags=tags)


@torch.no_grad()
def few_step_gap(policy: FlowPolicy, cond: torch.Tensor, x0: torch.Tensor, steps: int = 1,
                 reference_steps: int = 100) -> float:
    """Mean squared distance per action dimension (normalized units) between ``steps``-step and
    ``reference_steps``-step Euler solutions from the same noise: 0 for a perfectly straight flow."""
    few = policy.flow.sample(cond, steps=steps, x0=x0)
    ref = policy.flow.sample(cond, steps=reference_steps, x0=x0)
    return float((few - ref).pow(2).mean())
