"""stage=finetune: Ctrl-C saves once at an iteration boundary and resumes exactly; fresh runs with the same seed
give identical weights; a second process on the run directory is refused (agents/finetune_stage.py)."""

import os
import signal

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from agents.checkpoint import RunLock, RunLockedError, TrainingInterrupted, load_checkpoint, save_checkpoint
from agents.finetune import ReinFlowPPO
from agents.finetune_stage import run_finetune_stage
from agents.policies import build_policy, policy_config

torch.set_num_threads(1)
ENV = "Hopper-v5"
STAGE = dict(total_env_steps=64, save_every=100, num_envs=2, n_steps=4, eval_num_envs=1, eval_episodes=1,
             eval_every=2, critic_warmup_iters=1, minibatch_size=8, update_epochs=2, denoise_steps=2, noise_hidden=16,
             critic_hidden=[16, 16], seed=3)  # 16 env steps per iteration: 4 iterations


def _cfg(resume=True):
    return OmegaConf.create({"task": {"env": ENV, "max_episode_steps": 12}, "logger": {"name": "none"},
                             "progress": False, "resume": resume})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    spec = {"kind": "reflow", "hidden": 16, "depth": 1, "default_steps": 2}
    policy = build_policy(spec, 11, 3, 1, 4, 2, (np.full(11, -5.0), np.full(11, 5.0)),
                          (np.full(3, -1.0), np.ones(3)))
    root = tmp_path_factory.mktemp("pre") / "checkpoints"
    save_checkpoint(root, 0, policy_config(policy, spec), policy, {"name": ENV, "has_success": False})
    return str(root.parent)


def _weights(run_dir):
    ck = load_checkpoint(run_dir / "checkpoints" / "last")
    agent = ck["training_state"]["agent"]
    return {**{f"policy.{k}": v for k, v in ck["model"].items()},
            **{f"critic.{k}": v for k, v in agent["critic"].items()},
            **{f"actor.{k}": v for k, v in agent["actor"].items()}}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff


def test_fresh_runs_with_the_same_seed_give_identical_weights(pretrained, tmp_path):
    run_finetune_stage(_cfg(), tmp_path / "a", pretrained, STAGE)
    torch.manual_seed(12345)  # whatever ran before must not matter
    np.random.seed(12345)
    out = run_finetune_stage(_cfg(), tmp_path / "b", pretrained, STAGE)
    assert out["env_steps"] == 64
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    start = load_checkpoint(pretrained)["model"]  # and training did change the weights
    assert any(not torch.equal(start[k], _weights(tmp_path / "b")[f"policy.{k}"]) for k in start)


def test_ctrl_c_saves_once_at_an_iteration_boundary_and_resumes_exactly(pretrained, tmp_path, monkeypatch, capsys):
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    run_finetune_stage(_cfg(), tmp_path / "full", pretrained, STAGE)
    orig = ReinFlowPPO.collect_rollout

    def rollout_with_ctrl_c(self):
        if self.iteration == 1:  # a real SIGINT in the middle of the second iteration's rollout
            os.kill(os.getpid(), signal.SIGINT)
        return orig(self)

    monkeypatch.setattr(ReinFlowPPO, "collect_rollout", rollout_with_ctrl_c)
    run = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted, match=f"^stopped at step 2; saved {run}/checkpoints/step_000000002$"):
        run_finetune_stage(_cfg(), run, pretrained, STAGE)
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last", "step_000000002"]
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    capsys.readouterr()
    out = run_finetune_stage(_cfg(), run, pretrained, STAGE)
    assert f"resuming from {run}/checkpoints/step_000000002 (step 2)" in capsys.readouterr().err
    assert out["env_steps"] == 64 and [h["iteration"] for h in out["history"]] == [0, 2, 4]
    _assert_same(_weights(tmp_path / "full"), _weights(run))


def test_a_second_process_on_the_run_directory_is_refused(pretrained, tmp_path):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            held = RunLock(tmp_path).acquire()
            os.write(ready_w, b"x")
            os.read(os.pipe()[0], 1)  # block until killed
            held.release()
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        with pytest.raises(RunLockedError, match=f"in use by process {pid} "):
            run_finetune_stage(_cfg(), tmp_path, pretrained, STAGE)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not (tmp_path / "checkpoints").exists()


def test_ctrl_c_in_image_training_stops_after_the_step_with_the_model(tmp_path):
    from agents.checkpoint import StopOnInterrupt
    from agents.images.trainer import TrainedModel, _Stopped, fit, save_checkpoint
    from flowpolicy import EMA, RectifiedFlow, make_network

    flow = RectifiedFlow(make_network("mlp", (2,), cond_dim=0, step_input=False, hidden=8, depth=1), (2,))
    model = TrainedModel("toy", flow, EMA(flow.net, decay=0.9), {"net": {}})
    x1 = torch.randn(16, 2)
    calls = []

    def loss_fn():
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return flow.loss(x1)

    with StopOnInterrupt("image training"), pytest.raises(_Stopped) as stopped:
        fit(model, loss_fn, steps=50, lr=1e-3, progress=False)
    assert stopped.value.step == 3 and len(calls) == 3 and stopped.value.model is model
    assert (save_checkpoint(model, tmp_path / "toy") / "last" / "model.safetensors").exists()
