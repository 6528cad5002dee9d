"""Paths read from manifests and pointers never lead outside the directory they describe."""

import json

import pytest

from vlaprep.paths import confined


@pytest.mark.parametrize("bad", ["/etc/passwd", "../secret.parquet", "train/../../x", "gs://bucket/x", "C:\\\\x", "", "a//b"])
def test_confined_refuses_escapes(bad):
    with pytest.raises(ValueError, match="expected a relative path inside"):
        confined("/data/out", bad, "manifest.json")


def test_confined_accepts_plain_relative_paths():
    assert confined("/data/out", "train/shard-00000-of-00001.parquet", "m") == "/data/out/train/shard-00000-of-00001.parquet"


def test_loader_refuses_a_crafted_manifest(tmp_path):
    from vlaprep.loader import ShardDataset

    (tmp_path / "manifest.json").write_text(json.dumps({"files": [{"path": "../../etc/passwd", "split": "train"}]}))
    with pytest.raises(ValueError, match="expected a relative path inside"):
        ShardDataset(str(tmp_path), split="train")


def test_loader_refuses_a_crafted_latest_pointer(tmp_path):
    from vlaprep.loader import ShardDataset

    (tmp_path / "LATEST").write_text(json.dumps({"version": "../../elsewhere"}))
    with pytest.raises(ValueError, match="expected a relative path inside"):
        ShardDataset(str(tmp_path), split="train")


def test_shards_verify_refuses_a_crafted_manifest(tmp_path):
    from vlaprep.pipelines.shards.publish import verify_output

    manifest = {"files": [{"path": "/etc/hostname", "bytes": 1, "sha256": "0" * 64}], "quarantine": {"path": "q", "bytes": 0, "sha256": "0" * 64}}
    with pytest.raises(ValueError, match="expected a relative path inside"):
        verify_output(str(tmp_path), manifest)
