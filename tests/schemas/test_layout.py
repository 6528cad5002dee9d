"""``vlaprep.schemas.layout``: the one reader of a shards manifest and of a run's ``LATEST`` pointer.

The manifest comes from a real ``vlaprep shards`` run on generated data; the expectations are read
back from the files themselves (sizes, digests, Parquet row counts), not from the writer's code.
"""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest

from vlaprep.pipelines import cli
from vlaprep.schemas import layout
from vlaprep.schemas.episode import QuarantineRecord, quarantine_jsonl
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

IN_MEMORY = "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner"


@pytest.fixture(scope="module")
def shards_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    rlds = generate_rlds(root / "rlds", name="bridge_orig", episodes=8, image_size=32, max_steps=8, seed=3)
    build_llama_like_tokenizer(root / "tok")
    assert cli.main(["stats", "--dataset", f"bridge_orig={rlds}", "--output", str(root / "stats"), IN_MEMORY]) == 0
    out = root / "shards"
    assert cli.main([
        "shards", "--dataset", f"bridge_orig={rlds}", "--statistics", str(root / "stats" / "dataset_statistics.json"),
        "--tokenizer", str(root / "tok"), "--output", str(out), "--image-size", "32", "--heldout-fraction", "0.3", IN_MEMORY,
    ]) == 0
    return str(out)


def test_manifest_files_match_the_files_on_disk(shards_out):
    manifest = layout.read_manifest(shards_out)
    on_disk = sorted(
        f"{split}/{name}" for split in layout.SPLITS for name in os.listdir(os.path.join(shards_out, split))
    )
    assert sorted(f.path for f in manifest.files()) == on_disk
    for split in layout.SPLITS:
        assert all(f.split == split for f in manifest.files(split))
    for f in manifest.files():
        full = manifest.path(f.path)
        with open(full, "rb") as fh:
            data = fh.read()
        assert f.bytes == len(data)
        assert f.sha256 == hashlib.sha256(data).hexdigest()
        assert f.rows == pq.read_metadata(full).num_rows
    with open(manifest.statistics_path, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == manifest.statistics_sha256
    assert manifest.options["image_size"] == 32
    assert set(manifest.datasets) == {"bridge_orig"} == set(manifest.input_datasets)
    assert manifest.statistics_relpath == layout.STATISTICS_COPY
    top_level = [line.split(":")[0] for line in manifest.arrow_schema.splitlines() if not line.startswith(" ")]
    for f in manifest.files():  # (Parquet names list items "element" where the writer's schema says "item")
        assert pq.read_schema(manifest.path(f.path)).names == top_level


def test_quarantine_file_is_written_by_the_one_writer(shards_out):
    manifest = layout.read_manifest(shards_out)
    with open(manifest.path(layout.SHARDS_QUARANTINE_FILE), "rb") as fh:
        data = fh.read()
    records = [QuarantineRecord(**json.loads(line)) for line in data.decode().splitlines()]
    assert quarantine_jsonl(records) == data  # byte for byte what the one writer produces
    assert manifest.quarantine["records"] == len(records)


def test_a_missing_or_edited_manifest_is_one_clear_error(tmp_path, shards_out):
    with pytest.raises(layout.ManifestError, match="incomplete or was never written"):
        layout.read_manifest(str(tmp_path))
    with open(os.path.join(shards_out, layout.MANIFEST_FILE)) as f:
        document = json.load(f)
    crafted = json.loads(json.dumps(document))
    crafted["files"][0]["path"] = "../../etc/passwd"
    with pytest.raises(layout.ManifestError, match="manifest"):
        layout.Manifest.parse(json.dumps(crafted), shards_out)
    with pytest.raises(layout.ManifestError, match="parse error"):
        layout.Manifest.parse(b"{not json", shards_out)
    extra = json.loads(json.dumps(document))
    extra["statistics_path"] = "elsewhere.json"  # keys the writer never writes are refused, not guessed at
    with pytest.raises(layout.ManifestError, match="does not match"):
        layout.Manifest.parse(json.dumps(extra), shards_out)


def test_latest_pointer_names_a_version_not_a_path():
    assert layout.parse_latest(b'{"version": "v-1", "history": ["v-1"]}', "/runs/x")["version"] == "v-1"
    with pytest.raises(layout.ManifestError, match="inside '/runs/x/versions'"):  # names where it would escape
        layout.parse_latest(b'{"version": "../x"}', "/runs/x")
    for bad in (b'{"version": "../x"}', b'{"version": "/abs"}', b'{"version": "a/b"}', b"[]", b"{"):
        with pytest.raises(layout.ManifestError):
            layout.parse_latest(bad, "/runs/x")
    assert layout.latest_shards_root("/runs/x", "v-1") == os.path.join("/runs/x", "versions", "v-1", "shards")


def test_shard_relpath_is_the_manifest_pattern():
    assert layout.shard_relpath("train", 3, 10) == "train/shard-00003-of-00010.parquet"
