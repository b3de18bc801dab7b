"""ReinFlow (Zhang et al. 2025): learnable noise injection that turns a K-step flow policy into a Markov chain
with an exact likelihood, so that policy-gradient methods (PPO) can fine-tune it.

A pretrained flow policy integrates K Euler steps x_{k+1} = x_k + h_k v(x_k, t_k) from x_0 ~ N(0, I) on the
grid t_0 = 0 < ... < t_K = 1 (h_k = t_{k+1} - t_k). ReinFlow makes every step Gaussian:

    x_{k+1} ~ N(mu_k, sigma_k^2),   mu_k = x_k + h_k v(x_k, t_k | s),   sigma_k = sigma(s, t_k) or sigma(s)

and the whole chain (x_0, ..., x_K) has the exact density

    log pi(chain | s) = [log N(x_0; 0, I)] + sum_k log N(x_{k+1}; mu_k, sigma_k^2).

The action is x_K. Sampling and the log-prob recomputation share ONE time grid (``NoisyFlowSampler.grid``);
otherwise the PPO ratio is not 1 at the first minibatch (a public implementation had this bug).

Shapes: condition features ``cond`` (B, Dc) (``BasePolicy.encode_obs``), action chunks (B, Ta, Da) in the
policy's normalized units, chains (B, K + 1, Ta, Da). Pure torch: no environment code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import rng
from .flow import ShortcutFlow
from .nets import SinusoidalEmbedding
from .solvers import time_grid

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def squash_sigma(z: torch.Tensor, sigma_min: torch.Tensor | float, sigma_max: torch.Tensor | float) -> torch.Tensor:
    """Map a raw network output z (any shape) into [sigma_min, sigma_max].

    The log-variance is interpolated, log sigma^2 = log sigma_min^2 + w (log sigma_max^2 - log sigma_min^2) with
    w = (tanh z + 1) / 2 in [0, 1]. A final clamp removes the last-ulp rounding of exp(log(.)), so the bounds
    hold exactly for any z (including +-inf); inside the bounds it changes nothing.
    """
    lo = torch.as_tensor(sigma_min, dtype=z.dtype, device=z.device)
    hi = torch.as_tensor(sigma_max, dtype=z.dtype, device=z.device)
    w = 0.5 * (torch.tanh(z) + 1.0)
    log_var = 2.0 * torch.log(lo) + w * (2.0 * torch.log(hi) - 2.0 * torch.log(lo))
    return torch.minimum(torch.maximum(torch.exp(0.5 * log_var), lo), hi)


class NoiseNet(nn.Module):
    """The exploration-noise network sigma(s, t) (``time_dependent=True``) or sigma(s).

    A small MLP on the policy's condition features (plus a sinusoidal embedding of the flow time t when
    time-dependent) outputs one raw value per action entry, squashed into [sigma_min, sigma_max] by
    :func:`squash_sigma`. The bounds are buffers (saved with the module) so that a noise-bound schedule
    (:meth:`set_bounds`) resumes exactly. The last layer starts at zero, so sigma starts at the geometric
    mean sqrt(sigma_min * sigma_max) everywhere.

    Args:
        cond_dim: Dc, size of the condition features.
        x_shape: (Ta, Da), shape of one action chunk.
        sigma_min, sigma_max: bounds, 0 < sigma_min <= sigma_max (in normalized action units).
        time_dependent: also condition on t.
        hidden, depth: MLP width and number of hidden layers.
        t_emb_dim: size of the time embedding (time-dependent only).
    """

    def __init__(self, cond_dim: int, x_shape: tuple[int, ...], sigma_min: float = 0.10, sigma_max: float = 0.24,
                 time_dependent: bool = False, hidden: int = 128, depth: int = 2, t_emb_dim: int = 16) -> None:
        super().__init__()
        self.x_shape = tuple(int(s) for s in x_shape)
        self.time_dependent = bool(time_dependent)
        self.register_buffer("sigma_min", torch.tensor(0.0))
        self.register_buffer("sigma_max", torch.tensor(0.0))
        self.set_bounds(sigma_min, sigma_max)
        self.t_embed = SinusoidalEmbedding(t_emb_dim) if self.time_dependent else None
        layers: list[nn.Module] = []
        d = int(cond_dim) + (t_emb_dim if self.time_dependent else 0)
        if d < 1:
            raise ValueError("NoiseNet needs a condition (cond_dim >= 1) or time_dependent=True")
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.Mish()]
            d = hidden
        out = nn.Linear(d, math.prod(self.x_shape))
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(*layers, out)

    def set_bounds(self, sigma_min: float, sigma_max: float) -> None:
        """Change the squashing bounds (the noise-bound schedule); raw outputs are unchanged."""
        if not 0.0 < float(sigma_min) <= float(sigma_max):
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min.fill_(float(sigma_min))
        self.sigma_max.fill_(float(sigma_max))

    def raw(self, cond: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Unsquashed output z: cond (B, Dc), t (B,) -> (B, Ta, Da)."""
        h = cond.reshape(cond.shape[0], -1)
        if self.time_dependent:
            if t is None:
                raise ValueError("a time-dependent NoiseNet needs t")
            h = torch.cat([h, self.t_embed(t)], dim=-1)
        return self.mlp(h).reshape(cond.shape[0], *self.x_shape)

    def forward(self, cond: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """sigma: cond (B, Dc), t (B,) (ignored unless time-dependent) -> (B, Ta, Da) inside the bounds."""
        return squash_sigma(self.raw(cond, t), self.sigma_min, self.sigma_max)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, std^2) (same as torch.distributions.Normal(mean, std).log_prob(x))."""
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - _LOG_SQRT_2PI


class NoisyFlowSampler(nn.Module):
    """ReinFlow's noisy K-step sampler and exact chain log-prob around a :class:`~flowpolicy.policy.FlowPolicy`.

    Works for rectified-flow (``kind == "reflow"``) and shortcut (``kind == "shortcut"``) policies; each step
    passes the step size d = h_k (= 1/K on the uniform grid) to the velocity, which shortcut networks use and
    others ignore. Shortcut policies need a power-of-two K and the uniform grid.

    Clipping (both bounds in normalized action units; ``None`` = off):

    - ``clip_intermediate``: the transition mean is computed from the clamped state,
      mu_k = c(x_k) + h_k v(c(x_k), t_k). The stored chain holds the *unclipped* samples, so the log-prob is
      the exact density of a (slightly different) Markov chain and the PPO ratio stays exact. Off by default:
      with it on, the noise-free action can differ from the pretrained policy's Euler action.
    - ``clip_action``: only what is sent to the environment (:meth:`action`) is clamped; the log-prob is of
      the unclipped x_K that is stored. The env action is a deterministic function of the chain, so the
      policy gradient is unchanged.

    Log-prob options:

    - ``exec_horizon`` (Te <= Ta, default Ta): how many actions of each chunk the environment executes. The
      last transition's entries of the Ta - Te actions that are never executed are leaf nodes of the chain
      (nothing downstream depends on them), so they are marginalized out exactly by leaving their terms out.
      Earlier transitions keep every entry: later velocities depend on them.
    - ``include_x0``: add log N(x_0; 0, I) (and its entropy). It does not depend on any parameter, so it
      cancels in PPO ratios; it only shifts the reported values.
    - ``normalize_logprob`` (default True): divide log-prob and entropy by the number of *executed action
      dimensions* Te * Da -- the same count a Gaussian actor over the same executed actions uses. The
      initial-noise term stays in the log-prob but not in the count (it carries no parameters), and K does not
      enter the count. A PPO clip c then bounds the per-sample log-ratio by +-c * Te * Da for every actor, so
      a flow and a Gaussian policy get the same trust region per executed action dimension. (Dividing by the
      number of Gaussian terms, (K + 1) * Ta * Da, as ReinFlow's code does, lets a K = 4 flow move its
      log-likelihood 5x further per update than a Gaussian under the same clip.)

    Args:
        policy: a FlowPolicy (``flow``, ``velocity(x, t, cond, d, net=None)``, ``action_horizon``, ``act_dim``).
        noise_net: a :class:`NoiseNet` whose ``x_shape`` is (Ta, Da).
        steps: default K.
        grid_kind, grid_shift: the one time grid, :func:`flowpolicy.solvers.time_grid` (``uniform``/``shifted``).
        exec_horizon: Te, executed actions per chunk (None: Ta).
        init_noise_scale: tau, the chain starts from x_0 ~ N(0, tau^2 I) (1: the pretrained flow's own
            distribution; 0: every chain starts at x_0 = 0, so the noise-free action is a deterministic function
            of the observation). x_0 carries no parameter, so the log-prob stays exact for any tau; its term
            is log N(x_0; 0, tau^2 I) (left out at tau = 0, where x_0 has no density).
        noise_steps: m, noise in the last m transitions only (None: every one, ReinFlow's chain). The first K - m
            are the policy's own Euler steps: a deterministic function of x_0, recomputed from x_0 with the
            current networks in :meth:`log_prob` (so the update reaches them) and adding no term to it. The
            log-prob stays exact; with m = 1 the chain is a Gaussian around the flow's K-step action, so the
            noise-free action is the mean of the action that training samples (as for a Gaussian policy).
    """

    def __init__(self, policy: nn.Module, noise_net: NoiseNet, steps: int = 4, clip_intermediate: float | None = None,
                 clip_action: float | None = 1.0, include_x0: bool = True, normalize_logprob: bool = True,
                 grid_kind: str = "uniform", grid_shift: float = 1.0, exec_horizon: int | None = None,
                 init_noise_scale: float = 1.0, noise_steps: int | None = None) -> None:
        super().__init__()
        if noise_steps is not None and int(noise_steps) < 1:
            raise ValueError(f"noise_steps must be >= 1 (or None: every step), got {noise_steps}")
        self.noise_steps = None if noise_steps is None else int(noise_steps)
        if not 0.0 <= float(init_noise_scale) <= 1.0:
            raise ValueError(f"init_noise_scale must be in [0, 1], got {init_noise_scale}")
        self.init_noise_scale = float(init_noise_scale)
        if getattr(policy, "kind", None) not in ("reflow", "shortcut"):
            raise ValueError(f"NoisyFlowSampler needs a FlowPolicy (kind reflow/shortcut), got {policy.kind!r}")
        self.x_shape = (int(policy.action_horizon), int(policy.act_dim))
        if tuple(noise_net.x_shape) != self.x_shape:
            raise ValueError(f"noise net x_shape {noise_net.x_shape} != policy action chunk (Ta, Da) {self.x_shape}")
        self.policy = policy
        self.noise_net = noise_net
        self.steps = int(steps)
        self.clip_intermediate = clip_intermediate
        self.clip_action = clip_action
        self.include_x0 = bool(include_x0)
        self.normalize_logprob = bool(normalize_logprob)
        self.grid_kind = grid_kind
        self.grid_shift = float(grid_shift)
        self.is_shortcut = isinstance(policy.flow, ShortcutFlow)
        self.exec_horizon = self.x_shape[0] if exec_horizon is None else int(exec_horizon)
        if not 1 <= self.exec_horizon <= self.x_shape[0]:
            raise ValueError(f"exec_horizon must be in [1, Ta={self.x_shape[0]}], got {exec_horizon}")
        self.grid(self.steps)  # validate early

    @property
    def logprob_count(self) -> int:
        """The normalization count: executed action dimensions Te * Da (see the class docstring)."""
        return self.exec_horizon * self.x_shape[1]

    def first_noisy(self, steps: int) -> int:
        """Index of the first transition that gets noise: 0, or K - noise_steps (the earlier ones are the
        deterministic Euler steps, which add no term to the log-prob)."""
        return 0 if self.noise_steps is None else max(0, int(steps) - self.noise_steps)

    def term_mask(self, steps: int) -> torch.Tensor:
        """(K, Ta, 1) float mask of the transition terms in the log-prob: the noisy transitions, less the last
        step's unexecuted rows."""
        m = torch.ones(int(steps), self.x_shape[0], 1)
        m[: self.first_noisy(steps)] = 0.0
        m[-1, self.exec_horizon:] = 0.0
        return m

    # --- the one time grid --------------------------------------------------------------------------
    def grid(self, steps: int | None = None) -> list[float]:
        """The K + 1 grid times (python floats) used by BOTH sampling and log-prob recomputation."""
        k = int(steps or self.steps)
        if self.is_shortcut:
            if k < 1 or k & (k - 1):
                raise ValueError(f"shortcut policies need a power-of-two number of steps, got {k}")
            if self.grid_kind != "uniform":
                raise ValueError("shortcut policies use the uniform grid that matches their step size")
        return time_grid(k, self.grid_kind, self.grid_shift).tolist()

    # --- building blocks ----------------------------------------------------------------------------
    def _clip_state(self, x: torch.Tensor) -> torch.Tensor:
        c = self.clip_intermediate
        return x if c is None else x.clamp(-c, c)

    def transition_mean(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, cond: torch.Tensor,
                        policy: nn.Module | None = None) -> torch.Tensor:
        """mu = c(x) + h v(c(x), t, d=h | cond): x (B, Ta, Da), t (B,), h (B,), cond (B, Dc) -> (B, Ta, Da).

        ``policy`` (default: the fine-tuned one) lets the frozen base policy reuse the same arithmetic.
        The expression equals :func:`flowpolicy.solvers.step`'s Euler update bit for bit.
        """
        policy = policy or self.policy
        x_in = self._clip_state(x)
        v = policy.velocity(x_in, t, cond, h)
        return x_in + h.reshape(-1, *([1] * (x.ndim - 1))) * v

    def sigmas(self, cond: torch.Tensor, grid: list[float]) -> torch.Tensor:
        """Noise scales of the K transitions: cond (B, Dc) -> (B, K, Ta, Da)."""
        b, k = cond.shape[0], len(grid) - 1
        if not self.noise_net.time_dependent:
            return self.noise_net(cond).unsqueeze(1).expand(b, k, *self.x_shape)
        t = torch.tensor(grid[:-1], dtype=torch.float32, device=cond.device).repeat(b)  # (B*K,) row-major
        cond_rep = cond.repeat_interleave(k, dim=0)
        return self.noise_net(cond_rep, t).reshape(b, k, *self.x_shape)

    def _reduce(self, x0: torch.Tensor, step_lp: torch.Tensor, sigma: torch.Tensor):
        """Sum (and optionally normalize) the chain terms. step_lp, sigma: (B, K, Ta, Da).

        The last transition's unexecuted rows are left out (exact marginalization); see the class docstring.
        """
        b, k = step_lp.shape[:2]
        mask = self.term_mask(k).to(step_lp.device, step_lp.dtype)
        logp = (step_lp * mask).reshape(b, -1).sum(-1)
        ent = ((0.5 + _LOG_SQRT_2PI + torch.log(sigma)) * mask).reshape(b, -1).sum(-1)
        tau = self.init_noise_scale
        if self.include_x0 and tau > 0:
            std0 = torch.full_like(x0, tau)
            logp = logp + gaussian_log_prob(x0, torch.zeros_like(x0), std0).reshape(b, -1).sum(-1)
            ent = ent + (0.5 + _LOG_SQRT_2PI + math.log(tau)) * math.prod(self.x_shape)
        if self.normalize_logprob:
            scale = 1.0 / self.logprob_count
            logp, ent = logp * scale, ent * scale
        return logp, ent

    # --- sampling and log-prob ------------------------------------------------------------------------
    def sample(self, cond: torch.Tensor, steps: int | None = None, deterministic: bool = False,
               x0: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """Run the noisy chain.

        Args:
            cond: (B, Dc) condition features.
            steps: K (default ``self.steps``).
            deterministic: noise off (x_{k+1} = mu_k); without ``clip_intermediate`` the final state equals the
                policy's K-step Euler action from the same x0 exactly.
            x0: (B, Ta, Da) initial noise (drawn from ``generator`` if None).

        Returns:
            chain (B, K + 1, Ta, Da) (x_0 ... x_K, unclipped) and its log-prob (B,) under the current noise
            (for a deterministic chain, the log-prob the noisy policy would give it).
        """
        grid = self.grid(steps)
        b = cond.shape[0]
        if x0 is None:
            x0 = rng.randn((b, *self.x_shape), generator, cond.device)
            if self.init_noise_scale != 1.0:
                x0 = x0 * self.init_noise_scale
        sigma = self.sigmas(cond, grid)
        x, chain, means = x0, [x0], []
        first = self.first_noisy(len(grid) - 1)
        for k in range(len(grid) - 1):
            h = grid[k + 1] - grid[k]
            mu = self.transition_mean(x, torch.full((b,), grid[k], device=cond.device), torch.full(
                (b,), h, device=cond.device), cond)
            if deterministic or k < first:
                x = mu
            else:
                eps = rng.randn(mu.shape, generator, mu.device)
                x = mu + sigma[:, k] * eps
            chain.append(x)
            means.append(mu)
        chain_t = torch.stack(chain, dim=1)
        logp, _ = self._reduce(x0, gaussian_log_prob(chain_t[:, 1:], torch.stack(means, 1), sigma), sigma)
        return chain_t, logp

    def log_prob(self, chain: torch.Tensor, cond: torch.Tensor, steps: int | None = None):
        """Recompute the chain's log-prob with the current networks (one batched call over the K steps).

        Args:
            chain: (B, K + 1, Ta, Da) from :meth:`sample`; cond: (B, Dc); steps: K (default from the chain).

        Returns:
            log_prob (B,) and entropy (B,) of the Gaussian transitions (normalized like the log-prob).
        """
        b, kp1 = chain.shape[:2]
        k = int(steps or kp1 - 1)
        if kp1 != k + 1:
            raise ValueError(f"chain has {kp1} states but steps={k} needs {k + 1}")
        grid = self.grid(k)
        t = torch.tensor(grid[:-1], dtype=torch.float32, device=chain.device)
        h = torch.tensor([grid[i + 1] - grid[i] for i in range(k)], dtype=torch.float32, device=chain.device)
        net = self.policy.flow.net
        first = self.first_noisy(k)  # noise in the last k - first steps only
        if first:  # the deterministic start of the chain, recomputed from x_0 with the current networks
            x, states = chain[:, 0], [chain[:, 0]]
            for i in range(first):
                x = self.transition_mean(x, t[i].expand(b), h[i].expand(b), cond)
                states.append(x)
            chain = torch.cat([torch.stack(states, 1), chain[:, first + 1:]], dim=1)
        n, t_n, h_n = k - first, t[first:], h[first:]  # the noisy transitions: their means
        if hasattr(net, "forward_grid"):
            # the same means with the conditioning's linear maps run on n + B rows instead of n * B
            x_in = self._clip_state(chain[:, first:-1])
            d = h_n.clamp_min(self.policy.flow.finest_step) if self.is_shortcut else h_n
            v = net.forward_grid(x_in, t_n, cond, d if getattr(net, "step_input", False) else None)
            mu = x_in + h_n.reshape(1, n, *([1] * len(self.x_shape))) * v
        else:
            x_prev = chain[:, first:-1].reshape(b * n, *self.x_shape)
            mu = self.transition_mean(x_prev, t_n.repeat(b), h_n.repeat(b), cond.repeat_interleave(n, dim=0))
            mu = mu.reshape(b, n, *self.x_shape)
        if first:  # the deterministic transitions' means are their next states (masked out of the sums)
            mu = torch.cat([chain[:, 1:first + 1], mu], dim=1)
        sigma = self.sigmas(cond, grid)
        return self._reduce(chain[:, 0], gaussian_log_prob(chain[:, 1:], mu, sigma), sigma)

    def mean_action(self, cond: torch.Tensor, x0: torch.Tensor, steps: int | None = None,
                    policy: nn.Module | None = None) -> torch.Tensor:
        """Noise-free K-step action (B, Ta, Da) from x0 with ``policy``'s velocity (default: the fine-tuned one).

        Used by the W2 regularizer (base vs fine-tuned action from the same noise). Differentiable.
        """
        grid = self.grid(steps)
        b, x = cond.shape[0], x0
        for k in range(len(grid) - 1):
            x = self.transition_mean(x, torch.full((b,), grid[k], device=cond.device),
                                     torch.full((b,), grid[k + 1] - grid[k], device=cond.device), cond, policy)
        return x

    def action(self, chain: torch.Tensor) -> torch.Tensor:
        """What is sent to the environment: the final state x_K, clamped to +-clip_action. (B, Ta, Da)."""
        a = chain[:, -1]
        return a if self.clip_action is None else a.clamp(-self.clip_action, self.clip_action)
