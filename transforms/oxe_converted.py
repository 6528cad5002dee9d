"""Open X-Embodiment, community layouts: the datasets "converted externally to RLDS" and the later OXE
additions (Magic Soup++), as OpenVLA's ``oxe/transforms.py`` standardizes them, in NumPy.

These store a flat ``action`` vector and the instruction in the step-level ``language_instruction``. Each
transform is ``fn(steps) -> Trajectory`` (see ``base.py``; readers in ``steps.py``):

  action:     [T, 7] float32   EEF_POS: 6 EEF deltas + absolute gripper (1 open, 0 closed); the three
                               JOINT_POS datasets (berkeley_mvp, berkeley_rpt, roboset) give [T, 8]
  proprio:    [T, P] float32   OpenVLA's ``state_obs_keys`` concatenated, a zero column per ``None``
  step_index: [T] int64        arange(T)

Recurring patterns, each a helper or a shared function: column slices of ``action`` / ``state``, zero
insertion (``zeros``), ``invert_clip01`` (austin_*, utaustin_mutex, furniture_bench, roboset), quaternion
-> Euler (``rotation.euler_from_quaternion``: furniture_bench, iamlab_cmu_pickup_insert,
cmu_playing_with_food), the GNM navigation sets (one function), and the bimanual xArm's last 7 dims.
``*_SHAPES`` hold the per-step shapes of the keys read, from each dataset's features.json; ``None`` marks
a layout OpenVLA's sources do not establish (``robo_net``), whose widths come from the data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vlaprep.transforms.base import Trajectory
from vlaprep.transforms.rotation import euler_from_quaternion
from vlaprep.transforms.steps import (
    invert_clip01,
    read_steps,
    require_min_width,
    state_proprio,
    trajectory,
    zeros,
)
from vlaprep.transforms.gripper import invert_gripper_actions

_A, _S = "action", "observation/state"

# --- Per-step shapes of the keys each transform reads (features.json) ----------------------------
STANFORD_KUKA_MULTIMODAL_SHAPES = {_A: (4,), "observation/ee_position": (3,), "observation/ee_orientation": (4,)}
NYU_ROT_SHAPES = {_A: (7,), _S: (7,)}
STANFORD_HYDRA_SHAPES = {_A: (7,), _S: (27,)}
AUSTIN_BUDS_SHAPES = {_A: (7,), _S: (24,)}
NYU_FRANKA_PLAY_SHAPES = {_A: (15,), _S: (13,)}
MANISKILL_SHAPES = {_A: (7,), _S: (18,), "observation/tcp_pose": (7,)}
FURNITURE_BENCH_SHAPES = {_A: (8,), _S: (35,)}
CMU_FRANKA_EXPLORATION_SHAPES = {_A: (8,)}
UCSD_KITCHEN_SHAPES = {_A: (8,), _S: (21,)}
UCSD_PICK_AND_PLACE_SHAPES = {_A: (4,), _S: (7,)}
AUSTIN_SAILOR_SHAPES = {_A: (7,), _S: (8,)}
AUSTIN_SIRIUS_SHAPES = {_A: (7,), _S: (8,)}
UTOKYO_PR2_SHAPES = {_A: (8,), _S: (7,)}  # opening_fridge and tabletop_manipulation
UTOKYO_XARM_PICK_AND_PLACE_SHAPES = {_A: (7,), "observation/end_effector_pose": (6,)}
UTOKYO_XARM_BIMANUAL_SHAPES = {_A: (14,), "observation/pose_r": (6,)}
ROBO_NET_SHAPES = {_A: None, _S: None}  # layout not established (status: assumed); widths from the data
BERKELEY_MVP_SHAPES = {_A: (8,), "observation/pose": (7,), "observation/gripper": ()}  # gripper: bool
BERKELEY_RPT_SHAPES = {_A: (8,), "observation/joint_pos": (7,), "observation/gripper": ()}
KAIST_NONPREHENSILE_SHAPES = {_A: (20,), _S: (21,)}
STANFORD_MASK_VIT_SHAPES = {_A: (5,), "observation/end_effector_pose": (5,)}
TOKYO_U_LSMO_SHAPES = {_A: (7,), _S: (13,)}
DLR_SARA_POUR_SHAPES = {_A: (7,), _S: (6,)}
DLR_SARA_GRID_CLAMP_SHAPES = {_A: (7,), _S: (12,)}
DLR_EDAN_SHARED_CONTROL_SHAPES = {_A: (7,), _S: (7,)}
ASU_TABLE_TOP_SHAPES = {_A: (7,), _S: (7,), "ground_truth_states/EE": (6,)}
STANFORD_ROBOCOOK_SHAPES = {_A: (7,), _S: (7,)}
IMPERIALCOLLEGE_SAWYER_WRIST_CAM_SHAPES = {_A: (8,), _S: (1,)}
IAMLAB_CMU_PICKUP_INSERT_SHAPES = {_A: (8,), _S: (20,)}
UIUC_D3FIELD_SHAPES = {_A: (3,)}
UTAUSTIN_MUTEX_SHAPES = {_A: (7,), _S: (24,)}
BERKELEY_FANUC_SHAPES = {_A: (6,), _S: (13,)}
CMU_PLAYING_WITH_FOOD_SHAPES = {_A: (8,), _S: (6,)}
CMU_PLAY_FUSION_SHAPES = {_A: (9,), _S: (8,)}
CMU_STRETCH_SHAPES = {_A: (8,), _S: (4,)}
GNM_SHAPES = {_A: (2,), "observation/position": (2,), "observation/yaw": (1,)}  # float64 sources
FMB_SHAPES = {_A: (7,), "observation/eef_pose": (7,), "observation/state_gripper_pose": ()}
DOBBE_SHAPES = {_A: (7,), _S: (7,)}
ROBOSET_SHAPES = {_A: (8,), _S: (8,)}
RH20T_SHAPES = {
    "action/tcp_base": (6,),
    "action/gripper": (),  # int64
    "observation/tcp_base": (6,),
    "observation/gripper_width": (),
}

# --- OpenVLA's state_obs_keys --------------------------------------------------------------------
EEF_GRIPPER_STATE_OBS = ("eef_state", None, "gripper_state")  # POS_EULER: 6 + pad + 1
STATE_STATE_OBS = ("state",)  # an 8-wide state as is
STATE_PAD_STATE_OBS = ("state", None)  # a 7-wide state + pad
STATE_PAD2_STATE_OBS = ("state", None, None)  # a 6-wide state + 2 pads
NO_STATE_OBS = (None,) * 8
PROPRIO_STATE_OBS = ("proprio",)
STANFORD_KUKA_MULTIMODAL_STATE_OBS = ("ee_position", "ee_orientation", None)
NYU_FRANKA_PLAY_STATE_OBS = ("eef_state", None, None)
MANISKILL_STATE_OBS = ("tcp_pose", "gripper_state")
UCSD_KITCHEN_STATE_OBS = ("joint_state", None)
UTOKYO_XARM_PICK_AND_PLACE_STATE_OBS = ("end_effector_pose", None, None)
UTOKYO_XARM_BIMANUAL_STATE_OBS = ("pose_r", None, None)
BERKELEY_MVP_STATE_OBS = ("pose", "gripper")
BERKELEY_RPT_STATE_OBS = ("joint_pos", "gripper")
IMPERIALCOLLEGE_STATE_OBS = (None,) * 7 + ("state",)
IAMLAB_STATE_OBS = ("joint_state", "gripper_state")
BERKELEY_FANUC_STATE_OBS = ("joint_state", None, "gripper_state")


def _obs(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len("observation/"):]: v for k, v in x.items() if k.startswith("observation/")}


def _simple(x: Mapping[str, np.ndarray], action: np.ndarray, state_obs, dataset: str, **pieces) -> Trajectory:
    """Trajectory with proprio from the observation pieces read (plus ``pieces`` derived from them)."""
    t = action.shape[0]
    return trajectory(action, state_proprio(state_obs, {**_obs(x), **pieces}, t), dataset)


def _eef_gripper_from_state(x: Mapping[str, np.ndarray], action: np.ndarray, dataset: str) -> Trajectory:
    """The recurring POS_EULER proprio: eef_state = state[:, :6], gripper_state = state[:, -1:]."""
    s = x[_S]
    return _simple(x, action, EEF_GRIPPER_STATE_OBS, dataset, eef_state=s[:, :6], gripper_state=s[:, -1:])


def _xyz_zeros_gripper(a: np.ndarray) -> np.ndarray:
    """action[:, :3] ++ zeros(3) ++ action[:, -1:] (position-only datasets)."""
    return np.concatenate([a[:, :3], zeros(a.shape[0], 3), a[:, -1:]], axis=1)


def _xyzw_zeros_gripper(a: np.ndarray) -> np.ndarray:
    """action[:, :4] ++ zeros(2) ++ action[:, -1:] (xyz + yaw datasets)."""
    return np.concatenate([a[:, :4], zeros(a.shape[0], 2), a[:, -1:]], axis=1)


def _six_invert_clip(a: np.ndarray) -> np.ndarray:
    """action[:, :6] ++ invert(clip(action[:, -1:], 0, 1))."""
    return np.concatenate([a[:, :6], invert_clip01(a[:, -1:])], axis=1)


def _drop_last(a: np.ndarray) -> np.ndarray:
    """action[..., :-1]: datasets whose last action dim is a terminate flag."""
    return a[:, :-1]


# --- Transforms, in OpenVLA's order ---------------------------------------------------------------
def stanford_kuka_multimodal_transform(steps):
    """action[:, :3] + zeros(3) + action[:, -1:]; proprio ee_position (3) ++ ee_orientation (4) ++ 0."""
    name = "stanford_kuka_multimodal_transform"
    x = read_steps(steps, STANFORD_KUKA_MULTIMODAL_SHAPES, name)
    return _simple(x, _xyz_zeros_gripper(x[_A]), STANFORD_KUKA_MULTIMODAL_STATE_OBS, name)


def nyu_rot_transform(steps):
    """action[:, :7]; proprio state[:, :6] ++ 0 ++ state[:, -1:]."""
    name = "nyu_rot_transform"
    x = read_steps(steps, NYU_ROT_SHAPES, name)
    return _eef_gripper_from_state(x, x[_A][:, :7], name)


def stanford_hydra_transform(steps):
    """action[:, :6] + invert(action[:, -1:]); proprio state[:, :3] ++ state[:, 7:10] ++ 0 ++ state[:, -3:-2]."""
    name = "stanford_hydra_transform"
    x = read_steps(steps, STANFORD_HYDRA_SHAPES, name)
    a, s = x[_A], x[_S]
    action = np.concatenate([a[:, :6], invert_gripper_actions(a[:, -1])[:, None]], axis=1)
    eef = np.concatenate([s[:, :3], s[:, 7:10]], axis=1)
    return _simple(x, action, EEF_GRIPPER_STATE_OBS, name, eef_state=eef, gripper_state=s[:, -3:-2])


def austin_buds_transform(steps):
    """action[:, :6] + invert(clip(action[:, -1:], 0, 1)); proprio state[:, :8]."""
    name = "austin_buds_transform"
    x = read_steps(steps, AUSTIN_BUDS_SHAPES, name)
    return _simple(x, _six_invert_clip(x[_A]), STATE_STATE_OBS, name, state=x[_S][:, :8])


def nyu_franka_play_transform(steps):
    """action[:, -8:-2] + clip(action[:, -2:-1], 0, 1); proprio state[:, -6:] ++ 0 ++ 0."""
    name = "nyu_franka_play_transform"
    x = read_steps(steps, NYU_FRANKA_PLAY_SHAPES, name)
    a = x[_A]
    action = np.concatenate([a[:, -8:-2], np.clip(a[:, -2:-1], np.float32(0.0), np.float32(1.0))], axis=1)
    return _simple(x, action, NYU_FRANKA_PLAY_STATE_OBS, name, eef_state=x[_S][:, -6:])


def maniskill_transform(steps):
    """action as stored; proprio tcp_pose (7) ++ state[:, 7:8]."""
    name = "maniskill_transform"
    x = read_steps(steps, MANISKILL_SHAPES, name)
    return _simple(x, x[_A], MANISKILL_STATE_OBS, name, gripper_state=x[_S][:, 7:8])


def furniture_bench_transform(steps):
    """action[:, :3] + euler(action[:, 3:7]) + invert(clip(action[:, -1:], 0, 1)); proprio state[:, :7] ++
    state[:, -1:]. The Euler angles match OpenVLA's within a few ulps (see ``rotation.py``)."""
    name = "furniture_bench_transform"
    x = read_steps(steps, FURNITURE_BENCH_SHAPES, name)
    a, s = x[_A], x[_S]
    action = np.concatenate([a[:, :3], euler_from_quaternion(a[:, 3:7]), invert_clip01(a[:, -1:])], axis=1)
    return _simple(x, action, STATE_STATE_OBS, name, state=np.concatenate([s[:, :7], s[:, -1:]], axis=1))


def cmu_franka_exploration_transform(steps):
    """action[:, :-1]; no proprio (eight ``None`` state keys)."""
    name = "cmu_franka_exploration_transform"
    x = read_steps(steps, CMU_FRANKA_EXPLORATION_SHAPES, name)
    return _simple(x, _drop_last(x[_A]), NO_STATE_OBS, name)


def ucsd_kitchen_transform(steps):
    """action[:, :-1]; proprio state[:, :7] ++ 0."""
    name = "ucsd_kitchen_transform"
    x = read_steps(steps, UCSD_KITCHEN_SHAPES, name)
    return _simple(x, _drop_last(x[_A]), UCSD_KITCHEN_STATE_OBS, name, joint_state=x[_S][:, :7])


def ucsd_pick_and_place_transform(steps):
    """action[:, :3] + zeros(3) + action[:, -1:]; proprio state[:, :6] ++ 0 ++ state[:, -1:]."""
    name = "ucsd_pick_and_place_transform"
    x = read_steps(steps, UCSD_PICK_AND_PLACE_SHAPES, name)
    return _eef_gripper_from_state(x, _xyz_zeros_gripper(x[_A]), name)


def austin_sailor_transform(steps):
    """action[:, :6] + invert(clip(action[:, -1:], 0, 1)); proprio state (8)."""
    name = "austin_sailor_transform"
    x = read_steps(steps, AUSTIN_SAILOR_SHAPES, name)
    return _simple(x, _six_invert_clip(x[_A]), STATE_STATE_OBS, name)


def austin_sirius_transform(steps):
    """action[:, :6] + invert(clip(action[:, -1:], 0, 1)); proprio state (8)."""
    name = "austin_sirius_transform"
    x = read_steps(steps, AUSTIN_SIRIUS_SHAPES, name)
    return _simple(x, _six_invert_clip(x[_A]), STATE_STATE_OBS, name)


def utokyo_pr2_transform(steps):
    """Both UTokyo PR2 sets: action[:, :-1]; proprio state[:, :6] ++ 0 ++ state[:, -1:]."""
    name = "utokyo_pr2_transform"
    x = read_steps(steps, UTOKYO_PR2_SHAPES, name)
    return _eef_gripper_from_state(x, _drop_last(x[_A]), name)


def utokyo_xarm_pick_and_place_transform(steps):
    """action as stored; proprio end_effector_pose (6) ++ 0 ++ 0."""
    name = "utokyo_xarm_pick_and_place_transform"
    x = read_steps(steps, UTOKYO_XARM_PICK_AND_PLACE_SHAPES, name)
    return _simple(x, x[_A], UTOKYO_XARM_PICK_AND_PLACE_STATE_OBS, name)


def utokyo_xarm_bimanual_transform(steps):
    """Bimanual xArm: action[:, -7:] (the right arm of the 14-wide action); proprio pose_r (6) ++ 0 ++ 0."""
    name = "utokyo_xarm_bimanual_transform"
    x = read_steps(steps, UTOKYO_XARM_BIMANUAL_SHAPES, name)
    return _simple(x, x[_A][:, -7:], UTOKYO_XARM_BIMANUAL_STATE_OBS, name)


def robo_net_transform(steps):
    """action[:, :4] + zeros(2) + action[:, -1:]; proprio state[:, :4] ++ zeros(2) ++ 0 ++ state[:, -1:].

    RoboNet's RLDS layout is not established (``status: assumed``): any width of at least 5 is read.
    """
    name = "robo_net_transform"
    x = read_steps(steps, ROBO_NET_SHAPES, name)
    for key in (_A, _S):
        require_min_width(x[key], 5, key, name)
    s = x[_S]
    eef = np.concatenate([s[:, :4], zeros(s.shape[0], 2)], axis=1)
    return _simple(x, _xyzw_zeros_gripper(x[_A]), EEF_GRIPPER_STATE_OBS, name, eef_state=eef, gripper_state=s[:, -1:])


def berkeley_mvp_transform(steps):
    """JOINT_POS (OpenVLA refuses to train on it): action as stored (8); proprio pose (7) ++ float(gripper)."""
    name = "berkeley_mvp_transform"
    x = read_steps(steps, BERKELEY_MVP_SHAPES, name)
    return _simple(x, x[_A], BERKELEY_MVP_STATE_OBS, name)


def berkeley_rpt_transform(steps):
    """JOINT_POS (OpenVLA refuses to train on it): action as stored (8); proprio joint_pos (7) ++ float(gripper)."""
    name = "berkeley_rpt_transform"
    x = read_steps(steps, BERKELEY_RPT_SHAPES, name)
    return _simple(x, x[_A], BERKELEY_RPT_STATE_OBS, name)


def kaist_nonprehensile_transform(steps):
    """action[:, :6] + zeros(1); proprio state[:, -7:] ++ 0."""
    name = "kaist_nonprehensile_transform"
    x = read_steps(steps, KAIST_NONPREHENSILE_SHAPES, name)
    a = x[_A]
    action = np.concatenate([a[:, :6], zeros(a.shape[0], 1)], axis=1)
    return _simple(x, action, STATE_PAD_STATE_OBS, name, state=x[_S][:, -7:])


def stanford_mask_vit_transform(steps):
    """action[:, :4] + zeros(2) + action[:, -1:]; proprio eep[:, :4] ++ zeros(2) ++ 0 ++ eep[:, -1:]."""
    name = "stanford_mask_vit_transform"
    x = read_steps(steps, STANFORD_MASK_VIT_SHAPES, name)
    p = x["observation/end_effector_pose"]
    eef = np.concatenate([p[:, :4], zeros(p.shape[0], 2)], axis=1)
    return _simple(x, _xyzw_zeros_gripper(x[_A]), EEF_GRIPPER_STATE_OBS, name, eef_state=eef, gripper_state=p[:, -1:])


def tokyo_u_lsmo_transform(steps):
    """action as stored; proprio state[:, :6] ++ 0 ++ state[:, -1:]."""
    name = "tokyo_u_lsmo_transform"
    x = read_steps(steps, TOKYO_U_LSMO_SHAPES, name)
    return _eef_gripper_from_state(x, x[_A], name)


def dlr_sara_pour_transform(steps):
    """action as stored; proprio state (6) ++ 0 ++ 0."""
    name = "dlr_sara_pour_transform"
    x = read_steps(steps, DLR_SARA_POUR_SHAPES, name)
    return _simple(x, x[_A], STATE_PAD2_STATE_OBS, name)


def dlr_sara_grid_clamp_transform(steps):
    """action as stored; proprio state[:, :6] ++ 0 ++ 0."""
    name = "dlr_sara_grid_clamp_transform"
    x = read_steps(steps, DLR_SARA_GRID_CLAMP_SHAPES, name)
    return _simple(x, x[_A], STATE_PAD2_STATE_OBS, name, state=x[_S][:, :6])


def dlr_edan_shared_control_transform(steps):
    """action[:, :6] + invert(action[:, -1:]); proprio state (7) ++ 0."""
    name = "dlr_edan_shared_control_transform"
    x = read_steps(steps, DLR_EDAN_SHARED_CONTROL_SHAPES, name)
    a = x[_A]
    action = np.concatenate([a[:, :6], invert_gripper_actions(a[:, -1])[:, None]], axis=1)
    return _simple(x, action, STATE_PAD_STATE_OBS, name)


def asu_table_top_transform(steps):
    """action as stored; proprio ground_truth_states/EE (6) ++ 0 ++ state[:, -1:]."""
    name = "asu_table_top_transform"
    x = read_steps(steps, ASU_TABLE_TOP_SHAPES, name)
    pieces = {"eef_state": x["ground_truth_states/EE"], "gripper_state": x[_S][:, -1:]}
    return _simple(x, x[_A], EEF_GRIPPER_STATE_OBS, name, **pieces)


def stanford_robocook_transform(steps):
    """action as stored; proprio state[:, :6] ++ 0 ++ state[:, -1:]."""
    name = "stanford_robocook_transform"
    x = read_steps(steps, STANFORD_ROBOCOOK_SHAPES, name)
    return _eef_gripper_from_state(x, x[_A], name)


def imperialcollege_sawyer_wrist_cam_transform(steps):
    """action[:, :-1]; proprio zeros(7) ++ state (1)."""
    name = "imperialcollege_sawyer_wrist_cam_transform"
    x = read_steps(steps, IMPERIALCOLLEGE_SAWYER_WRIST_CAM_SHAPES, name)
    return _simple(x, _drop_last(x[_A]), IMPERIALCOLLEGE_STATE_OBS, name)


def iamlab_cmu_pickup_insert_transform(steps):
    """action[:, :3] + euler(action[:, 3:7]) + action[:, 7:8]; proprio state[:, :7] ++ state[:, 7:8].

    The Euler angles match OpenVLA's within a few ulps (see ``rotation.py``)."""
    name = "iamlab_cmu_pickup_insert_transform"
    x = read_steps(steps, IAMLAB_CMU_PICKUP_INSERT_SHAPES, name)
    a, s = x[_A], x[_S]
    action = np.concatenate([a[:, :3], euler_from_quaternion(a[:, 3:7]), a[:, 7:8]], axis=1)
    return _simple(x, action, IAMLAB_STATE_OBS, name, joint_state=s[:, :7], gripper_state=s[:, 7:8])


def uiuc_d3field_transform(steps):
    """action (3) + zeros(3) + zeros(1); no proprio."""
    name = "uiuc_d3field_transform"
    x = read_steps(steps, UIUC_D3FIELD_SHAPES, name)
    a = x[_A]
    return _simple(x, np.concatenate([a, zeros(a.shape[0], 4)], axis=1), NO_STATE_OBS, name)


def utaustin_mutex_transform(steps):
    """action[:, :6] + invert(clip(action[:, -1:], 0, 1)); proprio state[:, :8]."""
    name = "utaustin_mutex_transform"
    x = read_steps(steps, UTAUSTIN_MUTEX_SHAPES, name)
    return _simple(x, _six_invert_clip(x[_A]), STATE_STATE_OBS, name, state=x[_S][:, :8])


def berkeley_fanuc_transform(steps):
    """The dataset stores no gripper action: action (6) + invert(state[:, 6:7]) (the observed gripper);
    proprio state[:, :6] ++ 0 ++ state[:, 6:7]."""
    name = "berkeley_fanuc_transform"
    x = read_steps(steps, BERKELEY_FANUC_SHAPES, name)
    s = x[_S]
    gripper_state = s[:, 6:7]
    action = np.concatenate([x[_A], invert_gripper_actions(gripper_state[:, 0])[:, None]], axis=1)
    return _simple(x, action, BERKELEY_FANUC_STATE_OBS, name, joint_state=s[:, :6], gripper_state=gripper_state)


def cmu_playing_with_food_transform(steps):
    """action[:, :3] + euler(action[:, 3:7]) + action[:, -1:]; proprio state (6) ++ 0 ++ 0.

    The Euler angles match OpenVLA's within a few ulps (see ``rotation.py``)."""
    name = "cmu_playing_with_food_transform"
    x = read_steps(steps, CMU_PLAYING_WITH_FOOD_SHAPES, name)
    a = x[_A]
    action = np.concatenate([a[:, :3], euler_from_quaternion(a[:, 3:7]), a[:, -1:]], axis=1)
    return _simple(x, action, STATE_PAD2_STATE_OBS, name)


def cmu_play_fusion_transform(steps):
    """action[:, :3] + action[:, -4:]; proprio state (8)."""
    name = "cmu_play_fusion_transform"
    x = read_steps(steps, CMU_PLAY_FUSION_SHAPES, name)
    a = x[_A]
    return _simple(x, np.concatenate([a[:, :3], a[:, -4:]], axis=1), STATE_STATE_OBS, name)


def cmu_stretch_transform(steps):
    """action[:, :-1]; proprio state[:, :3] ++ zeros(3) ++ 0 ++ state[:, -1:]."""
    name = "cmu_stretch_transform"
    x = read_steps(steps, CMU_STRETCH_SHAPES, name)
    s = x[_S]
    eef = np.concatenate([s[:, :3], zeros(s.shape[0], 3)], axis=1)
    return _simple(x, _drop_last(x[_A]), EEF_GRIPPER_STATE_OBS, name, eef_state=eef, gripper_state=s[:, -1:])


def gnm_transform(steps):
    """The three GNM navigation sets: action (2) + zeros(5); proprio state = position (2) ++ zeros(3) ++
    yaw (1), then ++ 0 ++ 0. Sources are float64; OpenVLA only pads and casts, so float32 of the values."""
    name = "gnm_transform"
    x = read_steps(steps, GNM_SHAPES, name)
    a = x[_A]
    t = a.shape[0]
    state = np.concatenate([x["observation/position"], zeros(t, 3), x["observation/yaw"]], axis=1)
    return _simple(x, np.concatenate([a, zeros(t, 5)], axis=1), STATE_PAD2_STATE_OBS, name, state=state)


def fmb_transform(steps):
    """action as stored; proprio eef_pose (7) ++ state_gripper_pose (1)."""
    name = "fmb_transform"
    x = read_steps(steps, FMB_SHAPES, name)
    proprio = np.concatenate([x["observation/eef_pose"], x["observation/state_gripper_pose"]], axis=1)
    return _simple(x, x[_A], PROPRIO_STATE_OBS, name, proprio=proprio)


def dobbe_transform(steps):
    """action as stored; proprio state (7)."""
    name = "dobbe_transform"
    x = read_steps(steps, DOBBE_SHAPES, name)
    return _simple(x, x[_A], PROPRIO_STATE_OBS, name, proprio=x[_S])


def roboset_transform(steps):
    """JOINT_POS (OpenVLA refuses to train on it): action[:, :7] + invert(clip(action[:, -1:], 0, 1));
    proprio state (8)."""
    name = "roboset_transform"
    x = read_steps(steps, ROBOSET_SHAPES, name)
    a = x[_A]
    action = np.concatenate([a[:, :7], invert_clip01(a[:, -1:])], axis=1)
    return _simple(x, action, PROPRIO_STATE_OBS, name, proprio=x[_S])


def rh20t_transform(steps):
    """action tcp_base (6) + float(gripper) (int64); proprio tcp_base (6) ++ gripper_width (1)."""
    name = "rh20t_transform"
    x = read_steps(steps, RH20T_SHAPES, name)
    action = np.concatenate([x["action/tcp_base"], x["action/gripper"]], axis=1)
    proprio = np.concatenate([x["observation/tcp_base"], x["observation/gripper_width"]], axis=1)
    return _simple(x, action, PROPRIO_STATE_OBS, name, proprio=proprio)
