"""Alignment: Flow-DPO, Flow-RWR, reward guidance and FlowChef (flowpolicy/align.py), policy alignment and the
``stage=align`` runner (agents/align.py), image alignment (agents/images/align.py)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from agents.loop import fit
from flowpolicy.align import (
    dpo_beta,
    flow_dpo_loss,
    flow_rwr_loss,
    flowchef_sample,
    guided_sample,
    rwr_weights,
    velocity_errors,
)
from flowpolicy.flow import RectifiedFlow, linear_path
from flowpolicy.nets import MLPVelocity

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = "metaworld/pick-place-v3"


def _flow(x_shape=(3, 2), cond_dim=0, hidden=32, seed=0):
    torch.manual_seed(seed)
    return RectifiedFlow(MLPVelocity(x_shape, cond_dim=cond_dim, hidden=hidden, depth=2, emb_dim=16), x_shape)


def _frozen(net):
    ref = copy.deepcopy(net).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# --- Flow-DPO -----------------------------------------------------------------------------------------------


def test_dpo_gradient_is_zero_when_policy_is_reference_and_winner_equals_loser():
    flow = _flow(cond_dim=4)
    ref = _frozen(flow.net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 2, generator=g)
    cond = torch.randn(16, 4, generator=g)
    loss, info = flow_dpo_loss(flow, ref, x, x.clone(), cond, beta=1.0, generator=g)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    zero = torch.cat([p.grad.flatten() for p in flow.net.parameters()]).abs().max().item()
    # a real preference (winner != loser) does move the policy, so the zero above is not vacuous
    flow.net.zero_grad()
    loss, _ = flow_dpo_loss(flow, ref, x, torch.randn(16, 3, 2, generator=g), cond, beta=1.0, generator=g)
    loss.backward()
    real = torch.cat([p.grad.flatten() for p in flow.net.parameters()]).abs().max().item()
    assert zero < 1e-6 * real and real > 1e-3  # zero up to float32 rounding of e(w) - e(l)


def test_dpo_loss_falls_when_the_policy_raises_the_winners_likelihood():
    flow = _flow()
    ref = _frozen(flow.net)
    g = torch.Generator().manual_seed(1)
    x_w = torch.randn(64, 3, 2, generator=g) * 0.3 + 1.0
    x_l = torch.randn(64, 3, 2, generator=g) * 0.3 - 1.0
    x0, t = torch.randn(64, 3, 2, generator=g), torch.rand(64, generator=g)
    before, _ = flow_dpo_loss(flow, ref, x_w, x_l, beta=50.0, x0=x0, t=t)
    # fit the winners by plain flow matching: their velocity error falls, so their likelihood rises
    fit(flow, lambda i: flow.loss(x_w, generator=g), 60, lr=3e-3)
    after, info = flow_dpo_loss(flow, ref, x_w, x_l, beta=50.0, x0=x0, t=t)
    assert before.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert after.item() < before.item() - 0.05
    assert info["dpo/accuracy"] > 0.5 and info["dpo/delta"] < 0


def test_dpo_samples_per_pair_average_inside_the_sigmoid_and_bad_shapes_are_refused():
    flow = _flow()
    ref = _frozen(flow.net)
    fit(flow, lambda i: flow.loss(torch.ones(8, 3, 2)), 5, lr=1e-2)
    g = torch.Generator().manual_seed(2)
    x_w, x_l = torch.randn(8, 3, 2, generator=g), torch.randn(8, 3, 2, generator=g)
    x0, t = torch.randn(8, 3, 2, generator=g), torch.rand(8, generator=g)
    with torch.no_grad():
        d = (velocity_errors(flow, x_w, x0, t) - velocity_errors(flow, x_w, x0, t, net=ref)) - (
            velocity_errors(flow, x_l, x0, t) - velocity_errors(flow, x_l, x0, t, net=ref))
        loss, _ = flow_dpo_loss(flow, ref, x_w, x_l, beta=10.0, samples_per_pair=4, x0=x0, t=t)
    expected = -torch.nn.functional.logsigmoid(-5.0 * d.reshape(2, 4).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="samples_per_pair"):
        flow_dpo_loss(flow, ref, x_w, x_l, samples_per_pair=3)
    with pytest.raises(ValueError, match="same shape"):
        flow_dpo_loss(flow, ref, x_w, x_l[:4])


def test_diffusion_dpo_beta_is_the_noise_prediction_weight_in_our_time_convention():
    # Diffusion-DPO weights ||x0 - x0_hat||^2 with x0_hat = x_t - t v; that equals t^2 ||v* - v||^2 here
    g = torch.Generator().manual_seed(3)
    x0, x1, v = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = torch.rand(5, generator=g)
    path = linear_path(x0, x1, t)
    x0_hat = path.x_t - t[:, None] * v
    noise_err = (x0 - x0_hat).pow(2).mean(1)
    vel_err = (path.dx_t - v).pow(2).mean(1)
    assert torch.allclose(noise_err, dpo_beta(t, 1.0, "diffusion_dpo") * vel_err, atol=1e-6)
    assert torch.equal(dpo_beta(t, 7.0, "constant"), torch.full_like(t, 7.0))
    with pytest.raises(ValueError, match="beta schedule"):
        dpo_beta(t, 1.0, "sigmoid")


# --- Flow-RWR -----------------------------------------------------------------------------------------------


def test_rwr_with_uniform_rewards_equals_plain_flow_matching():
    flow = _flow(cond_dim=2)
    g = torch.Generator().manual_seed(4)
    x1, cond = torch.randn(32, 3, 2, generator=g), torch.randn(32, 2, generator=g)
    x0, t = torch.randn(32, 3, 2, generator=g), torch.rand(32, generator=g)
    plain, _ = flow.loss(x1, cond, x0=x0, t=t)
    plain.backward()
    g_plain = [p.grad.clone() for p in flow.net.parameters()]
    flow.net.zero_grad()
    rwr, _ = flow_rwr_loss(flow, x1, torch.full((32,), 3.7), cond, beta=0.5, x0=x0, t=t)
    rwr.backward()
    assert rwr.item() == pytest.approx(plain.item(), rel=1e-6)
    for a, b in zip(g_plain, [p.grad for p in flow.net.parameters()]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    grouped, _ = flow_rwr_loss(flow, x1, torch.full((32,), -2.0), cond, beta=0.5,
                               groups=torch.arange(32) // 4, x0=x0, t=t)
    assert grouped.item() == pytest.approx(plain.item(), rel=1e-6)


def test_rwr_weights_are_normalized_clipped_and_grouped():
    r = torch.tensor([0.0, 1.0, 2.0, 1000.0])
    w = rwr_weights(r, beta=1.0)
    assert torch.isfinite(w).all()  # no overflow at r = 1000
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6)
    assert rwr_weights(r, beta=1.0, max_weight=2.0).max().item() == 2.0
    w = rwr_weights(torch.tensor([0.0, 1.0, 5.0, 5.0]), beta=1.0, groups=torch.tensor([0, 0, 1, 1]))
    assert w[:2].sum().item() == pytest.approx(2.0) and torch.allclose(w[2:], torch.ones(2))
    assert w[1] / w[0] == pytest.approx(math.e, rel=1e-5)
    with pytest.raises(ValueError, match="beta"):
        rwr_weights(r, beta=0.0)
    with pytest.raises(ValueError, match="NaN"):
        rwr_weights(torch.tensor([0.0, float("nan")]), beta=1.0)


# --- guidance -----------------------------------------------------------------------------------------------


def _reward(x):
    return -(x.reshape(x.shape[0], -1) - 1.0).pow(2).sum(1)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
def test_guidance_with_zero_weight_is_the_unguided_sampler_bit_for_bit(solver):
    flow = _flow(cond_dim=3)
    g = torch.Generator().manual_seed(5)
    x0, cond = torch.randn(10, 3, 2, generator=g), torch.randn(10, 3, generator=g)
    with torch.no_grad():
        plain = flow.sample(cond, steps=5, solver=solver, x0=x0)
    for through in (False, True):
        guided = guided_sample(flow, [_reward, _reward], [0.0, 0.0], cond, steps=5, solver=solver, x0=x0,
                               schedule="linear", through_velocity=through)
        assert torch.equal(guided, plain)
    grid = torch.tensor([0.0, 0.1, 0.5, 1.0])
    with torch.no_grad():
        plain = flow.sample(cond, steps=3, solver=solver, x0=x0, grid=grid)
    assert torch.equal(guided_sample(flow, _reward, 0.0, cond, steps=3, solver=solver, x0=x0, grid=grid),
                       plain)
    if solver == "euler":
        chef = flowchef_sample(flow, _reward, 1.0, step_size=0.0, cond=cond, steps=3, x0=x0, grid=grid)
        assert torch.equal(chef, plain)


def test_guidance_and_flowchef_raise_the_reward_and_validate_their_inputs():
    flow = _flow()
    x0 = torch.randn(64, 3, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        base = _reward(flow.sample(steps=4, x0=x0)).mean()
    guided = _reward(guided_sample(flow, _reward, 0.5, steps=4, x0=x0, max_grad_norm=5.0)).mean()
    chef = _reward(flowchef_sample(flow, _reward, 1.0, step_size=0.2, steps=4, x0=x0)).mean()
    assert guided > base + 1.0 and chef > base + 1.0
    with pytest.raises(ValueError, match="one weight per reward"):
        guided_sample(flow, [_reward], [1.0, 2.0], steps=2, x0=x0)
    with pytest.raises(ValueError, match="schedule"):
        guided_sample(flow, _reward, 1.0, steps=2, x0=x0, schedule="cubic")
    with pytest.raises(ValueError, match="shape"):
        guided_sample(flow, lambda x: x.sum(-1), 1.0, steps=2, x0=x0)


def test_rwr_and_dpo_move_a_2d_flow_towards_the_rewarded_mode():
    """A flow on a two-mode mixture, aligned on its own samples towards the mode at x = +2."""
    torch.manual_seed(0)
    flow = RectifiedFlow(MLPVelocity((2,), hidden=64, depth=2, emb_dim=16), (2,))
    g = torch.Generator().manual_seed(7)

    def mixture(n):
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        return torch.stack([2.0 * sign, torch.zeros(n)], 1) + 0.3 * torch.randn(n, 2, generator=g)

    fit(flow, lambda i: flow.loss(mixture(256), generator=g), 400, lr=3e-3)

    def reward(x):
        return x[:, 0]

    x0_eval = torch.randn(512, 2, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        base = reward(flow.sample(steps=8, x0=x0_eval)).mean().item()
        samples = flow.sample(steps=8, x0=torch.randn(1024, 2, generator=g))
    r = reward(samples)
    pairs = r.reshape(-1, 2)
    first_wins = pairs[:, 0] >= pairs[:, 1]
    x_w = torch.where(first_wins[:, None], samples[0::2], samples[1::2])
    x_l = torch.where(first_wins[:, None], samples[1::2], samples[0::2])
    ref = _frozen(flow.net)
    rwr_flow, dpo_flow = copy.deepcopy(flow), copy.deepcopy(flow)
    fit(rwr_flow, lambda i: flow_rwr_loss(rwr_flow, samples, r, beta=0.5, generator=g), 150, lr=1e-3)
    fit(dpo_flow, lambda i: flow_dpo_loss(dpo_flow, ref, x_w, x_l, beta=20.0, generator=g), 150, lr=1e-3)
    with torch.no_grad():
        after_rwr = reward(rwr_flow.sample(steps=8, x0=x0_eval)).mean().item()
        after_dpo = reward(dpo_flow.sample(steps=8, x0=x0_eval)).mean().item()
    assert abs(base) < 0.6  # both modes before
    assert after_rwr > base + 1.0 and after_dpo > base + 0.5


# --- policy preference data ---------------------------------------------------------------------------------


def _traj(ret, group=-1, name="", n=3):
    from agents.align import Trajectory

    return Trajectory(torch.zeros(n, 1, 2), torch.zeros(n, 2, 1), ret, None, group, name)


def test_preference_pairs_rank_by_return_within_start_states():
    from agents.align import preference_pairs

    trajs = [_traj(r, g) for r, g in [(5, 0), (1, 0), (9, 0), (3, 1), (3.5, 1), (7, 2), (7, 2)]]
    assert preference_pairs(trajs) == [(2, 1), (4, 3)]  # state 2 has equal returns: no pair
    assert preference_pairs(trajs, min_return_gap=1.0) == [(2, 1)]
    assert sorted(preference_pairs(trajs, pairing="all")) == [(0, 1), (2, 0), (2, 1), (4, 3)]
    flat = [_traj(r) for r in (4, 1, 3, 2, 0)]
    assert preference_pairs(flat) == [(0, 4), (2, 1)]  # best vs worst, second vs second worst


def test_preference_labels_are_read_from_json_and_csv_with_clear_errors(tmp_path):
    from agents.align import read_preference_labels

    trajs = [_traj(0, name=f"demo_{i}") for i in range(4)]
    (tmp_path / "p.json").write_text(json.dumps([{"winner": "demo_2", "loser": "demo_0"}, ["demo_1", 3],
                                                 {"chosen": 0, "rejected": "demo_3"}]))
    assert read_preference_labels(tmp_path / "p.json", trajs) == [(2, 0), (1, 3), (0, 3)]
    (tmp_path / "p.csv").write_text("winner,loser\ndemo_3,demo_1\n")
    assert read_preference_labels(tmp_path / "p.csv", trajs) == [(3, 1)]
    (tmp_path / "bad.json").write_text(json.dumps({"pairs": [{"winner": "demo_9", "loser": "demo_0"}]}))
    with pytest.raises(ValueError, match="demo_9"):
        read_preference_labels(tmp_path / "bad.json", trajs)
    (tmp_path / "same.json").write_text(json.dumps([["demo_1", "demo_1"]]))
    with pytest.raises(ValueError, match="same trajectory"):
        read_preference_labels(tmp_path / "same.json", trajs)
    with pytest.raises(FileNotFoundError):
        read_preference_labels(tmp_path / "missing.json", trajs)


# --- stage=align on a tiny Meta-World pick-place checkpoint -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_pick_place_checkpoint, pick_place_demos):
    return tiny_pick_place_checkpoint, pick_place_demos  # tests/conftest.py


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_run_align_stage_evaluates_before_and_after_and_saves_a_loadable_aligned_checkpoint(tiny_checkpoint,
                                                                                             tmp_path):
    from agents.align import run_align_stage
    from agents.checkpoint import load_checkpoint
    from agents.policies import policy_from_checkpoint

    ckpt, _ = tiny_checkpoint
    cfg = _compose("stage=align", f"checkpoint={ckpt}", "task.max_episode_steps=30", "logger=none",
                   "progress=false", "stage.num_start_states=2", "stage.rollouts_per_state=2",
                   "stage.rollout_envs=4", "stage.min_return_gap=-1", "stage.grad_steps=3", "stage.batch_pairs=2",
                   "stage.eval_episodes=2", "stage.eval_num_envs=2")
    out = run_align_stage(cfg, tmp_path, cfg.checkpoint)
    assert out["preference_data"]["pairs"] == 2 and out["preference_data"]["trajectories"] == 4
    assert out["eval_before"][0]["episodes"] == 2 and out["eval_after"][0]["steps"] == 2
    summary = json.loads((tmp_path / "align.json").read_text())
    assert summary["method"] == "dpo" and (tmp_path / "eval_after.md").exists()
    loaded = load_checkpoint(out["checkpoint"])
    assert "policy_ema" not in loaded["extras"] and loaded["config"]["stage"] == "align"
    aligned, _ = policy_from_checkpoint(out["checkpoint"])
    pretrained, _ = policy_from_checkpoint(ckpt)
    a, p = (torch.cat([q.flatten() for q in m.flow.net.parameters()]) for m in (aligned, pretrained))
    assert not torch.equal(a, p) and (a - p).abs().max() < 0.1  # moved, a little


@pytest.mark.parametrize("method", ["rwr", "sft"])
def test_offline_alignment_from_demo_returns_and_from_a_labels_file(tiny_checkpoint, tmp_path, method):
    from agents.align import run_align_stage

    ckpt, demos = tiny_checkpoint
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"winner": "demo_0", "loser": "demo_1"}]))
    for source, extra in (("dataset", []), ("labels", [f"stage.labels={labels}"])):
        cfg = _compose("stage=align", f"checkpoint={ckpt}", "logger=none", "progress=false",
                       f"stage.method={method}", f"stage.source={source}", f"stage.dataset={demos}",
                       "stage.min_return_gap=0", "stage.grad_steps=2", "stage.batch_size=8",
                       "stage.eval_episodes=0", *extra)
        out = run_align_stage(cfg, tmp_path / source, cfg.checkpoint)
        assert out["preference_data"]["pairs"] >= 1 and out["train"]["method"] == method
        assert Path(out["checkpoint"]).is_dir()


def test_align_config_errors_are_clear(tiny_checkpoint, tmp_path):
    from agents.align import run_align_stage

    ckpt, _ = tiny_checkpoint
    for override, match in (("stage.method=ppo", "method"), ("stage.source=labels", "labels="),
                            ("stage.rollouts_per_state=1", "rollouts_per_state")):
        cfg = _compose("stage=align", f"checkpoint={ckpt}", "logger=none", override)
        with pytest.raises(ValueError, match=match):
            run_align_stage(cfg, tmp_path, cfg.checkpoint)
    cfg = _compose("stage=align", f"checkpoint={ckpt}", "logger=none", "+stage.not_a_key=1")
    with pytest.raises(ValueError, match="not_a_key"):
        run_align_stage(cfg, tmp_path, cfg.checkpoint)


# --- images -------------------------------------------------------------------------------------------------


def test_image_alignment_raises_the_classifier_reward_of_a_tiny_generator(tmp_path):
    """Stage-level smoke test on a tiny digits generator: DPO on its own samples and guidance both raise the
    mean log-probability of the target class, and the aligned generator reloads."""
    from agents.images.align import run_image_align
    from agents.images.data import load_digits
    from agents.images.trainer import load_generator, train_base
    from agents.images.trainer import save_checkpoint as save_generator

    torch.manual_seed(0)
    data = load_digits()
    stage = OmegaConf.create({"net": {"kind": "mlp", "hidden": 64, "depth": 2, "emb_dim": 32}, "loss": "mse",
                              "time_sampler": "uniform", "ema_decay": 0.9, "batch_size": 64,
                              "grad_steps": 150, "lr": 2e-3})
    model = train_base("1rf", "rf", data, stage, torch.device("cpu"), None, False)
    gen_path = save_generator(model, tmp_path / "gen")
    image = {"target_class": 3, "num_samples": 256, "sample_steps": 4, "grad_steps": 40, "batch_size": 32,
             "eval_samples": 200, "classifier_steps": 60, "classifier_cache_dir": str(tmp_path / "clf"),
             "guidance_weight": 0.5}
    results = {}
    for method in ("dpo", "guidance"):
        task = {"kind": "image", "dataset": "digits", "image_size": 8, "channels": 1}
        cfg = OmegaConf.create({"task": task, "stage": {"name": "align", "method": method, "image": image},
                                "seed": 0, "progress": False})
        results[method] = run_image_align(cfg, tmp_path / method, str(gen_path))
    for method, out in results.items():
        assert out["after"]["reward"] > out["before"]["reward"], method
        assert {"reward_heldout", "target_rate", "fd", "fd_target"} <= set(out["after"])
    flow, cfg = load_generator(results["dpo"]["checkpoint"])
    assert cfg.method == "align_dpo" and flow.sample(steps=2, batch=3).shape == (3, 1, 8, 8)


def test_alignment_rollouts_and_evaluation_run_the_same_episodes(tiny_checkpoint):
    """One runner (envs.episodes.run_episodes) under evaluation and preference-rollout collection: the same
    policy, seed and env count give the same per-episode returns (PPO's evaluation is compared with the same
    runner in tests/test_finetune.py)."""
    from agents.align import collect_rollouts
    from agents.evaluate import rollout_episodes
    from agents.policies import policy_from_checkpoint

    policy, _ = policy_from_checkpoint(tiny_checkpoint[0])
    trajs = collect_rollouts(policy, ENV, 3, 1, seed=7, max_episode_steps=30, num_envs=3)
    ev = rollout_episodes(policy, ENV, 3, num_envs=3, seed=7, max_episode_steps=30)
    ret, length = dict(zip(ev["envs"], ev["returns"])), dict(zip(ev["envs"], ev["lengths"]))
    assert [t.ret for t in trajs] == [ret[i] for i in range(3)]
    assert [len(t.obs) * policy.exec_horizon for t in trajs] == [length[i] for i in range(3)]  # 30 = 15 chunks


# --- pairs from the same restored state (source=branches) ---------------------------------------------------


def test_online_rounds_align_the_current_policy_on_new_start_states(monkeypatch):
    """Round r collects from the policy round r - 1 produced, on start states no earlier round used, and aligns
    that policy (its own reference) with seed + r; a caller's round-0 data is used as given."""
    import agents.align as al

    calls = []

    def data(policy, cfg, env_name, max_steps, dataset):
        calls.append(("data", policy, cfg.rollout_seed))
        return [f"traj of {policy}"], [(0, 0)], {"from": policy}

    def align(policy, trajs, pairs, cfg, logger=None, step_offset=0):
        calls.append(("align", policy, trajs[0], cfg.seed, step_offset))
        return policy + "+", {"final": {}, "history": [{"train/loss": 1.0}]}

    monkeypatch.setattr(al, "preference_data", data)
    monkeypatch.setattr(al, "align_policy", align)
    cfg = al.AlignConfig(source="branches", rounds=3, num_start_states=8, rollout_seed=100, seed=7, grad_steps=50)
    seen = []
    out, records = al.align_rounds("p", cfg, "env", 10, first=(["given"], [(0, 0)], {"from": "caller"}),
                                   on_round=lambda r, pol, rec: seen.append((r, pol)))
    assert out == "p+++" and seen == [(1, "p+"), (2, "p++"), (3, "p+++")]
    assert calls == [("align", "p", "given", 7, 0),      # round r logs its scalars from step r * grad_steps
                     ("data", "p+", 108), ("align", "p+", "traj of p+", 8, 50),
                     ("data", "p++", 116), ("align", "p++", "traj of p++", 9, 100)]
    assert [r["preference_data"] for r in records] == [{"from": "caller"}, {"from": "p+"}, {"from": "p++"}]


def test_online_rounds_end_early_without_pairs_or_on_ctrl_c_and_keep_the_rounds_done(monkeypatch, capsys):
    """A later round whose policy gives no pair (e.g. every copy succeeds) ends the rounds with the last
    aligned policy instead of failing; a Ctrl-C between rounds marks the last round done as stopped (so the
    stage saves it); neither trains again."""
    import agents.align as al

    trained = []

    def align(policy, trajs, pairs, cfg, logger=None, step_offset=0):
        trained.append(policy)
        return policy + "+", {"final": {}, "history": []}

    monkeypatch.setattr(al, "align_policy", align)
    monkeypatch.setattr(al, "preference_data", lambda policy, *a: (["t"], [], {"pairs": 0}))
    cfg = al.AlignConfig(source="branches", rounds=3, grad_steps=20)
    out, records = al.align_rounds("p", cfg, "env", 10, first=(["g"], [(0, 0)], {"pairs": 1}))
    assert out == "p+" and trained == ["p"] and len(records) == 1 and "stopped_at" not in records[0]
    assert "round 2 found no preference pairs" in records[0]["ended"] and "round 2" in capsys.readouterr().out
    # RWR learns from the trajectories themselves: no pair is needed to go on
    out, _ = al.align_rounds("p", al.AlignConfig(source="branches", rounds=2, method="rwr"), "env", 10,
                             first=(["g"], [], {}))
    assert out == "p++"
    trained.clear()
    monkeypatch.setattr(al, "stop_requested", lambda: True)
    out, records = al.align_rounds("p", cfg, "env", 10, first=(["g"], [(0, 0)], {"pairs": 1}))
    assert out == "p+" and trained == ["p"] and records[-1]["stopped_at"] == 20


def test_branch_pairs_share_their_state_exactly_and_rank_the_copies_by_what_followed(tiny_checkpoint):
    """Copies of one branch point see the very same observation (restored by replay), sample different chunks,
    and carry the return / success of their own continuation; the collection is seeded."""
    from agents.align import preference_pairs
    from agents.align_branches import collect_branches, success_pairs
    from agents.policies import policy_from_checkpoint

    policy, _ = policy_from_checkpoint(tiny_checkpoint[0])
    kw = dict(num_start_states=2, branches=2, branch_points=3, steps=2, seed=5, max_episode_steps=30, num_envs=4)
    trajs = collect_branches(policy, ENV, **kw)
    assert len(trajs) == 2 * 3 * 2 and sorted({t.group for t in trajs}) == list(range(6))
    assert [t.name for t in trajs[:6]] == ["state0_chunk0_branch0", "state0_chunk0_branch1", "state0_chunk5_branch0",
                                           "state0_chunk5_branch1", "state0_chunk10_branch0", "state0_chunk10_branch1"]
    obs_dim, act_shape = trajs[0].obs.shape[1:], trajs[0].actions.shape[1:]
    for g in range(6):
        a, b = trajs[2 * g], trajs[2 * g + 1]
        assert a.obs.shape == (1, *obs_dim) and a.actions.shape == (1, *act_shape)
        assert torch.equal(a.obs, b.obs)  # the same state, exactly
        assert not torch.equal(a.actions, b.actions)  # their own flow noise
    # different branch points of one start state are different states; later branches collect less return
    assert not torch.equal(trajs[0].obs, trajs[2].obs) and not torch.equal(trajs[2].obs, trajs[4].obs)
    # branching at chunk 0 restores the start state: the observation is the env's reset observation
    from envs.factory import make_env

    env = make_env(ENV, obs_horizon=policy.obs_horizon, max_episode_steps=30)
    first, _ = env.reset(seed=5)
    env.close()
    assert torch.allclose(trajs[0].obs.reshape(-1), torch.as_tensor(first, dtype=trajs[0].obs.dtype).reshape(-1))
    again = collect_branches(policy, ENV, **kw)
    assert [t.ret for t in again] == [t.ret for t in trajs] and torch.equal(again[3].actions, trajs[3].actions)
    pairs = preference_pairs(trajs, 0.0)
    assert pairs and all(trajs[w].group == trajs[l].group and trajs[w].ret > trajs[l].ret for w, l in pairs)
    succ = [_traj(0.0, group=0), _traj(1.0, group=0), _traj(2.0, group=1), _traj(0.0, group=0)]
    succ[0].success, succ[2].success = True, True
    assert success_pairs(succ) == [(0, 1), (0, 3)]  # within a group, success over failure, whatever the return


def test_shared_branch_noise_gives_the_copies_the_same_noise_after_their_own_chunk(tiny_checkpoint):
    """branch_noise=shared (common random numbers): copies of one branch point draw their first chunk's noise
    independently and share every later chunk's; other branch points get other noise."""
    from agents.align_branches import collect_branches
    from agents.policies import policy_from_checkpoint

    policy, _ = policy_from_checkpoint(tiny_checkpoint[0])
    calls = []
    act = policy.predict_action_chunk

    def spy(obs, steps=None, **kw):
        calls.append(kw.get("x0"))
        return act(obs, steps=steps, **kw)

    policy.predict_action_chunk = spy
    kw = dict(num_start_states=2, branches=2, branch_points=1, steps=2, seed=5, max_episode_steps=30, num_envs=4)
    trajs = collect_branches(policy, ENV, **kw, shared_noise=True)
    full = [x0 for x0 in calls if x0 is not None and x0.shape[0] == 4]  # rows: state 0 x2, state 1 x2
    assert full and all(torch.equal(x[0], x[1]) and torch.equal(x[2], x[3]) and not torch.equal(x[0], x[2])
                        for x in full)
    assert not torch.equal(trajs[0].actions, trajs[1].actions)  # the branch chunks themselves differ
    assert len(full) >= 2 and not torch.equal(full[0][0], full[1][0])  # each later chunk has its own noise
    calls.clear()
    collect_branches(policy, ENV, **kw)
    assert calls and all(x0 is None for x0 in calls)  # independent (default): the shared generator only


def test_branch_replay_that_does_not_restore_the_state_stops_with_one_clear_error(tiny_checkpoint, monkeypatch):
    import gymnasium as gym
    import numpy as np

    import agents.align_branches as ab
    from agents.policies import policy_from_checkpoint

    class Drifting(gym.Wrapper):  # a nondeterministic env: its observations carry fresh noise
        def reset(self, **kw):
            obs, info = self.env.reset(**kw)
            return obs + np.random.default_rng().normal(0, 1e-3, obs.shape), info

    make = ab.make_env
    monkeypatch.setattr(ab, "make_env", lambda *a, **kw: Drifting(make(*a, **kw)))
    policy, _ = policy_from_checkpoint(tiny_checkpoint[0])
    with pytest.raises(ValueError, match="did not restore its state.*use source=rollouts"):
        ab.collect_branches(policy, ENV, 1, 2, 1, steps=1, max_episode_steps=10, num_envs=2)


def test_run_align_stage_trains_on_same_state_pairs(tiny_checkpoint, tmp_path):
    from agents.align import run_align_stage
    from agents.checkpoint import load_checkpoint

    ckpt, _ = tiny_checkpoint
    cfg = _compose("stage=align", f"checkpoint={ckpt}", "task.max_episode_steps=20", "logger=none",
                   "progress=false", "stage.source=branches", "stage.num_start_states=2",
                   "stage.rollouts_per_state=3", "stage.branch_points=2", "stage.branch_chunks=4",
                   "stage.branch_span=0.5",
                   "stage.rollout_envs=6", "stage.min_return_gap=0", "stage.pairing=all", "stage.grad_steps=2",
                   "stage.batch_pairs=2", "stage.eval_episodes=0", "stage.rounds=2")
    out = run_align_stage(cfg, tmp_path, cfg.checkpoint)
    data = out["preference_data"]
    assert data["source"] == "branches" and data["trajectories"] == 2 * 2 * 3 and data["pairs"] >= 1
    # two online rounds: the second collected its own pairs; the checkpoint counts both rounds' steps
    assert [r["round"] for r in out["rounds"]] == [1, 2] and out["rounds"][0]["preference_data"] == data
    assert out["rounds"][1]["preference_data"]["trajectories"] == 2 * 2 * 3
    saved = load_checkpoint(out["checkpoint"])["config"]
    assert saved["step"] == 2 * 2 and len(saved["preference_data_rounds"]) == 2
    for override, match in (("stage.prefer=success", None), ("stage.branch_chunks=0", "branch_chunks"),
                            ("stage.branch_span=1.5", "branch_span"),
                            ("stage.prefer=judge", "prefer"), ("stage.rounds=0", "rounds must be"),
                            ("stage.branch_noise=common", "branch_noise"),
                            ("stage.rounds=2", "rounds=2 collects new pairs")):
        cfg = _compose("stage=align", f"checkpoint={ckpt}", "logger=none", "stage.source=dataset", override)
        if match is None:
            match = "prefer=success"
        with pytest.raises(ValueError, match=match):
            run_align_stage(cfg, tmp_path / "bad", cfg.checkpoint)
    # start states (over all rounds) must stay clear of the evaluation episodes' env seeds
    from agents.align_data import AlignConfig

    with pytest.raises(ValueError, match="overlap the evaluation episodes"):
        AlignConfig(source="branches", rollout_seed=99_990, num_start_states=8, rounds=2, eval_seed=100_000,
                    eval_episodes=10).validate()
    AlignConfig(source="branches", rollout_seed=99_990, num_start_states=5, rounds=2, eval_seed=100_000,
                eval_episodes=10).validate()  # seeds 99,990-99,999: just clear
