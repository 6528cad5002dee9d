"""Reading the split's Parquet files into the pipeline's elements: pyarrow and NumPy, no Beam.

Element types (columns: ``vlaprep.schemas.shards.Column``):
  ``ActionBatch``  the action columns of up to ``ROUND_TRIP_BATCH_ROWS`` rows of one dataset (round trip)
  ``ShardRow``     one full row, as the model sees it (model check)
Work items: ``ReadTask`` (one file, all rows or the ascending file-local rows ``sample_indices`` picks).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlaprep import paths
from vlaprep.pipelines.validate.layout import ValidationLayout, open_parquet
from vlaprep.schemas.shards import Column

ROUND_TRIP_BATCH_ROWS = 4096

_ROW_COLUMNS = (
    Column.DATASET_NAME,
    Column.EPISODE_ID,
    Column.STEP_INDEX,
    Column.INSTRUCTION,
    Column.ACTION_TOKEN_IDS,
    Column.ACTION_CHUNK,
    Column.IMAGE_PRIMARY,
)
_ACTION_COLUMNS = (Column.DATASET_NAME, Column.ACTION_TOKEN_IDS, Column.ACTION_CHUNK, Column.NORMALIZED_ACTION_CHUNK)
_ROW_SCALAR_COLUMNS = (Column.DATASET_NAME, Column.EPISODE_ID, Column.STEP_INDEX, Column.INSTRUCTION, Column.IMAGE_PRIMARY)


@dataclasses.dataclass(frozen=True)
class ShardRow:
    """One shard row, as the model sees it. ``action_token_ids``: [N*D] int64, ``action_chunk``: [N*D] float32."""

    dataset_name: str
    episode_id: str
    step_index: int
    instruction: str
    action_token_ids: np.ndarray
    action_chunk: np.ndarray
    image_primary: bytes


@dataclasses.dataclass(frozen=True)
class ActionBatch:
    """Action columns of up to ``ROUND_TRIP_BATCH_ROWS`` rows of one dataset (one file / row group).

    ``action_token_ids``: [R, N*D] int64; ``action_chunk``, ``normalized_action_chunk``: [R, N*D] float32.
    """

    dataset_name: str
    action_token_ids: np.ndarray
    action_chunk: np.ndarray
    normalized_action_chunk: np.ndarray


@dataclasses.dataclass(frozen=True)
class ReadTask:
    """Rows ``indices`` (file-local, ascending) of one file of the split, or all rows when ``indices`` is None."""

    path: str
    indices: tuple[int, ...] | None = None


def sample_indices(total: int, max_samples: int | None) -> list[int]:
    """Row indices ``floor(i * total / k)`` for ``k = min(total, max_samples)``: evenly spread, deterministic."""
    k = total if max_samples is None else min(total, max_samples)
    return [i * total // k for i in range(k)] if k else []


def model_read_tasks(layout: ValidationLayout, max_samples: int | None) -> list[ReadTask]:
    """ReadTasks for the rows ``sample_indices(layout.rows, max_samples)`` picks (global index -> file)."""
    tasks, offset = [], 0
    indices = sample_indices(layout.rows, max_samples)
    for path, rows in layout.files:
        local = tuple(i - offset for i in indices if offset <= i < offset + rows)
        if local:
            tasks.append(ReadTask(paths.join(layout.root, path), local))
        offset += rows
    return tasks


def _fixed_list(column, width: int, dtype) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(column), width)


def read_action_batches(task: ReadTask, width: int):
    """Yields ``ActionBatch`` elements (grouped by dataset) for every row of ``task.path``."""
    source = open_parquet(task.path)
    for group in range(source.num_row_groups):
        table = source.read_row_group(group, columns=list(_ACTION_COLUMNS))
        for start in range(0, table.num_rows, ROUND_TRIP_BATCH_ROWS):
            part = table.slice(start, ROUND_TRIP_BATCH_ROWS)
            names = part.column(Column.DATASET_NAME)
            for name in sorted(set(names.to_pylist())):
                rows = part.filter(pc.equal(names, name))
                yield ActionBatch(
                    dataset_name=name,
                    action_token_ids=_fixed_list(rows.column(Column.ACTION_TOKEN_IDS), width, np.int64),
                    action_chunk=_fixed_list(rows.column(Column.ACTION_CHUNK), width, np.float32),
                    normalized_action_chunk=_fixed_list(rows.column(Column.NORMALIZED_ACTION_CHUNK), width, np.float32),
                )


def read_shard_rows(task: ReadTask, width: int):
    """Yields one ``ShardRow`` per selected row of ``task.path`` (only the row groups that hold them are read)."""
    source = open_parquet(task.path)
    wanted = sorted(task.indices) if task.indices is not None else range(source.metadata.num_rows)
    start = 0
    for group in range(source.num_row_groups):
        stop = start + source.metadata.row_group(group).num_rows
        local = [i - start for i in wanted if start <= i < stop]
        if local:
            table = source.read_row_group(group, columns=list(_ROW_COLUMNS)).take(local)
            ids = _fixed_list(table.column(Column.ACTION_TOKEN_IDS), width, np.int64)
            chunk = _fixed_list(table.column(Column.ACTION_CHUNK), width, np.float32)
            columns = {name: table.column(name).to_pylist() for name in _ROW_SCALAR_COLUMNS}
            for r in range(table.num_rows):
                yield ShardRow(
                    dataset_name=columns[Column.DATASET_NAME][r],
                    episode_id=columns[Column.EPISODE_ID][r],
                    step_index=int(columns[Column.STEP_INDEX][r]),
                    instruction=columns[Column.INSTRUCTION][r],
                    action_token_ids=ids[r],
                    action_chunk=chunk[r],
                    image_primary=columns[Column.IMAGE_PRIMARY][r],
                )
        start = stop
