"""An encoded episode at rest between the encoder and its shard writer: an Arrow IPC file in the spill
directory (``OUT/.staging-*/.work/episodes``), one record batch per chunk, and its small reference
(``EpisodeRef``: name, sizes, rows), which is all that goes through the Beam shuffle.

The sizes in the reference are those of the episode's rows as ONE record batch (``EpisodeLayout``),
computed chunk by chunk without ever holding the whole episode: the shard plan and the writer's
row-group size depend on them, not on how the encoder chunked the episode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid

import pyarrow as pa
import pyarrow.compute as pc

from vlaprep import paths
from vlaprep.pipelines.shards.plan import EpisodeKey


def _buffer_counts(array: pa.Array) -> list[tuple[str, int]]:
    """The buffers an Arrow IPC writer writes for ``array`` (no nulls), in order, as (kind, count):
    ``validity`` (empty without nulls), ``offsets`` (count = rows; 4 * (rows + 1) bytes), ``bits``
    (bit-packed booleans) or ``bytes``. Counts add up over chunks: the whole episode's layout is the
    sum of its chunks'. Slices count only the rows they hold."""
    kind = array.type
    if array.null_count:
        raise ValueError(f"expected no nulls in a shard column, got {array.null_count} in a {kind} column")
    rows = len(array)
    if pa.types.is_boolean(kind):
        return [("validity", 0), ("bits", rows)]
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        data = pc.sum(pc.binary_length(array)).as_py() or 0
        return [("validity", 0), ("offsets", rows), ("bytes", int(data))]
    if pa.types.is_list(kind):
        return [("validity", 0), ("offsets", rows)] + _buffer_counts(array.flatten())
    if pa.types.is_fixed_size_list(kind):
        return [("validity", 0)] + _buffer_counts(array.flatten())
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return [("validity", 0), ("bytes", rows * kind.bit_width // 8)]
    raise TypeError(f"expected a shard column type (string, binary, int, float, bool, lists of them), got {kind}")


class EpisodeLayout:
    """The buffer sizes of an episode's rows as ONE record batch, added up chunk by chunk.

    What the plan and the writer need of an episode was, before episodes were chunked, measured on
    its one record batch: the size of its one-batch Arrow IPC file (``EpisodeRef.nbytes``, what shards
    are filled with) and pyarrow's ``nbytes`` of it read back (``EpisodeRef.arrow_nbytes``, what the
    row-group size divides). Both are functions of these sizes, so they are computed exactly without
    ever holding the whole episode (``tests/pipelines/shards/test_shards_long_episodes.py`` checks both
    against a real one-batch file).
    """

    def __init__(self):
        self.kinds: list[str] | None = None
        self.counts: list[int] = []
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        items = [item for column in batch.columns for item in _buffer_counts(column)]
        if self.kinds is None:
            self.kinds, self.counts = [k for k, _ in items], [0] * len(items)
        elif [k for k, _ in items] != self.kinds:
            raise ValueError("expected every chunk of an episode to have the same columns, got another layout")
        for i, (_, count) in enumerate(items):
            self.counts[i] += count
        self.rows += batch.num_rows

    def _lengths(self, offsets_extra: int) -> list[int]:
        sizes = {"validity": lambda c: 0, "offsets": lambda c: 4 * (c + offsets_extra), "bits": lambda c: -(-c // 8), "bytes": lambda c: c}
        return [sizes[k](c) for k, c in zip(self.kinds or (), self.counts)]

    def ipc_body_bytes(self) -> int:
        """Body of the one-batch IPC message: every buffer padded to 8 bytes (Arrow's IPC alignment)."""
        return sum(-(-n // 8) * 8 for n in self._lengths(1))

    def arrow_nbytes(self) -> int:
        """``RecordBatch.nbytes`` of the one batch read back from IPC: offsets count 4 bytes per row,
        booleans ceil(bits / 8), absent validity buffers nothing."""
        return sum(self._lengths(0))


def _ipc_file_size(batch: pa.RecordBatch) -> int:
    sink = pa.MockOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.size()


@dataclasses.dataclass(frozen=True)
class EpisodeRef:
    """Where one encoded episode waits for its shard writer: an Arrow IPC file in the spill directory,
    one record batch per chunk."""

    name: str  # file name inside the spill directory (a hash of the key: no paths, no collisions)
    nbytes: int  # size of the rows as a one-batch IPC file ~ their in-memory Arrow size; what the shard plan adds up
    rows: int
    arrow_nbytes: int  # pyarrow nbytes of the rows as one batch; the writer's row-group size divides it


def spill_name(key: EpisodeKey) -> str:
    return hashlib.sha256("\0".join(key).encode("utf-8")).hexdigest()[:40] + ".arrow"


class DigestWriter:
    """A write-only file object passing bytes through to ``file`` while counting them and hashing them
    (sha256). ``close`` leaves ``file`` open: its owner (``paths.open_write_atomic``) publishes it."""

    def __init__(self, file):
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self._file.write(view)
        self._hash.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _write_ipc(sink, first: pa.RecordBatch, rest, layout: EpisodeLayout) -> None:
    """``first`` then every batch of ``rest`` (produced as they are written) into one IPC file."""
    with pa.ipc.new_file(sink, first.schema) as writer:
        batch = first
        while batch is not None:
            layout.add(batch)
            writer.write_batch(batch)
            batch = next(rest, None)


def spill_episode(spill_dir: str, key: EpisodeKey, rows) -> EpisodeRef:
    """Write the episode's rows -- one record batch, or an iterable of record batches in step order (the
    encoder's chunks, produced while this writes) -- as one Arrow IPC file, a record batch per chunk,
    and return its reference. Temp file + rename: a retried bundle rewrites the same bytes; an error
    while the chunks are produced removes the temp file and propagates. Holds one chunk at a time."""
    name = spill_name(key)
    batches = iter([rows] if isinstance(rows, pa.RecordBatch) else rows)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"expected at least one row for episode {key!r}, got none")
    layout, alone = EpisodeLayout(), EpisodeLayout()
    alone.add(first)
    # The one-batch file = this file's header, schema, footer and first message metadata (their sizes do
    # not depend on the row count) + the body of the whole episode as one message.
    nbytes = _ipc_file_size(first) - alone.ipc_body_bytes()
    if paths.is_remote(spill_dir):
        with paths.open_write_atomic(paths.join(spill_dir, name)) as f, pa.PythonFile(DigestWriter(f), mode="w") as sink:
            _write_ipc(sink, first, batches, layout)
    else:
        path = os.path.join(spill_dir, name)
        tmp = os.path.join(spill_dir, f".tmp-{uuid.uuid4().hex}-{name}")
        try:
            with pa.OSFile(tmp, "wb") as sink:
                _write_ipc(sink, first, batches, layout)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return EpisodeRef(name, nbytes + layout.ipc_body_bytes(), layout.rows, layout.arrow_nbytes())


def read_spilled(spill_dir: str, ref: EpisodeRef):
    """The episode's record batches (its chunks), read one at a time (never memory-mapped: a 20,000-step
    episode's pages would all count in the worker's memory); checks the row count at the end."""
    path = paths.join(spill_dir, ref.name)
    source = pa.PythonFile(paths.open_read(path), mode="r") if paths.is_remote(spill_dir) else pa.OSFile(path, "rb")
    rows = 0
    with source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            rows += batch.num_rows
            yield batch
    if rows != ref.rows:
        raise ValueError(f"expected {ref.rows} rows in spilled episode {ref.name}, got {rows}")


@dataclasses.dataclass(frozen=True)
class SpilledEpisode:
    """An episode's rows in the spill directory, as the shard writer reads them (chunk by chunk)."""

    spill_dir: str
    ref: EpisodeRef

    @property
    def rows(self) -> int:
        return self.ref.rows

    @property
    def arrow_nbytes(self) -> int:
        return self.ref.arrow_nbytes

    def batches(self):
        return read_spilled(self.spill_dir, self.ref)
