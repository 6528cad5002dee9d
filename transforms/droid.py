"""DROID-platform datasets as OpenVLA standardizes them, in NumPy: DROID itself, the DROID fine-tuning set
(``droid_wipe``) and the T-DROID task sets (``tdroid_*``).

  action:     [T, 7] float32   6 EEF deltas + absolute gripper (1 open, 0 closed)
  proprio:    [T, P] float32   DROID: ``proprio`` = cartesian_position ++ gripper_position (P = 7);
                               T-DROID: cartesian_position[:, :6] ++ 0 ++ gripper_position (P = 8)
  step_index: [T] int64        arange(T)

DROID stores float64. OpenVLA computes ``1 - gripper_position`` in float64 and casts the action to
float32 afterwards (``restructure``); ``droid_transform`` does the same, which can differ by one float32
ulp from ``1 - float32(gripper)``. OpenVLA's DROID chunk filter (``zero_action_filter``) runs in
``make_interleaved_dataset``, after statistics, and its random exterior-camera swap touches images only:
neither changes statistics, neither is here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vlaprep.transforms.base import Trajectory
from vlaprep.transforms.gripper import binarize_gripper_actions
from vlaprep.transforms.steps import (
    check_lengths,
    read_native,
    read_steps,
    require_min_width,
    state_proprio,
    trajectory,
)

_CV, _GP = "action_dict/cartesian_velocity", "action_dict/gripper_position"
_POS, _GRIP = "observation/cartesian_position", "observation/gripper_position"

DROID_SHAPES = {_CV: (6,), _GP: (1,), _POS: (6,), _GRIP: (1,)}  # float64
DROID_WIPE_SHAPES = {_CV: None, _GP: None, _POS: None, _GRIP: None}  # layout not established (assumed)
TDROID_SHAPES = {"action": (7,), _POS: (6,), _GRIP: (1,)}  # float32

DROID_STATE_OBS = ("proprio",)
TDROID_STATE_OBS = ("EEF_state", None, "gripper_state")


def _droid(steps: Mapping[str, np.ndarray], shapes: Mapping, dataset: str) -> Trajectory:
    """cartesian_velocity[:, :6] ++ (1 - gripper_position) in the stored dtype, then float32;
    proprio = cartesian_position ++ gripper_position."""
    x = {key: read_native(steps, key, dataset, None if s is None else (s[0] if s else 1)) for key, s in shapes.items()}
    require_min_width(x[_CV], 6, _CV, dataset)
    t = check_lengths(dataset, **x)
    one = np.ones((), dtype=x[_GP].dtype) if x[_GP].dtype.kind == "f" else np.float32(1.0)
    action = np.concatenate([x[_CV][:, :6], one - x[_GP]], axis=1).astype(np.float32)
    proprio = np.concatenate([x[_POS], x[_GRIP]], axis=1)
    return trajectory(action, state_proprio(DROID_STATE_OBS, {"proprio": proprio}, t), dataset)


def droid_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """DROID (OpenVLA's ``droid_baseact_transform``): base-frame velocity action + (1 - gripper position)."""
    return _droid(steps, DROID_SHAPES, "droid_transform")


def droid_wipe_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """DROID fine-tuning set (OpenVLA's ``droid_finetuning_transform``): the same numbers as DROID.

    Its layout is not established (``status: assumed``): widths come from the data (cartesian_velocity
    needs at least 6 columns; the action is 7 wide only when gripper_position is 1 wide).
    """
    return _droid(steps, DROID_WIPE_SHAPES, "droid_wipe_transform")


def tdroid_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """T-DROID task sets: action[:, :6] + binarize(action[:, -1]); proprio cartesian_position[:, :6] ++ 0 ++
    gripper_position[:, -1:]."""
    name = "tdroid_transform"
    x = read_steps(steps, TDROID_SHAPES, name)
    a = x["action"]
    t = a.shape[0]
    action = np.concatenate([a[:, :6], binarize_gripper_actions(a[:, -1])[:, None]], axis=1)
    pieces = {"EEF_state": x[_POS][:, :6], "gripper_state": x[_GRIP][:, -1:]}
    # OpenVLA's binarize fails on 0 steps: returned, not counted (see steps.py).
    return trajectory(action, state_proprio(TDROID_STATE_OBS, pieces, t), name, counted=t > 0)
