"""Settings of PPO fine-tuning (ReinFlow and the Gaussian baseline): one dataclass, the schema of
``configs/stage/finetune.yaml`` (registered by agents.config_schema); :class:`agents.finetune.ReinFlowPPO` reads it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agents.ppo_utils import LR_SCHEDULES, hold_then_linear
from agents.registry import ALGORITHM_NAMES
from agents.renamed import unknown_with_hints


@dataclass
class FinetuneConfig:
    """PPO / ReinFlow fine-tuning settings (the schema of ``configs/stage/finetune.yaml``).

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
    # algorithm: None picks by policy kind (reinflow for flows, ppo for gaussian); reinflow | ppo | fpo
    algo: str | None = None
    fpo_mc_samples: int = 8  # FPO: (eps, t) pairs per chunk for its flow-matching-loss ratio
    # flow actor (ReinFlow)
    denoise_steps: int = 4  # (D) K denoising steps, fine-tuned and evaluated at this K
    sigma_min: float = 0.10  # (D) noise bounds at the start (locomotion)
    sigma_max: float = 0.24  # (D)
    sigma_min_final: float | None = None  # bounds after the decay (None: unchanged)
    sigma_max_final: float | None = None
    sigma_hold_iters: int = 0  # (D) hold the bounds this many iterations, then decay linearly ...
    sigma_decay_iters: int = 0  # ... over this many iterations (0: jump to the final bounds)
    # the same lengths as fractions of the run's planned iterations (total_env_steps / env steps per iteration),
    # so one schedule fits every budget; set, they replace sigma_hold_iters / sigma_decay_iters / lr_schedule_iters
    sigma_hold_frac: float | None = None
    sigma_decay_frac: float | None = None
    lr_schedule_frac: float | None = None
    noise_time_dependent: bool = False  # sigma(s, t) instead of sigma(s)
    noise_steps: int | None = None  # noise in the last m denoising steps only (None: every step, ReinFlow's)
    noise_hidden: int = 128
    noise_depth: int = 2
    include_x0_logprob: bool = True  # add log N(x0; 0, I) (cancels in ratios)
    init_noise_scale: float = 1.0  # tau: chains start from x0 ~ N(0, tau^2 I) in rollouts and evaluation
    normalize_logprob: bool = True  # divide log-probs by the executed action dims Te * Da (every actor alike)
    clip_intermediate: float | None = None  # clamp chain states inside the transition mean (None: off)
    # where actions may go: "data" the demos' range (the policy's normalized [-1, 1]), "env" the env's action
    # bounds (set on the policy at the start, saved with it; the noisy chain may then explore past the demos)
    action_limits: str = "data"
    clip_action: float | None = None  # None: clip actions to the policy's limits; c: to +-c normalized units
    gaussian_init_std: float | None = None  # Gaussian actor: its std at the start (None: the pretrained one)
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
    # evaluation (deterministic, noise off, at K = denoise_steps)
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
            (self.denoise_steps >= 1, "denoise_steps (K) must be >= 1"),
            (0.0 < self.sigma_min <= self.sigma_max, "need 0 < sigma_min <= sigma_max"),
            (0.0 <= self.gamma <= 1.0 and 0.0 <= self.gae_lambda <= 1.0, "gamma and gae_lambda must be in [0, 1]"),
            (self.update_epochs >= 1 and self.minibatch_size >= 1, "update_epochs, minibatch_size must be >= 1"),
            (self.clip_coef > 0.0, "clip_coef must be > 0"),
            (self.noise_steps is None or self.noise_steps >= 1, f"noise_steps must be >= 1 (or null: every step), got {self.noise_steps}"),
            (self.gaussian_init_std is None or self.gaussian_init_std > 0,
             f"gaussian_init_std must be > 0 (or null: the pretrained std), got {self.gaussian_init_std}"),
            (self.actor_lr > 0, f"actor_lr must be > 0, got {self.actor_lr}"),
            (self.critic_lr > 0, f"critic_lr must be > 0, got {self.critic_lr}"),
            (self.noise_lr is None or self.noise_lr > 0, f"noise_lr must be > 0 (or null: actor_lr), got {self.noise_lr}"),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0 (PPO always clips), got {self.max_grad_norm}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.critic_warmup_iters >= 0 and self.eval_every >= 0, "iteration counts must be >= 0"),
            (self.clip_action is None or self.clip_action > 0, "clip_action must be > 0"),
            (self.action_limits in ("data", "env"), f"action_limits must be 'data' or 'env', got {self.action_limits!r}"),
            (0.0 <= self.init_noise_scale <= 1.0, "init_noise_scale must be in [0, 1]"),
        ]
        checks.append((self.algo is None or self.algo in ALGORITHM_NAMES,
                       f"algo must be one of {sorted(ALGORITHM_NAMES)} (or null: by policy kind), got {self.algo!r}"))
        checks.append((self.fpo_mc_samples >= 1, "fpo_mc_samples must be >= 1"))
        lo, hi = self.final_bounds()
        checks.append((0.0 < lo <= hi, "need 0 < sigma_min_final <= sigma_max_final"))
        for name in ("sigma_hold_frac", "sigma_decay_frac", "lr_schedule_frac"):
            v = getattr(self, name)
            checks.append((v is None or 0.0 <= v <= 1.0, f"{name} must be in [0, 1] (a fraction of the run)"))
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

    def schedule_iters(self, planned_iters: int | None) -> tuple[int, int, int]:
        """(sigma hold, sigma decay, lr schedule) lengths in iterations; the ``*_frac`` settings scale with
        ``planned_iters`` (the run's iterations), which they need."""
        out = []
        for frac, iters in ((self.sigma_hold_frac, self.sigma_hold_iters), (self.sigma_decay_frac,
                            self.sigma_decay_iters), (self.lr_schedule_frac, self.lr_schedule_iters)):
            if frac is None:
                out.append(int(iters))
            elif planned_iters is None:
                raise ValueError("the *_frac schedule settings need the run's length: call learn(total_env_steps)")
            else:
                out.append(round(frac * planned_iters))
        return out[0], out[1], out[2]

    def noise_bounds(self, iteration: int, planned_iters: int | None = None) -> tuple[float, float]:
        """The (sigma_min, sigma_max) bounds in force at ``iteration`` of a run of ``planned_iters``."""
        lo_f, hi_f = self.final_bounds()
        if (lo_f, hi_f) == (self.sigma_min, self.sigma_max):
            return self.sigma_min, self.sigma_max
        args = self.schedule_iters(planned_iters)[:2]
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
            raise ValueError(f"unknown finetune settings {unknown_with_hints(unknown, 'finetune')}; known: {sorted(known)}")
        if "critic_hidden" in d:
            d["critic_hidden"] = tuple(d["critic_hidden"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["critic_hidden"] = list(self.critic_hidden)
        return out
