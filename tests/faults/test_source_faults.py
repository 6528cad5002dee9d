"""Faults in the sources, end to end: what a damaged RLDS or CALVIN dataset does to `vlaprep stats` and
`vlaprep shards`.

Data faults (a shard shorter than ``dataset_info.json`` declares, a missing shard, records past the
declared count, a record whose CRCs are right but whose payload is garbage or does not fit
``features.json``) are quarantined with their reasons and counted: the expected episode ids and counts
are worked out here from the declared ``shardLengths`` (read as JSON, not through vlaprep) and the
TFRecord framing (parsed here with ``struct``). User errors (damaged metadata, symlink loops, malformed
CALVIN index files) end the command with exit code 2 and one stderr line naming the file.
"""

import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tensorflow_datasets.proto import tf_example_pb2

from vlaprep.pipelines import cli, safe_pickle
from vlaprep.pipelines.sources import resolve_dataset
from vlaprep.pipelines.sources.rlds import RecordDecodeError, RLDSShard, read_rlds_shard, rlds_keys, rlds_parser
from vlaprep.pipelines.sources.tfrecord import iter_tfrecord_file, masked_crc32c
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.synthetic.calvin import generate_calvin
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.registry import get_spec

FAST = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]
NAME = "bridge_orig"
# Protobuf wire format: tag 0xff.. starts a varint that never ends: not a message.
GARBAGE = b"\xff" * 24


# --------------------------------------------------------------------------------------------------
# Independent helpers: the TFRecord framing and the declared shard lengths, without vlaprep's reader
# --------------------------------------------------------------------------------------------------


def _frame(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC32C(length), data, masked CRC32C(data), little-endian."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _records(raw: bytes) -> list[bytes]:
    """The payloads of a TFRecord file, split by its 8-byte lengths (12-byte header, 4-byte footer)."""
    out, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack("<Q", raw[offset:offset + 8])
        out.append(raw[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
    assert offset == len(raw)
    return out


def _declared(version_dir) -> dict[tuple[str, str], int]:
    """{(split, shard file name): declared record count} from dataset_info.json's splits, read as JSON."""
    info = json.loads((version_dir / "dataset_info.json").read_text())
    out = {}
    for split in info["splits"]:
        lengths = [int(n) for n in split["shardLengths"]]
        for i, n in enumerate(lengths):
            out[(split["name"], f"{info['name']}-{split['name']}.tfrecord-{i:05d}-of-{len(lengths):05d}")] = n
    return out


def _write_records(path, records: list[bytes]) -> None:
    path.write_bytes(b"".join(_frame(r) for r in records))


def _example(record: bytes) -> tf_example_pb2.Example:
    return tf_example_pb2.Example.FromString(record)


def _action_as_bytes(record: bytes) -> bytes:
    """steps/action stored as a bytes_list (features.json says float32)."""
    example = _example(record)
    feature = example.features.feature["steps/action"]
    n = len(feature.float_list.value)
    feature.ClearField("float_list")
    feature.bytes_list.value.extend([b"x"] * n)
    return example.SerializeToString()


def _action_one_value_too_many(record: bytes) -> bytes:
    """steps/action with T*7 + 1 floats: does not reshape to [T, 7]."""
    example = _example(record)
    example.features.feature["steps/action"].float_list.value.append(0.5)
    return example.SerializeToString()


def _without_state(record: bytes) -> bytes:
    example = _example(record)
    del example.features.feature["steps/observation/state"]
    return example.SerializeToString()


def _image_as_floats(record: bytes) -> bytes:
    example = _example(record)
    feature = example.features.feature["steps/observation/image_0"]
    n = len(feature.bytes_list.value)
    feature.ClearField("bytes_list")
    feature.float_list.value.extend([0.0] * n)
    return example.SerializeToString()


def _one_error_line(err: str, *needles: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and ": error: " in lines[0] and all(n in lines[0] for n in needles) and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rlds(tmp_path_factory):
    """16 train episodes in 4 shards of 4, 4 val episodes in 4 shards of 1; 3-8 steps of 32x32 images."""
    return generate_rlds(tmp_path_factory.mktemp("srcfaults") / "rlds", episodes=20, seed=11, image_size=32, num_shards=4,
                         val_fraction=0.2, empty_language_fraction=0.0, min_steps=3, max_steps=8)


@pytest.fixture(scope="module")
def calvin(tmp_path_factory):
    return generate_calvin(tmp_path_factory.mktemp("srcfaults") / "calvin", frames=110, seed=3, val_fraction=0.46,
                           image_static=8, image_gripper=8)


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------------------------------
# Record-level behaviour, without Beam
# --------------------------------------------------------------------------------------------------


def test_framing_helper_reproduces_tfds_written_shards(rlds):
    """The test's own framing is TFRecord's: re-framing the payloads gives back each file byte for byte."""
    for (_split, name), n in _declared(rlds).items():
        raw = (rlds / name).read_bytes()
        payloads = _records(raw)
        assert len(payloads) == n
        assert b"".join(_frame(p) for p in payloads) == raw
        assert [bytes(r) for r in iter_tfrecord_file(str(rlds / name))] == payloads


def _shard(version_dir, split, name, n):
    return RLDSShard(str(version_dir), split, 0, name, n)


@pytest.mark.parametrize("kept", [0, 1, 3])
def test_shard_cut_at_a_record_boundary_quarantines_each_missing_record(rlds, tmp_path, kept):
    data = _copy(rlds, tmp_path / "d")
    (split, name), n = next((k, n) for k, n in _declared(rlds).items() if k[0] == "train")
    assert n == 4
    raw = (rlds / name).read_bytes()
    (data / name).write_bytes(b"".join(_frame(p) for p in _records(raw)[:kept]))  # kept=0: a 0-byte file
    items = list(read_rlds_shard(_shard(data, split, name, n), get_spec(NAME)))
    episodes = [i for i in items if isinstance(i, Episode)]
    quarantined = [i for i in items if isinstance(i, QuarantineRecord)]
    assert [e.episode_id for e in episodes] == [f"{split}/{name}/{i}" for i in range(kept)]
    assert [q.episode_id for q in quarantined] == [f"{split}/{name}/{i}" for i in range(kept, n)]
    for q in quarantined:
        assert q.stage == "read"
        assert q.reason.startswith(f"short shard file {name}: {kept} of {n} declared records read")


def test_missing_shard_quarantines_every_declared_record(rlds, tmp_path):
    data = _copy(rlds, tmp_path / "d")
    (split, name), n = next((k, n) for k, n in _declared(rlds).items() if k[0] == "train")
    os.remove(data / name)
    items = list(read_rlds_shard(_shard(data, split, name, n), get_spec(NAME)))
    assert [i.episode_id for i in items] == [f"{split}/{name}/{i}" for i in range(n)]
    assert all(isinstance(i, QuarantineRecord) and i.reason.startswith(f"missing shard file {name}: 0 of {n} declared records")
               for i in items)
    unit = next(u for u in resolve_dataset(NAME, str(data), get_spec(NAME)).units if u.name == name)
    assert unit.files == () and unit.declared == n  # nothing to hash; the fingerprint does not trip on it


def test_records_past_the_declared_count_are_quarantined_not_read(rlds, tmp_path):
    data = _copy(rlds, tmp_path / "d")
    (split, name), n = next((k, n) for k, n in _declared(rlds).items() if k[0] == "val")
    payloads = _records((rlds / name).read_bytes())
    _write_records(data / name, payloads + payloads)  # the file holds 2n records, n declared
    items = list(read_rlds_shard(_shard(data, split, name, n), get_spec(NAME)))
    assert [i.episode_id for i in items if isinstance(i, Episode)] == [f"{split}/{name}/{i}" for i in range(n)]
    extra = [i for i in items if isinstance(i, QuarantineRecord)]
    assert [q.episode_id for q in extra] == [f"{split}/{name}/{i}" for i in range(n, 2 * n)]
    assert all(f"is beyond the {n} declared records" in q.reason and name in q.reason for q in extra)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda r: GARBAGE, ["expected a serialized tf.train.Example, got 24 bytes that do not decode"]),
        (_action_as_bytes, ["'steps/action' as float_list (float32 in features.json), got bytes_list"]),
        (_action_one_value_too_many, ["expected values that fit features.json", "steps/action", "reshape"]),
        (_without_state, ["'steps/observation/state' as float_list", "got no such feature"]),
        (_image_as_floats, ["'steps/observation/image_0' as bytes_list", "got float_list"]),
    ],
    ids=["garbage", "dtype", "shape", "missing-key", "image-kind"],
)
def test_payloads_that_are_not_episodes_raise_record_decode_error(rlds, damage, expected):
    (_split, name), _n = next((k, n) for k, n in _declared(rlds).items() if k[0] == "train")
    record = _records((rlds / name).read_bytes())[0]
    parser = rlds_parser(str(rlds), rlds_keys(get_spec(NAME), ("primary",)), optional=["language_instruction"])
    assert parser.parse(record)["action"].shape[1] == 7  # the undamaged record parses
    with pytest.raises(RecordDecodeError) as info:
        parser.parse(damage(record))
    assert all(e in str(info.value) for e in expected), str(info.value)


def test_garbage_payload_has_valid_checksums_and_is_quarantined_alone(rlds, tmp_path):
    data = _copy(rlds, tmp_path / "d")
    (split, name), n = next((k, n) for k, n in _declared(rlds).items() if k[0] == "train")
    with pytest.raises(DecodeError):
        tf_example_pb2.Example.FromString(GARBAGE)
    payloads = _records((rlds / name).read_bytes())
    payloads[1] = GARBAGE
    _write_records(data / name, payloads)
    assert [bytes(r) for r in iter_tfrecord_file(str(data / name))][1] == GARBAGE  # the CRCs pass
    items = list(read_rlds_shard(_shard(data, split, name, n), get_spec(NAME), ("primary",)))
    assert [type(i).__name__ for i in items] == ["Episode", "QuarantineRecord", "Episode", "Episode"]
    assert items[1].episode_id == f"{split}/{name}/1"
    assert items[1].reason.startswith(f"undecodable record in {name}: expected a serialized tf.train.Example")


class _ParserWithABug:
    """A parser whose own code fails (a bug, not bad data): that must end the run, not be quarantined."""

    def parse(self, record):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")


def test_a_bug_is_not_quarantined(rlds):
    (split, name), n = next((k, n) for k, n in _declared(rlds).items() if k[0] == "train")
    with pytest.raises(TypeError, match="unsupported operand"):
        list(read_rlds_shard(_shard(rlds, split, name, n), get_spec(NAME), parser=_ParserWithABug()))


# --------------------------------------------------------------------------------------------------
# End to end: `vlaprep stats` and `vlaprep shards` over one dataset with every data fault
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def damaged(rlds, tmp_path_factory):
    """Train shards: 0-byte, cut after one record, three bad payloads + one good record, missing.
    Val shard 0: its record written twice (one record past the declared count).

    Returns (version dir, {episode id: reason fragment} the read stage must quarantine, records the
    source holds: declared + undeclared)."""
    root = tmp_path_factory.mktemp("damaged")
    data = _copy(rlds, root / "rlds")
    declared = _declared(rlds)
    train = sorted(k for k in declared if k[0] == "train")
    val = sorted(k for k in declared if k[0] == "val")
    assert [declared[k] for k in train] == [4, 4, 4, 4] and [declared[k] for k in val] == [1, 1, 1, 1]
    expected = {}
    (s, empty), (_, cut), (_, bad), (_, gone) = train
    (data / empty).write_bytes(b"")
    expected.update({f"{s}/{empty}/{i}": f"short shard file {empty}: 0 of 4 declared records read" for i in range(4)})
    (data / cut).write_bytes(_frame(_records((rlds / cut).read_bytes())[0]))
    expected.update({f"{s}/{cut}/{i}": f"short shard file {cut}: 1 of 4 declared records read" for i in range(1, 4)})
    payloads = _records((rlds / bad).read_bytes())
    payloads[:3] = [GARBAGE, _action_as_bytes(payloads[1]), _action_one_value_too_many(payloads[2])]
    _write_records(data / bad, payloads)
    expected[f"{s}/{bad}/0"] = f"undecodable record in {bad}: expected a serialized tf.train.Example"
    expected[f"{s}/{bad}/1"] = f"undecodable record in {bad}: expected feature 'steps/action' as float_list"
    expected[f"{s}/{bad}/2"] = f"undecodable record in {bad}: expected values that fit features.json"
    os.remove(data / gone)
    expected.update({f"{s}/{gone}/{i}": f"missing shard file {gone}: 0 of 4 declared records read" for i in range(4)})
    (v, extra) = val[0]
    _write_records(data / extra, _records((rlds / extra).read_bytes()) * 2)
    expected[f"{v}/{extra}/1"] = f"undeclared record in {extra}: record 1 is beyond the 1 declared records"
    held = sum(declared.values()) + 1
    return data, expected, held


@pytest.fixture(scope="module")
def damaged_stats(damaged, tmp_path_factory):
    data, _expected, _held = damaged
    out = tmp_path_factory.mktemp("damaged_stats")
    assert cli.main(["stats", "--dataset", f"{NAME}={data}", "--output", str(out), *FAST]) == 0
    return out


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_stats_completes_and_accounts_for_every_declared_record(damaged, damaged_stats):
    _data, expected, held = damaged
    quarantine = _jsonl(damaged_stats / "quarantine.jsonl")
    assert sorted(q["episode_id"] for q in quarantine) == sorted(expected)  # 4 + 3 + 3 + 4 + 1 = 15
    assert len(expected) == 15 and held == 21
    for q in quarantine:
        assert q["stage"] == "read" and q["dataset_name"] == NAME
        assert q["reason"].startswith(expected[q["episode_id"]]), (q, expected[q["episode_id"]])
    statistics = json.loads((damaged_stats / "dataset_statistics.json").read_text())[NAME]
    cache = json.loads((damaged_stats / "dataset_statistics.cache.json").read_text())[NAME]
    # Episodes: the cut shard's first record, the bad shard's last one, the 4 val records = 6.
    assert cache["episodes_read"] == statistics["num_trajectories"] == 6
    assert cache["quarantined"] == len(quarantine) == 15
    assert statistics["num_trajectories"] + len(quarantine) == held


def test_shards_completes_and_balances_the_accounting(damaged, damaged_stats, tmp_path_factory):
    data, expected, held = damaged
    root = tmp_path_factory.mktemp("damaged_shards")
    build_llama_like_tokenizer(root / "tok")
    out = root / "out"
    code = cli.main(["shards", "--dataset", f"{NAME}={data}", "--statistics", str(damaged_stats / "dataset_statistics.json"),
                     "--tokenizer", str(root / "tok"), "--output", str(out), "--image-size", "16",
                     "--heldout-fraction", "0.3", *FAST])
    assert code == 0
    acc = json.loads((out / "manifest.json").read_text())["accounting"][NAME]
    assert acc["read"] == held == 21
    assert acc["quarantined_by_stage"] == {"read": 15} and acc["quarantined"] == 15
    assert acc["train"] + acc["heldout"] == 6
    assert acc["read"] == acc["train"] + acc["heldout"] + acc["quarantined"]
    # The same records, with the same reasons, as `vlaprep stats` quarantined: deterministic ids.
    shards_q = {q["episode_id"]: q["reason"] for q in _jsonl(out / "quarantine" / "quarantine.jsonl")}
    stats_q = {q["episode_id"]: q["reason"] for q in _jsonl(damaged_stats / "quarantine.jsonl")}
    assert shards_q == stats_q and sorted(shards_q) == sorted(expected)


def _rerun_stats(damaged, damaged_stats, tmp_path, capsys, edit):
    """Copy the damaged dataset and its stats output, ``edit(dataset copy)``, run stats again into the copy."""
    data, _expected, _held = damaged
    copy, out = _copy(data, tmp_path / "rlds"), _copy(damaged_stats, tmp_path / "stats")
    edit(copy)
    capsys.readouterr()
    assert cli.main(["stats", "--dataset", f"{NAME}={copy}", "--output", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    quarantine = {q["episode_id"]: q["reason"] for q in _jsonl(out / "quarantine.jsonl")}
    return err, quarantine, json.loads((out / "dataset_statistics.json").read_text())[NAME]


def _val_shard(version_dir, i):
    return sorted((k, n) for k, n in _declared(version_dir).items() if k[0] == "val")[i]


def test_stats_reuses_the_quarantine_of_unchanged_shards(damaged, damaged_stats, tmp_path, capsys):
    """Only the shard that changed is read again; the others' read-stage quarantine comes from their
    cached projections (ids re-prefixed), with the same ids and reasons."""
    data, expected, held = damaged
    (v, name), n = _val_shard(data, 1)
    assert n == 1

    def append_a_record(copy):
        _write_records(copy / name, _records((copy / name).read_bytes()) * 2)

    err, quarantine, statistics = _rerun_stats(damaged, damaged_stats, tmp_path, capsys, append_a_record)
    assert "read 1 source units, reused 7 cached unit projections" in err
    assert sorted(quarantine) == sorted([*expected, f"{v}/{name}/1"])
    assert quarantine[f"{v}/{name}/1"].startswith(f"undeclared record in {name}: record 1 is beyond the 1 declared")
    assert all(quarantine[k].startswith(expected[k]) for k in expected)
    assert statistics["num_trajectories"] == 6 and statistics["num_trajectories"] + len(quarantine) == held + 1


@pytest.mark.parametrize("edit", ["second-empty-shard", "shard-lengths-fixed"])
def test_stats_cache_keys_short_shards_by_declared_count(damaged, damaged_stats, tmp_path, capsys, edit):
    data, expected, held = damaged
    (v, name), _n = _val_shard(data, 1)
    (s, cut) = sorted(k for k in _declared(data) if k[0] == "train")[1]
    if edit == "second-empty-shard":  # same bytes as the train shard emptied before, 1 record declared, not 4
        want = {**expected, f"{v}/{name}/0": f"short shard file {name}: 0 of 1 declared records read"}

        def damage(copy):
            (copy / name).write_bytes(b"")
    else:  # dataset_info.json now declares the one record the cut shard holds: nothing of it is missing
        want = {k: r for k, r in expected.items() if not k.startswith(f"{s}/{cut}/")}

        def damage(copy):
            _json_edit("dataset_info.json", lambda doc: _with_train_lengths(doc, ["4", "1", "4", "4"]))(copy)

    _err, quarantine, _statistics = _rerun_stats(damaged, damaged_stats, tmp_path, capsys, damage)
    assert sorted(quarantine) == sorted(want)
    assert all(quarantine[k].startswith(want[k]) for k in want)


def test_leading_short_shards_keep_the_proprio_column(rlds, tmp_path):
    from vlaprep.pipelines.shards.job import probe_proprio_dims

    data = _copy(rlds, tmp_path / "d")
    for _split, name in sorted(k for k in _declared(rlds) if k[0] == "train")[:2]:
        (data / name).write_bytes(b"")
    assert probe_proprio_dims([resolve_dataset(NAME, str(rlds), get_spec(NAME))]) == {NAME: 8}  # clean: bridge_orig's proprio width
    assert probe_proprio_dims([resolve_dataset(NAME, str(data), get_spec(NAME))]) == {NAME: 8}


# --------------------------------------------------------------------------------------------------
# User errors: exit code 2, one stderr line naming the file
# --------------------------------------------------------------------------------------------------


def _half(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _json_edit(name, edit):
    def damage(d):
        doc = json.loads((d / name).read_text())
        (d / name).write_text(json.dumps(edit(doc)))
    return damage


def _with_train_lengths(info: dict, lengths: list[str]) -> dict:
    """dataset_info.json's document with the train split's shardLengths replaced."""
    return {**info, "splits": [{**sp, "shardLengths": lengths} if sp["name"] == "train" else sp for sp in info["splits"]]}


def _loop(path):
    if path.exists():
        os.remove(path)
    os.symlink(path.name, path)  # a link to itself: ELOOP


def _dangle(path):
    os.remove(path)
    os.symlink("gone.tfrecord", path)


def _first_train_shard(d):
    return d / sorted(n for n in os.listdir(d) if "-train.tfrecord-" in n)[0]


RLDS_USER_ERRORS = {
    "truncated-dataset_info": (lambda d: _half(d / "dataset_info.json"), ["dataset_info.json", "expected JSON"]),
    "empty-dataset_info": (lambda d: (d / "dataset_info.json").write_bytes(b""), ["dataset_info.json", "expected JSON"]),
    "truncated-features": (lambda d: _half(d / "features.json"), ["features.json", "expected JSON"]),
    "splits-not-a-list": (_json_edit("dataset_info.json", lambda doc: {**doc, "splits": 5}), ["dataset_info.json", "ParseError"]),
    "bad-version": (_json_edit("dataset_info.json", lambda doc: {**doc, "version": "x.y"}), ["dataset_info.json", "Invalid version"]),
    "negative-shard-length": (
        _json_edit("dataset_info.json", lambda doc: _with_train_lengths(doc, ["-1", "4", "4", "4"])),
        ["dataset_info.json", "expected a record count >= 0, got -1"],
    ),
    "unknown-dtype": (
        lambda d: (d / "features.json").write_text((d / "features.json").read_text().replace('"float32"', '"float99"')),
        ["features.json", "TypeError"],
    ),
    "features-not-a-dict": (lambda d: (d / "features.json").write_text("[1, 2]"), ["features.json"]),
    "loop-dataset_info": (lambda d: _loop(d / "dataset_info.json"), ["dataset_info.json", "symlink loop"]),
    "loop-shard": (lambda d: _loop(_first_train_shard(d)), ["-train.tfrecord-00000-of-00004", "symlink loop"]),
    "dangling-shard": (lambda d: _dangle(_first_train_shard(d)), ["-train.tfrecord-00000-of-00004", "symlink to nothing"]),
}


@pytest.mark.parametrize("case", sorted(RLDS_USER_ERRORS))
def test_rlds_user_errors_are_one_line(rlds, tmp_path, capsys, case):
    damage, needles = RLDS_USER_ERRORS[case]
    data = _copy(rlds, tmp_path / "d")
    damage(data)
    code = cli.main(["stats", "--dataset", f"{NAME}={data}", "--output", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert _one_error_line(err, "vlaprep stats: error: ", *needles), err


def test_rlds_loop_among_versions_is_reported_not_skipped(rlds, tmp_path, capsys):
    """A data_dir whose newest version is a symlink loop: not silently resolved to the older version."""
    root = tmp_path / "data" / NAME
    _copy(rlds, root / "1.0.0")
    os.symlink("1.1.0", root / "1.1.0")
    code = cli.main(["stats", "--dataset", f"{NAME}={root}", "--output", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and _one_error_line(err, "1.1.0", "symlink loop"), err


def test_rlds_metadata_error_in_shards_is_one_line(rlds, damaged_stats, tmp_path, capsys):
    data = _copy(rlds, tmp_path / "d")
    _half(data / "dataset_info.json")
    build_llama_like_tokenizer(tmp_path / "tok")
    code = cli.main(["shards", "--dataset", f"{NAME}={data}", "--statistics", str(damaged_stats / "dataset_statistics.json"),
                     "--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and _one_error_line(err, "vlaprep shards: error: ", "dataset_info.json"), err


class _Harmless:
    def __reduce__(self):
        return (os.getcwd, ())  # refused by the restricted unpickler whatever it is


def _save_segments(array):
    def damage(root):
        np.save(root / "training" / "ep_start_end_ids.npy", array(np.load(root / "training" / "ep_start_end_ids.npy")),
                allow_pickle=True)
    return damage


def _edit_annotations(edit):
    def damage(root):
        path = root / "training" / "lang_annotations" / "auto_lang_ann.npy"
        ann = safe_pickle.load_pickled_npy(str(path))
        np.save(path, np.array(edit(ann), dtype=object), allow_pickle=True)
    return damage


def _set(d, keys, value):
    node = d
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return d


ANN = "auto_lang_ann.npy"
SEG = "ep_start_end_ids.npy"
CALVIN_USER_ERRORS = {
    "segments-object-array": (_save_segments(lambda a: a.astype(object)), [SEG, "Object arrays cannot be loaded"]),
    "segments-nan": (_save_segments(lambda a: np.array([[a[0, 0], np.nan]])), [SEG, "expected integer frame ids", "nan", "row 0"]),
    "segments-fraction": (_save_segments(lambda a: a.astype(np.float64) + [[0.0, 0.5]]), [SEG, "expected integer frame ids"]),
    "segments-reversed": (_save_segments(lambda a: a[:, ::-1].copy()), [SEG, "0 <= start <= end", "row 0"]),
    "segments-negative": (_save_segments(lambda a: a - a.max() - 1), [SEG, "0 <= start <= end"]),
    "segments-strings": (_save_segments(lambda a: a.astype(str)), [SEG, "expected integer frame ids, got dtype <U"]),
    "segments-truncated": (lambda r: _half(r / "training" / SEG), [SEG, "expected an integer array [N, 2]"]),
    "annotations-truncated": (lambda r: _half(r / "training" / "lang_annotations" / ANN), [ANN, "expected a pickled dict"]),
    "annotations-not-npy": (lambda r: (r / "training" / "lang_annotations" / ANN).write_bytes(b"not a numpy file\n"), [ANN]),
    "annotations-list": (_edit_annotations(lambda a: [a]), [ANN, "got ndarray of shape (1,)"]),
    "annotations-no-indx": (_edit_annotations(lambda a: _set(a, ["info"], {})), [ANN, "{'language': {'ann'"]),
    "annotations-indx-nan": (_edit_annotations(lambda a: _set(a, ["info", "indx", 0], (np.nan, 5))), [ANN, "index 0 of 'indx'"]),
    "annotations-indx-triple": (_edit_annotations(lambda a: _set(a, ["info", "indx", 0], (1, 2, 3))), [ANN, "index 0 of 'indx'"]),
    "annotations-ann-not-str": (_edit_annotations(lambda a: _set(a, ["language", "ann", 0], 7)), [ANN, "index 0 of 'ann'"]),
    "annotations-unsafe": (_edit_annotations(lambda a: _set(a, ["language", "ann", 0], _Harmless())), [ANN, "refusing to unpickle"]),
    "loop-split-dir": (lambda r: (shutil.rmtree(r / "training"), os.symlink("training", r / "training")), ["training", "symlink loop"]),
    "loop-annotations": (lambda r: _loop(r / "training" / "lang_annotations" / ANN), [ANN, "symlink loop"]),
}


@pytest.mark.parametrize("case", sorted(CALVIN_USER_ERRORS))
def test_calvin_user_errors_are_one_line_before_any_work(calvin, tmp_path, capsys, case):
    damage, needles = CALVIN_USER_ERRORS[case]
    root = _copy(calvin, tmp_path / "c")
    damage(root)
    code = cli.main(["stats", "--dataset", f"calvin={root}", "--output", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert _one_error_line(err, "vlaprep stats: error: ", *needles), err
    assert not (tmp_path / "o" / "dataset_statistics.json").exists()


def test_unsafe_annotations_error_is_still_an_unsafe_pickle_error(calvin, tmp_path):
    from vlaprep.pipelines.sources import SourceError
    from vlaprep.pipelines.sources.calvin import list_calvin_windows

    root = _copy(calvin, tmp_path / "c")
    CALVIN_USER_ERRORS["annotations-unsafe"][0](root)
    with pytest.raises(safe_pickle.UnsafePickleError) as info:
        list_calvin_windows(str(root))
    assert isinstance(info.value, SourceError) and isinstance(info.value, pickle.UnpicklingError)


def test_undamaged_calvin_still_reads(calvin, tmp_path):
    """The checks accept what the generator writes (int64 segments, str annotations, int windows)."""
    out = tmp_path / "o"
    assert cli.main(["stats", "--dataset", f"calvin={calvin}", "--output", str(out), *FAST]) == 0
    assert json.loads((out / "dataset_statistics.json").read_text())["calvin"]["num_trajectories"] >= 1
