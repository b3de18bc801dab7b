"""ObservationHistory, ActionChunk and SuccessInfo, on a tiny exact env."""

import gymnasium as gym
import numpy as np
import pytest

from envs.wrappers import ActionChunk, ObservationHistory, SuccessInfo


class CountingEnv(gym.Env):
    """obs = [t, 10 t]; reward at step t (1-based) = t + action[0]; success at step ``success_at``;
    terminates at step ``terminate_at`` or truncates at ``truncate_at``."""

    def __init__(self, terminate_at=None, truncate_at=None, success_at=None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.terminate_at, self.truncate_at, self.success_at = terminate_at, truncate_at, success_at
        self.t = 0
        self.actions = []

    def _obs(self):
        return np.array([self.t, 10 * self.t], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.actions = []
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        self.actions.append(float(action[0]))
        info = {"success": 1.0 if self.t == self.success_at else 0.0}
        return (self._obs(), self.t + float(action[0]), self.t == self.terminate_at, self.t == self.truncate_at,
                info)


def test_history_pads_with_first_obs_then_rolls():
    env = ObservationHistory(CountingEnv(), 3)
    assert env.observation_space.shape == (3, 2)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs[:, 0], [0, 0, 0])
    obs = env.step(np.zeros(1))[0]
    np.testing.assert_array_equal(obs[:, 0], [0, 0, 1])
    env.step(np.zeros(1))
    obs = env.step(np.zeros(1))[0]
    np.testing.assert_array_equal(obs, [[1, 10], [2, 20], [3, 30]])
    obs, _ = env.reset()  # reset clears the previous episode
    np.testing.assert_array_equal(obs[:, 0], [0, 0, 0])


def test_chunk_executes_all_actions_in_order_and_sums_rewards():
    base = CountingEnv()
    env = ActionChunk(base, 3)
    assert env.action_space.shape == (3, 1)
    env.reset()
    obs, reward, terminated, truncated, info = env.step(np.array([[0.1], [0.2], [0.3]], np.float32))
    assert base.actions == pytest.approx([0.1, 0.2, 0.3])
    assert reward == pytest.approx((1 + 0.1) + (2 + 0.2) + (3 + 0.3))
    assert info["chunk_steps"] == 3 and not terminated and not truncated
    np.testing.assert_array_equal(obs, [3, 30])


@pytest.mark.parametrize(("kwargs", "terminated", "truncated"),
                         [({"terminate_at": 5}, True, False), ({"truncate_at": 5}, False, True)])
def test_chunk_stops_when_episode_ends_mid_chunk(kwargs, terminated, truncated):
    base = CountingEnv(**kwargs)
    env = ActionChunk(base, 4)
    env.reset()
    env.step(np.zeros((4, 1), np.float32))  # steps 1..4
    obs, reward, term, trunc, info = env.step(np.zeros((4, 1), np.float32))  # ends at step 5
    assert info["chunk_steps"] == 1 and base.t == 5
    assert reward == pytest.approx(5.0)
    assert (term, trunc) == (terminated, truncated)
    np.testing.assert_array_equal(obs, [5, 50])


def test_chunk_success_is_any_step_in_chunk():
    env = ActionChunk(SuccessInfo(CountingEnv(success_at=2)), 4)
    env.reset()
    _, _, _, _, info = env.step(np.zeros((4, 1), np.float32))
    assert info["success"] is True and info["chunk_steps"] == 4
    _, _, _, _, info = env.step(np.zeros((4, 1), np.float32))
    assert info["success"] is False


def test_chunk_around_history_returns_history_after_last_executed_step():
    env = ActionChunk(ObservationHistory(CountingEnv(terminate_at=6), 2), 4)
    obs, _ = env.reset()
    assert obs.shape == (2, 2)
    obs = env.step(np.zeros((4, 1), np.float32))[0]
    np.testing.assert_array_equal(obs[:, 0], [3, 4])
    obs, _, terminated, _, info = env.step(np.zeros((4, 1), np.float32))
    np.testing.assert_array_equal(obs[:, 0], [5, 6])
    assert terminated and info["chunk_steps"] == 2


def test_chunk_rejects_wrong_shape():
    env = ActionChunk(CountingEnv(), 2)
    env.reset()
    with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
        env.step(np.zeros(1))


def test_success_info_makes_bool_and_can_terminate():
    env = SuccessInfo(CountingEnv(success_at=2), terminate_on_success=True)
    assert env.reset()[1]["success"] is False
    _, _, terminated, _, info = env.step(np.zeros(1))
    assert info["success"] is False and not terminated
    _, _, terminated, _, info = env.step(np.zeros(1))
    assert info["success"] is True and terminated
    calls = iter([0, 1])
    env = SuccessInfo(CountingEnv(), success_fn=lambda: next(calls))
    env.reset()
    assert [env.step(np.zeros(1))[4]["success"] for _ in range(2)] == [False, True]



def test_success_reward_replaces_the_env_reward_with_a_sparse_one():
    env = SuccessInfo(CountingEnv(success_at=3), success_reward=5.0)
    env.reset()
    steps = [env.step(np.zeros(1)) for _ in range(4)]
    assert [s[1] for s in steps] == [0.0, 0.0, 5.0, 0.0]
    assert [s[4]["env_reward"] for s in steps] == [1.0, 2.0, 3.0, 4.0]  # the env's own reward stays in info
    assert not any(s[2] for s in steps)  # no termination unless asked


def test_metaworld_training_env_options_reach_the_env():
    pytest.importorskip("metaworld")
    from envs.factory import make_env

    env = make_env("metaworld/reach-v3", seed=0, terminate_on_success=True, success_reward=1.0)
    env.reset(seed=0)
    _, reward, *_ = env.step(np.zeros(env.action_space.shape, np.float32))
    assert reward == 0.0  # the dense reach reward is positive everywhere; the sparse one is 0 before success
    env.close()
