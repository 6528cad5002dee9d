"""LIBERO task suites as OpenVLA fine-tunes on them (``libero_*_no_noops``, its modified RLDS), in NumPy.

  action:     [T, 7] float32   action[:, :6] + invert(clip(gripper, 0, 1)) (LIBERO: -1 open ... +1 close)
  proprio:    [T, 8] float32   EEF_state = state[:, :6] ++ gripper_state = state[:, -2:] (two finger joints)
  step_index: [T] int64        arange(T)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vlaprep.transforms.base import Trajectory
from vlaprep.transforms.steps import invert_clip01, read_steps, state_proprio, trajectory

LIBERO_SHAPES = {"action": (7,), "observation/state": (8,)}
LIBERO_STATE_OBS = ("EEF_state", "gripper_state")


def libero_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """The four LIBERO suites (spatial, object, goal, 10): one transform, as in OpenVLA."""
    name = "libero_transform"
    x = read_steps(steps, LIBERO_SHAPES, name)
    a, s = x["action"], x["observation/state"]
    action = np.concatenate([a[:, :6], invert_clip01(a[:, -1:])], axis=1)
    pieces = {"EEF_state": s[:, :6], "gripper_state": s[:, -2:]}
    return trajectory(action, state_proprio(LIBERO_STATE_OBS, pieces, a.shape[0]), name)
