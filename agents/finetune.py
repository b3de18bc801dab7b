"""Online fine-tuning with PPO: ReinFlow for flow policies, and the same PPO for the Gaussian baseline.

One PPO loop (:class:`ReinFlowPPO`) serves both through an actor abstraction (:class:`PPOActor`):

- :class:`FlowActor`: a FlowPolicy (rectified flow or shortcut) plus a :class:`~flowpolicy.reinflow.NoiseNet`;
  it samples the noisy K-step chain and stores it (B, K + 1, Ta, Da); its log-prob is the exact chain
  log-prob (:class:`~flowpolicy.reinflow.NoisyFlowSampler`).
- :class:`GaussianActor`: a GaussianPolicy; it stores the sampled (unclipped) normalized action (B, Ta, Da).

One PPO step is one action chunk: the env executes the chunk, its rewards are summed, and gamma is applied
once per chunk. The critic V(s) is an MLP on the policy's normalized condition features. Rewards are divided
by the running std of the discounted return; advantages are GAE(lambda) with bootstrapping from the last
observation of truncated episodes (never of terminated ones).

Resume is defined at iteration boundaries: :meth:`ReinFlowPPO.state_dict` captures the actor (policy and
noise net), the frozen reference policy, the critic, both optimizers (their learning rates are recomputed
from the iteration counter, which is the whole scheduler state), the reward scaler, the counters and the RNG
states (two torch generators; no numpy or global RNG is used). Env state cannot be saved, so with
``reset_at_iteration=True`` (default) every iteration starts by resetting the envs with a seed derived from
(seed, iteration): N iterations + save + load + M iterations then equals N + M iterations exactly. With
``reset_at_iteration=False`` the envs run on across iterations and a resumed run restarts its episodes at the
resume point (the only difference).

Evaluation is deterministic (noise off) at the fine-tuned K, on separate eval envs reset with ``eval_seed``,
with a dedicated generator for the flow's initial noise, so it never perturbs training.

Metric names: ``train/approx_kl``, ``train/clipfrac``, ``train/policy_loss``, ``train/value_loss``,
``train/entropy``, ``train/kl_per_dim`` (KL of the whole sample -- chain or action -- per executed action dimension, the
same scale for every actor; ``target_kl`` applies to it), ``train/log_ratio_std`` and
``train/log_ratio_absmax`` (spread of the log-ratio per executed action dimension over the samples of the
minibatches), ``train/sigma_obs_min``/``train/sigma_obs_max`` (exploration std over the batch),
``train/ratio_first_minibatch`` (mean |ratio - 1| of the first minibatch of an update,
before any step: 0 but for float32 matmul differences between the rollout's and the minibatch's batch sizes,
measured 0 on CPU for batches >= 8, about 2e-8 on an H200 with the default normalized log-prob and below
1e-6 unnormalized for a 2 x 2 chunk), ``train/sigma_mean``, ``train/bc_loss``, ``train/explained_variance``,
``train/grad_norm`` (the actor's gradient norm before clipping, mean over its steps),
``train/lr_actor``, ``train/lr_critic``, ``train/sigma_min``, ``train/sigma_max``, ``train/epochs``,
``train/actor_updated`` (0 during the critic warm-up), ``train/target_kl_stop``,
``charts/SPS``, ``charts/env_steps``, ``charts/iteration``, ``rollout/return_mean``, ``rollout/success_rate``,
``rollout/episodes``, ``eval/return_mean``, ``eval/return_std``, ``eval/success_rate``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from agents import distributed
from agents.ppo_utils import (
    LR_SCHEDULES,
    RunningRewardScaler,
    VecEnvStepper,
    clone_module,
    compute_gae,
    explained_variance,
    hold_then_linear,
    iteration_seed,
    lr_factor,
)
from envs.episodes import run_episodes
from flowpolicy import rng
from flowpolicy.reinflow import NoiseNet, NoisyFlowSampler, gaussian_log_prob

STATE_FORMAT_VERSION = 1


@dataclass
class FinetuneConfig:
    """PPO / ReinFlow fine-tuning settings (mirrored by ``configs/stage/finetune.yaml``).

    Units: a "step" of the rollout is one action chunk per env; ``gamma`` applies per chunk. Noise bounds are
    in the policy's normalized action units ([-1, 1]). Defaults marked (D) follow the ReinFlow paper's recipe;
    the others are our starting points, to be tuned per task.
    """

    # rollout
    num_envs: int = 16  # training envs (for whoever builds them; the agent reads envs.num_envs)
    eval_num_envs: int = 8  # evaluation envs (likewise)
    async_envs: bool = False  # training envs in worker processes (gymnasium AsyncVectorEnv), one per env
    n_steps: int = 256  # chunk steps per env per iteration; with reset_at_iteration keep n_steps * Ta >= episode
    reset_at_iteration: bool = True  # reset envs (seeded by iteration) at each iteration: exact resume
    gamma: float = 0.99  # (D) discount per chunk step
    gae_lambda: float = 0.95  # (D)
    reward_scaling: bool = True  # (D) divide rewards by the running std of the discounted return
    # training envs with a success signal (Meta-World, robosuite); evaluation always runs whole episodes
    terminate_on_success: bool = False  # end a training episode at its first successful step
    success_reward: float | None = None  # sparse reward: this on a successful step, 0 otherwise (None: the env's)
    # flow actor (ReinFlow)
    steps: int = 4  # (D) K denoising steps, fine-tuned and evaluated at this K
    sigma_min: float = 0.10  # (D) noise bounds at the start (locomotion)
    sigma_max: float = 0.24  # (D)
    sigma_min_final: float | None = None  # bounds after the decay (None: unchanged)
    sigma_max_final: float | None = None
    sigma_hold_iters: int = 0  # (D) hold the bounds this many iterations, then decay linearly ...
    sigma_decay_iters: int = 0  # ... over this many iterations (0: jump to the final bounds)
    noise_time_dependent: bool = False  # sigma(s, t) instead of sigma(s)
    noise_hidden: int = 128
    noise_depth: int = 2
    include_x0_logprob: bool = True  # add log N(x0; 0, I) (cancels in ratios)
    init_noise_scale: float = 1.0  # tau: chains start from x0 ~ N(0, tau^2 I) in rollouts and evaluation
    normalize_logprob: bool = True  # divide log-probs by the executed action dims Te * Da (every actor alike)
    clip_intermediate: float | None = None  # clamp chain states inside the transition mean (None: off)
    clip_action: float = 1.0  # clamp the normalized action sent to the env
    # PPO
    update_epochs: int = 10
    minibatch_size: int = 1024  # samples (env x chunk step) per minibatch
    clip_coef: float = 0.01  # (D) PPO ratio clip
    target_kl: float | None = None  # stop the update when a minibatch's KL per executed action dim exceeds this
    skip_clipped: bool = True  # backpropagate only the samples whose clipped PPO term has a gradient (exact)
    norm_adv: bool = True  # normalize advantages per minibatch
    ent_coef: float = 0.01  # (D) entropy bonus
    bc_coef: float = 0.0  # (D, optional) W2 regularizer: MSE to the frozen pretrained policy's action
    max_grad_norm: float = 1.0
    critic_warmup_iters: int = 2  # (D) first iterations train only the critic
    # optimization
    actor_lr: float = 5e-5
    noise_lr: float | None = None  # noise net (None: actor_lr)
    critic_lr: float = 5e-4
    lr_schedule: str = "constant"  # constant | linear | cosine, multiplier from 1 to lr_final_ratio ...
    lr_schedule_iters: int = 0  # ... over this many iterations (0: constant)
    lr_final_ratio: float = 0.1
    critic_hidden: tuple[int, ...] = (256, 256)
    # evaluation (deterministic, noise off, at K = steps)
    eval_every: int = 10  # iterations between evaluations (0: never); also once before the first iteration
    eval_episodes: int = 10
    eval_seed: int = 100_000
    eval_stochastic: bool = False  # also evaluate the policy as it acts in training (eval_stochastic/...)
    # misc
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.critic_hidden = tuple(int(h) for h in self.critic_hidden)
        checks = [
            (self.n_steps >= 1, "n_steps must be >= 1"),
            (self.steps >= 1, "steps (K) must be >= 1"),
            (0.0 < self.sigma_min <= self.sigma_max, "need 0 < sigma_min <= sigma_max"),
            (0.0 <= self.gamma <= 1.0 and 0.0 <= self.gae_lambda <= 1.0, "gamma and gae_lambda must be in [0, 1]"),
            (self.update_epochs >= 1 and self.minibatch_size >= 1, "update_epochs, minibatch_size must be >= 1"),
            (self.clip_coef > 0.0, "clip_coef must be > 0"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.critic_warmup_iters >= 0 and self.eval_every >= 0, "iteration counts must be >= 0"),
            (self.clip_action is None or self.clip_action > 0, "clip_action must be > 0"),
            (0.0 <= self.init_noise_scale <= 1.0, "init_noise_scale must be in [0, 1]"),
        ]
        lo, hi = self.final_bounds()
        checks.append((0.0 < lo <= hi, "need 0 < sigma_min_final <= sigma_max_final"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"FinetuneConfig: {msg}")

    def train_env_kwargs(self) -> dict[str, Any]:
        """Task options for the training envs (:func:`envs.factory.make_vec_env`): only those set."""
        out: dict[str, Any] = {}
        if self.terminate_on_success:
            out["terminate_on_success"] = True
        if self.success_reward is not None:
            out["success_reward"] = float(self.success_reward)
        return out

    def final_bounds(self) -> tuple[float, float]:
        lo = self.sigma_min if self.sigma_min_final is None else self.sigma_min_final
        hi = self.sigma_max if self.sigma_max_final is None else self.sigma_max_final
        return float(lo), float(hi)

    def noise_bounds(self, iteration: int) -> tuple[float, float]:
        """The (sigma_min, sigma_max) bounds in force at ``iteration``."""
        lo_f, hi_f = self.final_bounds()
        if (lo_f, hi_f) == (self.sigma_min, self.sigma_max):
            return self.sigma_min, self.sigma_max
        args = (self.sigma_hold_iters, self.sigma_decay_iters)
        return (hold_then_linear(iteration, self.sigma_min, lo_f, *args),
                hold_then_linear(iteration, self.sigma_max, hi_f, *args))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> FinetuneConfig:
        """Build from a mapping (e.g. Hydra's ``cfg.stage``); ``name`` is ignored, unknown keys raise."""
        d = {} if d is None else {k: d[k] for k in d}
        d.pop("name", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown finetune settings {unknown}; known: {sorted(known)}")
        if "critic_hidden" in d:
            d["critic_hidden"] = tuple(d["critic_hidden"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["critic_hidden"] = list(self.critic_hidden)
        return out


# --- actors ------------------------------------------------------------------------------------------


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


def make_actor(policy: nn.Module, cfg: FinetuneConfig, exec_horizon: int | None = None) -> PPOActor:
    """FlowActor for ``policy.kind`` in (reflow, shortcut), GaussianActor for ``gaussian``.

    ``exec_horizon``: actions of each chunk the env executes (None: the whole chunk, Ta).
    """
    kind = getattr(policy, "kind", None)
    if kind in ("reflow", "shortcut"):
        return FlowActor(policy, cfg, exec_horizon)
    if kind == "gaussian":
        return GaussianActor(policy, cfg, exec_horizon)
    raise ValueError(f"cannot fine-tune a policy of kind {kind!r}; expected reflow, shortcut or gaussian")


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


# --- the agent ---------------------------------------------------------------------------------------


class ReinFlowPPO:
    """PPO fine-tuning of a pretrained policy (ReinFlow for flow policies; plain PPO for Gaussian ones).

    The policy is fine-tuned in place (``agent.policy``); for flow policies its ``default_steps`` is set to
    ``cfg.steps`` and a rectified-flow policy's solver to ``euler``, so the saved policy acts like the
    fine-tuned chain with noise off.

    Args:
        policy: a pretrained FlowPolicy or GaussianPolicy (``flowpolicy.policy``).
        envs: training vector env; observations (N, To, Do) (or (N, Do) when To = 1), actions (N, Ta', Da)
            (or (N, Da)) with Ta' <= the policy's Ta (the first Ta' actions of each chunk are executed).
            Any autoreset mode works (see :class:`agents.ppo_utils.VecEnvStepper`).
        eval_envs: separate vector env for deterministic evaluation (None: no evaluation).
        cfg: :class:`FinetuneConfig` (or a mapping for :meth:`FinetuneConfig.from_dict`).
    """

    def __init__(self, policy: nn.Module, envs: gym.vector.VectorEnv, eval_envs: gym.vector.VectorEnv | None = None,
                 cfg: FinetuneConfig | Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg if isinstance(cfg, FinetuneConfig) else FinetuneConfig.from_dict(cfg)
        c = self.cfg
        self.device = torch.device(c.device)
        self.policy = policy.to(self.device)
        if getattr(policy, "kind", None) in ("reflow", "shortcut"):
            policy.default_steps = c.steps
            if policy.kind == "reflow":
                policy.solver = "euler"
        self.envs, self.eval_envs = envs, eval_envs
        self.env_chunk, self.env_action_shape = self._check_env(envs)
        if eval_envs is not None:
            self._check_env(eval_envs)
        # the new networks (noise net, critic) are initialized from the run's seed, not from whatever state the
        # caller left torch's global RNG in: two fresh runs with the same seed start (and so end) identically
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.actor = make_actor(policy, c, exec_horizon=self.env_chunk).to(self.device)
            self.critic = ValueNet(policy.cond_dim, c.critic_hidden).to(self.device)
        self.actor_optim = torch.optim.Adam(self.actor.param_groups(c), eps=1e-5)
        self.critic_optim = torch.optim.Adam([{"params": list(self.critic.parameters()), "lr": c.critic_lr,
                                               "base_lr": c.critic_lr}], eps=1e-5)
        self.stepper = VecEnvStepper(envs, self.env_chunk)
        self.num_envs = envs.num_envs  # this process's envs
        # data-parallel (torchrun): this process holds envs [env_offset, env_offset + num_envs) of
        # global_num_envs; every rank draws the global chain noise and minibatch permutations and keeps its part
        self.dist = distributed.info()
        self.env_offset = self.dist.rank * self.num_envs
        self.global_num_envs = self.num_envs * self.dist.world_size
        gather = None
        if self.dist.enabled:
            counts = distributed.all_gather_object(int(self.num_envs))
            if len(set(counts)) != 1:
                raise ValueError(f"data-parallel fine-tuning needs the same number of envs in every process, "
                                 f"got {counts}")
            if not c.reset_at_iteration:
                raise ValueError("data-parallel fine-tuning needs reset_at_iteration=true")

            def gather(ret: np.ndarray) -> np.ndarray:
                return distributed.all_gather_cat(torch.from_numpy(np.ascontiguousarray(ret))).numpy()

        self.reward_scaler = RunningRewardScaler(self.num_envs, c.gamma, gather=gather)
        if self.dist.enabled:
            ev = distributed.all_gather_object(None if eval_envs is None else int(eval_envs.num_envs))
            if len(set(ev)) != 1:
                raise ValueError(f"data-parallel fine-tuning needs the same eval envs in every process, got {ev}")
        # all randomness of training: chain noise / Gaussian samples, and minibatch permutations
        self.noise_gen = torch.Generator(device=self.device).manual_seed(c.seed)
        self.perm_gen = torch.Generator().manual_seed(c.seed + 1)
        self.iteration = 0
        self.env_steps = 0
        self.episodes = 0
        self._obs: Any = None  # current training observations (None: reset at the next iteration)

    # --- setup ----------------------------------------------------------------------------------------
    def _check_env(self, envs: gym.vector.VectorEnv) -> tuple[int, tuple[int, ...]]:
        shape = tuple(envs.single_action_space.shape)
        ta, da = self.policy.action_horizon, self.policy.act_dim
        if len(shape) == 1 and shape[0] == da and ta >= 1:
            if ta != 1:
                raise ValueError(f"env takes single actions {shape} but the policy predicts chunks of Ta={ta}; "
                                 "build the env with action_horizon > 1 (envs.factory.make_vec_env)")
            return 1, shape
        if len(shape) == 2 and shape[1] == da and 1 <= shape[0] <= ta:
            return shape[0], shape
        raise ValueError(f"env action shape {shape} does not fit the policy's chunks (Ta={ta}, Da={da})")

    def _env_actions(self, envs: gym.vector.VectorEnv, action_norm: torch.Tensor) -> np.ndarray:
        """Normalized (N, Ta, Da) -> env units, first Ta' actions, clipped to the action space."""
        a = self.policy.act_norm.unnormalize(action_norm)[:, : self.env_chunk].cpu().numpy()
        a = a.reshape(a.shape[0], *self.env_action_shape)
        space = envs.single_action_space
        return np.clip(a, space.low, space.high).astype(space.dtype)

    @torch.no_grad()
    def _cond(self, obs) -> torch.Tensor:
        return self.policy.encode_obs(obs).to(self.device)

    def _apply_schedules(self) -> tuple[float, float, float]:
        c = self.cfg
        f = lr_factor(c.lr_schedule, self.iteration, c.lr_schedule_iters, c.lr_final_ratio)
        for opt in (self.actor_optim, self.critic_optim):
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * f
        lo, hi = c.noise_bounds(self.iteration)
        self.actor.set_noise_bounds(lo, hi)
        return f, lo, hi

    # --- rollout --------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_rollout(self) -> dict[str, Any]:
        """Run ``n_steps`` chunk steps in every training env with the noisy policy.

        Returns a dict of tensors: cond (T, N, Dc), latent (T, N, *L), log_prob, reward (scaled), terminated,
        done (T, N), value, next_value (T, N); plus env_steps and completed-episode statistics.
        """
        c, n, T = self.cfg, self.num_envs, self.cfg.n_steps
        if c.reset_at_iteration or self._obs is None:
            self._obs = self.stepper.reset(seed=iteration_seed(c.seed, self.iteration) + self.env_offset)
            self.reward_scaler.reset_returns()
            self._ep_return = np.zeros(n)
            self._ep_success = np.zeros(n, bool)
        conds, latents, logps, rewards, terms, dones = [], [], [], [], [], []
        final_idx, final_conds = [], []
        ep_returns, ep_successes, env_steps = [], [], 0
        cond = self._cond(self._obs)
        for t in range(T):
            with rng.shard(self.dist.rank, self.dist.world_size):  # this rank's rows of the global noise
                out = self.actor.act(cond, generator=self.noise_gen)
            res = self.stepper.step(self._env_actions(self.envs, out.action))
            done = res.terminated | res.truncated
            env_steps += int(res.chunk_steps.sum())
            self._ep_return += res.reward
            self._ep_success |= res.success
            for i in np.flatnonzero(done):
                ep_returns.append(float(self._ep_return[i]))
                ep_successes.append(bool(self._ep_success[i]))
                final_idx.append((t, i))
            if done.any():
                final_conds.append(self._cond(_rows(res.final_obs, np.flatnonzero(done))))
            self._ep_return[done] = 0.0
            self._ep_success[done] = False
            r = self.reward_scaler(res.reward, done) if c.reward_scaling else res.reward
            conds.append(cond)
            latents.append(out.latent)
            logps.append(out.log_prob)
            rewards.append(torch.as_tensor(r, dtype=torch.float32))
            terms.append(torch.as_tensor(res.terminated, dtype=torch.float32))
            dones.append(torch.as_tensor(done, dtype=torch.float32))
            self._obs = res.obs
            cond = self._cond(res.obs)
        conds.append(cond)
        all_cond = torch.stack(conds)  # (T + 1, N, Dc)
        values_all = self.critic(all_cond.reshape((T + 1) * n, -1)).reshape(T + 1, n)
        next_value = values_all[1:].clone()
        if final_idx:
            v_final = self.critic(torch.cat(final_conds))
            ts, iis = zip(*final_idx)
            next_value[list(ts), list(iis)] = v_final
        dev = self.device
        return {
            "cond": all_cond[:T], "latent": torch.stack(latents), "log_prob": torch.stack(logps),
            "reward": torch.stack(rewards).to(dev), "terminated": torch.stack(terms).to(dev),
            "done": torch.stack(dones).to(dev), "value": values_all[:T], "next_value": next_value,
            "env_steps": env_steps, "ep_returns": ep_returns, "ep_successes": ep_successes,
        }

    # --- update ---------------------------------------------------------------------------------------
    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """PPO epochs over one rollout. The actor is trained only after ``critic_warmup_iters`` iterations."""
        c = self.cfg
        adv, ret = compute_gae(batch["reward"], batch["value"], batch["next_value"], batch["terminated"],
                               batch["done"], c.gamma, c.gae_lambda)
        n_total = adv.numel()
        cond = batch["cond"].reshape(n_total, -1)
        latent = batch["latent"].reshape(n_total, *batch["latent"].shape[2:])
        old_logp, adv, ret = batch["log_prob"].reshape(-1), adv.reshape(-1), ret.reshape(-1)
        actor_active = self.iteration >= c.critic_warmup_iters
        actor_params = [p for g in self.actor_optim.param_groups for p in g["params"]]
        stats: dict[str, list[float]] = {k: [] for k in ("approx_kl", "kl_per_dim", "clipfrac", "policy_loss",
                                                         "value_loss", "entropy", "bc_loss", "log_ratio_std",
                                                         "log_ratio_absmax", "grad_norm", "two_pass",
                                                         "carry_frac")}
        # log-ratio per executed action dim, whatever the normalization: comparable across actors
        per_dim = self.actor.logprob_scale * self.actor.logprob_count
        ratio_first, epochs_done, stop = float("nan"), 0, False
        dist_on = self.dist.enabled
        # skip_clipped: a sample whose clipped surrogate term is the larger one has a zero gradient; when few
        # samples carry a gradient (late epochs), a no-grad pass over the minibatch plus forward and backward
        # over the carriers is cheaper than forward and backward over everyone, for the same gradient.
        can_skip = c.skip_clipped and c.ent_coef == 0 and c.bc_coef <= 0
        carry_frac = 1.0  # gradient carriers in the last minibatch: decides one pass or two for the next
        n_global = n_total * self.dist.world_size  # samples of every process (global env order t * E + e)
        mb = min(c.minibatch_size, n_global)
        for _ in range(c.update_epochs):
            perm = torch.randperm(n_global, generator=self.perm_gen).to(self.device)
            for start in range(0, n_global, mb):
                idx = perm[start:start + mb]
                n_mb = idx.numel()
                if dist_on:  # this process's samples of the global minibatch, as local indices
                    t_, e_ = idx // self.global_num_envs, idx % self.global_num_envs - self.env_offset
                    own = (e_ >= 0) & (e_ < self.num_envs)
                    idx = t_[own] * self.num_envs + e_[own]
                first = math.isnan(ratio_first)
                two_pass = actor_active and can_skip and carry_frac < _TWO_PASS_BELOW
                # the actor pass is needed when training it, and once for the first-minibatch ratio
                with torch.set_grad_enabled(actor_active and not two_pass):
                    if actor_active or first:
                        if idx.numel():
                            new_logp, entropy = self.actor.evaluate(cond[idx], latent[idx])
                        else:  # data-parallel: none of this minibatch is here (zero sums, zero gradients)
                            new_logp = entropy = old_logp[:0]
                        log_ratio = new_logp - old_logp[idx]
                        ratio = log_ratio.exp()
                        a = adv[idx]
                        with torch.no_grad():
                            lr_full = log_ratio / self.actor.logprob_scale
                            lr_dim = log_ratio / per_dim
                            if dist_on:  # minibatch statistics over every process's share, in one all-reduce
                                g = _global_minibatch_stats(ratio, log_ratio, lr_full, lr_dim, a, c.clip_coef, n_mb)
                                approx_kl, kl_per_dim = g["approx_kl"], g["kl_full"] / self.actor.logprob_count
                                clipfrac, lr_std = g["clipfrac"], g["lr_dim_std"]
                                ratio_dev, adv_mean, adv_std = g["ratio_dev"], g["adv_mean"], g["adv_std"]
                            else:
                                approx_kl = float(((ratio - 1.0) - log_ratio).mean())
                                # k3 estimate of the KL of the whole sample (chain), per executed action dim
                                kl_per_dim = float(((lr_full.exp() - 1.0) - lr_full).mean()) / self.actor.logprob_count
                                clipfrac = float(((ratio - 1.0).abs() > c.clip_coef).float().mean())
                                lr_std = float(lr_dim.std()) if lr_dim.numel() > 1 else 0.0
                                ratio_dev = None
                            stats["log_ratio_std"].append(lr_std)
                            if lr_dim.numel():
                                stats["log_ratio_absmax"].append(float(lr_dim.abs().max()))
                            if first:
                                ratio_first = ratio_dev if dist_on else float((ratio - 1.0).abs().mean())
                        if actor_active and c.target_kl is not None and kl_per_dim > c.target_kl:
                            stop = True
                            break
                        if dist_on:
                            if c.norm_adv and n_mb > 1:
                                a = (a - adv_mean) / (adv_std + 1e-8)
                            clipped = -a * ratio.clamp(1.0 - c.clip_coef, 1.0 + c.clip_coef)
                            pg_terms = torch.max(-a * ratio, clipped)
                            # this process's share of the minibatch mean: the summed gradients are the mean's
                            pg_loss = pg_terms.sum() / n_mb
                            actor_loss = pg_loss - c.ent_coef * entropy.sum() / n_mb
                            if c.bc_coef > 0 and idx.numel():
                                bc = self.actor.bc_loss(cond[idx], latent[idx])
                                actor_loss = actor_loss + c.bc_coef * bc * (idx.numel() / n_mb)
                                stats["bc_loss"].append(float(bc.detach()))
                            pg_log = float(pg_terms.mean()) if idx.numel() else None
                            ent_log = float(entropy.detach().mean()) if idx.numel() else None
                        else:
                            if c.norm_adv and a.numel() > 1:
                                a = (a - a.mean()) / (a.std() + 1e-8)
                            clipped = -a * ratio.clamp(1.0 - c.clip_coef, 1.0 + c.clip_coef)
                            pg_loss = torch.max(-a * ratio, clipped).mean()
                            actor_loss = pg_loss - c.ent_coef * entropy.mean()
                            if c.bc_coef > 0:
                                bc = self.actor.bc_loss(cond[idx], latent[idx])
                                actor_loss = actor_loss + c.bc_coef * bc
                                stats["bc_loss"].append(float(bc.detach()))
                            pg_log, ent_log = float(pg_loss.detach()), float(entropy.detach().mean())
                        stats["approx_kl"].append(approx_kl)
                        stats["kl_per_dim"].append(kl_per_dim)
                        stats["clipfrac"].append(clipfrac)
                        if pg_log is not None:
                            stats["policy_loss"].append(pg_log)
                            stats["entropy"].append(ent_log)
                        if actor_active:
                            if not dist_on and not torch.isfinite(actor_loss):
                                raise FloatingPointError(
                                    f"non-finite actor loss ({float(actor_loss.detach())}) at fine-tuning iteration "
                                    f"{self.iteration}; no parameter was changed by it")
                            with torch.no_grad():  # the samples whose surrogate term has a gradient
                                carry = ~(clipped > -a * ratio)
                                carry_frac = float(carry.float().mean()) if carry.numel() else 0.0
                            stats["two_pass"].append(float(two_pass))
                            stats["carry_frac"].append(carry_frac)
                            self.actor_optim.zero_grad(set_to_none=True)
                            with torch.enable_grad():
                                if two_pass:  # the same gradient from the carriers alone: sum(-A r) / n_mb
                                    sub = idx[carry]
                                    actor_loss = torch.zeros((), device=self.device)
                                    if sub.numel():
                                        sub_logp, _ = self.actor.evaluate(cond[sub], latent[sub])
                                        actor_loss = (-a[carry] * (sub_logp - old_logp[sub]).exp()).sum() / n_mb
                                if dist_on or two_pass:  # every parameter gets a gradient, also from an empty share
                                    actor_loss = actor_loss + 0.0 * sum(p.sum() for p in actor_params)
                            actor_loss.backward()
                            distributed.sum_gradients(actor_params)
                            gnorm = nn.utils.clip_grad_norm_(actor_params, c.max_grad_norm)
                            stats["grad_norm"].append(float(gnorm))
                            if not torch.isfinite(gnorm):
                                raise FloatingPointError(f"non-finite actor gradient at fine-tuning iteration "
                                                         f"{self.iteration}; no parameter was changed by it")
                            self.actor_optim.step()
                if dist_on:
                    critic_params = list(self.critic.parameters())
                    sq = 0.5 * (self.critic(cond[idx]) - ret[idx]).pow(2) if idx.numel() else ret[:0]
                    v_loss = sq.sum() / n_mb + 0.0 * sum(p.sum() for p in critic_params)
                    self.critic_optim.zero_grad(set_to_none=True)
                    v_loss.backward()
                    distributed.sum_gradients(critic_params)
                    gn = nn.utils.clip_grad_norm_(critic_params, c.max_grad_norm)
                    if not torch.isfinite(gn):
                        raise FloatingPointError(f"non-finite value gradient at fine-tuning iteration "
                                                 f"{self.iteration} (rewards or observations with NaN/Inf?)")
                    self.critic_optim.step()
                    if sq.numel():
                        stats["value_loss"].append(float(sq.detach().mean()))
                    continue
                v_loss = 0.5 * (self.critic(cond[idx]) - ret[idx]).pow(2).mean()
                if not torch.isfinite(v_loss):
                    raise FloatingPointError(f"non-finite value loss ({float(v_loss.detach())}) at fine-tuning iteration "
                                             f"{self.iteration} (rewards or observations with NaN/Inf?)")
                self.critic_optim.zero_grad(set_to_none=True)
                v_loss.backward()
                nn.utils.clip_grad_norm_(self.critic.parameters(), c.max_grad_norm)
                self.critic_optim.step()
                stats["value_loss"].append(float(v_loss.detach()))
            epochs_done += 1
            if stop:
                break
        with torch.no_grad():
            ev = explained_variance(batch["value"].reshape(-1), ret)
            sigma, sigma_lo, sigma_hi = self.actor.sigma_stats(cond[: min(n_total, 4096)])
        out = {f"train/{k}": float(np.mean(v)) for k, v in stats.items() if v}
        out.update({"train/ratio_first_minibatch": ratio_first, "train/explained_variance": ev,
                    "train/sigma_mean": sigma, "train/sigma_obs_min": sigma_lo, "train/sigma_obs_max": sigma_hi,
                    "train/epochs": float(epochs_done),
                    "train/actor_updated": float(actor_active), "train/target_kl_stop": float(stop)})
        return out

    # --- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, n_episodes: int | None = None, stochastic: bool = False) -> dict[str, float]:
        """Deterministic (noise off) episodes at K = ``cfg.steps`` on the eval envs, from ``eval_seed``.

        ``stochastic=True`` runs the same episodes with the policy as it acts in training (the flow's learned
        noise at every step, or the Gaussian's sampled action) and names its metrics ``eval_stochastic/...``.

        Run by :func:`envs.episodes.run_episodes`, the runner every evaluator uses (env i runs ``(n + i) // M``
        episodes). Returns ``eval/return_mean``, ``eval/return_std``, ``eval/success_rate``, ``eval/episodes``.

        Data-parallel, every process runs its ``M / N`` eval envs (env i of the M global ones, with its
        seed, its quota and its rows of the global noise) and the episodes are gathered on every process:
        the same numbers as one process with all M envs.
        """
        if self.eval_envs is None:
            raise ValueError("evaluate() needs eval_envs")
        c = self.cfg
        n_episodes = int(n_episodes or c.eval_episodes)
        envs = self.eval_envs
        m = envs.num_envs
        world, rank = self.dist.world_size, self.dist.rank
        m_all, off = m * world, m * rank
        gen = torch.Generator(device=self.device).manual_seed(c.eval_seed)

        def act(obs):
            with rng.shard(rank, world):
                out = self.actor.act(self._cond(obs), deterministic=not stochastic, generator=gen)
            return self._env_actions(envs, out.action)

        res = run_episodes(envs, act, n_episodes, c.eval_seed, off, m_all, self.env_chunk)
        returns, successes = res["returns"], res["successes"]
        if self.dist.enabled:
            parts = distributed.all_gather_object((returns, successes))
            returns = [x for part, _ in parts for x in part]
            successes = [x for _, part in parts for x in part]
        p = "eval_stochastic" if stochastic else "eval"
        return {f"{p}/return_mean": float(np.mean(returns)), f"{p}/return_std": float(np.std(returns)),
                f"{p}/success_rate": float(np.mean(successes)), f"{p}/episodes": float(len(returns))}

    def _evaluations(self) -> dict[str, float]:
        """The evaluation of an eval point: deterministic, and stochastic too with ``eval_stochastic``."""
        out = self.evaluate()
        if self.cfg.eval_stochastic:
            out.update(self.evaluate(stochastic=True))
        return out

    # --- main loop ------------------------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        """One iteration: schedules, rollout, PPO update. Returns its metrics."""
        t0 = time.perf_counter()
        f, lo, hi = self._apply_schedules()
        batch = self.collect_rollout()
        metrics = self.update(batch)
        if self.dist.enabled:  # every process's env steps and finished episodes
            batch["env_steps"] = int(distributed.all_reduce_sum(torch.tensor([float(batch["env_steps"])],
                                                                             dtype=torch.float64))[0])
            for key in ("ep_returns", "ep_successes"):
                batch[key] = [x for part in distributed.all_gather_object(batch[key]) for x in part]
        self.iteration += 1
        self.env_steps += batch["env_steps"]
        self.episodes += len(batch["ep_returns"])
        metrics.update({
            "charts/SPS": batch["env_steps"] / max(time.perf_counter() - t0, 1e-9),
            "charts/env_steps": float(self.env_steps), "charts/iteration": float(self.iteration),
            "train/lr_actor": self.actor_optim.param_groups[0]["lr"],
            "train/lr_critic": self.critic_optim.param_groups[0]["lr"],
            "train/sigma_min": lo, "train/sigma_max": hi,
            "rollout/episodes": float(len(batch["ep_returns"])),
        })
        if batch["ep_returns"]:
            metrics["rollout/return_mean"] = float(np.mean(batch["ep_returns"]))
            metrics["rollout/success_rate"] = float(np.mean(batch["ep_successes"]))
        return metrics

    def _eval_due(self) -> bool:
        """Evaluation at this iteration (data-parallel: every process runs its share of the episodes)."""
        return self.eval_envs is not None and self.cfg.eval_every > 0 and self.iteration % self.cfg.eval_every == 0

    def _stop_from(self, answer: bool | None) -> bool:
        """A callback's False stops every process (any process's answer counts)."""
        return distributed.any_rank(answer is False)

    def learn(self, total_env_steps: int, callback: Callable[[ReinFlowPPO, dict], bool | None] | None = None,
              progress: bool = True) -> ReinFlowPPO:
        """Train until ``env_steps >= total_env_steps`` (counted in env steps, across resumes).

        ``callback(agent, metrics)`` runs after every iteration (and once with the initial evaluation at
        iteration 0); returning False stops. Evaluation runs before the first iteration and every
        ``eval_every`` iterations, its metrics merged into that iteration's. Data-parallel, every process
        calls ``callback`` after every iteration with the same metrics (evaluations gathered), and a False
        from any process stops all of them at the same iteration.
        """
        bar = tqdm(total=int(total_env_steps), initial=min(self.env_steps, int(total_env_steps)),
                   disable=not progress, desc="finetune", unit="step")
        try:
            if self.iteration == 0 and self._eval_due() and self.env_steps < total_env_steps:
                m = {"charts/env_steps": 0.0, "charts/iteration": 0.0, **self._evaluations()}
                if callback is not None and self._stop_from(callback(self, m)):
                    return self
            while self.env_steps < total_env_steps:
                before = self.env_steps
                metrics = self.train_iteration()
                if self._eval_due():
                    metrics.update(self._evaluations())
                bar.update(min(self.env_steps, int(total_env_steps)) - min(before, int(total_env_steps)))
                bar.set_postfix({k.split("/")[1]: f"{metrics[k]:.3g}" for k in
                                 ("rollout/return_mean", "eval/return_mean") if k in metrics})
                if callback is not None and self._stop_from(callback(self, metrics)):
                    break
        finally:
            bar.close()
        return self

    # --- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly at this iteration boundary (tensors and plain Python only,
        loadable with ``torch.load(weights_only=True)``)."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_optim": self.actor_optim.state_dict(),
            "critic_optim": self.critic_optim.state_dict(),
            "reward_scaler": self.reward_scaler.state_dict(),
            "noise_gen": self.noise_gen.get_state(),
            "perm_gen": self.perm_gen.get_state(),
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "episodes": self.episodes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the envs are reset (seeded by the iteration) at the next iteration."""
        version = state.get("format_version")
        if version != STATE_FORMAT_VERSION:
            raise ValueError(f"fine-tuning state format {version!r} is not supported (expected "
                             f"{STATE_FORMAT_VERSION})")
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_optim.load_state_dict(state["actor_optim"])
        self.critic_optim.load_state_dict(state["critic_optim"])
        self.reward_scaler.load_state_dict(state["reward_scaler"])
        self.noise_gen.set_state(state["noise_gen"])
        self.perm_gen.set_state(state["perm_gen"])
        self.iteration = int(state["iteration"])
        self.env_steps = int(state["env_steps"])
        self.episodes = int(state["episodes"])
        self._obs = None


# two passes (no-grad forward over the minibatch, then forward + backward over the gradient carriers) cost
# about (F + f (F + B)) / (F + B) of one pass, with F : B about 1 : 2 for the K-step log-prob: worth it below 0.6
_TWO_PASS_BELOW = 0.6


def _global_minibatch_stats(ratio, log_ratio, lr_full, lr_dim, adv, clip_coef: float, n: int) -> dict[str, float]:
    """Statistics of a minibatch split across processes: one all-reduce of the per-process sums.

    ``n`` is the global minibatch size; standard deviations are unbiased, as ``torch.std``."""
    sums = torch.stack([((ratio - 1.0) - log_ratio).sum(), ((lr_full.exp() - 1.0) - lr_full).sum(),
                        ((ratio - 1.0).abs() > clip_coef).float().sum(), lr_dim.sum(), lr_dim.pow(2).sum(),
                        adv.sum(), adv.pow(2).sum(), (ratio - 1.0).abs().sum()]).double()
    s = distributed.all_reduce_sum(sums).tolist()

    def std(total: float, total_sq: float) -> float:
        return math.sqrt(max(total_sq - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0

    return {"approx_kl": s[0] / n, "kl_full": s[1] / n, "clipfrac": s[2] / n, "lr_dim_std": std(s[3], s[4]),
            "adv_mean": s[5] / n, "adv_std": std(s[5], s[6]), "ratio_dev": s[7] / n}


def _rows(obs, idx: np.ndarray):
    """Select env rows from an array or dict observation."""
    return {k: _rows(v, idx) for k, v in obs.items()} if isinstance(obs, dict) else np.asarray(obs)[idx]


__all__ = ["FinetuneConfig", "ReinFlowPPO", "PPOActor", "FlowActor", "GaussianActor", "ValueNet", "make_actor",
           "ActorSample"]
