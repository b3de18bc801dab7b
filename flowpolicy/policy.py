"""Action policies behind one interface, flow-based or Gaussian (pure torch; no environment code).

Interface (of every policy kind here; the README's "Python API" section shows it in use):
``loss(batch) -> (loss, info)``, ``predict_action_chunk(obs, steps=K, deterministic=True)``,
``select_action(obs)`` with an action queue for chunked execution, ``reset()``, and
``predict(obs, state=None, episode_start=None, deterministic=True)`` so that stable-baselines3's
``evaluate_policy`` runs a policy unchanged.

Shapes: observations (B, To, Do) in environment units; action chunks (B, Ta, Da) in environment units.
Inside, observations and actions are normalized to [-1, 1] by min/max statistics that are buffers of the
policy, so they are saved and loaded with it.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from torch import nn

from . import rng
from .fast import CudaGraphChunk, FastEuler
from .fast import supports as fast_supports
from .flow import RectifiedFlow, ShortcutFlow


class MinMaxNormalizer(nn.Module):
    """Maps x in [low, high] (per dimension) to [-1, 1]; the one normalizer of observations and actions.

    A dimension whose range ``high - low`` is not above ``eps`` (constant in the data) maps to 0, and back with
    scale 1 around its center, so 0 comes back as the constant (instead of dividing by ~0)."""

    def __init__(self, low, high, eps: float = 1e-6) -> None:
        super().__init__()
        low = torch.as_tensor(np.asarray(low), dtype=torch.float32)
        high = torch.as_tensor(np.asarray(high), dtype=torch.float32)
        if low.shape != high.shape:
            raise ValueError(f"normalizer low {tuple(low.shape)} and high {tuple(high.shape)} differ in shape")
        self.register_buffer("low", low)
        self.register_buffer("high", high)
        self.eps = eps

    @classmethod
    def identity(cls, dim: int) -> MinMaxNormalizer:
        return cls(-torch.ones(dim), torch.ones(dim))

    def _consts(self):
        """(center, scale, non-constant mask), recomputed only when low/high change (same values as computing
        them at every call: the per-call cost of a policy is mostly such small tensors)."""
        key = (self.low.data_ptr(), self.low._version, self.high.data_ptr(), self.high._version, self.low.dtype)
        cached = self.__dict__.get("_consts_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                span = self.high - self.low
                scale = torch.where(span > self.eps, span, torch.ones_like(span)) / 2.0
                cached = (key, (self.high + self.low) / 2.0, scale, self.high - self.low > self.eps)
            self.__dict__["_consts_cache"] = cached
        return cached[1:]

    def _scale(self):
        return self._consts()[1]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        center, scale, mask = self._consts()
        out = (x - center) / scale
        return torch.where(mask, out, torch.zeros_like(out))

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        center, scale, _ = self._consts()
        return y * scale + center


class BasePolicy(nn.Module):
    """Shared plumbing: normalization, observation encoding, action queues and the SB3 ``predict`` API.

    Args:
        obs_dim, act_dim: flat observation and action sizes.
        obs_horizon (To): observations the policy sees; action_horizon (Ta): actions it predicts per call.
        exec_horizon: actions executed from each chunk by ``select_action``/``predict`` (default Ta).
    """

    kind = "base"

    def __init__(self, obs_dim: int, act_dim: int, obs_horizon: int = 1, action_horizon: int = 1,
                 exec_horizon: int | None = None, obs_stats=None, action_stats=None) -> None:
        super().__init__()
        for name, val in (("obs_dim", obs_dim), ("act_dim", act_dim), ("obs_horizon", obs_horizon),
                          ("action_horizon", action_horizon)):
            if int(val) < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.obs_horizon, self.action_horizon = int(obs_horizon), int(action_horizon)
        self.exec_horizon = int(exec_horizon or action_horizon)
        if not 1 <= self.exec_horizon <= self.action_horizon:
            raise ValueError(f"exec_horizon must be in [1, {action_horizon}], got {exec_horizon}")
        self.obs_norm = MinMaxNormalizer(*obs_stats) if obs_stats is not None else MinMaxNormalizer.identity(obs_dim)
        self.act_norm = (MinMaxNormalizer(*action_stats) if action_stats is not None
                         else MinMaxNormalizer.identity(act_dim))
        # where a normalized action may go (per action dim): the demos' range [-1, 1] unless set_action_limits
        # widens it to the env's bounds (fine-tuning with action_limits=env); saved with the weights
        self.register_buffer("act_limit_low", -torch.ones(self.act_dim))
        self.register_buffer("act_limit_high", torch.ones(self.act_dim))
        self._queue: deque = deque()
        self._sb3_state: dict[int, dict] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, bound in (("act_limit_low", -1.0), ("act_limit_high", 1.0)):
            if prefix + name not in state_dict:  # saved before action limits existed: the demos' range
                state_dict[prefix + name] = torch.full_like(getattr(self, name), bound)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_action_limits(self, low=None, high=None) -> None:
        """Let actions reach [low, high] (env units, per action dim, e.g. the env's action space bounds) instead of
        the demos' range. ``None`` for both: back to the demos' range (normalized [-1, 1]). A dimension that is
        constant in the demos stays at that constant."""
        if low is None and high is None:
            self.act_limit_low.fill_(-1.0)
            self.act_limit_high.fill_(1.0)
            return
        dev = self.act_limit_low.device
        lo, hi = (torch.as_tensor(np.asarray(x, dtype=np.float32).reshape(-1), device=dev) for x in (low, high))
        if lo.shape != (self.act_dim,) or hi.shape != (self.act_dim,):
            raise ValueError(f"action limits need {self.act_dim} values each, got {tuple(lo.shape)} and "
                             f"{tuple(hi.shape)}")
        if bool((lo > hi).any()) or bool(torch.isnan(lo).any() | torch.isnan(hi).any()):
            raise ValueError(f"action limits need low <= high, got low={lo.tolist()} high={hi.tolist()}")
        self.act_limit_low.copy_(self.act_norm.normalize(lo))
        self.act_limit_high.copy_(self.act_norm.normalize(hi))

    def action_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) in env units: where this policy's actions are clipped to."""
        return tuple(self.act_norm.unnormalize(t).cpu().numpy() for t in (self.act_limit_low, self.act_limit_high))

    def clamp_normalized(self, a: torch.Tensor) -> torch.Tensor:
        """Normalized actions (..., Da) clipped to the policy's action limits."""
        return torch.clamp(a, self.act_limit_low, self.act_limit_high)

    @property
    def cond_dim(self) -> int:
        return self.obs_horizon * self.obs_dim

    @property
    def device(self) -> torch.device:
        return self.obs_norm.low.device

    # --- shapes -------------------------------------------------------------------------------------
    def _as_obs(self, obs, device=None) -> torch.Tensor:
        """Accept (Do,), (B, Do) with To == 1, or (B, To, Do); return float (B, To, Do) on ``device`` (default:
        the policy's)."""
        obs = torch.as_tensor(np.asarray(obs) if not torch.is_tensor(obs) else obs, dtype=torch.float32,
                              device=self.device if device is None else device)
        if obs.ndim == 1:
            obs = obs[None]
        if obs.ndim == 2:
            if self.obs_horizon != 1:
                obs = obs[:, None].expand(-1, self.obs_horizon, -1)
            else:
                obs = obs[:, None]
        if obs.shape[1:] != (self.obs_horizon, self.obs_dim):
            raise ValueError(f"observation shape {tuple(obs.shape)} does not match (B, To={self.obs_horizon}, "
                             f"Do={self.obs_dim})")
        return obs

    def encode_obs(self, obs) -> torch.Tensor:
        """(B, To, Do) raw -> (B, To * Do) normalized condition features."""
        obs = self._as_obs(obs)
        return self.obs_norm.normalize(obs).reshape(obs.shape[0], -1)

    def _check_batch(self, batch: dict):
        obs, act = batch["obs"], batch["action"]
        if act.shape[1:] != (self.action_horizon, self.act_dim):
            raise ValueError(f"action batch shape {tuple(act.shape)} does not match (B, Ta={self.action_horizon}, "
                             f"Da={self.act_dim})")
        return self.encode_obs(obs), self.act_norm.normalize(act.to(self.device, torch.float32))

    # --- to implement -------------------------------------------------------------------------------
    def loss(self, batch: dict):
        raise NotImplementedError

    def predict_normalized(self, cond: torch.Tensor, steps: int | None = None, deterministic: bool = True,
                           **kw) -> torch.Tensor:
        """(B, Dc) normalized condition -> (B, Ta, Da) normalized action chunk."""
        raise NotImplementedError

    # --- acting -------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, obs, steps: int | None = None, deterministic: bool = True, **kw) -> torch.Tensor:
        """(B, To, Do) raw observations -> (B, Ta, Da) actions in environment units, clipped to the policy's action
        limits (the demos' range, or the env's bounds after fine-tuning with ``action_limits=env``)."""
        cond = self.encode_obs(obs)
        a = self.clamp_normalized(self.predict_normalized(cond, steps=steps, deterministic=deterministic, **kw))
        return self.act_norm.unnormalize(a)

    def reset(self) -> None:
        """Forget queued actions (call at episode start)."""
        self._queue.clear()
        self._sb3_state.clear()

    @torch.no_grad()
    def select_action(self, obs, steps: int | None = None) -> torch.Tensor:
        """One action (B, Da) per call; a new chunk is predicted when the queue of ``exec_horizon`` runs out."""
        if not self._queue:
            chunk = self.predict_action_chunk(obs, steps=steps)
            self._queue.extend(chunk[:, : self.exec_horizon].transpose(0, 1))
        return self._queue.popleft()

    @torch.no_grad()
    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True, steps=None):
        """stable-baselines3 API: (n_envs, Do) numpy observations -> ((n_envs, Da) actions, state).

        Keeps, per env, the observation history (To) and the queue of chunked actions, so a chunk is predicted
        every ``exec_horizon`` calls; ``episode_start`` (n_envs,) resets both for the envs whose episode just
        began. Without ``episode_start`` (plain ``predict(obs)``) the queue is kept: call ``reset()`` at each
        new episode.
        """
        obs = np.asarray(observation, dtype=np.float32)
        single = obs.ndim == 1
        if single:
            obs = obs[None]
        n = obs.shape[0]
        starts = np.zeros(n, bool) if episode_start is None else np.asarray(episode_start, bool).reshape(n)
        need = []
        for i in range(n):
            st = self._sb3_state.get(i)
            if st is None or starts[i]:
                st = {"hist": deque([obs[i]] * self.obs_horizon, maxlen=self.obs_horizon), "queue": deque()}
                self._sb3_state[i] = st
            else:
                st["hist"].append(obs[i])
            if not st["queue"]:
                need.append(i)
        if need:
            hist = np.stack([np.stack(self._sb3_state[i]["hist"]) for i in need])
            chunk = self.predict_action_chunk(hist, steps=steps, deterministic=deterministic).cpu().numpy()
            for j, i in enumerate(need):
                self._sb3_state[i]["queue"].extend(chunk[j, : self.exec_horizon])
        actions = np.stack([self._sb3_state[i]["queue"].popleft() for i in range(n)])
        return (actions[0] if single else actions), state


class FlowPolicy(BasePolicy):
    """A rectified-flow or shortcut policy: a flow over normalized action chunks conditioned on observations.

    ``default_steps`` is the number of denoising steps K used when a call does not name one.
    ``init_noise_scale`` (tau, in [0, 1]) scales the initial noise the sampler starts from, x0 ~ N(0, tau^2 I):
    1 samples the learned distribution; a policy fine-tuned with ReinFlow at tau < 1 keeps the tau it was
    fine-tuned with, so it is evaluated the way it was trained.
    """

    def __init__(self, flow: RectifiedFlow, obs_dim: int, act_dim: int, obs_horizon: int = 1,
                 action_horizon: int = 1, exec_horizon: int | None = None, obs_stats=None, action_stats=None,
                 default_steps: int = 4, solver: str = "euler", init_noise_scale: float = 1.0) -> None:
        super().__init__(obs_dim, act_dim, obs_horizon, action_horizon, exec_horizon, obs_stats, action_stats)
        if tuple(flow.x_shape) != (self.action_horizon, self.act_dim):
            raise ValueError(f"flow x_shape {flow.x_shape} != (Ta={action_horizon}, Da={act_dim})")
        self.flow = flow
        self.default_steps = int(default_steps)
        self.solver = solver
        if not 0.0 <= float(init_noise_scale) <= 1.0:
            raise ValueError(f"init_noise_scale must be in [0, 1], got {init_noise_scale}")
        self.init_noise_scale = float(init_noise_scale)
        self.kind = "shortcut" if isinstance(flow, ShortcutFlow) else "reflow"
        # K-step Euler without the repeated per-step conditioning work (bit-identical actions; tested)
        self.fast_sampling = True
        self._fast = FastEuler()
        # on CUDA: the whole chunk prediction as one CUDA graph replay (same actions; tested on a GPU)
        self.cuda_graphs = True
        self._graph = CudaGraphChunk()

    @torch.no_grad()
    def predict_action_chunk(self, obs, steps=None, deterministic=True, **kw) -> torch.Tensor:
        if (self.cuda_graphs and self.fast_sampling and self.device.type == "cuda" and not kw.get("net")
                and kw.get("x0") is None and self.kind_supports_graph()):
            obs_t = self._as_obs(obs, device="cpu" if not torch.is_tensor(obs) else obs.device)
            x0 = self.flow.noise(obs_t.shape[0], self.device, kw.get("generator"))
            if self.init_noise_scale != 1.0:
                x0 = x0 * self.init_noise_scale
            out = self._graph.run(self, obs_t, int(steps or self.default_steps), x0)
            if out is not None:
                return out
        return super().predict_action_chunk(obs, steps=steps, deterministic=deterministic, **kw)

    def kind_supports_graph(self) -> bool:
        """The graph replays K Euler steps of an MLP velocity net (the fast path's nets)."""
        return (self.solver if self.kind == "reflow" else "euler") == "euler" and fast_supports(self.flow.net)

    def loss(self, batch: dict, **kw):
        cond, act = self._check_batch(batch)
        return self.flow.loss(act, cond, **kw)

    def predict_normalized(self, cond, steps=None, deterministic=True, x0=None, generator=None, net=None):
        steps = int(steps or self.default_steps)
        if x0 is None:
            x0 = self.flow.noise(cond.shape[0], cond.device, generator)
            if self.init_noise_scale != 1.0:
                x0 = x0 * self.init_noise_scale
        solver = self.solver if self.kind == "reflow" else "euler"
        if (self.fast_sampling and net is None and solver == "euler" and not torch.is_grad_enabled()
                and fast_supports(self.flow.net)):
            return self._fast.sample(self.flow.net, cond, steps, x0)
        # "deterministic" for a flow policy means: the ODE from the given (or fresh) noise, no extra noise
        return self.flow.sample(cond, steps=steps, solver=solver, x0=x0, net=net)

    def velocity(self, x, t, cond, d=None, net=None):
        return self.flow.velocity(x, t, cond, d, net=net)


class GaussianPolicy(BasePolicy):
    """Gaussian MLP behavior cloning baseline: a diagonal Gaussian over the normalized action chunk.

    ``deterministic=True`` returns the mean. Trained by negative log-likelihood.
    """

    kind = "gaussian"

    def __init__(self, obs_dim: int, act_dim: int, obs_horizon: int = 1, action_horizon: int = 1,
                 exec_horizon: int | None = None, obs_stats=None, action_stats=None, hidden: int = 256,
                 depth: int = 2, init_log_std: float = -1.0, min_log_std: float = -5.0) -> None:
        super().__init__(obs_dim, act_dim, obs_horizon, action_horizon, exec_horizon, obs_stats, action_stats)
        out = self.action_horizon * self.act_dim
        layers, d = [], self.cond_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.mean = nn.Linear(d, out)
        self.log_std = nn.Parameter(torch.full((out,), float(init_log_std)))
        self.min_log_std = min_log_std

    def distribution(self, cond: torch.Tensor) -> torch.distributions.Normal:
        mean = self.mean(self.body(cond))
        std = self.log_std.clamp_min(self.min_log_std).exp().expand_as(mean)
        return torch.distributions.Normal(mean, std)

    def loss(self, batch: dict, **kw):
        cond, act = self._check_batch(batch)
        dist = self.distribution(cond)
        nll = -dist.log_prob(act.reshape(act.shape[0], -1)).mean()
        mse = (dist.mean - act.reshape(act.shape[0], -1)).pow(2).mean()
        return nll, {"loss/nll": float(nll.detach()), "loss/mse": float(mse.detach())}

    def predict_normalized(self, cond, steps=None, deterministic=True, generator=None, **kw):
        dist = self.distribution(cond)
        a = dist.mean if deterministic else dist.mean + dist.stddev * rng.randn(
            dist.mean.shape, generator, cond.device)
        return a.reshape(cond.shape[0], self.action_horizon, self.act_dim)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and 2 ** int(round(math.log2(n))) == n
