"""Sources read back what the generators wrote, through Beam, and quarantine what they cannot read."""

import base64
import io
import os
import pickle
import shutil

import apache_beam as beam
import numpy as np
import pytest
import tensorflow_datasets as tfds
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from PIL import Image

from vlaprep.pipelines import safe_pickle
from vlaprep.pipelines.sources import (
    ReadDataset,
    SourceError,
    source_units,
    list_calvin_windows,
    read_rlds_shard,
    resolve_rlds_version_dir,
)
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.synthetic.calvin import generate_calvin, rel_actions
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.transforms.registry import get_spec


@pytest.fixture(scope="module")
def rlds(tmp_path_factory):
    return generate_rlds(tmp_path_factory.mktemp("rlds"), episodes=12, seed=5, image_size=24, num_shards=2)


@pytest.fixture(scope="module")
def calvin(tmp_path_factory):
    return generate_calvin(tmp_path_factory.mktemp("calvin") / "root", frames=300, seed=2, image_static=12, image_gripper=8)


def _collect(transform, tmp_path):
    """Run the source in a TestPipeline; return (episodes, quarantine) read back from text sinks."""
    with BeamTestPipeline() as p:
        result = p | transform
        for tag in ("episodes", "quarantine"):
            _ = (
                result[tag]
                | f"Pickle{tag}" >> beam.Map(lambda x: base64.b64encode(pickle.dumps(x)).decode())
                | f"Write{tag}" >> beam.io.WriteToText(str(tmp_path / tag / "part"))
            )
    out = []
    for tag in ("episodes", "quarantine"):
        items = []
        for name in sorted(os.listdir(tmp_path / tag)):
            items += [pickle.loads(base64.b64decode(line)) for line in open(tmp_path / tag / name) if line.strip()]
        out.append(items)
    return out


def test_read_rlds_matches_tfds(rlds, tmp_path):
    spec = get_spec("bridge_orig")
    episodes, quarantined = _collect(ReadDataset(str(rlds), spec, image_roles=("primary",)), tmp_path)
    assert quarantined == []
    builder = tfds.builder_from_directory(str(rlds))
    expected = {}
    for split in builder.info.splits:
        for ex in tfds.as_numpy(builder.as_dataset(split=split, decoders={"steps": tfds.decode.SkipDecoding()})):
            expected[ex["episode_metadata"]["episode_id"]] = ex["steps"]
    assert len(episodes) == len(expected) == 12
    assert len({e.episode_id for e in episodes}) == 12
    by_action = {e.steps["action"].tobytes(): e for e in episodes}
    for steps in expected.values():
        ep = by_action[steps["action"].tobytes()]
        np.testing.assert_array_equal(ep.steps["observation/state"], steps["observation"]["state"])
        assert ep.language == steps["language_instruction"][0].decode()
        assert len(ep.images["primary"]) == len(steps["action"])
        assert Image.open(io.BytesIO(ep.images["primary"][0])).size == (24, 24)
        assert ep.images["primary"][0] == steps["observation"]["image_0"][0]


def test_resolve_version_dir_variants(rlds, tmp_path):
    assert resolve_rlds_version_dir(str(rlds)) == str(rlds)
    assert resolve_rlds_version_dir(str(rlds.parent)) == str(rlds)
    assert resolve_rlds_version_dir(str(rlds.parent.parent)) == str(rlds)
    with pytest.raises(SourceError, match="does not exist"):
        resolve_rlds_version_dir(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="expected a TFDS dataset"):
        resolve_rlds_version_dir(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_quarantines_every_unread_record(rlds, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(rlds, copy)
    spec = get_spec("bridge_orig")
    (shard,) = next(u for u in source_units(str(copy), spec) if u.prefix.startswith("train/")).items
    path = copy / shard.filename
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    items = list(read_rlds_shard(shard, spec))
    episodes = [i for i in items if isinstance(i, Episode)]
    quarantined = [i for i in items if isinstance(i, QuarantineRecord)]
    assert len(episodes) + len(quarantined) == shard.num_records
    assert quarantined and all(shard.filename in q.reason for q in quarantined)
    assert len({q.episode_id for q in quarantined} | {e.episode_id for e in episodes}) == shard.num_records


def test_read_calvin_windows_and_rel_actions(calvin, tmp_path):
    spec = get_spec("calvin_recomputed")  # reads `actions` too, so rel_actions can be checked
    episodes, quarantined = _collect(ReadDataset(str(calvin), spec, image_roles=("primary", "wrist")), tmp_path)
    assert quarantined == []
    windows = list_calvin_windows(str(calvin))
    assert sorted(e.episode_id for e in episodes) == sorted(w.episode_id for w in windows)
    for ep in episodes:
        start, end = (int(v) for v in ep.episode_id.split("/")[1].split("-"))
        assert ep.num_steps == end - start
        np.testing.assert_allclose(rel_actions(ep.steps["actions"], ep.steps["robot_obs"]), ep.steps["rel_actions"], atol=1e-6)
        assert ep.images["primary"].shape == (end - start, 12, 12, 3) and ep.images["wrist"].dtype == np.uint8
        assert ep.language


def test_calvin_units_cover_every_window_once(calvin):
    spec = get_spec("calvin")
    units = source_units(str(calvin), spec)
    windows = [w for u in units for w in u.items]
    assert [w.episode_id for w in windows] == [w.episode_id for w in list_calvin_windows(str(calvin))]
    for unit in units:  # a unit's files are the frames its windows read, and only those
        frames = {f"episode_{f:07d}.npz" for w in unit.items for f in range(w.start, w.end)}
        assert {os.path.basename(f) for f in unit.files} == frames
        assert 0 < len(unit.items) <= 64


def test_calvin_faults_are_quarantined(tmp_path):
    root = generate_calvin(tmp_path / "c", frames=300, seed=3, image_static=8, image_gripper=8,
                           missing_frame_in_window=True, window_past_segment=True)
    episodes, quarantined = _collect(ReadDataset(str(root), get_spec("calvin")), tmp_path / "out")
    windows = list_calvin_windows(str(root))
    assert len(episodes) + len(quarantined) == len(windows)
    reasons = sorted(q.reason for q in quarantined)
    assert any("frames past it" in r for r in reasons)
    assert any("no such file" in r for r in reasons)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vlaprep-pwned",))


def test_malicious_annotation_pickle_is_refused_and_never_runs(tmp_path, calvin):
    root = tmp_path / "evil"
    shutil.copytree(calvin, root)
    target = "/tmp/vlaprep-pwned"
    if os.path.exists(target):
        os.unlink(target)
    path = root / "training" / "lang_annotations" / "auto_lang_ann.npy"
    np.save(path, np.array({"language": {"ann": [_Exploit()]}, "info": {"indx": [(0, 1)]}}, dtype=object), allow_pickle=True)
    with pytest.raises(safe_pickle.UnsafePickleError, match="posix.system|os.system"):
        list_calvin_windows(str(root))
    assert not os.path.exists(target)
    # A legitimate object array of NumPy values and strings still loads.
    ok = tmp_path / "ok.npy"
    np.save(ok, np.array({"a": np.arange(3), "b": ("x", 1)}, dtype=object), allow_pickle=True)
    loaded = safe_pickle.load_pickled_npy(str(ok))
    assert loaded["b"] == ("x", 1) and loaded["a"].tolist() == [0, 1, 2]
