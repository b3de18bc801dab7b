"""A robomimic-layout file (keys robot0_eef_pos/object, no 'state') trains and evaluates from train.py, on the
env its env_args name; obs keys are all low-dim keys sorted, or task.obs_keys in the order given."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fixture_envs, as train.py (run from the root) imports it

from tests.fixture_envs import NAME, write_robomimic_file  # noqa: E402

TINY = ["stage.eval_every=0", "stage.val_every=100", "stage.save_every=300", "task.eval.episodes=10",
        "task.eval.num_envs=2", "task.eval.denoise_steps=[2]", "task.eval.videos=0", "policy.hidden=64", "policy.depth=2",
        "logger=none", "progress=false"]


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def rm_file(tmp_path_factory):
    return write_robomimic_file(tmp_path_factory.mktemp("rm") / "low_dim.hdf5", 12, action_dtype=np.float64)


def test_train_py_trains_and_evaluates_a_robomimic_file(rm_file, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "task=robomimic", f"task.demos.path={rm_file}",
                          "stage=pretrain", "stage.grad_steps=300", f"hydra.run.dir={run_dir}", *TINY],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    env = f"{NAME}@object,robot0_eef_pos"  # the file's env_args env; its low-dim keys sorted, image key left out
    assert f"| reflow (BC) | {env} | 2 | 10 |" in out.stdout
    assert "actions are float64; converted to float32" in out.stderr
    row = json.loads((run_dir / "eval.json").read_text())[0]
    assert row["env"] == env and row["success_rate"] >= 0.7, row  # the keys line up with the env's
    meta = json.loads((run_dir / "checkpoints" / "last" / "env_meta.json").read_text())
    assert meta["name"] == env and meta["obs_dim"] == 6

    from agents.stages import run  # eval of that run: the env comes from the checkpoint

    ev = run(_compose("stage=eval", f"checkpoint={run_dir}", "task=robomimic", f"task.demos.path={rm_file}",
                      *TINY[3:]), tmp_path / "eval")
    assert ev["eval"]["rows"][0]["env"] == env and ev["eval"]["rows"][0]["success_rate"] >= 0.7


def test_obs_keys_choose_the_order_and_the_env_follows(rm_file, tmp_path):
    from agents.stages import resolve_task
    from envs.dataset import DemoDataset
    from envs.factory import make_env

    cfg = _compose("task=robomimic", f"task.demos.path={rm_file}", "task.obs_keys=[robot0_eef_pos,object]")
    data = resolve_task(cfg)
    assert data.env == f"{NAME}@robot0_eef_pos,object" and data.obs_keys == ["robot0_eef_pos", "object"]
    ds = DemoDataset(rm_file, obs_keys=data.obs_keys, filter_key=None)
    default = DemoDataset(rm_file, filter_key=None)  # sorted: object, robot0_eef_pos
    np.testing.assert_allclose(ds._obs[:, :3], default._obs[:, 3:])
    env = make_env(data.env, seed=0)
    obs, _ = env.reset(seed=0)
    inner = env.unwrapped
    np.testing.assert_allclose(obs, np.concatenate([inner.eef, inner.target]), rtol=1e-6)


def test_errors_name_the_file_and_its_env(rm_file, tmp_path):
    from agents.errors import UserError
    from agents.stages import resolve_task

    with pytest.raises(UserError, match=r"task.obs_keys \['state'\] are not low-dim obs keys.*robot0_eef_pos"):
        resolve_task(_compose("task=robomimic", f"task.demos.path={rm_file}", "task.obs_keys=[state]"))
    lift = write_robomimic_file(tmp_path / "lift.hdf5", 3, env_args={"env_name": "Lift", "type": 1, "env_kwargs": {}})
    try:
        import robosuite  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"lift.hdf5 \(the file's env_args name robosuite/Lift@object,"
                                            r"robot0_eef_pos\) needs env .*robosuite is not installed"):
            resolve_task(_compose("task=robomimic", f"task.demos.path={lift}"))
    with pytest.raises(UserError, match=r"obs_dim=6 .* but env Hopper-v5 has 11"):
        resolve_task(_compose("task=robomimic", f"task.demos.path={rm_file}", "task.env=Hopper-v5"))


def test_reflow_stage_reads_the_observation_keys_the_policy_was_pretrained_on(rm_file, tmp_path, monkeypatch):
    import agents.policy_reflow as pr
    from agents.stages import run

    keys = "task.obs_keys=[robot0_eef_pos,object]"
    run(_compose("task=robomimic", f"task.demos.path={rm_file}", keys, "stage=pretrain", "stage.grad_steps=20",
                 *TINY), tmp_path / "pre")
    seen = {}

    class Stop(Exception):
        pass

    def capture(policy, obs, cfg):
        seen["obs"] = obs
        raise Stop

    monkeypatch.setattr(pr, "rectify_policy", capture)
    with pytest.raises(Stop):  # no task.obs_keys given: the checkpoint's own keys are used
        run(_compose("task=robomimic", f"task.demos.path={rm_file}", "stage=reflow",
                     f"checkpoint={tmp_path / 'pre'}", "logger=none", "progress=false"), tmp_path / "rf")
    from envs.dataset import DemoDataset

    chosen = DemoDataset(rm_file, obs_keys=["robot0_eef_pos", "object"], filter_key="train")
    assert seen["obs"].shape[-1] == 6
    first_eef = chosen[0]["obs"][-1, :3].numpy()
    np.testing.assert_allclose(seen["obs"][0, -1, :3].numpy(), first_eef, rtol=1e-6)  # eef first, not object
