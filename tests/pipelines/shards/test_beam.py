"""The shard stage's composite Beam steps on their own: ``EncodeEpisodes`` and ``WriteShards`` in a
``TestPipeline``, on generated Bridge episodes and the tiny Llama-like tokenizer.

Expectations are worked out here, not by the code under test: the split from the sha256 rule, the
action ids from OpenVLA's formula (float32 ``bounds_q99`` normalization, ``vocab - digitize`` on
``linspace(-1, 1, 256)``), the prompt ids from the HF tokenizer on OpenVLA's full training text, and
the shard files' content from the spilled rows themselves, in key order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam import Create, Map
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from vlaprep.pipelines.sources import resolve_dataset
from vlaprep.pipelines.shards.beam import EncodeEpisodes, WriteShards
from vlaprep.pipelines.shards.options import EMPTY_LANGUAGE_REASON, ShardOptions
from vlaprep.pipelines.shards.rows import EncoderConfig, EpisodeEncoder
from vlaprep.pipelines.shards.spill import read_spilled
from vlaprep.pipelines.shards.tokenization import TokenizerFiles
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.schemas.shards import Column
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.base import Trajectory
from vlaprep.transforms.registry import get_spec

NAME = "bridge_orig"
VOCAB = 32000
SEED, FRACTION = 3, 0.5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six labeled Bridge episodes (4-9 steps, 32 px), action statistics taken from their own actions,
    and the options and encoder config of a run with half of the episodes held out."""
    root = tmp_path_factory.mktemp("shards_beam")
    rlds = generate_rlds(root / "rlds", episodes=6, seed=11, image_size=32, min_steps=4, max_steps=9, val_fraction=0.0,
                         empty_language_fraction=0.0)
    tokenizer = build_llama_like_tokenizer(root / "tokenizer")
    spec = get_spec(NAME)
    dataset = resolve_dataset(spec.name, str(rlds), spec)
    episodes = [e for u in dataset.units for e in dataset.iter_episodes(u, ("primary",))
                if isinstance(e, Episode)]
    actions = np.concatenate([spec.transform(e.steps).action for e in episodes]).astype(np.float64)
    block = {"mean": actions.mean(0).tolist(), "std": actions.std(0).tolist(), "min": actions.min(0).tolist(),
             "max": actions.max(0).tolist(), "q01": np.quantile(actions, 0.01, axis=0).tolist(),
             "q99": np.quantile(actions, 0.99, axis=0).tolist(), "mask": list(spec.normalization_mask)}
    options = ShardOptions(image_size=16, cameras=("primary",), heldout_fraction=FRACTION, seed=SEED, action_chunk=1,
                           normalization="bounds_q99", action_encoding="uniform", target_shard_bytes=1 << 20, action_dim=7,
                           vocab_size=VOCAB, eos_id=2, model_max_length=2048, tokenization="text_round_trip")
    config = EncoderConfig(options, {NAME: spec}, {NAME: block}, tokenizer_files=TokenizerFiles.from_dir(str(root / "tokenizer")))
    return {"episodes": episodes, "block": block, "tokenizer": tokenizer, "options": options, "config": config}


def expected_split(episode_id: str) -> str:
    score = int.from_bytes(hashlib.sha256(f"{SEED}\0{NAME}\0{episode_id}".encode()).digest()[:8], "big") / 2**64
    return "heldout" if score < FRACTION else "train"


def expected_action_ids(episode: Episode, block: dict) -> list[list[int]]:
    """OpenVLA's ids of each row's action (N = 1): bounds_q99 in float32, masked dims raw, then binned."""
    x = np.asarray(get_spec(NAME).transform(episode.steps).action, np.float32)
    low, high = np.asarray(block["q01"]), np.asarray(block["q99"])
    y = np.clip(np.float32(2) * (x - low.astype(np.float32)) / (high - low + 1e-8).astype(np.float32) - np.float32(1), -1, 1)
    y = np.where(np.asarray(block["mask"]), y, x)
    y = np.where(np.asarray(block["min"]) == np.asarray(block["max"]), np.float32(0), y)
    return (VOCAB - np.digitize(np.clip(y.astype(np.float64), -1, 1), np.linspace(-1, 1, 256))).tolist()


def spilled_rows(element, spill_dir):
    """(key, EpisodeRef) -> (key, the spilled rows' action ids, their input ids), as hashable tuples."""
    key, ref = element
    table = pa.Table.from_batches(list(read_spilled(spill_dir, ref)))
    ids = tuple(tuple(r) for r in table.column(Column.ACTION_TOKEN_IDS).to_pylist())
    return key, ids, tuple(tuple(r) for r in table.column(Column.INPUT_IDS).to_pylist())


def test_encode_episodes_spills_rows_with_openvla_ids_and_quarantines_unlabeled(data, tmp_path):
    kept, unlabeled = data["episodes"][:-1], dataclasses.replace(data["episodes"][-1], language="", step_languages=())
    tok, want = data["tokenizer"], []
    for episode in kept:
        ids = expected_action_ids(episode, data["block"])
        prompt = f"In: What action should the robot take to {episode.language.lower()}?\nOut: "
        input_ids = tuple(tuple(tok(prompt + tok.decode(row) + "</s>").input_ids) for row in ids)
        assert all(row[-8:] == (*ids[t], 2) for t, row in enumerate(input_ids))  # the prompt/action boundary holds
        want.append(((expected_split(episode.episode_id), NAME, episode.episode_id), tuple(map(tuple, ids)), input_ids))
    assert {key[0] for key, _, _ in want} == {"train", "heldout"}
    spill = str(tmp_path / "spill")
    with BeamTestPipeline() as p:
        out = p | Create([*kept, unlabeled]) | EncodeEpisodes(data["config"], spill)
        assert_that(out["encoded"] | Map(spilled_rows, spill), equal_to(want), label="Rows")
        assert_that(out["quarantine"], equal_to([QuarantineRecord(NAME, unlabeled.episode_id, "shard", EMPTY_LANGUAGE_REASON)]),
                    label="Quarantine")


def test_encode_episodes_quarantines_records_shorter_than_their_steps(data, tmp_path):
    """Fewer frames or instructions than steps is bad data: quarantined with the reason, not a failed run."""
    episode = data["episodes"][0]
    steps = episode.num_steps  # Bridge's rows are source steps 1..T-2: the last one, T-2, is missing in both
    few_frames = dataclasses.replace(episode, episode_id="few-frames", images={"primary": episode.images["primary"][: steps - 2]})
    few_texts = dataclasses.replace(episode, episode_id="few-texts", step_languages=episode.step_languages[: steps - 2])
    want = [
        QuarantineRecord(NAME, "few-frames", "shard", f"ValueError: expected a frame for source step {steps - 2}, got {steps - 2} "
                         "frames; hint: the record has fewer images than steps"),
        QuarantineRecord(NAME, "few-texts", "shard", f"ValueError: expected an instruction for each of the {steps} source steps, "
                         f"got {steps - 2}; hint: the record has fewer instructions than steps"),
    ]
    with BeamTestPipeline() as p:
        out = p | Create([few_frames, few_texts]) | EncodeEpisodes(data["config"], str(tmp_path / "spill"))
        assert_that(out["encoded"], equal_to([]), label="Rows")
        assert_that(out["quarantine"], equal_to(want), label="Quarantine")


def _raises_index_error(steps):
    raise IndexError("simulated bug in a dataset transform")


def _step_index_past_the_source(steps):
    trajectory = get_spec(NAME).transform(steps)
    past = np.full_like(trajectory.step_index, len(next(iter(steps.values()))))
    return Trajectory(trajectory.action, trajectory.proprio, past)


@pytest.mark.parametrize("transform, message", [
    (_raises_index_error, "simulated bug in a dataset transform"),
    (_step_index_past_the_source, r"expected step_index in \[0, \d+\) \(the source steps\) from the transform of 'bridge_orig'"),
])
def test_a_bug_in_a_transform_fails_the_run_instead_of_quarantining(data, tmp_path, transform, message):
    """An IndexError from a registry entry's transform (raised, or an index into the episode that does not
    exist) is the transform's bug: the run fails with it; no episode is quarantined for it."""
    buggy = dataclasses.replace(get_spec(NAME), transform=transform)
    config = dataclasses.replace(data["config"], specs={NAME: buggy})
    with pytest.raises(IndexError, match=message):
        with BeamTestPipeline() as p:
            _ = p | Create(data["episodes"][:1]) | EncodeEpisodes(config, str(tmp_path / "spill"))


@pytest.mark.parametrize("target_bytes, files_per_episode", [(1, True), (1 << 40, False)])
def test_write_shards_files_hold_exactly_the_given_rows_in_key_order(data, tmp_path, target_bytes, files_per_episode):
    """A 1-byte target makes every episode its own shard (a shard holds at least one); 1 TiB puts each split
    in one file. Either way the files, in index order, hold the spilled rows in (split, dataset, id) order."""
    spill, root = str(tmp_path / "spill"), str(tmp_path / "out")
    os.makedirs(spill)
    encoder = EpisodeEncoder(data["options"], data["config"].specs, data["config"].action_stats, data["tokenizer"])
    encoded = [encoder.encode(episode, spill) for episode in data["episodes"]]
    spilled = {key: pa.Table.from_batches(list(read_spilled(spill, ref))) for key, ref in encoded}
    by_split = {s: sorted(k for k in spilled if k[0] == s) for s in ("train", "heldout")}
    assert all(len(keys) >= 2 for keys in by_split.values())
    want_files = {f"{s}/shard-{i:05d}-of-{n:05d}.parquet": keys[i:i + 1] if files_per_episode else keys
                  for s, keys in by_split.items() for n in [len(keys) if files_per_episode else 1] for i in range(n)}

    def check(lines):
        infos = {i["path"]: i for i in map(json.loads, lines)}
        assert sorted(infos) == sorted(want_files)
        for path, keys in want_files.items():
            table = pq.read_table(os.path.join(root, path))
            assert table.equals(pa.concat_tables([spilled[k] for k in keys])), path
            info = infos[path]
            with open(os.path.join(root, path), "rb") as f:
                assert info["sha256"] == hashlib.sha256(f.read()).hexdigest()
            assert (info["rows"], info["episodes"], info["datasets"]) == (
                table.num_rows, len(keys), {NAME: {"episodes": len(keys), "rows": table.num_rows}})

    with BeamTestPipeline() as p:
        files = p | Create(list(reversed(encoded))) | WriteShards(root, spill, data["options"].schema(), target_bytes)
        assert_that(files, check)
