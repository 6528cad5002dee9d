"""Streaming PyTorch reader of vlaprep's pre-tokenized Parquet shards (schema: schemas/shards.py).

On-disk layout read (written by ``vlaprep shards``; names from ``vlaprep.schemas.layout``)::

  ROOT/manifest.json                              written last; read with ``layout.Manifest`` (the one
                                                  reader): files with rows, bytes, sha256 and per-dataset
                                                  row counts, options, datasets, optional ``mixture``
  ROOT/<split>/shard-00000-of-0000K.parquet       one row = one step; an episode's rows are contiguous and
                                                  in step order inside ONE file; rows sorted by
                                                  (dataset_name, episode_id), so each dataset is one
                                                  contiguous row range per file
  ROOT/inputs/dataset_statistics.json             num_transitions per dataset (mixture balancing)

``ROOT`` is a local directory, a ``vlaprep run`` output (``LATEST`` names the version read), or an object
store URI (``gs://bucket/runs/oxe``, ``s3://...``) read through pyarrow's filesystems (see "Object stores").

What is served is what was published: a directory without ``manifest.json`` is refused
(``UnpublishedShardsError``; ``require_manifest=False`` reads ``<split>/*.parquet`` unverified, with a
warning). Before the first row of a file is served, its size, sha256 (``verify_sha256``), row count and
episode order are checked against the manifest (``ShardIntegrityError`` naming the file and both digests).
A file is hashed once per dataset object and the DataLoader workers it forks (digests keyed by (path,
size, mtime_ns, inode), shared through ``_DigestLedger``); ``ShardDataset.verify()`` hashes them all now.

One item (S = image size, H = history, N = action chunk, D = action width, P = proprio width, L = tokens)::

  input_ids                int64   [L]
  labels                   int64   [L]            -100 except the last N*D + 1 positions
  pixel_values             float32 [3, S, S]      primary camera, in [0, 1] (uint8 0..255 with pixel_dtype="uint8");
                                                  [H, 3, S, S] when H > 1
  history_mask             bool    [H]            only when H > 1; False where the frame precedes the episode
  wrist_pixel_values       float32 [3, S, S]      only when the shards have ``image_wrist`` (no history)
  proprio                  float32 [P]            [H, P] when H > 1; only when the shards have ``proprio``
  action_token_ids         int64   [N*D]          row-major, step t first (the order they have in input_ids)
  action                   float32 [D]
  normalized_action        float32 [D]
  action_chunk             float32 [N, D]         steps t..t+N-1 (past the end: the last step repeated)
  normalized_action_chunk  float32 [N, D]
  action_chunk_mask        bool    [N]            True where t+i is a real step
  dataset_name, episode_id, instruction: str;  step_index, num_steps: int

Frames are decoded in the images' own channels-last memory order (torch's ``channels_last``: the [.., 3, S, S]
tensors are views of [.., S, S, 3] memory): the same values and shapes, every torch op takes them, a device
reorders them for free; ``.contiguous()`` where raw NCHW memory is needed (``view``, ``data_ptr``). Frames of
history windows are stacked channels-first.

``batch_size=B`` makes the dataset yield collated batches instead (exactly ``collate_vla`` of B consecutive
items, built column-wise: one gather per column, one image buffer per batch); use it with
``DataLoader(ds, batch_size=None)`` or ``ShardLoader``. With ``decode_images=False`` the images stay PNG
bytes under ``image_primary`` (a list of H bytes when H > 1) and ``image_wrist``. History windows follow
Octo's ``chunk_act_obs`` observation side: the H most recent frames ending at step t, the first frame
repeated (mask False) before the episode start.

Order (deterministic in seed, epoch, rank and worker; G = world_size * num_workers global workers, global
worker ``rank * num_workers + worker``):

* Pieces: the split's files, permuted with (seed, epoch) when ``shuffle``, their rows in that order cut
  into G contiguous runs of about equal length, each cut moved to the nearest episode start (workers, and
  ranks, differ by about an episode's rows). With a mixture, each dataset's row range in each file,
  permuted the same way, dealt round-robin to the G global workers (with fewer than G, cut at row-group
  boundaries moved forward to the next episode start). A worker reads its pieces in order, rows in
  order: its *stream*.
* Shuffle: the stream is cut into windows of ``shuffle_buffer`` consecutive items and each window is
  emitted in a random permutation seeded by (seed, epoch, global worker, window). Memory is one window of
  compressed rows (two in a DataLoader worker, which reads the next unit ahead on a thread), plus the
  Parquet row group each of the worker's streams is reading (one per dataset of a mixture); any position
  can be resumed by re-reading one window.
* Mixture (``mixture=``): as OpenVLA's ``make_interleaved_dataset``: each item comes from dataset i with
  probability p_i = w_i * n_i / sum_j w_j * n_j (``balance_weights``; n_i = num_transitions from the
  statistics the rows were normalized with; without balancing p_i = w_i / sum w). The worker's stream is
  the i.i.d. dataset draws of ``MixtureSampler`` (seed, epoch, global worker), each taking the next row of
  that dataset's own sequential stream (its pieces); the windowed shuffle then applies to the mixed stream
  (OpenVLA's global shuffle buffer after ``sample_from_datasets``).

Epoch:
* ``mixture=None``: one pass over the split; every row exactly once across all ranks x workers (ranks
  receive equal numbers of rows within about an episode; stop all ranks at the shortest for DDP).
* mixture: OpenVLA's effective dataset length ``L = int(max_i(rows_i / p_i))`` over the *primary*
  datasets (weight == 1.0, as OpenVLA; all sampled datasets if none has weight 1.0), rows_i = the
  dataset's rows in this split: the number of samples after which every primary dataset has been seen once
  in expectation. Global worker g serves ``L // G + (g < L % G)`` samples, so ranks get equal counts
  (within num_workers). A dataset whose rows run out within an epoch (small dataset, large weight) is
  repeated, as OpenVLA's ``.repeat()``: pass k of a worker's share reads its pieces in a new order seeded
  by (seed, epoch, worker, dataset, k). A dataset with fewer pieces than G global workers is shared: worker
  g reads piece ``g % pieces`` (in its own order).

Resume (``state_dict`` / ``load_state_dict``; format in ``LoaderState``): the state is the epoch, the
number of items each (rank, worker) has delivered, and which worker delivers next, plus a fingerprint of
what determines the order (split, seed, shuffle, window, mixture, the files' digests). It is small and
JSON-serialisable. Restoring continues the exact sequence of an uninterrupted run:
* ``num_workers=0``: ``ds.state_dict()`` after any batch.
* ``num_workers>0`` without torchdata: wrap in ``ShardLoader(ds, batch_size=..., num_workers=...)``; it
  counts the batches the trainer took and derives each worker's position from DataLoader's round-robin
  order (``ShardLoader.state_dict()``); workers restored at a rotated id so the round-robin continues.
* torchdata's ``StatefulDataLoader``: the dataset is ``Stateful``; each worker saves and restores its
  own entry.
* World size or ``num_workers`` may change at an epoch boundary (a state at the start or the end of an
  epoch); restoring a mid-epoch state with another world size or worker count raises ``LoaderStateError``
  (samples would repeat or be skipped).

Object stores: ``gs://`` uses ``pyarrow.fs.GcsFileSystem`` (``STORAGE_EMULATOR_HOST`` honoured, for tests
and local emulators; default credentials otherwise); other URIs use ``pyarrow.fs.FileSystem.from_uri``;
``filesystem=`` passes any pyarrow filesystem. Neither Beam nor gcsfs is needed. Remote files are hashed by
streaming them once (per dataset and its forked workers); with ``cache_dir=`` each file is instead
downloaded once into a bounded local cache (``cache_limit_bytes``, least recently used evicted first),
hashed while it is written, and read locally from then on.

Hand-off from DataLoader workers (``batch_size=B``): chunks are cut where batches end, so a batch is one
gather whose frames are decoded straight into a block of the worker's ``_FramePool`` (shared memory,
reused once the main process has dropped every tensor over it); the other tensors are packed into one
shared block (``share_batch``). ``collate_vla`` in a worker stacks frames into shared memory likewise.
A worker reads its next unit on a read-ahead thread while it gathers the current one (``_read_ahead``).

Augmentation (``augment="openvla"``): OpenVLA's training image augmentation, see ``openvla_augment``.

Only torch, numpy, pyarrow, pillow (and jsonschema via the manifest reader) are imported here: no Beam,
no TensorFlow.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import fcntl
import hashlib
import io
import json
import math
import mmap
import os
import pickle
import struct
import tempfile
import threading
import time
import uuid
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlaprep.errors import UserError
from vlaprep.paths import confined
from vlaprep.schemas import layout
from vlaprep.schemas.shards import LABEL_IGNORE, Column, fixed_widths, validate_table_schema

MANIFEST_NAME = layout.MANIFEST_FILE
SHARD_SUFFIX = layout.SHARD_SUFFIX
# Read for the episode-contiguity check and the history windows whatever `columns` says.
BOOKKEEPING_COLUMNS = (Column.DATASET_NAME, Column.EPISODE_ID, Column.STEP_INDEX, Column.NUM_STEPS)
# Smallest read unit (items): windows smaller than this are grouped so each read is at least this long.
MIN_UNIT_ROWS = 256
# Items computed at a time in item mode (batch_size=None).
ITEM_CHUNK = 64
# Bytes per read while hashing or downloading a shard file.
HASH_CHUNK_BYTES = 8 << 20
# Dataset draws per independently seeded block (MixtureSampler): a position is reached without replay.
MIXTURE_BLOCK = 4096
STATE_FORMAT = "vlaprep.loader.state"
STATE_VERSION = 1

# Seeds: numpy SeedSequence entropy [seed, epoch, TAG, ...].
_TAG_FILES, _TAG_WINDOW, _TAG_PASS, _TAG_MIXTURE, _TAG_AUGMENT = 0, 1, 2, 3, 4

_STRING_COLUMNS = (Column.DATASET_NAME, Column.EPISODE_ID, Column.INSTRUCTION)
_LIST_COLUMNS = (Column.INPUT_IDS, Column.LABELS)
_INT_COLUMNS = (Column.STEP_INDEX, Column.NUM_STEPS)
_IMAGE_COLUMNS = (Column.IMAGE_PRIMARY, Column.IMAGE_WRIST)
# Item keys that are not shard columns (the decoded images and the history mask).
PIXEL_VALUES, WRIST_PIXEL_VALUES, HISTORY_MASK = "pixel_values", "wrist_pixel_values", "history_mask"
# Item key order (collate_vla keeps it).
_ITEM_ORDER = (Column.DATASET_NAME, Column.EPISODE_ID, Column.INSTRUCTION, Column.STEP_INDEX, Column.NUM_STEPS,
               Column.INPUT_IDS, Column.LABELS, Column.ACTION_TOKEN_IDS, Column.ACTION, Column.NORMALIZED_ACTION,
               Column.ACTION_CHUNK, Column.NORMALIZED_ACTION_CHUNK, Column.ACTION_CHUNK_MASK, Column.IMAGE_PRIMARY,
               PIXEL_VALUES, HISTORY_MASK, Column.IMAGE_WRIST, WRIST_PIXEL_VALUES, Column.PROPRIO)


# --------------------------------------------------------------------------------------------------
# Errors


class UnpublishedShardsError(UserError):
    """The directory holds no published shard output: it does not exist, or has no ``manifest.json``."""


class ShardIntegrityError(UserError):
    """A file differs from what ``manifest.json`` published (sha256, bytes, rows, dataset ranges, missing),
    or the manifest cannot vouch for it."""


class MixtureError(UserError):
    """A ``mixture=`` that does not fit the shards (unknown dataset, bad weight, no rows in the split)."""


class LoaderStateError(UserError):
    """A ``load_state_dict`` state that does not belong to this dataset or cannot be continued exactly."""


# --------------------------------------------------------------------------------------------------
# Filesystems


def _gcs_filesystem() -> pafs.FileSystem:
    """pyarrow's GCS client; ``STORAGE_EMULATOR_HOST`` (what google-cloud-storage honours) selects an
    emulator, anonymously. Otherwise Google default credentials."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return pafs.GcsFileSystem()
    scheme, sep, rest = host.partition("://")
    if not sep:
        scheme, rest = "http", host
    return pafs.GcsFileSystem(anonymous=True, endpoint_override=rest.rstrip("/"), scheme=scheme,
                              retry_time_limit=datetime.timedelta(seconds=15))


def _filesystem(root: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local directory or a URI (gs://, s3://, ...)."""
    if "://" in root:
        scheme, rest = root.split("://", 1)
        if filesystem is not None:
            return filesystem, rest.rstrip("/")
        if scheme == "gs":
            return _gcs_filesystem(), rest.rstrip("/")
        return pafs.FileSystem.from_uri(root)
    if filesystem is not None:
        return filesystem, root
    return pafs.LocalFileSystem(), os.path.abspath(root)


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel.lstrip("/")


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(path)
    with fs.open_input_stream(path) as f:
        return f.read()


def resolve_shards_root(root: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> str:
    """A shard directory, or a ``vlaprep run`` output: there ``LATEST`` names the published version,
    whose ``shards/`` is read (so a training job never sees a half-written regeneration)."""
    root = os.fspath(root)
    fs, base = _filesystem(root, filesystem)
    try:
        raw = _read_bytes(fs, _join(base, layout.LATEST_FILE))
    except FileNotFoundError:
        return root
    pointer = _join(root, layout.LATEST_FILE)
    try:
        version = json.loads(raw)["version"]
    except (ValueError, TypeError, KeyError) as e:  # not JSON, not an object, no "version"
        raise UnpublishedShardsError(
            f'expected {pointer!r} to hold {{"version": ...}} (written by `vlaprep run`), got {raw[:200]!r}; '
            "hint: rerun `vlaprep run`, or pass the version's shards/ directory"
        ) from e
    confined("<run>", str(version), layout.LATEST_FILE)  # ValueError for '..', absolute paths, URLs
    try:
        layout.parse_latest(raw, root)
    except layout.ManifestError as e:
        raise UnpublishedShardsError(str(e)) from e
    return layout.latest_shards_root(root, version)


def load_manifest(root: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> layout.Manifest | None:
    """``ROOT/manifest.json`` parsed and checked by ``layout.Manifest`` (the one reader), or None if absent."""
    root = os.fspath(root)
    fs, base = _filesystem(root, filesystem)
    try:
        raw = _read_bytes(fs, _join(base, MANIFEST_NAME))
    except FileNotFoundError:
        return None
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    # A path escape is reported as such even in a document that is otherwise not a vlaprep manifest.
    if isinstance(document, dict) and isinstance(document.get("files"), list):
        for entry in document["files"]:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                confined(root, entry["path"], f"{MANIFEST_NAME} 'files'")
    try:
        return layout.Manifest.parse(raw, root)
    except layout.ManifestError as e:
        raise ShardIntegrityError(f"{e}; hint: regenerate the output with `vlaprep shards`") from e


@dataclasses.dataclass(frozen=True)
class ShardFile:
    path: str  # relative to the dataset root, e.g. "train/shard-00000-of-00004.parquet"
    rows: int | None = None  # from the manifest, checked against the Parquet footer when present
    bytes: int | None = None  # from the manifest, checked against the file size when present
    sha256: str | None = None  # from the manifest, checked against the file's bytes (verify_sha256)
    # ((dataset, rows), ...) in the writer's sorted order: each dataset's contiguous row range
    datasets: tuple[tuple[str, int], ...] | None = None

    def dataset_ranges(self) -> dict[str, tuple[int, int]]:
        out, start = {}, 0
        for name, rows in self.datasets or ():
            out[name] = (start, start + rows)
            start += rows
        return out


def list_shard_files(root: str | os.PathLike, split: str, manifest: layout.Manifest | None = None,
                     filesystem: pafs.FileSystem | None = None) -> list[ShardFile]:
    """The split's shard files in a stable order: as listed by the manifest, else ``split/*.parquet`` sorted."""
    if manifest is not None:
        return [
            ShardFile(f.path, rows=f.rows, bytes=f.bytes, sha256=f.sha256,
                      datasets=tuple((name, int(c["rows"])) for name, c in sorted(f.datasets.items())))
            for f in manifest.files(split)
        ]
    fs, base = _filesystem(os.fspath(root), filesystem)
    split_dir = _join(base, split)
    if fs.get_file_info(split_dir).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(split_dir, recursive=False))
    names = sorted(
        i.base_name
        for i in infos
        # Dot files are the writer's in-progress temporaries (".tmp-<uuid>-shard-....parquet").
        if i.type == pafs.FileType.File and i.base_name.endswith(SHARD_SUFFIX) and not i.base_name.startswith(".")
    )
    return [ShardFile(path=f"{split}/{n}") for n in names]


# --------------------------------------------------------------------------------------------------
# Verification: sha256 once per file per process

# (path, size, mtime_ns, inode) -> sha256 hex of the file's bytes, for this process (inherited by forked
# children). A file rewritten in place or replaced by a rename changes mtime_ns or the inode: a new key.
_DIGESTS: dict[tuple, str] = {}


def sha256_file(fs: pafs.FileSystem, path: str) -> str:
    """sha256 hex of a file's bytes (module-level: tests count calls)."""
    if isinstance(fs, pafs.LocalFileSystem):
        with open(path, "rb") as f:  # readinto a reused buffer: ~2x pyarrow's stream, which copies each read
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(HASH_CHUNK_BYTES)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _identity(fs: pafs.FileSystem, path: str) -> tuple[tuple, int]:
    """(cache key, size) of a file; raises FileNotFoundError if there is none."""
    if isinstance(fs, pafs.LocalFileSystem):
        st = os.stat(path)
        return (path, st.st_size, st.st_mtime_ns, st.st_ino), st.st_size
    info = fs.get_file_info(path)  # object stores: no inode; mtime where the store has one
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(path)
    return (f"{fs.type_name}:{path}", info.size, info.mtime_ns, None), info.size


def cached_sha256(fs: pafs.FileSystem, path: str, key: tuple | None = None) -> str:
    """The file's sha256, hashed at most once per (path, size, mtime_ns, inode) in this process."""
    if key is None:
        key, _ = _identity(fs, path)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = sha256_file(fs, path)
        _DIGESTS[key] = digest
    return digest


class _DigestLedger:
    """Digests shared by the processes of one DataLoader: the dataset's process and the workers it forks.

    An unlinked temporary file made where the dataset is built, so forked workers inherit its descriptor:
    slot i (file i of the split) holds the hash of the file's identity (path, size, mtime_ns, inode) and
    its sha256. A process that needs file i locks byte i (``fcntl.lockf``: released if the process dies),
    takes the slot's digest if it is for this identity, else hashes the file and records it. So each file
    is hashed once per DataLoader, not once per worker, and a worker never serves a file before its digest
    is known; the digest is still compared with the manifest in every process. Not carried by pickling
    (spawned workers then hash for themselves)."""

    SLOT = 64  # identity hash 32 bytes, sha256 32 bytes

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="vlaprep-digests-")

    def digest(self, index: int, key: tuple, compute: Callable[[], str]) -> str:
        fd = self.file.fileno()
        ident = hashlib.sha256(repr(key).encode()).digest()
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, index)
        try:
            slot = os.pread(fd, self.SLOT, index * self.SLOT)
            if len(slot) == self.SLOT and slot[:32] == ident:
                return slot[32:].hex()
            digest = compute()
            os.pwrite(fd, ident + bytes.fromhex(digest), index * self.SLOT)
            return digest
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, index)


class _FileCache:
    """A bounded local copy of remote shard files, named by their manifest sha256 (content-addressed).

    A file is downloaded once (to a temporary name, hashed while written, renamed when the digest is the
    manifest's), then read locally; least recently used files are evicted to keep the directory's
    ``*.parquet`` total <= ``limit`` bytes. Several processes may share the directory: writes are atomic
    renames, and a file evicted while another process reads it stays readable there (POSIX unlink)."""

    def __init__(self, directory: str, limit: int | None):
        self.directory = os.path.abspath(directory)
        self.limit = limit

    def path_for(self, sha256: str) -> str:
        return os.path.join(self.directory, f"{sha256}{SHARD_SUFFIX}")

    def get(self, fs: pafs.FileSystem, remote: str, where: str, size: int, sha256: str) -> str | None:
        """The local copy's path (verified), or None when the file alone exceeds the limit."""
        path = self.path_for(sha256)
        try:  # recently used: the access time orders eviction (mtime stays, so the digest cache key does too)
            os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
            return path
        except FileNotFoundError:
            pass
        if self.limit is not None and size > self.limit:
            return None
        os.makedirs(self.directory, exist_ok=True)
        self._evict(size)
        tmp = os.path.join(self.directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        h = hashlib.sha256()
        try:
            with fs.open_input_stream(remote) as src, open(tmp, "wb") as dst:
                while True:
                    chunk = src.read(HASH_CHUNK_BYTES)
                    if not chunk:
                        break
                    h.update(chunk)
                    dst.write(chunk)
            digest = h.hexdigest()
            if digest != sha256:
                raise ShardIntegrityError(
                    f"expected sha256 {sha256} for {where} (from {MANIFEST_NAME}), got {digest}: the file was "
                    "modified or replaced after the shards were published; hint: restore it or regenerate the "
                    "output with `vlaprep shards`"
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        key, _ = _identity(pafs.LocalFileSystem(), path)
        _DIGESTS[key] = sha256  # hashed while written: not again in this process
        return path

    def entries(self) -> list[tuple[str, int, int]]:
        """(path, bytes, atime_ns: last use) of every cached file."""
        out = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return out
        for name in names:
            if name.endswith(SHARD_SUFFIX) and not name.startswith("."):
                try:
                    st = os.stat(os.path.join(self.directory, name))
                except FileNotFoundError:
                    continue
                out.append((os.path.join(self.directory, name), st.st_size, st.st_atime_ns))
        return out

    def _evict(self, incoming: int) -> None:
        if self.limit is None:
            return
        entries = sorted(self.entries(), key=lambda e: e[2])  # oldest use first
        total = sum(e[1] for e in entries)
        for path, size, _ in entries:
            if total + incoming <= self.limit:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            total -= size


# --------------------------------------------------------------------------------------------------
# Layout of the columns


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Widths read from a shard's Arrow schema (cross-checked with the manifest's options)."""

    action_dim: int  # D
    chunk: int  # N
    proprio_dim: int  # P, 0 without proprio
    wrist: bool
    image_size: int | None  # S from the manifest; None: not checked

    def __post_init__(self):
        if self.action_dim < 1 or self.chunk < 1 or self.proprio_dim < 0:
            raise ValueError(
                f"expected action_dim >= 1, chunk >= 1, proprio_dim >= 0, "
                f"got {self.action_dim}, {self.chunk}, {self.proprio_dim}"
            )

    @classmethod
    def from_schema(cls, schema: pa.Schema, options: Mapping[str, Any] | None, where: str) -> ShardLayout:
        options = options or {}
        widths = fixed_widths(schema)

        def width(name: str) -> int:
            if name not in schema.names:
                raise ValueError(f"expected column {name!r} in {where}, got columns {schema.names!r}")
            if name not in widths:
                raise ValueError(f"expected column {name!r} to be a fixed_size_list in {where}, got {schema.field(name).type}")
            return widths[name]

        d = width(Column.ACTION)
        chunk_width = width(Column.ACTION_CHUNK)
        n = options.get("action_chunk")
        if n is None:
            if chunk_width % d:
                raise ValueError(
                    f"expected action_chunk width to be a multiple of the action width {d} in {where}, got {chunk_width}"
                )
            n = chunk_width // d
        n = int(n)
        for name, expected in (
            (Column.ACTION_CHUNK, n * d),
            (Column.NORMALIZED_ACTION_CHUNK, n * d),
            (Column.ACTION_TOKEN_IDS, n * d),
            (Column.ACTION_CHUNK_MASK, n),
            (Column.NORMALIZED_ACTION, d),
        ):
            if width(name) != expected:
                raise ValueError(
                    f"expected column {name!r} of width {expected} (action_chunk N={n}, action width D={d}) "
                    f"in {where}, got {width(name)}; does the manifest's options.action_chunk match the shards?"
                )
        proprio = width(Column.PROPRIO) if Column.PROPRIO in schema.names else 0
        size = options.get("image_size")
        return cls(action_dim=d, chunk=n, proprio_dim=proprio, wrist=Column.IMAGE_WRIST in schema.names,
                   image_size=int(size) if size is not None else None)


# --------------------------------------------------------------------------------------------------
# Images


# The PNGs ``vlaprep shards`` writes (``encode_png``): 8-bit RGB, not interlaced, chunks IHDR IDAT IEND, the
# zlib stream in stored (uncompressed) deflate blocks -- the Parquet page's zstd compresses -- and filter
# "Up" on every row. For those, decoding is a copy of the stored blocks (plus the stream's adler32 check
# unless the file's sha256 was) and one running sum down the rows, batch-wide, in the PNG's own channels-last
# order: ~0.06 ms for a 224 px frame against PIL's ~0.17 ms; a channels-first copy would add ~0.04 ms (2-core VM).
# Any other image goes to PIL.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IHDR_RGB8 = (8, 2, 0, 0, 0)  # bit depth 8, truecolour, deflate, adaptive filtering, no interlace
_PNG_FILTER_UP = 2
# From this many frames on, un-filter with one NumPy add per pixel row across all frames (the per-call cost
# is shared); below it, one cumulative sum per frame.
_ROWWISE_MIN_FRAMES = 8


class FrameShapeError(ValueError):
    """Frame ``index`` of a ``decode_frames`` call has ``shape`` (H, W, C), not the size asked for."""

    def __init__(self, index: int, shape: tuple[int, ...], expected: tuple[int, int]):
        super().__init__(f"expected a {expected[0]}x{expected[1]} RGB image at index {index}, got shape {shape} (H, W, C)")
        self.index, self.shape, self.expected = index, shape, expected


def _rgb8_png_stream(data: memoryview) -> tuple[int, int, memoryview] | None:
    """(height, width, zlib stream) of a PNG laid out as vlaprep writes it (8-bit RGB, not interlaced,
    chunks IHDR, IDAT..., IEND, a valid IHDR checksum as PIL requires); None for anything else."""
    if len(data) < 57 or data[:8] != _PNG_SIGNATURE:
        return None
    length, tag = struct.unpack_from(">I4s", data, 8)
    if length != 13 or tag != b"IHDR" or zlib.crc32(data[12:29]) != struct.unpack_from(">I", data, 29)[0]:
        return None
    width, height, *kind = struct.unpack_from(">IIBBBBB", data, 16)
    if tuple(kind) != _PNG_IHDR_RGB8 or not 0 < width * height <= (Image.MAX_IMAGE_PIXELS or math.inf):
        return None  # (PIL then decides about a "decompression bomb", as before)
    parts, pos = [], 33
    while pos + 12 <= len(data):
        length, tag = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            return None
        if tag == b"IEND":
            if not parts or end != len(data):
                return None
            return height, width, parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
        if tag != b"IDAT":
            return None
        parts.append(data[pos + 8: end - 4])
        pos = end
    return None


def _inflate_into(stream: memoryview, out: np.ndarray, check_adler32: bool) -> bool:
    """Inflate a zlib stream into the flat uint8 array ``out``, which it must fill exactly; stored blocks
    (vlaprep's PNGs) are copied without going through zlib, and their adler32 checked when
    ``check_adler32``. False when the stream is not valid (bad header, sizes, adler32): the caller then
    leaves the image to PIL, which reports it as before."""
    if len(stream) < 11 or (stream[0] & 0x0F) != 8 or stream[1] & 0x20 or (stream[0] << 8 | stream[1]) % 31:
        return False
    pos, filled, total = 2, 0, len(out)
    while True:
        header = stream[pos]
        if header & 0b110:  # BTYPE != 00: a compressed block; zlib inflates the whole stream
            try:
                raw = zlib.decompress(stream)
            except zlib.error:
                return False
            if len(raw) != total:
                return False
            out[:] = np.frombuffer(raw, np.uint8)
            return True
        # Stored block: byte aligned (the previous ones were stored too), LEN and its complement NLEN.
        if pos + 5 > len(stream):
            return False
        length, complement = struct.unpack_from("<HH", stream, pos + 1)
        pos += 5
        if length ^ complement != 0xFFFF or filled + length > total or pos + length > len(stream):
            return False
        out[filled: filled + length] = np.frombuffer(stream, np.uint8, length, pos)
        filled, pos = filled + length, pos + length
        if header & 1:  # BFINAL
            break
    if filled != total or pos + 4 != len(stream):
        return False
    return not check_adler32 or zlib.adler32(out) == struct.unpack_from(">I", stream, pos)[0]


def _decode_with_pil(data) -> np.ndarray:
    """Any image PIL reads -> uint8 [H, W, 3]."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)


_SCRATCH = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """A flat uint8 buffer of ``nbytes`` reused by this thread's decodes: a fresh one per batch (MBs) is
    handed back to the OS and faulted in, zeroed, page by page the next time."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _SCRATCH.buf = np.empty(nbytes, np.uint8)
    return buf[:nbytes]


def decode_frames(images: Sequence, size: int | None = None, digest_checked: bool = False,
                  allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> np.ndarray:
    """Encoded images (bytes or any buffer: PNG, or any format PIL reads) -> uint8 [n, 3, H, W], channels
    first as the model takes them, in channels-last memory (a view of [n, H, W, 3]: the images' own pixel
    order, torch's ``channels_last``); every image ``size`` x ``size`` when given, else the first one's size
    (``FrameShapeError`` otherwise). Module-level: tests count calls.

    vlaprep's own PNGs (see ``_PNG_SIGNATURE``) are decoded batch-wide without PIL, to exactly PIL's
    pixels; every other image (other filters, palettes, grey, alpha, JPEG, damaged streams) through PIL.
    Channels-last memory because un-filtering then adds whole contiguous rows, and a trainer's device
    reorders for free what would cost a worker a strided copy of every byte (~35% of decoding here).
    ``digest_checked``: the images come from a file whose sha256 matched the manifest, so their zlib
    streams are the writer's bytes and their adler32 (~25% of the decoding) is not computed again.
    ``allocate(shape)``: where the uint8 [n, H, W, 3] pixels go (e.g. shared memory a DataLoader worker
    hands over as is)."""
    n = len(images)
    out: np.ndarray | None = None
    fallback: dict[int, np.ndarray] = {}  # index -> PIL's [H, W, 3]
    fast: list[int] = []
    for j, data in enumerate(images):
        view = memoryview(data).cast("B")
        png = _rgb8_png_stream(view)
        if png is None:
            frame = fallback[j] = _decode_with_pil(view)
            shape = frame.shape[:2]
        else:
            shape = png[:2]
        if out is None:
            height, width = (size, size) if size is not None else shape
            out = np.empty((n, height, width, 3), np.uint8) if allocate is None else allocate((n, height, width, 3))
            filtered = _scratch(n * height * (3 * width + 1)).reshape(n, height, 3 * width + 1)  # rows: filter, R G B ...
        if shape != (height, width):
            raise FrameShapeError(j, (*shape, 3), (height, width))
        if png is not None:
            inflated = _inflate_into(png[2], filtered[j].reshape(-1), check_adler32=not digest_checked)
            if inflated and (filtered[j, :, 0] == _PNG_FILTER_UP).all():
                fast.append(j)
            else:
                fallback[j] = _decode_with_pil(view)
    if out is None:
        return np.zeros((0, 3, size or 0, size or 0), np.uint8)
    if fast:
        # "Up": pixel row r = filtered row r + pixel row r-1 (mod 256; row -1 is zeros).
        deltas = filtered[:, :, 1:]  # [n, H, 3W]
        rows = out.reshape(n, height, 3 * width)
        if len(fast) >= _ROWWISE_MIN_FRAMES:  # frames decoded by PIL are overwritten below
            rows[:, 0] = deltas[:, 0]
            for r in range(1, height):
                np.add(rows[:, r - 1], deltas[:, r], out=rows[:, r])
        else:
            for j in fast:
                np.cumsum(deltas[j], axis=0, dtype=np.uint8, out=rows[j])
    for j, frame in fallback.items():
        out[j] = frame
    return out.transpose(0, 3, 1, 2)


def decode_frame(data) -> np.ndarray:
    """One encoded image (PNG or any PIL format) -> uint8 array [H, W, 3]."""
    return decode_frames([data])[0].transpose(1, 2, 0)  # (contiguous: decode_frames' memory order)


def decode_image(data) -> torch.Tensor:
    """One encoded image (PNG or any PIL format) -> uint8 tensor [3, H, W] (contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(decode_frames([data])[0]))


# --------------------------------------------------------------------------------------------------
# OpenVLA's image augmentation, in torch


# prismatic (OpenVLA) training config ``image_aug=True``, applied by dlimp's ``augment_image`` in this order,
# clipping to [0, 1] after each op; the float image is converted back to uint8 like TF's
# ``convert_image_dtype(saturate=True)`` (floor(x * 255.5), clipped).
OPENVLA_AUGMENT = {
    "random_resized_crop": {"scale": (0.9, 0.9), "ratio": (1.0, 1.0)},
    "random_brightness": 0.2,  # + U[-0.2, 0.2]
    "random_contrast": (0.8, 1.2),  # (x - per-channel mean) * U[0.8, 1.2] + mean
    "random_saturation": (0.8, 1.2),  # HSV s * U[0.8, 1.2], clipped to [0, 1]
    "random_hue": 0.05,  # HSV h + U[-0.05, 0.05], mod 1
    "augment_order": ("random_resized_crop", "random_brightness", "random_contrast", "random_saturation", "random_hue"),
}


def openvla_augment_params(keys: Sequence[tuple], seed: int, epoch: int) -> dict[str, np.ndarray]:
    """Per-item parameters, deterministic in (seed, epoch, key); key = (dataset_name, episode_id, step_index,
    pass) so a repeated row (mixture) gets fresh ones. Returns arrays [n]: crop box ``y0, x0, h, w``
    (fractions of the image, TF ``crop_and_resize`` boxes), ``brightness`` delta, ``contrast`` and
    ``saturation`` factors, ``hue`` delta."""
    cfg = OPENVLA_AUGMENT
    scale_lo, scale_hi = cfg["random_resized_crop"]["scale"]
    ratio_lo, ratio_hi = cfg["random_resized_crop"]["ratio"]
    out = {k: np.empty(len(keys)) for k in ("y0", "x0", "h", "w", "brightness", "contrast", "saturation", "hue")}
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(json.dumps(list(key)).encode(), digest_size=8).digest()
        u = np.random.default_rng([seed, epoch, _TAG_AUGMENT, int.from_bytes(digest, "little")]).random(8)
        scale = scale_lo + (scale_hi - scale_lo) * u[0]
        ratio = math.exp(math.log(ratio_lo) + (math.log(ratio_hi) - math.log(ratio_lo)) * u[1])
        h = min(1.0, math.sqrt(scale / ratio))
        w = min(1.0, math.sqrt(scale * ratio))
        out["h"][i], out["w"][i] = h, w
        out["y0"][i] = u[2] * (1.0 - h)
        out["x0"][i] = u[3] * (1.0 - w)
        out["brightness"][i] = -cfg["random_brightness"] + 2 * cfg["random_brightness"] * u[4]
        lo, hi = cfg["random_contrast"]
        out["contrast"][i] = lo + (hi - lo) * u[5]
        lo, hi = cfg["random_saturation"]
        out["saturation"][i] = lo + (hi - lo) * u[6]
        out["hue"][i] = -cfg["random_hue"] + 2 * cfg["random_hue"] * u[7]
    return out


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] RGB in [0, 1] -> HSV in [0, 1] (h as a fraction of a turn), as TF's rgb_to_hsv."""
    r, g, b = x.unbind(-3)
    v, _ = x.max(-3)
    mn, _ = x.min(-3)
    delta = v - mn
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.where(delta > 0, h, torch.zeros_like(h)) / 6.0
    h = torch.remainder(h, 1.0)
    return torch.stack([h, s, v], -3)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(-3)
    h6 = torch.remainder(h, 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.to(torch.int64) % 6
    r = torch.stack([v, q, p, p, t, v], 0).gather(0, i.unsqueeze(0)).squeeze(0)
    g = torch.stack([t, v, v, q, p, p], 0).gather(0, i.unsqueeze(0)).squeeze(0)
    b = torch.stack([p, p, t, v, v, q], 0).gather(0, i.unsqueeze(0)).squeeze(0)
    return torch.stack([r, g, b], -3)


def openvla_augment(frames: torch.Tensor, params: Mapping[str, np.ndarray]) -> torch.Tensor:
    """uint8 frames [n, (H,) 3, S, S] -> augmented uint8 frames of the same shape; ``params`` from
    ``openvla_augment_params`` (one set per item, shared by its H history frames).

    Order and ranges as OpenVLA (``OPENVLA_AUGMENT``): random resized crop (area 0.9, square, bilinear
    resize back as TF ``crop_and_resize``: sample points y0*(S-1) + i*h*(S-1)/(S-1)), brightness +-0.2,
    contrast x0.8..1.2 around each channel's mean, saturation x0.8..1.2, hue +-0.05 turn; clipped to
    [0, 1] after each op; back to uint8 as floor(x * 255.5)."""
    shape = frames.shape
    n, size = shape[0], shape[-1]
    # (contiguous first: the reductions below then add in one order, whatever memory order frames have)
    x = frames.contiguous().reshape(n, -1, 3, shape[-2], size).to(torch.float32) / 255.0  # [n, H, 3, S, S]
    frames_per_item = x.shape[1]
    p = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in params.items()}
    # Crop + bilinear resize (grid_sample with align_corners=True samples pixel centres 0..S-1, like TF).
    lin = torch.linspace(0.0, 1.0, size)
    ys = p["y0"][:, None] + p["h"][:, None] * lin[None, :]  # [n, S] fractions of (S-1)
    xs = p["x0"][:, None] + p["w"][:, None] * lin[None, :]
    grid = torch.stack(
        [(xs * 2 - 1)[:, None, :].expand(n, size, size), (ys * 2 - 1)[:, :, None].expand(n, size, size)], -1
    )  # [n, S, S, 2] (x, y)
    grid = grid.repeat_interleave(frames_per_item, 0)
    flat = x.reshape(n * frames_per_item, 3, shape[-2], size)
    flat = torch.nn.functional.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=True)
    x = flat.reshape(n, frames_per_item, 3, size, size).clamp_(0, 1)

    def per_item(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None, None, None]

    x = (x + per_item(p["brightness"])).clamp_(0, 1)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    x = ((x - mean) * per_item(p["contrast"]) + mean).clamp_(0, 1)
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(-3)
    s = (s * p["saturation"][:, None, None, None]).clamp(0, 1)
    x = _hsv_to_rgb(torch.stack([h, s, v], -3)).clamp_(0, 1)
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(-3)
    h = torch.remainder(h + p["hue"][:, None, None, None], 1.0)
    x = _hsv_to_rgb(torch.stack([h, s, v], -3)).clamp_(0, 1)
    out = torch.floor(x * 255.5).clamp_(0, 255).to(torch.uint8)
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------------
# Work assignment


@dataclasses.dataclass(frozen=True)
class ShardSlice:
    """Rows [start, stop) of one shard file, starting at an episode start (a piece of a worker's stream)."""

    path: str
    start: int = 0
    stop: int | None = None  # None: to the end of the file
    rows: int | None = None  # expected rows of the whole file (manifest), checked when present
    bytes: int | None = None  # expected size of the whole file (manifest), checked when present
    sha256: str | None = None  # expected digest of the whole file (manifest), checked when present

    def __post_init__(self):
        if self.start < 0 or (self.stop is not None and self.stop < self.start):
            raise ValueError(f"expected 0 <= start <= stop for {self.path!r}, got start={self.start}, stop={self.stop}")


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        if world_size is None:
            world_size = dist.get_world_size() if initialized else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([int(e) for e in entropy])


class MixtureSampler:
    """The dataset ids of one global worker's epoch: i.i.d. draws from ``probabilities``.

    Draw k is ``searchsorted(cdf, u_k, side="right")`` with ``cdf = cumsum(p)`` (last entry set to 1.0) and
    u_k the ``k % MIXTURE_BLOCK``-th float64 of ``np.random.default_rng([seed, epoch, 3, worker, k //
    MIXTURE_BLOCK]).random(MIXTURE_BLOCK)``: any position is reached without replaying the ones before."""

    def __init__(self, probabilities: Sequence[float], seed: int, epoch: int, worker: int):
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 1 or len(p) == 0 or (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
            raise ValueError(f"expected non-negative finite probabilities with a positive sum, got {list(p)!r}")
        self.cdf = np.cumsum(p)
        self.cdf[-1] = 1.0
        self.seed, self.epoch, self.worker = int(seed), int(epoch), int(worker)
        self._block: tuple[int, np.ndarray] | None = None

    def _ids_of_block(self, b: int) -> np.ndarray:
        if self._block is None or self._block[0] != b:
            u = _rng(self.seed, self.epoch, _TAG_MIXTURE, self.worker, b).random(MIXTURE_BLOCK)
            self._block = (b, np.searchsorted(self.cdf, u, side="right").astype(np.int64))
        return self._block[1]

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Dataset indices of draws [start, stop) (int64)."""
        if stop <= start:
            return np.zeros(0, np.int64)
        parts = []
        for b in range(start // MIXTURE_BLOCK, (stop - 1) // MIXTURE_BLOCK + 1):
            lo, hi = b * MIXTURE_BLOCK, (b + 1) * MIXTURE_BLOCK
            parts.append(self._ids_of_block(b)[max(start, lo) - lo: min(stop, hi) - lo])
        return np.concatenate(parts)

    def counts(self, stop: int, n: int) -> np.ndarray:
        """How many of draws [0, stop) went to each of the n datasets."""
        out = np.zeros(n, np.int64)
        for lo in range(0, stop, 1 << 20):
            out += np.bincount(self.ids(lo, min(stop, lo + (1 << 20))), minlength=n)
        return out


def mixture_probabilities(weights: Sequence[float], num_transitions: Sequence[int], balance_weights: bool = True) -> np.ndarray:
    """OpenVLA's sampling probabilities: ``w * n / sum(w * n)`` (balance_weights) or ``w / sum(w)``."""
    w = np.asarray(weights, dtype=np.float64)
    if balance_weights:
        w = w * np.asarray(num_transitions, dtype=np.float64)
    return w / w.sum()


@dataclasses.dataclass(frozen=True)
class Mixture:
    """The datasets sampled (weight > 0, sorted by name) and what their probabilities came from."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    num_transitions: tuple[int, ...]
    probabilities: tuple[float, ...]
    rows: tuple[int, ...]  # rows of each dataset in the split read
    epoch_length: int  # OpenVLA's effective dataset length over the primary datasets

    def __post_init__(self):
        n = len(self.names)
        if not n or any(len(x) != n for x in (self.weights, self.num_transitions, self.probabilities, self.rows)):
            raise ValueError(f"expected one weight, count, probability and row count per dataset, got {self!r}")
        if self.epoch_length < 1:
            raise ValueError(f"expected an epoch length >= 1, got {self.epoch_length}")


# --------------------------------------------------------------------------------------------------
# Episode contiguity


class _EpisodeOrderCheck:
    """Raises ValueError unless rows arrive as whole episodes with step_index 0..num_steps-1 in order.

    An episode is identified by (dataset_name, episode_id): two datasets may share episode ids.
    """

    _HINT = "the shard writer guarantees that an episode's rows are contiguous and in step order inside one file"

    def __init__(self, where: str):
        self.where = where
        self.episode: tuple[str, str] | None = None
        self.next_step = 0
        self.num_steps = 0
        self.seen: set[tuple[str, str]] = set()

    @staticmethod
    def _name(key: tuple[str, str] | None) -> str:
        return "none" if key is None else f"{key[1]!r} of dataset {key[0]!r}"

    def row(self, dataset_name: str, episode_id: str, step_index: int, num_steps: int, row: int) -> None:
        key = (dataset_name, episode_id)
        if step_index >= num_steps:
            raise ValueError(
                f"expected step_index < num_steps at row {row} of {self.where}, "
                f"got step {step_index} of episode {self._name(key)} ({num_steps} steps); {self._HINT}"
            )
        if step_index == 0:
            self._close(row)
            if key in self.seen:
                raise ValueError(f"episode {self._name(key)} starts a second time at row {row} of {self.where}; {self._HINT}")
            self.seen.add(key)
            self.episode, self.next_step, self.num_steps = key, 1, num_steps
            return
        if self.episode is None:
            raise ValueError(
                f"expected an episode start (step_index 0) at row {row} of {self.where}, "
                f"got step {step_index} of episode {self._name(key)}; {self._HINT}"
            )
        if (key, step_index, num_steps) != (self.episode, self.next_step, self.num_steps):
            raise ValueError(
                f"expected step {self.next_step} of episode {self._name(self.episode)} ({self.num_steps} steps) at row "
                f"{row} of {self.where}, got step {step_index} of episode {self._name(key)} ({num_steps} steps); {self._HINT}"
            )
        self.next_step += 1

    def _close(self, row: int) -> None:
        if self.episode is not None and self.next_step != self.num_steps:
            raise ValueError(
                f"expected episode {self._name(self.episode)} to have {self.num_steps} steps in {self.where}, "
                f"got {self.next_step} before row {row}; {self._HINT}"
            )

    def finish(self, row: int) -> None:
        self._close(row)
        self.episode = None


@dataclasses.dataclass(frozen=True)
class _FileIndex:
    """What one pass over a file's bookkeeping columns establishes (checked once per process)."""

    num_rows: int
    group_offsets: np.ndarray  # [row_groups + 1] first row of each row group, then num_rows
    episode_starts: np.ndarray  # rows with step_index == 0, ascending
    datasets: dict[str, tuple[int, int]]  # contiguous row range of each dataset


# (root, relative path, size, sha256) -> _FileIndex, for this process.
_INDEXES: dict[tuple, _FileIndex] = {}


# --------------------------------------------------------------------------------------------------
# Streams: a worker's pieces, read sequentially (and repeated, in a mixture)


@dataclasses.dataclass(frozen=True)
class _Stream:
    """One worker's pieces of one dataset (or of the whole split); pass k reads them in ``order(k)``."""

    pieces: tuple[ShardSlice, ...]  # concrete start/stop
    seeds: tuple[int, ...] | None  # entropy of the pass permutations; None: identity (no shuffle)
    repeat: bool

    @property
    def length(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)

    def order(self, k: int) -> np.ndarray:
        if self.seeds is None or len(self.pieces) < 2:
            return np.arange(len(self.pieces))
        return _rng(*self.seeds, k).permutation(len(self.pieces))

    def segments(self, c0: int, c1: int) -> list[tuple[ShardSlice, int, int]]:
        """(piece, row a, row b) covering stream positions [c0, c1), in order (crossing pieces and passes)."""
        out = []
        n = self.length
        if n == 0 or c1 <= c0:
            return out
        if not self.repeat and c1 > n:
            raise ValueError(f"expected stream positions within [0, {n}), got [{c0}, {c1})")
        c = c0
        while c < c1:
            k, offset = divmod(c, n)
            order = self.order(k)
            lengths = np.array([self.pieces[i].stop - self.pieces[i].start for i in order])
            ends = np.cumsum(lengths)
            j = int(np.searchsorted(ends, offset, side="right"))
            while c < c1 and j < len(order):
                piece = self.pieces[order[j]]
                start_in_piece = offset - (int(ends[j]) - int(lengths[j]))
                take = min(int(lengths[j]) - start_in_piece, c1 - c)
                out.append((piece, piece.start + start_in_piece, piece.start + start_in_piece + take))
                c += take
                offset += take
                j += 1
        return out


# --------------------------------------------------------------------------------------------------
# Arrow -> columns


class _BinaryColumn:
    """A binary column (images) as zero-copy NumPy views of its Arrow buffers: value r is
    ``buffers[owner[r]][starts[r]:stops[r]]``; no Python object per row until one is asked for."""

    def __init__(self, column: pa.ChunkedArray):
        self.buffers: list[np.ndarray] = []
        starts, stops, owners = [], [], []
        for i, chunk in enumerate(column.chunks):
            _, offsets, data = chunk.buffers()
            offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
            bounds = np.frombuffer(offsets, offset_type)[chunk.offset: chunk.offset + len(chunk) + 1].astype(np.int64)
            self.buffers.append(np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8))
            starts.append(bounds[:-1])
            stops.append(bounds[1:])
            owners.append(np.full(len(chunk), i, np.int64))
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.stops = np.concatenate(stops) if stops else np.zeros(0, np.int64)
        self.owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)

    def view(self, r: int) -> np.ndarray:
        return self.buffers[self.owner[r]][self.starts[r]: self.stops[r]]

    def views(self, rows) -> list[np.ndarray]:
        return [self.view(int(r)) for r in rows]

    def value(self, r: int) -> bytes:
        return self.view(int(r)).tobytes()


def _column(table: pa.Table, name: str):
    """Columnar NumPy view of one column: fixed lists [rows, width], lists (flat, offsets), binaries as
    ``_BinaryColumn``, strings as lists."""
    column = table.column(name)
    t = column.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return _BinaryColumn(column)  # not combine_chunks: that would copy every image of the unit
    arr = column.combine_chunks()
    if pa.types.is_fixed_size_list(t):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = arr.offsets.to_numpy()
        return arr.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]
    if pa.types.is_primitive(t):
        return arr.to_numpy(zero_copy_only=False)
    return arr.to_pylist()  # strings


def _row_group_pool() -> pa.MemoryPool:
    """Where decoded row groups live: Arrow's jemalloc pool where pyarrow has one, else the default pool."""
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:
        return pa.default_memory_pool()


class _OpenShard:
    """One open shard file: its footer (``parquet``) and the rows of its row groups.

    Whole row groups are decoded into ``_row_group_pool()``: a group is ~64 MB decoded, and Arrow's default
    pool (mimalloc) hands such blocks back to the OS when freed, so every group was written into fresh,
    zeroed pages -- 20-30% of a DataLoader worker's time on the 2-core VM (perf: clear_page), against
    ~2% with jemalloc, which reuses them. A group's first rows only (``rows`` short of the group) are
    decoded by Parquet's batch reader, which stops there; the dataset scanner would decode the whole group.
    One thread each: the DataLoader workers (one per core) are the parallelism; threads only contend."""

    def __init__(self, source: pa.NativeFile, remote: bool):
        # pre_buffer coalesces a row group's reads into a few large requests: worth it on object stores; on
        # local files it only adds a fresh buffer of the group's compressed bytes per read.
        self.parquet = pq.ParquetFile(source, pre_buffer=remote)
        options = pads.ParquetFragmentScanOptions(pre_buffer=remote)
        self._fragment = pads.ParquetFileFormat(default_fragment_scan_options=options).make_fragment(source)

    def read_group(self, k: int, columns: Sequence[str], rows: int) -> pa.Table:
        """The first ``rows`` rows of row group ``k`` (selected columns)."""
        if rows == self.parquet.metadata.row_group(k).num_rows:
            return self._fragment.subset(row_group_ids=[k]).to_table(columns=list(columns), use_threads=False,
                                                                     memory_pool=_row_group_pool())
        batches = self.parquet.iter_batches(batch_size=rows, row_groups=[k], columns=list(columns), use_threads=False)
        return pa.Table.from_batches([next(batches)])


class _RowGroups:
    """The Parquet row groups a worker's streams are reading, shared between the streams (per process).

    Each stream (the split, or one dataset of a mixture) declares, with every read, the rows of its current
    piece it will still read; a group stays in memory while some stream's rows reach into it. So a group
    that two streams read -- where one dataset's rows end and the next one's begin, the streams alternating
    unit by unit -- is decoded once per pass. A group is decoded only up to the last row a stream will read
    from it (Parquet decodes from a group's first row, but can stop early): a dataset that ends early in a
    group does not pay for the rest. Memory: about one row group per stream."""

    def __init__(self):
        # (path, group) -> (its rows from the first on, as far as decoded; first row lo; end hi)
        self.tables: dict[tuple[str, int], tuple[pa.Table, int, int]] = {}
        self.ahead: dict[int, tuple[str, int, int]] = {}  # stream -> (path, rows [a, until)) it will still read

    def read(self, shard: _OpenShard, path: str, columns: Sequence[str], index: _FileIndex, a: int, b: int,
             stream: int, until: int) -> pa.Table:
        """Rows [a, b) of the file at ``path`` (opened as ``shard``) for ``stream``, which reads on to row ``until``."""
        self.ahead[stream] = (path, a, until)
        offsets = index.group_offsets
        parts = []
        k = int(np.searchsorted(offsets, a, side="right")) - 1
        while k < len(offsets) - 1 and offsets[k] < b:
            lo, hi = int(offsets[k]), int(offsets[k + 1])
            cached = self.tables.get((path, k))
            if cached is None or cached[0].num_rows < min(b, hi) - lo:
                last = max(min(hi, end) for p, first, end in self.ahead.values() if p == path and first < hi and lo < end)
                self.tables[path, k] = cached = (shard.read_group(k, columns, last - lo), lo, hi)
            parts.append(cached[0].slice(max(a, lo) - lo, min(b, hi) - max(a, lo)))
            k += 1
        for key, (_, lo, hi) in list(self.tables.items()):
            if not any(p == key[0] and first < hi and lo < end for p, first, end in self.ahead.values()):
                del self.tables[key]
        return pa.concat_tables(parts)


@dataclasses.dataclass
class _Rows:
    """Gathered items, column-wise: the unit of batch assembly (see ``_Unit.gather``)."""

    cols: dict[str, Any]
    keys: list[tuple]  # (dataset_name, episode_id, step_index, pass) per item: augmentation seeds
    n: int

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        if len(parts) == 1:
            return parts[0]
        cols: dict[str, Any] = {}
        for name, first in parts[0].cols.items():
            values = [p.cols[name] for p in parts]
            if isinstance(first, list):
                cols[name] = [v for part in values for v in part]
            elif isinstance(first, tuple):  # ragged: (lengths, flat)
                cols[name] = (np.concatenate([v[0] for v in values]), np.concatenate([v[1] for v in values]))
            else:
                cols[name] = np.concatenate(values)
        return _Rows(cols, [k for p in parts for k in p.keys], sum(p.n for p in parts))


# --------------------------------------------------------------------------------------------------
# State


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """The JSON-serialisable position of one rank's loading (``ShardDataset.state_dict()``)::

        {"format": "vlaprep.loader.state", "version": 1,
         "fingerprint": "<sha256 of split, seed, shuffle, window, mixture, file digests>",
         "epoch": 3, "world_size": 8, "rank": 2, "num_workers": 4,
         "positions": {"0": 1216, "1": 1216, "2": 1184, "3": 1184},   # items delivered per logical worker
         "next_worker": 2,                                            # the logical worker that delivers next
         "complete": false}                                           # the epoch is over for this rank

    A DataLoader worker's own state (torchdata's StatefulDataLoader) has its one entry in ``positions``."""

    fingerprint: str
    epoch: int
    world_size: int
    rank: int
    num_workers: int
    positions: dict[int, int]
    next_worker: int = 0
    complete: bool = False

    def to_dict(self) -> dict:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": self.fingerprint, "epoch": self.epoch,
                "world_size": self.world_size, "rank": self.rank, "num_workers": self.num_workers,
                "positions": {str(k): int(v) for k, v in sorted(self.positions.items())},
                "next_worker": self.next_worker, "complete": self.complete}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> LoaderState:
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise LoaderStateError(f"expected a {STATE_FORMAT!r} state (ShardDataset/ShardLoader.state_dict()), got {got!r}")
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"expected state version {STATE_VERSION}, got {state.get('version')!r}")
        try:
            return cls(
                fingerprint=str(state["fingerprint"]), epoch=int(state["epoch"]), world_size=int(state["world_size"]),
                rank=int(state["rank"]), num_workers=int(state["num_workers"]),
                positions={int(k): int(v) for k, v in dict(state["positions"]).items()},
                next_worker=int(state.get("next_worker", 0)), complete=bool(state.get("complete", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LoaderStateError(f"expected a complete loader state, got {dict(state)!r}: {e}") from e


def _round_robin(batches_left: Sequence[int], consumed: int) -> tuple[list[int], int]:
    """DataLoader(in_order=True) hands out batches round-robin over worker ids, skipping workers that have
    none left. -> (batches taken from each worker id, the id that delivers next)."""
    left = list(batches_left)
    taken = [0] * len(left)
    while consumed > 0:
        active = [w for w in range(len(left)) if left[w] > 0]
        if not active:
            raise LoaderStateError(f"expected at most {sum(batches_left)} batches in this epoch, got {sum(taken) + consumed}")
        m = min(left[w] for w in active)
        if consumed >= m * len(active):
            for w in active:
                left[w] -= m
                taken[w] += m
            consumed -= m * len(active)
            continue
        full, rest = divmod(consumed, len(active))
        for w in active:
            left[w] -= full
            taken[w] += full
        for w in active[:rest]:
            left[w] -= 1
            taken[w] += 1
        active_after = [w for w in active if left[w] > 0]
        later = [w for w in active_after if w > (active[rest - 1] if rest else -1)]
        return taken, (later[0] if later else (active_after[0] if active_after else 0))
    active = [w for w in range(len(left)) if left[w] > 0]
    return taken, (active[0] if active else 0)


# --------------------------------------------------------------------------------------------------
# Dataset


class ShardDataset(IterableDataset):
    """Streams the rows of a shards output as training items or batches (see the module docstring).

    Arguments beyond the read options: ``mixture`` ("manifest" = the weights ``vlaprep shards`` recorded,
    a ``{dataset: weight}`` dict, or None for one pass over the split), ``balance_weights`` (OpenVLA's
    weight x num_transitions), ``batch_size``/``drop_last``/``pad_token_id`` (yield collated batches),
    ``augment`` (None or "openvla"), ``filesystem`` (a pyarrow filesystem for a URI root), ``cache_dir`` and
    ``cache_limit_bytes`` (local copy of remote files).

    ``set_epoch`` does not reach ``persistent_workers=True`` DataLoader workers, which keep the copy of the
    dataset they were started with; ``ShardLoader`` starts fresh workers per epoch.

    Integrity: ``require_manifest=True`` refuses a directory without ``manifest.json``;
    ``verify_sha256=True`` hashes each file once (per dataset and the DataLoader workers it forks) before
    serving it (2-11% of an epoch's time over local files; benchmarks/loader_benchmark.py), and then PNG
    decoding skips the streams' own adler32 checks, which pays most of it back. ``verify()`` hashes every
    file of the split now: DataLoader workers forked afterwards inherit the digests. The check is by path: a file swapped between
    its check and its open is not caught.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        history: int = 1,
        epoch: int = 0,
        columns: Sequence[str] | None = None,
        decode_images: bool = True,
        pixel_dtype: str = "float32",
        verify_sha256: bool = True,
        require_manifest: bool = True,
        mixture: str | Mapping[str, float] | None = None,
        balance_weights: bool = True,
        batch_size: int | None = None,
        drop_last: bool = False,
        pad_token_id: int = 0,
        augment: str | None = None,
        filesystem: pafs.FileSystem | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_limit_bytes: int | None = None,
    ):
        super().__init__()
        if pixel_dtype not in ("float32", "uint8"):
            raise ValueError(f"expected pixel_dtype 'float32' ([0, 1]) or 'uint8' (raw 0..255), got {pixel_dtype!r}")
        # uint8 moves 4x fewer bytes from DataLoader workers to the trainer; normalize on the GPU.
        self.pixel_dtype = pixel_dtype
        if history < 1:
            raise ValueError(f"expected history >= 1, got {history!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"expected shuffle_buffer >= 0, got {shuffle_buffer!r}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"expected seed >= 0 and epoch >= 0, got seed={seed!r}, epoch={epoch!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"expected batch_size None (items) or >= 1, got {batch_size!r}")
        if augment not in (None, "openvla"):
            raise ValueError(f"expected augment None or 'openvla', got {augment!r}")
        if augment and not decode_images:
            raise ValueError("expected decode_images=True with augment='openvla' (it works on pixels), got decode_images=False")
        if cache_limit_bytes is not None and (cache_dir is None or int(cache_limit_bytes) < 1):
            raise ValueError(f"expected cache_limit_bytes >= 1 with a cache_dir, got {cache_limit_bytes!r} (cache_dir={cache_dir!r})")
        self.filesystem = filesystem
        self.root = resolve_shards_root(root, filesystem)
        self.split = split
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.history = int(history)
        self.epoch = int(epoch)
        self.decode_images = bool(decode_images)
        self.verify_sha256 = bool(verify_sha256)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.drop_last = bool(drop_last)
        self.pad_token_id = int(pad_token_id)
        self.augment = augment
        self.balance_weights = bool(balance_weights)
        self._cache = None if cache_dir is None else _FileCache(os.fspath(cache_dir), cache_limit_bytes)
        self._fs: tuple[pafs.FileSystem, str] | None = None  # per process; dropped when pickled
        self._fs_pid = os.getpid()
        self._resume: LoaderState | None = None  # set by load_state_dict, consumed per epoch
        self._worker_offset = 0  # ShardLoader's rotation of worker ids after a mid-epoch resume
        self._active: _WorkerIterator | None = None
        self.manifest = load_manifest(self.root, filesystem)
        if self.manifest is None:
            fs, base = self._fs_base()
            kind = fs.get_file_info(base).type
            if kind in (pafs.FileType.NotFound, pafs.FileType.File):
                raise UnpublishedShardsError(
                    f"expected a shard directory (or a `vlaprep run` output), got {self.root!r}, which "
                    f"{'is a file' if kind == pafs.FileType.File else 'does not exist'}"
                )
            if require_manifest:
                raise UnpublishedShardsError(
                    f"expected {MANIFEST_NAME} in {self.root!r}, got none: the shard job writes it last, so this is "
                    "an incomplete, interrupted or unpublished output; hint: wait for `vlaprep shards` to finish or "
                    f"rerun it, or pass require_manifest=False to read {split}/*{SHARD_SUFFIX} unverified"
                )
            warnings.warn(
                f"no {MANIFEST_NAME} in {self.root!r}: reading {split}/*{SHARD_SUFFIX} unverified (require_manifest=False); "
                "the shard job writes the manifest last, so its absence can mean an incomplete or interrupted output",
                stacklevel=2,
            )
            self.verify_sha256 = False  # nothing to verify against
        self.files = list_shard_files(self.root, split, self.manifest, filesystem)
        if not self.files:
            raise ValueError(
                f"expected shard files for split {split!r} under {self.root!r} "
                f"({'listed in ' + MANIFEST_NAME if self.manifest else split + '/*' + SHARD_SUFFIX}), got none"
            )
        # Every file is hashed against the manifest before it is read (see decode_frames' digest_checked).
        self.digests_checked = self.verify_sha256 and all(f.sha256 is not None for f in self.files)
        # Digests shared with the DataLoader workers this process forks (see _DigestLedger).
        self._ledger = None
        if self.verify_sha256 and self.files:
            try:
                self._ledger = _DigestLedger()
            except OSError:  # no writable temp directory: each process hashes for itself, as before
                pass
        self._file_number = {f.path: i for i, f in enumerate(self.files)}
        # One footer read (of a verified file): the schema every file must share.
        self.schema = self._open(self.files[0]).parquet.schema_arrow
        self.layout = ShardLayout.from_schema(self.schema, self.manifest.options if self.manifest else None,
                                              self._where(self.files[0].path))
        if isinstance(columns, str):
            raise ValueError(f"expected a sequence of column names, got the string {columns!r}; wrap it in a list")
        if columns is None:
            self.columns = tuple(self.schema.names)
        else:
            unknown = [c for c in columns if c not in self.schema.names]
            if unknown:
                raise ValueError(f"expected columns among {self.schema.names!r}, got unknown {unknown!r}")
            wanted = set(columns) | set(BOOKKEEPING_COLUMNS)
            self.columns = tuple(n for n in self.schema.names if n in wanted)
        if augment and Column.IMAGE_PRIMARY not in self.columns:
            raise ValueError("expected the image_primary column with augment='openvla', got columns without it")
        self.mixture = self._resolve_mixture(mixture) if mixture is not None else None
        self._plans: dict[tuple, Any] = {}  # per process: pieces per (epoch, G, dataset)
        # Per process: open files (ParquetFile, checked index), and the row groups being read.
        self._readers: collections.OrderedDict[str, tuple[_OpenShard, _FileIndex]] = collections.OrderedDict()
        self._row_groups = _RowGroups()
        self._share = False  # set per pass: batches built in shared memory (in a DataLoader worker)

    # -- public helpers ---------------------------------------------------------------------------

    def verify(self) -> None:
        """Check every file of the split against the manifest now (size, sha256), in this process.

        Raises ``ShardIntegrityError`` at the first mismatch. DataLoader workers forked after this call
        inherit the cached digests and do not hash again; without it the first worker to read a file hashes
        it and the others take its digest from the ledger they share."""
        for f in self.files:
            self._local(f)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` on the next iteration. A restored position (``load_state_dict``) is kept
        when ``epoch`` is the restored epoch, and dropped otherwise."""
        if epoch < 0:
            raise ValueError(f"expected epoch >= 0, got {epoch!r}")
        if int(epoch) != self.epoch:
            self._resume = None
            self._worker_offset = 0
        self.epoch = int(epoch)

    def num_global_workers(self, num_workers: int = 0) -> int:
        return self.world_size * max(1, int(num_workers))

    def sampler(self, global_worker: int = 0, num_workers: int = 0, epoch: int | None = None) -> MixtureSampler:
        """The dataset draws of ``global_worker`` (index into ``mixture.names``) for ``epoch``."""
        if self.mixture is None:
            raise MixtureError("expected a dataset with a mixture (mixture='manifest' or {dataset: weight}), got mixture=None")
        if not 0 <= global_worker < self.num_global_workers(num_workers):
            raise ValueError(f"expected 0 <= global_worker < {self.num_global_workers(num_workers)}, got {global_worker}")
        return MixtureSampler(self.mixture.probabilities, self.seed, self.epoch if epoch is None else epoch, global_worker)

    def worker_lengths(self, num_workers: int = 0) -> list[int]:
        """Items each of this rank's ``num_workers`` workers (logical ids) serves in the current epoch."""
        workers = max(1, int(num_workers))
        return [self._stream_length(self.rank * workers + w, self.world_size * workers) for w in range(workers)]

    def slices_for(self, worker_id: int = 0, num_workers: int = 1) -> list[ShardSlice]:
        """The pieces of DataLoader worker ``worker_id`` of ``num_workers`` on this rank, in read order
        (``mixture=None``)."""
        if num_workers < 1 or not 0 <= worker_id < num_workers:
            raise ValueError(f"expected 0 <= worker_id < num_workers, got {worker_id}, {num_workers}")
        G = self.world_size * num_workers
        pieces = self._pieces(None, G, self.epoch)
        return list(pieces[self.rank * num_workers + worker_id])

    # -- state ------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """What decides the order of the items: a state restores only onto a dataset with the same one."""
        doc = {
            "split": self.split, "seed": self.seed, "shuffle": self.shuffle, "window": self._window(),
            "mixture": None if self.mixture is None else {
                "names": list(self.mixture.names), "probabilities": [repr(p) for p in self.mixture.probabilities],
                "epoch_length": self.mixture.epoch_length,
            },
            "files": [[f.path, f.sha256, f.rows] for f in self.files],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def state_dict(self) -> dict:
        """This rank's position (``LoaderState.to_dict()``). In a DataLoader worker: that worker's own entry
        (what torchdata's StatefulDataLoader stores). In the main process: the in-process iterator's
        position (``num_workers=0``), else the restored or epoch-start position; with ``num_workers > 0``
        and a plain DataLoader use ``ShardLoader.state_dict()``."""
        info = get_worker_info()
        active = self._active
        if active is not None and active.owner_pid == os.getpid():
            return active.state().to_dict()
        workers = 1 if info is None else info.num_workers
        if self._resume is not None:
            return self._resume.to_dict()
        return LoaderState(self.fingerprint(), self.epoch, self.world_size, self.rank, workers,
                           {w: 0 for w in range(workers)}).to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` on the next iteration (see the module docstring for the rules)."""
        st = LoaderState.from_dict(state)
        mine = self.fingerprint()
        if st.fingerprint != mine:
            raise LoaderStateError(
                f"expected a state of this dataset (split {self.split!r}, seed {self.seed}, shuffle {self.shuffle}, "
                f"shuffle_buffer {self.shuffle_buffer}, mixture {None if self.mixture is None else dict(zip(self.mixture.names, self.mixture.weights))}, "
                f"the same shard files), got one with fingerprint {st.fingerprint[:12]} (this dataset: {mine[:12]}); "
                "hint: resume with the dataset arguments and shards the checkpoint was taken with"
            )
        self.epoch = st.epoch
        self._resume = st
        self._worker_offset = st.next_worker if st.num_workers > 1 else 0

    def _start_positions(self, num_workers: int, logical: int | None = None) -> tuple[dict[int, int], bool]:
        """-> ({logical worker: start position}, complete) for this epoch, from a restored state."""
        workers = max(1, num_workers)
        st = self._resume
        if st is None or st.epoch != self.epoch:
            return {w: 0 for w in range(workers)}, False
        if st.complete:
            return {}, True
        if all(v == 0 for v in st.positions.values()):
            return {w: 0 for w in range(workers)}, False
        if st.world_size != self.world_size or st.num_workers != workers or st.rank != self.rank:
            raise LoaderStateError(
                f"expected world_size {st.world_size}, rank {st.rank} and {st.num_workers} DataLoader worker(s) per "
                f"rank (the checkpoint's: it stopped mid-epoch {st.epoch} after {sum(st.positions.values())} items on "
                f"this rank), got world_size {self.world_size}, rank {self.rank} and {workers}; hint: resume with the "
                "same world size and num_workers, or from a checkpoint taken at an epoch boundary (then any world size works)"
            )
        if logical is not None and logical not in st.positions:
            raise LoaderStateError(f"expected a position for worker {logical} in the state, got {sorted(st.positions)!r}")
        return {w: st.positions.get(w, 0) for w in range(workers)}, False

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        logical = (worker_id + self._worker_offset) % num_workers
        starts, complete = self._start_positions(num_workers, logical)
        it = _WorkerIterator(self, logical, num_workers, None if complete else starts[logical], complete)
        self._active = it
        return it

    # -- internals: files -------------------------------------------------------------------------

    def _where(self, rel: str) -> str:
        return _join(self.root, rel)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fs"] = None
        state["_active"] = None
        state["_plans"] = {}
        state["_readers"] = collections.OrderedDict()
        state["_row_groups"] = _RowGroups()
        state["_share"] = False
        state["_ledger"] = None  # an open file: a spawned process hashes for itself
        return state

    def _fs_base(self) -> tuple[pafs.FileSystem, str]:
        # Per process: a forked DataLoader worker inherits this object, and pyarrow's GCS/S3 clients (their
        # threads and connections) do not survive a fork; so a new process makes its own.
        if self._fs is None or self._fs_pid != os.getpid():
            given = self.filesystem
            if given is not None and self._fs is not None:  # a new process: a fresh client from its arguments
                given = pickle.loads(pickle.dumps(given))
            self._fs = _filesystem(self.root, given)
            self._fs_pid = os.getpid()
        return self._fs

    def _local(self, f: ShardFile) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path) to read ``f`` from, after checking it: exists, manifest size, sha256
        (``verify_sha256``; once per dataset and its forked workers). Remote files come through the cache when
        there is one."""
        fs, base = self._fs_base()
        path, where = _join(base, f.path), self._where(f.path)
        if self._cache is not None and not isinstance(fs, pafs.LocalFileSystem) and f.sha256 and f.bytes is not None:
            local = self._cache.get(fs, path, where, f.bytes, f.sha256) if self.verify_sha256 else None
            if local is not None:
                fs, path = pafs.LocalFileSystem(), local
        try:
            key, actual_size = _identity(fs, path)
        except FileNotFoundError as e:
            raise ShardIntegrityError(
                f"expected {where} (listed in {MANIFEST_NAME}) to exist, got no such file; "
                "hint: the output was moved or partly deleted: regenerate it with `vlaprep shards`"
            ) from e
        if f.bytes is not None and actual_size != f.bytes:
            raise ShardIntegrityError(
                f"expected {f.bytes} bytes in {where} (from {MANIFEST_NAME}), got {actual_size}; "
                "was the file replaced after the manifest was written?"
            )
        if self.verify_sha256 and f.sha256 is not None:
            digest = _DIGESTS.get(key)
            if digest is None:
                ledger, index = self._ledger, self._file_number.get(f.path)
                if ledger is not None and index is not None:
                    digest = ledger.digest(index, key, lambda: cached_sha256(fs, path, key))
                else:
                    digest = cached_sha256(fs, path, key)
                _DIGESTS[key] = digest
            if digest != f.sha256:
                raise ShardIntegrityError(
                    f"expected sha256 {f.sha256} for {where} (from {MANIFEST_NAME}), got {digest}: the file was modified "
                    "or replaced after the shards were published; hint: restore it or regenerate the output with `vlaprep shards`"
                )
        return fs, path

    def _open(self, f: ShardFile) -> _OpenShard:
        fs, path = self._local(f)
        where = self._where(f.path)
        try:
            return _OpenShard(fs.open_input_file(path), remote=not isinstance(fs, pafs.LocalFileSystem))
        except FileNotFoundError as e:
            raise ShardIntegrityError(f"expected shard {where!r} to exist, got no such file") from e
        except (OSError, pa.ArrowInvalid) as e:
            raise type(e)(f"cannot open shard {where!r}: {e}") from e

    def _file_index(self, f: ShardFile, pf: pq.ParquetFile | None = None) -> _FileIndex:
        """Episode order, row groups, dataset ranges of ``f``: read and checked once per process."""
        key = (self.root, f.path, f.bytes, f.sha256)
        index = _INDEXES.get(key)
        if index is not None:
            return index
        pf = pf or self._open(f).parquet
        where = self._where(f.path)
        meta = pf.metadata
        if f.rows is not None and meta.num_rows != f.rows:
            raise ShardIntegrityError(
                f"expected {f.rows} rows in {where} (from {MANIFEST_NAME}), got {meta.num_rows}; "
                "was the file replaced after the manifest was written?"
            )
        check = _EpisodeOrderCheck(where)
        starts, names_seen, row = [], [], 0
        ranges: dict[str, list[int]] = {}
        for batch in pf.iter_batches(batch_size=16384, columns=list(BOOKKEEPING_COLUMNS)):
            names = batch.column(Column.DATASET_NAME).to_pylist()
            ids = batch.column(Column.EPISODE_ID).to_pylist()
            step = batch.column(Column.STEP_INDEX).to_numpy()
            total = batch.column(Column.NUM_STEPS).to_numpy()
            for i in range(batch.num_rows):
                check.row(names[i], ids[i], int(step[i]), int(total[i]), row + i)
                name = names[i]
                if not names_seen or names_seen[-1] != name:
                    if name in ranges:
                        raise ShardIntegrityError(
                            f"expected the rows of dataset {name!r} to be contiguous in {where} (the writer sorts by "
                            f"dataset), got them again at row {row + i}; hint: regenerate the output with `vlaprep shards`"
                        )
                    names_seen.append(name)
                    ranges[name] = [row + i, row + i]
                ranges[name][1] = row + i + 1
            starts.append(np.flatnonzero(step == 0) + row)
            row += batch.num_rows
        check.finish(row)
        datasets = {k: (v[0], v[1]) for k, v in ranges.items()}
        if f.datasets is not None and datasets != f.dataset_ranges():
            raise ShardIntegrityError(
                f"expected dataset row ranges {f.dataset_ranges()!r} in {where} (from {MANIFEST_NAME}'s per-file "
                f"counts, in the writer's sorted order), got {datasets!r}; hint: regenerate the output with `vlaprep shards`"
            )
        offsets = np.zeros(meta.num_row_groups + 1, np.int64)
        for k in range(meta.num_row_groups):
            offsets[k + 1] = offsets[k] + meta.row_group(k).num_rows
        index = _FileIndex(meta.num_rows, offsets, np.concatenate(starts) if starts else np.zeros(0, np.int64), datasets)
        _INDEXES[key] = index
        return index

    # -- internals: plans -------------------------------------------------------------------------

    def _window(self) -> int:
        return max(1, self.shuffle_buffer) if self.shuffle else 1

    def _unit(self) -> int:
        w = self._window()
        return w * max(1, -(-MIN_UNIT_ROWS // w))

    def _segments_of(self, dataset: str | None) -> list[ShardSlice]:
        out = []
        for f in self.files:
            if dataset is None:
                rows = f.rows
                out.append(ShardSlice(f.path, 0, rows, rows=f.rows, bytes=f.bytes, sha256=f.sha256))
                continue
            a, b = f.dataset_ranges().get(dataset, (0, 0))
            if b > a:
                out.append(ShardSlice(f.path, a, b, rows=f.rows, bytes=f.bytes, sha256=f.sha256))
        return out

    def _pieces(self, dataset: str | None, G: int, epoch: int) -> list[tuple[ShardSlice, ...]]:
        """Pieces of every global worker (dataset None: the whole split)."""
        key = (dataset, G, epoch)
        if key in self._plans:
            return self._plans[key]
        segments = self._segments_of(dataset)
        salt = 0 if dataset is None else 1 + self.mixture.names.index(dataset)
        if self.shuffle:
            order = _rng(self.seed, epoch, _TAG_FILES, salt).permutation(len(segments))
            segments = [segments[i] for i in order]
        by_file = {f.path: f for f in self.files}
        if dataset is None:
            plan = self._balanced([self._concrete(by_file[s.path], s) for s in segments], G, by_file)
            self._plans[key] = plan
            return plan
        if len(segments) < G:
            segments = [p for s in segments for p in self._episode_aligned(by_file[s.path], s)]
        segments = [self._concrete(by_file[s.path], s) for s in segments]
        if 0 < len(segments) < G:
            plan = [(segments[g % len(segments)],) for g in range(G)]  # shared (repeat within the mixture)
        else:
            plan = [tuple(segments[g::G]) for g in range(G)]
        self._plans[key] = plan
        return plan

    def _balanced(self, segments: list[ShardSlice], G: int, by_file: dict[str, ShardFile]) -> list[tuple[ShardSlice, ...]]:
        """The split's plan: its rows in segment order cut into G contiguous runs, run g ending near
        (g + 1) / G of the rows, at the episode start nearest to it (a piece starts an episode: history
        windows never reach before it). Global workers -- and so ranks -- get equal rows within about an
        episode, not within a file: dealing whole files left a worker (or a rank) with up to a file's rows
        more than another, which the others wait for at the end of every epoch. Only the files a cut falls
        in are indexed."""
        lengths = np.array([s.stop - s.start for s in segments], np.int64)
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        cuts = [0]
        for k in range(1, G):
            target = (k * total + G // 2) // G
            i = int(np.searchsorted(ends, target, side="right"))
            cut = total
            if i < len(segments):
                seg, first = segments[i], int(ends[i] - lengths[i])
                cut = target
                if target > first:  # inside the segment: the nearest episode start (or its end)
                    starts = self._file_index(by_file[seg.path]).episode_starts
                    inside = starts[(starts > seg.start) & (starts < seg.stop)]
                    candidates = np.concatenate([[seg.start], inside, [seg.stop]]) - seg.start + first
                    cut = int(candidates[np.argmin(np.abs(candidates - target))])  # ties: the earlier
            cuts.append(max(cut, cuts[-1]))
        cuts.append(total)
        plan = []
        for g in range(G):
            a, b = cuts[g], cuts[g + 1]
            pieces = []
            for seg, first, end in zip(segments, (ends - lengths).tolist(), ends.tolist()):
                lo, hi = max(a, first), min(b, end)
                if lo < hi:
                    pieces.append(dataclasses.replace(seg, start=seg.start + lo - first, stop=seg.start + hi - first))
            plan.append(tuple(pieces))
        return plan

    def _concrete(self, f: ShardFile, s: ShardSlice) -> ShardSlice:
        if s.stop is not None:
            return s
        return dataclasses.replace(s, stop=self._file_index(f).num_rows)

    def _episode_aligned(self, f: ShardFile, s: ShardSlice) -> list[ShardSlice]:
        """Cut ``s`` at each row-group start moved forward to the next episode start (step_index == 0)."""
        index = self._file_index(f)
        start, stop = s.start, index.num_rows if s.stop is None else s.stop
        cuts = {start, stop}
        for offset in index.group_offsets[:-1]:
            j = int(np.searchsorted(index.episode_starts, offset))
            cut = int(index.episode_starts[j]) if j < len(index.episode_starts) else index.num_rows
            if start < cut < stop:
                cuts.add(cut)
        cuts = sorted(cuts)
        return [dataclasses.replace(s, start=a, stop=b) for a, b in zip(cuts[:-1], cuts[1:]) if a < b]

    def _streams(self, g: int, G: int, epoch: int) -> list[_Stream]:
        """Global worker g's streams: one (the split) without a mixture, one per sampled dataset with it."""
        if self.mixture is None:
            return [_Stream(self._pieces(None, G, epoch)[g], None, repeat=False)]
        out = []
        for i, name in enumerate(self.mixture.names):
            pieces = self._pieces(name, G, epoch)[g]
            seeds = (self.seed, epoch, _TAG_PASS, g, i) if self.shuffle else None
            out.append(_Stream(pieces, seeds, repeat=True))
        return out

    def _stream_length(self, g: int, G: int) -> int:
        if self.mixture is None:
            return sum(p.stop - p.start for p in self._pieces(None, G, self.epoch)[g])
        L = self.mixture.epoch_length
        return L // G + (1 if g < L % G else 0)

    # -- internals: mixture -----------------------------------------------------------------------

    def _resolve_mixture(self, mixture) -> Mixture:
        if self.manifest is None:
            raise MixtureError(f"expected a published output with {MANIFEST_NAME} for mixture={mixture!r}, got none in {self.root!r}")
        available = {name: counts[self.split]["rows"] for name, counts in self.manifest.datasets.items()
                     if self.split in counts}
        recorded = self.manifest.document.get("mixture")
        if isinstance(mixture, str):
            if mixture != "manifest":
                raise MixtureError(f"expected mixture 'manifest', a {{dataset: weight}} dict or None, got {mixture!r}")
            weights = {name: float(recorded[name]["weight"]) if recorded else 1.0 for name in available}
        elif isinstance(mixture, Mapping):
            weights = {}
            for name, w in mixture.items():
                if name not in available:
                    raise MixtureError(f"expected datasets of {self.root!r} in mixture, got {name!r}; hint: the output has {sorted(available)!r}")
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise MixtureError(f"expected a finite weight >= 0 for dataset {name!r} in mixture, got {w!r}")
                weights[name] = float(w)
        else:
            raise MixtureError(f"expected mixture 'manifest', a {{dataset: weight}} dict or None, got {type(mixture).__name__}")
        names = tuple(sorted(n for n, w in weights.items() if w > 0))
        if not names:
            raise MixtureError(f"expected at least one dataset with weight > 0 in mixture, got {weights!r}")
        for name in names:
            if available[name] < 1:
                raise MixtureError(
                    f"expected rows of dataset {name!r} in split {self.split!r} for the mixture, got 0; hint: give it "
                    "weight 0, or read this split with mixture=None"
                )
        if recorded and all(n in recorded for n in names):
            transitions = {n: int(recorded[n]["num_transitions"]) for n in names}
        else:
            transitions = self._statistics_transitions(names) if self.balance_weights else {n: 0 for n in names}
        w = [weights[n] for n in names]
        if self.balance_weights and any(transitions[n] < 1 for n in names):
            raise MixtureError(f"expected num_transitions >= 1 for every sampled dataset to balance weights, got {transitions!r}")
        p = mixture_probabilities(w, [transitions[n] for n in names], self.balance_weights)
        rows = [available[n] for n in names]
        primary = [i for i, x in enumerate(w) if x == 1.0] or list(range(len(names)))
        length = int(max(rows[i] / p[i] for i in primary))
        return Mixture(names, tuple(w), tuple(transitions[n] for n in names), tuple(float(x) for x in p), tuple(rows), length)

    def _statistics_transitions(self, names: Sequence[str]) -> dict[str, int]:
        """num_transitions per dataset from the statistics copy (its sha256 checked against the manifest)."""
        fs, base = self._fs_base()
        relative = self.manifest.document["inputs"]["statistics"].get("path", layout.STATISTICS_COPY)
        confined(self.root, relative, f"{MANIFEST_NAME} inputs.statistics.path")
        where = self._where(relative)
        try:
            raw = _read_bytes(fs, _join(base, relative))
        except FileNotFoundError as e:
            raise ShardIntegrityError(f"expected the statistics copy {where} (listed in {MANIFEST_NAME}), got no such file") from e
        digest = hashlib.sha256(raw).hexdigest()
        if digest != self.manifest.statistics_sha256:
            raise ShardIntegrityError(f"expected sha256 {self.manifest.statistics_sha256} for {where} (from {MANIFEST_NAME}), got {digest}")
        doc = json.loads(raw)
        out = {}
        for name in names:
            value = doc.get(name, {}).get("num_transitions") if isinstance(doc.get(name), dict) else None
            if not isinstance(value, int):
                raise ShardIntegrityError(f"expected num_transitions for {name!r} in {where}, got {value!r}")
            out[name] = value
        return out


# --------------------------------------------------------------------------------------------------
# One worker's iteration


_READ_AHEAD: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _read_ahead() -> concurrent.futures.ThreadPoolExecutor:
    """This process's read-ahead thread (one: per process, so a forked worker makes its own)."""
    pid = os.getpid()
    if pid not in _READ_AHEAD:
        _READ_AHEAD[pid] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlaprep-read-ahead")
    return _READ_AHEAD[pid]


class _WorkerIterator:
    """Iterates one global worker's epoch from ``start`` (items), unit by unit, and knows its position."""

    def __init__(self, ds: ShardDataset, logical: int, num_workers: int, start: int | None, complete: bool):
        self.ds = ds
        self.owner_pid = os.getpid()
        self.logical, self.num_workers = logical, num_workers
        self.G = ds.world_size * num_workers
        self.g = ds.rank * num_workers + logical
        self.epoch = ds.epoch
        self.total = 0 if complete else ds._stream_length(self.g, self.G)
        self.position = self.total if complete or start is None else min(start, self.total)
        self._gen: Iterator | None = None
        ds._readers = collections.OrderedDict()  # files are checked again (size, digest cache) every pass
        ds._row_groups = _RowGroups()
        # In a DataLoader worker, batches go to the main process through shared memory: build them there.
        ds._share = ds.batch_size is not None and get_worker_info() is not None

    def state(self) -> LoaderState:
        return LoaderState(self.ds.fingerprint(), self.epoch, self.ds.world_size, self.ds.rank, self.num_workers,
                           {self.logical: self.position}, next_worker=0, complete=False)

    def __iter__(self):
        return self

    def __next__(self):
        if self._gen is None:
            self._gen = self._run()
        return next(self._gen)

    # -- the pipeline -----------------------------------------------------------------------------

    def _run(self):
        ds = self.ds
        B = ds.batch_size
        pending: list[_Rows] = []
        pending_n = 0
        for rows in self._chunks(self.position):
            if B is None:
                for item in self._items(rows):
                    self.position += 1
                    yield item
                continue
            pending.append(rows)
            pending_n += rows.n
            while pending_n >= B:
                merged = _Rows.concat(pending)
                batch, rest = _take(merged, B), _drop(merged, B)
                pending, pending_n = ([rest] if rest.n else []), rest.n
                self.position += B
                yield self._batch(batch)
        if B is not None and pending_n and not ds.drop_last:
            self.position += pending_n
            yield self._batch(_Rows.concat(pending))
        self.position = self.total

    def _chunks(self, start: int) -> Iterator[_Rows]:
        """Gathered items from position ``start`` to the end of the epoch, in emission order."""
        if start >= self.total:
            return
        ds = self.ds
        U, W = ds._unit(), ds._window()
        streams = ds._streams(self.g, self.G, self.epoch)
        sampler = (MixtureSampler(ds.mixture.probabilities, ds.seed, self.epoch, self.g) if ds.mixture is not None else None)
        u = start // U
        if sampler is not None:
            consumed = sampler.counts(u * U, len(streams))
        else:
            consumed = np.array([u * U], np.int64)
        carry: dict[tuple, np.ndarray] = {}
        # A batch is gathered as one chunk: its frames are decoded straight into the batch's own buffer.
        chunk = ITEM_CHUNK if ds.batch_size is None else ds.batch_size

        def unit_ids(u: int) -> np.ndarray:
            lo, hi = u * U, min((u + 1) * U, self.total)
            return sampler.ids(lo, hi) if sampler is not None else np.zeros(hi - lo, np.int64)

        # In a DataLoader worker the next unit is read while this one is gathered: reading a unit (Parquet
        # decoding, GIL released) is a ~100 ms stall every few dozen batches, during which the other workers
        # fill their prefetch slots and then idle while the trainer waits on this one, in order.
        reader = _read_ahead() if get_worker_info() is not None else None
        ids, pending = unit_ids(u), None
        try:
            while u * U < self.total:
                lo, hi = u * U, min((u + 1) * U, self.total)
                unit = pending.result() if pending is not None else _Unit(ds, streams, consumed, ids, {})
                unit.carry = carry  # the previous unit's last frames: known only now (history windows)
                after = consumed + np.bincount(ids, minlength=len(streams))
                next_ids, pending = None, None
                if (u + 1) * U < self.total:
                    next_ids = unit_ids(u + 1)
                    if reader is not None:
                        pending = reader.submit(_Unit, ds, streams, after, next_ids, {})
                order = np.concatenate([
                    lo_w + (_rng(ds.seed, self.epoch, _TAG_WINDOW, self.g, (lo + lo_w) // W).permutation(min(W, hi - lo - lo_w))
                            if W > 1 else np.arange(min(W, hi - lo - lo_w)))
                    for lo_w in range(0, hi - lo, W)
                ])
                # Chunks end where batches end (every ``chunk`` items from ``start``): a batch is then one
                # gather -- its frames decoded into its own buffer -- except where it spans two units.
                a = max(start - lo, 0)
                while a < hi - lo:
                    b = min(a + chunk - (lo + a - start) % chunk, hi - lo)
                    # Exactly one batch: a full one, or the last of the pass (kept unless drop_last).
                    whole = (lo + a - start) % chunk == 0 and (b - a == chunk or (lo + b == self.total and not ds.drop_last))
                    yield unit.gather(order[a:b], whole=whole)
                    a = b
                carry = unit.carry_out()
                consumed, ids = after, next_ids
                u += 1
        finally:
            if pending is not None:  # a pass left early: the read in flight must not touch the next pass's state
                concurrent.futures.wait([pending])

    def _items(self, rows: _Rows) -> Iterator[dict]:
        batch = self._finish(rows)
        names = list(batch)
        for j in range(rows.n):
            item = {}
            for name in names:
                v = batch[name]
                if isinstance(v, list):
                    item[name] = v[j]
                elif isinstance(v, tuple):  # ragged ids
                    lengths, flat, offsets = v
                    item[name] = torch.from_numpy(flat[offsets[j]: offsets[j] + lengths[j]].astype(np.int64))
                elif name in _INT_COLUMNS:
                    item[name] = int(v[j])
                else:
                    item[name] = v[j].clone()
            yield {k: item[k] for k in _ITEM_ORDER if k in item}

    def _batch(self, rows: _Rows) -> dict:
        batch = _collate_columns(self._finish(rows), rows.n, self.ds.pad_token_id)
        return share_batch(batch) if self.ds._share else batch

    def _finish(self, rows: _Rows) -> dict:
        """Column dict with model-facing names and dtypes (ragged ids as (lengths, flat, offsets))."""
        ds = self.ds
        cols = rows.cols
        out: dict[str, Any] = {}
        for name in _STRING_COLUMNS:
            if name in cols:
                out[name] = cols[name]
        for name in _INT_COLUMNS:
            out[name] = cols[name]
        for name in _LIST_COLUMNS:
            if name in cols:
                lengths, flat = cols[name]
                offsets = np.zeros(len(lengths) + 1, np.int64)
                np.cumsum(lengths, out=offsets[1:])
                out[name] = (lengths, flat, offsets)
        n, d = ds.layout.chunk, ds.layout.action_dim
        if Column.ACTION_TOKEN_IDS in cols:
            out[Column.ACTION_TOKEN_IDS] = torch.from_numpy(cols[Column.ACTION_TOKEN_IDS].astype(np.int64))
        for name in (Column.ACTION, Column.NORMALIZED_ACTION):
            if name in cols:
                out[name] = torch.from_numpy(cols[name].astype(np.float32))
        for name in (Column.ACTION_CHUNK, Column.NORMALIZED_ACTION_CHUNK):
            if name in cols:
                out[name] = torch.from_numpy(cols[name].astype(np.float32).reshape(-1, n, d))  # [n, N, D]
        if Column.ACTION_CHUNK_MASK in cols:
            out[Column.ACTION_CHUNK_MASK] = torch.from_numpy(cols[Column.ACTION_CHUNK_MASK].astype(np.bool_))
        for src, dst in ((Column.IMAGE_PRIMARY, PIXEL_VALUES), (Column.IMAGE_WRIST, WRIST_PIXEL_VALUES)):
            if src not in cols:
                continue
            value = cols[src]
            if isinstance(value, list):  # decode_images=False: PNG bytes
                out[src] = value
                continue
            # [n, (H,) 3, S, S] uint8; channels-last memory where decoded batch-wide (``decode_frames``)
            frames = as_shared_tensor(value) if ds._share else torch.from_numpy(value)
            if src == Column.IMAGE_PRIMARY and ds.augment == "openvla":
                frames = openvla_augment(frames, openvla_augment_params(rows.keys, ds.seed, self.epoch))
            if ds.pixel_dtype == "float32":  # in a worker straight into shared memory (not copied there after)
                pixels = _worker_pixels(frames) if ds._share else torch.empty_like(frames, dtype=torch.float32)
                frames = pixels.copy_(frames).div_(255.0)
            out[dst] = frames
        if HISTORY_MASK in cols:
            out[HISTORY_MASK] = torch.from_numpy(cols[HISTORY_MASK])
        if Column.PROPRIO in cols:
            out[Column.PROPRIO] = torch.from_numpy(cols[Column.PROPRIO].astype(np.float32))
        return out


# --------------------------------------------------------------------------------------------------
# Hand-off from DataLoader workers

_SHARED_ALIGN = 64
_SHARED_DIRECT_BYTES = 1 << 16  # tensors this large get a shared block of their own rather than a copy into the pack


def _new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    """A shared-memory storage of ``nbytes``, created in shared memory (as torch's ``default_collate`` does
    in workers), not allocated privately and copied there."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is not None:
        return new_shared(max(nbytes, 1))
    return torch.empty(max(nbytes, 1), dtype=torch.uint8).share_memory_().untyped_storage()


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in a shared-memory block of its own."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(_new_shared_storage(nbytes), 0, tuple(shape))


_BLOCK_HEADER = 4096  # a pool block's first page; byte 0: 1 while the main process may hold the block
_POOL_BLOCKS = 8  # per worker: batches in DataLoader's queue (prefetch_factor) plus those the trainer holds


class _FrameBlock:
    """A shared-memory block (memfd) of a worker's ``_FramePool``: a header page, then ``nbytes`` of frames."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.fd = os.memfd_create("vlaprep-frames", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _BLOCK_HEADER + nbytes)
        self.mm = mmap.mmap(self.fd, _BLOCK_HEADER + nbytes)
        self.payload = np.frombuffer(self.mm, np.uint8, nbytes, _BLOCK_HEADER)
        self.address = self.payload.ctypes.data

    @property
    def in_use(self) -> bool:
        return self.mm[0] != 0


class _FramePool:
    """The shared-memory blocks one DataLoader worker decodes its batches' frames into, reused once the
    main process has let go of them.

    A fresh shared-memory segment per batch costs more than decoding it (every page allocated, zeroed and
    charged on first touch, then torn down: ~3.5 ms per 32 frames of 224 px here). A block crosses to the
    main process as its descriptor (``_PooledFrames``) and becomes a tensor over its mapping there; when
    every reference to that tensor, its views and their NumPy arrays is gone, the mapping's finalizer clears
    the block's in-use byte and the worker may decode into it again. A block still in use is never
    written: when all are, the frames go to a fresh segment as before."""

    def __init__(self):
        self.blocks: list[_FrameBlock] = []

    def array(self, shape: Sequence[int], dtype) -> np.ndarray | None:
        """A free block's payload as an array of ``shape`` (marked in use), or None when none can be had."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        block = next((b for b in self.blocks if b.nbytes == nbytes and not b.in_use), None)
        if block is None:
            if len(self.blocks) >= _POOL_BLOCKS:
                spare = next((b for b in self.blocks if not b.in_use), None)  # free, of another size
                if spare is None:
                    return None
                self.blocks.remove(spare)  # its mapping goes with the last view of it
                os.close(spare.fd)
            block = _FrameBlock(nbytes)
            self.blocks.append(block)
        block.mm[0] = 1
        return block.payload.view(dtype).reshape(tuple(shape))

    def handle(self, value: torch.Tensor) -> _PooledFrames | None:
        """``value`` as the block it fills exactly (dense, in any memory order), ready to cross; None when it
        is not one."""
        nbytes = value.numel() * value.element_size()
        for block in self.blocks:
            if block.address == value.data_ptr() and block.nbytes == nbytes and _is_dense(value) and block.in_use:
                return _PooledFrames(block, tuple(value.shape), tuple(value.stride()), value.dtype)
        return None


_POOL: dict[int, _FramePool] = {}


def _frame_pool() -> _FramePool | None:
    """This process's pool (None where there is no memfd: frames then go to fresh segments)."""
    if not hasattr(os, "memfd_create"):
        return None
    return _POOL.setdefault(os.getpid(), _FramePool())


class _PooledFrames:
    """A batch's frames in a pool block on their way to the main process: pickled as the block's file
    descriptor (as torch sends a shared tensor), rebuilt there by ``_rebuild_pooled_frames``."""

    def __init__(self, block: _FrameBlock, shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype):
        self.block, self.shape, self.strides, self.dtype = block, shape, strides, dtype

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _rebuild_pooled_frames, (DupFd(self.block.fd), self.block.nbytes, self.shape, self.strides,
                                        str(self.dtype).split(".")[-1])


def _rebuild_pooled_frames(fd, nbytes: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: str) -> torch.Tensor:
    """In the receiving process: the block mapped, as a tensor (its shape and memory order); its release
    marks the block free."""
    fd = fd.detach()
    mm = mmap.mmap(fd, _BLOCK_HEADER + nbytes)
    weakref.finalize(mm, _release_block, fd)
    kind = getattr(torch, dtype)
    return torch.frombuffer(mm, dtype=kind, count=nbytes // torch.empty(0, dtype=kind).element_size(),
                            offset=_BLOCK_HEADER).as_strided(shape, strides)


def _release_block(fd: int) -> None:
    try:
        os.pwrite(fd, b"\0", 0)
    finally:
        os.close(fd)


def _memory_order(t: torch.Tensor) -> list[int]:
    """``t``'s dimensions from the outermost in memory to the innermost (by stride; ties in dimension order)."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its ``numel()`` elements of memory exactly once (contiguous in some dimension order)."""
    expected = 1
    for d in reversed(_memory_order(t)):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def _worker_pixels(frames: torch.Tensor) -> torch.Tensor:
    """float32 pixels shaped and ordered in memory like ``frames`` in a DataLoader worker: a free pool block,
    else a fresh segment."""
    order = _memory_order(frames)
    physical = tuple(frames.shape[d] for d in order)
    pool = _frame_pool()
    out = pool.array(physical, np.float32) if pool is not None else None
    pixels = torch.from_numpy(out) if out is not None else shared_empty(physical, torch.float32)
    return pixels.permute(*np.argsort(order).tolist())


def worker_frames(shape: tuple[int, ...]) -> np.ndarray:
    """``decode_frames``' ``allocate`` in a DataLoader worker: a free pool block, else a fresh segment."""
    pool = _frame_pool()
    out = pool.array(shape, np.uint8) if pool is not None else None
    return out if out is not None else shared_frames(shape)


def shared_frames(shape: tuple[int, ...]) -> np.ndarray:
    """uint8 array of ``shape`` in shared memory: ``decode_frames``' ``allocate`` in a DataLoader worker."""
    return shared_empty(shape, torch.uint8).numpy()  # its .base: a tensor on the shared storage (``as_shared_tensor``)


def as_shared_tensor(value: np.ndarray) -> torch.Tensor:
    """``value`` as a tensor; when it views memory from ``shared_frames`` (after slicing and reshaping too),
    a tensor on that same shared storage, so that handing it over copies nothing."""
    root = value
    while isinstance(root, np.ndarray):
        root = root.base
    if isinstance(root, torch.Tensor) and root.is_shared() and torch.from_numpy(value[:0]).dtype == root.dtype:
        offset, misaligned = divmod(value.ctypes.data - root.data_ptr(), value.itemsize)
        if not misaligned and all(st % value.itemsize == 0 for st in value.strides):
            return root.as_strided(value.shape, [st // value.itemsize for st in value.strides],
                                   root.storage_offset() + offset)
    return torch.from_numpy(value)


def share_batch(batch: dict) -> dict:
    """The batch with every tensor not yet in shared memory packed into one shared-memory block.

    A DataLoader worker pickles a batch tensor by tensor: each one not already shared is copied into a new
    shared-memory segment whose file descriptor the main process then fetches over a socket -- ~13 round
    trips and copies per batch here, more time than reading the batch's rows. Packed, a batch crosses as
    two descriptors (this block and the frames decoded into shared memory) and its frames are not copied;
    frames in a ``_FramePool`` block cross as that block (``_PooledFrames``), which the worker reuses once
    the main process has let go of it.
    ``collate_vla`` does the same for batches a DataLoader collates from items in its workers."""
    pool = _frame_pool()
    batch = dict(batch)
    for k, v in batch.items():
        handle = pool.handle(v) if pool is not None and isinstance(v, torch.Tensor) else None
        if handle is not None:
            batch[k] = handle
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and not v.is_shared()}
    if not tensors:
        return batch
    offsets, total = {}, 0
    for k, v in tensors.items():
        offsets[k] = total
        total += -(-v.numel() * v.element_size() // _SHARED_ALIGN) * _SHARED_ALIGN
    storage = _new_shared_storage(total)
    out = dict(batch)
    for k, v in tensors.items():
        packed = torch.empty(0, dtype=v.dtype).set_(storage, offsets[k] // v.element_size(), v.shape)
        packed.copy_(v)
        out[k] = packed
    return out


def _take(rows: _Rows, k: int) -> _Rows:
    return _slice_rows(rows, 0, k)


def _drop(rows: _Rows, k: int) -> _Rows:
    return _slice_rows(rows, k, rows.n)


def _slice_rows(rows: _Rows, a: int, b: int) -> _Rows:
    cols = {}
    for name, v in rows.cols.items():
        if isinstance(v, tuple):
            lengths, flat = v
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            cols[name] = (lengths[a:b], flat[offsets[a]: offsets[b]])
        else:
            cols[name] = v[a:b]
    return _Rows(cols, rows.keys[a:b], b - a)


class _Unit:
    """The rows of one read unit: each stream's range in this unit (plus up to H-1 lead-in rows before it,
    for history windows) read into one Arrow table; frames decoded per gather, batch-wide, channels-last memory
    ([3, S, S]); with history, kept until no later item of the unit needs them, and the last H-1 of each
    read carried to the next unit (its lead-in)."""

    def __init__(self, ds: ShardDataset, streams: list[_Stream], consumed: np.ndarray, ids: np.ndarray,
                 carry: dict[tuple, np.ndarray]):
        self.ds = ds
        H = ds.history
        tables, self.reads = [], []  # reads: (path, first file row, stop) per contiguous read, in table order
        self.item_rows = np.zeros(len(ids), np.int64)  # table row of each item of the unit (draw order)
        self.passes = np.zeros(len(ids), np.int64)  # pass over the stream (repeats in a mixture)
        base = 0
        for i, stream in enumerate(streams):
            mine = np.flatnonzero(ids == i)
            m = len(mine)
            if m == 0:
                continue
            c0 = int(consumed[i])
            lead = 0
            for j, (piece, a, b) in enumerate(stream.segments(c0, c0 + m)):
                read_a = max(piece.start, a - (H - 1)) if j == 0 else a  # later segments start episodes
                if j == 0:
                    lead = a - read_a
                tables.append(ds_read(ds, piece, read_a, b, stream=i))
                self.reads.append((piece.path, read_a, b))
            self.item_rows[mine] = base + lead + np.arange(m)
            self.passes[mine] = (c0 + np.arange(m)) // max(1, stream.length)
            base += lead + m
        self.table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self.read_starts = np.cumsum([0] + [b - a for _, a, b in self.reads])  # first table row of each read
        self.carry = carry
        # Frames go into shared memory only where the batch takes them as they are (uint8, no augmentation).
        self.handed_over = ds._share and ds.pixel_dtype == "uint8" and not ds.augment
        self.cols: dict[str, Any] = {}
        self.steps = self.col(Column.STEP_INDEX).astype(np.int64)
        # History: frame j (0..H-1) of the item at table row r is row r - min(H-1-j, step[r]).
        back = (H - 1 - np.arange(H))[None, :]
        item_steps = self.steps[self.item_rows][:, None]
        self.hist = self.item_rows[:, None] - np.minimum(back, item_steps)  # [items, H]
        self.mask = back <= item_steps  # [items, H]
        self.frames: dict[int, np.ndarray] = {}
        self.need = np.bincount(self.hist.ravel(), minlength=self.table.num_rows) if H > 1 else None
        self.keep: set[int] = set()
        if H > 1:
            for start, stop in zip(self.read_starts[:-1], self.read_starts[1:]):
                self.keep.update(range(max(start, stop - (H - 1)), stop))

    def col(self, name: str):
        if name not in self.cols:
            self.cols[name] = _column(self.table, name)
        return self.cols[name]

    def ident(self, row: int) -> tuple[str, int]:
        """(path, file row) of a table row."""
        k = int(np.searchsorted(self.read_starts, row, side="right")) - 1
        path, a, _ = self.reads[k]
        return path, a + row - int(self.read_starts[k])

    def decode(self, rows: np.ndarray, name: str, shared: bool = False) -> np.ndarray:
        """Frames of table ``rows`` in image column ``name``: uint8 [n, 3, S, S], decoded in one batch
        (into shared memory when ``shared``: frames a worker hands over as they are)."""
        size = self.ds.layout.image_size
        try:
            # Module-level lookup: tests count calls.
            return decode_frames(self.col(name).views(rows), size, digest_checked=self.ds.digests_checked,
                                 allocate=worker_frames if shared else None)
        except FrameShapeError as e:
            row = int(rows[e.index])
            expected = "options.image_size" if size is not None else "the size of the batch's first frame"
            raise ValueError(
                f"expected a {e.expected[0]}x{e.expected[1]} RGB image ({expected}) at step {int(self.steps[row])} of "
                f"episode {self.col(Column.EPISODE_ID)[row]!r} in {self.ds._where(self.ident(row)[0])}, got shape "
                f"{e.shape} (H, W, C)"
            ) from None

    def gather(self, idx: np.ndarray, whole: bool = False) -> _Rows:
        """Items ``idx`` (positions in this unit) as columns; ``whole``: they are exactly one batch, so their
        frames may be decoded into the memory the batch is handed over in."""
        ds = self.ds
        shared = self.handed_over and whole
        H = ds.history
        rows = self.item_rows[idx]
        hist = self.hist[idx]  # [n, H]
        cols: dict[str, Any] = {}
        for name in ds.columns:
            if name in _IMAGE_COLUMNS or name == Column.PROPRIO:
                continue
            value = self.col(name)
            if isinstance(value, list):
                cols[name] = [value[r] for r in rows]
            elif isinstance(value, tuple):  # ragged: -> (lengths, flat)
                flat, offsets = value
                lengths = offsets[rows + 1] - offsets[rows]
                take = np.repeat(offsets[rows] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
                cols[name] = (lengths, flat[take])
            else:
                cols[name] = value[rows]
        if Column.PROPRIO in ds.columns:
            p = self.col(Column.PROPRIO)
            cols[Column.PROPRIO] = p[hist] if H > 1 else p[rows]
        if Column.IMAGE_PRIMARY in ds.columns:
            if not ds.decode_images:
                data = self.col(Column.IMAGE_PRIMARY)
                cols[Column.IMAGE_PRIMARY] = ([[data.value(r) for r in h] for h in hist] if H > 1
                                              else [data.value(r) for r in rows])
            else:
                cols[Column.IMAGE_PRIMARY] = (self.decode(rows, Column.IMAGE_PRIMARY, shared=shared) if H == 1
                                              else self._history(hist))
        if Column.IMAGE_WRIST in ds.columns:
            if not ds.decode_images:
                data = self.col(Column.IMAGE_WRIST)
                cols[Column.IMAGE_WRIST] = [data.value(r) for r in rows]
            else:
                cols[Column.IMAGE_WRIST] = self.decode(rows, Column.IMAGE_WRIST, shared=shared)
        if H > 1 and (Column.IMAGE_PRIMARY in ds.columns or Column.PROPRIO in ds.columns):
            cols[HISTORY_MASK] = self.mask[idx]
        keys = []
        if ds.augment:
            names, episodes = self.col(Column.DATASET_NAME), self.col(Column.EPISODE_ID)
            keys = [(names[r], episodes[r], int(self.steps[r]), int(p)) for r, p in zip(rows, self.passes[idx])]
        return _Rows(cols, keys, len(idx))

    def _history(self, hist: np.ndarray) -> np.ndarray:
        """Primary frames of the history windows ``hist`` [n, H] (table rows): [n, H, 3, S, S]. Each frame
        is decoded once per pass: kept while later items of the unit need it, carried into the next unit."""
        missing = []
        for r in np.unique(hist):
            r = int(r)
            if r in self.frames:
                continue
            carried = self.carry.get(self.ident(r)) if self.carry else None
            if carried is not None:
                self.frames[r] = carried
            else:
                missing.append(r)
        if missing:
            for r, frame in zip(missing, self.decode(np.array(missing, np.int64), Column.IMAGE_PRIMARY)):
                self.frames[r] = frame
        out = np.stack([self.frames[int(r)] for r in hist.ravel()])
        used = np.bincount(hist.ravel(), minlength=len(self.need))
        self.need -= used
        for r in np.flatnonzero((used > 0) & (self.need <= 0)):
            if int(r) not in self.keep:
                self.frames.pop(int(r), None)
        return out.reshape(hist.shape + out.shape[1:])

    def carry_out(self) -> dict[tuple, np.ndarray]:
        """Decoded frames of each read's last H-1 rows, by (path, file row): the next unit's lead-in."""
        return {self.ident(r): self.frames[r] for r in self.keep if r in self.frames}


def ds_read(ds: ShardDataset, piece: ShardSlice, a: int, b: int, stream: int) -> pa.Table:
    """Rows [a, b) of the piece's file (the dataset's columns) for the worker's ``stream``, through the
    per-process open files and row groups."""
    readers = ds._readers
    reader = readers.get(piece.path)
    if reader is None:
        f = ShardFile(piece.path, rows=piece.rows, bytes=piece.bytes, sha256=piece.sha256,
                      datasets=next((x.datasets for x in ds.files if x.path == piece.path), None))
        shard = ds._open(f)
        validate_table_schema(shard.parquet.schema_arrow, ds.schema, ds._where(piece.path))
        reader = readers[piece.path] = (shard, ds._file_index(f, shard.parquet))
        while len(readers) > 8 + (len(ds.mixture.names) if ds.mixture else 0):
            readers.popitem(last=False)
    else:
        readers.move_to_end(piece.path)
    shard, index = reader
    if b > index.num_rows:
        raise ValueError(f"expected a slice within the {index.num_rows} rows of {ds._where(piece.path)}, got [{a}, {b})")
    return ds._row_groups.read(shard, piece.path, ds.columns, index, a, b, stream, piece.stop)


# --------------------------------------------------------------------------------------------------
# Collation


def _collate_columns(batch: Mapping[str, Any], n: int, pad_token_id: int) -> dict:
    """Column dict (from ``_WorkerIterator._finish``) -> exactly what ``collate_vla`` returns for its items."""
    out: dict[str, Any] = {}
    if Column.INPUT_IDS in batch:
        lengths, flat, offsets = batch[Column.INPUT_IDS]
        width = int(lengths.max()) if n else 0
        ids = np.full((n, width), pad_token_id, np.int64)
        positions = np.arange(width)[None, :] < lengths[:, None]
        ids[positions] = flat
        out[Column.INPUT_IDS] = torch.from_numpy(ids)
        out["attention_mask"] = torch.from_numpy(positions.astype(np.int64))
        if Column.LABELS in batch:
            l_lengths, l_flat, _ = batch[Column.LABELS]
            if not np.array_equal(l_lengths, lengths):
                j = int(np.flatnonzero(l_lengths != lengths)[0])
                raise ValueError(f"expected labels as long as input_ids ({lengths[j]}) at index {j}, got {l_lengths[j]}")
            labels = np.full((n, width), LABEL_IGNORE, np.int64)
            labels[positions] = l_flat
            out[Column.LABELS] = torch.from_numpy(labels)
    for key in _ITEM_ORDER:
        if key not in batch or key in out or key == Column.LABELS:
            continue
        v = batch[key]
        if isinstance(v, list):
            out[key] = list(v)
        elif key in _INT_COLUMNS:
            out[key] = torch.from_numpy(np.asarray(v, np.int64))
        else:
            out[key] = v
    if Column.DATASET_NAME in out:
        out["dataset_names"] = list(out[Column.DATASET_NAME])
    return out


def collate_vla(batch: Sequence[dict], pad_token_id: int = 0) -> dict:
    """Batch ShardDataset items: right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with -100.

    A drop-in for OpenVLA's ``PaddedCollatorForActionPrediction`` (padding side "right"): the same keys
    ``pixel_values``, ``input_ids``, ``attention_mask``, ``labels`` and ``dataset_names`` (plus every other
    item field). ``attention_mask`` is int64 [B, L_max], 1 on real tokens from the lengths (OpenVLA derives
    it from ``input_ids != pad_token_id``: the same unless the pad id is also a real token). Every other
    tensor stacked [B, ...], ints and bools as tensors [B], strings and bytes as lists. Use
    ``functools.partial(collate_vla, pad_token_id=...)`` as a DataLoader ``collate_fn``.
    """
    if len(batch) == 0:
        raise ValueError("expected a non-empty batch, got 0 items")
    keys = list(batch[0].keys())
    for j, item in enumerate(batch):
        if set(item.keys()) != set(keys):
            raise ValueError(f"expected every item to have keys {sorted(keys)!r}, got {sorted(item.keys())!r} at index {j}")
    out: dict[str, Any] = {}
    worker = get_worker_info() is not None  # the batch goes to the main process: see ``share_batch``
    if Column.INPUT_IDS in batch[0]:
        lengths = [int(item[Column.INPUT_IDS].shape[0]) for item in batch]
        size = (len(batch), max(lengths))
        input_ids = torch.full(size, pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(size, dtype=torch.long)
        labels = torch.full(size, LABEL_IGNORE, dtype=torch.long) if Column.LABELS in batch[0] else None
        for j, (item, n) in enumerate(zip(batch, lengths)):
            input_ids[j, :n] = item[Column.INPUT_IDS]
            attention_mask[j, :n] = 1
            if labels is not None:
                if item[Column.LABELS].shape[0] != n:
                    raise ValueError(
                        f"expected labels as long as input_ids ({n}) at index {j}, got {item[Column.LABELS].shape[0]}"
                    )
                labels[j, :n] = item[Column.LABELS]
        out[Column.INPUT_IDS], out["attention_mask"] = input_ids, attention_mask
        if labels is not None:
            out[Column.LABELS] = labels
    for key in keys:
        if key in out or key == Column.LABELS:
            continue
        values = [item[key] for item in batch]
        first = values[0]
        if isinstance(first, torch.Tensor):
            for j, v in enumerate(values):
                if v.shape != first.shape:
                    raise ValueError(
                        f"expected {key!r} of shape {tuple(first.shape)} in every item, got {tuple(v.shape)} at index {j}"
                    )
            # In a DataLoader worker, large tensors (frames) are stacked straight into shared memory.
            big = worker and first.numel() * first.element_size() * len(values) >= _SHARED_DIRECT_BYTES
            out[key] = torch.stack(values, out=shared_empty((len(values), *first.shape), first.dtype)) if big else torch.stack(values)
        elif isinstance(first, (bool, np.bool_)):
            out[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, (int, np.integer)):
            out[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, (float, np.floating)):
            out[key] = torch.tensor(values, dtype=torch.float32)
        else:  # str, bytes, lists of PNG bytes
            out[key] = list(values)
    if Column.DATASET_NAME in out:
        out["dataset_names"] = list(out[Column.DATASET_NAME])
    return share_batch(out) if worker else out


# --------------------------------------------------------------------------------------------------
# Resumable loading with a plain DataLoader


class ShardLoader:
    """A ``torch.utils.data.DataLoader`` over a ``ShardDataset`` whose position can be saved and restored
    exactly, with any ``num_workers``, without torchdata.

    It counts the batches the trainer took from the current iteration; ``state_dict()`` turns that count
    into each worker's position with DataLoader's round-robin order (``in_order=True``: batch j comes
    from the j-th worker in turn that still has batches), and ``load_state_dict`` restores them, rotating
    worker ids so the round-robin continues where it stopped. A fresh DataLoader (fresh workers) is made
    per iteration, so ``set_epoch`` always reaches the workers.

        loader = ShardLoader(ds, batch_size=32, num_workers=4, collate_fn=partial(collate_vla, pad_token_id=...))
        loader.load_state_dict(checkpoint["loader"])      # optional
        for batch in loader: ...; checkpoint["loader"] = loader.state_dict()

    ``batch_size=None`` when the dataset batches itself (``ShardDataset(batch_size=B)``)."""

    def __init__(self, dataset: ShardDataset, batch_size: int | None = 1, num_workers: int = 0, *,
                 collate_fn=None, drop_last: bool = False, **dataloader_kwargs):
        if not isinstance(dataset, ShardDataset):
            raise TypeError(f"expected a ShardDataset, got {type(dataset).__name__}")
        if dataloader_kwargs.get("persistent_workers"):
            raise ValueError("expected persistent_workers=False: ShardLoader starts fresh workers per epoch so they see its position")
        if dataloader_kwargs.get("in_order") is False:
            raise ValueError("expected in_order=True: positions are derived from DataLoader's round-robin order")
        if (batch_size is None) != (dataset.batch_size is not None):
            raise ValueError(
                f"expected batch_size=None when the dataset batches itself (its batch_size is {dataset.batch_size}), "
                f"and a batch_size otherwise, got {batch_size!r}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = int(num_workers)
        self.collate_fn = collate_fn if collate_fn is not None or batch_size is None else collate_vla
        self.drop_last = bool(drop_last)
        self.kwargs = dataloader_kwargs
        self._run: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._run = None

    def _items_per_batch(self) -> tuple[int, bool]:
        if self.batch_size is None:
            return self.dataset.batch_size, self.dataset.drop_last
        return self.batch_size, self.drop_last

    def __iter__(self):
        ds = self.dataset
        workers = max(1, self.num_workers)
        starts, complete = ds._start_positions(self.num_workers)
        lengths = ds.worker_lengths(self.num_workers)
        self._run = {"epoch": ds.epoch, "starts": starts, "complete": complete, "lengths": lengths,
                     "offset": ds._worker_offset if workers > 1 else 0, "consumed": 0, "done": False}
        if complete:
            self._run["done"] = True
            return
        dl = DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate_fn,
                        drop_last=self.drop_last, **self.kwargs)
        for batch in dl:
            self._run["consumed"] += 1
            yield batch
        self._run["done"] = True
        ds._resume = None
        ds._worker_offset = 0

    def state_dict(self) -> dict:
        """This rank's position after the batches taken so far (``LoaderState.to_dict()``)."""
        ds = self.dataset
        workers = max(1, self.num_workers)
        run = self._run
        if run is None:  # not started: the dataset's restored (or epoch-start) position
            st = ds._resume if ds._resume is not None and ds._resume.epoch == ds.epoch else None
            if st is not None:
                return st.to_dict()
            return LoaderState(ds.fingerprint(), ds.epoch, ds.world_size, ds.rank, workers,
                               {w: 0 for w in range(workers)}).to_dict()
        if run["complete"] or run["done"]:
            return LoaderState(ds.fingerprint(), run["epoch"], ds.world_size, ds.rank, workers,
                               {w: run["lengths"][w] for w in range(workers)}, complete=True).to_dict()
        B, drop_last = self._items_per_batch()
        offset = run["offset"]
        logical = [(i + offset) % workers for i in range(workers)]  # DataLoader worker id -> logical worker
        remaining = [run["lengths"][w] - run["starts"][w] for w in logical]
        batches = [r // B if drop_last else -(-r // B) for r in remaining]
        taken, next_id = _round_robin(batches, run["consumed"])
        positions = {w: run["starts"][w] for w in range(workers)}
        for i, w in enumerate(logical):
            positions[w] = min(run["starts"][w] + taken[i] * B, run["lengths"][w])
            if taken[i] == batches[i]:
                positions[w] = run["lengths"][w]  # its last (partial or dropped) batch is behind it
        return LoaderState(ds.fingerprint(), run["epoch"], ds.world_size, ds.rank, workers, positions,
                           next_worker=logical[next_id]).to_dict()
