"""How far an aligned flow moved from its reference: drift measured on the same inputs and the same noise.

Both measures compare deterministic samples (the ODE from a fixed initial noise), so a policy or generator
that did not change scores exactly 0, and the number is a squared distance per dimension:

- :func:`policy_drift`: mean squared distance between the aligned and the reference policy's K-step action
  chunks, in normalized action units ([-1, 1] per dimension, clamped as when acting), on a fixed set of
  observations with shared noise;
- :func:`sample_drift`: mean squared distance between two batches of samples made from the same noise (e.g.
  aligned and reference digits).

It is a sample-space proxy for the KL from the reference that Diffusion-DPO and Flow-GRPO report: for two
flows driven by the same noise it bounds how far each sample moved, without needing likelihoods.
"""

from __future__ import annotations

import torch

from flowpolicy.policy import FlowPolicy


def observation_sample(obs: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``obs`` (N, To, Do) drawn without replacement by a seeded generator (all if n >= N)."""
    if n >= obs.shape[0]:
        return obs
    idx = torch.randperm(obs.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return obs[idx.sort().values]


@torch.no_grad()
def policy_drift(aligned: FlowPolicy, reference: FlowPolicy, obs: torch.Tensor, steps: int, seed: int = 0,
                 batch: int = 4096) -> float:
    """Mean over observations, chunk steps and action dimensions of (a_aligned - a_reference)^2, where both
    chunks are the policies' ``steps``-step samples from the same initial noise (normalized units, clamped to
    [-1, 1] like :meth:`FlowPolicy.predict_action_chunk`). ``obs`` (N, To, Do) in environment units."""
    gen = torch.Generator(device=reference.device).manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, obs.shape[0], batch):
        o = obs[i : i + batch]
        x0 = reference.flow.noise(o.shape[0], reference.device, gen) * reference.init_noise_scale
        a = aligned.predict_normalized(aligned.encode_obs(o), steps=steps, x0=x0.to(aligned.device)).clamp(-1, 1)
        r = reference.predict_normalized(reference.encode_obs(o), steps=steps, x0=x0).clamp(-1, 1)
        total += float((a.to(r.device) - r).pow(2).sum())
        count += r.numel()
    return total / max(count, 1)


def sample_drift(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared distance per dimension between paired samples a and b (same shape, same noise)."""
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.detach().cpu().double() - b.detach().cpu().double()).pow(2).mean())
