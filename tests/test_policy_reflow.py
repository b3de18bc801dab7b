"""Reflow for policies (agents/policy_reflow.py) on a tiny synthetic bimodal task: straighter 2-RF, 1-step
distillation, checkpoints that load as ordinary ReFlow policies."""

from __future__ import annotations

import pytest
import torch

from agents.checkpoint import load_checkpoint
from agents.loop import fit
from agents.policies import build_policy, policy_from_checkpoint
from agents.policy_reflow import (
    PolicyReflowConfig,
    few_step_gap,
    policy_couplings,
    rectify_policy,
    save_reflow_checkpoint,
)

torch.set_num_threads(1)
SPEC = {"kind": "reflow", "hidden": 64, "depth": 2, "emb_dim": 16, "default_steps": 4}


def bimodal_batch(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Observation o in [-1, 1]; the 2-D action is +-(0.6, 0.6) + 0.3 o (two modes, equally likely), so the
    1-RF's paths bend and one Euler step lands between the modes."""
    obs = torch.rand(n, 1, 1, generator=g) * 2 - 1
    sign = torch.randint(0, 2, (n, 1, 1), generator=g).float() * 2 - 1
    act = sign * 0.6 + 0.3 * obs + 0.03 * torch.randn(n, 1, 2, generator=g)
    return {"obs": obs, "action": act.clamp(-1, 1)}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    policy = build_policy(SPEC, obs_dim=1, act_dim=2, obs_horizon=1, action_horizon=1,
                          obs_stats=([-1.0], [1.0]), action_stats=([-1.0, -1.0], [1.0, 1.0]))
    g = torch.Generator().manual_seed(0)
    fit(policy.flow, lambda i: policy.loss(bimodal_batch(256, g), generator=g), 600, lr=2e-3)
    policy.eval()
    obs = bimodal_batch(512, torch.Generator().manual_seed(1))["obs"]
    cfg = PolicyReflowConfig(pairs_per_obs=4, coupling_steps=50, reflow_steps=500, reflow_lr=1e-3,
                             distill_steps=300, distill_lr=5e-4, batch_size=256)
    return policy, obs, cfg, rectify_policy(policy, obs, cfg)


def test_two_rectified_policy_is_straighter_than_the_pretrained_one(trained):
    policy, obs, _, result = trained
    g = torch.Generator().manual_seed(2)
    cond = policy.encode_obs(obs)
    x0 = policy.flow.noise(cond.shape[0], generator=g)
    gap_1rf = few_step_gap(policy, cond, x0, steps=1, reference_steps=50)
    gap_2rf = few_step_gap(result.rectified, cond, x0, steps=1, reference_steps=50)
    assert gap_2rf < 0.2 * gap_1rf, (gap_1rf, gap_2rf)


def test_distilled_policy_hits_the_two_rf_coupling_targets_in_one_step(trained):
    _, _, _, result = trained
    pairs = result.distill_couplings
    with torch.no_grad():
        err_distilled = (result.distilled.flow.sample(pairs.cond, steps=1, x0=pairs.x0) - pairs.x1).pow(2).mean()
        err_2rf = (result.rectified.flow.sample(pairs.cond, steps=1, x0=pairs.x0) - pairs.x1).pow(2).mean()
    assert float(err_distilled) < 0.3 * float(err_2rf), (float(err_distilled), float(err_2rf))
    assert result.distilled.default_steps == 1


def test_reflow_returns_new_policies_and_leaves_the_pretrained_one_alone(trained):
    policy, obs, cfg, result = trained
    assert result.rectified is not policy and result.distilled is not result.rectified
    assert result.rectified.kind == result.distilled.kind == "reflow"
    assert len(result.couplings) == obs.shape[0] * cfg.pairs_per_obs
    # the pretrained weights are untouched: its own ODE still reproduces the couplings it made
    pairs = result.couplings
    with torch.no_grad():
        again = policy.flow.sample(pairs.cond[:64], steps=cfg.coupling_steps, x0=pairs.x0[:64])
    torch.testing.assert_close(again, pairs.x1[:64])


def test_reflowed_checkpoints_load_as_reflow_policies_with_the_reflow_record(trained, tmp_path):
    _, obs, _, result = trained
    path = save_reflow_checkpoint(result.distilled, SPEC, tmp_path / "ckpt", step=800, distilled_steps=1,
                                  env_meta={"name": "synthetic"})
    cfg = load_checkpoint(path)["config"]
    assert cfg["reflow"] == {"rectification": 2, "distilled_steps": 1}
    assert cfg["policy"]["kind"] == "reflow" and cfg["policy"]["default_steps"] == 1
    loaded, _ = policy_from_checkpoint(tmp_path / "ckpt", expect_kind="reflow")
    x0 = torch.randn(8, 1, 2, generator=torch.Generator().manual_seed(3))
    got = loaded.predict_action_chunk(obs[:8], x0=x0)
    want = result.distilled.predict_action_chunk(obs[:8], x0=x0)
    torch.testing.assert_close(got, want)


def test_reflow_refuses_shortcut_and_gaussian_policies():
    for kind in ("shortcut", "gaussian"):
        p = build_policy({"kind": kind, "hidden": 8, "depth": 1, "default_steps": 1, "max_level": 2}, 1, 2)
        with pytest.raises(ValueError, match="pretrained ReFlow policy"):
            policy_couplings(p, torch.zeros(4, 1, 1))


def test_reflow_config_rejects_bad_values():
    with pytest.raises(ValueError, match="reflow_steps"):
        PolicyReflowConfig(reflow_steps=0).validate()
    with pytest.raises(ValueError, match="distill_on"):
        PolicyReflowConfig(distill_on="nope").validate()
