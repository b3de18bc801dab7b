"""Scripted experts for robosuite Lift and Can: small state machines on the low-dim observation.

They read the object position (3 entries of robomimic's ``object`` key) and the end-effector
position (``robot0_eef_pos``) from the flat observation of ``make_env("robosuite/<task>")`` (keys
:data:`envs.factory.ROBOSUITE_DEFAULT_KEYS`, sorted: ``object`` first), and command robosuite's default Panda
controller (OSC_POSE deltas: actions 0-2 move the end effector, 3-5 rotate it, kept at 0; action 6 closes the
gripper at +1 and opens it at -1). Can's goal (the centre of its bin quadrant) is fixed per env and read once
from the env. Used by :func:`envs.collect.collect_robosuite_demos` (noisy demos, success filter).

Lift: above the cube, down, close, lift. Can: above the can, down, close, lift over the bin wall, carry over
the goal, lower, open, move up (robosuite counts the can as placed once the hand is 4 cm away).
"""

from __future__ import annotations

import numpy as np

GAIN = 12.0  # action per metre of position error (saturates at 1 beyond ~8 cm)


def _move(eef: np.ndarray, target: np.ndarray, grip: float) -> np.ndarray:
    action = np.zeros(7)
    action[:3] = np.clip(GAIN * (target - eef), -1.0, 1.0)
    action[6] = grip
    return action


class _Expert:
    """Phases of (target offset, gripper, done-test); ``reset()`` at each episode start."""

    def __init__(self, object_pos: int, object_dim: int):
        self.obj_slice = slice(object_pos, object_pos + 3)
        self.eef_slice = slice(object_dim, object_dim + 3)
        self.reset()

    def reset(self) -> None:
        self.phase = 0
        self.count = 0  # steps spent in the current phase

    def _next(self) -> None:
        self.phase += 1
        self.count = 0

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64).reshape(-1)
        action = self.act(obs[self.obj_slice], obs[self.eef_slice])
        self.count += 1
        return action

    def act(self, obj: np.ndarray, eef: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class LiftExpert(_Expert):
    """Grasp the cube from above and lift it 15 cm."""

    def act(self, obj, eef):
        above = obj + np.array([0.0, 0.0, 0.08])
        if self.phase == 0:  # above the cube, gripper open
            if np.linalg.norm((above - eef)[:2]) < 0.01 and abs(above[2] - eef[2]) < 0.02 or self.count > 60:
                self._next()
            return _move(eef, above, -1.0)
        if self.phase == 1:  # down to the cube
            grasp = obj + np.array([0.0, 0.0, -0.005])
            if np.linalg.norm(grasp - eef) < 0.01 or self.count > 40:
                self._next()
            return _move(eef, grasp, -1.0)
        if self.phase == 2:  # close
            if self.count > 8:
                self._next()
            return _move(eef, obj, 1.0)
        return _move(eef, np.array([obj[0], obj[1], eef[2] + 0.1]), 1.0)  # lift


class CanExpert(_Expert):
    """Pick the can from the left bin and place it in its quadrant of the right bin."""

    def __init__(self, object_pos: int, object_dim: int, goal: np.ndarray):
        self.goal = np.asarray(goal, dtype=np.float64)
        super().__init__(object_pos, object_dim)

    def act(self, obj, eef):
        carry_z = self.goal[2] + 0.15  # above both bins' walls
        if self.phase == 0:  # above the can
            above = obj + np.array([0.0, 0.0, 0.06])
            if np.linalg.norm((above - eef)[:2]) < 0.01 and abs(above[2] - eef[2]) < 0.02 or self.count > 80:
                self._next()
            return _move(eef, above, -1.0)
        if self.phase == 1:  # down around the can
            grasp = obj + np.array([0.0, 0.0, 0.0])
            if np.linalg.norm(grasp - eef) < 0.01 or self.count > 40:
                self._next()
            return _move(eef, grasp, -1.0)
        if self.phase == 2:  # close
            if self.count > 8:
                self._next()
            return _move(eef, obj, 1.0)
        if self.phase == 3:  # lift
            if eef[2] > carry_z - 0.02 or self.count > 60:
                self._next()
            return _move(eef, np.array([obj[0], obj[1], carry_z]), 1.0)
        if self.phase == 4:  # carry over the goal
            target = np.array([self.goal[0], self.goal[1], carry_z])
            if np.linalg.norm((target - obj)[:2]) < 0.015 or self.count > 120:
                self._next()
            return _move(eef, target + (eef - obj) * np.array([1, 1, 0]), 1.0)
        if self.phase == 5:  # lower into the bin
            target = np.array([eef[0], eef[1], self.goal[2] + 0.08])
            if eef[2] < target[2] + 0.02 or self.count > 40:
                self._next()
            return _move(eef, target, 1.0)
        if self.phase == 6:  # release
            if self.count > 6:
                self._next()
            return _move(eef, eef, -1.0)
        return _move(eef, np.array([eef[0], eef[1], carry_z]), -1.0)  # back up: success needs the hand away


def expert_for(env) -> _Expert:
    """The scripted expert for a ``make_env("robosuite/Lift" | "robosuite/Can")`` env with the default keys."""
    from envs.factory import ROBOSUITE_DEFAULT_KEYS

    rs_env = env.get_wrapper_attr("_rs_env")
    flat = env.get_wrapper_attr("keys")  # GymWrapper's keys, object first
    if [("object" if k == "object-state" else k) for k in flat] != list(ROBOSUITE_DEFAULT_KEYS):
        raise ValueError(f"the robosuite experts read the default observation keys {ROBOSUITE_DEFAULT_KEYS}, "
                         f"the env has {flat}")
    obs = rs_env._get_observations(force_update=True)
    # the object's position inside robomimic's "object" key (robosuite's "object-state": the active object
    # observables in order; Lift: cube_pos first, Can: Can_to_robot0_eef_pos/quat, then Can_pos)
    names = [n for n, o in rs_env._observables.items() if o.modality == "object" and o.is_enabled() and o.is_active()
             and n in obs]
    sizes = [int(np.asarray(obs[n]).size) for n in names]
    pos_name = next(n for n in names if n.endswith("_pos") and "_to_" not in n)
    object_pos = sum(sizes[: names.index(pos_name)])
    object_dim = int(np.asarray(obs["object-state"]).size)
    name = type(rs_env).__name__
    if name == "Lift":
        return LiftExpert(object_pos, object_dim)
    if name == "PickPlaceCan":
        return CanExpert(object_pos, object_dim, rs_env.target_bin_placements[rs_env.object_id])
    raise ValueError(f"no scripted robosuite expert for {name}")
