"""The actors PPO fine-tunes, behind one contract (:class:`PPOActor`), and the critic.

- :class:`FlowActor`: a FlowPolicy (rectified flow or shortcut) plus a :class:`~flowpolicy.reinflow.NoiseNet`;
  it samples the noisy K-step chain and stores it (B, K + 1, Ta, Da); its log-prob is the exact chain
  log-prob (:class:`~flowpolicy.reinflow.NoisyFlowSampler`).
- :class:`GaussianActor`: a GaussianPolicy; it stores the sampled (unclipped) normalized action (B, Ta, Da).

- :class:`FPOActor`: Flow Policy Optimization; no noise network, its ratio is built from flow-matching losses.

A new policy kind plugs in with :func:`register_actor` (its kind string -> an actor class), a new algorithm
with :func:`register_algorithm` (``algo=<name>``); nothing in the PPO loop names a kind or an algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from agents.finetune_config import FinetuneConfig
from agents.ppo_utils import clone_module
from agents.registry import ALGORITHM_NAMES
from flowpolicy import rng
from flowpolicy.reinflow import NoiseNet, NoisyFlowSampler, gaussian_log_prob


@dataclass
class ActorSample:
    """latent: what PPO stores and scores (B, *latent_shape); action: normalized, clipped (B, Ta, Da)."""

    latent: torch.Tensor
    action: torch.Tensor
    log_prob: torch.Tensor  # (B,)


class PPOActor(nn.Module):
    """What PPO needs from a policy. ``cond`` is always (B, Dc) normalized condition features.

    Subclasses keep the policy in eval mode (no dropout), so sampling and scoring see the same function.
    """

    policy: nn.Module
    logprob_count: int = 1  # executed action dims Te * Da; log-probs are divided by it when normalized
    logprob_scale: float = 1.0  # what the returned log-probs were multiplied by (1 / count or 1)

    def act(self, cond: torch.Tensor, deterministic: bool = False,
            generator: torch.Generator | None = None) -> ActorSample:
        raise NotImplementedError

    def evaluate(self, cond: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_prob (B,), entropy (B,)) of stored latents under the current parameters."""
        raise NotImplementedError

    def bc_loss(self, cond: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """W2 regularizer: MSE between the frozen reference's action and the current one (same noise)."""
        raise NotImplementedError

    def sigma_stats(self, cond: torch.Tensor) -> tuple[float, float, float]:
        """(mean, min, max) of the exploration std over ``cond`` (normalized action units)."""
        raise NotImplementedError

    def set_noise_bounds(self, sigma_min: float, sigma_max: float) -> None:
        """Apply the noise-bound schedule (no-op where the actor has no bounded noise)."""

    def param_groups(self, cfg: FinetuneConfig) -> list[dict]:
        raise NotImplementedError


class FlowActor(PPOActor):
    """ReinFlow actor: FlowPolicy + NoiseNet; latent = the chain (B, K + 1, Ta, Da).

    Trained parameters: the velocity network ``policy.flow.net`` and the noise net. The observation
    normalizer is fixed; a shortcut model's EMA copy is not updated (it is stale after fine-tuning).
    """

    def __init__(self, policy: nn.Module, cfg: FinetuneConfig, exec_horizon: int | None = None) -> None:
        super().__init__()
        ta, da = int(policy.action_horizon), int(policy.act_dim)
        noise_net = NoiseNet(policy.cond_dim, (ta, da), cfg.sigma_min, cfg.sigma_max, cfg.noise_time_dependent,
                             cfg.noise_hidden, cfg.noise_depth)
        self.sampler = NoisyFlowSampler(policy, noise_net, cfg.denoise_steps, cfg.clip_intermediate, cfg.clip_action,
                                        cfg.include_x0_logprob, cfg.normalize_logprob, exec_horizon=exec_horizon,
                                        init_noise_scale=cfg.init_noise_scale, noise_steps=cfg.noise_steps)
        self.logprob_count = self.sampler.logprob_count
        self.logprob_scale = 1.0 / self.logprob_count if cfg.normalize_logprob else 1.0
        self.reference = clone_module(policy)
        self.eval()

    @property
    def policy(self) -> nn.Module:  # a property, so the weights appear once in state_dict (under sampler.)
        return self.sampler.policy

    @property
    def noise_net(self) -> NoiseNet:
        return self.sampler.noise_net

    def act(self, cond, deterministic=False, generator=None) -> ActorSample:
        chain, logp = self.sampler.sample(cond, deterministic=deterministic, generator=generator)
        action = self.sampler.action(chain)  # clipped to +-clip_action where that is set
        return ActorSample(chain, self.policy.clamp_normalized(action) if self.sampler.clip_action is None
                           else action, logp)

    def evaluate(self, cond, latent):
        return self.sampler.log_prob(latent, cond)

    def bc_loss(self, cond, latent):
        x0 = latent[:, 0]
        with torch.no_grad():
            ref = self.sampler.mean_action(cond, x0, policy=self.reference)
        return (self.sampler.mean_action(cond, x0) - ref).pow(2).mean()

    def sigma_stats(self, cond):
        s = self.sampler.sigmas(cond, self.sampler.grid())
        return float(s.mean()), float(s.min()), float(s.max())

    def set_noise_bounds(self, sigma_min, sigma_max) -> None:
        self.noise_net.set_bounds(sigma_min, sigma_max)

    def param_groups(self, cfg):
        noise_lr = cfg.actor_lr if cfg.noise_lr is None else cfg.noise_lr
        return [{"params": list(self.policy.flow.net.parameters()), "lr": cfg.actor_lr, "base_lr": cfg.actor_lr},
                {"params": list(self.noise_net.parameters()), "lr": noise_lr, "base_lr": noise_lr}]


class GaussianActor(PPOActor):
    """Gaussian baseline: latent = the sampled normalized action chunk before clipping (B, Ta, Da).

    Its std is the policy's own learned ``log_std`` (the noise-bound schedule does not apply; ``gaussian_init_std`` sets it at the start). The log-prob
    covers the executed actions only (the first Te of the chunk: the others are marginalized out exactly, as
    the entries of a diagonal Gaussian are independent); ``normalize_logprob`` divides log-prob and entropy by
    Te * Da, the same count as the flow actor's.
    """

    def __init__(self, policy: nn.Module, cfg: FinetuneConfig, exec_horizon: int | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.reference = clone_module(policy)
        self.clip_action = cfg.clip_action
        self.exec_horizon = int(policy.action_horizon if exec_horizon is None else exec_horizon)
        if not 1 <= self.exec_horizon <= policy.action_horizon:
            raise ValueError(f"exec_horizon must be in [1, Ta={policy.action_horizon}], got {exec_horizon}")
        self.logprob_count = self.exec_horizon * int(policy.act_dim)
        self.logprob_scale = self.scale = 1.0 / self.logprob_count if cfg.normalize_logprob else 1.0
        if cfg.gaussian_init_std is not None:  # explore wider (or narrower) than behavior cloning left it
            with torch.no_grad():
                policy.log_std.fill_(math.log(cfg.gaussian_init_std))
        self.eval()

    def _executed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Ta * Da) -> (B, Te * Da): the entries of the executed actions (row-major chunk layout)."""
        return x[:, : self.logprob_count]

    def _shape(self, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(a.shape[0], self.policy.action_horizon, self.policy.act_dim)

    def act(self, cond, deterministic=False, generator=None) -> ActorSample:
        dist = self.policy.distribution(cond)
        a = dist.mean
        if not deterministic:
            a = a + dist.stddev * rng.randn(a.shape, generator, a.device)
        ex = self._executed
        logp = gaussian_log_prob(ex(a), ex(dist.mean), ex(dist.stddev)).sum(-1) * self.scale
        latent = self._shape(a)
        action = (self.policy.clamp_normalized(latent) if self.clip_action is None
                  else latent.clamp(-self.clip_action, self.clip_action))
        return ActorSample(latent, action, logp)

    def evaluate(self, cond, latent):
        dist = self.policy.distribution(cond)
        a, ex = latent.reshape(latent.shape[0], -1), self._executed
        return (gaussian_log_prob(ex(a), ex(dist.mean), ex(dist.stddev)).sum(-1) * self.scale,
                ex(dist.entropy()).sum(-1) * self.scale)

    def bc_loss(self, cond, latent):
        with torch.no_grad():
            ref = self.reference.distribution(cond).mean
        return (self.policy.distribution(cond).mean - ref).pow(2).mean()

    def sigma_stats(self, cond):
        s = self._executed(self.policy.distribution(cond).stddev.detach())
        return float(s.mean()), float(s.min()), float(s.max())

    def param_groups(self, cfg):
        return [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": cfg.actor_lr,
                 "base_lr": cfg.actor_lr}]


class FPOActor(PPOActor):
    """Flow Policy Optimization (McAllister et al., 2025): PPO for a flow policy without a likelihood.

    Exploration comes from the initial noise alone: a rollout samples x0 ~ N(0, I) and integrates the policy's
    ODE (K Euler steps) to the chunk a. With it, ``fpo_mc_samples`` pairs (eps_i, t_i), eps_i ~ N(0, I),
    t_i ~ U(0, 1), are drawn and stored. The "log-prob" is minus the conditional flow-matching loss of a,

        L(a) = 1/N sum_i || v(t_i a + (1 - t_i) eps_i, t_i | s) - (a - eps_i) ||^2   (executed entries only),

    so PPO's ratio exp(logp_new - logp_old) is FPO's exp(L_old - L_new) on the same (eps_i, t_i): 1 at the
    first minibatch, and PPO's clipping bounds how far one update moves L. The loss term is a lower bound of
    the log-likelihood up to a constant (the ELBO view of flow matching), so no noise network is needed.
    Deterministic evaluation integrates the ODE from x0 ~ N(0, tau^2 I) with ``init_noise_scale`` tau, as
    the saved policy does. Latent (B, N + 1, Ta * Da + 1): row 0 the chunk (last entry 0), rows 1..N the
    pairs (eps_i, then t_i).
    """

    def __init__(self, policy: nn.Module, cfg: FinetuneConfig, exec_horizon: int | None = None) -> None:
        super().__init__()
        if getattr(policy, "kind", None) not in ("reflow", "shortcut"):
            raise ValueError(f"algo=fpo fine-tunes flow policies (reflow, shortcut), not {policy.kind!r}")
        self.policy = policy
        self.reference = clone_module(policy)
        self.steps, self.n_mc = int(cfg.denoise_steps), int(cfg.fpo_mc_samples)
        self.ta, self.da = int(policy.action_horizon), int(policy.act_dim)
        self.exec_horizon = int(self.ta if exec_horizon is None else exec_horizon)
        self.logprob_count = self.exec_horizon * self.da
        self.logprob_scale = 1.0 / self.logprob_count if cfg.normalize_logprob else 1.0
        self.clip_action = cfg.clip_action
        self.init_noise_scale = float(cfg.init_noise_scale)
        self.eval()

    def _ode(self, cond, x0, policy=None):
        return (policy or self.policy).predict_normalized(cond, steps=self.steps, x0=x0)

    def _velocity(self, x, t, cond):
        d = None
        if self.policy.kind == "shortcut":  # the flow-matching level: the finest step size
            d = torch.full_like(t, self.policy.flow.finest_step)
        return self.policy.velocity(x, t, cond, d)

    def cfm_loss(self, cond: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """(B,) flow-matching loss of the stored chunks on their stored (eps_i, t_i), executed entries summed."""
        b, n, dd = latent.shape[0], latent.shape[1] - 1, self.ta * self.da
        a, eps, t = latent[:, :1, :dd], latent[:, 1:, :dd], latent[:, 1:, dd]
        x_t = t[..., None] * a + (1.0 - t[..., None]) * eps
        v = self._velocity(x_t.reshape(b * n, self.ta, self.da), t.reshape(b * n), cond.repeat_interleave(n, 0))
        err = (v.reshape(b, n, dd) - (a - eps)).pow(2)[..., : self.logprob_count]
        return err.sum(-1).mean(-1)

    def act(self, cond, deterministic=False, generator=None) -> ActorSample:
        b, dd = cond.shape[0], self.ta * self.da
        scale = self.init_noise_scale if deterministic else 1.0
        a = self._ode(cond, rng.randn((b, self.ta, self.da), generator, cond.device) * scale)
        eps = rng.randn((b, self.n_mc, dd), generator, cond.device)
        t = rng.rand((b, self.n_mc, 1), generator, cond.device)
        latent = torch.cat([torch.cat([a.reshape(b, 1, dd), torch.zeros(b, 1, 1, device=cond.device)], -1),
                            torch.cat([eps, t], -1)], 1)
        action = (self.policy.clamp_normalized(a) if self.clip_action is None
                  else a.clamp(-self.clip_action, self.clip_action))
        return ActorSample(latent, action, -self.cfm_loss(cond, latent) * self.logprob_scale)

    def evaluate(self, cond, latent):
        logp = -self.cfm_loss(cond, latent) * self.logprob_scale
        return logp, torch.zeros_like(logp)

    def bc_loss(self, cond, latent):
        x0 = latent[:, 1, : self.ta * self.da].reshape(-1, self.ta, self.da)
        with torch.no_grad():
            ref = self._ode(cond, x0, self.reference)
        return (self._ode(cond, x0) - ref).pow(2).mean()

    def sigma_stats(self, cond):
        return 0.0, 0.0, 0.0  # no injected noise: exploration is the initial noise

    def param_groups(self, cfg):
        return [{"params": list(self.policy.flow.net.parameters()), "lr": cfg.actor_lr, "base_lr": cfg.actor_lr}]


ACTORS: dict[str, type[PPOActor]] = {"reflow": FlowActor, "shortcut": FlowActor, "gaussian": GaussianActor}
# fine-tuning algorithms by name (`algo=<name>`; FinetuneConfig.algo): each is an actor the one PPO loop trains
ALGORITHMS: dict[str, type[PPOActor]] = {"reinflow": FlowActor, "ppo": GaussianActor, "fpo": FPOActor}


def register_actor(kind: str, actor_cls: type[PPOActor]) -> None:
    """Fine-tune policies whose ``kind`` is ``kind`` with ``actor_cls(policy, cfg, exec_horizon)``."""
    if not (isinstance(actor_cls, type) and issubclass(actor_cls, PPOActor)):
        raise TypeError(f"register_actor({kind!r}, ...) needs a PPOActor subclass, got {actor_cls!r}")
    ACTORS[str(kind)] = actor_cls


def register_algorithm(name: str, actor_cls: type[PPOActor]) -> None:
    """Make ``algo=<name>`` (``FinetuneConfig.algo``) fine-tune with ``actor_cls(policy, cfg, exec_horizon)``."""
    if not (isinstance(actor_cls, type) and issubclass(actor_cls, PPOActor)):
        raise TypeError(f"register_algorithm({name!r}, ...) needs a PPOActor subclass, got {actor_cls!r}")
    ALGORITHMS[str(name)] = actor_cls
    ALGORITHM_NAMES.add(str(name))


def make_actor(policy: nn.Module, cfg: FinetuneConfig, exec_horizon: int | None = None) -> PPOActor:
    """The actor of ``cfg.algo`` (reinflow, ppo, fpo, or a registered one), or, with ``algo`` unset, the
    registered actor of ``policy.kind`` (FlowActor for reflow/shortcut, GaussianActor for gaussian).

    ``exec_horizon``: actions of each chunk the env executes (None: the whole chunk, Ta).
    """
    algo = getattr(cfg, "algo", None)
    kind = getattr(policy, "kind", None)
    if algo is not None:
        if algo not in ALGORITHMS:
            raise ValueError(f"unknown fine-tuning algo {algo!r}; expected one of {sorted(ALGORITHMS)}")
        flows = ("reflow", "shortcut")
        if (algo == "ppo" and kind in flows) or (algo == "reinflow" and kind == "gaussian"):
            raise ValueError(f"algo={algo} does not fine-tune a {kind} policy (reinflow/fpo: flows; ppo: gaussian)")
        return ALGORITHMS[algo](policy, cfg, exec_horizon)
    if kind not in ACTORS:
        raise ValueError(f"cannot fine-tune a policy of kind {kind!r}; expected one of {sorted(ACTORS)} "
                         "(agents.actors.register_actor adds one)")
    return ACTORS[kind](policy, cfg, exec_horizon)


class ValueNet(nn.Module):
    """V(s): MLP on condition features (B, Dc) -> (B,)."""

    def __init__(self, cond_dim: int, hidden: tuple[int, ...] = (256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = cond_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.Mish()]
            d = h
        out = nn.Linear(d, 1)
        nn.init.zeros_(out.bias)
        out.weight.data.mul_(0.1)
        self.mlp = nn.Sequential(*layers, out)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.mlp(cond).squeeze(-1)
