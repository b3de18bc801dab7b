"""make_env / make_vec_env / env_meta: names, shapes, seeding, truncation, success flag."""

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest

from envs.factory import (
    LOCOMOTION_TASKS,
    ROBOSUITE_INSTALL_HINT,
    check_env_installed,
    env_meta,
    make_env,
    make_vec_env,
    parse_env_name,
)

MW = "metaworld/pick-place-v3"


@pytest.mark.parametrize(
    ("name", "obs_dim", "act_dim"), [("Hopper-v5", 11, 3), (MW, 39, 4), ("mw/pick-place-v3", 39, 4)]
)
def test_make_env_flat_spaces_are_float32(name, obs_dim, act_dim):
    env = make_env(name, seed=0)
    obs, info = env.reset()
    assert env.observation_space.shape == (obs_dim,) and env.observation_space.dtype == np.float32
    assert env.action_space.shape == (act_dim,)
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32
    assert info["success"] is False
    obs, _, _, _, info = env.step(env.action_space.sample())
    assert obs.dtype == np.float32 and isinstance(info["success"], bool)


def test_make_env_history_and_chunk_shapes():
    env = make_env(MW, seed=0, obs_horizon=2, action_horizon=8)
    obs, _ = env.reset()
    assert obs.shape == (2, 39) and env.observation_space.shape == (2, 39)
    assert env.action_space.shape == (8, 4)
    obs, _, _, _, info = env.step(np.zeros((8, 4), np.float32))
    assert obs.shape == (2, 39) and info["chunk_steps"] == 8


@pytest.mark.parametrize("name", ["Hopper-v5", MW])
def test_same_seed_same_first_obs_and_different_seed_differs(name):
    first = make_env(name, seed=7).reset()[0]
    again = make_env(name, seed=7).reset()[0]
    other = make_env(name, seed=8).reset()[0]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # Gymnasium's explicit reset(seed=...) gives the same episode as the constructor seed.
    np.testing.assert_array_equal(make_env(name).reset(seed=7)[0], first)


def test_metaworld_task_index_fixes_placement():
    a = make_env(MW, seed=1, task_index=3).reset()[0]
    b = make_env(MW, seed=2, task_index=3).reset()[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="task_index"):
        make_env(MW, task_index=50)


def test_unknown_name_lists_families():
    with pytest.raises(ValueError, match="locomotion.*Hopper-v5.*metaworld.*robosuite/Lift"):
        make_env("CartPole-v1")
    with pytest.raises(ValueError, match="no Meta-World v3 task 'pick-plac-v3'"):
        parse_env_name("metaworld/pick-plac-v3")
    with pytest.raises(ValueError, match="robosuite tasks"):
        parse_env_name("robosuite/Stack")


def test_robosuite_family_builds_or_explains_install():
    try:
        import robosuite  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r'pip install -e "\.\[robosuite\]"'):
            make_env("robosuite/Lift")
        assert "robosuite" in ROBOSUITE_INSTALL_HINT
        return
    env = make_env("robosuite/Lift", seed=0, max_episode_steps=5)
    obs, _ = env.reset()
    assert obs.ndim == 1 and obs.dtype == np.float32
    _, _, _, truncated, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert isinstance(info["success"], bool)


def test_a_missing_simulator_is_named_without_building_an_env(no_robosuite):
    with pytest.raises(ImportError, match=r'robosuite is not installed; .*pip install -e "\.\[robosuite\]"'):
        check_env_installed("robosuite/Lift@object")
    for name in (MW, "Hopper-v5", "gym/CartPole-v1"):  # families whose packages flowpolicy requires
        check_env_installed(name)
    with pytest.raises(ValueError, match="unknown environment name"):
        check_env_installed("metaworld/foo-v3")


def test_metaworld_truncates_exactly_at_max_episode_steps():
    env = make_env(MW, seed=0, max_episode_steps=12)
    env.reset()
    for t in range(1, 13):
        _, _, terminated, truncated, _ = env.step(np.zeros(4, np.float32))
        assert not terminated
        assert truncated == (t == 12)
    # Longer than Meta-World's own 500-step max_path_length must not raise inside Meta-World.
    env = make_env(MW, seed=0, max_episode_steps=502)
    env.reset()
    for _ in range(501):
        _, _, _, truncated, _ = env.step(np.zeros(4, np.float32))
        assert not truncated


def test_metaworld_terminate_on_success_and_locomotion_never_succeeds():
    from envs.collect import scripted_policy

    policy = scripted_policy("pick-place-v3")
    env = make_env(MW, seed=0, terminate_on_success=True)
    obs, _ = env.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(200):
            obs, _, terminated, truncated, info = env.step(policy.get_action(obs))
            if terminated or truncated:
                break
    assert terminated and info["success"] is True

    env = make_env("Hopper-v5", seed=0)
    env.reset()
    assert env.step(env.action_space.sample())[4]["success"] is False


def test_sync_vec_env_seeds_env_i_with_seed_plus_i():
    venv = make_vec_env(MW, num_envs=3, seed=10)
    assert isinstance(venv, gym.vector.SyncVectorEnv)
    obs, _ = venv.reset()
    assert obs.shape == (3, 39)
    for i in range(3):
        np.testing.assert_array_equal(obs[i], make_env(MW, seed=10 + i).reset()[0])
    obs, rewards, terminated, truncated, info = venv.step(np.zeros((3, 4), np.float32))
    assert rewards.shape == (3,) and info["success"].dtype == bool
    venv.close()


def test_async_vec_env_with_history_and_chunks():
    venv = make_vec_env("Hopper-v5", num_envs=2, seed=0, asynchronous=True, obs_horizon=2, action_horizon=4)
    try:
        assert isinstance(venv, gym.vector.AsyncVectorEnv)
        obs, _ = venv.reset()
        assert obs.shape == (2, 2, 11)
        np.testing.assert_array_equal(obs[1, 0], make_env("Hopper-v5", seed=1).reset()[0])
        obs, _, _, _, info = venv.step(np.zeros((2, 4, 3), np.float32))
        assert obs.shape == (2, 2, 11) and list(info["chunk_steps"]) == [4, 4]
    finally:
        venv.close()


def test_env_meta_is_json_serializable():
    meta = env_meta(MW)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["name"] == MW and meta["obs_dim"] == 39 and meta["act_dim"] == 4
    assert meta["max_episode_steps"] == 500 and meta["has_success"] is True and meta["family"] == "metaworld"
    hopper = env_meta("Hopper-v5")
    assert (hopper["obs_dim"], hopper["act_dim"], hopper["max_episode_steps"]) == (11, 3, 1000)
    assert hopper["has_success"] is False
    assert env_meta("mw/pick-place-v3", max_episode_steps=100)["max_episode_steps"] == 100
    assert set(LOCOMOTION_TASKS) == {"Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Ant-v5"}


def test_seed_makes_action_space_samples_reproducible():
    a = make_env("Hopper-v5", seed=3, action_horizon=4).action_space.sample()
    b = make_env("Hopper-v5", seed=3, action_horizon=4).action_space.sample()
    assert a.shape == (4, 3)
    np.testing.assert_array_equal(a, b)
