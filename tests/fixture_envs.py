"""A tiny gymnasium env with robomimic-style dict observations, for tests of "your own env and data".

``gym.make("tests.fixture_envs:PointReach-v0")`` imports this module, which registers the id; flowpolicy
names it ``gym/tests.fixture_envs:PointReach-v0``. A point (``robot0_eef_pos``) moves towards a target
(``object``); reward is minus the distance, success is being within 10 cm. No MuJoCo: it steps in microseconds.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "PointReach-v0"
MODULE = "tests.fixture_envs"  # import it under this name: train.py (run from the repo root) finds it so
NAME = f"gym/{MODULE}:{ENV_ID}"


class PointReach(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, render_mode=None):
        box = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.observation_space = gym.spaces.Dict({"robot0_eef_pos": box, "object": box})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.render_mode = render_mode

    def _obs(self):
        return {"robot0_eef_pos": self.eef.astype(np.float32), "object": self.target.astype(np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.eef = self.np_random.uniform(-0.5, 0.5, 3)
        self.target = self.np_random.uniform(-0.5, 0.5, 3)
        return self._obs(), {}

    def step(self, action):
        self.eef = np.clip(self.eef + 0.1 * np.clip(action, -1, 1), -1, 1)
        dist = float(np.linalg.norm(self.eef - self.target))
        return self._obs(), -dist, False, False, {"success": dist < 0.1}


def expert(obs: dict) -> np.ndarray:
    """The scripted expert: head straight for the target."""
    return np.clip(10.0 * (obs["object"] - obs["robot0_eef_pos"]), -1, 1).astype(np.float32)


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=PointReach, max_episode_steps=30)


def write_robomimic_file(path, num_demos: int = 10, seed: int = 0, env_args: dict | None = None,
                         action_dtype=np.float32, image_key: bool = True) -> str:
    """A demo file in robomimic's own low-dim layout (as robomimic's dataset scripts write it): obs keys
    ``robot0_eef_pos`` and ``object`` (no ``state``), an image key that must be ignored, ``env_args`` naming
    this env (type 2 = gym), ``mask/train`` and ``mask/valid``, no flowpolicy attributes."""
    import json

    import h5py

    env = gym.make(f"{MODULE}:{ENV_ID}")
    rng = np.random.default_rng(seed)
    names = []
    total = 0
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i in range(num_demos):
            obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
            rows = {"robot0_eef_pos": [], "object": []}
            actions, rewards, held = [], [], 0
            for _ in range(30):
                a = expert(obs)
                for k in rows:
                    rows[k].append(obs[k])
                obs, r, term, trunc, info = env.step(a)
                actions.append(a)
                rewards.append(r)
                held += bool(info["success"])
                if held >= 5:  # hold the goal a few steps, then stop (as Meta-World demos do)
                    break
            g = data.create_group(f"demo_{i}")
            for k, v in rows.items():
                g.create_dataset(f"obs/{k}", data=np.asarray(v, np.float64))
            if image_key:
                g.create_dataset("obs/agentview_image", data=np.zeros((len(actions), 4, 4, 3), np.uint8))
            g.create_dataset("actions", data=np.asarray(actions).astype(action_dtype))
            g.create_dataset("rewards", data=np.asarray(rewards, np.float64))
            dones = np.zeros(len(actions), np.int64)
            dones[-1] = 1
            g.create_dataset("dones", data=dones)
            g.attrs["num_samples"] = len(actions)
            names.append(f"demo_{i}")
            total += len(actions)
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(env_args or {"env_name": f"{MODULE}:{ENV_ID}", "type": 2,
                                                         "env_kwargs": {}})
        f.create_dataset("mask/train", data=np.array(names[:-2], dtype="S"))
        f.create_dataset("mask/valid", data=np.array(names[-2:], dtype="S"))
    env.close()
    return str(path)
