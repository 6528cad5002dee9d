"""Arrow schema of the pre-tokenized Parquet training shards (one row = one step = one training sample).

Columns (D = action width, N = --action-chunk, P = proprio width):
  dataset_name              string
  episode_id                string        stable id from the source (see schemas/episode.py)
  step_index                int32         index of the step within its (transformed) episode
  num_steps                 int32         steps in the episode (rows of one episode are contiguous, in order)
  instruction               string        as in the source (the prompt lower-cases it)
  input_ids                 list<int32>   BOS + prompt + N*D action ids + EOS
  labels                    list<int32>   -100 except the last N*D + 1 positions
  action_token_ids          fixed_size_list<int32>[N*D]   row-major, step t first
  action                    fixed_size_list<float32>[D]   raw action of step t (after the dataset transform)
  normalized_action         fixed_size_list<float32>[D]
  action_chunk              fixed_size_list<float32>[N*D] raw actions t..t+N-1 (past the end: last step)
  action_chunk_mask         fixed_size_list<bool>[N]      True where t+i is a real step
  normalized_action_chunk   fixed_size_list<float32>[N*D]
  image_primary             binary        PNG, --image-size square (TF lanczos3 + antialias, rounded)
  image_wrist               binary        (only with --cameras primary,wrist)
  proprio                   fixed_size_list<float32>[P]   (only when the dataset has proprio)

The chunk columns store [N, D] row-major in a flat fixed-size list so every reader (pyarrow, DuckDB,
Polars, ``datasets``) sees a plain type; ``reshape(N, D)`` restores it.
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa

LABEL_IGNORE = -100


class Column:
    """The shard columns' names: the one place writers (pipelines/shards) and readers (loader, validate) take them from."""

    DATASET_NAME: Final = "dataset_name"
    EPISODE_ID: Final = "episode_id"
    STEP_INDEX: Final = "step_index"
    NUM_STEPS: Final = "num_steps"
    INSTRUCTION: Final = "instruction"
    INPUT_IDS: Final = "input_ids"
    LABELS: Final = "labels"
    ACTION_TOKEN_IDS: Final = "action_token_ids"
    ACTION: Final = "action"
    NORMALIZED_ACTION: Final = "normalized_action"
    ACTION_CHUNK: Final = "action_chunk"
    ACTION_CHUNK_MASK: Final = "action_chunk_mask"
    NORMALIZED_ACTION_CHUNK: Final = "normalized_action_chunk"
    IMAGE_PRIMARY: Final = "image_primary"
    IMAGE_WRIST: Final = "image_wrist"
    PROPRIO: Final = "proprio"


def image_column(role: str) -> str:
    """``image_<role>`` for a camera role (``primary``, ``wrist``)."""
    return f"image_{role}"


def fixed_widths(schema: pa.Schema) -> dict[str, int]:
    """Column -> width of every fixed-size list column of a shard schema (the reader's layout, from the file itself)."""
    return {f.name: f.type.list_size for f in schema if pa.types.is_fixed_size_list(f.type)}


def shard_schema(action_dim: int, chunk: int = 1, proprio_dim: int = 0, wrist: bool = False) -> pa.Schema:
    if action_dim < 1 or chunk < 1 or proprio_dim < 0:
        raise ValueError(f"expected action_dim >= 1, chunk >= 1, proprio_dim >= 0, got {action_dim}, {chunk}, {proprio_dim}")
    fields = [
        pa.field(Column.DATASET_NAME, pa.string(), nullable=False),
        pa.field(Column.EPISODE_ID, pa.string(), nullable=False),
        pa.field(Column.STEP_INDEX, pa.int32(), nullable=False),
        pa.field(Column.NUM_STEPS, pa.int32(), nullable=False),
        pa.field(Column.INSTRUCTION, pa.string(), nullable=False),
        pa.field(Column.INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(Column.LABELS, pa.list_(pa.int32()), nullable=False),
        pa.field(Column.ACTION_TOKEN_IDS, pa.list_(pa.int32(), chunk * action_dim), nullable=False),
        pa.field(Column.ACTION, pa.list_(pa.float32(), action_dim), nullable=False),
        pa.field(Column.NORMALIZED_ACTION, pa.list_(pa.float32(), action_dim), nullable=False),
        pa.field(Column.ACTION_CHUNK, pa.list_(pa.float32(), chunk * action_dim), nullable=False),
        pa.field(Column.ACTION_CHUNK_MASK, pa.list_(pa.bool_(), chunk), nullable=False),
        pa.field(Column.NORMALIZED_ACTION_CHUNK, pa.list_(pa.float32(), chunk * action_dim), nullable=False),
        pa.field(Column.IMAGE_PRIMARY, pa.binary(), nullable=False),
    ]
    if wrist:
        fields.append(pa.field(Column.IMAGE_WRIST, pa.binary(), nullable=False))
    if proprio_dim:
        fields.append(pa.field(Column.PROPRIO, pa.list_(pa.float32(), proprio_dim), nullable=False))
    return pa.schema(fields)


def validate_table_schema(table_schema: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise ValueError naming the first column whose name/type differs."""
    if table_schema.names != expected.names:
        raise ValueError(f"expected columns {expected.names!r} in {where}, got {table_schema.names!r}")
    for field in expected:
        got = table_schema.field(field.name)
        if got.type != field.type:
            raise ValueError(f"expected column {field.name!r} of type {field.type} in {where}, got {got.type}")
