"""``DatasetSpec.source_format`` is a ``SourceFormat`` (strings coerced, serialized as before) and
``DatasetSpec.cameras`` is the one role -> step key lookup."""

import dataclasses
import json
import pickle

import pytest

from vlaprep.transforms import oxe
from vlaprep.transforms.base import ActionEncoding, SourceFormat
from vlaprep.transforms.registry import REGISTRY, SOURCE_FORMATS, DatasetSpec, get_spec


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
