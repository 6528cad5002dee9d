"""Types shared by every per-dataset transform (pure NumPy: no Beam, no TensorFlow).

A transform is a plain function ``fn(steps) -> Trajectory`` where ``steps`` maps flattened source keys
(``"action"``, ``"observation/state"``, ``"action/world_vector"``, CALVIN ``"rel_actions"``...) to
per-step arrays with a leading time axis T. It returns the standardized trajectory that statistics,
shards and training all consume:

  action:     [T', D] float32   after the dataset's relabelling / gripper convention
  proprio:    [T', P] float32   the state the registry names (P = 0 when the dataset has none)
  step_index: [T'] int64        which source step each output step came from (images, language)

Transforms raise ``TransformError`` (a ``ValueError``) with "expected X, got Y for K in D" messages for
episodes they cannot handle (too short, missing key, wrong width); pipelines quarantine those episodes.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


class TransformError(ValueError):
    """An episode the transform cannot turn into a trajectory; pipelines quarantine it."""


class ActionEncoding(enum.Enum):
    """What the action vector means (OpenVLA's ``ActionEncoding``); the normalization mask follows."""

    EEF_POS = "eef_pos"  # 6 end-effector deltas (xyz, rpy) + 1 absolute gripper in [0, 1]
    JOINT_POS = "joint_pos"  # joint positions + gripper
    JOINT_POS_BIMANUAL = "joint_pos_bimanual"
    EEF_R6 = "eef_r6"  # 3 xyz + 6 rotation (R6) + gripper


@dataclasses.dataclass(frozen=True)
class Trajectory:
    action: np.ndarray  # [T, D] float32
    proprio: np.ndarray  # [T, P] float32
    step_index: np.ndarray  # [T] int64

    def __post_init__(self):
        t = self.action.shape[0]
        if self.action.ndim != 2 or self.proprio.ndim != 2 or self.step_index.shape != (t,):
            raise TransformError(
                f"expected action [T, D], proprio [T, P], step_index [T], got "
                f"{self.action.shape!r}, {self.proprio.shape!r}, {self.step_index.shape!r}"
            )
        if self.proprio.shape[0] != t:
            raise TransformError(f"expected proprio with {t} steps, got {self.proprio.shape[0]}")

    @property
    def num_steps(self) -> int:
        return int(self.action.shape[0])
