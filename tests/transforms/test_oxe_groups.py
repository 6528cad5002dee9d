"""The OXE transforms added for every OpenVLA dataset, against values worked out by hand from OpenVLA's
``oxe/transforms.py`` (one or two representative datasets per recurring pattern), and the zero-step rules."""

import pickle
import zlib

import numpy as np
import pytest

from vlaprep.transforms import droid, libero, oxe, oxe_converted
from vlaprep.transforms.base import EmptyTrajectoryError, Trajectory, TransformError
from vlaprep.transforms.registry import REGISTRY

f32 = np.float32


def _cols(*rows):
    return np.array(rows, dtype=np.float64)


# --- Bridge as released in OXE -----------------------------------------------------------------------
def test_bridge_oxe_drops_first_relabels_and_keeps_open_gripper_of_kept_steps():
    state = _cols([9, 9, 9, 9, 9, 9, 0.5], [1, 2, 3, 0.25, 0.5, 0.75, 1], [1.5, 2, 2.5, 0.25, 0, 1, 0.5],
                  [2, 1, 2.5, 0.5, 0, 1, 0])
    steps = {
        "action/world_vector": np.full((4, 3), 7.0),
        "action/rotation_delta": np.full((4, 3), 7.0),
        "action/open_gripper": np.array([False, True, False, True]),
        "observation/state": state,
    }
    traj = oxe.bridge_oxe_transform(steps)
    np.testing.assert_array_equal(traj.step_index, [1, 2])
    np.testing.assert_array_equal(traj.action, [[0.5, 0, -0.5, 0, -0.5, 0.25, 1.0], [0.5, -1, 0, 0.25, 0, 0, 0.0]])
    np.testing.assert_array_equal(traj.proprio, [[1, 2, 3, 0.25, 0.5, 0.75, 0, 1], [1.5, 2, 2.5, 0.25, 0, 1, 0, 0.5]])


@pytest.mark.parametrize("t", [0, 1, 2])
def test_bridge_oxe_short_episodes_are_empty_trajectories_openvla_counts(t):
    steps = {"action/world_vector": np.zeros((t, 3)), "action/rotation_delta": np.zeros((t, 3)),
             "action/open_gripper": np.zeros(t, bool), "observation/state": np.zeros((t, 7))}
    with pytest.raises(EmptyTrajectoryError, match=rf"expected at least 3 steps, got {t} for bridge_oxe_transform") as info:
        oxe.bridge_oxe_transform(steps)
    assert info.value.trajectory.action.shape == (0, 7) and info.value.trajectory.proprio.shape == (0, 8)


def test_bridge_orig_two_steps_is_empty_one_step_fails():
    steps = {"action": np.zeros((2, 7)), "observation/state": np.zeros((2, 7))}
    with pytest.raises(EmptyTrajectoryError, match="expected at least 3 steps, got 2 for bridge_orig_transform; "):
        oxe.bridge_orig_transform(steps)
    one = {"action": np.zeros((1, 7)), "observation/state": np.zeros((1, 7))}
    with pytest.raises(TransformError, match="binarize_gripper_actions fails") as info:
        oxe.bridge_orig_transform(one)
    assert not isinstance(info.value, EmptyTrajectoryError)


def test_empty_trajectory_error_pickles_with_its_trajectory():
    empty = Trajectory(np.zeros((0, 7), f32), np.zeros((0, 8), f32), np.zeros(0, np.int64))
    e = pickle.loads(pickle.dumps(EmptyTrajectoryError("expected x, got y", empty)))
    assert str(e) == "expected x, got y" and e.trajectory.action.shape == (0, 7)


def test_zero_steps_where_openvla_fails_return_a_trajectory_that_is_not_counted():
    """rel2abs / binarize index into the column in OpenVLA: a 0-step episode is returned (quarantined by
    pipelines, "expected at least one step"), not an EmptyTrajectoryError (counted)."""
    spec = REGISTRY["tdroid_carrot_in_bowl"]
    traj = spec.transform({k: np.zeros((0, *s)) for k, s in spec.step_shapes})
    assert traj.num_steps == 0 and traj.proprio.shape == (0, 8)
    taco = REGISTRY["taco_play"]
    with pytest.raises(EmptyTrajectoryError):  # slices only: OpenVLA keeps the empty trajectory
        taco.transform({k: np.zeros((0, *s)) for k, s in taco.step_shapes})


# --- RT-X dict layouts -------------------------------------------------------------------------------
def test_kuka_decodes_zlib_state_like_tf_decode_compressed():
    pose = np.arange(14, dtype=f32).reshape(2, 7) / 4
    closed = np.array([[0.0], [1.0]], f32)
    steps = {
        "action/world_vector": np.ones((2, 3)),
        "action/rotation_delta": np.ones((2, 3)),
        "action/gripper_closedness_action": np.array([[0.0], [1.0]]),  # close at step 1, so start open
        "observation/clip_function_input/base_pose_tool_reached": np.array([zlib.compress(r.tobytes()) for r in pose], object),
        "observation/gripper_closed": np.array([zlib.compress(r.tobytes()) for r in closed], object),
    }
    traj = oxe.kuka_transform(steps)
    np.testing.assert_array_equal(traj.proprio, np.concatenate([pose, closed], axis=1))
    np.testing.assert_array_equal(traj.action[:, 6], [1.0, 0.0])
    decoded = dict(steps, **{"observation/clip_function_input/base_pose_tool_reached": pose, "observation/gripper_closed": closed})
    np.testing.assert_array_equal(oxe.kuka_transform(decoded).proprio, traj.proprio)  # a reader may decode first
    bad = dict(steps, **{"observation/gripper_closed": np.array([b"not zlib", b"x"], object)})
    with pytest.raises(TransformError, match="expected ZLIB-compressed float32 bytes"):
        oxe.kuka_transform(bad)


def test_berkeley_autolab_ur5_state_slice_and_scalar_rel2abs():
    robot_state = np.arange(30, dtype=np.float64).reshape(2, 15)
    steps = {"action/world_vector": np.zeros((2, 3)), "action/rotation_delta": np.zeros((2, 3)),
             "action/gripper_closedness_action": np.array([-1.0, 0.0]),  # [T]: open command, then none
             "observation/robot_state": robot_state}
    traj = oxe.berkeley_autolab_ur5_transform(steps)
    np.testing.assert_array_equal(traj.action[:, 6], [1.0, 1.0])
    np.testing.assert_array_equal(traj.proprio, robot_state[:, 6:14])


def test_bc_z_first_future_step_and_inverted_target_close():
    steps = {
        "action/future/xyz_residual": np.arange(60, dtype=np.float64).reshape(2, 30),
        "action/future/axis_angle_residual": -np.arange(60, dtype=np.float64).reshape(2, 30),
        "action/future/target_close": np.array([[1] + [0] * 9, [0] + [1] * 9], np.int64),
        "observation/present/xyz": np.ones((2, 3)),
        "observation/present/axis_angle": np.full((2, 3), 2.0),
        "observation/present/sensed_close": np.array([[0.25], [0.75]]),
    }
    traj = oxe.bc_z_transform(steps)
    np.testing.assert_array_equal(traj.action, [[0, 1, 2, 0, -1, -2, 0.0], [30, 31, 32, -30, -31, -32, 1.0]])
    np.testing.assert_array_equal(traj.proprio, [[1, 1, 1, 2, 2, 2, 0, 0.25], [1, 1, 1, 2, 2, 2, 0, 0.75]])


def test_columbia_pusht_keeps_gripper_and_pads_2d_state():
    steps = {"action/world_vector": np.zeros((1, 3)), "action/rotation_delta": np.zeros((1, 3)),
             "action/gripper_closedness_action": np.array([0.3]), "observation/robot_state": np.array([[4.0, 5.0]])}
    traj = oxe.columbia_pusht_transform(steps)
    assert traj.action[0, 6] == f32(0.3)
    np.testing.assert_array_equal(traj.proprio, [[4, 5, 0, 0, 0, 0, 0, 0]])


# --- Converted datasets: slices, zero insertion, gripper conventions -------------------------------
def test_stanford_hydra_inverts_without_clip_and_picks_state_columns():
    state = np.arange(27, dtype=np.float64)[None].repeat(2, 0)
    steps = {"action": _cols([1, 2, 3, 4, 5, 6, 1.5], [1, 2, 3, 4, 5, 6, -0.5]), "observation/state": state}
    traj = oxe_converted.stanford_hydra_transform(steps)
    np.testing.assert_array_equal(traj.action[:, 6], [f32(1) - f32(1.5), f32(1) - f32(-0.5)])  # no clip
    np.testing.assert_array_equal(traj.proprio[0], [0, 1, 2, 7, 8, 9, 0, 24])  # state[:3], [7:10], pad, [-3:-2]


@pytest.mark.parametrize("g, want", [(-1.0, 1.0), (0.0, 1.0), (0.3, f32(1) - f32(0.3)), (1.0, 0.0), (2.0, 0.0)])
def test_invert_clip_family(g, want):
    a = np.array([[0, 0, 0, 0, 0, 0, g]])
    for fn, state in ((oxe_converted.austin_buds_transform, np.zeros((1, 24))),
                      (oxe_converted.utaustin_mutex_transform, np.zeros((1, 24))),
                      (libero.libero_transform, np.zeros((1, 8)))):
        assert fn({"action": a, "observation/state": state}).action[0, 6] == f32(want)


def test_nyu_franka_play_slices_the_15_wide_action():
    a = np.arange(15, dtype=np.float64)[None]
    traj = oxe_converted.nyu_franka_play_transform({"action": a, "observation/state": np.arange(13.0)[None]})
    np.testing.assert_array_equal(traj.action, [[7, 8, 9, 10, 11, 12, 1.0]])  # [-8:-2], clip([-2:-1]) = clip(13)
    np.testing.assert_array_equal(traj.proprio, [[7, 8, 9, 10, 11, 12, 0, 0]])  # state[-6:], 2 pads


def test_xarm_bimanual_keeps_the_last_seven_dims():
    a = np.arange(14, dtype=np.float64)[None]
    traj = oxe_converted.utokyo_xarm_bimanual_transform({"action": a, "observation/pose_r": np.ones((1, 6))})
    np.testing.assert_array_equal(traj.action, [[7, 8, 9, 10, 11, 12, 13]])
    np.testing.assert_array_equal(traj.proprio, [[1, 1, 1, 1, 1, 1, 0, 0]])


def test_berkeley_fanuc_gripper_action_is_the_inverted_observed_gripper():
    state = np.zeros((2, 13))
    state[:, 6] = [0.0, 1.0]
    traj = oxe_converted.berkeley_fanuc_transform({"action": np.ones((2, 6)), "observation/state": state})
    np.testing.assert_array_equal(traj.action[:, 6], [1.0, 0.0])
    np.testing.assert_array_equal(traj.proprio[:, 6:], [[0, 0.0], [0, 1.0]])  # pad, gripper_state


def test_zero_insertion_datasets():
    ucsd = oxe_converted.ucsd_pick_and_place_transform({"action": _cols([1, 2, 3, 0.5]), "observation/state": np.arange(7.0)[None]})
    np.testing.assert_array_equal(ucsd.action, [[1, 2, 3, 0, 0, 0, 0.5]])
    np.testing.assert_array_equal(ucsd.proprio, [[0, 1, 2, 3, 4, 5, 0, 6]])
    mask = oxe_converted.stanford_mask_vit_transform(
        {"action": _cols([1, 2, 3, 4, 0.5]), "observation/end_effector_pose": _cols([5, 6, 7, 8, 9])})
    np.testing.assert_array_equal(mask.action, [[1, 2, 3, 4, 0, 0, 0.5]])
    np.testing.assert_array_equal(mask.proprio, [[5, 6, 7, 8, 0, 0, 0, 9]])
    uiuc = oxe_converted.uiuc_d3field_transform({"action": _cols([1, 2, 3])})
    np.testing.assert_array_equal(uiuc.action, [[1, 2, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(uiuc.proprio, np.zeros((1, 8)))
    kaist = oxe_converted.kaist_nonprehensile_transform({"action": np.arange(20.0)[None], "observation/state": np.arange(21.0)[None]})
    np.testing.assert_array_equal(kaist.action, [[0, 1, 2, 3, 4, 5, 0]])
    np.testing.assert_array_equal(kaist.proprio, [[14, 15, 16, 17, 18, 19, 20, 0]])


def test_gnm_pads_planar_action_and_builds_state_from_position_and_yaw():
    steps = {"action": np.array([[0.1, -0.2]]), "observation/position": np.array([[3.0, 4.0]]),
             "observation/yaw": np.array([[0.7]])}
    traj = oxe_converted.gnm_transform(steps)
    np.testing.assert_array_equal(traj.action, [[f32(0.1), f32(-0.2), 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(traj.proprio, [[3, 4, 0, 0, 0, f32(0.7), 0, 0]])


def test_robo_net_width_comes_from_the_data():
    traj = oxe_converted.robo_net_transform({"action": _cols([1, 2, 3, 4, 5]), "observation/state": _cols([6, 7, 8, 9, 10])})
    np.testing.assert_array_equal(traj.action, [[1, 2, 3, 4, 0, 0, 5]])
    np.testing.assert_array_equal(traj.proprio, [[6, 7, 8, 9, 0, 0, 0, 10]])
    with pytest.raises(TransformError, match="expected at least 5 columns, got shape \\(1, 3\\) for key 'action'"):
        oxe_converted.robo_net_transform({"action": _cols([1, 2, 3]), "observation/state": _cols([6, 7, 8, 9, 10])})


def test_joint_pos_datasets_keep_their_eight_dims_and_bool_gripper_column():
    traj = oxe_converted.berkeley_mvp_transform(
        {"action": np.arange(8.0)[None], "observation/pose": np.ones((1, 7)), "observation/gripper": np.array([True])})
    np.testing.assert_array_equal(traj.action, [np.arange(8.0)])
    np.testing.assert_array_equal(traj.proprio, [[1, 1, 1, 1, 1, 1, 1, 1.0]])
    roboset = oxe_converted.roboset_transform({"action": _cols([0, 1, 2, 3, 4, 5, 6, -1]), "observation/state": np.ones((1, 8))})
    assert roboset.action[0, 7] == 1.0  # invert(clip(-1, 0, 1))
    for name in ("berkeley_mvp_converted_externally_to_rlds", "berkeley_rpt_converted_externally_to_rlds", "roboset"):
        assert not REGISTRY[name].openvla_trainable and REGISTRY[name].action_dim == 8


def test_rh20t_and_fmb_proprio():
    rh = oxe_converted.rh20t_transform({"action/tcp_base": np.ones((1, 6)), "action/gripper": np.array([1], np.int64),
                                        "observation/tcp_base": np.full((1, 6), 2.0), "observation/gripper_width": np.array([0.04])})
    np.testing.assert_array_equal(rh.action, [[1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(rh.proprio, [[2, 2, 2, 2, 2, 2, f32(0.04)]])
    fmb = oxe_converted.fmb_transform({"action": np.zeros((1, 7)), "observation/eef_pose": np.ones((1, 7)),
                                       "observation/state_gripper_pose": np.array([0.5])})
    np.testing.assert_array_equal(fmb.proprio, [[1, 1, 1, 1, 1, 1, 1, 0.5]])


# --- DROID family ------------------------------------------------------------------------------------
def test_droid_gripper_is_inverted_in_float64_before_the_float32_cast():
    g = 0.987654321  # float32(1 - g) != 1 - float32(g)
    assert f32(1.0 - g) != f32(1) - f32(g)
    steps = {"action_dict/cartesian_velocity": np.arange(6, dtype=np.float64)[None] / 10,
             "action_dict/gripper_position": np.array([[g]]), "observation/cartesian_position": np.ones((1, 6)),
             "observation/gripper_position": np.array([[g]])}
    traj = droid.droid_transform(steps)
    assert traj.action[0, 6] == f32(1.0 - g)
    np.testing.assert_array_equal(traj.action[0, :6], (np.arange(6) / 10).astype(f32))
    np.testing.assert_array_equal(traj.proprio, [[1, 1, 1, 1, 1, 1, f32(g)]])
    np.testing.assert_array_equal(droid.droid_wipe_transform(steps).action, traj.action)


def test_tdroid_binarizes_and_builds_bridge_like_proprio():
    a = np.zeros((3, 7))
    a[:, 6] = [0.5, 1.0, 0.0]
    steps = {"action": a, "observation/cartesian_position": np.arange(6.0)[None].repeat(3, 0),
             "observation/gripper_position": np.array([[0.2], [0.3], [0.4]])}
    traj = droid.tdroid_transform(steps)
    np.testing.assert_array_equal(traj.action[:, 6], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(traj.proprio[0], [0, 1, 2, 3, 4, 5, 0, f32(0.2)])


def test_libero_two_finger_gripper_state():
    state = np.arange(8.0)[None]
    traj = libero.libero_transform({"action": np.zeros((1, 7)), "observation/state": state})
    np.testing.assert_array_equal(traj.proprio, state)  # state[:6] ++ state[-2:]
