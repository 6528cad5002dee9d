"""The loader serves only what the manifest published: sha256 per file (hashed once per process), no
manifest -> refused. Shards are written here with pyarrow, uncompressed and PLAIN-encoded, so a value can
be forged in place: same size, same row count, still a valid Parquet file."""

import hashlib
import importlib.util
import io
import json
import os
import pathlib
import shutil
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from vlaprep import loader
from vlaprep.errors import UserError
from vlaprep.loader import ShardDataset, ShardIntegrityError, UnpublishedShardsError, collate_vla
from vlaprep.schemas.shards import LABEL_IGNORE, shard_schema

_spec = importlib.util.spec_from_file_location("manifest_helpers", pathlib.Path(__file__).parents[1] / "manifest_helpers.py")
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)

D = 2  # action width; chunk N = 1
MARK = 1234.5  # action[1] of the marked row: its 4 float32 bytes occur once in the file
FORGED = -999.25


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _table(episodes, marked=None) -> pa.Table:
    """episodes: [(episode, num_steps)]; action = [episode, step], or [episode, MARK] at ``marked`` (episode, step)."""
    rows = [(ep, t, n) for ep, n in episodes for t in range(n)]
    ids = [[31744 + ep, 2] for ep, t, _ in rows]
    action = [[float(ep), MARK if (ep, t) == marked else float(t)] for ep, t, _ in rows]
    return pa.Table.from_pydict(
        {
            "dataset_name": ["toy"] * len(rows),
            "episode_id": [f"ep{ep:03d}" for ep, _, _ in rows],
            "step_index": [t for _, t, _ in rows],
            "num_steps": [n for _, _, n in rows],
            "instruction": ["pick"] * len(rows),
            "input_ids": [[1] + i[:1] + [2] for i in ids],
            "labels": [[LABEL_IGNORE] + i[:1] + [2] for i in ids],
            "action_token_ids": [i for i in ids],
            "action": action,
            "normalized_action": action,
            "action_chunk": action,
            "action_chunk_mask": [[True]] * len(rows),
            "normalized_action_chunk": action,
            "image_primary": [_png(ep) for ep, _, _ in rows],
        },
        schema=shard_schema(D, 1),
    )


FILES = [[(0, 2), (1, 3)], [(2, 2)], [(3, 1), (4, 2)], [(5, 3)]]


def write_output(root, files=FILES, marked=(2, 1)):
    """``root/train/shard-*.parquet`` + manifest.json as the shard job writes it -> relative paths."""
    os.makedirs(root / "train", exist_ok=True)
    written = []
    for i, episodes in enumerate(files):
        rel = f"train/shard-{i:05d}-of-{len(files):05d}.parquet"
        pq.write_table(_table(episodes, marked), root / rel, compression="NONE", use_dictionary=False, row_group_size=2)
        written.append(rel)
    helper.write_manifest(root, options={"action_chunk": 1, "image_size": 4, "cameras": ["primary"], "action_dim": D,
                                         "vocab_size": 32000, "tokenization": "ids_direct"})
    return written


def forge(path) -> str:
    """Replace the marked action value in place (same size, still parses) -> sha256 of the forged file."""
    data = path.read_bytes()
    old, new = struct.pack("<f", MARK), struct.pack("<f", FORGED)
    assert data.count(old) >= 1 and data.count(new) == 0
    forged = data.replace(old, new)
    assert len(forged) == len(data) and forged != data
    path.write_bytes(forged)
    return hashlib.sha256(forged).hexdigest()


def _actions(ds):
    return {(it["episode_id"], it["step_index"]): it["action"].tolist() for it in ds}


@pytest.fixture
def count_hashes(monkeypatch):
    """Counts calls of ``loader.sha256_file`` per file name (this process only)."""
    calls = {}
    original = loader.sha256_file

    def counting(fs, path):
        calls[os.path.basename(path)] = calls.get(os.path.basename(path), 0) + 1
        return original(fs, path)

    monkeypatch.setattr(loader, "sha256_file", counting)
    monkeypatch.setattr(loader, "_DIGESTS", {})  # a fresh per-process cache for this test
    return calls


# --------------------------------------------------------------------------------------------------
# Forged files


def test_same_size_forgery_is_served_without_sha256_and_refused_with_it(tmp_path, count_hashes):
    rels = write_output(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    expected = manifest["files"][1]["sha256"]
    actual = forge(tmp_path / rels[1])
    assert os.path.getsize(tmp_path / rels[1]) == manifest["files"][1]["bytes"]

    # Rows and bytes still match the manifest: without the digest the forged value reaches training.
    served = _actions(ShardDataset(tmp_path, shuffle=False, verify_sha256=False))
    assert served[("ep002", 1)] == [2.0, FORGED]
    assert len(served) == 13

    ds = ShardDataset(tmp_path, shuffle=False)
    got = []
    with pytest.raises(ShardIntegrityError) as info:
        for item in ds:
            got.append((item["episode_id"], item["step_index"]))
    message = str(info.value)
    assert rels[1] in message and expected in message and actual in message
    # No row of the forged file was served (the loader reads in units of >= 256 rows, so the rows of
    # file 0, which share the forged file's unit, were not served either).
    assert got == []
    assert isinstance(info.value, UserError)


def test_forged_first_file_is_refused_at_construction(tmp_path):
    rels = write_output(tmp_path, marked=(0, 1))
    actual = forge(tmp_path / rels[0])
    with pytest.raises(ShardIntegrityError, match=f"{rels[0]}.*got {actual}"):
        ShardDataset(tmp_path)


@pytest.mark.parametrize("world_size", [1, 4], ids=["whole-files", "episode-pieces"])
def test_dataloader_workers_refuse_the_forged_file(tmp_path, world_size):
    rels = write_output(tmp_path)
    actual = forge(tmp_path / rels[1])
    with pytest.raises(ShardIntegrityError) as info:
        for rank in range(world_size):
            ds = ShardDataset(tmp_path, rank=rank, world_size=world_size, shuffle=False)
            list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_vla))
    assert rels[1] in str(info.value) and actual in str(info.value)


# --------------------------------------------------------------------------------------------------
# Hashed once per process


def test_epochs_reiteration_and_new_datasets_do_not_rehash(tmp_path, count_hashes):
    rels = write_output(tmp_path)
    names = [os.path.basename(r) for r in rels]
    ds = ShardDataset(tmp_path, seed=1, shuffle_buffer=4)
    assert count_hashes == {names[0]: 1}  # the file whose footer gives the schema, at construction
    first = _actions(ds)
    assert first[("ep002", 1)] == [2.0, MARK] and len(first) == 13
    assert count_hashes == {n: 1 for n in names}
    ds.set_epoch(1)
    assert _actions(ds) == first
    assert _actions(ShardDataset(tmp_path, seed=2)) == first
    assert _actions(ShardDataset(tmp_path, rank=1, world_size=4, shuffle=False)) != {}
    assert count_hashes == {n: 1 for n in names}

    # Same bytes, new mtime: a new key, hashed once more; a copy renamed over it (new inode, same mtime): again.
    path = tmp_path / rels[2]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _actions(ds) == first
    assert count_hashes[names[2]] == 2
    st = os.stat(path)
    shutil.copyfile(path, tmp_path / "copy.parquet")
    os.utime(tmp_path / "copy.parquet", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp_path / "copy.parquet", path)
    assert os.stat(path).st_ino != st.st_ino and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert _actions(ds) == first
    assert count_hashes == {names[0]: 1, names[1]: 1, names[2]: 3, names[3]: 1}


def test_a_mismatch_found_once_is_raised_on_every_pass(tmp_path, count_hashes):
    rels = write_output(tmp_path, marked=(5, 1))
    forge(tmp_path / rels[3])
    ds = ShardDataset(tmp_path, shuffle=False)
    for _ in range(2):
        with pytest.raises(ShardIntegrityError, match=rels[3]):
            list(ds)
    assert count_hashes[os.path.basename(rels[3])] == 1


def _hash_log(monkeypatch, log_path):
    """Every ``sha256_file`` call, in any (forked) process, appends 'pid name' to ``log_path``."""
    original = loader.sha256_file

    def logging_hash(fs, path):
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()} {os.path.basename(path)}\n")
        return original(fs, path)

    monkeypatch.setattr(loader, "sha256_file", logging_hash)
    monkeypatch.setattr(loader, "_DIGESTS", {})

    def read():
        return [line.split() for line in log_path.read_text().splitlines()] if log_path.exists() else []

    return read


def test_workers_hash_each_file_once_and_later_workers_reuse_the_digests(tmp_path, monkeypatch):
    rels = write_output(tmp_path)
    names = sorted(os.path.basename(r) for r in rels)
    log = _hash_log(monkeypatch, tmp_path / "hashes.log")

    def epoch(ds, **kw):
        dl = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_vla, multiprocessing_context="fork", **kw)
        return sorted((e, int(s)) for b in dl for e, s in zip(b["episode_id"], b["step_index"]))

    ds = ShardDataset(tmp_path, seed=0)
    rows = epoch(ds)
    assert len(rows) == 13 and len(set(rows)) == 13
    calls = log()
    # 4 files, 2 workers: each file hashed once in all; file 0 at construction in this process (forked
    # workers inherit the digest), the others by the worker that read it first.
    assert sorted(name for _, name in calls) == names
    assert {pid for pid, _ in calls} - {str(os.getpid())}, "workers hashed nothing"

    (tmp_path / "hashes.log").unlink()
    persistent = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_vla, multiprocessing_context="fork",
                            persistent_workers=True)
    for _ in range(2):  # new workers of the same dataset: the digests its earlier workers recorded
        assert sorted((e, int(s)) for b in persistent for e, s in zip(b["episode_id"], b["step_index"])) == rows
    assert log() == []

    ds.verify()  # nothing left to hash either
    assert log() == [] and epoch(ds) == rows and log() == []
    # A new dataset object (its own ledger) over the same files, workers forked from this process whose own
    # cache now holds every digest (verify above): nothing hashed; a fresh process family would hash again.
    assert epoch(ShardDataset(tmp_path, seed=0)) == rows and log() == []


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_a_file_several_workers_read_is_hashed_once(tmp_path, monkeypatch):
    """One file read by all three workers (fewer files than workers: dealt by episodes), hashed once (the
    digest ledger they share); the other hashed at construction."""
    rels = write_output(tmp_path, files=[[(0, 1)], [(1, 3), (2, 3), (3, 3), (4, 3)]])
    log = _hash_log(monkeypatch, tmp_path / "hashes.log")
    opened = tmp_path / "opened.log"
    original = loader._OpenShard.__init__

    def logging_open(self, source, remote):
        with open(opened, "a") as f:
            f.write(f"{os.getpid()} {os.path.basename(source.path) if hasattr(source, 'path') else ''}\n")
        original(self, source, remote)

    monkeypatch.setattr(loader._OpenShard, "__init__", logging_open)
    ds = ShardDataset(tmp_path, shuffle=False)
    rows = sorted((e, int(s)) for b in DataLoader(ds, batch_size=2, num_workers=3, collate_fn=collate_vla,
                                                  multiprocessing_context="fork")
                  for e, s in zip(b["episode_id"], b["step_index"]))
    assert len(rows) == 13
    readers = {line.split()[0] for line in opened.read_text().splitlines()} - {str(os.getpid())}
    assert len(readers) == 3  # every worker opened file 1 (12 of the 13 rows, 4 episodes)
    assert sorted(name for _, name in log()) == sorted(os.path.basename(r) for r in rels)  # each file once


# --------------------------------------------------------------------------------------------------
# Unpublished or unverifiable outputs


def test_no_manifest_is_refused_unless_opted_in(tmp_path):
    write_output(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(UnpublishedShardsError, match="expected manifest.json in .*incomplete, interrupted or unpublished"):
        ShardDataset(tmp_path)
    with pytest.warns(UserWarning, match="unverified"):
        ds = ShardDataset(tmp_path, shuffle=False, require_manifest=False)
    assert len(list(ds)) == 13
    with pytest.raises(UnpublishedShardsError, match="does not exist"):
        ShardDataset(tmp_path / "nope")
    with pytest.raises(UnpublishedShardsError, match="is a file"):
        ShardDataset(tmp_path / "train" / "shard-00000-of-00004.parquet")


def test_manifest_without_digests_is_not_a_vlaprep_manifest(tmp_path):
    write_output(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["files"][2]["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for verify in (True, False):  # the one manifest reader refuses it whatever the loader would check
        with pytest.raises(ShardIntegrityError, match="does not match schemas/manifest.schema.json at files/2.*'sha256' is a required"):
            ShardDataset(tmp_path, verify_sha256=verify)


def test_missing_listed_file_and_bad_pointers_are_user_errors(tmp_path):
    rels = write_output(tmp_path)
    os.unlink(tmp_path / rels[2])
    ds = ShardDataset(tmp_path, shuffle=False)
    with pytest.raises(ShardIntegrityError, match=f"expected .*{rels[2]} \\(listed in manifest.json\\) to exist"):
        list(ds)
    (tmp_path / "LATEST").write_text("{not json")
    with pytest.raises(UnpublishedShardsError, match="LATEST.*to hold"):
        ShardDataset(tmp_path)
    (tmp_path / "LATEST").write_text(json.dumps({"versions": "v-1"}))
    with pytest.raises(UnpublishedShardsError, match="LATEST.*to hold"):
        ShardDataset(tmp_path)
    (tmp_path / "LATEST").unlink()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardIntegrityError, match="expected JSON in"):
        ShardDataset(tmp_path)
    assert issubclass(UnpublishedShardsError, UserError) and issubclass(ShardIntegrityError, UserError)
