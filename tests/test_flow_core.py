"""The flow core's math: solver orders, time-sampler densities, losses, shapes."""

import math

import pytest
import torch

from flowpolicy import (
    ConvUNet1D,
    ImageUNet,
    LogitNormalTime,
    MLPVelocity,
    ModeHeavyTailTime,
    RectifiedFlow,
    ShortcutFlow,
    UniformTime,
    UShapedTime,
    integrate,
    pseudo_huber,
    shift_time,
    time_grid,
)
from flowpolicy.solvers import check_grid


def _rotation_field(x, t, d):
    # dx/dt = A x with A a rotation generator plus t-dependent scaling: exact solution known
    return torch.stack([-x[:, 1], x[:, 0]], dim=1) * (1 + t)[:, None]


def _exact_rotation(x0, t1):
    # angle = int_0^t (1 + s) ds = t + t^2 / 2
    a = t1 + t1**2 / 2
    c, s = math.cos(a), math.sin(a)
    return torch.stack([c * x0[:, 0] - s * x0[:, 1], s * x0[:, 0] + c * x0[:, 1]], dim=1)


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_solver_error_shrinks_with_its_order(method, order):
    x0 = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=torch.float64)
    exact = _exact_rotation(x0, 1.0)
    errs = []
    for n in (16, 32, 64):
        grid = time_grid(n).double()
        x = integrate(_rotation_field, x0, grid, method)
        errs.append(float((x - exact).norm()))
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.25 for r in rates), (method, rates)


def test_integrate_takes_exactly_the_grid_steps():
    calls = []

    def v(x, t, d):
        calls.append(float(t[0]))
        return torch.ones_like(x)

    x = integrate(v, torch.zeros(1, 1), time_grid(3), "euler")
    assert len(calls) == 3 and torch.allclose(x, torch.ones(1, 1))
    traj = integrate(v, torch.zeros(1, 1), time_grid(5), "euler", return_trajectory=True)
    assert traj.shape == (6, 1, 1)


def test_custom_grid_is_validated_and_shifted_grid_moves_towards_noise():
    with pytest.raises(ValueError, match="increasing"):
        check_grid(torch.tensor([0.0, 0.5, 0.4, 1.0]))
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(0)
    g = time_grid(4, "shifted", shift=3.0)
    assert g[0] == 0 and g[-1] == 1 and bool((g[1:] > g[:-1]).all())
    assert float(g[2]) < 0.5  # more resolution near t = 0 (noise)


def test_time_samplers_match_their_densities():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    u = UniformTime(eps=0.1)(n, g)
    assert u.min() >= 0.1 and abs(float(u.mean()) - 0.55) < 0.005
    ln = LogitNormalTime(0.0, 1.0)(n, g)
    assert abs(float(ln.median()) - 0.5) < 0.01
    # logit-normal with m = 1 in SD3's convention puts mass near noise, i.e. below 1/2 in ours
    assert float(LogitNormalTime(1.0, 1.0)(n, g).median()) == pytest.approx(1 / (1 + math.e), abs=0.01)
    us = UShapedTime(4.0)
    x = us(n, g)
    # compare histogram with the analytic density
    hist = torch.histc(x, bins=10, min=0, max=1) / n * 10
    centers = torch.linspace(0.05, 0.95, 10)
    assert torch.allclose(hist, us.density(centers), rtol=0.08)
    mode = ModeHeavyTailTime(1.29)(n, g)
    assert 0 <= float(mode.min()) and float(mode.max()) <= 1
    assert abs(float(mode.mean()) - 0.5) < 0.01  # symmetric around 1/2
    # s > 0 concentrates mass in the middle compared with uniform
    assert float(((mode > 0.25) & (mode < 0.75)).float().mean()) > 0.55
    with pytest.raises(ValueError):
        ModeHeavyTailTime(2.0)


def test_shift_keeps_endpoints_and_is_monotone():
    t = torch.linspace(0, 1, 101)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and bool((s[1:] >= s[:-1]).all())
    assert torch.allclose(shift_time(t, 1.0), t)


def test_pseudo_huber_interpolates_between_l2_and_l1():
    d = torch.tensor([[1e-3, 0.0], [10.0, 0.0]])
    out = pseudo_huber(d, torch.zeros_like(d), c=0.1)
    assert out[0] == pytest.approx(0.5 * 1e-6 / 0.1, rel=1e-2)  # quadratic near 0
    assert out[1] == pytest.approx(10.0 - 0.1, rel=1e-3)  # linear far away
    with pytest.raises(ValueError):
        pseudo_huber(d, d, c=0.0)


@pytest.mark.parametrize(
    "net,x_shape,cond",
    [
        (lambda: MLPVelocity((4, 3), cond_dim=10), (4, 3), 10),
        (lambda: ConvUNet1D((8, 3), cond_dim=10), (8, 3), 10),
        (lambda: ImageUNet((1, 8, 8)), (1, 8, 8), 0),
    ],
)
def test_networks_and_flow_shapes(net, x_shape, cond):
    flow = RectifiedFlow(net(), x_shape)
    c = torch.randn(5, cond) if cond else None
    x1 = torch.randn(5, *x_shape)
    loss, info = flow.loss(x1, c)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and "loss/flow" in info
    loss.backward()
    s = flow.sample(c, steps=2, batch=5)
    assert s.shape == (5, *x_shape) and s.dtype == torch.float32


def test_shortcut_rejects_non_power_of_two_and_nets_without_step_input():
    with pytest.raises(ValueError, match="step_input"):
        ShortcutFlow(MLPVelocity((2,)), (2,))
    flow = ShortcutFlow(MLPVelocity((2,), step_input=True), (2,), max_level=3)
    with pytest.raises(ValueError, match="power-of-two"):
        flow.sample(steps=3, batch=2)
    loss, info = flow.loss(torch.randn(16, 2))
    assert "loss/self_consistency" in info


def test_shortcut_passes_step_size_to_the_network():
    seen = []

    class Probe(torch.nn.Module):
        step_input = True

        def forward(self, x, t, cond=None, d=None):
            seen.append(float(d[0]))
            return torch.zeros_like(x)

    flow = ShortcutFlow(Probe(), (2,), max_level=4)
    flow.sample(steps=4, batch=1)
    assert seen == [0.25] * 4
    seen.clear()
    flow.sample(steps=64, batch=1)  # finer than the finest level: clamped to 1/16
    assert set(seen) == {1 / 16}


def test_min_max_normalizer_maps_to_unit_range_and_back_and_keeps_constant_dims():
    from flowpolicy.policy import MinMaxNormalizer

    norm = MinMaxNormalizer([0.0, -2.0, 5.0], [10.0, 2.0, 5.0])  # the last dimension is constant in the data
    x = torch.tensor([[0.0, -2.0, 5.0], [10.0, 2.0, 5.0], [5.0, 0.0, 5.0], [2.5, 1.0, 7.0]])
    y = norm.normalize(x)
    torch.testing.assert_close(y, torch.tensor([[-1.0, -1, 0], [1, 1, 0], [0, 0, 0], [-0.5, 0.5, 0]]))
    # a constant dimension maps to 0 whatever its value, and 0 comes back as the constant
    torch.testing.assert_close(norm.unnormalize(y[:3]), x[:3])
    assert norm.unnormalize(torch.zeros(1, 3))[0, 2] == 5.0
