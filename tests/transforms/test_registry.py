"""The dataset registry: built-in entries, spec validation, fingerprints, pickling, YAML registries."""

import dataclasses
import json
import pickle
import shutil
import textwrap

import numpy as np
import pytest

from vlaprep.transforms import calvin, oxe, registry
from vlaprep.transforms.base import ActionEncoding, SourceFormat, TransformError
from vlaprep.transforms.registry import (
    REGISTRY,
    SOURCE_FORMATS,
    DatasetSpec,
    GenericTransform,
    get_spec,
    load_registry_yaml,
    merged_registry,
    register,
)

try:
    import cloudpickle
except ImportError:  # Beam vendors it
    from apache_beam.internal.cloudpickle import cloudpickle

# The entries these tests work out by hand (the original built-ins); ALL_BUILTINS is the whole registry.
BUILTINS = [
    "bridge_orig",
    "bridge_dataset",
    "fractal20220817_data",
    "taco_play",
    "jaco_play",
    "berkeley_cable_routing",
    "roboturk",
    "viola",
    "toto",
    "language_table",
    "calvin",
    "calvin_recomputed",
    "calvin_robovlms",
]

# OpenVLA's OXE_DATASET_CONFIGS names in its order (oxe/configs.py), then vlaprep's CALVIN variants.
ALL_BUILTINS = [
    "fractal20220817_data", "kuka", "bridge_oxe", "bridge_orig", "bridge_dataset", "taco_play", "jaco_play",
    "berkeley_cable_routing", "roboturk", "nyu_door_opening_surprising_effectiveness", "viola", "berkeley_autolab_ur5",
    "toto", "language_table", "columbia_cairlab_pusht_real",
    "stanford_kuka_multimodal_dataset_converted_externally_to_rlds", "nyu_rot_dataset_converted_externally_to_rlds",
    "stanford_hydra_dataset_converted_externally_to_rlds", "austin_buds_dataset_converted_externally_to_rlds",
    "nyu_franka_play_dataset_converted_externally_to_rlds", "maniskill_dataset_converted_externally_to_rlds",
    "furniture_bench_dataset_converted_externally_to_rlds", "cmu_franka_exploration_dataset_converted_externally_to_rlds",
    "ucsd_kitchen_dataset_converted_externally_to_rlds", "ucsd_pick_and_place_dataset_converted_externally_to_rlds",
    "austin_sailor_dataset_converted_externally_to_rlds", "austin_sirius_dataset_converted_externally_to_rlds", "bc_z",
    "utokyo_pr2_opening_fridge_converted_externally_to_rlds",
    "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds",
    "utokyo_xarm_pick_and_place_converted_externally_to_rlds", "utokyo_xarm_bimanual_converted_externally_to_rlds",
    "robo_net", "berkeley_mvp_converted_externally_to_rlds", "berkeley_rpt_converted_externally_to_rlds",
    "kaist_nonprehensile_converted_externally_to_rlds", "stanford_mask_vit_converted_externally_to_rlds",
    "tokyo_u_lsmo_converted_externally_to_rlds", "dlr_sara_pour_converted_externally_to_rlds",
    "dlr_sara_grid_clamp_converted_externally_to_rlds", "dlr_edan_shared_control_converted_externally_to_rlds",
    "asu_table_top_converted_externally_to_rlds", "stanford_robocook_converted_externally_to_rlds",
    "imperialcollege_sawyer_wrist_cam", "iamlab_cmu_pickup_insert_converted_externally_to_rlds", "uiuc_d3field",
    "utaustin_mutex", "berkeley_fanuc_manipulation", "cmu_playing_with_food", "cmu_play_fusion", "cmu_stretch",
    "berkeley_gnm_recon", "berkeley_gnm_cory_hall", "berkeley_gnm_sac_son", "droid", "fmb_dataset", "dobbe", "roboset",
    "rh20t", "tdroid_carrot_in_bowl", "tdroid_pour_corn_in_pot", "tdroid_flip_pot_upright",
    "tdroid_move_object_onto_plate", "tdroid_knock_object_over", "tdroid_cover_object_with_towel", "droid_wipe",
    "libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops", "libero_10_no_noops",
    "calvin", "calvin_recomputed", "calvin_robovlms",
]

_BRIDGE = {"action": (7,), "observation/state": (7,)}
_CALVIN = {"rel_actions": (7,), "robot_obs": (15,)}
# Per-step shape of every key each built-in reads (from the OXE / CALVIN feature specs).
STEP_SHAPES = {
    "bridge_orig": _BRIDGE,
    "bridge_dataset": _BRIDGE,
    "fractal20220817_data": {
        "action/world_vector": (3,),
        "action/rotation_delta": (3,),
        "action/gripper_closedness_action": (1,),
        "observation/base_pose_tool_reached": (7,),
        "observation/gripper_closed": (1,),
    },
    "taco_play": {"action/rel_actions_world": (7,), "observation/robot_obs": (15,)},
    "jaco_play": {
        "action/world_vector": (3,),
        "action/gripper_closedness_action": (1,),
        "observation/end_effector_cartesian_pos": (7,),
    },
    "berkeley_cable_routing": {"action/world_vector": (3,), "action/rotation_delta": (3,), "observation/robot_state": (7,)},
    "roboturk": {"action/world_vector": (3,), "action/rotation_delta": (3,), "action/gripper_closedness_action": (1,)},
    "viola": {
        "action/world_vector": (3,),
        "action/rotation_delta": (3,),
        "action/gripper_closedness_action": (),
        "observation/joint_states": (7,),
        "observation/gripper_states": (1,),  # features.json: (1,)
    },
    "toto": {"action/world_vector": (3,), "action/rotation_delta": (3,), "action/open_gripper": (), "observation/state": (7,)},
    "language_table": {"action": (2,), "observation/effector_translation": (2,)},
    "calvin": _CALVIN,
    "calvin_recomputed": {"actions": (7,), "robot_obs": (15,), "rel_actions": (7,)},
    "calvin_robovlms": _CALVIN,
}
PROPRIO_DIM = {name: 8 for name in BUILTINS} | {"calvin": 15, "calvin_recomputed": 15, "calvin_robovlms": 15}


def make_steps(name, t=5, seed=0):
    rng = np.random.default_rng(seed)
    steps = {k: rng.uniform(-1, 1, (t, *shape)) for k, shape in STEP_SHAPES[name].items()}
    if "action/open_gripper" in steps:
        steps["action/open_gripper"] = steps["action/open_gripper"] > 0
    if name == "calvin_recomputed":  # stored rel_actions must agree with the recomputation
        steps["rel_actions"] = calvin.relative_actions(steps["actions"], steps["robot_obs"])
    return steps


def assert_same_trajectory(a, b):
    for field in ("action", "proprio", "step_index"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


# --- Built-in entries ----------------------------------------------------------------------------
def test_builtin_names():
    assert list(REGISTRY) == ALL_BUILTINS
    assert len(ALL_BUILTINS) == 73 and set(BUILTINS) <= set(ALL_BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_spec_is_eef_pos_with_gripper_unmasked(name):
    spec = REGISTRY[name]
    assert spec.name == name
    assert spec.action_encoding is ActionEncoding.EEF_POS
    assert spec.action_dim == 7
    assert spec.normalization_mask == (True,) * 6 + (False,)
    assert spec.source_format == ("calvin" if name.startswith("calvin") else "rlds")


def test_builtin_camera_and_language_keys():
    bridge = REGISTRY["bridge_orig"]
    assert (bridge.primary_image, bridge.wrist_image, bridge.language_key) == ("observation/image_0", None, "language_instruction")
    assert REGISTRY["bridge_dataset"].transform is oxe.bridge_orig_transform
    fractal = REGISTRY["fractal20220817_data"]
    assert (fractal.primary_image, fractal.wrist_image, fractal.language_key) == (
        "observation/image",
        None,
        "observation/natural_language_instruction",
    )
    taco = REGISTRY["taco_play"]
    assert (taco.primary_image, taco.wrist_image) == ("observation/rgb_static", "observation/rgb_gripper")
    for name in ("calvin", "calvin_recomputed", "calvin_robovlms"):
        spec = REGISTRY[name]
        assert (spec.primary_image, spec.wrist_image, spec.language_key) == ("rgb_static", "rgb_gripper", None)
    assert (bridge.camera_key("primary"), bridge.camera_key("wrist")) == ("observation/image_0", None)


@pytest.mark.parametrize("name", BUILTINS)
def test_required_keys_are_complete_and_all_needed(name):
    spec = REGISTRY[name]
    assert set(spec.required_keys) == set(STEP_SHAPES[name])
    steps = make_steps(name)
    traj = spec.transform({k: steps[k] for k in spec.required_keys})  # nothing else is given
    expected_t = 3 if name.startswith("bridge") else 5
    assert traj.action.shape == (expected_t, spec.action_dim)
    assert traj.proprio.shape == (expected_t, PROPRIO_DIM[name])
    for missing in spec.required_keys:
        partial = {k: v for k, v in steps.items() if k != missing}
        with pytest.raises(TransformError, match=f"expected step key {missing!r}"):
            spec.transform(partial)


@pytest.mark.parametrize("name", BUILTINS)
def test_every_spec_survives_pickle_and_cloudpickle(name):
    spec = REGISTRY[name]
    steps = make_steps(name, seed=7)
    expected = spec.transform(steps)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        copy = loads(dumps(spec))
        assert copy == spec
        assert copy.fingerprint() == spec.fingerprint()
        assert_same_trajectory(copy.transform(steps), expected)


# --- Validation ----------------------------------------------------------------------------------
def _spec(**overrides):
    base = dict(
        name="x",
        transform=oxe.bridge_orig_transform,
        source_format="rlds",
        primary_image="observation/image_0",
        wrist_image=None,
        language_key="language_instruction",
        required_keys=("action",),
        action_encoding=ActionEncoding.EEF_POS,
        action_dim=7,
        normalization_mask=(True,) * 6 + (False,),
    )
    return DatasetSpec(**(base | overrides))


def test_mask_length_must_match_action_dim():
    with pytest.raises(ValueError, match=r"normalization_mask of length action_dim \(7\), got 6"):
        _spec(normalization_mask=(True,) * 6)


@pytest.mark.parametrize("bad", ["", "-x", ".x", "a..b", "a/b", "a b", "../etc", "é"])
def test_bad_names_are_rejected(bad):
    with pytest.raises(ValueError, match="expected a dataset name matching"):
        _spec(name=bad)


@pytest.mark.parametrize("good", ["x", "_x", "bridge_orig", "my.robot-v1.0", "0abc"])
def test_good_names(good):
    assert _spec(name=good).name == good


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"source_format": "hdf5"}, r"expected source_format one of \['rlds', 'calvin'\], got 'hdf5'"),
        ({"action_dim": 0, "normalization_mask": ()}, "expected action_dim to be a positive int, got 0"),
        ({"action_encoding": "eef_pos"}, "expected an ActionEncoding, got 'eef_pos'"),
        ({"transform": "not callable"}, "expected a callable transform"),
        ({"primary_image": ""}, "expected primary_image to be a non-empty str or None"),
        ({"normalization_mask": (1,) * 7}, "expected normalization_mask of bools"),
        ({"required_keys": ("a", "")}, "expected required_keys to be non-empty strs"),
    ],
)
def test_field_validation(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _spec(**overrides)


def test_lists_become_tuples():
    spec = _spec(required_keys=["a", "b"], normalization_mask=[True] * 6 + [False])
    assert spec.required_keys == ("a", "b") and spec.normalization_mask == (True,) * 6 + (False,)
    hash(spec)


def test_register_rejects_duplicates():
    reg = {}
    register(_spec(name="a"), registry=reg)
    with pytest.raises(ValueError, match="got 'a' which is already registered"):
        register(_spec(name="a"), registry=reg)
    with pytest.raises(ValueError, match="already registered"):
        register(_spec(name="bridge_orig"))  # the default registry is the built-ins
    assert list(REGISTRY) == ALL_BUILTINS


def test_get_spec():
    assert get_spec("toto") is REGISTRY["toto"]
    reg = {"a": _spec(name="a")}
    assert get_spec("a", reg).name == "a"
    with pytest.raises(KeyError) as info:
        get_spec("nope")
    msg = info.value.args[0]
    assert msg.startswith("unknown dataset 'nope'; known: ['asu_table_top_converted_externally_to_rlds', 'austin_buds")
    assert msg.endswith("; hint: add it with --registry FILE")


def test_default_normalization_masks():
    assert registry.default_normalization_mask(ActionEncoding.EEF_POS, 7) == (True,) * 6 + (False,)
    assert registry.default_normalization_mask(ActionEncoding.EEF_R6, 10) == (True,) * 9 + (False,)
    assert registry.default_normalization_mask(ActionEncoding.JOINT_POS_BIMANUAL, 14) == ((True,) * 6 + (False,)) * 2
    with pytest.raises(ValueError, match="even action_dim"):
        registry.default_normalization_mask(ActionEncoding.JOINT_POS_BIMANUAL, 7)


# --- Fingerprints --------------------------------------------------------------------------------
def test_fingerprint_is_stable_and_sensitive_to_fields():
    spec = REGISTRY["bridge_orig"]
    fp = spec.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp == spec.fingerprint() == dataclasses.replace(spec).fingerprint()
    changed = [
        dataclasses.replace(spec, normalization_mask=(True,) * 7),
        dataclasses.replace(spec, transform=oxe.toto_transform),
        dataclasses.replace(spec, wrist_image="observation/image_1"),
        dataclasses.replace(spec, required_keys=spec.required_keys + ("extra",)),
        REGISTRY["bridge_dataset"],  # same transform, other name
    ]
    fps = {c.fingerprint() for c in changed}
    assert fp not in fps and len(fps) == len(changed)
    assert len({REGISTRY[n].fingerprint() for n in BUILTINS}) == len(BUILTINS)


def test_fingerprint_of_generic_transform_depends_on_its_fields():
    spec = _spec(transform=GenericTransform(action_keys=("action",), gripper="binarize"))
    other = _spec(transform=GenericTransform(action_keys=("action",), gripper="invert"))
    assert spec.fingerprint() != other.fingerprint()


def test_fingerprint_covers_transform_sources(tmp_path, monkeypatch):
    spec = REGISTRY["bridge_orig"]
    fp = spec.fingerprint()
    copy = tmp_path / "transforms"
    shutil.copytree(registry._TRANSFORMS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(registry, "_TRANSFORMS_DIR", copy)
    assert spec.fingerprint() == fp  # names and bytes, not paths
    with open(copy / "gripper.py", "a") as f:
        f.write("\n# a helper changed\n")
    fp_helper = spec.fingerprint()
    assert fp_helper != fp
    (copy / "new_module.py").write_text("X = 1\n")
    assert spec.fingerprint() not in (fp, fp_helper)


# --- GenericTransform ----------------------------------------------------------------------------
def test_generic_transform_concatenates_and_binarizes():
    steps = {
        "action/xyz": np.array([[1.0, 2.0, 3.0]] * 4),
        "action/grip": np.array([0.0, 1.0, 0.5, 0.0]),  # [T] -> one column
        "observation/state": np.arange(8.0).reshape(4, 2),
        "observation/g": np.array([0.5, 0.25, 0.0, 1.0]),
    }
    fn = GenericTransform(("action/xyz", "action/grip"), "binarize", ("observation/state", "observation/g"), drop_first_step=True, action_dim=4)
    traj = fn(steps)
    # steps 1..3; binarize([1.0, 0.5, 0.0]) = [1, 0, 0]
    np.testing.assert_array_equal(traj.action, [[1, 2, 3, 1.0], [1, 2, 3, 0.0], [1, 2, 3, 0.0]])
    np.testing.assert_array_equal(traj.proprio, [[2, 3, 0.25], [4, 5, 0.0], [6, 7, 1.0]])
    np.testing.assert_array_equal(traj.step_index, [1, 2, 3])
    assert traj.action.dtype == np.float32 and traj.step_index.dtype == np.int64
    assert fn.required_keys == ("action/xyz", "action/grip", "observation/state", "observation/g")


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("none", [0.0, 1.0, -1.0, 0.5]),
        ("invert", [1.0, 0.0, 2.0, 0.5]),
        ("clip01", [0.0, 1.0, 0.0, 0.5]),
        ("rel2abs", [1.0, 0.0, 1.0, 0.0]),  # thr [0, -1, +1, -1] (0.5 > 0.1 closes), start +1
        ("binarize", [0.0, 1.0, 0.0, 0.5]),  # trailing 0.5 keeps its raw value
    ],
)
def test_generic_gripper_modes(mode, expected):
    steps = {"a": np.array([[9.0, 0.0], [9.0, 1.0], [9.0, -1.0], [9.0, 0.5]])}
    traj = GenericTransform(("a",), mode)(steps)
    np.testing.assert_array_equal(traj.action[:, 1], expected)
    np.testing.assert_array_equal(traj.action[:, 0], [9.0] * 4)
    assert traj.proprio.shape == (4, 0)
    np.testing.assert_array_equal(steps["a"][:, 1], [0.0, 1.0, -1.0, 0.5])  # input untouched


def test_generic_errors():
    with pytest.raises(ValueError, match=r"expected gripper to be one of \['binarize'"):
        GenericTransform(("a",), "flip")
    with pytest.raises(ValueError, match="expected action_keys to be a sequence of keys, got the str 'a'"):
        GenericTransform("a", "none")
    with pytest.raises(ValueError, match="at least one action key"):
        GenericTransform((), "none")
    with pytest.raises(TransformError, match=r"expected action width 7, got 2 from keys \['a'\]"):
        GenericTransform(("a",), "none", action_dim=7)({"a": np.zeros((3, 2))})
    with pytest.raises(TransformError, match="expected at least 2 steps, got 1"):
        GenericTransform(("a",), "none", drop_first_step=True)({"a": np.zeros((1, 2))})
    with pytest.raises(TransformError, match="expected step key 'b'"):
        GenericTransform(("a", "b"), "none")({"a": np.zeros((1, 2))})


def test_generic_transform_pickles():
    fn = GenericTransform(["a"], "rel2abs", ["s"], drop_first_step=False, action_dim=2, dataset="d")
    steps = {"a": np.array([[0.1, 0.0], [0.2, 1.0]]), "s": np.ones((2, 3))}
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        copy = loads(dumps(fn))
        assert copy == fn and hash(copy) == hash(fn)
        assert_same_trajectory(copy(steps), fn(steps))


# --- YAML registries -----------------------------------------------------------------------------
GOOD_YAML = """
datasets:
  my_robot:
    format: rlds
    action_keys: [action]
    action_dim: 7
    gripper: binarize
    state_keys: [observation/state]
    primary_image: observation/image_0
    wrist_image: observation/wrist_image
    language_key: language_instruction
    drop_first_step: true
  my_calvin:
    format: calvin
    action_keys: [rel_actions]
    action_dim: 7
    gripper: none
    primary_image: rgb_static
    action_encoding: eef_pos
    normalization_mask: [true, true, true, false, false, false, false]
"""


def _write(tmp_path, text, name="reg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_yaml_good_file(tmp_path):
    path = _write(tmp_path, GOOD_YAML)
    specs = load_registry_yaml(path)
    assert list(specs) == ["my_robot", "my_calvin"]
    robot = specs["my_robot"]
    assert robot.transform == GenericTransform(("action",), "binarize", ("observation/state",), True, 7, "my_robot")
    assert (robot.source_format, robot.primary_image, robot.wrist_image, robot.language_key) == (
        "rlds",
        "observation/image_0",
        "observation/wrist_image",
        "language_instruction",
    )
    assert robot.required_keys == ("action", "observation/state")
    assert robot.action_encoding is ActionEncoding.EEF_POS and robot.action_dim == 7
    assert robot.normalization_mask == (True,) * 6 + (False,)
    cal = specs["my_calvin"]
    assert cal.language_key is None and cal.wrist_image is None
    assert cal.normalization_mask == (True, True, True, False, False, False, False)
    assert cal.transform.state_keys == () and cal.transform.drop_first_step is False

    action = np.zeros((4, 7))
    action[:, 6] = [1.0, 0.0, 0.7, 1.0]
    traj = robot.transform({"action": action, "observation/state": np.arange(8.0).reshape(4, 2)})
    np.testing.assert_array_equal(traj.action[:, 6], [0.0, 1.0, 1.0])  # binarize([0, 0.7, 1])
    np.testing.assert_array_equal(traj.proprio, [[2, 3], [4, 5], [6, 7]])
    np.testing.assert_array_equal(traj.step_index, [1, 2, 3])

    # The YAML specs pickle like the built-ins.
    for spec in specs.values():
        assert pickle.loads(pickle.dumps(spec)) == spec
        assert cloudpickle.loads(cloudpickle.dumps(spec)) == spec


def test_yaml_bad_gripper_value(tmp_path):
    path = _write(tmp_path, GOOD_YAML.replace("gripper: binarize", "gripper: x"))
    with pytest.raises(ValueError) as info:
        load_registry_yaml(path)
    assert str(info.value) == (
        f"expected gripper to be one of ['binarize', 'invert', 'rel2abs', 'clip01', 'none'], "
        f"got 'x' for dataset 'my_robot' in {path}"
    )


def test_yaml_duplicate_name_in_file(tmp_path):
    text = GOOD_YAML + GOOD_YAML.split("datasets:\n", 1)[1].split("  my_calvin:")[0]
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match="duplicate key 'my_robot'"):
        load_registry_yaml(path)


def test_yaml_builtin_collision_needs_override(tmp_path):
    text = GOOD_YAML.replace("my_robot:", "bridge_orig:")
    with pytest.raises(ValueError, match="got 'bridge_orig' which is a built-in entry"):
        load_registry_yaml(_write(tmp_path, text))
    text = text.replace("drop_first_step: true", "drop_first_step: true\n    override: true")
    path = _write(tmp_path, text, "override.yaml")
    merged = merged_registry(path)
    assert isinstance(merged["bridge_orig"].transform, GenericTransform)
    assert REGISTRY["bridge_orig"].transform is oxe.bridge_orig_transform  # built-ins untouched
    assert set(merged) == set(ALL_BUILTINS) | {"my_calvin"}


def test_merged_registry(tmp_path):
    assert merged_registry(None) == REGISTRY and merged_registry(None) is not REGISTRY
    merged = merged_registry(_write(tmp_path, GOOD_YAML))
    assert list(merged) == ALL_BUILTINS + ["my_robot", "my_calvin"]
    assert get_spec("my_robot", merged).name == "my_robot"


@pytest.mark.parametrize(
    "old, new, pattern",
    [
        ("    drop_first_step: true", "    drop_first_step: true\n    colour: red", r"got \['colour'\]"),
        ("    action_dim: 7\n    gripper: binarize", "    gripper: binarize", "expected field 'action_dim'"),
        ("action_dim: 7\n    gripper: binarize", "action_dim: seven\n    gripper: binarize", "action_dim to be a positive int, got 'seven'"),
        ("format: rlds", "format: hdf5", r"format to be one of \['rlds', 'calvin'\], got 'hdf5'"),
        ("action_keys: [action]", "action_keys: []", "action_keys to be a non-empty list"),
        ("action_keys: [action]", "action_keys: action", "action_keys to be a non-empty list of step keys, got 'action'"),
        ("drop_first_step: true", "drop_first_step: yes please", "drop_first_step to be true or false"),
        ("    language_key: language_instruction\n", "", "expected field 'language_key'"),
        ("    action_encoding: eef_pos", "    action_encoding: quaternion", "action_encoding to be one of"),
        ("[true, true, true, false, false, false, false]", "[true, false]", r"normalization_mask to be a list of 7"),
        ("  my_robot:", "  ../evil:", "expected a dataset name matching"),
    ],
)
def test_yaml_bad_values(tmp_path, old, new, pattern):
    assert old in GOOD_YAML
    path = _write(tmp_path, GOOD_YAML.replace(old, new, 1))
    with pytest.raises(ValueError, match=pattern) as info:
        load_registry_yaml(path)
    assert path in str(info.value)


@pytest.mark.parametrize("text", ["", "datasets: []", "other: {}", "- a\n- b", "datasets: {a: 1}", "datasets: {a: [\n"])
def test_yaml_bad_layout(tmp_path, text):
    with pytest.raises(ValueError, match="expected"):
        load_registry_yaml(_write(tmp_path, text))


# --- source_format is a SourceFormat; cameras is the one role -> step key lookup ----------------
@pytest.mark.parametrize("given, expected", [
    ("rlds", SourceFormat.RLDS), ("calvin", SourceFormat.CALVIN), (SourceFormat.CALVIN, SourceFormat.CALVIN),
])
def test_source_format_is_coerced_to_the_enum(given, expected):
    spec = _spec(source_format=given)
    assert type(spec.source_format) is SourceFormat and spec.source_format is expected


@pytest.mark.parametrize("bad", ["hdf5", "RLDS", "", 3, None])
def test_unknown_source_format_is_named(bad):
    with pytest.raises(ValueError, match=rf"expected source_format one of \['rlds', 'calvin'\], got {bad!r} for dataset 'x'"):
        _spec(source_format=bad)


def test_source_formats_lists_the_enum_values_in_order():
    assert SOURCE_FORMATS == ("rlds", "calvin") == tuple(SourceFormat)


def test_source_format_serializes_as_the_string_it_replaces():
    """Manifests and fingerprints write it through json: the bytes must be those of the plain string."""
    member = _spec(source_format="calvin").source_format
    assert json.dumps({"source_format": member}) == '{"source_format": "calvin"}'
    assert json.dumps({"f": member}, indent=2) == json.dumps({"f": "calvin"}, indent=2)
    assert f"{member}" == str(member) == "calvin" and member == "calvin" and hash(member) == hash("calvin")
    assert _spec(source_format="calvin").fingerprint() == _spec(source_format=SourceFormat.CALVIN).fingerprint()
    assert _spec(source_format="calvin").fingerprint() != _spec(source_format="rlds").fingerprint()


def test_spec_with_the_enum_pickles_and_replaces():
    spec = get_spec("calvin")
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec and copy.source_format is SourceFormat.CALVIN
    assert dataclasses.replace(spec).source_format is SourceFormat.CALVIN


def test_cameras_maps_each_set_role_to_its_step_key():
    assert _spec().cameras == {"primary": "observation/image_0"}
    both = _spec(wrist_image="observation/wrist", secondary_image="observation/image_1")
    assert both.cameras == {"primary": "observation/image_0", "secondary": "observation/image_1", "wrist": "observation/wrist"}
    assert list(both.cameras) == ["primary", "secondary", "wrist"]
    assert _spec(primary_image=None, wrist_image="w").cameras == {"wrist": "w"}
    assert get_spec("calvin").cameras == {"primary": "rgb_static", "wrist": "rgb_gripper"}


def test_camera_key_reads_cameras_and_refuses_unknown_roles():
    for spec in REGISTRY.values():
        for role in ("primary", "secondary", "wrist"):
            assert spec.camera_key(role) == spec.cameras.get(role)
    with pytest.raises(ValueError, match=r"expected a camera role among \['primary', 'secondary', 'wrist'\], got 'left'"):
        _spec().camera_key("left")
