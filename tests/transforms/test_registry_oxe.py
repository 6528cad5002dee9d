"""Every OXE registry entry against the published on-disk layouts (oxe_layouts.json) and OpenVLA's configs,
and the features.json check that compares an entry with a dataset's own features.json."""

import json
import pathlib
import pickle

import numpy as np
import pytest

from vlaprep.transforms.base import ActionEncoding, EmptyTrajectoryError
from vlaprep.transforms.features import FeatureMismatchError, check_step_shapes, step_features
from vlaprep.transforms.registry import GROUPS, REGISTRY

try:
    import cloudpickle
except ImportError:  # Beam vendors it
    from apache_beam.internal.cloudpickle import cloudpickle

LAYOUTS_COPY = pathlib.Path(__file__).resolve().parents[2] / "vlaprep" / "synthetic" / "oxe_layouts.json"
REFERENCE = pathlib.Path("/work/shared/reference/oxe_layouts.json")
LAYOUTS = json.loads(LAYOUTS_COPY.read_text())["datasets"]
OXE = [n for n, s in REGISTRY.items() if s.source_format == "rlds"]

# OpenVLA's configs, written out: (primary, secondary, wrist) image_obs_keys, and the groups of its sections.
CAMERAS = {
    "fractal20220817_data": ("image", None, None), "kuka": ("image", None, None),
    "bridge_oxe": ("image", None, None),  # OpenVLA names secondary "image_1", which this layout lacks
    "bridge_orig": ("image_0", "image_1", None), "bridge_dataset": ("image_0", "image_1", None),
    "taco_play": ("rgb_static", None, "rgb_gripper"), "jaco_play": ("image", None, "image_wrist"),
    "berkeley_cable_routing": ("image", "top_image", "wrist45_image"), "roboturk": ("front_rgb", None, None),
    "nyu_door_opening_surprising_effectiveness": (None, None, "image"),
    "viola": ("agentview_rgb", None, "eye_in_hand_rgb"), "berkeley_autolab_ur5": ("image", None, "hand_image"),
    "toto": ("image", None, None), "language_table": ("rgb", None, None),
    "columbia_cairlab_pusht_real": ("image", None, "wrist_image"),
    "nyu_franka_play_dataset_converted_externally_to_rlds": ("image", "image_additional_view", None),
    "cmu_franka_exploration_dataset_converted_externally_to_rlds": ("highres_image", None, None),
    "utokyo_xarm_pick_and_place_converted_externally_to_rlds": ("image", "image2", "hand_image"),
    "robo_net": ("image", "image1", None),
    "berkeley_mvp_converted_externally_to_rlds": (None, None, "hand_image"),
    "berkeley_rpt_converted_externally_to_rlds": (None, None, "hand_image"),
    "stanford_robocook_converted_externally_to_rlds": ("image_1", "image_2", None),
    "uiuc_d3field": ("image_1", "image_2", None), "cmu_playing_with_food": ("image", None, "finger_vision_1"),
    "berkeley_gnm_recon": (None, None, "image"), "berkeley_gnm_cory_hall": (None, None, "image"),
    "berkeley_gnm_sac_son": (None, None, "image"),
    "droid": ("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left"),
    "fmb_dataset": ("image_side_1", "image_side_2", "image_wrist_1"), "dobbe": ("wrist_image", None, None),
    "roboset": ("image_left", "image_right", "image_wrist"), "rh20t": ("image_front", "image_side_right", "image_wrist"),
    "droid_wipe": ("exterior_image_2_left", None, "wrist_image_left"),
}
WITH_WRIST = {"stanford_hydra_dataset_converted_externally_to_rlds", "austin_buds_dataset_converted_externally_to_rlds",
              "maniskill_dataset_converted_externally_to_rlds", "furniture_bench_dataset_converted_externally_to_rlds",
              "austin_sailor_dataset_converted_externally_to_rlds", "austin_sirius_dataset_converted_externally_to_rlds",
              "imperialcollege_sawyer_wrist_cam", "iamlab_cmu_pickup_insert_converted_externally_to_rlds",
              "utaustin_mutex", "berkeley_fanuc_manipulation"} | {f"libero_{s}_no_noops" for s in ("spatial", "object", "goal", "10")}
JOINT_POS = {"berkeley_mvp_converted_externally_to_rlds", "berkeley_rpt_converted_externally_to_rlds", "roboset"}
PROPRIO_7 = {"droid", "droid_wipe", "dobbe", "rh20t"}  # OpenVLA's ["proprio"] entries of 6 + 1 columns


def expected_cameras(name):
    if name in CAMERAS:
        return CAMERAS[name]
    if name.startswith("tdroid_"):
        return ("static_image", None, None)
    return ("image", None, "wrist_image" if name in WITH_WRIST else None)


def layout_features(name):
    return {"/".join(f["path"]): f for f in LAYOUTS[name]["features"]}


def test_the_package_copy_is_the_reference():
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is not on this machine")
    assert json.loads(REFERENCE.read_text()) == json.loads(LAYOUTS_COPY.read_text())


def test_every_openvla_dataset_is_registered_once_and_in_its_group():
    assert sorted(OXE) == sorted(LAYOUTS) and len(OXE) == 70
    groups = {name: REGISTRY[name].group for name in REGISTRY}
    assert {n for n, g in groups.items() if g == "tdroid"} == {n for n in OXE if n.startswith("tdroid_")}
    assert {n for n, g in groups.items() if g == "libero"} == {n for n in OXE if n.startswith("libero_")}
    assert {n for n, g in groups.items() if g == "droid_finetuning"} == {"droid_wipe"}
    assert {n for n, g in groups.items() if g == "calvin"} == {"calvin", "calvin_recomputed", "calvin_robovlms"}
    assert set(groups.values()) <= set(GROUPS)


@pytest.mark.parametrize("name", OXE)
def test_keys_and_widths_come_from_the_layout(name):
    spec, lay = REGISTRY[name], LAYOUTS[name]
    features = layout_features(name)
    assert dict(spec.step_shapes).keys() == set(spec.required_keys)
    for key, shape in spec.step_shapes:
        assert key in features and features[key]["kind"] == "tensor", key
        if lay["status"] == "assumed":
            assert shape is None, f"{key}: assumed layouts take widths from the data"
        else:
            assert shape == tuple(features[key]["shape"]), key
    assert spec.language_key == "/".join(lay["language"]["key"])
    cameras = (spec.primary_image, spec.secondary_image, spec.wrist_image)
    assert cameras == tuple(None if c is None else f"observation/{c}" for c in expected_cameras(name))
    for key in cameras:
        assert key is None or features[key]["kind"] == "image", key


@pytest.mark.parametrize("name", OXE)
def test_encoding_mask_and_output_widths(name):
    spec = REGISTRY[name]
    joint = name in JOINT_POS
    assert spec.action_encoding is (ActionEncoding.JOINT_POS if joint else ActionEncoding.EEF_POS)
    assert spec.openvla_trainable is (not joint)
    assert spec.action_dim == (8 if joint else 7)
    assert spec.normalization_mask == (True,) * (spec.action_dim - 1) + (False,)
    features = layout_features(name)  # assumed layouts: the widths the layout file guesses
    steps = {k: np.full((3, *(s if s is not None else features[k]["shape"])), 0.25) for k, s in spec.step_shapes}
    traj = spec.transform(steps)
    assert traj.action.shape == (3 if not name.startswith("bridge") else 1, spec.action_dim)
    proprio = 7 if name in PROPRIO_7 else 8
    assert traj.proprio.shape[1] == proprio
    assert len(spec.state_obs_keys) >= 1 and traj.proprio.shape[1] >= sum(k is None for k in spec.state_obs_keys)


def test_every_spec_pickles_and_has_its_own_fingerprint():
    fingerprints = set()
    for spec in REGISTRY.values():
        for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
            assert loads(dumps(spec)) == spec
        fingerprints.add(spec.fingerprint())
    assert len(fingerprints) == len(REGISTRY)


# --- features.json check ---------------------------------------------------------------------------------
def _features_json(layout_name, tmp_path):
    from vlaprep.synthetic.layouts import generate_layout_rlds

    version = generate_layout_rlds(tmp_path, layout_name, episodes=1, image_size=8)
    return json.loads((version / "features.json").read_text())


def _set_dims(doc, path, dims):
    node = doc["featuresDict"]["features"]["steps"]["sequence"]["feature"]
    for part in path[:-1]:
        node = node["featuresDict"]["features"][part]
    node["featuresDict"]["features"][path[-1]]["tensor"]["shape"] = {"dimensions": [str(d) for d in dims]}


def test_check_step_shapes_names_a_wrong_width(tmp_path):
    doc = _features_json("viola", tmp_path)
    spec = REGISTRY["viola"]
    widths = check_step_shapes(spec, doc)
    assert widths["observation/gripper_states"] == 1 and widths["action/gripper_closedness_action"] == 1
    flat = step_features(doc)
    assert flat["observation/agentview_rgb"]["kind"] == "image"
    assert flat["observation/natural_language_instruction"]["kind"] == "tensor"  # Tensor(string), not Text
    assert flat["observation/natural_language_instruction"]["dtype"] == "string"
    _set_dims(doc, ["observation", "gripper_states"], [2])  # what vlaprep used to expect
    with pytest.raises(FeatureMismatchError, match=r"expected width 1 \(shape \(1,\)\), got shape \(2,\) for key "
                                                   r"'observation/gripper_states' in dataset 'viola'"):
        check_step_shapes(spec, doc)


def test_check_step_shapes_missing_key_and_assumed_widths(tmp_path):
    spec = REGISTRY["robo_net"]
    doc = _features_json("robo_net", tmp_path)
    _set_dims(doc, ["observation", "state"], [6])  # assumed layout: any width is the dataset's own
    assert check_step_shapes(spec, doc)["observation/state"] == 6
    del doc["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]["action"]
    with pytest.raises(FeatureMismatchError, match="expected step key 'action' in the dataset's features.json"):
        check_step_shapes(spec, doc)
    with pytest.raises(FeatureMismatchError, match="top-level 'steps' feature"):
        check_step_shapes(spec, {"featuresDict": {"features": {}}})


def test_kuka_and_bc_z_keys_with_slashes_are_found(tmp_path):
    for name in ("kuka", "bc_z"):
        doc = _features_json(name, tmp_path / name)
        widths = check_step_shapes(REGISTRY[name], doc)
        assert set(widths) == set(REGISTRY[name].required_keys)
    flat = step_features(_features_json("kuka", tmp_path / "again"))
    assert flat["observation/clip_function_input/base_pose_tool_reached"]["encoding"] == "zlib"


def test_empty_trajectory_error_is_raised_only_where_openvla_counts():
    spec = REGISTRY["libero_goal_no_noops"]
    with pytest.raises(EmptyTrajectoryError):
        spec.transform({k: np.zeros((0, *s)) for k, s in spec.step_shapes})
