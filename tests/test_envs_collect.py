"""Demo collectors: Meta-World scripted expert with success filter; SB3 PPO expert pipeline on a tiny budget."""

import json

import numpy as np
import pytest

from envs.collect import (
    ScriptedDemoError,
    collect_metaworld_demos,
    demo_path,
    ensure_demos,
    main,
    select_checkpoint,
)
from envs.dataset import DemoDataset
from envs.hdf5 import DatasetError, read_demos, read_env_args, read_meta


def test_metaworld_scripted_demos_all_succeed_and_stop_after_success():
    episodes, meta = collect_metaworld_demos("mw/pick-place-v3", 3, noise=0.3, seed=1, post_success_steps=4,
                                             progress=False)
    assert len(episodes) == 3 and meta["num_demos"] == 3
    assert meta["expert"] == "metaworld.policies.SawyerPickPlaceV3Policy"
    for ep in episodes:
        assert ep.success is True and ep.obs.shape[1] == 39 and ep.actions.shape[1] == 4
        assert np.abs(ep.actions).max() <= 1.0
        assert 20 < len(ep) < 200  # the scripted expert needs ~60 steps; the episode stops soon after success
        np.testing.assert_array_equal(ep.next_obs[:-1], ep.obs[1:])


def test_metaworld_collection_is_seeded():
    a, _ = collect_metaworld_demos("metaworld/pick-place-v3", 2, noise=0.3, seed=5, progress=False)
    b, _ = collect_metaworld_demos("metaworld/pick-place-v3", 2, noise=0.3, seed=5, progress=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.actions, y.actions)


def test_success_filter_raises_when_expert_cannot_succeed():
    with pytest.raises(ScriptedDemoError, match="only 0 of 2 scripted episodes succeeded"):
        collect_metaworld_demos("metaworld/pick-place-v3", 1, noise=0.3, seed=0, max_episode_steps=5,
                                max_attempts=2, progress=False)


def test_cli_with_too_few_successful_scripted_episodes_is_one_line_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["metaworld/pick-place-v3", "--num-demos", "1", "--max-episode-steps", "5", "--data-dir",
              str(tmp_path / "data")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "demos metaworld" not in ln]  # no bar
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: metaworld/pick-place-v3: only 0 of 13 scripted episodes succeeded with noise")
    assert err[0].endswith("lower the noise (--noise, or task.demos.noise in train.py)")
    assert not list((tmp_path / "data").rglob("*.hdf5"))  # no demo file


def test_ensure_demos_writes_a_described_file_once(tmp_path, capsys):
    path = ensure_demos("metaworld/pick-place-v3", num_demos=3, seed=2, data_dir=tmp_path, progress=False)
    assert path == demo_path("metaworld/pick-place-v3", 3, 0.3, 2, data_dir=tmp_path)
    meta = read_meta(path)
    assert meta["noise"] == 0.3 and meta["seed"] == 2 and meta["num_demos"] == 3
    assert meta["env"]["name"] == "metaworld/pick-place-v3" and meta["env"]["obs_dim"] == 39
    assert 0 < meta["success_rate"] <= 1 and "return_mean" in meta and "versions" in meta
    assert read_env_args(path)["env_name"] == "metaworld/pick-place-v3"
    ds = DemoDataset(path, obs_horizon=2, action_horizon=4, filter_key=None)
    assert ds.num_episodes == 3
    mtime = path.stat().st_mtime_ns
    assert ensure_demos("metaworld/pick-place-v3", 3, seed=2, data_dir=tmp_path, progress=False) == path
    assert path.stat().st_mtime_ns == mtime  # cached, not recollected
    path.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="force=True"):
        ensure_demos("metaworld/pick-place-v3", 3, seed=2, data_dir=tmp_path, progress=False)
    main(["metaworld/pick-place-v3", "--num-demos", "3", "--seed", "2", "--data-dir", str(tmp_path), "--force"])
    assert str(path) in capsys.readouterr().out
    assert len(read_demos(path)) == 3


def test_select_checkpoint_medium_is_first_crossing(tmp_path):
    evals = [{"step": s, "return_mean": r, "return_std": 0.0, "checkpoint": f"ckpt_{s}.zip"}
             for s, r in [(1, 100.0), (2, 900.0), (3, 700.0), (4, 2700.0), (5, 1500.0)]]
    (tmp_path / "evals.json").write_text(json.dumps({"evals": evals}))
    assert select_checkpoint(tmp_path, "expert")["step"] == 4
    assert select_checkpoint(tmp_path, "medium", medium_fraction=0.3)["step"] == 2  # 900 >= 810
    assert select_checkpoint(tmp_path, "medium", medium_fraction=0.34)["step"] == 4  # 900 < 918, first is 2700
    with pytest.raises(ValueError, match="quality"):
        select_checkpoint(tmp_path, "best")


def test_sb3_expert_pipeline_on_tiny_budget(tmp_path):
    expert_kwargs = {"n_envs": 2, "eval_freq": 512, "n_eval_episodes": 1,
                     "ppo_kwargs": {"n_steps": 256, "batch_size": 128, "n_epochs": 1}}
    path = ensure_demos("Hopper-v5", num_demos=2, noise=0.1, seed=0, quality="medium", data_dir=tmp_path,
                        expert_steps=1024, max_episode_steps=40, progress=False, expert_kwargs=expert_kwargs,
                        min_expert_return=float("-inf"))  # a 1k-step expert has not learned; the plumbing is tested
    expert_dir = tmp_path / "experts" / "Hopper-v5_ppo_1024_seed0"
    record = json.loads((expert_dir / "evals.json").read_text())
    assert record["complete"] and [e["step"] for e in record["evals"]] == [512, 1024]
    assert all((expert_dir / e["checkpoint"]).exists() for e in record["evals"])
    meta = read_meta(path)
    assert meta["quality"] == "medium" and meta["expert_steps"] == 1024 and meta["noise"] == 0.1
    assert meta["expert"].startswith("stable_baselines3.PPO:ckpt_")
    episodes = read_demos(path, expected_obs_dim=11, expected_act_dim=3)
    assert len(episodes) == 2 and all(1 <= len(ep) <= 40 for ep in episodes)
    assert all(ep.success is False for ep in episodes)


@pytest.fixture
def no_work(monkeypatch):
    """Collectors and the PPO expert trainer that fail the test if reached: refusals come before any work."""
    import envs.collect as collect

    def work(*a, **k):
        raise AssertionError("collected or trained before the arguments were checked")

    for name in ("train_sb3_expert", "collect_sb3_demos", "collect_metaworld_demos", "collect_robosuite_demos",
                 "env_meta"):
        monkeypatch.setattr(collect, name, work)


@pytest.mark.parametrize("args, says", [
    (["Hopper-v5", "--num-demos", "-3"], "error: --num-demos must be an integer >= 1, got -3"),
    (["Hopper-v5", "--num-demos", "0"], "error: --num-demos must be an integer >= 1, got 0"),
    (["Hopper-v5", "--noise", "-0.1"], "error: --noise must be a number >= 0 (the action noise std), got -0.1"),
    (["Hopper-v5", "--noise", "nan"], "error: --noise must be a number >= 0 (the action noise std), got nan"),
    (["Hopper-v5", "--seed", "-1"], "error: --seed must be an integer >= 0, got -1"),
    (["Hopper-v5", "--expert-steps", "0"], "error: --expert-steps must be an integer >= 1, got 0"),
    (["Hopper-v5", "--medium-fraction", "1.5"], "error: --medium-fraction must be in (0, 1]"),
    (["Hopper-v5", "--max-episode-steps", "0"], "error: --max-episode-steps must be an integer >= 1, got 0"),
    (["Hopper-v5", "--min-expert-return", "nan"], "error: --min-expert-return must be a number"),
    (["Hopper-v5", "--num-demos", "abc"], "error: argument --num-demos: invalid int value: 'abc'"),
    (["metaworld/foo-v3"], "error: unknown environment name 'metaworld/foo-v3' (no Meta-World v3 task 'foo-v3'"),
    (["gym/CartPole-v1"], "error: gym/CartPole-v1: no demo collector for the gym family"),
])
def test_cli_refuses_bad_arguments_in_one_line_with_exit_2_before_any_work(args, says, no_work, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--data-dir", str(tmp_path / "data")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(says), err
    assert not (tmp_path / "data").exists()


def test_cli_without_robosuite_is_one_line_with_exit_2(no_robosuite, no_work, tmp_path, capsys, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    says = 'error: robosuite/Lift: robosuite is not installed; install the optional extra: pip install -e ".[robosuite]"'
    with pytest.raises(SystemExit) as exit_:
        main(["robosuite/Lift", "--num-demos", "2", "--noise", "0.3", "--data-dir", str(tmp_path / "data")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [says]
    # the module as users run it
    out = subprocess.run([sys.executable, "-m", "envs.collect", "robosuite/Lift", "--num-demos", "2", "--data-dir",
                          str(tmp_path / "data")], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], env=no_robosuite)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [says], out.stderr[-2000:]
    assert not (tmp_path / "data").exists()


def test_ensure_demos_checks_its_settings_before_any_work(no_work, tmp_path):
    for kwargs, says in (({"num_demos": -3}, "num_demos must be an integer >= 1, got -3"),
                         ({"noise": -1.0}, "noise must be a number >= 0"),
                         ({"quality": "best"}, "quality must be 'expert' or 'medium', got 'best'"),
                         ({"expert_steps": 0}, "expert_steps must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=says):
            ensure_demos("Hopper-v5", **{"num_demos": 2, **kwargs}, data_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
