"""Fault injection on the shard path: an undecodable JPEG and an inf action inside otherwise valid
TFRecords (re-serialized with correct checksums), run through `vlaprep shards`."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from vlaprep.pipelines import cli
from vlaprep.pipelines.sources.tfrecord import iter_tfrecord_file
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

FAST = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


def _rewrite_record(path, index, edit):
    records = [bytes(r) for r in iter_tfrecord_file(str(path))]
    example = tf.train.Example.FromString(records[index])
    edit(example.features.feature)
    records[index] = example.SerializeToString()
    with tf.io.TFRecordWriter(str(path)) as writer:
        for r in records:
            writer.write(r)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("shardfaults")
    version_dir = generate_rlds(root / "rlds", episodes=8, seed=31, image_size=32, num_shards=1, val_fraction=0.0,
                                empty_language_fraction=0.0)
    shard = next(p for p in os.listdir(version_dir) if "train.tfrecord" in p)

    def bad_jpeg(feature):
        images = feature["steps/observation/image_0"].bytes_list.value
        images[1] = b"\xff\xd8\xff\xe0 this is not a jpeg"

    def inf_action(feature):
        values = feature["steps/action"].float_list.value
        values[3] = float("inf")

    _rewrite_record(version_dir / shard, 2, bad_jpeg)
    _rewrite_record(version_dir / shard, 5, inf_action)
    build_llama_like_tokenizer(root / "tok")
    assert cli.main(["stats", "--dataset", f"bridge_orig={version_dir}", "--output", str(root / "stats"), *FAST]) == 0
    return root, version_dir, shard


def test_bad_jpeg_and_inf_are_quarantined_and_accounted(damaged, tmp_path):
    root, version_dir, shard = damaged
    out = tmp_path / "shards"
    code = cli.main(["shards", "--dataset", f"bridge_orig={version_dir}", "--statistics", str(root / "stats" / "dataset_statistics.json"),
                     "--tokenizer", str(root / "tok"), "--output", str(out), "--image-size", "16", "--heldout-fraction", "0.0", *FAST])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    quarantine = {q["episode_id"]: q for q in map(json.loads, (out / "quarantine" / "quarantine.jsonl").read_text().splitlines())}
    assert quarantine[f"train/{shard}/2"]["stage"] == "shard"  # the JPEG fails to decode while building rows
    assert "InvalidArgument" in quarantine[f"train/{shard}/2"]["reason"] or "decode" in quarantine[f"train/{shard}/2"]["reason"].lower()
    assert quarantine[f"train/{shard}/5"]["stage"] == "transform"
    assert "inf" in quarantine[f"train/{shard}/5"]["reason"]
    acc = manifest["accounting"]["bridge_orig"]
    assert acc["read"] == 8 and acc["train"] == 6 and acc["quarantined"] == 2
    assert acc["read"] == acc["train"] + acc["heldout"] + acc["quarantined"]


def test_statistics_skip_the_inf_episode_only(damaged):
    root, _version_dir, shard = damaged
    quarantine = [json.loads(l) for l in (root / "stats" / "quarantine.jsonl").read_text().splitlines()]
    assert [q["episode_id"] for q in quarantine] == [f"train/{shard}/5"]  # statistics never decode images
    stats = json.loads((root / "stats" / "dataset_statistics.json").read_text())["bridge_orig"]
    assert stats["num_trajectories"] == 7 and all(np.isfinite(stats["action"]["max"]))
