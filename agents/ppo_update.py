"""The PPO update of :class:`agents.finetune.ReinFlowPPO`: epochs of clipped-surrogate minibatch steps over one
rollout, for any actor that keeps the :class:`agents.actors.PPOActor` contract (``log_prob`` of a stored latent,
``param_groups``, ``sigma_stats``), data-parallel where the agent is (global minibatch statistics, summed
gradients). See the module docstring of :mod:`agents.finetune` for the metric names.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from agents import distributed
from agents.ppo_utils import compute_gae, explained_variance


class PPOUpdate:
    """Mixin: ``update(batch)`` for an agent with ``cfg``, ``actor``, ``critic``, their optimizers, ``dist``,
    ``perm_gen``, ``iteration``, ``num_envs``, ``global_num_envs`` and ``env_offset`` (:class:`ReinFlowPPO`)."""

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
