"""Fixtures shared across test modules: data and checkpoints that several modules need, made once per session."""

from __future__ import annotations

import pytest

PICK_PLACE = "metaworld/pick-place-v3"


@pytest.fixture(scope="session")
def pick_place_demos(tmp_path_factory) -> str:
    """6 noisy scripted-expert pick-place demos (noise 0.3, seed 0) in a session data dir laid out as
    ``data_dir`` expects (``<data_dir>/demos/<file>``), collected once (about 1 s)."""
    from envs.collect import ensure_demos

    return str(ensure_demos(PICK_PLACE, num_demos=6, noise=0.3, seed=0, data_dir=tmp_path_factory.mktemp("data"),
                            progress=False))


@pytest.fixture(scope="session")
def tiny_pick_place_checkpoint(pick_place_demos, tmp_path_factory) -> str:
    """A ReFlow policy (32 wide, 1 hidden layer, K=2) behavior-cloned for 30 steps on ``pick_place_demos``:
    the last checkpoint's directory. Tests read it; none may write into it."""
    from agents.pretrain import PretrainConfig, Pretrainer

    policy = {"kind": "reflow", "hidden": 32, "depth": 1, "default_steps": 2}
    cfg = PretrainConfig(dataset=pick_place_demos, env_name=PICK_PLACE,
                         run_dir=str(tmp_path_factory.mktemp("tiny_pretrain")), policy=policy, obs_horizon=1,
                         action_horizon=4, exec_horizon=2, grad_steps=30, batch_size=64, eval_every=0, eval_episodes=0,
                         val_every=30, save_every=30, max_episode_steps=30, progress=False, tensorboard=False)
    return Pretrainer(cfg).run()["checkpoint"]


@pytest.fixture
def no_robosuite(tmp_path_factory, monkeypatch) -> dict:
    """As if the robosuite extra were not installed, whether or not it is: ``import robosuite`` fails in this
    process, and in subprocesses started with the returned environment (a stub package first on PYTHONPATH)."""
    import os
    import sys

    monkeypatch.setitem(sys.modules, "robosuite", None)  # import robosuite -> ImportError
    stub = tmp_path_factory.mktemp("no_robosuite")
    (stub / "robosuite").mkdir()
    (stub / "robosuite" / "__init__.py").write_text("raise ImportError('No module named robosuite (test stub)')\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join([str(stub), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env
