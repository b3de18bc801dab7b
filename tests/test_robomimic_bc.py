"""robomimic's own BC as a peer (agents/robomimic_bc.py): trains on our HDF5 files through robomimic's
SequenceDataset and runs behind our policy interface (rollouts, latency, SB3-style predict)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.evaluate import measure_latency, rollout_episodes
from agents.robomimic_bc import RobomimicBCConfig, RobomimicBCPolicy, train_robomimic_bc
from envs.hdf5 import Episode, write_demos

torch.set_num_threads(1)
OBS_DIM, ACT_DIM = 3, 2


def _episode(rng: np.random.Generator, n: int = 30) -> Episode:
    obs = rng.uniform(-1, 1, (n, OBS_DIM)).astype(np.float32)
    act = np.clip(0.8 * obs[:, :ACT_DIM] + 0.05 * rng.standard_normal((n, ACT_DIM)), -1, 1).astype(np.float32)
    return Episode(obs=obs, actions=act, rewards=np.zeros(n, np.float32))


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("rm") / "demos.hdf5"
    return str(write_demos(path, [_episode(rng) for _ in range(6)],
                           {"env_name": "synthetic", "type": 2, "env_kwargs": {}}))


@pytest.fixture(scope="module")
def trained(demo_file):
    cfg = RobomimicBCConfig(dataset=demo_file, grad_steps=40, batch_size=32, actor_layer_dims=(32, 32), lr=3e-3)
    return train_robomimic_bc(cfg)


class Drift(gym.Env):
    """A tiny env with the demo file's spaces: the observation drifts by the action; 12 steps per episode."""

    observation_space = gym.spaces.Box(-1, 1, (OBS_DIM,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (ACT_DIM,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.o, self.t = self.np_random.uniform(-1, 1, OBS_DIM).astype(np.float32), 0
        return self.o, {}

    def step(self, action):
        assert action.shape == (ACT_DIM,)
        self.o = np.clip(self.o + 0.1 * np.pad(action, (0, OBS_DIM - ACT_DIM)), -1, 1).astype(np.float32)
        self.t += 1
        return self.o, -float(np.abs(self.o).sum()), False, self.t >= 12, {"success": False}


def test_robomimic_bc_trains_and_acts_through_our_interface(trained):
    policy, info = trained
    assert isinstance(policy, RobomimicBCPolicy) and policy.kind == "robomimic_bc"
    assert (policy.obs_horizon, policy.action_horizon, policy.exec_horizon) == (1, 1, 1)
    assert info["algo"] == "BC" and info["steps"] == 40 and info["config"]["batch_size"] == 32
    obs = torch.as_tensor(np.random.default_rng(1).uniform(-3, 3, (5, OBS_DIM)), dtype=torch.float32)
    for o in (obs, obs[:, None]):  # (B, Do) and (B, To=1, Do)
        a = policy.predict_action_chunk(o)
        assert a.shape == (5, 1, ACT_DIM)
        assert float(a.abs().max()) <= 1.0
    actions, _ = policy.predict(obs.numpy())
    assert actions.shape == (5, ACT_DIM)


def test_robomimic_bc_learns_the_demo_mapping(trained, demo_file):
    policy, info = trained
    assert np.isfinite(info["final_loss"])
    rng = np.random.default_rng(7)
    ep = _episode(rng, 200)
    pred = policy.predict_action_chunk(ep.obs)[:, 0].numpy()
    mse_policy = float(((pred - ep.actions) ** 2).mean())
    mse_zero = float((ep.actions**2).mean())
    assert mse_policy < 0.5 * mse_zero, (mse_policy, mse_zero)


def test_rollout_and_latency_helpers_run_the_adapter(trained):
    policy, _ = trained
    envs = gym.vector.SyncVectorEnv([Drift for _ in range(2)])
    r = rollout_episodes(policy, "unused", episodes=4, envs=envs)
    envs.close()
    assert len(r["returns"]) == 4 and all(n == 12 for n in r["lengths"])
    lat = measure_latency(policy, repeats=5)
    assert lat["latency_us_per_call"] > 0 and "bare_forward_us" not in lat


def test_a_file_without_the_obs_key_is_refused_with_its_keys(demo_file):
    with pytest.raises(ValueError, match=r"no data/demo_0/obs/image .*obs keys: \['state'\]"):
        train_robomimic_bc(RobomimicBCConfig(dataset=demo_file, grad_steps=1, obs_key="image"))
