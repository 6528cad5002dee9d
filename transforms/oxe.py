"""Open X-Embodiment per-dataset transforms (OpenVLA's ``oxe/transforms.py`` + ``oxe/configs.py``), NumPy.

Each transform is ``fn(steps) -> Trajectory`` (see ``base.py``): ``steps`` maps flattened RLDS step
keys (``"action"``, ``"action/world_vector"``, ``"observation/state"``...) to arrays with a leading
time axis T. The output is

  action:     [T', 7] float32   6 EEF deltas (xyz, rpy) + absolute gripper (1 open, 0 closed)
  proprio:    [T', P] float32   OpenVLA's ``state_obs_keys`` concatenated; a ``None`` entry there is
                                one zero column (bridge_orig: state[:, :6] ++ 0 ++ state[:, -1:], P = 8)
  step_index: [T'] int64        source step of each output step (for images and language)

T' = T except for Bridge (T' = T - 2, see ``bridge_orig_transform``). Inputs are cast to float32 first,
as OpenVLA's TF graph held them, so differences (Bridge relabelling) are float32 arithmetic.

The ``*_KEYS`` tuples name every step key each transform reads; the registry publishes them as
``required_keys`` so sources decode only those. ``require_keys`` / ``read_matrix`` / ``read_column`` are
shared with ``calvin.py`` and the registry's generic transform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from vlaprep.transforms.base import Trajectory, TransformError
from vlaprep.transforms.gripper import (
    binarize_gripper_actions,
    invert_gripper_actions,
    rel2abs_gripper_actions,
)

# --- Step keys each transform reads (the registry's required_keys) -------------------------------
BRIDGE_ORIG_KEYS = ("action", "observation/state")
FRACTAL_KEYS = (
    "action/world_vector",
    "action/rotation_delta",
    "action/gripper_closedness_action",
    "observation/base_pose_tool_reached",
    "observation/gripper_closed",
)
TACO_PLAY_KEYS = ("action/rel_actions_world", "observation/robot_obs")
JACO_PLAY_KEYS = (
    "action/world_vector",
    "action/gripper_closedness_action",
    "observation/end_effector_cartesian_pos",
)
BERKELEY_CABLE_ROUTING_KEYS = ("action/world_vector", "action/rotation_delta", "observation/robot_state")
ROBOTURK_KEYS = ("action/world_vector", "action/rotation_delta", "action/gripper_closedness_action")
VIOLA_KEYS = (
    "action/world_vector",
    "action/rotation_delta",
    "action/gripper_closedness_action",
    "observation/joint_states",
    "observation/gripper_states",
)
TOTO_KEYS = ("action/world_vector", "action/rotation_delta", "action/open_gripper", "observation/state")
LANGUAGE_TABLE_KEYS = ("action", "observation/effector_translation")


# --- Shared step readers -------------------------------------------------------------------------
def require_keys(steps: Mapping[str, np.ndarray], keys: Sequence[str], dataset: str) -> None:
    """Raise TransformError naming the first missing key and the keys that are present."""
    for key in keys:
        if key not in steps:
            raise TransformError(
                f"expected step key {key!r}, got keys {sorted(steps)!r} for {dataset}; "
                f"hint: the source must decode every key in the registry's required_keys {list(keys)!r}"
            )


def read_matrix(steps: Mapping[str, np.ndarray], key: str, dataset: str, width: int | None = None) -> np.ndarray:
    """``steps[key]`` as ``[T, W] float32``; a 1-D ``[T]`` array is one column.

    ``width`` (when given) must match W exactly.
    """
    require_keys(steps, (key,), dataset)
    arr = np.asarray(steps[key])
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise TransformError(
            f"expected [T] or [T, W] array, got shape {arr.shape!r} for key {key!r} in {dataset}; "
            f"hint: keys must be per-step vectors with the time axis first"
        )
    if width is not None and arr.shape[1] != width:
        raise TransformError(
            f"expected width {width}, got shape {arr.shape!r} for key {key!r} in {dataset}; "
            f"hint: is this the right dataset for the transform?"
        )
    try:
        return arr.astype(np.float32)
    except (TypeError, ValueError) as e:
        raise TransformError(
            f"expected numeric values, got dtype {arr.dtype!r} for key {key!r} in {dataset}"
        ) from e


def read_column(steps: Mapping[str, np.ndarray], key: str, dataset: str) -> np.ndarray:
    """A scalar-per-step key (``[T]`` or ``[T, 1]``) as ``[T] float32``."""
    return read_matrix(steps, key, dataset, width=1)[:, 0]


def check_lengths(dataset: str, **arrays: np.ndarray) -> int:
    """All arrays share the leading length T; returns T."""
    lengths = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise TransformError(
            f"expected every key to have the same number of steps, got {lengths!r} in {dataset}; "
            f"hint: keys must all come from the same episode"
        )
    return next(iter(lengths.values()))


def _zeros(t: int, n: int) -> np.ndarray:
    """``[t, n] float32`` zeros: a ``None`` entry of OpenVLA's state_obs_keys, or padded action dims."""
    return np.zeros((t, n), dtype=np.float32)


def _trajectory(action: np.ndarray, proprio: np.ndarray, step_index: np.ndarray | None = None) -> Trajectory:
    t = action.shape[0]
    if step_index is None:
        step_index = np.arange(t, dtype=np.int64)
    return Trajectory(
        action=np.ascontiguousarray(action, dtype=np.float32),
        proprio=np.ascontiguousarray(proprio, dtype=np.float32),
        step_index=np.asarray(step_index, dtype=np.int64),
    )


# --- Per-dataset transforms ----------------------------------------------------------------------
def bridge_orig_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Bridge V2 (``bridge_orig`` and ``bridge_dataset``): T steps -> T-2.

    Reads ``action: [T, 7]`` and ``observation/state: [T, 7]`` (xyz, rpy, gripper). As OpenVLA:
      1. drop step 0 of every key (its action is all zeros);
      2. gripper = ``binarize_gripper_actions(action[1:, -1])`` -- over the T-1 kept steps, so the
         raw last value seeds the scan even though that step is dropped next;
      3. relabel: ``action[:, :6] = state[k+1, :6] - state[k, :6]`` for k = 1..T-2 (the reached
         state replaces the commanded delta) and drop the last step, which has no next state.
    Output: action ``[T-2, 7]``, proprio ``[T-2, 8]`` = state[k, :6] ++ 0 ++ state[k, -1:],
    step_index = 1..T-2.
    """
    name = "bridge_orig_transform"
    require_keys(steps, BRIDGE_ORIG_KEYS, name)
    action = read_matrix(steps, "action", name, width=7)
    state = read_matrix(steps, "observation/state", name, width=7)
    t = check_lengths(name, action=action, state=state)
    if t < 3:
        raise TransformError(
            f"expected at least 3 steps, got {t} for {name}; hint: Bridge drops the first step "
            f"(all-zero action) and the last (no next state), so T steps give T-2"
        )
    gripper = binarize_gripper_actions(action[1:, -1])[:-1]  # [T-2]
    state = state[1:]  # [T-1], step 0 dropped
    movement = state[1:, :6] - state[:-1, :6]  # [T-2, 6] float32 differences, as in TF
    kept = state[:-1]  # [T-2, 7]
    return _trajectory(
        action=np.concatenate([movement, gripper[:, None]], axis=1),
        proprio=np.concatenate([kept[:, :6], _zeros(t - 2, 1), kept[:, -1:]], axis=1),
        step_index=np.arange(1, t - 1, dtype=np.int64),
    )


def fractal20220817_data_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """RT-1 (fractal): world_vector(3) + rotation_delta(3) + rel2abs(gripper_closedness_action).

    proprio ``[T, 8]`` = base_pose_tool_reached (xyz + quaternion, 7) ++ gripper_closed (1).
    """
    name = "fractal20220817_data_transform"
    require_keys(steps, FRACTAL_KEYS, name)
    wv = read_matrix(steps, "action/world_vector", name, width=3)
    rd = read_matrix(steps, "action/rotation_delta", name, width=3)
    g = read_column(steps, "action/gripper_closedness_action", name)
    pose = read_matrix(steps, "observation/base_pose_tool_reached", name, width=7)
    closed = read_matrix(steps, "observation/gripper_closed", name, width=1)
    check_lengths(name, world_vector=wv, rotation_delta=rd, gripper=g, pose=pose, gripper_closed=closed)
    return _trajectory(
        action=np.concatenate([wv, rd, rel2abs_gripper_actions(g)[:, None]], axis=1),
        proprio=np.concatenate([pose, closed], axis=1),
    )


def taco_play_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """TACO-Play: rel_actions_world[:, :6] + clip(gripper, 0, 1) (-1 close / +1 open -> 0 / 1).

    proprio ``[T, 8]`` = robot_obs[:, :6] (tcp pos + euler) ++ 0 ++ robot_obs[:, 7:8].
    """
    name = "taco_play_transform"
    require_keys(steps, TACO_PLAY_KEYS, name)
    rel = read_matrix(steps, "action/rel_actions_world", name, width=7)
    obs = read_matrix(steps, "observation/robot_obs", name, width=15)
    t = check_lengths(name, rel_actions_world=rel, robot_obs=obs)
    return _trajectory(
        action=np.concatenate([rel[:, :6], np.clip(rel[:, -1:], 0.0, 1.0)], axis=1),
        # OpenVLA takes column 7 (the first arm joint in CALVIN's layout) as "state_gripper", not
        # column 6 (gripper width); kept for parity.
        proprio=np.concatenate([obs[:, :6], _zeros(t, 1), obs[:, 7:8]], axis=1),
    )


def jaco_play_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Jaco-Play: world_vector(3) + zeros(3) (no rotation) + rel2abs(gripper_closedness_action).

    proprio ``[T, 8]`` = end_effector_cartesian_pos[:, :6] ++ 0 ++ end_effector_cartesian_pos[:, -1:].
    """
    name = "jaco_play_transform"
    require_keys(steps, JACO_PLAY_KEYS, name)
    wv = read_matrix(steps, "action/world_vector", name, width=3)
    g = read_column(steps, "action/gripper_closedness_action", name)
    eef = read_matrix(steps, "observation/end_effector_cartesian_pos", name, width=7)
    t = check_lengths(name, world_vector=wv, gripper=g, end_effector_cartesian_pos=eef)
    return _trajectory(
        action=np.concatenate([wv, _zeros(t, 3), rel2abs_gripper_actions(g)[:, None]], axis=1),
        proprio=np.concatenate([eef[:, :6], _zeros(t, 1), eef[:, -1:]], axis=1),
    )


def berkeley_cable_routing_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Berkeley cable routing: world_vector(3) + rotation_delta(3) + zeros(1) (gripper never opens).

    proprio ``[T, 8]`` = robot_state (7) ++ 0.
    """
    name = "berkeley_cable_routing_transform"
    require_keys(steps, BERKELEY_CABLE_ROUTING_KEYS, name)
    wv = read_matrix(steps, "action/world_vector", name, width=3)
    rd = read_matrix(steps, "action/rotation_delta", name, width=3)
    robot_state = read_matrix(steps, "observation/robot_state", name, width=7)
    t = check_lengths(name, world_vector=wv, rotation_delta=rd, robot_state=robot_state)
    return _trajectory(
        action=np.concatenate([wv, rd, _zeros(t, 1)], axis=1),
        proprio=np.concatenate([robot_state, _zeros(t, 1)], axis=1),
    )


def _invert_clip_transform(steps: Mapping[str, np.ndarray], name: str, keys: Sequence[str]):
    """world_vector(3) + rotation_delta(3) + invert(clip(gripper_closedness_action, 0, 1)); returns (action, T)."""
    require_keys(steps, keys, name)
    wv = read_matrix(steps, "action/world_vector", name, width=3)
    rd = read_matrix(steps, "action/rotation_delta", name, width=3)
    g = read_column(steps, "action/gripper_closedness_action", name)
    t = check_lengths(name, world_vector=wv, rotation_delta=rd, gripper=g)
    gripper = invert_gripper_actions(np.clip(g, 0.0, 1.0))  # source: 1 = closed
    return np.concatenate([wv, rd, gripper[:, None]], axis=1), t


def roboturk_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """RoboTurk: world_vector + rotation_delta + invert(clip(gripper, 0, 1)).

    proprio ``[T, 8]`` zeros: OpenVLA's state_obs_keys for roboturk are eight ``None`` entries.
    """
    action, t = _invert_clip_transform(steps, "roboturk_transform", ROBOTURK_KEYS)
    return _trajectory(action=action, proprio=_zeros(t, 8))


def viola_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """VIOLA: world_vector + rotation_delta + invert(clip(gripper, 0, 1)).

    proprio ``[T, 9]`` = joint_states (7) ++ gripper_states (2), OpenVLA's state_obs_keys.
    """
    name = "viola_transform"
    action, t = _invert_clip_transform(steps, name, VIOLA_KEYS)
    joints = read_matrix(steps, "observation/joint_states", name, width=7)
    fingers = read_matrix(steps, "observation/gripper_states", name, width=2)
    check_lengths(name, action=action, joint_states=joints, gripper_states=fingers)
    return _trajectory(action=action, proprio=np.concatenate([joints, fingers], axis=1))


def toto_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """TOTO: world_vector + rotation_delta + float(open_gripper) (bool, True = open).

    proprio ``[T, 8]`` = state (7 joints) ++ 0.
    """
    name = "toto_transform"
    require_keys(steps, TOTO_KEYS, name)
    wv = read_matrix(steps, "action/world_vector", name, width=3)
    rd = read_matrix(steps, "action/rotation_delta", name, width=3)
    g = read_column(steps, "action/open_gripper", name)  # bool -> 0.0 / 1.0
    state = read_matrix(steps, "observation/state", name, width=7)
    t = check_lengths(name, world_vector=wv, rotation_delta=rd, open_gripper=g, state=state)
    return _trajectory(
        action=np.concatenate([wv, rd, g[:, None]], axis=1),
        proprio=np.concatenate([state, _zeros(t, 1)], axis=1),
    )


def language_table_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Language Table: action (2, planar xy) + zeros(4) + ones(1) (no gripper: always "open").

    proprio ``[T, 8]`` = effector_translation (2) ++ zeros(6).
    """
    name = "language_table_transform"
    require_keys(steps, LANGUAGE_TABLE_KEYS, name)
    xy = read_matrix(steps, "action", name, width=2)
    eff = read_matrix(steps, "observation/effector_translation", name, width=2)
    t = check_lengths(name, action=xy, effector_translation=eff)
    return _trajectory(
        action=np.concatenate([xy, _zeros(t, 4), np.ones((t, 1), dtype=np.float32)], axis=1),
        proprio=np.concatenate([eff, _zeros(t, 6)], axis=1),
    )
