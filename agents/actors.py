"""The actors PPO fine-tunes, behind one contract (:class:`PPOActor`), and the critic.

- :class:`FlowActor`: a FlowPolicy (rectified flow or shortcut) plus a :class:`~flowpolicy.reinflow.NoiseNet`;
  it samples the noisy K-step chain and stores it (B, K + 1, Ta, Da); its log-prob is the exact chain
  log-prob (:class:`~flowpolicy.reinflow.NoisyFlowSampler`).
- :class:`GaussianActor`: a GaussianPolicy; it stores the sampled (unclipped) normalized action (B, Ta, Da).

A new policy kind plugs in with :func:`register_actor` (its kind string -> an actor class); nothing in the
PPO loop names a kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from agents.finetune_config import FinetuneConfig
from agents.ppo_utils import clone_module
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
        self.sampler = NoisyFlowSampler(policy, noise_net, cfg.steps, cfg.clip_intermediate, cfg.clip_action,
                                        cfg.include_x0_logprob, cfg.normalize_logprob, exec_horizon=exec_horizon,
                                        init_noise_scale=cfg.init_noise_scale)
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
        return ActorSample(chain, self.sampler.action(chain), logp)

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

    Its std is the policy's own learned ``log_std`` (the noise-bound schedule does not apply). The log-prob
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
        action = latent if self.clip_action is None else latent.clamp(-self.clip_action, self.clip_action)
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
        s = self._executed(self.policy.distribution(cond).stddev)
        return float(s.mean()), float(s.min()), float(s.max())

    def param_groups(self, cfg):
        return [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": cfg.actor_lr,
                 "base_lr": cfg.actor_lr}]


ACTORS: dict[str, type[PPOActor]] = {"reflow": FlowActor, "shortcut": FlowActor, "gaussian": GaussianActor}


def register_actor(kind: str, actor_cls: type[PPOActor]) -> None:
    """Fine-tune policies whose ``kind`` is ``kind`` with ``actor_cls(policy, cfg, exec_horizon)``."""
    if not (isinstance(actor_cls, type) and issubclass(actor_cls, PPOActor)):
        raise TypeError(f"register_actor({kind!r}, ...) needs a PPOActor subclass, got {actor_cls!r}")
    ACTORS[str(kind)] = actor_cls


def make_actor(policy: nn.Module, cfg: FinetuneConfig, exec_horizon: int | None = None) -> PPOActor:
    """The registered actor of ``policy.kind`` (FlowActor for reflow/shortcut, GaussianActor for gaussian).

    ``exec_horizon``: actions of each chunk the env executes (None: the whole chunk, Ta).
    """
    kind = getattr(policy, "kind", None)
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
