"""One Parquet shard file from its episodes' rows (``write_shard_file``), and the way back: a previous
shard file's episodes read into the spill directory like freshly encoded ones (``reload_shard_episodes``).

A shard's bytes are a function of its rows only: episodes sorted by key, each one's rows contiguous
and checked (``check_episode_batch``), fixed Parquet settings, no wall-clock metadata, and row groups
rebuilt to the same arrays whatever chunking the encoder used (``_row_groups``). Written with
``PARQUET_COMPRESSION`` zstd, 0.5-0.6 ms a 224x224 row on a 2-core VM.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlaprep import paths
from vlaprep.pipelines.shards.options import (
    CHUNK_ROWS,
    PARQUET_COMPRESSION,
    PARQUET_COMPRESSION_LEVEL,
    PARQUET_PAGE_BYTES,
    ROW_GROUP_BYTES,
    ROW_GROUP_ROWS,
)
from vlaprep.pipelines.shards.plan import EpisodeKey
from vlaprep.pipelines.shards.spill import DigestWriter, EpisodeLayout, spill_episode
from vlaprep.schemas.layout import shard_relpath
from vlaprep.schemas.shards import Column, validate_table_schema


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with paths.open_read(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_episode_batch(batch: pa.RecordBatch, key: EpisodeKey, start: int = 0, num_steps: int | None = None) -> None:
    """The reader-side invariant, per chunk: rows start..start+K-1 of one episode of ``num_steps`` steps
    (default: this batch is the whole episode), in step order, each with num_steps == T."""
    k = batch.num_rows
    t = k if num_steps is None else num_steps
    steps = batch.column(Column.STEP_INDEX).to_numpy()
    if k == 0 or not np.array_equal(steps, np.arange(start, start + k)) or not np.all(batch.column(Column.NUM_STEPS).to_numpy() == t):
        raise ValueError(f"expected rows {start}..{start + k - 1} of episode {key!r} in step order with num_steps {t}, got others")


class _InMemoryEpisode:
    """An episode's rows already in memory (one record batch or its chunks): tests and small tools."""

    def __init__(self, batches: Sequence[pa.RecordBatch]):
        self._batches = list(batches)
        layout = EpisodeLayout()
        for batch in self._batches:
            layout.add(batch)
        self.rows, self.arrow_nbytes = layout.rows, layout.arrow_nbytes()

    def batches(self):
        return iter(self._batches)


def _episode_rows(value):
    """A ``write_shard_file`` item's rows: a SpilledEpisode, a record batch or a list of record batches."""
    if isinstance(value, pa.RecordBatch):
        return _InMemoryEpisode([value])
    if isinstance(value, (list, tuple)):
        return _InMemoryEpisode(value)
    return value


def _one_batch(pieces: list, schema: pa.Schema) -> pa.RecordBatch:
    if len(pieces) == 1:
        return pieces[0]
    return pa.Table.from_batches(pieces, schema=schema).combine_chunks().to_batches()[0]


def _row_groups(episodes: Sequence, row_group: int, schema: pa.Schema, relpath: str):
    """``[(key, rows)]`` in key order -> one ``pa.Table`` per Parquet row group (``row_group`` rows, the
    last of each dataset fewer), streamed from the episodes' chunks and checked on the way.

    A row group never holds two datasets' rows: a mixture reads each dataset as its own stream, and
    Parquet decodes whole row groups (from their first row), so a group shared by two datasets would be
    decoded once for each -- by different DataLoader workers, ~20% more decoding on a 3-dataset mixture.

    Each table holds one chunk per episode it covers (that episode's rows in the group, as one array):
    what ``pq.write_table`` saw when it sliced a table of whole-episode batches into row groups, whatever
    chunks the encoder made. With ``PARQUET_PAGE_BYTES`` each column of a group is one Parquet page (the
    same bytes as a group handed over as one array). Memory: one row group (<= ~ROW_GROUP_BYTES) plus one
    spilled chunk, and the Parquet writer's encoded page of the group's largest column (as large again).
    """
    group, filled, dataset = [], 0, None
    for key, episode in episodes:
        if group and key[1] != dataset:  # each dataset's rows start a row group: see the docstring
            yield pa.Table.from_batches(group, schema=schema)
            group, filled = [], 0
        dataset = key[1]
        pieces, start = [], 0
        for batch in episode.batches():
            validate_table_schema(batch.schema, schema, relpath)
            check_episode_batch(batch, key, start, episode.rows)
            start += batch.num_rows
            offset = 0
            while offset < batch.num_rows:
                take = min(batch.num_rows - offset, row_group - filled)
                pieces.append(batch.slice(offset, take))
                offset += take
                filled += take
                if filled == row_group:
                    group.append(_one_batch(pieces, schema))
                    yield pa.Table.from_batches(group, schema=schema)
                    group, pieces, filled = [], [], 0
        if start != episode.rows:
            raise ValueError(f"expected {episode.rows} rows of episode {key!r}, got {start}")
        if pieces:
            group.append(_one_batch(pieces, schema))
    if group:
        yield pa.Table.from_batches(group, schema=schema)


def write_shard_file(
    root: str, split: str, index: int, count: int, items: Sequence[tuple[EpisodeKey, object]], schema: pa.Schema, expected_episodes: int
) -> dict:
    """Write ``root/<split>/shard-<index>-of-<count>.parquet`` (temp file + fsync + rename) -> file info.

    ``items``: ``(key, rows)`` per episode, rows a ``SpilledEpisode`` (the pipeline), a record batch or a
    list of record batches (its chunks). Episodes in key order, each one's rows contiguous; zstd; row
    groups of ~1000 rows or ~64 MiB (from the episodes' one-batch Arrow size, ``EpisodeRef.arrow_nbytes``),
    each dataset's rows starting a new one (``_row_groups``), one page per column of a group
    (``PARQUET_PAGE_BYTES``); statistics for every non-image column; dictionary encoding only for the string columns.
    Streamed: row group by row group from the spilled chunks into the file, hashed on the way, so a
    shard of one 20,000-step episode takes one row group of memory, not the episode or the file.
    Idempotent: a retried bundle rewrites the same bytes.
    """
    episodes = sorted(((tuple(key), _episode_rows(value)) for key, value in items), key=lambda kv: kv[0])
    if len(episodes) != expected_episodes:
        raise RuntimeError(f"expected {expected_episodes} episodes for {split} shard {index}, got {len(episodes)}")
    per_dataset = {}
    for key, episode in episodes:
        counts = per_dataset.setdefault(key[1], {"episodes": 0, "rows": 0})
        counts["episodes"] += 1
        counts["rows"] += episode.rows
    relpath = shard_relpath(split, index, count)
    rows = sum(episode.rows for _, episode in episodes)
    row_bytes = max(1, sum(episode.arrow_nbytes for _, episode in episodes) // max(1, rows))
    row_group = max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes))
    binary = [f.name for f in schema if f.type == pa.binary()]
    path = paths.join(root, relpath)
    with paths.open_write_atomic(path) as f:
        digest = DigestWriter(f)
        with pa.PythonFile(digest, mode="w") as sink, pq.ParquetWriter(
            sink,
            schema,
            compression=PARQUET_COMPRESSION,
            compression_level=PARQUET_COMPRESSION_LEVEL,
            data_page_size=PARQUET_PAGE_BYTES,
            use_dictionary=[f.name for f in schema if f.type == pa.string()],
            write_statistics=[f.name for f in schema if f.name not in binary],
        ) as writer:
            groups = 0
            for table in _row_groups(episodes, row_group, schema, relpath):
                writer.write_table(table, row_group_size=row_group)
                groups += 1
    return {
        "path": relpath,
        "split": split,
        "shard_index": index,
        "num_shards": count,
        "rows": rows,
        "episodes": len(episodes),
        "bytes": digest.size,
        "sha256": digest.hexdigest(),
        "row_groups": groups,
        "datasets": dict(sorted(per_dataset.items())),
    }


def _dataset_pieces(parquet: pq.ParquetFile, dataset: str, schema: pa.Schema):
    """``(episode_id, record batch)`` runs of ``dataset``'s rows, in file order, CHUNK_ROWS rows at a time."""
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
        batch = batch.filter(pc.equal(batch.column(Column.DATASET_NAME), dataset))
        if batch.num_rows == 0:
            continue
        if batch.schema != schema:
            batch = pa.Table.from_batches([batch]).cast(schema).combine_chunks().to_batches()[0]
        ids = batch.column(Column.EPISODE_ID).to_pylist()
        start = 0
        for end in [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]:
            yield ids[start], batch.slice(start, end - start)
            start = end


def reload_shard_episodes(path: str, sha256: str, dataset: str, spill_dir: str, schema: pa.Schema):
    """A previous shard file -> ``(EpisodeKey, EpisodeRef)`` for each of ``dataset``'s episodes in it,
    spilled like freshly encoded ones (same ``EpisodeRef`` sizes, so the same plan and bytes).

    The file's sha256 is checked first (a streaming read): a changed file fails the run. Then it is
    read a batch of CHUNK_ROWS rows at a time (Parquet decodes a row group at a time), so a reused
    20,000-step episode takes the memory of a new one, not of its shard file."""
    if file_sha256(path) != sha256:
        raise RuntimeError(
            f"expected {path} to have sha256 {sha256} as its manifest says, got another digest; "
            "hint: the previous output was modified, delete it to rebuild from the sources"
        )
    split = paths.basename(paths.dirname(path))
    source = pa.PythonFile(paths.open_read(path), mode="r") if paths.is_remote(path) else pa.OSFile(path, "rb")
    with source:
        pieces = _dataset_pieces(pq.ParquetFile(source), dataset, schema)
        for episode_id, run in itertools.groupby(pieces, key=lambda piece: piece[0]):  # an episode's rows are contiguous
            key = (split, dataset, episode_id)
            yield key, spill_episode(spill_dir, key, (batch for _, batch in run))
