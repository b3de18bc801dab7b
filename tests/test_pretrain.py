"""Pretraining, evaluation, checkpoints and resume on Meta-World pick-place demos made by the scripted expert."""

import os
import signal

import numpy as np
import pytest
import torch

from agents.checkpoint import CheckpointError, load_checkpoint
from agents.evaluate import evaluate_policy_steps, measure_latency
from agents.policies import policy_from_checkpoint
from agents.pretrain import PretrainConfig, Pretrainer, TrainingInterrupted
from envs.collect import ensure_demos

ENV = "metaworld/pick-place-v3"


@pytest.fixture(scope="session")
def demos(tmp_path_factory):
    return str(ensure_demos(ENV, num_demos=10, noise=0.3, seed=0, data_dir=tmp_path_factory.mktemp("data"),
                            progress=False))


def _cfg(demos, run_dir, **kw):
    base = dict(dataset=demos, env_name=ENV, run_dir=str(run_dir), policy={"kind": "reflow", "hidden": 64,
                "depth": 2, "default_steps": 2}, obs_horizon=1, action_horizon=4, exec_horizon=2, grad_steps=30,
                batch_size=64, eval_every=0, eval_episodes=0, val_every=10, save_every=10, max_episode_steps=60,
                progress=False, tensorboard=False)
    base.update(kw)
    return PretrainConfig(**base)


def _params(policy):
    return torch.cat([p.detach().flatten() for p in policy.parameters()])


def test_pretrain_writes_self_describing_checkpoints(demos, tmp_path):
    out = Pretrainer(_cfg(demos, tmp_path)).run()
    ck = tmp_path / "checkpoints"
    assert (ck / "last").is_symlink() and (ck / "best").is_symlink()
    files = {p.name for p in (ck / "last").iterdir()}
    assert {"config.yaml", "model.safetensors", "env_meta.json", "training_state.pt"} <= files
    policy, loaded = policy_from_checkpoint(out["checkpoint"])
    assert loaded["env_meta"]["name"] == ENV and loaded["config"]["step"] == 30
    assert policy.exec_horizon == 2 and policy.kind == "reflow"
    assert "val/loss" in out and np.isfinite(out["val/loss"])


@pytest.mark.parametrize("kind", ["reflow", "shortcut", "gaussian"])
def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(demos, tmp_path, kind):
    policy = {"kind": kind, "hidden": 32, "depth": 1, "default_steps": 1, "max_level": 3}
    full = Pretrainer(_cfg(demos, tmp_path / "full", policy=policy, grad_steps=20))
    full.run()
    half = Pretrainer(_cfg(demos, tmp_path / "half", policy=policy, grad_steps=20))
    _interrupt_at(half, 10)
    with pytest.raises(TrainingInterrupted, match="stopped at step 10; saved "):
        half.run()
    resumed = Pretrainer(_cfg(demos, tmp_path / "half", policy=policy, grad_steps=20))
    assert resumed.step == 10
    resumed.run()
    assert torch.equal(_params(full.policy), _params(resumed.policy))
    assert torch.equal(_params(full.ema.model), _params(resumed.ema.model))


def _interrupt_at(trainer, step):
    """Deliver a real SIGINT (Ctrl-C) to this process while the trainer is at ``step``."""
    orig = trainer.policy.loss

    def loss(batch, **kw):
        if trainer.step == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return orig(batch, **kw)

    trainer.policy.loss = loss


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(demos, tmp_path):
    tr = Pretrainer(_cfg(demos, tmp_path, grad_steps=40))
    orig = tr.policy.loss

    def poisoned(batch, **kw):
        loss, info = orig(batch, **kw)
        return (loss * float("nan") if tr.step >= 25 else loss), info

    tr.policy.loss = poisoned
    with pytest.raises(FloatingPointError, match="step 25"):
        tr.run()
    good = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert good["config"]["step"] == 20
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_invalid_values_fail_before_training(demos, tmp_path):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Pretrainer(_cfg(demos, tmp_path, grad_steps=0))
    with pytest.raises(ValueError, match="power-of-two"):
        Pretrainer(_cfg(demos, tmp_path, policy={"kind": "shortcut", "default_steps": 3}))
    with pytest.raises(ValueError, match="exec_horizon"):
        Pretrainer(_cfg(demos, tmp_path, exec_horizon=5))
    with pytest.raises(ValueError, match="policy.kind"):
        Pretrainer(_cfg(demos, tmp_path, policy={"kind": "diffusion"}))


def test_checkpoint_of_another_policy_kind_is_refused(demos, tmp_path):
    out = Pretrainer(_cfg(demos, tmp_path, grad_steps=10)).run()
    with pytest.raises(CheckpointError, match="holds a 'reflow' policy, expected 'shortcut'"):
        policy_from_checkpoint(out["checkpoint"], expect_kind="shortcut")


def test_bc_policy_learns_pick_place_and_sb3_evaluate_policy_runs_it(demos, tmp_path):
    """A small seeded BC run clearly beats the untrained policy; SB3's evaluate_policy runs it unchanged."""
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import DummyVecEnv

    from envs.factory import make_env

    torch.manual_seed(0)
    cfg = _cfg(demos, tmp_path, grad_steps=600, batch_size=128, policy={"kind": "reflow", "hidden": 128, "depth": 2,
               "default_steps": 2}, max_episode_steps=120)
    tr = Pretrainer(cfg)
    untrained = evaluate_policy_steps(tr.ema.model, ENV, [2], episodes=6, num_envs=3, max_episode_steps=120)[0]
    out = tr.run()
    policy, _ = policy_from_checkpoint(out["checkpoint"])
    row = evaluate_policy_steps(policy, ENV, [2], episodes=6, num_envs=3, max_episode_steps=120)[0]
    assert row["success_rate"] >= 0.5 and untrained["success_rate"] == 0.0, (row, untrained)
    assert row["return_mean"] > untrained["return_mean"] + 100
    venv = DummyVecEnv([lambda i=i: make_env(ENV, seed=50 + i, max_episode_steps=120) for i in range(2)])
    policy.reset()
    mean, _ = evaluate_policy(policy, venv, n_eval_episodes=2, deterministic=True)
    assert mean > untrained["return_mean"]


def test_latency_is_reported_per_call_and_per_env_step(demos, tmp_path):
    tr = Pretrainer(_cfg(demos, tmp_path, grad_steps=1))
    # medians of 30 calls, and 8 forwards per call against a bar of 2: a 5-call median at K = 4 once measured
    # 1.8x on a quiet 2-core VM (one slow bare-forward median)
    lat = measure_latency(tr.policy, steps=8, repeats=30)
    assert lat["latency_us_per_env_step"] == pytest.approx(lat["latency_us_per_call"] / 2)
    assert lat["latency_us_per_call"] > 2 * lat["bare_forward_us"]  # 8 forwards per call
