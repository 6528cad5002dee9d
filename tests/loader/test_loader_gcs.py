"""ShardDataset("gs://...") through pyarrow's GcsFileSystem against the local GCS emulator (tests/conftest.py):
same rows as local files, sha256 checked once, a tampered object refused by name, bounded local cache."""

import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from vlaprep import loader
from vlaprep.loader import ShardDataset, ShardIntegrityError

_spec = importlib.util.spec_from_file_location("loader_test_module", pathlib.Path(__file__).with_name("test_loader.py"))
tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tl)


def upload(local, prefix) -> pafs.FileSystem:
    fs = loader._gcs_filesystem()
    pafs.copy_files(str(local), prefix.split("://", 1)[1], destination_filesystem=fs)
    return fs


def keys(ds):
    return [(i["dataset_name"], i["episode_id"], i["step_index"]) for i in ds]


def test_gcs_reads_what_local_reads_and_refuses_a_tampered_object(tmp_path, gcs_prefix, monkeypatch):
    local = tmp_path / "out"
    tl.write_shards(local, tl.MANY_FILES, row_group_size=3)
    fs = upload(local, gcs_prefix)
    kw = dict(seed=3, shuffle_buffer=6, history=2, mixture="manifest")
    assert keys(ShardDataset(gcs_prefix, **kw)) == keys(ShardDataset(local, **kw))
    # Without beam: the loader's own path (pyarrow) in a fresh process, Beam not importable there.
    code = ("import sys; sys.modules['apache_beam'] = None\n"
            "from vlaprep.loader import ShardDataset\n"
            f"print(sum(1 for _ in ShardDataset({gcs_prefix!r}, shuffle=False)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == len(tl.episode_rows([e for f in tl.MANY_FILES for e in f]))

    # Tamper with one object: same size, one byte changed.
    rel = "train/shard-00003-of-00005.parquet"
    data = bytearray((local / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    with fs.open_output_stream(f"{gcs_prefix.split('://', 1)[1]}/{rel}") as f:
        f.write(bytes(data))
    monkeypatch.setattr(loader, "_DIGESTS", {})
    with pytest.raises(ShardIntegrityError, match=f"{rel}.*got {hashlib.sha256(bytes(data)).hexdigest()}"):
        list(ShardDataset(gcs_prefix, shuffle=False))
    with pytest.raises(ShardIntegrityError, match=f"{rel}.*got {hashlib.sha256(bytes(data)).hexdigest()}"):
        list(ShardDataset(gcs_prefix, shuffle=False, cache_dir=tmp_path / "cache"))
    assert not [n for n in os.listdir(tmp_path / "cache") if "00003" in n or n.startswith(".tmp")]


def test_bounded_cache_downloads_once_and_stays_under_its_limit(tmp_path, gcs_prefix, monkeypatch):
    local = tmp_path / "out"
    tl.write_shards(local, tl.MANY_FILES, row_group_size=3)
    upload(local, gcs_prefix)
    sizes = sorted(os.path.getsize(p) for p in (local / "train").iterdir())
    limit = sizes[-1] + sizes[-2]  # room for two files at a time
    cache = tmp_path / "cache"
    expected = keys(ShardDataset(local, shuffle=False))
    hashed = []
    original = loader.sha256_file
    monkeypatch.setattr(loader, "sha256_file", lambda fs, path: hashed.append(path) or original(fs, path))
    monkeypatch.setattr(loader, "_DIGESTS", {})
    for _ in range(2):
        ds = ShardDataset(gcs_prefix, shuffle=False, cache_dir=cache, cache_limit_bytes=limit)
        assert keys(ds) == expected
        total = sum(os.path.getsize(cache / n) for n in os.listdir(cache))
        assert 0 < total <= limit
        assert all(n.endswith(".parquet") and len(n) == 64 + 8 for n in os.listdir(cache))  # <sha256>.parquet
    # Downloads were hashed while written, never re-read to hash; nothing was hashed from the bucket.
    assert hashed == []
    # Unbounded: every file once, then served from the cache (a second pass downloads nothing new).
    ds = ShardDataset(gcs_prefix, shuffle=False, cache_dir=tmp_path / "all")
    assert keys(ds) == expected and len(os.listdir(tmp_path / "all")) == len(tl.MANY_FILES)
    with pytest.raises(ValueError, match="cache_limit_bytes >= 1 with a cache_dir"):
        ShardDataset(gcs_prefix, cache_limit_bytes=10)
