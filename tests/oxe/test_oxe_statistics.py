"""Every registered OXE dataset, end to end: synthetic data in its real layout -> vlaprep's statistics,
against an independent expectation written here from OpenVLA's rules.

The expectation reads the generated TFRecords as OpenVLA does (``builder.as_dataset(split="all",
decoders={"steps": SkipDecoding()})``, dlimp's ``from_rlds``: images and ZLIB tensors stay bytes), applies
per dataset a NumPy restatement of OpenVLA's ``oxe/transforms.py`` function (gripper scans as the loops
their ``tf.scan`` performs, ZLIB and quaternions with TensorFlow's own ops), concatenates
``state_obs_keys`` as ``make_dataset_from_rlds.restructure`` does, and computes the statistics:
mean / std exactly (rationals), min / max, q01 / q99 by the NumPy 1.x rule of openvla.md section 1.

vlaprep runs ONE statistics job over all datasets (``run_stats``, proprio on). What is exact: every
number of every dataset, except the three Euler columns of the quaternion datasets (furniture_bench,
iamlab_cmu_pickup_insert, cmu_playing_with_food), which match within 4 float32 ulps (``rotation.py``).

Two cases have tests of their own:
  * ``test_empty_trajectories_count_in_num_trajectories`` -- OpenVLA counts an episode that
    standardizes to zero steps (2-step Bridge; 0..2-step bridge_oxe) in ``num_trajectories``;
  * ``test_nested_feature_keys_kuka_bc_z`` -- kuka's ``clip_function_input/base_pose_tool_reached`` and
    bc_z's ``future/...`` are FeaturesDict keys holding '/'.
"""

from __future__ import annotations

import decimal
import math
import time
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.synthetic.layouts import generate_layout_rlds
from vlaprep.transforms.base import EmptyTrajectoryError, TransformError
from vlaprep.transforms.registry import REGISTRY

IN_PROCESS = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]
EPISODES = 6  # 1, 2, 3, 7, 8, 4 steps; the last two in the second split when the dataset has one
NESTED_KEY_DATASETS = ("kuka", "bc_z")  # need the sources.py change (see the module doc)
QUATERNION_DATASETS = (
    "furniture_bench_dataset_converted_externally_to_rlds",
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds",
    "cmu_playing_with_food",
)
EULER_ULPS = 4
f32 = np.float32


# ==================================================================================================
# OpenVLA's rules, restated in NumPy (independent of vlaprep.transforms)
# ==================================================================================================
class OpenVLAFails(Exception):
    """OpenVLA's own graph raises on this trajectory (its statistics job would stop)."""


def binarize(a):
    """``binarize_gripper_actions``: reverse tf.scan, carry seeded with the raw last value."""
    a = np.asarray(a, f32)
    if a.size == 0:
        raise OpenVLAFails("binarize_gripper_actions indexes actions[-1] of an empty column")
    out, carry = np.empty_like(a), a[-1]
    for i in range(len(a) - 1, -1, -1):
        if a[i] > f32(0.95):
            carry = f32(1.0)
        elif a[i] < f32(0.05):
            carry = f32(0.0)
        out[i] = carry
    return out


def rel2abs(a):
    """``rel2abs_gripper_actions``: +1 below -0.1 (open), -1 above 0.1 (close), forward carry."""
    a = np.asarray(a, f32)
    thr = [1 if v < f32(-0.1) else -1 if v > f32(0.1) else 0 for v in a]
    if not thr:
        raise OpenVLAFails("rel2abs_gripper_actions takes argmax of an empty column")
    first = next((v for v in thr if v != 0), 0)
    carry = -first if first else 1
    out = []
    for v in thr:
        carry = v if v else carry
        out.append(carry)
    return np.asarray(out, f32) / f32(2) + f32(0.5)


def invert(a):
    return f32(1.0) - np.asarray(a, f32)


def clip01(a):
    return np.clip(np.asarray(a, f32), f32(0.0), f32(1.0))


def tf_euler(q):
    """tensorflow_graphics ``euler.from_quaternion`` with TensorFlow's float32 kernels (x, y, z, w)."""
    q = tf.constant(np.asarray(q, f32))
    eps = 2.0 * np.finfo(np.float32).eps

    def shrink(v):
        return v * (1.0 - tf.constant(eps, tf.float32))

    def sign(v):
        return tf.where(v >= 0.0, tf.ones_like(v), -tf.ones_like(v))

    x, y, z, w = tf.unstack(q, axis=-1)
    tx, ty, tz = shrink(2.0 * x), shrink(2.0 * y), shrink(2.0 * z)
    twx, twy, twz, txx, txy, txz, tyy, tyz, tzz = tx * w, ty * w, tz * w, tx * x, ty * x, tz * x, ty * y, tz * y, tz * z
    r00, r10, r21 = shrink(1.0 - (tyy + tzz)), shrink(txy + twz), shrink(tyz + twx)
    r22, r20 = shrink(1.0 - (txx + tyy)), shrink(txz - twy)
    r01, r02 = shrink(txy - twz), shrink(txz + twy)
    theta_y = -tf.asin(r20)
    s = sign(tf.cos(theta_y))
    general = tf.stack((tf.atan2(r21 * s, (sign(r22) * eps + r22) * s), theta_y,
                        tf.atan2(r10 * s, (sign(r00) * eps + r00) * s)), axis=-1)
    s20 = sign(r20)
    gimbal = tf.stack((tf.atan2(-s20 * r01, -s20 * (sign(r02) * eps + r02)),
                       -s20 * tf.constant(math.pi / 2.0, tf.float32), tf.zeros_like(r20)), axis=-1)
    lock = tf.less(tf.abs(tf.abs(r20) - 1.0), 1.0e-6)
    return tf.where(tf.stack((lock, lock, lock), axis=-1), gimbal, general).numpy()


def tf_zlib(values, width):
    """kuka: ``tf.io.decode_compressed(ZLIB)`` + ``decode_raw(float32)`` + ``reshape(-1, width)``."""
    raw = tf.io.decode_raw(tf.io.decode_compressed(tf.constant(values), compression_type="ZLIB"), tf.float32)
    return tf.reshape(raw, (-1, width)).numpy()


def cat(*parts):
    return np.concatenate([p[:, None] if p.ndim == 1 else p for p in parts], axis=-1)


def zeros_like_cols(a, n):
    return np.zeros((a.shape[0], n), a.dtype)


# Each reference standardize fn: (s = flat step keys -> arrays, o = observation dict) -> (action, o).
def ref_bridge_common(s, o, action):
    """relabel_bridge_actions after the first step of every key was dropped."""
    state = o["state"]
    movement = state[1:, :6] - state[:-1, :6]
    o = {k: v[:-1] for k, v in o.items()}
    action = cat(movement, action[:-1, -1:])
    o["EEF_state"], o["gripper_state"] = o["state"][:, :6], o["state"][:, -1:]
    return action, o


def ref_bridge_oxe(s, o):
    s = {k: v[1:] for k, v in s.items()}
    o = {k: v[1:] for k, v in o.items()}
    action = cat(s["action/world_vector"], s["action/rotation_delta"], s["action/open_gripper"].astype(f32))
    return ref_bridge_common(s, o, action)


def ref_bridge_orig(s, o):
    s = {k: v[1:] for k, v in s.items()}
    o = {k: v[1:] for k, v in o.items()}
    a = s["action"]
    action = cat(a[:, :6], binarize(a[:, -1]))
    return ref_bridge_common(s, o, action)


def ref_rt1(s, o):  # rt1, nyu_door_opening
    g = rel2abs(s["action/gripper_closedness_action"][:, 0])
    return cat(s["action/world_vector"], s["action/rotation_delta"], g), o


def ref_kuka(s, o):
    action, o = ref_rt1(s, o)
    o["clip_function_input/base_pose_tool_reached"] = tf_zlib(o["clip_function_input/base_pose_tool_reached"], 7)
    o["gripper_closed"] = tf_zlib(o["gripper_closed"], 1)
    return action, o


def ref_taco(s, o):
    o["state_eef"], o["state_gripper"] = o["robot_obs"][:, :6], o["robot_obs"][:, 7:8]
    a = s["action/rel_actions_world"]
    return cat(a[:, :6], clip01(a[:, -1:])), o


def ref_jaco(s, o):
    e = o["end_effector_cartesian_pos"]
    o["state_eef"], o["state_gripper"] = e[:, :6], e[:, -1:]
    g = rel2abs(s["action/gripper_closedness_action"][:, 0])
    wv = s["action/world_vector"]
    return cat(wv, np.zeros_like(wv), g), o


def ref_cable(s, o):
    wv = s["action/world_vector"]
    return cat(wv, s["action/rotation_delta"], np.zeros_like(wv[:, :1])), o


def ref_roboturk(s, o):
    g = invert(clip01(s["action/gripper_closedness_action"]))
    return cat(s["action/world_vector"], s["action/rotation_delta"], g), o


def ref_viola(s, o):
    g = invert(clip01(s["action/gripper_closedness_action"][:, None]))
    return cat(s["action/world_vector"], s["action/rotation_delta"], g), o


def ref_autolab(s, o):
    o["state"] = o["robot_state"][:, 6:14]
    g = rel2abs(s["action/gripper_closedness_action"])
    return cat(s["action/world_vector"], s["action/rotation_delta"], g), o


def ref_toto(s, o):
    return cat(s["action/world_vector"], s["action/rotation_delta"], s["action/open_gripper"].astype(f32)), o


def ref_language_table(s, o):
    a = s["action"]
    return cat(a, np.zeros_like(a), np.zeros_like(a), np.ones_like(a[:, :1])), o


def ref_pusht(s, o):
    return cat(s["action/world_vector"], s["action/rotation_delta"], s["action/gripper_closedness_action"]), o


def ref_stanford_kuka(s, o):
    a = s["action"]
    return cat(a[:, :3], np.zeros_like(a[:, :3]), a[:, -1:]), o


def ref_eef6_grip_last(o):
    o["eef_state"], o["gripper_state"] = o["state"][:, :6], o["state"][:, -1:]


def ref_nyu_rot(s, o):
    ref_eef6_grip_last(o)
    return s["action"][:, :7], o


def ref_hydra(s, o):
    a, st = s["action"], o["state"]
    o["eef_state"] = cat(st[:, :3], st[:, 7:10])
    o["gripper_state"] = st[:, -3:-2]
    return cat(a[:, :6], invert(a[:, -1:])), o


def ref_six_invert_clip(s, o):  # austin_buds, austin_sailor, austin_sirius, utaustin_mutex
    a = s["action"]
    if "state" in o:
        o["state"] = o["state"][:, :8]
    return cat(a[:, :6], invert(clip01(a[:, -1:]))), o


def ref_nyu_franka(s, o):
    o["eef_state"] = o["state"][:, -6:]
    a = s["action"]
    return cat(a[:, -8:-2], clip01(a[:, -2:-1])), o


def ref_maniskill(s, o):
    o["gripper_state"] = o["state"][:, 7:8]
    return s["action"], o


def ref_furniture(s, o):
    o["state"] = cat(o["state"][:, :7], o["state"][:, -1:])
    a = s["action"]
    return cat(a[:, :3], tf_euler(a[:, 3:7]), invert(clip01(a[:, -1:]))), o


def ref_drop_last(s, o):  # cmu_franka_exploration, imperialcollege
    return s["action"][:, :-1], o


def ref_ucsd_kitchen(s, o):
    o["joint_state"] = o["state"][:, :7]
    return s["action"][:, :-1], o


def ref_ucsd_pick(s, o):
    ref_eef6_grip_last(o)
    a = s["action"]
    return cat(a[:, :3], np.zeros_like(a[:, :3]), a[:, -1:]), o


def ref_bc_z(s, o):
    close = s["action/future/target_close"][:, :1].astype(f32)
    return cat(s["action/future/xyz_residual"][:, :3], s["action/future/axis_angle_residual"][:, :3], invert(close)), o


def ref_pr2(s, o):
    ref_eef6_grip_last(o)
    return s["action"][:, :-1], o


def ref_identity(s, o):
    return s["action"], o


def ref_bimanual(s, o):
    return s["action"][:, -7:], o


def ref_robo_net(s, o):
    st, a = o["state"], s["action"]
    o["eef_state"] = cat(st[:, :4], np.zeros_like(st[:, :2]))
    o["gripper_state"] = st[:, -1:]
    return cat(a[:, :4], np.zeros_like(a[:, :2]), a[:, -1:]), o


def ref_kaist(s, o):
    o["state"] = o["state"][:, -7:]
    a = s["action"]
    return cat(a[:, :6], np.zeros_like(a[:, :1])), o


def ref_mask_vit(s, o):
    p, a = o["end_effector_pose"], s["action"]
    o["eef_state"] = cat(p[:, :4], np.zeros_like(p[:, :2]))
    o["gripper_state"] = p[:, -1:]
    return cat(a[:, :4], np.zeros_like(a[:, :2]), a[:, -1:]), o


def ref_lsmo(s, o):  # tokyo_u_lsmo, stanford_robocook
    ref_eef6_grip_last(o)
    return s["action"], o


def ref_sara_grid(s, o):
    o["state"] = o["state"][:, :6]
    return s["action"], o


def ref_edan(s, o):
    a = s["action"]
    return cat(a[:, :6], invert(a[:, -1:])), o


def ref_asu(s, o):
    o["eef_state"] = s["ground_truth_states/EE"]
    o["gripper_state"] = o["state"][:, -1:]
    return s["action"], o


def ref_iamlab(s, o):
    o["joint_state"], o["gripper_state"] = o["state"][:, :7], o["state"][:, 7:8]
    a = s["action"]
    return cat(a[:, :3], tf_euler(a[:, 3:7]), a[:, 7:8]), o


def ref_uiuc(s, o):
    a = s["action"]
    return cat(a, np.zeros_like(a), np.zeros_like(a[:, :1])), o


def ref_fanuc(s, o):
    o["joint_state"], o["gripper_state"] = o["state"][:, :6], o["state"][:, 6:7]
    return cat(s["action"], invert(o["gripper_state"])), o


def ref_food(s, o):
    a = s["action"]
    return cat(a[:, :3], tf_euler(a[:, 3:7]), a[:, -1:]), o


def ref_play_fusion(s, o):
    a = s["action"]
    return cat(a[:, :3], a[:, -4:]), o


def ref_stretch(s, o):
    st = o["state"]
    o["eef_state"] = cat(st[:, :3], np.zeros_like(st[:, :3]))
    o["gripper_state"] = st[:, -1:]
    return s["action"][:, :-1], o


def ref_gnm(s, o):
    o["state"] = cat(o["position"], np.zeros_like(o["state"][:, :3]), o["yaw"])
    a = s["action"]
    return cat(a, np.zeros_like(a), np.zeros_like(a), np.zeros_like(a[:, :1])), o


def ref_droid(s, o):  # droid_baseact_transform and droid_finetuning_transform (float64 arithmetic)
    cv = s["action_dict/cartesian_velocity"]
    action = cat(cv[:, :3], cv[:, 3:6], 1 - s["action_dict/gripper_position"])
    o["proprio"] = cat(o["cartesian_position"], o["gripper_position"])
    return action, o


def ref_fmb(s, o):
    o["proprio"] = cat(o["eef_pose"], o["state_gripper_pose"][..., None])
    return s["action"], o


def ref_dobbe(s, o):
    o["proprio"] = o["state"]
    return s["action"], o


def ref_roboset(s, o):
    o["proprio"] = o["state"]
    a = s["action"]
    return cat(a[:, :7], invert(clip01(a[:, -1:]))), o


def ref_rh20t(s, o):
    o["proprio"] = cat(o["tcp_base"], o["gripper_width"][..., None])
    return cat(s["action/tcp_base"], s["action/gripper"].astype(f32)), o


def ref_tdroid(s, o):
    a = s["action"]
    o["EEF_state"], o["gripper_state"] = o["cartesian_position"][:, :6], o["gripper_position"][:, -1:]
    return cat(a[:, :6], binarize(a[:, -1])), o


def ref_libero(s, o):
    a = s["action"]
    o["EEF_state"], o["gripper_state"] = o["state"][:, :6], o["state"][:, -2:]
    return cat(a[:, :6], invert(clip01(a[:, -1:]))), o


EEF = ["eef_state", None, "gripper_state"]
NONE8 = [None] * 8
# OpenVLA's OXE_DATASET_CONFIGS: (standardize fn, state_obs_keys, action width).
OPENVLA = {
    "fractal20220817_data": (ref_rt1, ["base_pose_tool_reached", "gripper_closed"]),
    "kuka": (ref_kuka, ["clip_function_input/base_pose_tool_reached", "gripper_closed"]),
    "bridge_oxe": (ref_bridge_oxe, ["EEF_state", None, "gripper_state"]),
    "bridge_orig": (ref_bridge_orig, ["EEF_state", None, "gripper_state"]),
    "bridge_dataset": (ref_bridge_orig, ["EEF_state", None, "gripper_state"]),
    "taco_play": (ref_taco, ["state_eef", None, "state_gripper"]),
    "jaco_play": (ref_jaco, ["state_eef", None, "state_gripper"]),
    "berkeley_cable_routing": (ref_cable, ["robot_state", None]),
    "roboturk": (ref_roboturk, NONE8),
    "nyu_door_opening_surprising_effectiveness": (ref_rt1, NONE8),
    "viola": (ref_viola, ["joint_states", "gripper_states"]),
    "berkeley_autolab_ur5": (ref_autolab, ["state"]),
    "toto": (ref_toto, ["state", None]),
    "language_table": (ref_language_table, ["effector_translation", None, None, None, None, None, None]),
    "columbia_cairlab_pusht_real": (ref_pusht, ["robot_state", None, None, None, None, None, None]),
    "stanford_kuka_multimodal_dataset_converted_externally_to_rlds": (ref_stanford_kuka, ["ee_position", "ee_orientation", None]),
    "nyu_rot_dataset_converted_externally_to_rlds": (ref_nyu_rot, EEF),
    "stanford_hydra_dataset_converted_externally_to_rlds": (ref_hydra, EEF),
    "austin_buds_dataset_converted_externally_to_rlds": (ref_six_invert_clip, ["state"]),
    "nyu_franka_play_dataset_converted_externally_to_rlds": (ref_nyu_franka, ["eef_state", None, None]),
    "maniskill_dataset_converted_externally_to_rlds": (ref_maniskill, ["tcp_pose", "gripper_state"]),
    "furniture_bench_dataset_converted_externally_to_rlds": (ref_furniture, ["state"]),
    "cmu_franka_exploration_dataset_converted_externally_to_rlds": (ref_drop_last, NONE8),
    "ucsd_kitchen_dataset_converted_externally_to_rlds": (ref_ucsd_kitchen, ["joint_state", None]),
    "ucsd_pick_and_place_dataset_converted_externally_to_rlds": (ref_ucsd_pick, EEF),
    "austin_sailor_dataset_converted_externally_to_rlds": (ref_six_invert_clip, ["state"]),
    "austin_sirius_dataset_converted_externally_to_rlds": (ref_six_invert_clip, ["state"]),
    "bc_z": (ref_bc_z, ["present/xyz", "present/axis_angle", None, "present/sensed_close"]),
    "utokyo_pr2_opening_fridge_converted_externally_to_rlds": (ref_pr2, EEF),
    "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds": (ref_pr2, EEF),
    "utokyo_xarm_pick_and_place_converted_externally_to_rlds": (ref_identity, ["end_effector_pose", None, None]),
    "utokyo_xarm_bimanual_converted_externally_to_rlds": (ref_bimanual, ["pose_r", None, None]),
    "robo_net": (ref_robo_net, EEF),
    "berkeley_mvp_converted_externally_to_rlds": (ref_identity, ["pose", "gripper"]),
    "berkeley_rpt_converted_externally_to_rlds": (ref_identity, ["joint_pos", "gripper"]),
    "kaist_nonprehensile_converted_externally_to_rlds": (ref_kaist, ["state", None]),
    "stanford_mask_vit_converted_externally_to_rlds": (ref_mask_vit, EEF),
    "tokyo_u_lsmo_converted_externally_to_rlds": (ref_lsmo, EEF),
    "dlr_sara_pour_converted_externally_to_rlds": (ref_identity, ["state", None, None]),
    "dlr_sara_grid_clamp_converted_externally_to_rlds": (ref_sara_grid, ["state", None, None]),
    "dlr_edan_shared_control_converted_externally_to_rlds": (ref_edan, ["state", None]),
    "asu_table_top_converted_externally_to_rlds": (ref_asu, EEF),
    "stanford_robocook_converted_externally_to_rlds": (ref_lsmo, EEF),
    "imperialcollege_sawyer_wrist_cam": (ref_drop_last, [None] * 7 + ["state"]),
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": (ref_iamlab, ["joint_state", "gripper_state"]),
    "uiuc_d3field": (ref_uiuc, NONE8),
    "utaustin_mutex": (ref_six_invert_clip, ["state"]),
    "berkeley_fanuc_manipulation": (ref_fanuc, ["joint_state", None, "gripper_state"]),
    "cmu_playing_with_food": (ref_food, ["state", None, None]),
    "cmu_play_fusion": (ref_play_fusion, ["state"]),
    "cmu_stretch": (ref_stretch, EEF),
    "berkeley_gnm_recon": (ref_gnm, ["state", None, None]),
    "berkeley_gnm_cory_hall": (ref_gnm, ["state", None, None]),
    "berkeley_gnm_sac_son": (ref_gnm, ["state", None, None]),
    "droid": (ref_droid, ["proprio"]),
    "fmb_dataset": (ref_fmb, ["proprio"]),
    "dobbe": (ref_dobbe, ["proprio"]),
    "roboset": (ref_roboset, ["proprio"]),
    "rh20t": (ref_rh20t, ["proprio"]),
    **{f"tdroid_{t}": (ref_tdroid, ["EEF_state", None, "gripper_state"]) for t in (
        "carrot_in_bowl", "pour_corn_in_pot", "flip_pot_upright", "move_object_onto_plate", "knock_object_over",
        "cover_object_with_towel")},
    "droid_wipe": (ref_droid, ["proprio"]),
    **{f"libero_{s}_no_noops": (ref_libero, ["EEF_state", "gripper_state"]) for s in ("spatial", "object", "goal", "10")},
}
JOINT_POS = {"berkeley_mvp_converted_externally_to_rlds", "berkeley_rpt_converted_externally_to_rlds", "roboset"}


def restructure(action, o, state_obs_keys):
    """``make_dataset_from_rlds.restructure``: float32 action, proprio = state_obs_keys with zero pads.

    One deviation: berkeley_mvp / berkeley_rpt store ``gripper`` as a scalar per step, which OpenVLA's
    concat (rank 1 next to rank 2) would reject; it is taken as one column, as vlaprep does."""
    t = action.shape[0]
    parts = []
    for key in state_obs_keys:
        if key is None:
            parts.append(np.zeros((t, 1), f32))
        else:
            v = o[key].astype(f32)
            parts.append(v[:, None] if v.ndim == 1 else v)
    return action.astype(f32), np.concatenate(parts, axis=1)


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_openvla(version_dir):
    """[flat steps dict] per episode of every split, read as dlimp/OpenVLA read RLDS."""
    builder = tfds.builder_from_directory(str(version_dir))
    ds = builder.as_dataset(split="all", decoders={"steps": tfds.decode.SkipDecoding()}, shuffle_files=False)
    return [_flatten(tfds.as_numpy(ep["steps"])) for ep in ds]


def openvla_trajectories(name, version_dir):
    """[(outcome, action, proprio, raw steps)] with outcome "ok" | "empty" | "fails"."""
    fn, state_obs_keys = OPENVLA[name]
    out = []
    for steps in read_openvla(version_dir):
        o = {k[len("observation/"):]: v for k, v in steps.items() if k.startswith("observation/")}
        try:
            action, o = fn(dict(steps), dict(o))
        except OpenVLAFails:
            out.append(("fails", None, None, steps))
            continue
        action, proprio = restructure(action, o, state_obs_keys)
        out.append(("empty" if action.shape[0] == 0 else "ok", action, proprio, steps))
    return out


def numpy1_quantile(column, q):
    """openvla.md section 1, written from its text."""
    s = np.sort(np.asarray(column, f32))
    n = len(s)
    h = (n - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, n - 1)
    g = h - lo
    d = float(f32(s[hi] - s[lo]))
    return float(s[hi]) - d * (1 - g) if g >= 0.5 else float(s[lo]) + d * g


def exact_mean_std(column):
    """Exact rational mean and variance; std = the 60-digit square root, rounded to float64."""
    values = [Fraction(float(v)) for v in np.asarray(column, f32)]
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        std = float((decimal.Decimal(var.numerator) / decimal.Decimal(var.denominator)).sqrt())
    return float(mean), std


def expected_block(rows):
    rows = np.asarray(rows, f32)
    out = {k: [] for k in ("mean", "std", "max", "min", "q01", "q99")}
    for j in range(rows.shape[1]):
        col = rows[:, j]
        mean, std = exact_mean_std(col)
        out["mean"].append(mean)
        out["std"].append(std)
        out["max"].append(float(col.max()))
        out["min"].append(float(col.min()))
        out["q01"].append(numpy1_quantile(col, 0.01))
        out["q99"].append(numpy1_quantile(col, 0.99))
    return out


def expected_entry(name, trajectories):
    ok = [t for t in trajectories if t[0] == "ok"]
    action = np.concatenate([t[1] for t in ok])
    proprio = np.concatenate([t[2] for t in ok])
    mask = [True] * (action.shape[1] - 1) + [False]  # EEF_POS: gripper raw; JOINT_POS: vlaprep's default
    return {
        "action": {**expected_block(action), "mask": mask},
        "proprio": expected_block(proprio),
        "num_transitions": int(action.shape[0]),
        "num_trajectories": sum(t[0] in ("ok", "empty") for t in trajectories),
    }


# ==================================================================================================
# Fixtures: one dataset per registered OXE name, one statistics run over all of them
# ==================================================================================================
OXE_NAMES = [n for n, s in REGISTRY.items() if s.source_format == "rlds"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("oxe")
    return {name: generate_layout_rlds(root, name, episodes=EPISODES, seed=11, image_size=8) for name in OXE_NAMES}


@pytest.fixture(scope="module")
def reference(datasets):
    return {name: openvla_trajectories(name, path) for name, path in datasets.items()}


@pytest.fixture(scope="module")
def stats(datasets, tmp_path_factory):
    inputs = [DatasetInput(n, str(p), REGISTRY[n]) for n, p in datasets.items() if n not in NESTED_KEY_DATASETS]
    started = time.time()
    result = run_stats(inputs, str(tmp_path_factory.mktemp("stats")), with_proprio=True, beam_args=IN_PROCESS,
                       log=lambda m: None)
    result.wall = time.time() - started
    return result


def _close_ulps(got, want, ulps):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    tol = ulps * np.spacing(np.abs(want).astype(f32)).astype(np.float64)
    return np.all(np.abs(got - want) <= tol)


def assert_block(got, want, where, euler_cols=()):
    for field, values in want.items():
        if field == "mask":
            assert got["mask"] == values, f"mask of {where}"
            continue
        exact = [j for j in range(len(values)) if j not in euler_cols]
        for j in exact:
            g, w = got[field][j], values[j]
            if field == "std":  # both correctly rounded roots; a tie may round either way: 1 ulp
                assert abs(g - w) <= np.spacing(w), f"{field}[{j}] of {where}: {g!r} != {w!r}"
            else:
                assert g == w, f"{field}[{j}] of {where}: {g!r} != {w!r}"
        for j in euler_cols:  # within 4 float32 ulps of the column's largest angle
            g, w = got[field][j], values[j]
            scale = max(abs(want["max"][j]), abs(want["min"][j]))
            assert abs(g - w) <= EULER_ULPS * float(np.spacing(f32(scale))), f"{field}[{j}] of {where}: {g!r} vs {w!r}"


# ==================================================================================================
# Tests
# ==================================================================================================
def test_every_registered_oxe_dataset_has_a_reference():
    assert sorted(OPENVLA) == sorted(OXE_NAMES)
    assert len(OXE_NAMES) == 70


@pytest.mark.parametrize("name", OXE_NAMES)
def test_transform_matches_openvla_per_trajectory(name, datasets, reference):
    """vlaprep's registered transform on the very arrays OpenVLA reads (ZLIB still compressed, images bytes)."""
    spec = REGISTRY[name]
    euler = slice(3, 6) if name in QUATERNION_DATASETS else None
    outcomes = set()
    for outcome, action, proprio, steps in reference[name]:
        outcomes.add(outcome)
        given = {k: steps[k] for k in spec.required_keys}
        if outcome == "fails":
            with pytest.raises(TransformError) as info:
                spec.transform(given)
            assert not isinstance(info.value, EmptyTrajectoryError)
            continue
        if outcome == "empty":
            with pytest.raises(EmptyTrajectoryError) as info:
                spec.transform(given)
            traj = info.value.trajectory
        else:
            traj = spec.transform(given)
        assert traj.action.dtype == np.float32 and traj.proprio.dtype == np.float32
        assert traj.action.shape == action.shape and traj.proprio.shape == proprio.shape
        np.testing.assert_array_equal(traj.proprio, proprio)
        if euler is None:
            np.testing.assert_array_equal(traj.action, action)
        else:
            keep = np.r_[0:3, 6:action.shape[1]]
            np.testing.assert_array_equal(traj.action[:, keep], action[:, keep])
            assert _close_ulps(traj.action[:, euler], action[:, euler], EULER_ULPS)
    assert "ok" in outcomes


@pytest.mark.parametrize("name", [n for n in OXE_NAMES if n not in NESTED_KEY_DATASETS])
def test_statistics_match_openvla(name, stats, reference):
    """Action and proprio blocks, num_transitions, and num_trajectories where no episode is empty."""
    want = expected_entry(name, reference[name])
    got = stats.statistics[name]
    euler_cols = (3, 4, 5) if name in QUATERNION_DATASETS else ()
    assert_block(got["action"], want["action"], f"{name} action", euler_cols)
    assert_block(got["proprio"], want["proprio"], f"{name} proprio")
    assert got["num_transitions"] == want["num_transitions"]
    outcomes = [t[0] for t in reference[name]]
    if "empty" not in outcomes:  # datasets with empty trajectories: see the (a) test below
        assert got["num_trajectories"] == want["num_trajectories"]
    # Quarantined: exactly the episodes OpenVLA fails on, plus (until (a)) the empty ones.
    quarantined = sum(r["dataset_name"] == name for r in stats.quarantine)
    assert outcomes.count("fails") <= quarantined <= outcomes.count("fails") + outcomes.count("empty")


def test_one_statistics_run_covers_every_dataset(stats):
    assert sorted(stats.statistics) == sorted(n for n in OXE_NAMES if n not in NESTED_KEY_DATASETS)
    assert stats.wall < 300, f"one statistics run over {len(stats.statistics)} datasets took {stats.wall:.0f} s"


def test_generated_data_exercises_the_empty_and_failing_cases(reference):
    """The data holds what the separate tests need: empty and failing Bridge episodes."""
    outcomes = {name: [t[0] for t in reference[name]] for name in ("bridge_orig", "bridge_dataset", "bridge_oxe")}
    assert outcomes["bridge_orig"].count("fails") == 1 and outcomes["bridge_orig"].count("empty") == 1  # 1, 2 steps
    assert outcomes["bridge_oxe"].count("empty") == 2 and "fails" not in outcomes["bridge_oxe"]  # 1, 2 steps
    others = [n for n in OXE_NAMES if not n.startswith("bridge")]
    assert all(t[0] == "ok" for n in others for t in reference[n])


EMPTY_DATASETS = ("bridge_oxe", "bridge_orig", "bridge_dataset")


@pytest.mark.parametrize("name", EMPTY_DATASETS)
def test_empty_trajectories_count_in_num_trajectories(name, stats, reference):
    want = expected_entry(name, reference[name])
    assert stats.statistics[name]["num_trajectories"] == want["num_trajectories"]


def test_nested_feature_keys_kuka_bc_z(datasets, reference, tmp_path):
    inputs = [DatasetInput(n, str(datasets[n]), REGISTRY[n]) for n in NESTED_KEY_DATASETS]
    result = run_stats(inputs, str(tmp_path), with_proprio=True, beam_args=IN_PROCESS, log=lambda m: None)
    for name in NESTED_KEY_DATASETS:
        want = expected_entry(name, reference[name])
        got = result.statistics[name]
        assert_block(got["action"], want["action"], f"{name} action")
        assert_block(got["proprio"], want["proprio"], f"{name} proprio")
        assert (got["num_transitions"], got["num_trajectories"]) == (want["num_transitions"], want["num_trajectories"])
