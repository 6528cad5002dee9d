"""Streaming PyTorch reader of vlaprep's pre-tokenized Parquet shards (schema: schemas/shards.py).

On-disk layout read (written by the shard job):
  ROOT/manifest.json                              optional; "files" (paths relative to ROOT) and "options"
  ROOT/<split>/shard-00000-of-0000K.parquet       one row = one step; all rows of an episode are
                                                  contiguous and in step order inside ONE file

One item of ``ShardDataset`` (S = image size, H = history, N = action chunk, D = action width,
P = proprio width, L = tokens of this sample):
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

With ``decode_images=False`` the images stay PNG bytes under ``image_primary`` (a list of H bytes when
H > 1) and ``image_wrist``. History windows follow Octo's ``chunk_act_obs`` observation side: the H most
recent frames ending at step t, the first frame repeated (mask False) before the episode start.

Only torch, numpy, pyarrow and pillow are imported here: no Beam, no TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vlaprep.paths import confined

from vlaprep.schemas.shards import LABEL_IGNORE, validate_table_schema

MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".parquet"
# Read for the episode-contiguity check and the history ring buffer whatever `columns` says.
BOOKKEEPING_COLUMNS = ("dataset_name", "episode_id", "step_index", "num_steps")
# Rows per Arrow batch while streaming a row group (bounds memory independently of the writer's row groups).
READ_BATCH_ROWS = 256

_TENSOR_COLUMNS_INT = ("input_ids", "labels", "action_token_ids")
_STRING_COLUMNS = ("dataset_name", "episode_id", "instruction")


# --------------------------------------------------------------------------------------------------
# Files and manifest


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local directory or a URI pyarrow understands (gs://, s3://, ...)."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(root)


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel.lstrip("/")


def resolve_shards_root(root: str | os.PathLike) -> str:
    """A shard directory, or a ``vlaprep run`` output: there ``LATEST`` names the published version,
    whose ``shards/`` is read (so a training job never sees a half-written regeneration)."""
    root = os.fspath(root)
    fs, base = _filesystem(root)
    pointer = _join(base, "LATEST")
    if fs.get_file_info(pointer).type == pafs.FileType.NotFound:
        return root
    with fs.open_input_stream(pointer) as f:
        version = json.loads(f.read())["version"]
    confined("<run>", str(version), "LATEST")
    return _join(root, f"versions/{version}/shards")


def load_manifest(root: str | os.PathLike) -> dict | None:
    """The parsed ``ROOT/manifest.json``, or None if there is none."""
    fs, base = _filesystem(os.fspath(root))
    path = _join(base, MANIFEST_NAME)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"expected JSON in {path!r}, got a parse error: {e}") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"expected a JSON object in {path!r}, got {type(manifest).__name__}")
    return manifest


@dataclasses.dataclass(frozen=True)
class ShardFile:
    path: str  # relative to the dataset root, e.g. "train/shard-00000-of-00004.parquet"
    rows: int | None = None  # from the manifest, checked against the Parquet footer when present
    bytes: int | None = None  # from the manifest, checked against the file size when present


def _manifest_files(manifest: dict, split: str) -> list[ShardFile] | None:
    """The split's files listed by the manifest, or None if the manifest lists no files at all.

    Accepted: ``"files": [{"path": "train/x.parquet", "rows": ...} | "train/x.parquet", ...]`` (the split is
    the entry's ``"split"`` or the first path component) or ``"files": {"train": [...], ...}``.
    """
    files = manifest.get("files")
    if files is None:
        return None
    if isinstance(files, dict):
        entries = [(split, e) for e in files.get(split, [])]
    elif isinstance(files, list):
        entries = [(None, e) for e in files]
    else:
        raise ValueError(f"expected manifest 'files' to be a list or a dict by split, got {type(files).__name__}")
    out = []
    for known_split, entry in entries:
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"expected manifest file entries with a 'path' string, got {entry!r}")
        path = entry["path"]
        confined("<shards>", path, "manifest.json 'files'")  # no absolute paths or '..' from a manifest
        entry_split = known_split or entry.get("split") or path.split("/", 1)[0]
        if entry_split != split:
            continue
        if known_split is not None and "/" not in path:
            path = f"{split}/{path}"
        rows, size = entry.get("rows", entry.get("num_rows")), entry.get("bytes")
        out.append(ShardFile(path, rows=int(rows) if rows is not None else None, bytes=int(size) if size is not None else None))
    return out


def list_shard_files(root: str | os.PathLike, split: str, manifest: dict | None = None) -> list[ShardFile]:
    """The split's shard files in a stable order: as listed by the manifest, else ``split/*.parquet`` sorted."""
    root = os.fspath(root)
    if manifest is not None:
        listed = _manifest_files(manifest, split)
        if listed is not None:
            return listed
    fs, base = _filesystem(root)
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


def _option(manifest: dict | None, key: str) -> Any:
    if not manifest:
        return None
    options = manifest.get("options")
    if isinstance(options, dict) and key in options:
        return options[key]
    return manifest.get(key)


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
    def from_schema(cls, schema: pa.Schema, manifest: dict | None, where: str) -> ShardLayout:
        def width(name: str) -> int:
            if name not in schema.names:
                raise ValueError(f"expected column {name!r} in {where}, got columns {schema.names!r}")
            t = schema.field(name).type
            if not pa.types.is_fixed_size_list(t):
                raise ValueError(f"expected column {name!r} to be a fixed_size_list in {where}, got {t}")
            return t.list_size

        d = width("action")
        chunk_width = width("action_chunk")
        n = _option(manifest, "action_chunk")
        if n is None:
            if chunk_width % d:
                raise ValueError(
                    f"expected action_chunk width to be a multiple of the action width {d} in {where}, got {chunk_width}"
                )
            n = chunk_width // d
        n = int(n)
        for name, expected in (
            ("action_chunk", n * d),
            ("normalized_action_chunk", n * d),
            ("action_token_ids", n * d),
            ("action_chunk_mask", n),
            ("normalized_action", d),
        ):
            if width(name) != expected:
                raise ValueError(
                    f"expected column {name!r} of width {expected} (action_chunk N={n}, action width D={d}) "
                    f"in {where}, got {width(name)}; does the manifest's options.action_chunk match the shards?"
                )
        proprio = width("proprio") if "proprio" in schema.names else 0
        size = _option(manifest, "image_size")
        return cls(
            action_dim=d,
            chunk=n,
            proprio_dim=proprio,
            wrist="image_wrist" in schema.names,
            image_size=int(size) if size is not None else None,
        )


# --------------------------------------------------------------------------------------------------
# Images


def decode_image(data: bytes) -> torch.Tensor:
    """PNG (or any PIL format) bytes -> uint8 tensor [3, H, W]. Called once per stored frame per pass."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3], a fresh array
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # [3, H, W]: one copy


def _to_unit_float(frames: torch.Tensor) -> torch.Tensor:
    return frames.to(torch.float32).div_(255.0)


# --------------------------------------------------------------------------------------------------
# Work assignment


@dataclasses.dataclass(frozen=True)
class ShardSlice:
    """Rows [start, stop) of one shard file, starting at an episode start (unit of work of one worker)."""

    path: str
    start: int = 0
    stop: int | None = None  # None: to the end of the file
    rows: int | None = None  # expected rows of the whole file (manifest), checked when present
    bytes: int | None = None  # expected size of the whole file (manifest), checked when present

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


# --------------------------------------------------------------------------------------------------
# Arrow batch -> per-row values


def _batch_columns(batch: pa.RecordBatch) -> dict[str, Any]:
    """Columnar NumPy views of a batch: fixed lists [rows, width], lists (flat, offsets), strings as lists."""
    out: dict[str, Any] = {}
    for name, arr in zip(batch.schema.names, batch.columns):
        t = arr.type
        if pa.types.is_fixed_size_list(t):
            out[name] = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), t.list_size)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            offsets = arr.offsets.to_numpy()
            out[name] = (arr.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0])
        elif pa.types.is_primitive(t):
            out[name] = arr.to_numpy(zero_copy_only=False)
        else:  # strings, binaries
            out[name] = arr.to_pylist()
    return out


def _shuffled(items: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Bounded shuffle buffer (tf.data style): hold `size` items, emit a uniformly chosen one per new item."""
    buf: list[dict] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    for i in rng.permutation(len(buf)):
        yield buf[i]


# --------------------------------------------------------------------------------------------------
# Dataset


class ShardDataset(IterableDataset):
    """Streams the rows of ``ROOT/<split>/*.parquet`` as training items (see the module docstring).

    Sharding: the files (permuted by ``seed`` and the epoch when ``shuffle``) are dealt to the
    ``world_size * num_workers`` global workers, file i to global worker ``i % G`` where
    ``G = world_size * num_workers`` and global worker ``rank * num_workers + worker_id``. With fewer files
    than global workers, files are cut at row-group boundaries moved forward to the next episode start
    and the pieces are dealt the same way, so every row is still delivered exactly once per epoch and
    history windows never cross a piece. Ranks may receive different numbers of rows.

    Shuffling: shard order permuted with (seed, epoch), then a bounded buffer of ``shuffle_buffer`` items
    seeded with (seed, epoch, global worker). Windows are built before the buffer, so each frame is decoded
    once per pass. ``shuffle=False``: file order, then row order (per worker).

    ``columns`` restricts the Parquet columns read (None: all); dataset_name, episode_id, step_index and
    num_steps are always read. ``set_epoch`` does not reach ``persistent_workers=True`` DataLoader
    workers, which keep the copy of the dataset they were started with; pass ``epoch=`` to a new
    DataLoader's dataset instead.
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
        self.root = resolve_shards_root(root)
        self.split = split
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.history = int(history)
        self.epoch = int(epoch)
        self.decode_images = bool(decode_images)
        self._fs: tuple[pafs.FileSystem, str] | None = None  # per process; dropped when pickled
        self.manifest = load_manifest(self.root)
        if self.manifest is None:
            warnings.warn(
                f"no {MANIFEST_NAME} in {self.root!r}: reading {split}/*{SHARD_SUFFIX} unverified; the shard job "
                "writes the manifest last, so its absence can mean an incomplete or interrupted output",
                stacklevel=2,
            )
        self.files = list_shard_files(self.root, split, self.manifest)
        if not self.files:
            raise ValueError(
                f"expected shard files for split {split!r} under {self.root!r} "
                f"({'listed in ' + MANIFEST_NAME if self.manifest else split + '/*' + SHARD_SUFFIX}), got none"
            )
        # One footer read: the schema every file must share.
        self.schema = self._open(self.files[0].path).schema_arrow
        self.layout = ShardLayout.from_schema(self.schema, self.manifest, self._where(self.files[0].path))
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

    # -- public helpers ---------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (shard permutation and buffer) on the next iteration."""
        if epoch < 0:
            raise ValueError(f"expected epoch >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def slices_for(self, worker_id: int = 0, num_workers: int = 1) -> list[ShardSlice]:
        """The pieces of work of DataLoader worker ``worker_id`` of ``num_workers`` on this rank, in read order."""
        if num_workers < 1 or not 0 <= worker_id < num_workers:
            raise ValueError(f"expected 0 <= worker_id < num_workers, got {worker_id}, {num_workers}")
        global_workers = self.world_size * num_workers
        global_worker = self.rank * num_workers + worker_id
        files = list(self.files)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(len(files))
            files = [files[i] for i in order]
        if len(files) >= global_workers:
            pieces = [ShardSlice(f.path, rows=f.rows, bytes=f.bytes) for f in files]
        else:
            pieces = [p for f in files for p in self._episode_aligned_pieces(f)]
        return pieces[global_worker::global_workers]

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        global_worker = self.rank * num_workers + worker_id
        items: Iterator[dict] = (item for piece in self.slices_for(worker_id, num_workers) for item in self._read(piece))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, self.epoch, 1, global_worker])
            items = _shuffled(items, self.shuffle_buffer, rng)
        for item in items:
            yield self._finalize(item)

    # -- internals --------------------------------------------------------------------------------

    def _where(self, rel: str) -> str:
        return _join(self.root, rel)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    def _open(self, rel: str) -> pq.ParquetFile:
        if self._fs is None:
            self._fs = _filesystem(self.root)
        fs, base = self._fs
        path = _join(base, rel)
        try:
            return pq.ParquetFile(fs.open_input_file(path))
        except (OSError, pa.ArrowInvalid) as e:
            raise type(e)(f"cannot open shard {path!r}: {e}") from e

    def _episode_aligned_pieces(self, f: ShardFile) -> list[ShardSlice]:
        """Cut a file at each row-group start moved forward to the next episode start (step_index == 0).

        Reads only the bookkeeping columns, and checks the whole file's episode order with them: the
        per-piece check in ``_read`` cannot see an episode id repeated in two pieces.
        """
        pf = self._open(f.path)
        meta = pf.metadata
        num_rows = meta.num_rows
        check = _EpisodeOrderCheck(self._where(f.path))
        steps, row = [], 0
        for batch in pf.iter_batches(batch_size=64 * READ_BATCH_ROWS, columns=list(BOOKKEEPING_COLUMNS)):
            names = batch.column("dataset_name").to_pylist()
            ids = batch.column("episode_id").to_pylist()
            step = batch.column("step_index").to_numpy()
            total = batch.column("num_steps").to_numpy()
            for i in range(batch.num_rows):
                check.row(names[i], ids[i], int(step[i]), int(total[i]), row + i)
            steps.append(step)
            row += batch.num_rows
        check.finish(row)
        starts = np.flatnonzero(np.concatenate(steps or [np.zeros(0, np.int32)]) == 0)
        cuts = {0, num_rows}
        offset = 0
        for k in range(meta.num_row_groups):
            j = int(np.searchsorted(starts, offset))
            cuts.add(int(starts[j]) if j < len(starts) else num_rows)
            offset += meta.row_group(k).num_rows
        cuts = sorted(cuts)
        return [ShardSlice(f.path, a, b, rows=f.rows, bytes=f.bytes) for a, b in zip(cuts[:-1], cuts[1:]) if a < b]

    def _read(self, piece: ShardSlice) -> Iterator[dict]:
        """Rows of ``piece`` as (pre-shuffle) items, checking episode contiguity and decoding each frame once."""
        where = self._where(piece.path)
        pf = self._open(piece.path)
        validate_table_schema(pf.schema_arrow, self.schema, where)
        meta = pf.metadata
        if piece.rows is not None and meta.num_rows != piece.rows:
            raise ValueError(
                f"expected {piece.rows} rows in {where} (from {MANIFEST_NAME}), got {meta.num_rows}; "
                "was the file replaced after the manifest was written?"
            )
        if piece.bytes is not None:
            fs, base = self._fs
            size = fs.get_file_info(_join(base, piece.path)).size
            if size != piece.bytes:
                raise ValueError(
                    f"expected {piece.bytes} bytes in {where} (from {MANIFEST_NAME}), got {size}; "
                    "was the file replaced after the manifest was written?"
                )
        start, stop = piece.start, meta.num_rows if piece.stop is None else piece.stop
        if stop > meta.num_rows:
            raise ValueError(f"expected a slice within the {meta.num_rows} rows of {where}, got [{start}, {stop})")
        check = _EpisodeOrderCheck(where)
        if start == stop:
            return
        # Contiguous row groups overlapping [start, stop).
        groups, offset, first_offset = [], 0, None
        for k in range(meta.num_row_groups):
            n = meta.row_group(k).num_rows
            if offset < stop and offset + n > start:
                groups.append(k)
                first_offset = offset if first_offset is None else first_offset
            offset += n
        H = self.history
        frames: collections.deque = collections.deque(maxlen=H)  # primary frames of the current episode
        proprios: collections.deque = collections.deque(maxlen=H)
        row = first_offset
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=list(self.columns)):
            lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
            if lo < hi:
                cols = _batch_columns(batch.slice(lo, hi - lo))
                for i in range(hi - lo):
                    item = self._row(cols, i, row + lo + i, check, frames, proprios, where)
                    yield item
            row += batch.num_rows
            if row >= stop:
                break
        check.finish(stop)

    def _row(self, cols, i, row, check, frames, proprios, where) -> dict:
        episode_id, step = cols["episode_id"][i], int(cols["step_index"][i])
        check.row(cols["dataset_name"][i], episode_id, step, int(cols["num_steps"][i]), row)
        if step == 0:
            frames.clear()
            proprios.clear()
        item: dict[str, Any] = {}
        for name in _STRING_COLUMNS:
            if name in cols:
                item[name] = cols[name][i]
        item["step_index"] = step
        item["num_steps"] = int(cols["num_steps"][i])
        for name in _TENSOR_COLUMNS_INT:
            if name not in cols:
                continue
            col = cols[name]
            if isinstance(col, tuple):  # variable-length list
                flat, offsets = col
                value = flat[offsets[i] : offsets[i + 1]]
            else:
                value = col[i]
            item[name] = torch.from_numpy(value.astype(np.int64))
        n, d = self.layout.chunk, self.layout.action_dim
        for name in ("action", "normalized_action"):
            if name in cols:
                item[name] = torch.from_numpy(cols[name][i].astype(np.float32))
        for name in ("action_chunk", "normalized_action_chunk"):
            if name in cols:
                item[name] = torch.from_numpy(cols[name][i].astype(np.float32).reshape(n, d))  # [N, D]
        if "action_chunk_mask" in cols:
            item["action_chunk_mask"] = torch.from_numpy(cols["action_chunk_mask"][i].astype(np.bool_))
        H = self.history
        real = None
        if "image_primary" in cols:
            frames.append(self._frame(cols["image_primary"][i], where, episode_id, step))
            item["image_primary"] = self._window(frames)
            real = len(frames)
        if "proprio" in cols:
            proprios.append(torch.from_numpy(cols["proprio"][i].astype(np.float32)))
            item["proprio"] = self._window(proprios)
            real = len(proprios)
        if "image_wrist" in cols:
            item["image_wrist"] = self._frame(cols["image_wrist"][i], where, episode_id, step)
        if H > 1 and real is not None:
            # [H]; False for the padding before the episode start (the ring holds min(step + 1, H) values)
            item["history_mask"] = torch.arange(H) >= H - real
        return item

    def _frame(self, data: bytes, where: str, episode_id: str, step: int):
        if not self.decode_images:
            return data
        frame = decode_image(data)  # [3, S, S] uint8; module-level lookup so tests can count calls
        size = self.layout.image_size
        if size is not None and tuple(frame.shape) != (3, size, size):
            raise ValueError(
                f"expected a {size}x{size} RGB image (options.image_size) at step {step} of episode {episode_id!r} "
                f"in {where}, got shape {tuple(frame.shape)}"
            )
        return frame

    def _window(self, ring: collections.deque):
        """The last H values ending at step t; before the episode start the first value repeats."""
        if self.history == 1:
            return ring[-1]
        values = list(ring)
        values = [values[0]] * (self.history - len(values)) + values
        if isinstance(values[0], torch.Tensor):
            return torch.stack(values)  # [H, ...]
        return values  # PNG bytes with decode_images=False

    def _finalize(self, item: dict) -> dict:
        """After the shuffle buffer (which holds uint8 frames): images to float [0, 1] under model-facing names."""
        out = dict(item)
        for src, dst in (("image_primary", "pixel_values"), ("image_wrist", "wrist_pixel_values")):
            if src in out and isinstance(out[src], torch.Tensor):
                frames = out.pop(src)
                out[dst] = _to_unit_float(frames) if self.pixel_dtype == "float32" else frames
        return out


# --------------------------------------------------------------------------------------------------
# Collation


def collate_vla(batch: Sequence[dict], pad_token_id: int = 0) -> dict:
    """Batch ShardDataset items: right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with -100.

    Returns ``input_ids`` / ``labels`` int64 [B, L_max], ``attention_mask`` int64 [B, L_max] (1 on real tokens,
    from the lengths, so a pad id that is also a real token is still attended), every other tensor stacked
    [B, ...], ints and bools as tensors [B], strings and bytes as lists. Use
    ``functools.partial(collate_vla, pad_token_id=...)`` as a DataLoader ``collate_fn``.
    """
    if len(batch) == 0:
        raise ValueError("expected a non-empty batch, got 0 items")
    keys = list(batch[0].keys())
    for j, item in enumerate(batch):
        if set(item.keys()) != set(keys):
            raise ValueError(f"expected every item to have keys {sorted(keys)!r}, got {sorted(item.keys())!r} at index {j}")
    out: dict[str, Any] = {}
    if "input_ids" in batch[0]:
        lengths = [int(item["input_ids"].shape[0]) for item in batch]
        size = (len(batch), max(lengths))
        input_ids = torch.full(size, pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(size, dtype=torch.long)
        labels = torch.full(size, LABEL_IGNORE, dtype=torch.long) if "labels" in batch[0] else None
        for j, (item, n) in enumerate(zip(batch, lengths)):
            input_ids[j, :n] = item["input_ids"]
            attention_mask[j, :n] = 1
            if labels is not None:
                if item["labels"].shape[0] != n:
                    raise ValueError(
                        f"expected labels as long as input_ids ({n}) at index {j}, got {item['labels'].shape[0]}"
                    )
                labels[j, :n] = item["labels"]
        out["input_ids"], out["attention_mask"] = input_ids, attention_mask
        if labels is not None:
            out["labels"] = labels
    for key in keys:
        if key in out or key == "labels":
            continue
        values = [item[key] for item in batch]
        first = values[0]
        if isinstance(first, torch.Tensor):
            for j, v in enumerate(values):
                if v.shape != first.shape:
                    raise ValueError(
                        f"expected {key!r} of shape {tuple(first.shape)} in every item, got {tuple(v.shape)} at index {j}"
                    )
            out[key] = torch.stack(values)
        elif isinstance(first, (bool, np.bool_)):
            out[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, (int, np.integer)):
            out[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, (float, np.floating)):
            out[key] = torch.tensor(values, dtype=torch.float32)
        else:  # str, bytes, lists of PNG bytes
            out[key] = list(values)
    return out
