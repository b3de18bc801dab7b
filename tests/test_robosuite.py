"""robosuite Lift end to end at a tiny budget (skipped without the robosuite extra): the scripted expert
succeeds, the collector writes a robomimic-layout file whose env_args (with env_kwargs) give the right env
back, and train.py pretrains and evaluates on that file."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("robosuite")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lift_file(tmp_path_factory):
    from envs.collect import ensure_demos

    return ensure_demos("robosuite/Lift", num_demos=3, noise=0.1, seed=0, progress=False,
                        data_dir=tmp_path_factory.mktemp("rs"))


def test_scripted_lift_expert_succeeds_from_several_seeds():
    from envs.factory import make_env
    from envs.robosuite_experts import expert_for

    env = make_env("robosuite/Lift", seed=0, max_episode_steps=100)
    for seed in (1, 2, 3):
        obs, _ = env.reset(seed=seed)
        expert = expert_for(env)
        success = False
        for _ in range(100):
            obs, _, _, truncated, info = env.step(expert(obs).astype(np.float32))
            if info["success"]:
                success = True
                break
        assert success, f"seed {seed}: the scripted expert did not lift the cube in 100 steps"
    with pytest.raises(ValueError, match="set by the env factory"):
        make_env('robosuite/Lift{"horizon":10}')


def test_collector_writes_robomimic_env_args_that_give_the_env_back(lift_file, tmp_path):
    from hydra import compose, initialize_config_dir

    from agents.stages import resolve_task
    from envs.factory import make_env
    from envs.hdf5 import describe, read_meta

    info = describe(lift_file)
    assert info["env_args"]["env_name"] == "Lift" and info["env_args"]["type"] == 1
    assert info["obs_dims"] == {"state": 19} and info["action_dim"] == 7  # object 10, eef pos 3, quat 4, gripper 2
    assert read_meta(lift_file)["num_demos"] == 3

    def resolve(path):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            return resolve_task(compose("config", overrides=["task=robomimic", f"task.demos.path={path}"]))

    assert resolve(lift_file).env == "robosuite/Lift"
    # the same file with env_kwargs of a user's own: they reach robosuite.make
    other = tmp_path / "lift_sparse.hdf5"
    other.write_bytes(Path(lift_file).read_bytes())
    with h5py.File(other, "r+") as f:
        args = json.loads(f["data"].attrs["env_args"])
        args["env_kwargs"].update(reward_shaping=False, table_friction=[0.8, 0.005, 0.0001])
        f["data"].attrs["env_args"] = json.dumps(args)
    env_name = resolve(other).env
    assert env_name == 'robosuite/Lift{"reward_shaping":false,"table_friction":[0.8,0.005,0.0001]}'
    env = make_env(env_name, seed=0, max_episode_steps=5)
    rs_env = env.get_wrapper_attr("_rs_env")
    assert rs_env.reward_shaping is False and list(rs_env.table_friction) == [0.8, 0.005, 0.0001]
    with h5py.File(other, "r+") as f:
        args["env_kwargs"]["lift_height"] = 0.3
        f["data"].attrs["env_args"] = json.dumps(args)
    with pytest.raises(ValueError, match=r"has 'lift_height', which robosuite.make\('Lift'\) does not accept"):
        resolve(other)


def test_train_py_pretrains_and_evaluates_on_the_collected_file(lift_file, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "task=robomimic", f"task.demos.path={lift_file}",
                          "stage=pretrain", "stage.grad_steps=20", "stage.eval_every=0", "stage.val_every=100",
                          "task.max_episode_steps=10", "task.eval.episodes=2", "task.eval.num_envs=2",
                          "task.eval.denoise_steps=[1]", "task.eval.videos=0", "policy.hidden=32", "policy.depth=1",
                          "logger=none", "progress=false", f"hydra.run.dir={run_dir}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| reflow (BC) | robosuite/Lift | 1 | 2 |" in out.stdout
    meta = json.loads((run_dir / "checkpoints" / "last" / "env_meta.json").read_text())
    assert meta["name"] == "robosuite/Lift" and meta["obs_dim"] == 19 and meta["has_success"]
