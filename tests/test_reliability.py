"""Failure behavior: atomic checkpoints under SIGKILL, no unpickling, clear errors for bad input, no hangs."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_sigkill_during_saves_never_leaves_a_broken_last(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from agents.checkpoint import save_checkpoint
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])  # ~8 MB per save
        step = 0
        while True:
            step += 1
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(step))
            save_checkpoint({str(tmp_path)!r}, step, {{"kind": "test"}}, model, training_state={{"step": step}})
            print(step, flush=True)
    """)
    for delay in (0.4, 0.8, 1.2):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete save
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = load_checkpoint(tmp_path / "last")
        step = ck["config"]["step"]
        assert ck["training_state"]["step"] == step
        assert all(torch.all(v == float(step)) for k, v in ck["model"].items() if k.endswith("weight"))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_pickle_posing_as_a_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(evil)
    # a checkpoint directory whose training state is a malicious pickle
    good = save_checkpoint(tmp_path / "ck", 1, {"kind": "x"}, torch.nn.Linear(2, 2), training_state={"a": 1})
    (good / "training_state.pt").write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(CheckpointError, match="training_state.pt: corrupt"):  # the manifest's checksum
        load_checkpoint(good)
    write_manifest(good)  # even with a forged manifest, torch.load(weights_only=True) refuses it
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(good)
    assert not marker.exists()


def test_missing_or_foreign_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="not a flowpolicy checkpoint"):
        load_checkpoint(tmp_path / "dir")
    ck = save_checkpoint(tmp_path / "ck", 1, {"kind": "x"}, torch.nn.Linear(2, 2))
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(ck)


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_unknown_config_group_or_key_is_hydras_error():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose("policy=diffusion_transformer")
    with pytest.raises(ConfigCompositionException):
        _compose("stage.pretrain.not_a_key=3")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["stage=eval"], "needs checkpoint="),
        (["task.action_horizon=0"], "action_horizon must be >= 1"),
        (["task.exec_horizon=9"], "exec_horizon"),
        (["policy=shortcut", "task.eval.denoise_steps=[1,3]"], "power-of-two"),
        (["task.eval.denoise_steps=[0]"], "positive"),
    ],
)
def test_invalid_values_fail_before_anything_runs(tmp_path, overrides, match):
    from agents.stages import run

    with pytest.raises(ValueError, match=match):
        run(_compose(*overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_dataset_paths_and_files(tmp_path):
    from agents.stages import run
    from envs.hdf5 import DatasetError, read_demos

    with pytest.raises(ValueError, match="missing.hdf5' does not exist"):  # agents.errors.UserError
        run(_compose("stage=pretrain", f"task.demos.path={tmp_path / 'missing.hdf5'}"), tmp_path / "run")
    junk = tmp_path / "junk.hdf5"
    junk.write_text("not hdf5")
    with pytest.raises(DatasetError, match="junk.hdf5"):
        read_demos(junk)


def test_dataset_that_does_not_fit_the_env_is_refused(tmp_path):
    from agents.pretrain import PretrainConfig, Pretrainer
    from envs.collect import ensure_demos

    demos = ensure_demos("metaworld/pick-place-v3", 3, 0.3, 0, data_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="obs_dim=39 but env Hopper-v5 has 11"):
        Pretrainer(PretrainConfig(dataset=str(demos), env_name="Hopper-v5", run_dir=str(tmp_path / "r"),
                                  progress=False, tensorboard=False))


def test_unknown_env_name_is_a_clear_error():
    from envs.factory import make_env

    with pytest.raises(ValueError, match="Hoper-v5"):
        make_env("Hoper-v5")


class _Worker(gym.Env):
    """An env whose worker process dies (``os._exit``) or freezes (SIGSTOP) on its first step."""

    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def __init__(self, fail: str = ""):
        self.fail = fail

    def reset(self, *, seed=None, options=None):
        return np.zeros(2, np.float32), {}

    def step(self, a):
        if self.fail == "die":
            os._exit(3)
        if self.fail == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)
        return np.zeros(2, np.float32), 0.0, False, False, {}


@pytest.mark.parametrize("fail,match", [("die", r"worker\(s\) 1 \(pid \d+, exit code 3\) died during step"),
                                        ("freeze", r"worker\(s\) 1 \(pid \d+\) did not answer within 2 s")])
def test_a_dead_or_frozen_async_worker_is_a_clear_error_within_the_timeout(fail, match):
    from envs.async_guard import EnvWorkerError, GuardedAsyncVectorEnv

    envs = GuardedAsyncVectorEnv([_Worker, lambda: _Worker(fail), _Worker], worker_timeout=2.0, context="fork")
    envs.reset(seed=0)
    procs = list(envs.processes)
    t0 = time.monotonic()
    with pytest.raises(EnvWorkerError, match=match):
        envs.step(np.zeros((3, 1), np.float32))
    assert time.monotonic() - t0 < 10
    envs.close()  # already closed by the error: a second close is harmless
    assert not any(p.is_alive() for p in procs)  # every worker ended, the frozen one included


def test_close_ends_every_async_worker_even_when_one_is_frozen():
    from envs.async_guard import GuardedAsyncVectorEnv

    envs = GuardedAsyncVectorEnv([_Worker, _Worker], worker_timeout=1.0, context="fork")
    envs.reset(seed=0)
    os.kill(envs.processes[0].pid, signal.SIGSTOP)
    t0 = time.monotonic()
    envs.close()
    assert not any(p.is_alive() for p in envs.processes) and time.monotonic() - t0 < 10
