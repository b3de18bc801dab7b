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
(seed, iteration): N iterations + save + load + M iterations then equals N + M iterations exactly (with
``reset_at_iteration=False`` a resumed run restarts its episodes at the resume point).

Evaluation is deterministic (noise off) at the fine-tuned K, on separate eval envs reset with ``eval_seed``,
with a dedicated generator for the flow's initial noise, so it never perturbs training.

Metric names: ``train/approx_kl``, ``train/clipfrac``, ``train/policy_loss``, ``train/value_loss``, ``train/entropy``,
``train/kl_per_dim`` (KL of the whole sample per executed action dim; ``target_kl`` applies to it), ``train/log_ratio_std`` and
``train/log_ratio_absmax`` (spread of the log-ratio per executed action dimension over the samples of the
minibatches), ``train/sigma_obs_min``/``train/sigma_obs_max`` (exploration std over the batch),
``train/ratio_first_minibatch`` (mean |ratio - 1| of an update's first minibatch, before any step: 0 but for
float32 matmul differences between batch sizes; 0 on CPU for batches >= 8, about 2e-8 on an H200),
``train/sigma_mean``, ``train/bc_loss``, ``train/explained_variance``,
``train/grad_norm`` (the actor's gradient norm before clipping, mean over its steps),
``train/lr_actor``, ``train/lr_critic``, ``train/sigma_min``, ``train/sigma_max``, ``train/epochs``,
``train/actor_updated`` (0 during the critic warm-up), ``train/target_kl_stop``,
``charts/SPS``, ``charts/env_steps``, ``charts/iteration``, ``rollout/return_mean``, ``rollout/success_rate``,
``rollout/episodes``, ``eval/return_mean``, ``eval/return_std``, ``eval/success_rate``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from agents import distributed
from agents.actors import (
    ACTORS,
    ALGORITHMS,
    ActorSample,
    FlowActor,
    FPOActor,
    GaussianActor,
    PPOActor,
    ValueNet,
    make_actor,
    register_actor,
    register_algorithm,
)
from agents.finetune_config import FinetuneConfig
from agents.ppo_update import PPOUpdate
from agents.ppo_utils import RunningRewardScaler, VecEnvStepper, _rows, iteration_seed, lr_factor
from envs.episodes import run_episodes
from flowpolicy import rng

STATE_FORMAT_VERSION = 1


# --- the agent ---------------------------------------------------------------------------------------


class ReinFlowPPO(PPOUpdate):
    """PPO fine-tuning of a pretrained policy (ReinFlow for flow policies; plain PPO for Gaussian ones).

    The policy is fine-tuned in place (``agent.policy``); for flow policies its ``default_steps`` is set to
    ``cfg.denoise_steps`` and a rectified-flow policy's solver to ``euler``, so the saved policy acts like the
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
            policy.default_steps = c.denoise_steps
            if policy.kind == "reflow":
                policy.solver = "euler"
        self.envs, self.eval_envs = envs, eval_envs
        self.env_chunk, self.env_action_shape = self._check_env(envs)
        if eval_envs is not None:
            self._check_env(eval_envs)
        space = envs.single_action_space  # action_limits=env: one action's bounds (a chunk's first row)
        policy.set_action_limits(*(np.reshape(b, (-1, policy.act_dim))[0] for b in (space.low, space.high))
                                 if c.action_limits == "env" else ())
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
        self.planned_iters: int | None = None  # the run's iterations, set by learn() (for the *_frac schedules)
        gather = None
        if self.dist.enabled:
            counts = distributed.all_gather_object(int(self.num_envs))
            if len(set(counts)) != 1:
                raise ValueError(f"data-parallel fine-tuning needs the same number of envs in every process, got {counts}")
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
        self.iteration = self.env_steps = self.episodes = 0
        self._obs: Any = None  # current training observations (None: reset at the next iteration)

    # --- setup ----------------------------------------------------------------------------------------
    def _check_env(self, envs: gym.vector.VectorEnv) -> tuple[int, tuple[int, ...]]:
        shape = tuple(envs.single_action_space.shape)
        ta, da = self.policy.action_horizon, self.policy.act_dim
        if len(shape) == 1 and shape[0] == da and ta >= 1:
            if ta != 1 and getattr(self.policy, "exec_horizon", ta) != 1:  # Te = 1 (receding horizon) fits
                raise ValueError(f"env takes single actions {shape} but the policy executes chunks of Te="
                                 f"{self.policy.exec_horizon}; build the env with action_horizon=Te (make_vec_env)")
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
        f = lr_factor(c.lr_schedule, self.iteration, c.schedule_iters(self.planned_iters)[2], c.lr_final_ratio)
        for opt in (self.actor_optim, self.critic_optim):
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * f
        lo, hi = c.noise_bounds(self.iteration, self.planned_iters)
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

    # --- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, n_episodes: int | None = None, stochastic: bool = False) -> dict[str, float]:
        """Deterministic (noise off) episodes at K = ``cfg.denoise_steps`` on the eval envs, from ``eval_seed``.

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

    def _eval_due(self, last: bool = False) -> bool:
        """Evaluation at this iteration, or after the last (data-parallel: every process runs its share)."""
        return self.eval_envs is not None and self.cfg.eval_every > 0 and (last or self.iteration % self.cfg.eval_every == 0)

    def _stop_from(self, answer: bool | None) -> bool:
        """A callback's False stops every process (any process's answer counts)."""
        return distributed.any_rank(answer is False)

    def learn(self, total_env_steps: int, callback: Callable[[ReinFlowPPO, dict], bool | None] | None = None,
              progress: bool = True) -> ReinFlowPPO:
        """Train until ``env_steps >= total_env_steps`` (counted in env steps, across resumes).

        ``callback(agent, metrics)`` runs after every iteration (and once with the initial evaluation at
        iteration 0); returning False stops. Evaluation runs before the first iteration, every ``eval_every``
        iterations and after the last (of the final policy), its metrics merged into that iteration's.
        Data-parallel, every process calls ``callback`` after every iteration with the same metrics
        (evaluations gathered), and a False from any process stops all of them at the same iteration.
        """
        per_iteration = self.global_num_envs * self.cfg.n_steps * self.env_chunk  # env steps, no early ends
        self.planned_iters = max(1, math.ceil(int(total_env_steps) / per_iteration))
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
                if self._eval_due(last=self.env_steps >= total_env_steps):
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


__all__ = ["FinetuneConfig", "ReinFlowPPO", "PPOActor", "FlowActor", "GaussianActor", "ValueNet", "make_actor",
           "ActorSample", "ACTORS", "register_actor", "ALGORITHMS", "register_algorithm", "FPOActor"]
