"""Environments, wrappers, demo datasets and demo collectors for flowpolicy.

Light imports only here; ``envs.dataset`` (torch), ``envs.collect`` (stable-baselines3) and ``envs.video``
(imageio) are imported from their modules.
"""

from envs.factory import FAMILY_EXAMPLES, LOCOMOTION_TASKS, env_meta, make_env, make_vec_env, parse_env_name
from envs.hdf5 import DatasetError, Episode, read_demos, write_demos
from envs.wrappers import ActionChunk, ObservationHistory, SuccessInfo

__all__ = [
    "FAMILY_EXAMPLES", "LOCOMOTION_TASKS", "ActionChunk", "DatasetError", "Episode", "ObservationHistory",
    "SuccessInfo", "env_meta", "make_env", "make_vec_env", "parse_env_name", "read_demos", "write_demos",
]
