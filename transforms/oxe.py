"""Open X-Embodiment, RT-X layouts: per-dataset transforms of OpenVLA's ``oxe/transforms.py``, in NumPy.

The datasets here store the action as a dict (``action/world_vector``, ``action/rotation_delta``, a gripper
key) and, except Bridge V2's own release, the instruction under ``observation/natural_language_instruction``
(Language Table: ``observation/instruction`` as int32 code points). Each transform is ``fn(steps) ->
Trajectory`` (see ``base.py``; readers in ``steps.py``):

  action:     [T', 7] float32   6 EEF deltas (xyz, rpy) + absolute gripper (1 open, 0 closed)
  proprio:    [T', P] float32   OpenVLA's ``state_obs_keys`` of the dataset concatenated, a zero column per
                                ``None`` (``*_STATE_OBS``; P = 8 here)
  step_index: [T'] int64        source step of each output step (for images and language)

T' = T except for Bridge (T' = T - 2). Inputs are cast to float32 first, as OpenVLA's graph held them.
Zero-step results follow OpenVLA (``steps.py``): ``EmptyTrajectoryError`` where it keeps an empty
trajectory (a 2-step Bridge episode), a ``TransformError`` or an uncounted 0-step trajectory where its
graph fails (a 1-step ``bridge_orig`` episode; ``rel2abs`` over 0 steps).
``*_SHAPES`` give the per-step shape of every key a transform reads, from the dataset's features.json
(``shared/reference/oxe_layouts.json``); the registry publishes their keys as ``required_keys``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vlaprep.transforms.base import EmptyTrajectoryError, Trajectory, TransformError
from vlaprep.transforms.gripper import binarize_gripper_actions, rel2abs_gripper_actions
from vlaprep.transforms.steps import (
    check_lengths,
    invert_clip01,
    read_steps,
    read_zlib_matrix,
    state_proprio,
    trajectory,
    zeros,
)

_WV, _RD, _GCA = "action/world_vector", "action/rotation_delta", "action/gripper_closedness_action"

# --- Per-step shapes of the keys each transform reads (features.json) ----------------------------
BRIDGE_ORIG_SHAPES = {"action": (7,), "observation/state": (7,)}
BRIDGE_OXE_SHAPES = {_WV: (3,), _RD: (3,), "action/open_gripper": (), "observation/state": (7,)}
FRACTAL_SHAPES = {
    _WV: (3,),
    _RD: (3,),
    _GCA: (1,),
    "observation/base_pose_tool_reached": (7,),
    "observation/gripper_closed": (1,),
}
KUKA_SHAPES = {  # both state tensors are stored ZLIB-compressed
    _WV: (3,),
    _RD: (3,),
    _GCA: (1,),
    "observation/clip_function_input/base_pose_tool_reached": (7,),
    "observation/gripper_closed": (1,),
}
TACO_PLAY_SHAPES = {"action/rel_actions_world": (7,), "observation/robot_obs": (15,)}
JACO_PLAY_SHAPES = {_WV: (3,), _GCA: (1,), "observation/end_effector_cartesian_pos": (7,)}
BERKELEY_CABLE_ROUTING_SHAPES = {_WV: (3,), _RD: (3,), "observation/robot_state": (7,)}
ROBOTURK_SHAPES = {_WV: (3,), _RD: (3,), _GCA: (1,)}
NYU_DOOR_OPENING_SHAPES = {_WV: (3,), _RD: (3,), _GCA: (1,)}
VIOLA_SHAPES = {_WV: (3,), _RD: (3,), _GCA: (), "observation/joint_states": (7,), "observation/gripper_states": (1,)}
BERKELEY_AUTOLAB_UR5_SHAPES = {_WV: (3,), _RD: (3,), _GCA: (), "observation/robot_state": (15,)}
TOTO_SHAPES = {_WV: (3,), _RD: (3,), "action/open_gripper": (), "observation/state": (7,)}
LANGUAGE_TABLE_SHAPES = {"action": (2,), "observation/effector_translation": (2,)}
COLUMBIA_PUSHT_SHAPES = {_WV: (3,), _RD: (3,), _GCA: (), "observation/robot_state": (2,)}
BC_Z_SHAPES = {
    "action/future/xyz_residual": (30,),  # one FeaturesDict key "future/xyz_residual" under action
    "action/future/axis_angle_residual": (30,),
    "action/future/target_close": (10,),  # int64
    "observation/present/xyz": (3,),
    "observation/present/axis_angle": (3,),
    "observation/present/sensed_close": (1,),
}

# Kept names: the step keys each transform reads.
BRIDGE_ORIG_KEYS = tuple(BRIDGE_ORIG_SHAPES)
FRACTAL_KEYS = tuple(FRACTAL_SHAPES)
TACO_PLAY_KEYS = tuple(TACO_PLAY_SHAPES)
JACO_PLAY_KEYS = tuple(JACO_PLAY_SHAPES)
BERKELEY_CABLE_ROUTING_KEYS = tuple(BERKELEY_CABLE_ROUTING_SHAPES)
ROBOTURK_KEYS = tuple(ROBOTURK_SHAPES)
VIOLA_KEYS = tuple(VIOLA_SHAPES)
TOTO_KEYS = tuple(TOTO_SHAPES)
LANGUAGE_TABLE_KEYS = tuple(LANGUAGE_TABLE_SHAPES)

# --- OpenVLA's state_obs_keys (names of the observation pieces after its transform) --------------
BRIDGE_STATE_OBS = ("EEF_state", None, "gripper_state")
FRACTAL_STATE_OBS = ("base_pose_tool_reached", "gripper_closed")
KUKA_STATE_OBS = ("clip_function_input/base_pose_tool_reached", "gripper_closed")
TACO_JACO_STATE_OBS = ("state_eef", None, "state_gripper")
BERKELEY_CABLE_ROUTING_STATE_OBS = ("robot_state", None)
NO_STATE_OBS = (None,) * 8  # roboturk, nyu_door_opening and others without proprio
VIOLA_STATE_OBS = ("joint_states", "gripper_states")
BERKELEY_AUTOLAB_UR5_STATE_OBS = ("state",)
TOTO_STATE_OBS = ("state", None)
LANGUAGE_TABLE_STATE_OBS = ("effector_translation",) + (None,) * 6
COLUMBIA_PUSHT_STATE_OBS = ("robot_state",) + (None,) * 6
BC_Z_STATE_OBS = ("present/xyz", "present/axis_angle", None, "present/sensed_close")


def _obs(x: Mapping[str, np.ndarray], prefix: str = "observation/") -> dict[str, np.ndarray]:
    """The observation pieces of ``read_steps``' result under their names without ``observation/``."""
    return {k[len(prefix):]: v for k, v in x.items() if k.startswith(prefix)}


def _rel2abs(g: np.ndarray) -> np.ndarray:
    """``[T, 1]`` relative gripper -> ``[T, 1]`` absolute (``rel2abs_gripper_actions``). OpenVLA's version
    fails on an empty episode: callers return its 0-step trajectory with ``counted=False``."""
    return rel2abs_gripper_actions(g[:, 0])[:, None]


# --- Bridge V2 -----------------------------------------------------------------------------------
def _bridge_relabel(action: np.ndarray, state: np.ndarray, dataset: str, source_steps: int) -> Trajectory:
    """OpenVLA's ``relabel_bridge_actions`` after step 0 was dropped (``action``, ``state``: ``[n, 7]``).

    ``action[k, :6] = state[k+1, :6] - state[k, :6]`` (the reached state replaces the command), the
    gripper of the kept steps, and every key truncated by its last step: n steps give n-1 (0 if n <= 1).
    proprio = ``EEF_state`` (state[:, :6]) ++ 0 ++ ``gripper_state`` (state[:, -1:]).
    """
    n = action.shape[0]
    kept = state[:-1]  # [n-1, 7] (empty when n <= 1)
    movement = state[1:, :6] - state[:-1, :6]  # [n-1, 6] float32 differences, as in TF
    out_action = np.concatenate([movement, action[:-1, -1:]], axis=1)
    proprio = state_proprio(BRIDGE_STATE_OBS, {"EEF_state": kept[:, :6], "gripper_state": kept[:, -1:]}, kept.shape[0])
    step_index = np.arange(1, 1 + max(n - 1, 0), dtype=np.int64)
    if out_action.shape[0] == 0:
        traj = Trajectory(out_action.astype(np.float32), proprio, step_index)
        raise EmptyTrajectoryError(
            f"expected at least 3 steps, got {source_steps} for {dataset}; hint: Bridge drops the first step "
            f"(all-zero action) and the last (no next state), so T steps give T-2; OpenVLA keeps this episode "
            f"as an empty trajectory (counted in num_trajectories, no transitions)",
            traj,
        )
    return trajectory(out_action, proprio, dataset, step_index)


def bridge_orig_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Bridge V2 (``bridge_orig`` and ``bridge_dataset``): T steps -> T-2.

    Reads ``action: [T, 7]`` and ``observation/state: [T, 7]`` (xyz, rpy, gripper). As OpenVLA:
      1. drop step 0 of every key (its action is all zeros);
      2. gripper = ``binarize_gripper_actions(action[1:, -1])`` -- over the T-1 kept steps, so the
         raw last value seeds the scan even though that step is dropped next;
      3. relabel: ``action[:, :6] = state[k+1, :6] - state[k, :6]`` for k = 1..T-2 (the reached
         state replaces the commanded delta) and drop the last step, which has no next state.
    Output: action ``[T-2, 7]``, proprio ``[T-2, 8]`` = state[k, :6] ++ 0 ++ state[k, -1:],
    step_index = 1..T-2. T = 2 raises ``EmptyTrajectoryError`` (OpenVLA keeps an empty trajectory);
    T < 2 a ``TransformError`` (OpenVLA's binarize fails on the empty column).
    """
    name = "bridge_orig_transform"
    x = read_steps(steps, BRIDGE_ORIG_SHAPES, name)
    action, state = x["action"], x["observation/state"]
    t = action.shape[0]
    if t < 2:
        raise TransformError(
            f"expected at least 3 steps, got {t} for {name}; hint: Bridge drops the first step (all-zero "
            f"action) and the last (no next state), and OpenVLA's binarize_gripper_actions fails on the "
            f"empty column left by {t} step(s)"
        )
    gripper = binarize_gripper_actions(action[1:, -1])  # [T-1]
    action = np.concatenate([action[1:, :6], gripper[:, None]], axis=1)
    return _bridge_relabel(action, state[1:], name, t)


def bridge_oxe_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Bridge V2 as released in OXE (``bridge_oxe``): world_vector + rotation_delta + float(open_gripper),
    step 0 dropped, then relabelled from state deltas like ``bridge_orig`` (T steps -> T-2).

    No gripper scan here, so OpenVLA turns episodes of 0, 1 or 2 steps into empty trajectories
    (``EmptyTrajectoryError``) rather than failing.
    """
    name = "bridge_oxe_transform"
    x = read_steps(steps, BRIDGE_OXE_SHAPES, name)
    t = x["observation/state"].shape[0]
    action = np.concatenate([x[_WV], x[_RD], x["action/open_gripper"]], axis=1)[1:]
    return _bridge_relabel(action, x["observation/state"][1:], name, t)


# --- RT-1 / kuka ---------------------------------------------------------------------------------
def fractal20220817_data_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """RT-1 (fractal): world_vector(3) + rotation_delta(3) + rel2abs(gripper_closedness_action).

    proprio ``[T, 8]`` = base_pose_tool_reached (xyz + quaternion, 7) ++ gripper_closed (1).
    """
    name = "fractal20220817_data_transform"
    x = read_steps(steps, FRACTAL_SHAPES, name)
    t = x[_WV].shape[0]
    action = np.concatenate([x[_WV], x[_RD], _rel2abs(x[_GCA])], axis=1)
    # OpenVLA's rel2abs fails on 0 steps: returned, not counted (see steps.py).
    return trajectory(action, state_proprio(FRACTAL_STATE_OBS, _obs(x), t), name, counted=t > 0)


def kuka_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """QT-Opt (kuka): as RT-1, with both state tensors stored ZLIB-compressed (decoded here if the reader
    left them compressed). proprio ``[T, 8]`` = clip_function_input/base_pose_tool_reached (7) ++
    gripper_closed (1)."""
    name = "kuka_transform"
    shapes = {k: s for k, s in KUKA_SHAPES.items() if k.startswith("action/")}
    x = read_steps(steps, shapes, name)
    pose_key, closed_key = "observation/clip_function_input/base_pose_tool_reached", "observation/gripper_closed"
    x[pose_key] = read_zlib_matrix(steps, pose_key, name, 7)
    x[closed_key] = read_zlib_matrix(steps, closed_key, name, 1)
    t = check_lengths(name, **x)
    action = np.concatenate([x[_WV], x[_RD], _rel2abs(x[_GCA])], axis=1)
    # OpenVLA's rel2abs fails on 0 steps: returned, not counted (see steps.py).
    return trajectory(action, state_proprio(KUKA_STATE_OBS, _obs(x), t), name, counted=t > 0)


# --- RT-X --------------------------------------------------------------------------------------
def taco_play_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """TACO-Play: rel_actions_world[:, :6] + clip(gripper, 0, 1) (-1 close / +1 open -> 0 / 1).

    proprio ``[T, 8]`` = robot_obs[:, :6] (tcp pos + euler) ++ 0 ++ robot_obs[:, 7:8].
    """
    name = "taco_play_transform"
    x = read_steps(steps, TACO_PLAY_SHAPES, name)
    rel, obs = x["action/rel_actions_world"], x["observation/robot_obs"]
    action = np.concatenate([rel[:, :6], np.clip(rel[:, -1:], 0.0, 1.0)], axis=1)
    # OpenVLA takes column 7 (the first arm joint in CALVIN's layout) as "state_gripper", not column 6
    # (gripper width); kept for parity.
    pieces = {"state_eef": obs[:, :6], "state_gripper": obs[:, 7:8]}
    return trajectory(action, state_proprio(TACO_JACO_STATE_OBS, pieces, obs.shape[0]), name)


def jaco_play_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Jaco-Play: world_vector(3) + zeros(3) (no rotation) + rel2abs(gripper_closedness_action).

    proprio ``[T, 8]`` = end_effector_cartesian_pos[:, :6] ++ 0 ++ end_effector_cartesian_pos[:, -1:].
    """
    name = "jaco_play_transform"
    x = read_steps(steps, JACO_PLAY_SHAPES, name)
    t = x[_WV].shape[0]
    eef = x["observation/end_effector_cartesian_pos"]
    action = np.concatenate([x[_WV], zeros(t, 3), _rel2abs(x[_GCA])], axis=1)
    pieces = {"state_eef": eef[:, :6], "state_gripper": eef[:, -1:]}
    # OpenVLA's rel2abs fails on 0 steps: returned, not counted (see steps.py).
    return trajectory(action, state_proprio(TACO_JACO_STATE_OBS, pieces, t), name, counted=t > 0)


def berkeley_cable_routing_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Berkeley cable routing: world_vector(3) + rotation_delta(3) + zeros(1) (gripper never opens).

    proprio ``[T, 8]`` = robot_state (7) ++ 0.
    """
    name = "berkeley_cable_routing_transform"
    x = read_steps(steps, BERKELEY_CABLE_ROUTING_SHAPES, name)
    t = x[_WV].shape[0]
    action = np.concatenate([x[_WV], x[_RD], zeros(t, 1)], axis=1)
    return trajectory(action, state_proprio(BERKELEY_CABLE_ROUTING_STATE_OBS, _obs(x), t), name)


def _invert_clip_action(x: Mapping[str, np.ndarray]) -> np.ndarray:
    """world_vector(3) + rotation_delta(3) + invert(clip(gripper_closedness_action, 0, 1)) -> [T, 7]."""
    return np.concatenate([x[_WV], x[_RD], invert_clip01(x[_GCA])], axis=1)


def roboturk_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """RoboTurk: world_vector + rotation_delta + invert(clip(gripper, 0, 1)).

    proprio ``[T, 8]`` zeros: OpenVLA's state_obs_keys for roboturk are eight ``None`` entries.
    """
    name = "roboturk_transform"
    x = read_steps(steps, ROBOTURK_SHAPES, name)
    return trajectory(_invert_clip_action(x), state_proprio(NO_STATE_OBS, {}, x[_WV].shape[0]), name)


def nyu_door_opening_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """NYU door opening: world_vector + rotation_delta + rel2abs(gripper_closedness_action); no proprio
    (eight ``None`` state keys -> ``[T, 8]`` zeros)."""
    name = "nyu_door_opening_transform"
    x = read_steps(steps, NYU_DOOR_OPENING_SHAPES, name)
    t = x[_WV].shape[0]
    action = np.concatenate([x[_WV], x[_RD], _rel2abs(x[_GCA])], axis=1)
    # OpenVLA's rel2abs fails on 0 steps: returned, not counted (see steps.py).
    return trajectory(action, state_proprio(NO_STATE_OBS, {}, t), name, counted=t > 0)


def viola_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """VIOLA: world_vector + rotation_delta + invert(clip(gripper, 0, 1)) (gripper stored as a scalar).

    proprio ``[T, 8]`` = joint_states (7) ++ gripper_states (1), OpenVLA's state_obs_keys; the dataset
    stores ``gripper_states`` as shape (1,) (features.json).
    """
    name = "viola_transform"
    x = read_steps(steps, VIOLA_SHAPES, name)
    return trajectory(_invert_clip_action(x), state_proprio(VIOLA_STATE_OBS, _obs(x), x[_WV].shape[0]), name)


def berkeley_autolab_ur5_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Berkeley Autolab UR5: world_vector + rotation_delta + rel2abs(gripper_closedness_action).

    proprio ``[T, 8]`` = ``state`` = robot_state[:, 6:14] (OpenVLA's slice of the 15-wide robot state).
    """
    name = "berkeley_autolab_ur5_transform"
    x = read_steps(steps, BERKELEY_AUTOLAB_UR5_SHAPES, name)
    t = x[_WV].shape[0]
    action = np.concatenate([x[_WV], x[_RD], _rel2abs(x[_GCA])], axis=1)
    pieces = {"state": x["observation/robot_state"][:, 6:14]}
    # OpenVLA's rel2abs fails on 0 steps: returned, not counted (see steps.py).
    return trajectory(action, state_proprio(BERKELEY_AUTOLAB_UR5_STATE_OBS, pieces, t), name, counted=t > 0)


def toto_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """TOTO: world_vector + rotation_delta + float(open_gripper) (bool, True = open).

    proprio ``[T, 8]`` = state (7 joints) ++ 0.
    """
    name = "toto_transform"
    x = read_steps(steps, TOTO_SHAPES, name)
    action = np.concatenate([x[_WV], x[_RD], x["action/open_gripper"]], axis=1)
    return trajectory(action, state_proprio(TOTO_STATE_OBS, _obs(x), x[_WV].shape[0]), name)


def language_table_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Language Table: action (2, planar xy) + zeros(4) + ones(1) (no gripper: always "open").

    proprio ``[T, 8]`` = effector_translation (2) ++ zeros(6).
    """
    name = "language_table_transform"
    x = read_steps(steps, LANGUAGE_TABLE_SHAPES, name)
    xy = x["action"]
    t = xy.shape[0]
    action = np.concatenate([xy, zeros(t, 4), np.ones((t, 1), dtype=np.float32)], axis=1)
    return trajectory(action, state_proprio(LANGUAGE_TABLE_STATE_OBS, _obs(x), t), name)


def columbia_pusht_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Columbia PushT (real): world_vector + rotation_delta + gripper_closedness_action as stored.

    proprio ``[T, 8]`` = robot_state (2) ++ zeros(6).
    """
    name = "columbia_pusht_transform"
    x = read_steps(steps, COLUMBIA_PUSHT_SHAPES, name)
    action = np.concatenate([x[_WV], x[_RD], x[_GCA]], axis=1)
    return trajectory(action, state_proprio(COLUMBIA_PUSHT_STATE_OBS, _obs(x), x[_WV].shape[0]), name)


def bc_z_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """BC-Z: the first future step of each residual: xyz_residual[:, :3] + axis_angle_residual[:, :3] +
    invert(float(target_close[:, :1])) (int64, 1 = close).

    proprio ``[T, 8]`` = present/xyz (3) ++ present/axis_angle (3) ++ 0 ++ present/sensed_close (1).
    """
    name = "bc_z_transform"
    x = read_steps(steps, BC_Z_SHAPES, name)
    close = x["action/future/target_close"][:, :1]
    action = np.concatenate(
        [x["action/future/xyz_residual"][:, :3], x["action/future/axis_angle_residual"][:, :3], np.float32(1.0) - close],
        axis=1,
    )
    return trajectory(action, state_proprio(BC_Z_STATE_OBS, _obs(x), close.shape[0]), name)
