"""Language per step, as OpenVLA reads it, and trajectories OpenVLA counts although they are empty.

Expectations come from the raw TFRecords (``tf.train.Example`` protobufs read here, not vlaprep's
reader): each shard row's ``instruction`` is the instruction stored at its own step.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from vlaprep.pipelines import cli
from vlaprep.pipelines.shards.options import EMPTY_LANGUAGE_REASON, EMPTY_TRAJECTORY_REASON
from vlaprep.pipelines.sources.rlds import decode_text
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

IN_MEMORY = "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner"
LANGUAGE = "steps/observation/natural_language_instruction"


def _step_languages(version_dir, episode_id: str) -> list[str]:
    """The instruction of every step of one episode, from its TFRecord (``<split>/<file>/<index>``)."""
    _split, filename, index = episode_id.split("/")
    records = list(tf.data.TFRecordDataset(os.path.join(version_dir, filename)).as_numpy_iterator())
    example = tf.train.Example.FromString(records[int(index)])
    return [v.decode("utf-8") for v in example.features.feature[LANGUAGE].bytes_list.value]


def _rows(out) -> list[dict]:
    rows = []
    for split in ("train", "heldout"):
        for name in sorted(os.listdir(out / split)):
            rows += pq.read_table(out / split / name, columns=["episode_id", "step_index", "num_steps", "instruction"]).to_pylist()
    return rows


@pytest.fixture(scope="module")
def jaco(tmp_path_factory):
    root = tmp_path_factory.mktemp("jaco")
    version = generate_rlds(root / "data", layout="jaco_play", episodes=10, image_size=16, seed=4)
    build_llama_like_tokenizer(root / "tok")
    assert cli.main(["stats", "--dataset", f"jaco_play={version}", "--output", str(root / "stats"), IN_MEMORY]) == 0
    out = root / "shards"
    assert cli.main(["shards", "--dataset", f"jaco_play={version}", "--statistics", str(root / "stats" / "dataset_statistics.json"),
                     "--tokenizer", str(root / "tok"), "--output", str(out), "--image-size", "16", IN_MEMORY]) == 0
    return version, out


def test_every_row_has_its_own_steps_instruction(jaco):
    version, out = jaco
    by_episode = defaultdict(list)
    for row in _rows(out):
        by_episode[row["episode_id"]].append(row)
    assert by_episode
    mixed = 0
    for episode_id, rows in by_episode.items():
        languages = _step_languages(version, episode_id)
        assert len(languages) == rows[0]["num_steps"]  # jaco_play keeps every step
        for row in rows:
            assert row["instruction"] == languages[row["step_index"]]
        mixed += len({r["instruction"] for r in rows}) > 1
    assert mixed >= 1, "expected an episode whose instruction changes along it (the generator writes one)"


def test_only_episodes_without_any_instruction_are_dropped(jaco):
    version, out = jaco
    quarantine = [json.loads(line) for line in (out / "quarantine" / "quarantine.jsonl").read_text().splitlines()]
    unlabeled = {q["episode_id"] for q in quarantine if q["reason"] == EMPTY_LANGUAGE_REASON}
    assert unlabeled
    for episode_id in unlabeled:
        assert not any(t.strip() for t in _step_languages(version, episode_id))
    written = {r["episode_id"] for r in _rows(out)}
    for episode_id in written:
        assert any(t.strip() for t in _step_languages(version, episode_id))


def test_language_table_text_ends_at_the_first_nul():
    # OpenVLA decodes Language Table's int32 code points and keeps the text before the first NUL.
    codes = np.array([112, 117, 115, 104, 0, 120, 121, 0, 0], np.int32)
    assert decode_text(codes) == "push"
    assert decode_text(np.array([104, 105], np.int64)) == "hi"
    assert decode_text(np.zeros(4, np.int32)) == ""


def test_a_two_step_bridge_episode_counts_in_statistics_and_is_accounted_in_shards(tmp_path):
    version = generate_rlds(tmp_path / "data", name="bridge_orig", episodes=6, image_size=16, max_steps=6, seed=9,
                            short_episodes=(2,), empty_language_fraction=0.0)
    build_llama_like_tokenizer(tmp_path / "tok")
    stats = tmp_path / "stats"
    assert cli.main(["stats", "--dataset", f"bridge_orig={version}", "--output", str(stats), IN_MEMORY]) == 0
    entry = json.loads((stats / "dataset_statistics.json").read_text())["bridge_orig"]
    with open(os.path.join(version, "dataset_info.json")) as f:
        records = sum(int(n) for split in json.load(f)["splits"] for n in split["shardLengths"])
    assert entry["num_trajectories"] == records  # the 2-step episode is an (empty) trajectory, as OpenVLA counts
    out = tmp_path / "shards"
    assert cli.main(["shards", "--dataset", f"bridge_orig={version}", "--statistics", str(stats / "dataset_statistics.json"),
                     "--tokenizer", str(tmp_path / "tok"), "--output", str(out), "--image-size", "16", IN_MEMORY]) == 0
    quarantine = [json.loads(line) for line in (out / "quarantine" / "quarantine.jsonl").read_text().splitlines()]
    empty = [q for q in quarantine if q["reason"].startswith(EMPTY_TRAJECTORY_REASON)]
    assert len(empty) == 1 and empty[0]["stage"] == "transform"
    manifest = json.loads((out / "manifest.json").read_text())
    acc = manifest["accounting"]["bridge_orig"]
    assert acc["read"] == records == acc["train"] + acc["heldout"] + acc["quarantined"]
