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
``EmptyTrajectoryError`` (a ``TransformError``) marks an episode that standardizes to zero steps and that
OpenVLA keeps as an empty trajectory (counted in ``num_trajectories``).
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


class TransformError(ValueError):
    """An episode the transform cannot turn into a trajectory; pipelines quarantine it."""


class EmptyTrajectoryError(TransformError):
    """The episode standardizes to zero steps, and OpenVLA keeps it as an empty trajectory.

    OpenVLA's statistics count such a trajectory in ``num_trajectories`` and add no transitions (a
    2-step Bridge episode loses its first and last step). Where OpenVLA's graph itself fails on the
    episode (its gripper scans over an empty column), transforms raise a plain ``TransformError`` or
    return the 0-step trajectory, which pipelines quarantine; only this exception means "counted".
    ``trajectory`` holds the empty result (``action: [0, D]``, ``proprio: [0, P]``).

    A ``TransformError`` subclass so a pipeline that does not know it quarantines the episode.
    """

    def __init__(self, message: str, trajectory: "Trajectory"):
        super().__init__(message)
        self.trajectory = trajectory

    def __reduce__(self):  # pickles with its trajectory (Beam may move exceptions between processes)
        return (type(self), (self.args[0], self.trajectory))


class SourceFormat(enum.StrEnum):
    """How a dataset is stored on disk; picks its reader (``vlaprep.pipelines.sources.SOURCES``).

    A ``StrEnum``: each member is equal to, hashes, formats and JSON-encodes as its value, so specs,
    manifests and fingerprints read exactly as they did with the plain strings.
    """

    RLDS = "rlds"  # TFDS TFRecord shards of RLDS episodes (OXE, Bridge, LIBERO, DROID)
    CALVIN = "calvin"  # CALVIN split directories: one .npz per frame, language windows in auto_lang_ann.npy


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
