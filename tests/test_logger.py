"""logger=wandb: the W&B run gets the config's project and mode (wandb replaced by a recording fake, so the
test needs neither the package nor a network)."""

import sys
import types

import pytest
from omegaconf import OmegaConf

from agents.tblog import start_wandb


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.finished = False

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.runs = []

    def init(**kwargs):
        mod.runs.append(FakeRun(**kwargs))
        return mod.runs[-1]

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return mod


def test_wandb_run_gets_the_configs_project_and_mode(fake_wandb, tmp_path):
    cfg = OmegaConf.create({"name": "wandb", "project": "my-project", "mode": "online"})
    run = start_wandb(cfg, tmp_path, {"seed": 3})
    assert run is fake_wandb.runs[0]
    assert run.kwargs == {"project": "my-project", "mode": "online", "dir": str(tmp_path), "config": {"seed": 3},
                          "sync_tensorboard": True}


def test_wandb_mode_env_wins_over_the_config(fake_wandb, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = start_wandb(OmegaConf.create({"name": "wandb", "project": "p", "mode": "offline"}), tmp_path)
    assert run.kwargs["mode"] == "disabled" and run.kwargs["project"] == "p"


def test_other_loggers_start_no_wandb_run(fake_wandb, tmp_path):
    for name in ("tensorboard", "none"):
        assert start_wandb(OmegaConf.create({"name": name}), tmp_path) is None
    assert start_wandb(None, tmp_path) is None
    assert fake_wandb.runs == []


def test_missing_wandb_is_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        start_wandb(OmegaConf.create({"name": "wandb", "project": "p", "mode": "offline"}), tmp_path)
