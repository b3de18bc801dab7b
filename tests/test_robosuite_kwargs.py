"""A robomimic file's robosuite env_kwargs reach robosuite.make through the env name (no robosuite needed:
the accepted keywords and the builder are stand-ins)."""

import pytest

import envs.factory as factory
from envs.factory import env_name_from_env_args, make_env, parse_env_name

ACCEPTED = {"robots", "reward_shaping", "control_freq", "controller_configs", "has_renderer", "horizon",
            "placement_initializer", "table_friction"}


@pytest.fixture
def fake_robosuite(monkeypatch):
    """robosuite.make's keywords for Lift, and a builder that records what make_env hands it."""
    seen = {}

    class Built(Exception):
        pass

    def build(task, render_mode, max_episode_steps, **kwargs):
        seen.update(task=task, max_episode_steps=max_episode_steps, **kwargs)
        raise Built

    monkeypatch.setattr(factory, "robosuite_make_kwargs", lambda task: ACCEPTED)
    monkeypatch.setattr(factory, "_make_robosuite", build)
    return seen, Built


def test_env_kwargs_from_a_file_reach_the_robosuite_builder(fake_robosuite):
    seen, built = fake_robosuite
    ignored = []
    env_args = {"env_name": "Lift", "type": 1,
                "env_kwargs": {"reward_shaping": False, "table_friction": [1.0, 0.005, 0.0001], "robots": ["Panda"],
                               "control_freq": 20, "has_renderer": True, "horizon": 400}}
    name = env_name_from_env_args(env_args, ["object", "robot0_eef_pos"], where="lift.hdf5", ignored=ignored)
    # the factory's defaults (Panda, 20 Hz) are left out; rendering and horizon are the factory's, listed
    assert name == 'robosuite/Lift{"reward_shaping":false,"table_friction":[1.0,0.005,0.0001]}@object,robot0_eef_pos'
    assert ignored == ["has_renderer", "horizon"]
    parsed = parse_env_name(name)
    assert parsed.canonical == name and parsed.obs_keys == ("object", "robot0_eef_pos")
    assert parsed.env_kwargs == {"reward_shaping": False, "table_friction": [1.0, 0.005, 0.0001]}
    with pytest.raises(built):
        make_env(name, max_episode_steps=50)
    assert seen["task"] == "Lift" and seen["reward_shaping"] is False and seen["max_episode_steps"] == 50
    assert seen["table_friction"] == [1.0, 0.005, 0.0001] and seen["obs_keys"] == ("object", "robot0_eef_pos")
    seen.clear()
    with pytest.raises(built):  # keywords given to make_env win over the name's
        make_env(name, reward_shaping=True)
    assert seen["reward_shaping"] is True
    # Can is robosuite's PickPlaceCan; the plain name when nothing differs from the defaults
    assert env_name_from_env_args({"env_name": "PickPlaceCan", "type": 1,
                                   "env_kwargs": {"robots": "Panda", "horizon": 500}}) == "robosuite/Can"


def test_env_kwargs_robosuite_does_not_accept_are_an_error_naming_the_key(fake_robosuite):
    with pytest.raises(ValueError, match=r"lift.hdf5: env_args\['env_kwargs'\] has 'lift_height', which "
                                         r"robosuite.make\('Lift'\) does not accept"):
        env_name_from_env_args({"env_name": "Lift", "type": 1, "env_kwargs": {"lift_height": 0.3}}, where="lift.hdf5")


def test_the_files_we_write_name_the_plain_env_and_robomimic_can_rebuild_it(fake_robosuite):
    from envs.hdf5 import env_args_for

    meta = {"name": "robosuite/Lift", "family": "robosuite", "task": "Lift", "max_episode_steps": 150}
    args = env_args_for(meta)
    assert args["env_name"] == "Lift" and args["type"] == 1
    assert args["env_kwargs"]["horizon"] == 150 and args["env_kwargs"]["reward_shaping"] is True
    assert env_name_from_env_args(args) == "robosuite/Lift"
    kw = env_args_for({**meta, "name": 'robosuite/Can{"reward_shaping":false}', "task": "Can"})
    assert kw["env_name"] == "PickPlaceCan" and kw["env_kwargs"]["reward_shaping"] is False
    assert env_name_from_env_args(kw) == 'robosuite/Can{"reward_shaping":false}'


def test_keywords_in_a_name_are_robosuite_only_and_must_be_json():
    with pytest.raises(ValueError, match="keywords in the name apply to robosuite envs"):
        parse_env_name('Hopper-v5{"a":1}')
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_env_name("robosuite/Lift{reward_shaping}")


def test_robosuite_task_configs_collect_demos_on_first_use(monkeypatch, tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    import agents.tasks as tasks
    from agents.stages import demos_for, resolve_task

    calls = []
    monkeypatch.setattr(tasks, "ensure_demos", lambda env, **kw: calls.append((env, kw)) or tmp_path / "d.hdf5")
    monkeypatch.setattr(factory, "check_env_installed", lambda env: None)  # as if robosuite were installed
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    for overrides, env, steps in ((["task=robosuite_lift"], "robosuite/Lift", 150),
                                  (["task=robosuite_can"], "robosuite/Can", 400),
                                  (["task=robosuite", "task.env=robosuite/Can"], "robosuite/Can", None)):
        with initialize_config_dir(configs, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        data = resolve_task(cfg)
        assert data.env == env and data.dataset is None and cfg.task.max_episode_steps == steps
        demos_for(cfg, data)
        assert calls[-1][0] == env and calls[-1][1]["num_demos"] == cfg.task.demos.num


def test_task_env_overrides_env_args_that_robosuite_would_refuse(fake_robosuite, tmp_path, capsys):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from agents.stages import resolve_task
    from tests.fixture_envs import NAME, write_robomimic_file

    bad = write_robomimic_file(tmp_path / "bad.hdf5", 2,
                               env_args={"env_name": "Lift", "type": 1, "env_kwargs": {"lift_height": 0.3}})
    configs = str(Path(__file__).resolve().parents[1] / "configs")

    def resolve(*extra):
        with initialize_config_dir(configs, version_base="1.3"):
            return resolve_task(compose("config", overrides=["task=robomimic", f"task.demos.path={bad}", *extra]))

    with pytest.raises(ValueError, match="has 'lift_height', which robosuite.make"):
        resolve()
    assert resolve(f"task.env={NAME}").env.startswith(NAME)  # the user's env; the file's env_args are not read
    assert "using task.env=" in capsys.readouterr().err
