"""ReinFlow's noisy sampler and chain log-prob (flowpolicy/reinflow.py)."""

from __future__ import annotations

import math

import pytest
import torch

from flowpolicy.flow import RectifiedFlow, ShortcutFlow
from flowpolicy.nets import MLPVelocity
from flowpolicy.policy import FlowPolicy
from flowpolicy.reinflow import NoiseNet, NoisyFlowSampler, squash_sigma

torch.set_num_threads(1)
TA, DA, DO = 3, 2, 5


def make_policy(kind: str = "reflow", seed: int = 0) -> FlowPolicy:
    torch.manual_seed(seed)
    net = MLPVelocity((TA, DA), cond_dim=DO, hidden=32, depth=2, emb_dim=16, step_input=kind == "shortcut")
    flow = ShortcutFlow(net, (TA, DA), max_level=4) if kind == "shortcut" else RectifiedFlow(net, (TA, DA))
    return FlowPolicy(flow, DO, DA, obs_horizon=1, action_horizon=TA).eval()


def make_sampler(kind="reflow", time_dependent=False, randomize_noise=True, **kw) -> NoisyFlowSampler:
    policy = make_policy(kind)
    noise = NoiseNet(DO, (TA, DA), 0.05, 0.3, time_dependent=time_dependent, hidden=16)
    if randomize_noise:  # the last layer starts at zero; give sigma some dependence on s (and t)
        torch.nn.init.normal_(noise.mlp[-1].weight, std=0.5)
    return NoisyFlowSampler(policy, noise, **kw)


def brute_force(sampler: NoisyFlowSampler, chain: torch.Tensor, cond: torch.Tensor):
    """Sum of torch.distributions.Normal log-densities and entropies, one Euler step at a time.

    The last step keeps only the executed rows (the unexecuted ones are marginalized out); normalized by the
    executed action dimensions Te * Da.
    """
    te = sampler.exec_horizon
    k = chain.shape[1] - 1
    b = chain.shape[0]
    logp = torch.zeros(b)
    ent = torch.zeros(b)
    tau = sampler.init_noise_scale
    if sampler.include_x0 and tau > 0:
        std_normal = torch.distributions.Normal(torch.zeros_like(chain[:, 0]), tau * torch.ones_like(chain[:, 0]))
        logp = logp + std_normal.log_prob(chain[:, 0]).sum((1, 2))
        ent = ent + std_normal.entropy().sum((1, 2))
    for i in range(k):
        t0, t1 = i / k, (i + 1) / k
        x = chain[:, i]
        if sampler.clip_intermediate is not None:
            x = x.clamp(-sampler.clip_intermediate, sampler.clip_intermediate)
        v = sampler.policy.velocity(x, torch.full((b,), t0), cond, torch.full((b,), t1 - t0))
        sigma = sampler.noise_net(cond, torch.full((b,), t0))
        dist = torch.distributions.Normal(x + (t1 - t0) * v, sigma)
        rows = te if i == k - 1 else TA
        logp = logp + dist.log_prob(chain[:, i + 1])[:, :rows].sum((1, 2))
        ent = ent + dist.entropy()[:, :rows].sum((1, 2))
    if sampler.normalize_logprob:
        n = te * DA
        logp, ent = logp / n, ent / n
    return logp, ent


def test_sigma_stays_inside_bounds_for_extreme_raw_outputs():
    z = torch.tensor([-math.inf, -1e30, -80.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 80.0, 1e30, math.inf])
    for lo, hi in [(0.1, 0.24), (1e-4, 10.0), (0.3, 0.3), (0.08, 0.0800001)]:
        s = squash_sigma(z, lo, hi)
        lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
        assert torch.isfinite(s).all()
        assert (s >= lo_t).all() and (s <= hi_t).all(), (lo, hi, s)
        assert s[0] == lo_t and s[-1] == hi_t
    # the midpoint of the log-variance is the geometric mean
    assert torch.allclose(squash_sigma(torch.zeros(1), 0.1, 0.4), torch.tensor([0.2]))
    # a network with huge weights, and after the bound schedule moves the bounds
    net = NoiseNet(DO, (TA, DA), 0.1, 0.24, time_dependent=True, hidden=8)
    torch.nn.init.normal_(net.mlp[-1].weight, std=1e6)
    cond, t = 100 * torch.randn(64, DO), torch.rand(64)
    for lo, hi in [(0.1, 0.24), (0.05, 0.12)]:
        net.set_bounds(lo, hi)
        s = net(cond, t)
        assert s.shape == (64, TA, DA)
        assert (s >= torch.tensor(lo)).all() and (s <= torch.tensor(hi)).all()
        assert (s == torch.tensor(lo)).any() and (s == torch.tensor(hi)).any()  # really saturated
    with pytest.raises(ValueError):
        net.set_bounds(0.3, 0.2)
    with pytest.raises(ValueError):
        net.set_bounds(0.0, 0.2)


@pytest.mark.parametrize("kind,steps", [("reflow", 1), ("reflow", 2), ("reflow", 4), ("reflow", 8),
                                        ("shortcut", 1), ("shortcut", 2), ("shortcut", 4)])
def test_noise_off_action_equals_pretrained_k_step_action(kind, steps):
    sampler = make_sampler(kind)
    cond, x0 = torch.randn(16, DO), torch.randn(16, TA, DA)
    with torch.no_grad():
        chain, logp = sampler.sample(cond, steps, deterministic=True, x0=x0)
        expected = sampler.policy.predict_normalized(cond, steps=steps, x0=x0)
        mean_action = sampler.mean_action(cond, x0, steps)
    assert torch.equal(chain[:, -1], expected)
    assert torch.equal(mean_action, expected)
    assert torch.equal(chain[:, 0], x0)
    assert torch.isfinite(logp).all()


@pytest.mark.parametrize("kind,steps", [("reflow", 1), ("reflow", 2), ("reflow", 4), ("reflow", 8), ("shortcut", 1),
                                        ("shortcut", 4)])
def test_chain_shapes_and_log_prob_for_reflow_and_shortcut(kind, steps):
    sampler = make_sampler(kind, time_dependent=True)
    cond = torch.randn(8, DO)
    chain, logp = sampler.sample(cond, steps, generator=torch.Generator().manual_seed(0))
    assert chain.shape == (8, steps + 1, TA, DA) and logp.shape == (8,)
    new_logp, ent = sampler.log_prob(chain, cond, steps)
    assert new_logp.shape == (8,) and ent.shape == (8,)
    assert torch.allclose(new_logp, logp, atol=1e-6, rtol=0)
    assert torch.isfinite(ent).all()


@pytest.mark.parametrize("exec_horizon", [None, 1])
@pytest.mark.parametrize("include_x0", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("time_dependent", [True, False])
def test_chain_log_prob_equals_brute_force_sum_of_normal_log_densities(include_x0, normalize, time_dependent,
                                                                       exec_horizon):
    sampler = make_sampler("reflow", time_dependent=time_dependent, include_x0=include_x0,
                           normalize_logprob=normalize, exec_horizon=exec_horizon)
    cond = torch.randn(12, DO)
    with torch.no_grad():
        chain, logp_sampled = sampler.sample(cond, 4, generator=torch.Generator().manual_seed(1))
        logp, ent = sampler.log_prob(chain, cond)
        ref_logp, ref_ent = brute_force(sampler, chain, cond)
    tol = 1e-5 if normalize else 1e-4
    assert torch.allclose(logp, ref_logp, atol=tol, rtol=0)
    assert torch.allclose(logp_sampled, ref_logp, atol=tol, rtol=0)
    assert torch.allclose(ent, ref_ent, atol=tol, rtol=0)


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_initial_noise_scale_draws_x0_from_n_0_tau2_and_keeps_the_log_prob_exact(tau):
    sampler = make_sampler("reflow", init_noise_scale=tau)
    cond = torch.randn(4000, DO)
    with torch.no_grad():
        chain, logp_sampled = sampler.sample(cond, 4, generator=torch.Generator().manual_seed(2))
        logp, ent = sampler.log_prob(chain, cond)
        ref_logp, ref_ent = brute_force(sampler, chain, cond)
        det, _ = sampler.sample(cond[:8], 4, deterministic=True, generator=torch.Generator().manual_seed(3))
    assert abs(float(chain[:, 0].std()) - tau) < 0.02
    assert torch.allclose(logp, ref_logp, atol=1e-5, rtol=0) and torch.allclose(logp_sampled, ref_logp, atol=1e-5)
    assert torch.allclose(ent, ref_ent, atol=1e-5, rtol=0)
    if tau == 0.0:  # every chain starts at 0: the noise-free action is a function of the observation alone
        with torch.no_grad():
            expected = sampler.policy.predict_normalized(cond[:8], steps=4, x0=torch.zeros(8, TA, DA))
        assert torch.equal(det[:, 0], torch.zeros(8, TA, DA)) and torch.equal(det[:, -1], expected)


def test_initial_noise_scale_outside_0_1_is_rejected():
    with pytest.raises(ValueError, match="init_noise_scale"):
        make_sampler("reflow", init_noise_scale=1.5)


def test_shortcut_brute_force_uses_step_size_one_over_k():
    sampler = make_sampler("shortcut", normalize_logprob=False)
    cond = torch.randn(6, DO)
    with torch.no_grad():
        for k in (1, 2, 4):
            chain, _ = sampler.sample(cond, k, generator=torch.Generator().manual_seed(k))
            assert torch.allclose(sampler.log_prob(chain, cond)[0], brute_force(sampler, chain, cond)[0], atol=1e-4)
    with pytest.raises(ValueError, match="power-of-two"):
        sampler.sample(cond, 3)


def test_log_prob_uses_the_sampling_grid_and_a_different_grid_would_be_caught():
    sampler = make_sampler("reflow", grid_kind="shifted", grid_shift=3.0, normalize_logprob=False)
    cond = torch.randn(8, DO)
    with torch.no_grad():
        chain, logp = sampler.sample(cond, 4, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(sampler.log_prob(chain, cond)[0], logp, atol=1e-5, rtol=0)
        # the bug ReinFlow's design note warns about: scoring on another grid changes the log-prob
        uniform = NoisyFlowSampler(sampler.policy, sampler.noise_net, normalize_logprob=False)
        assert (uniform.log_prob(chain, cond)[0] - logp).abs().max() > 1e-2


def test_clipping_changes_only_what_is_sent_to_the_env():
    sampler = make_sampler("reflow", clip_action=0.2, normalize_logprob=False)
    cond = torch.randn(32, DO)
    with torch.no_grad():
        chain, logp = sampler.sample(cond, 4, generator=torch.Generator().manual_seed(0))
        action = sampler.action(chain)
        assert action.abs().max() <= 0.2 and chain[:, -1].abs().max() > 0.2  # the stored chain is unclipped
        assert torch.allclose(sampler.log_prob(chain, cond)[0], brute_force(sampler, chain, cond)[0], atol=1e-4)
    # intermediate clipping enters the transition mean, and the log-prob stays the exact chain density
    sampler = make_sampler("reflow", clip_intermediate=0.5, normalize_logprob=False)
    with torch.no_grad():
        chain, logp = sampler.sample(cond, 4, generator=torch.Generator().manual_seed(0))
        assert chain[:, 1:-1].abs().max() > 0.5
        ref, _ = brute_force(sampler, chain, cond)
        assert torch.allclose(logp, ref, atol=1e-4) and torch.allclose(sampler.log_prob(chain, cond)[0], ref, atol=1e-4)


def test_log_prob_gradients_reach_velocity_and_noise_networks():
    sampler = make_sampler("reflow", time_dependent=True)
    cond = torch.randn(8, DO)
    with torch.no_grad():
        chain, _ = sampler.sample(cond, 4)
    logp, ent = sampler.log_prob(chain, cond)
    (logp.mean() + ent.mean()).backward()
    for module in (sampler.policy.flow.net, sampler.noise_net):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


def test_mismatched_shapes_are_rejected():
    policy = make_policy()
    with pytest.raises(ValueError, match="x_shape"):
        NoisyFlowSampler(policy, NoiseNet(DO, (TA + 1, DA)))
    sampler = NoisyFlowSampler(policy, NoiseNet(DO, (TA, DA)))
    chain, _ = sampler.sample(torch.randn(2, DO), 4)
    with pytest.raises(ValueError, match="states"):
        sampler.log_prob(chain, torch.randn(2, DO), steps=2)


def test_unexecuted_actions_of_the_last_step_are_marginalized_out():
    """Changing the final state's unexecuted rows changes nothing; changing an executed row does."""
    sampler = make_sampler("reflow", exec_horizon=1, normalize_logprob=False)
    cond = torch.randn(5, DO)
    with torch.no_grad():
        chain, _ = sampler.sample(cond, 4, generator=torch.Generator().manual_seed(2))
        base, _ = sampler.log_prob(chain, cond)
        moved = chain.clone()
        moved[:, -1, 1:] += 3.0
        assert torch.equal(sampler.log_prob(moved, cond)[0], base)
        moved[:, -1, 0] += 3.0
        assert not torch.allclose(sampler.log_prob(moved, cond)[0], base)
        # an unexecuted row of an intermediate state feeds the next velocity: it stays in the log-prob
        moved = chain.clone()
        moved[:, 2, 1:] += 3.0
        assert not torch.allclose(sampler.log_prob(moved, cond)[0], base)


@pytest.mark.parametrize("exec_horizon", [None, 2])
def test_normalization_count_is_executed_action_dims_without_x0_or_k(exec_horizon):
    """The count is Te * Da: it does not grow with K and does not count the initial-noise term."""
    te = TA if exec_horizon is None else exec_horizon
    for k in (1, 2, 4):
        raw = make_sampler("reflow", exec_horizon=exec_horizon, normalize_logprob=False)
        norm = NoisyFlowSampler(raw.policy, raw.noise_net, k, exec_horizon=exec_horizon)
        assert norm.logprob_count == te * DA
        cond = torch.randn(4, DO)
        with torch.no_grad():
            chain, _ = raw.sample(cond, k, generator=torch.Generator().manual_seed(k))
            lp_raw, ent_raw = raw.log_prob(chain, cond)
            lp, ent = norm.log_prob(chain, cond)
        assert torch.allclose(lp * te * DA, lp_raw, atol=1e-4, rtol=1e-6)
        assert torch.allclose(ent * te * DA, ent_raw, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("kind", ["reflow", "shortcut"])
def test_log_prob_on_the_step_grid_equals_the_row_by_row_computation(kind, monkeypatch):
    """forward_grid (conditioning maps on K + B rows) gives the same log-prob as K * B separate rows."""
    from flowpolicy.nets import MLPVelocity

    sampler = make_sampler(kind, time_dependent=True, clip_intermediate=0.9)
    for p in sampler.policy.parameters():  # weights far from init, so every term matters
        torch.nn.init.normal_(p, std=0.3)
    cond = torch.randn(16, DO)
    steps = 4
    with torch.no_grad():
        chain, _ = sampler.sample(cond, steps, generator=torch.Generator().manual_seed(5))
    grid_logp, grid_ent = sampler.log_prob(chain, cond)
    grid_logp.sum().backward()
    grid_grad = [p.grad.clone() for p in sampler.policy.flow.net.parameters()]
    sampler.policy.zero_grad()
    monkeypatch.delattr(MLPVelocity, "forward_grid")
    row_logp, row_ent = sampler.log_prob(chain, cond)
    row_logp.sum().backward()
    assert torch.allclose(grid_logp, row_logp, atol=1e-5, rtol=1e-6) and torch.allclose(grid_ent, row_ent)
    for g, p in zip(grid_grad, sampler.policy.flow.net.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,k,m", [("reflow", 4, 1), ("reflow", 4, 2), ("shortcut", 4, 1), ("reflow", 2, 5)])
def test_noise_in_the_last_steps_only_is_an_exact_chain(kind, k, m):
    """noise_steps=m: the first K - m steps are the policy's Euler steps (no noise, no log-prob term), the last
    m are noisy. The log-prob is the brute-force density of x_0 and the noisy transitions, with the deterministic
    start recomputed from x_0 (so parameter changes reach it); noise off gives the pretrained action."""
    sampler = make_sampler(kind, time_dependent=True, noise_steps=m)
    torch.manual_seed(1)
    cond = torch.randn(16, DO)
    chain, logp = sampler.sample(cond, steps=k, generator=torch.Generator().manual_seed(0))
    first = max(0, k - m)
    x = chain[:, 0]
    for i in range(first):  # the stored start is the noise-free Euler path from x_0
        x = sampler.transition_mean(x, torch.full((16,), i / k), torch.full((16,), 1 / k), cond)
        assert torch.equal(chain[:, i + 1], x)
    if first < k:
        assert not torch.equal(chain[:, first + 1], sampler.transition_mean(
            chain[:, first], torch.full((16,), first / k), torch.full((16,), 1 / k), cond))
    def brute(chain):  # log N(x_0; 0, I) plus the noisy transitions, one Euler step at a time (all rows executed)
        states = list(chain.unbind(1))
        for i in range(first):  # the deterministic start, from x_0 with the networks as they are now
            h_i = torch.full((16,), 1 / k)
            states[i + 1] = states[i] + h_i[:, None, None] * sampler.policy.velocity(states[i], i * h_i, cond, h_i)
        out = torch.distributions.Normal(0.0, 1.0).log_prob(chain[:, 0]).sum((1, 2))
        for i in range(first, k):
            t_i, h_i = torch.full((16,), i / k), torch.full((16,), 1 / k)
            mean = states[i] + h_i[:, None, None] * sampler.policy.velocity(states[i], t_i, cond, h_i)
            out = out + torch.distributions.Normal(mean, sampler.noise_net(cond, t_i)).log_prob(
                chain[:, i + 1]).sum((1, 2))
        return out / (TA * DA)

    expected = brute(chain)
    recomputed, _ = sampler.log_prob(chain, cond)
    assert torch.allclose(logp, expected, atol=1e-5) and torch.allclose(recomputed, logp, atol=1e-5)
    # after the networks change, the deterministic start is recomputed with them, not read from the stored chain
    with torch.no_grad():
        for p in sampler.policy.flow.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert torch.allclose(sampler.log_prob(chain, cond)[0], brute(chain), atol=1e-5)
    with torch.no_grad():
        det, _ = sampler.sample(cond, steps=k, deterministic=True, x0=chain[:, 0])
        assert torch.equal(det[:, -1], sampler.policy.predict_normalized(cond, steps=k, x0=chain[:, 0]))
    with pytest.raises(ValueError, match="noise_steps must be >= 1"):
        make_sampler(noise_steps=0)
