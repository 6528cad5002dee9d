"""The RLDS source reads back what TFDS wrote, through Beam, and quarantines what it cannot read."""

import io
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vlaprep.pipelines.sources import ReadDataset, SourceError, resolve_dataset
from vlaprep.pipelines.sources.rlds import read_rlds_shard, resolve_rlds_version_dir
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.transforms.registry import get_spec


def test_read_rlds_matches_tfds(rlds, tmp_path, collect):
    spec = get_spec("bridge_orig")
    episodes, quarantined = collect(ReadDataset(resolve_dataset(spec.name, str(rlds), spec), image_roles=("primary",)), tmp_path)
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
    (shard,) = next(u for u in resolve_dataset(spec.name, str(copy), spec).units if u.prefix.startswith("train/")).items
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
