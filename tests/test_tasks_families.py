"""Task families as config groups, run names with the env, expert checks, evaluation on the checkpoint's env,
result tables that name the env, --help, and predict()'s action queue."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_help_lists_stages_families_and_five_examples():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0
    for word in ("pipeline", "pretrain", "finetune", "eval", "metaworld", "mujoco", "robomimic"):
        assert word in out.stdout
    examples = out.stdout.split("examples:")[1].split("\n\n")[0]
    assert sum(line.strip().startswith("python train.py") for line in examples.splitlines()) == 5


@pytest.mark.parametrize("overrides, tag", [
    ([], "pick_place"), (["task.env=metaworld/door-open-v3"], "pick_place_door-open-v3"),
    (["task=metaworld", "task.env=metaworld/door-open-v3"], "metaworld_door-open-v3"),
    (["task=mujoco", "task.env=HalfCheetah-v5"], "mujoco_HalfCheetah-v5"), (["task=hopper_medium"], "hopper_medium"),
    (["task=digits"], "digits")])
def test_run_name_includes_the_env(overrides, tag):
    from agents.cli import register_resolvers, run_tag

    register_resolvers()
    cfg = _compose(*overrides)
    t = cfg.task
    assert run_tag(t.name, t.get("env") if "env" in t else None, None) == tag


def test_families_resolve_to_their_envs():
    from agents.stages import resolve_task

    assert resolve_task(_compose("task=metaworld", "task.env=metaworld/door-open-v3")).env == "metaworld/door-open-v3"
    assert resolve_task(_compose("task=mujoco", "task.env=Swimmer-v5")).env == "Swimmer-v5"
    with pytest.raises(ValueError, match="no Meta-World v3 task 'door-opn-v3'"):
        resolve_task(_compose("task=metaworld", "task.env=metaworld/door-opn-v3"))


def _fake_expert(data_dir, env, steps, best):
    from envs.collect import expert_dir_for

    d = expert_dir_for(env, steps, 0, data_dir)
    d.mkdir(parents=True)
    (d / "evals.json").write_text(json.dumps({"complete": True, "evals": [
        {"step": steps, "return_mean": best, "return_std": 1.0, "checkpoint": "ckpt.zip"}]}))


def test_an_expert_that_did_not_learn_stops_with_a_clear_message(tmp_path):
    from agents.errors import is_user_error
    from agents.stages import demos_for

    _fake_expert(tmp_path, "HalfCheetah-v5", 300000, 44.0)
    cfg = _compose("task=mujoco", "task.env=HalfCheetah-v5", "task.demos.expert_steps=300000",
                   f"data_dir={tmp_path}", "progress=false")
    with pytest.raises(ValueError, match=r"PPO expert for HalfCheetah-v5 did not learn: best evaluated return 44.0 "
                                         r"after 300000 steps, below 1000.*task.demos.expert_steps") as info:
        demos_for(cfg)
    assert is_user_error(info.value) and not (tmp_path / "demos").exists()


def test_expert_steps_from_train_py_find_demos_made_with_expert_steps(tmp_path):
    from agents.stages import demos_for
    from envs.collect import demo_path
    from envs.hdf5 import Episode, write_demos

    path = demo_path("Swimmer-v5", 2, 0.0, 0, "expert", 123000, tmp_path)
    eps = [Episode(np.zeros((3, 8)), np.zeros((3, 2)), np.zeros(3)) for _ in range(2)]
    write_demos(path, eps, {"env_name": "Swimmer-v5", "type": 2})
    cfg = _compose("task=mujoco", "task.env=Swimmer-v5", "task.demos.expert_steps=123000", "task.demos.num=2",
                   f"data_dir={tmp_path}")
    assert demos_for(cfg) == str(path)


def _tiny_policy(obs_dim, act_dim, action_horizon=4, exec_horizon=4):
    from agents.policies import build_policy

    return build_policy({"kind": "reflow", "hidden": 16, "depth": 1}, obs_dim, act_dim, 1, action_horizon,
                        exec_horizon)


def test_tables_name_the_env_and_leave_success_blank_without_success(tmp_path):
    from agents.evaluate import evaluate_policy_steps, video_name, write_eval

    rows = evaluate_policy_steps(_tiny_policy(8, 2), "Swimmer-v5", [1], episodes=2, num_envs=1,
                                 max_episode_steps=8)
    assert rows[0]["env"] == "Swimmer-v5" and rows[0]["success_rate"] is None
    md = write_eval(rows, tmp_path)
    assert "| env |" in md.splitlines()[0] and "| Swimmer-v5 | 1 | 2 |" in md
    assert md.splitlines()[2].split("|")[7].strip() == ""  # the success_rate cell
    # videos of the two evaluations of a pipeline do not share a name
    assert video_name("metaworld/pick-place-v3", 4, 0, "eval_pretrained") != video_name(
        "metaworld/pick-place-v3", 4, 0, "eval_finetuned")


def test_eval_uses_the_checkpoint_env_and_notes_a_different_task_env(tmp_path, capsys):
    from agents.stages import eval_target

    policy = _tiny_policy(8, 2)
    ck = {"path": tmp_path, "config": {"train": {"max_episode_steps": 50}},
          "env_meta": {"name": "Swimmer-v5", "max_episode_steps": 1000}}
    target = eval_target(_compose(), "ck", policy, ck)  # task=pick_place names metaworld/pick-place-v3
    assert target.env == "Swimmer-v5" and target.max_episode_steps == 50 and not target.has_success
    assert "trained on Swimmer-v5; evaluating on Swimmer-v5, not task.env=metaworld/pick-place-v3" in capsys.readouterr().err


def test_plain_predict_keeps_the_action_queue():
    policy = _tiny_policy(3, 2, action_horizon=4, exec_horizon=3)
    calls = []
    real = policy.predict_action_chunk
    policy.predict_action_chunk = lambda *a, **k: calls.append(1) or real(*a, **k)
    for _ in range(6):
        action, _ = policy.predict(np.zeros(3, np.float32))
        assert action.shape == (2,)
    assert len(calls) == 2  # one chunk per exec_horizon steps
    policy.predict(np.zeros((1, 3), np.float32), episode_start=np.array([True]))
    assert len(calls) == 3  # a new episode re-plans
