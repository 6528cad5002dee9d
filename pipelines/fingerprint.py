"""Content fingerprints of inputs, for caching and incremental regeneration.

A file's digest is the BLAKE2b of its bytes. Hashing terabytes on every run would cost as much as the
work it saves, so digests are memoized (like git's index) under ``$VLAPREP_CACHE_DIR`` (default
``~/.cache/vlaprep``) keyed by (absolute path, size, mtime_ns, inode): a file whose stat changed is
hashed again; an unchanged one is not re-read.

Files in an object store (``gs://...``) are not read at all: the store's own checksum of each object
(GCS: CRC32C), from one listing, stands in for the digest (see ``digests``).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import vlaprep
from vlaprep import paths as vpaths

_CHUNK = 8 << 20


def _cache_dir() -> str:
    return os.environ.get("VLAPREP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vlaprep")


def _stat_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    return hashlib.sha256(raw.encode()).hexdigest()


def file_digest(path: str) -> str:
    """BLAKE2b-256 hex of a local file's bytes (memoized on its stat)."""
    key = _stat_key(path)
    memo = os.path.join(_cache_dir(), "file_digests", key[:2], key)
    try:
        with open(memo) as f:
            return f.read().strip()
    except OSError:
        pass
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        tmp = f"{memo}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return digest


def digests(files: Iterable[str]) -> dict[str, tuple[int, str]]:
    """{path: (size, digest)}. Local files: BLAKE2b, hashed on up to 4 threads. Remote files: the store's
    checksum from one listing of their common prefix (``store:crc32c:...``): nothing is read, and a
    million CALVIN frames cost a paged listing, not a million requests."""
    files = sorted(set(files))
    local = [f for f in files if not vpaths.is_remote(f)]
    remote = [f for f in files if vpaths.is_remote(f)]
    out = {}
    if local:
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            for f, d in zip(local, pool.map(file_digest, local)):
                out[f] = (os.path.getsize(f), d)
    if remote:
        root = vpaths.commonpath(remote) if len(remote) > 1 else vpaths.dirname(remote[0])
        listed = vpaths.list_checksums(root)
        for f in remote:
            name = vpaths.relpath(f, root)
            if name not in listed:
                raise FileNotFoundError(f"expected an object at {f!r}, got none in the listing of {root!r}")
            size, checksum = listed[name]
            out[f] = (size, f"store:{checksum}")
    return out


def files_fingerprint(paths: Iterable[str], root: str) -> list[dict]:
    """[{name (relative to root), size, blake2b}] for each file, sorted by name (see ``digests``)."""
    found = digests(paths)
    return [{"name": vpaths.relpath(p, root), "size": found[p][0], "blake2b": found[p][1]} for p in sorted(found)]


def combine(*parts) -> str:
    """sha256 hex of a JSON-serializable structure (canonical: sorted keys, no whitespace)."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def version_fingerprint() -> str:
    return f"vlaprep-{vlaprep.__version__}"
