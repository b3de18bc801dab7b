"""The one supervised loop (agents.loop): the step order, bit-identical to a hand-written loop, and callbacks."""

import copy

import pytest
import torch

from agents.loop import (
    Callback,
    EMAUpdate,
    NonFiniteGuard,
    ShortcutTarget,
    StopOnCtrlC,
    SupervisedLoop,
    every,
    fit,
)
from flowpolicy import EMA, RectifiedFlow, ShortcutFlow, make_network


def _flow(shortcut: bool):
    torch.manual_seed(0)
    net = make_network("mlp", (2,), cond_dim=0, step_input=shortcut, hidden=16, depth=2)
    return ShortcutFlow(net, (2,), max_level=3) if shortcut else RectifiedFlow(net, (2,))


@pytest.mark.parametrize("shortcut", [False, True])
def test_fit_is_bit_identical_to_the_plain_loop_it_replaces(shortcut):
    x1 = torch.randn(128, 2, generator=torch.Generator().manual_seed(1))
    flows = [_flow(shortcut), _flow(shortcut)]
    ema = EMA(flows[1].net, decay=0.9)

    def loss_fn(flow, g):
        return lambda i: flow.loss(x1[torch.randint(0, 128, (32,), generator=g)], generator=g)

    got = fit(flows[0], loss_fn(flows[0], torch.Generator().manual_seed(2)), 30, lr=3e-3, grad_clip=0.5)
    # the loop as it was written before agents.loop (flowpolicy/fit.py), plus an EMA
    flow, g = flows[1], torch.Generator().manual_seed(2)
    opt = torch.optim.AdamW(flow.net.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30, eta_min=3e-3 * 0.05)
    want = []
    for i in range(30):
        loss, _ = loss_fn(flow, g)(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.net.parameters(), 0.5)
        opt.step()
        sched.step()
        ema.update(flow.net)
        if shortcut:
            flow.update_ema()
        want.append(float(loss.detach()))
    assert got == want
    for a, b in zip(flows[0].net.parameters(), flows[1].net.parameters(), strict=True):
        assert torch.equal(a, b)
    if shortcut:
        for a, b in zip(flows[0].ema.model.parameters(), flows[1].ema.model.parameters(), strict=True):
            assert torch.equal(a, b)


class _Order(Callback):
    def __init__(self, log):
        self.log = log

    def on_start(self, loop):
        self.log.append("start")

    def on_loss(self, step):
        self.log.append(f"loss{step.index}")

    def on_grad(self, step):
        self.log.append(f"grad{step.index}")

    def on_update(self, step):
        self.log.append(f"update{step.index}")

    def on_step_end(self, step):
        self.log.append(f"end{step.done}")

    def on_end(self, loop):
        self.log.append("finish")


def test_hooks_run_in_step_order_from_a_resumed_index_and_a_stop_ends_after_the_step():
    flow = _flow(False)
    x1 = torch.randn(8, 2)
    log, requests = [], iter([False, True])
    opt = torch.optim.Adam(flow.net.parameters(), lr=1e-3)
    loop = SupervisedLoop(flow.net.parameters(), opt, lambda i: flow.loss(x1), callbacks=[
        _Order(log), StopOnCtrlC(lambda: next(requests))])
    assert loop.run(10, start=3) == 5 and loop.stopped
    assert log == ["start", "loss3", "grad3", "update3", "end4", "loss4", "grad4", "update4", "end5", "finish"]
    assert [every(3)(s) for s in _steps(7)] == [False, False, True, False, False, True, False]
    assert [every(3, 7, first=True)(s) for s in _steps(7)] == [True, False, False, True, False, False, True]


def _steps(n):
    from agents.loop import Step

    return [Step(i, torch.zeros(()), {}, torch.zeros(())) for i in range(n)]


def test_non_finite_guard_stops_before_the_optimizer_touches_the_weights():
    flow = _flow(False)
    before = copy.deepcopy(flow.net.state_dict())
    ema = EMA(flow.net)
    opt = torch.optim.Adam(flow.net.parameters(), lr=1e-3)
    guard = NonFiniteGuard(lambda s: f"loss at {s.index}", lambda s: f"gradient at {s.index}")
    cbs = [guard, EMAUpdate(ema, flow.net), ShortcutTarget(flow)]
    nan = SupervisedLoop(flow.net.parameters(), opt, lambda i: (torch.tensor(float("nan")), {}), callbacks=cbs)
    with pytest.raises(FloatingPointError, match="loss at 0"):
        nan.run(3)
    x1 = torch.randn(8, 2)

    def inf_grad(i):  # a finite loss whose gradient is not: d sqrt(u) / du at u = 0
        loss, info = flow.loss(x1)
        w = next(flow.net.parameters()).sum()
        return loss + (w - w.detach()).sqrt(), info

    bad = SupervisedLoop(flow.net.parameters(), opt, inf_grad, grad_clip=1.0, callbacks=cbs)
    with pytest.raises(FloatingPointError, match="gradient at 0"):
        bad.run(3)
    assert all(torch.equal(v, before[k]) for k, v in flow.net.state_dict().items())
    assert ema.num_updates == 0


def test_grad_clip_0_measures_without_clipping_and_a_negative_max_norm_is_refused():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    norms = []

    class Record(Callback):
        def on_grad(self, step):
            norms.append(float(step.grad_norm))

    SupervisedLoop([w], opt, lambda i: ((w * torch.tensor([30.0, 40.0])).sum(), {}), grad_clip=0,
                   callbacks=[Record()]).run(1)
    assert norms == [50.0] and torch.allclose(w.detach(), torch.zeros(2), atol=1e-5)  # the full step
    with pytest.raises(ValueError, match=r"grad_clip must be >= 0 \(the max gradient norm; 0: no clipping\)"):
        SupervisedLoop([w], opt, lambda i: (w.sum(), {}), grad_clip=-1.0)
