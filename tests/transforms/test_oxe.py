"""OXE per-dataset transforms against hand-worked trajectories (OpenVLA's oxe/transforms.py semantics)."""

import numpy as np
import pytest

from vlaprep.transforms import oxe
from vlaprep.transforms.base import Trajectory, TransformError

f32 = np.float32


def _bridge_steps(gripper, state=None, action_dims=None):
    """Bridge-layout steps: action [T, 7] (dims 0..5 = 7.0, ignored by the relabelling), state [T, 7]."""
    t = len(gripper)
    action = np.full((t, 7), 7.0) if action_dims is None else np.asarray(action_dims, float)
    action[:, 6] = gripper
    if state is None:
        state = np.arange(t * 7, dtype=float).reshape(t, 7)
    return {"action": action, "observation/state": np.asarray(state, dtype=np.float64)}


# Values exactly representable in float32, so the expected deltas are exact.
S0 = [9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 0.75]
S1 = [1.0, 2.0, 3.0, 0.25, 0.5, 0.75, 1.0]
S2 = [1.5, 2.0, 2.5, 0.25, 0.0, 1.0, 0.5]
S3 = [2.0, 1.0, 2.5, 0.5, 0.0, 1.0, 0.0]


def test_bridge_relabels_with_state_deltas_and_drops_first_and_last():
    traj = oxe.bridge_orig_transform(_bridge_steps([0.0, 1.0, 0.5, 0.0], state=[S0, S1, S2, S3]))
    assert isinstance(traj, Trajectory)
    # T=4 -> 2 steps, from source steps 1 and 2.
    np.testing.assert_array_equal(traj.step_index, np.array([1, 2], np.int64))
    assert traj.step_index.dtype == np.int64
    # action[k, :6] = state[k+1, :6] - state[k, :6]; gripper = binarize([1.0, 0.5, 0.0])[:2] = [1, 0].
    expected_action = np.array(
        [
            [0.5, 0.0, -0.5, 0.0, -0.5, 0.25, 1.0],  # S2 - S1
            [0.5, -1.0, 0.0, 0.25, 0.0, 0.0, 0.0],  # S3 - S2
        ],
        dtype=f32,
    )
    np.testing.assert_array_equal(traj.action, expected_action)
    assert traj.action.dtype == np.float32
    # proprio = state[k, :6] ++ 0 ++ state[k, -1:] for k = 1, 2.
    expected_proprio = np.array(
        [
            [1.0, 2.0, 3.0, 0.25, 0.5, 0.75, 0.0, 1.0],
            [1.5, 2.0, 2.5, 0.25, 0.0, 1.0, 0.0, 0.5],
        ],
        dtype=f32,
    )
    np.testing.assert_array_equal(traj.proprio, expected_proprio)
    assert traj.proprio.dtype == np.float32


def test_bridge_trailing_in_between_gripper_keeps_raw_last_value_of_dropped_step():
    # binarize runs over steps 1..3 ([1.0, 0.5, 0.6]); the scan's carry starts at the raw 0.6 of
    # step 3, which is then dropped -- but its value shows up at step 2.
    traj = oxe.bridge_orig_transform(_bridge_steps([0.0, 1.0, 0.5, 0.6]))
    np.testing.assert_array_equal(traj.action[:, 6], np.array([1.0, 0.6], f32))


def test_bridge_three_steps_gives_one():
    traj = oxe.bridge_orig_transform(_bridge_steps([0.0, 1.0, 1.0], state=[S0, S1, S2]))
    np.testing.assert_array_equal(traj.step_index, [1])
    np.testing.assert_array_equal(traj.action, [[0.5, 0.0, -0.5, 0.0, -0.5, 0.25, 1.0]])
    np.testing.assert_array_equal(traj.proprio, [[1.0, 2.0, 3.0, 0.25, 0.5, 0.75, 0.0, 1.0]])


def test_bridge_constant_state_gives_zero_deltas():
    state = np.tile(np.array(S1), (5, 1))
    traj = oxe.bridge_orig_transform(_bridge_steps([0.0, 1.0, 1.0, 0.0, 0.0], state=state))
    np.testing.assert_array_equal(traj.action[:, :6], np.zeros((3, 6), f32))
    np.testing.assert_array_equal(traj.action[:, 6], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(traj.step_index, [1, 2, 3])


def test_bridge_deltas_are_float32_arithmetic():
    # float64 sources are cast first: the delta is float32(0.3) - float32(0.1), not 0.3 - 0.1.
    state = np.zeros((3, 7))
    state[1, 0], state[2, 0] = 0.1, 0.3
    traj = oxe.bridge_orig_transform(_bridge_steps([0.0, 0.0, 0.0], state=state))
    assert traj.action[0, 0] == f32(0.3) - f32(0.1)


@pytest.mark.parametrize("t", [0, 1, 2])
def test_bridge_too_short_raises(t):
    with pytest.raises(TransformError, match=rf"expected at least 3 steps, got {t} for bridge_orig_transform; "):
        oxe.bridge_orig_transform(_bridge_steps([0.0] * t))


def test_bridge_missing_key_names_key_and_present_keys():
    steps = _bridge_steps([0.0, 1.0, 1.0])
    del steps["observation/state"]
    with pytest.raises(TransformError, match=r"'observation/state'.*\['action'\]"):
        oxe.bridge_orig_transform(steps)


def test_bridge_wrong_width_raises():
    steps = _bridge_steps([0.0, 1.0, 1.0])
    steps["observation/state"] = np.zeros((3, 6))
    with pytest.raises(TransformError, match=r"expected width 7, got shape \(3, 6\) for key 'observation/state'"):
        oxe.bridge_orig_transform(steps)


def test_bridge_mismatched_lengths_raise():
    steps = _bridge_steps([0.0, 1.0, 1.0, 1.0])
    steps["observation/state"] = steps["observation/state"][:3]
    with pytest.raises(TransformError, match="same number of steps"):
        oxe.bridge_orig_transform(steps)


def test_bridge_does_not_mutate_inputs():
    steps = _bridge_steps([0.0, 1.0, 0.5, 0.0])
    before = {k: v.copy() for k, v in steps.items()}
    oxe.bridge_orig_transform(steps)
    for k in steps:
        np.testing.assert_array_equal(steps[k], before[k])


# --- Other datasets ------------------------------------------------------------------------------
WV = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]]
RD = [[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6], [-0.7, -0.8, -0.9]]


def test_fractal():
    pose = np.arange(21, dtype=np.float64).reshape(3, 7)
    steps = {
        "action/world_vector": np.array(WV),
        "action/rotation_delta": np.array(RD),
        "action/gripper_closedness_action": np.array([[0.0], [1.0], [0.0]]),  # close at step 1
        "observation/base_pose_tool_reached": pose,
        "observation/gripper_closed": np.array([[0.0], [1.0], [1.0]]),
    }
    traj = oxe.fractal20220817_data_transform(steps)
    # rel2abs([0, 1, 0]): thr [0, -1, 0], start = +1 -> open, closed, closed.
    expected = np.concatenate([np.array(WV, f32), np.array(RD, f32), np.array([[1.0], [0.0], [0.0]], f32)], axis=1)
    np.testing.assert_array_equal(traj.action, expected)
    np.testing.assert_array_equal(traj.proprio, np.concatenate([pose, [[0.0], [1.0], [1.0]]], axis=1).astype(f32))
    np.testing.assert_array_equal(traj.step_index, [0, 1, 2])


def test_fractal_empty_episode_gives_empty_trajectory():
    steps = {
        "action/world_vector": np.zeros((0, 3)),
        "action/rotation_delta": np.zeros((0, 3)),
        "action/gripper_closedness_action": np.zeros((0, 1)),
        "observation/base_pose_tool_reached": np.zeros((0, 7)),
        "observation/gripper_closed": np.zeros((0, 1)),
    }
    traj = oxe.fractal20220817_data_transform(steps)
    assert traj.action.shape == (0, 7) and traj.proprio.shape == (0, 8) and traj.step_index.shape == (0,)


def test_taco_play():
    rel = np.array([[1, 2, 3, 4, 5, 6, -1.0], [7, 8, 9, 10, 11, 12, 1.0]])
    robot_obs = np.arange(30, dtype=np.float64).reshape(2, 15)
    traj = oxe.taco_play_transform({"action/rel_actions_world": rel, "observation/robot_obs": robot_obs})
    np.testing.assert_array_equal(traj.action, [[1, 2, 3, 4, 5, 6, 0.0], [7, 8, 9, 10, 11, 12, 1.0]])
    # robot_obs[:, :6] ++ 0 ++ robot_obs[:, 7:8]
    np.testing.assert_array_equal(traj.proprio, [[0, 1, 2, 3, 4, 5, 0, 7], [15, 16, 17, 18, 19, 20, 0, 22]])


def test_jaco_play_accepts_1d_gripper():
    eef = np.arange(21, dtype=np.float64).reshape(3, 7)
    steps = {
        "action/world_vector": np.array(WV),
        "action/gripper_closedness_action": np.array([0.0, 0.0, -1.0]),  # [T], open at step 2
        "observation/end_effector_cartesian_pos": eef,
    }
    traj = oxe.jaco_play_transform(steps)
    # rel2abs([0, 0, -1]): thr [0, 0, +1], start = -1 -> closed, closed, open.
    np.testing.assert_array_equal(traj.action[:, :3], np.array(WV, f32))
    np.testing.assert_array_equal(traj.action[:, 3:6], np.zeros((3, 3)))
    np.testing.assert_array_equal(traj.action[:, 6], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(traj.proprio, [[0, 1, 2, 3, 4, 5, 0, 6], [7, 8, 9, 10, 11, 12, 0, 13], [14, 15, 16, 17, 18, 19, 0, 20]])


def test_berkeley_cable_routing():
    robot_state = np.ones((3, 7))
    traj = oxe.berkeley_cable_routing_transform(
        {"action/world_vector": np.array(WV), "action/rotation_delta": np.array(RD), "observation/robot_state": robot_state}
    )
    np.testing.assert_array_equal(traj.action, np.concatenate([np.array(WV, f32), np.array(RD, f32), np.zeros((3, 1))], axis=1))
    np.testing.assert_array_equal(traj.proprio, [[1, 1, 1, 1, 1, 1, 1, 0]] * 3)


def test_roboturk_inverts_clipped_gripper_and_has_zero_proprio():
    g = np.array([[0.0], [1.0], [0.3], [2.0], [-1.0]])  # [T, 1]
    steps = {"action/world_vector": np.zeros((5, 3)), "action/rotation_delta": np.zeros((5, 3)), "action/gripper_closedness_action": g}
    traj = oxe.roboturk_transform(steps)
    # clip -> [0, 1, 0.3, 1, 0]; invert -> [1, 0, 1 - 0.3f, 0, 1]
    np.testing.assert_array_equal(traj.action[:, 6], np.array([1.0, 0.0, f32(1) - f32(0.3), 0.0, 1.0], f32))
    np.testing.assert_array_equal(traj.proprio, np.zeros((5, 8), f32))


def test_viola():
    steps = {
        "action/world_vector": np.array(WV),
        "action/rotation_delta": np.array(RD),
        "action/gripper_closedness_action": np.array([1.0, 0.0, -1.0]),  # [T]; 1 = closed
        "observation/joint_states": np.full((3, 7), 2.0),
        "observation/gripper_states": np.array([[0.01]] * 3),  # (1,) per step, as viola's features.json stores it
    }
    traj = oxe.viola_transform(steps)
    np.testing.assert_array_equal(traj.action[:, 6], [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(traj.action[:, :6], np.concatenate([np.array(WV, f32), np.array(RD, f32)], axis=1))
    np.testing.assert_array_equal(traj.proprio, np.array([[2.0] * 7 + [0.01]] * 3, f32))


def test_viola_rejects_the_two_wide_gripper_state_it_used_to_expect():
    steps = {
        "action/world_vector": np.array(WV),
        "action/rotation_delta": np.array(RD),
        "action/gripper_closedness_action": np.array([1.0, 0.0, -1.0]),
        "observation/joint_states": np.full((3, 7), 2.0),
        "observation/gripper_states": np.array([[0.01, -0.01]] * 3),
    }
    with pytest.raises(TransformError, match=r"expected width 1, got shape \(3, 2\) for key 'observation/gripper_states'"):
        oxe.viola_transform(steps)


def test_toto_bool_gripper():
    steps = {
        "action/world_vector": np.array(WV),
        "action/rotation_delta": np.array(RD),
        "action/open_gripper": np.array([True, False, True]),
        "observation/state": np.full((3, 7), 0.5),
    }
    traj = oxe.toto_transform(steps)
    np.testing.assert_array_equal(traj.action[:, 6], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(traj.proprio, [[0.5] * 7 + [0.0]] * 3)


def test_language_table():
    steps = {"action": np.array([[0.5, -0.25], [0.0, 1.0]]), "observation/effector_translation": np.array([[1.0, 2.0], [3.0, 4.0]])}
    traj = oxe.language_table_transform(steps)
    np.testing.assert_array_equal(traj.action, [[0.5, -0.25, 0, 0, 0, 0, 1], [0.0, 1.0, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(traj.proprio, [[1, 2, 0, 0, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0, 0]])


def test_non_numeric_key_raises_transform_error():
    steps = {"action": np.array([["a", "b"]]), "observation/effector_translation": np.zeros((1, 2))}
    with pytest.raises(TransformError, match="expected numeric values"):
        oxe.language_table_transform(steps)


def test_3d_key_raises():
    steps = {"action": np.zeros((2, 2, 1)), "observation/effector_translation": np.zeros((2, 2))}
    with pytest.raises(TransformError, match=r"expected \[T\] or \[T, W\] array, got shape \(2, 2, 1\) for key 'action'"):
        oxe.language_table_transform(steps)
