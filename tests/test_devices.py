"""The GPU path's class of bugs, caught on CPU: seeded random draws with a generator on another device, and
modules that stay behind on ``.to()`` (issue: GPU path)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from flowpolicy import rng
from flowpolicy.flow import ShortcutFlow
from flowpolicy.nets import MLPVelocity

ROOT = Path(__file__).resolve().parents[1]
RANDOM_FNS = {"randn", "rand", "randint", "randperm", "normal", "bernoulli", "multinomial", "randn_like",
              "rand_like", "randint_like"}


def _generator_calls_with_a_device(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and node.func.attr in RANDOM_FNS):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        if "generator" in kw and "device" in kw:
            dev = kw["device"]
            if isinstance(dev, ast.Constant) and dev.value == "cpu":
                continue
            if isinstance(dev, ast.Attribute) and dev.attr == "device" and ast.unparse(dev.value) == ast.unparse(
                    kw["generator"]):
                continue  # device=generator.device
            yield f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"


def test_no_seeded_draw_targets_a_device_other_than_its_generators():
    """torch.randn(..., generator=g, device=x.device) raises on CUDA when g is a CPU generator (and every seeded
    generator in the project is). Draws go through flowpolicy.rng instead, which draws on g's device and moves
    the result. This scans the source, so it fails on a machine without a GPU."""
    offenders = []
    for pkg in ("flowpolicy", "agents", "envs", "bench"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name != "rng.py":
                offenders += list(_generator_calls_with_a_device(path))
    assert not offenders, "seeded draws that break on a GPU:\n" + "\n".join(offenders)


def test_the_scan_catches_the_bug_pattern(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nx = torch.randn(3, generator=g, device=y.device)\n")
    bad2 = tmp_path / "ok.py"
    bad2.write_text("import torch\nx = torch.randn(3, generator=g, device=g.device)\nz = torch.rand(2, generator=g)\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert len(list(_generator_calls_with_a_device(bad))) == 1
        assert not list(_generator_calls_with_a_device(bad2))
    finally:
        ROOT = old


def test_rng_helpers_draw_on_the_generators_device_and_return_on_the_target():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = rng.randn((4, 2), g, "cpu", torch.float64)
    assert torch.equal(x, ref) and x.dtype == torch.float64
    assert rng.rand((5,), None, "cpu").shape == (5,)
    assert rng.randint(0, 3, (6,), torch.Generator().manual_seed(0), "cpu").max() < 3
    assert sorted(rng.randperm(5, torch.Generator().manual_seed(0)).tolist()) == list(range(5))
    if torch.cuda.is_available():  # the real thing, where there is a GPU
        y = rng.randn((4, 2), torch.Generator().manual_seed(3), "cuda", torch.float64)
        assert y.is_cuda and torch.equal(y.cpu(), ref)


def test_shortcut_ema_moves_with_the_model():
    """The EMA copy is not a submodule; .to() used to leave it behind (mixed dtypes/devices in the loss)."""
    net = MLPVelocity((3, 2), cond_dim=4, hidden=16, depth=1, emb_dim=8, step_input=True)
    flow = ShortcutFlow(net, (3, 2), max_level=3, sc_fraction=0.5).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in flow.ema.model.parameters())
    assert "ema.model" not in " ".join(flow.state_dict())  # the checkpoint format is unchanged
    x1, cond = torch.randn(8, 3, 2, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    loss, _ = flow.loss(x1, cond, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shortcut_loss_on_cuda_with_a_cpu_generator():
    net = MLPVelocity((3, 2), cond_dim=4, hidden=16, depth=1, emb_dim=8, step_input=True)
    flow = ShortcutFlow(net, (3, 2), max_level=3, sc_fraction=0.5).cuda()
    x1, cond = torch.randn(8, 3, 2, device="cuda"), torch.randn(8, 4, device="cuda")
    loss, _ = flow.loss(x1, cond, generator=torch.Generator().manual_seed(0))
    assert loss.is_cuda and torch.isfinite(loss)


# --- fast K-step sampling ------------------------------------------------------------------------------


def _policy(kind: str):
    import numpy as np

    from flowpolicy.flow import RectifiedFlow
    from flowpolicy.policy import FlowPolicy

    torch.manual_seed(0)
    net = MLPVelocity((4, 3), cond_dim=5, hidden=32, depth=2, emb_dim=16, step_input=kind == "shortcut")
    flow = ShortcutFlow(net, (4, 3), max_level=4) if kind == "shortcut" else RectifiedFlow(net, (4, 3))
    return FlowPolicy(flow, 5, 3, 1, 4, obs_stats=(np.full(5, -2.0), np.full(5, 3.0)),
                      action_stats=(np.full(3, -1.0), np.full(3, 2.0))).eval()


@pytest.mark.parametrize("kind", ["reflow", "shortcut"])
def test_fast_sampling_gives_bit_identical_actions_and_follows_weight_changes(kind):
    policy = _policy(kind)
    obs = torch.randn(16, 5)

    def both(steps, batch):
        out = []
        for fast in (True, False):
            policy.fast_sampling = fast
            out.append(policy.predict_action_chunk(obs[:batch], steps=steps,
                                                   generator=torch.Generator().manual_seed(steps)))
        return out

    for steps in (1, 2, 4, 8):
        for batch in (1, 16):
            fast, slow = both(steps, batch)
            assert torch.equal(fast, slow), (steps, batch)
    before, _ = both(4, 16)
    with torch.no_grad():  # an in-place update (what an optimizer step does) invalidates the cached embeddings
        policy.flow.net.embed.t_embed[1].weight.mul_(1.5)
        policy.act_norm.high.add_(1.0)
    fast, slow = both(4, 16)
    assert torch.equal(fast, slow) and not torch.equal(fast, before)


def test_fast_sampling_is_off_where_gradients_flow():
    policy = _policy("reflow")
    cond = policy.encode_obs(torch.randn(3, 5))
    with torch.enable_grad():
        a = policy.predict_normalized(cond, steps=2, generator=torch.Generator().manual_seed(0))
    assert a.requires_grad  # the plain path: a gradient reaches the velocity network


@pytest.mark.parametrize("kind", ["reflow", "shortcut"])
def test_the_cuda_graph_body_is_the_fast_sampler_without_its_cache(kind):
    """What the CUDA graph replays (flowpolicy.fast.euler_uncached) gives the fast sampler's actions bit for bit,
    so graph and eager sampling agree wherever the graph's kernels are the eager ones."""
    from flowpolicy.fast import FastEuler, euler_uncached

    torch.manual_seed(0)
    net = MLPVelocity((4, 3), cond_dim=5, hidden=32, depth=2, step_input=kind == "shortcut")
    cond, x0 = torch.randn(7, 5), torch.randn(7, 4, 3)
    with torch.no_grad():
        for k in (1, 2, 4, 8):
            assert torch.equal(euler_uncached(net, cond, k, x0), FastEuler().sample(net, cond, k, x0))


def test_a_policy_with_graph_state_deep_copies_and_pickles():
    """Alignment deep-copies the policy; a captured CUDA graph cannot be copied, so copies start without one."""
    import copy
    import pickle

    from flowpolicy.fast import CudaGraphChunk

    g = CudaGraphChunk()
    g._graphs[("k",)] = (object(),)
    g.failed = "x"
    for c in (copy.deepcopy(g), pickle.loads(pickle.dumps(g))):
        assert c._graphs == {} and c.failed is None
