"""Validation of pre-tokenized shards and of a VLA model on them (Beam, ``RunInference``).

Two independent checks over one split of a shard directory written by ``vlaprep shards``
(``OUT/{train,heldout}/shard-*.parquet`` + ``OUT/manifest.json``, columns in ``schemas/shards.py``):

1. **Data round trip** (every row of the split, action columns only). Per stored value (``[rows*N, D]``,
   every position of the chunk including the padded steps past an episode's end, which are stored and
   trained on like the rest):

     decoded  = ActionTokenizer(manifest encoding, vocab).decode(action_token_ids)    # normalized space
     restored = unnormalize_actions(decoded, statistics, manifest normalization)    # raw units, float64
     error    = |restored - action_chunk|

   and, with ``y = normalize_actions(action_chunk)`` recomputed from the statistics: whether the stored
   id equals ``encode(y)`` (``token_matches_encoding``), whether ``|C(decoded) - C(y)| <= 1/(n_bins-1)``
   for values inside the normalization's range (half a bin; ``C`` = mu-law compander or identity),
   whether ``|y| == 1`` (saturated), and whether ``encode(decoded)`` gives the stored id back
   (``token_roundtrip_accuracy``, over every id except the top one: OpenVLA's ids 31744 and 31745 both
   decode to 0.99608, so 31744 re-tokenizes to 31745 -- counted apart as ``top_bin_values``).
   "In range" means ``|y_unclipped| <= 1``: ``low <= x <= high`` for the bounds modes and ``fixed``,
   ``|x| <= 1`` for masked-out (pass-through, e.g. gripper) dims, ``|(x - mean)/std| <= 1`` for ``normal``;
   dims zeroed by the ``min == max`` rule are in range (and flagged ``constant``; masked out, they come
   back as 0.0 rather than the constant, as in OpenVLA's inference).

2. **Model** (at most ``--max-samples`` rows, evenly spread over the split). Greedy generation of exactly
   ``N*D`` new tokens restricted to the 256 action ids (every other logit is -inf, so EOS never ends a
   sample early), compared with the stored ``action_token_ids``: exact and within-one-bin accuracy, L1 in
   normalized units, in raw units against the stored tokens and against the raw ``action_chunk``.

Prompt (OpenVLA's ``predict_action``): ``openvla_inference_prompt(instruction)`` (no trailing space)
tokenized with BOS, then the tail is patched to the *training* prompt's tail found by comparing the
two tokenizations (``prompt_tail``): with Llama-2 tokenizers that appends the lone-space id 29871,
exactly OpenVLA's "append 29871 if the last id is not 29871". Models:

* native image-text-to-text checkpoints (``AutoModelForImageTextToText`` + ``AutoProcessor``, e.g.
  LLaVA): the text is ``processor.image_token + prompt``, so the model sees
  ``[BOS] + image tokens + prompt ids (+ 29871)`` -- the OpenVLA layout, where the patch embeddings
  follow BOS. Batches are left-padded.
* OpenVLA checkpoints (``config.json`` ``model_type`` "openvla"/"prismatic" with
  ``auto_map["AutoModelForVision2Seq"]``, the ``openvla/openvla-7b`` layout) only with
  ``trust_remote_code``: ``pipelines/openvla_model.py`` loads the checkpoint's own classes and decodes a
  whole batch at once (vision backbone + projector on the batch, ``[BOS, patches, rest]`` per row,
  left-padded, the language model's ``generate``): the ids of OpenVLA's ``predict_action``, batched.
  Needs ``vlaprep[openvla]`` (timm, torchvision), checked before the pipeline starts.
* other checkpoints that ship code (``auto_map``), only with ``trust_remote_code``: the class is loaded
  with ``get_class_from_dynamic_module`` and driven like a native one, except that a batch is run as
  sub-batches of equal prompt length (no padding: such code may not support it).

The model directory is checked before the pipeline starts (``check_model_dir``): config.json, the
weights (every shard an index names; safetensors files must be as long as their header says), a
tokenizer file and the image processor's config; each problem is one ``ValidationError`` naming the file.

Processor outputs other than ``input_ids`` / ``attention_mask`` / image tensors that are per token (e.g.
``token_type_ids``) reach ``generate`` only when the model's ``forward`` names them (transformers 4.x
rejects unused model kwargs). transformers >= 4.45: ``AutoModelForImageTextToText`` where it exists
(``AutoModelForVision2Seq`` before), ``torch_dtype=`` before 4.56, ``dtype=`` after (``dtype_kwargs``).

bf16 on CUDA, fp32 on CPU. The model, the processor and transformers are loaded in
``VlaModelHandler.load_model`` on the worker, never at construction (this module does not import
torch or transformers itself; Beam's ``ml.inference.base`` imports torch when it is installed).

The manifest (``manifest.json`` beside the split folders) is read with ``vlaprep.schemas.layout``: checked
against ``schemas/manifest.schema.json``, every path confined to the shard directory. Fields used:
  files[]: {path, split, rows} of the split validated
  options: {action_chunk, action_dim, normalization, action_encoding, vocab_size, n_bins}
  inputs.statistics: {sha256, path}: the statistics used must hash to ``sha256``. They are ``--statistics
  FILE`` when given, else the copy ``vlaprep shards`` writes beside the shards (``path``,
  ``inputs/dataset_statistics.json``); nothing else is looked for.
The action width D is read from the Parquet schema (``action`` column) and checked against
``options.action_dim``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from vlaprep.errors import UserError
from vlaprep.paths import confined
from vlaprep.schemas.layout import MANIFEST_FILE, TRAIN, Manifest, read_manifest
from vlaprep.transforms.action_tokenizer import ActionTokenizer
from vlaprep.transforms.normalization import (
    BOUNDS,
    BOUNDS_Q99,
    EPS,
    FIXED,
    NORMAL,
    NormalizationSpec,
    normalization_mask,
    normalize_actions,
    unnormalize_actions,
)
from vlaprep.transforms.prompt import openvla_inference_prompt, prompt_prefix_ids

REPORT_FILE = "validation_report.json"
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_NAMESPACE = "vlaprep.validate"
REPORT_FORMAT = "vlaprep.validation_report/1"
REMOTE_AUTO_CLASS = "AutoModelForVision2Seq"  # where OpenVLA's config.json declares its class
NATIVE = "native"
REMOTE_CODE = "remote_code"
ROUND_TRIP_BATCH_ROWS = 4096
_TOLERANCE = 1e-9  # on the half-bin test: the bound is exact up to float64 rounding of edges and centers

_ROW_COLUMNS = (
    "dataset_name",
    "episode_id",
    "step_index",
    "instruction",
    "action_token_ids",
    "action_chunk",
    "image_primary",
)
_ACTION_COLUMNS = ("dataset_name", "action_token_ids", "action_chunk", "normalized_action_chunk")


class ValidationError(UserError):
    """A user-facing problem with the shards, the manifest or the model directory (one line)."""


# --------------------------------------------------------------------------------------------------
# Manifest -> layout


@dataclasses.dataclass(frozen=True)
class ValidationLayout:
    """What validation needs from a shard directory; built by ``load_layout``."""

    root: str
    split: str
    files: tuple[tuple[str, int], ...]  # (path relative to root, rows), manifest order
    action_chunk: int  # N
    action_dim: int  # D
    normalization: str
    action_encoding: str
    vocab_size: int
    n_bins: int
    statistics: Mapping[str, Any]  # dataset -> dataset_statistics entry
    statistics_source: str
    statistics_fingerprint: str  # inputs.statistics.sha256 of the manifest
    dataset_rows: Mapping[str, int]  # rows of the split per dataset

    def __post_init__(self):
        if self.action_chunk < 1 or self.action_dim < 1:
            raise ValidationError(f"expected action_chunk >= 1 and action_dim >= 1, got {self.action_chunk}, {self.action_dim}")
        try:
            NormalizationSpec.parse(self.normalization)
            self.tokenizer  # validates encoding / vocab / n_bins
        except (TypeError, ValueError) as e:
            raise ValidationError(f"expected valid shard options in {MANIFEST_FILE}, got: {e}") from e
        missing = sorted(set(self.dataset_rows) - set(self.statistics))
        if missing:
            raise ValidationError(
                f"expected statistics for every dataset in the shards, got none for {missing!r} in "
                f"{self.statistics_source}; hint: pass --statistics FILE"
            )

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.files)

    @property
    def tokenizer(self) -> ActionTokenizer:
        return ActionTokenizer.from_encoding(self.action_encoding, vocab_size=self.vocab_size, n_bins=self.n_bins)

    def metrics_spec(self) -> MetricsSpec:
        return MetricsSpec(
            statistics={name: self.statistics[name]["action"] for name in self.dataset_rows},
            normalization=self.normalization,
            action_encoding=self.action_encoding,
            vocab_size=self.vocab_size,
            n_bins=self.n_bins,
            chunk=self.action_chunk,
            dim=self.action_dim,
        )


def _load_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValidationError(f"expected {what} at {path!r}, got no such file") from None
    except json.JSONDecodeError as e:
        raise ValidationError(f"expected {what} at {path!r} to be JSON, got: {e}") from e


def _load_statistics_file(path: str, expected_sha256: str, what: str):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValidationError(f"expected {what} at {path!r}, got no such file; hint: pass --statistics FILE") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ValidationError(
            f"expected the statistics the shards were written with (sha256 {expected_sha256[:12]}... in "
            f"{MANIFEST_FILE}), got sha256 {digest[:12]}... from {path}; hint: pass the dataset_statistics.json "
            "given to vlaprep shards"
        )
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValidationError(f"expected {what} at {path!r} to be JSON, got: {e}") from e


def _resolve_statistics(manifest: Manifest, statistics_path: str | None) -> tuple[Mapping[str, Any], str]:
    """-> (statistics dict, the file it came from).

    ``--statistics FILE`` when given, else the copy ``vlaprep shards`` writes (``inputs/dataset_statistics.json``,
    the manifest's ``inputs.statistics.path``); either must hash to ``inputs.statistics.sha256``.
    """
    if statistics_path is not None:
        return _load_statistics_file(statistics_path, manifest.statistics_sha256, "dataset statistics (--statistics)"), statistics_path
    path = manifest.statistics_path
    return _load_statistics_file(path, manifest.statistics_sha256, f"the statistics copy of {MANIFEST_FILE}"), path


def load_layout(shards_dir: str, split: str = "heldout", statistics_path: str | None = None) -> ValidationLayout:
    """Reads ``shards_dir/manifest.json`` (+ Parquet footers and the dataset_name column of the split).

    Raises ``vlaprep.schemas.layout.ManifestError`` for a missing manifest or one that is not what vlaprep shards writes."""
    import pyarrow.parquet as pq

    root = os.fspath(shards_dir)
    manifest = read_manifest(root)
    manifest_path = os.path.join(root, MANIFEST_FILE)
    entries = manifest.files(split)
    if not entries:
        splits = sorted({f.split for f in manifest.files()})
        raise ValidationError(
            f"expected shard files for split {split!r} in {manifest_path}, got splits {splits!r}; "
            f"hint: --split {splits[0] if splits else TRAIN}"
        )
    files = tuple((f.path, f.rows) for f in entries)
    options = manifest.options
    chunk = int(options["action_chunk"])
    normalization = str(options["normalization"])
    encoding = str(options["action_encoding"])
    vocab_size = int(options["vocab_size"])
    n_bins = int(options["n_bins"])

    first = manifest.path(files[0][0])
    schema = pq.read_schema(first)
    if "action" not in schema.names or "action_token_ids" not in schema.names:
        raise ValidationError(f"expected the shard columns of schemas/shards.py in {first}, got {schema.names!r}")
    dim = schema.field("action").type.list_size
    ids_width = schema.field("action_token_ids").type.list_size
    if int(options["action_dim"]) != dim:
        raise ValidationError(f"expected action width {options['action_dim']} (manifest options.action_dim) in {first}, got {dim}")
    if ids_width != chunk * dim:
        raise ValidationError(
            f"expected action_token_ids of width action_chunk * D = {chunk} * {dim} = {chunk * dim} in {first}, "
            f"got {ids_width}; hint: is options.action_chunk in the manifest right?"
        )
    dataset_rows: dict[str, int] = {}
    for path, rows in files:
        full = manifest.path(path)
        metadata_rows = pq.read_metadata(full).num_rows
        if metadata_rows != rows:
            raise ValidationError(f"expected {rows} rows in {full} (manifest), got {metadata_rows}")
        names = pq.read_table(full, columns=["dataset_name"]).column(0).value_counts()
        for item in names.to_pylist():
            dataset_rows[item["values"]] = dataset_rows.get(item["values"], 0) + int(item["counts"])
    statistics, source = _resolve_statistics(manifest, statistics_path)
    return ValidationLayout(
        root=root,
        split=split,
        files=files,
        action_chunk=chunk,
        action_dim=dim,
        normalization=normalization,
        action_encoding=encoding,
        vocab_size=vocab_size,
        n_bins=n_bins,
        statistics=statistics,
        statistics_source=source,
        statistics_fingerprint=manifest.statistics_sha256,
        dataset_rows=dict(sorted(dataset_rows.items())),
    )


def sample_indices(total: int, max_samples: int | None) -> list[int]:
    """Row indices ``floor(i * total / k)`` for ``k = min(total, max_samples)``: evenly spread, deterministic."""
    k = total if max_samples is None else min(total, max_samples)
    return [i * total // k for i in range(k)] if k else []


# --------------------------------------------------------------------------------------------------
# Elements


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
class Generation:
    """What ``VlaModelHandler`` predicts for one row: ``token_ids`` [N*D] int64 and its share of the batch time."""

    token_ids: np.ndarray
    seconds: float
    generate_seconds: float
    device: str
    dtype: str


@dataclasses.dataclass(frozen=True)
class ReadTask:
    """Rows ``indices`` (file-local, ascending) of one file of the split, or all rows when ``indices`` is None."""

    path: str
    indices: tuple[int, ...] | None = None


def _fixed_list(column, width: int, dtype) -> np.ndarray:
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(column), width)


def read_action_batches(task: ReadTask, width: int):
    """Yields ``ActionBatch`` elements (grouped by dataset) for every row of ``task.path``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    source = pq.ParquetFile(task.path)
    for group in range(source.num_row_groups):
        table = source.read_row_group(group, columns=list(_ACTION_COLUMNS))
        for start in range(0, table.num_rows, ROUND_TRIP_BATCH_ROWS):
            part = table.slice(start, ROUND_TRIP_BATCH_ROWS)
            names = part.column("dataset_name")
            for name in sorted(set(names.to_pylist())):
                rows = part.filter(pc.equal(names, name))
                yield ActionBatch(
                    dataset_name=name,
                    action_token_ids=_fixed_list(rows.column("action_token_ids"), width, np.int64),
                    action_chunk=_fixed_list(rows.column("action_chunk"), width, np.float32),
                    normalized_action_chunk=_fixed_list(rows.column("normalized_action_chunk"), width, np.float32),
                )


def read_shard_rows(task: ReadTask, width: int):
    """Yields one ``ShardRow`` per selected row of ``task.path`` (only the row groups that hold them are read)."""
    import pyarrow.parquet as pq

    source = pq.ParquetFile(task.path)
    wanted = sorted(task.indices) if task.indices is not None else range(source.metadata.num_rows)
    start = 0
    for group in range(source.num_row_groups):
        stop = start + source.metadata.row_group(group).num_rows
        local = [i - start for i in wanted if start <= i < stop]
        if local:
            table = source.read_row_group(group, columns=list(_ROW_COLUMNS)).take(local)
            ids = _fixed_list(table.column("action_token_ids"), width, np.int64)
            chunk = _fixed_list(table.column("action_chunk"), width, np.float32)
            columns = {name: table.column(name).to_pylist() for name in ("dataset_name", "episode_id", "step_index", "instruction", "image_primary")}
            for r in range(table.num_rows):
                yield ShardRow(
                    dataset_name=columns["dataset_name"][r],
                    episode_id=columns["episode_id"][r],
                    step_index=int(columns["step_index"][r]),
                    instruction=columns["instruction"][r],
                    action_token_ids=ids[r],
                    action_chunk=chunk[r],
                    image_primary=columns["image_primary"][r],
                )
        start = stop


def model_read_tasks(layout: ValidationLayout, max_samples: int | None) -> list[ReadTask]:
    """ReadTasks for the rows ``sample_indices(layout.rows, max_samples)`` picks (global index -> file)."""
    tasks, offset = [], 0
    indices = sample_indices(layout.rows, max_samples)
    for path, rows in layout.files:
        local = tuple(i - offset for i in indices if offset <= i < offset + rows)
        if local:
            tasks.append(ReadTask(os.path.join(layout.root, path), local))
        offset += rows
    return tasks


# --------------------------------------------------------------------------------------------------
# Metrics: plain functions over NumPy, accumulators with an explicit merge


@dataclasses.dataclass(frozen=True)
class MetricsSpec:
    """How tokens map back to actions: per-dataset ``action`` statistics blocks + the manifest's options."""

    statistics: Mapping[str, Mapping[str, Any]]  # dataset -> {"q01": [D], "q99": [D], ..., "mask": [D]}
    normalization: str
    action_encoding: str
    vocab_size: int
    n_bins: int
    chunk: int
    dim: int

    @property
    def tokenizer(self) -> ActionTokenizer:
        return ActionTokenizer.from_encoding(self.action_encoding, vocab_size=self.vocab_size, n_bins=self.n_bins)

    def stats(self, dataset: str) -> Mapping[str, Any]:
        try:
            return self.statistics[dataset]
        except KeyError:
            raise ValidationError(
                f"expected statistics for dataset {dataset!r}, got only {sorted(self.statistics)!r}; "
                "hint: pass --statistics FILE"
            ) from None


class _Accumulator:
    """Per-dim arrays ``[D]`` summed (``_SUM``) or max-ed (``_MAX``) on merge; ``rows`` summed."""

    _SUM: tuple[str, ...] = ()
    _MAX: tuple[str, ...] = ()

    @classmethod
    def zeros(cls, dim: int):
        fields = {name: np.zeros(dim, dtype=np.int64 if name in cls._INT else np.float64) for name in cls._SUM + cls._MAX}
        return cls(rows=0, **fields)

    def merge(self, other):
        """Adds ``other`` into ``self`` (mutates and returns self)."""
        if other is None:
            return self
        self.rows += other.rows
        for name in self._SUM:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in self._MAX:
            setattr(self, name, np.maximum(getattr(self, name), getattr(other, name)))
        return self

    def to_json(self) -> dict:
        out = {"rows": self.rows}
        for name in self._SUM + self._MAX:
            out[name] = getattr(self, name).tolist()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        fields = {
            name: np.asarray(data[name], dtype=np.int64 if name in cls._INT else np.float64)
            for name in cls._SUM + cls._MAX
        }
        return cls(rows=int(data["rows"]), **fields)


@dataclasses.dataclass
class RoundTripAccumulator(_Accumulator):
    """Sums / maxima per action dim over stored values (one value = one chunk position of one row)."""

    rows: int
    values: np.ndarray
    error_sum: np.ndarray  # sum |restored - raw|
    in_range: np.ndarray
    in_range_within_half_bin: np.ndarray
    saturated: np.ndarray
    encoding_matches: np.ndarray  # stored id == encode(normalize(raw))
    roundtrip_checked: np.ndarray  # ids other than the top one
    roundtrip_ok: np.ndarray
    top_bin: np.ndarray
    top_bin_to_next: np.ndarray  # top ids that re-tokenize to the next id (OpenVLA's quirk)
    invalid_ids: np.ndarray  # outside [min_token_id, max_token_id]
    error_max: np.ndarray
    error_max_in_range: np.ndarray
    normalized_column_diff_max: np.ndarray  # max |stored normalized - recomputed|

    _SUM = (
        "values", "error_sum", "in_range", "in_range_within_half_bin", "saturated", "encoding_matches",
        "roundtrip_checked", "roundtrip_ok", "top_bin", "top_bin_to_next", "invalid_ids",
    )
    _MAX = ("error_max", "error_max_in_range", "normalized_column_diff_max")
    _INT = frozenset(_SUM) - {"error_sum"}


@dataclasses.dataclass
class ModelAccumulator(_Accumulator):
    """Sums per action dim over generated values, plus time (``seconds``: run_inference wall time shares)."""

    rows: int
    values: np.ndarray
    exact: np.ndarray
    within_one_bin: np.ndarray
    outside_action_range: np.ndarray
    l1_normalized_sum: np.ndarray
    l1_raw_sum: np.ndarray  # vs the raw values the stored tokens decode to
    l1_raw_vs_action_sum: np.ndarray  # vs the raw action_chunk column
    seconds: float = 0.0
    generate_seconds: float = 0.0
    devices: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()

    _SUM = ("values", "exact", "within_one_bin", "outside_action_range", "l1_normalized_sum", "l1_raw_sum", "l1_raw_vs_action_sum")
    _MAX = ()
    _INT = frozenset({"values", "exact", "within_one_bin", "outside_action_range"})

    def merge(self, other):
        if other is None:
            return self
        super().merge(other)
        self.seconds += other.seconds
        self.generate_seconds += other.generate_seconds
        self.devices = tuple(sorted(set(self.devices) | set(other.devices)))
        self.dtypes = tuple(sorted(set(self.dtypes) | set(other.dtypes)))
        return self

    def to_json(self) -> dict:
        out = super().to_json()
        out.update(seconds=self.seconds, generate_seconds=self.generate_seconds, devices=list(self.devices), dtypes=list(self.dtypes))
        return out

    @classmethod
    def from_json(cls, data):
        acc = super().from_json(data)
        acc.seconds, acc.generate_seconds = float(data["seconds"]), float(data["generate_seconds"])
        acc.devices, acc.dtypes = tuple(data["devices"]), tuple(data["dtypes"])
        return acc


def unclipped_normalized(x: np.ndarray, stats: Mapping[str, Any], normalization: str) -> np.ndarray:
    """float64 ``[M, D]`` normalized values before any clip (the in-range test is ``|y| <= 1``)."""
    spec = NormalizationSpec.parse(normalization)
    x = np.asarray(x, dtype=np.float64)
    mask = normalization_mask(stats)
    if spec.mode == FIXED:
        y = 2 * (x - spec.low) / (spec.high - spec.low) - 1
    elif spec.mode == NORMAL:
        y = (x - np.asarray(stats["mean"], np.float64)) / (np.asarray(stats["std"], np.float64) + EPS)
    else:
        low_key, high_key = ("q01", "q99") if spec.mode == BOUNDS_Q99 else ("min", "max")
        low, high = np.asarray(stats[low_key], np.float64), np.asarray(stats[high_key], np.float64)
        y = 2 * (x - low) / (high - low + EPS) - 1
    y = np.where(mask, y, x)
    if spec.mode in (BOUNDS_Q99, BOUNDS):
        y = np.where(constant_dims(stats), 0.0, y)
    return y


def constant_dims(stats: Mapping[str, Any]) -> np.ndarray:
    """[D] bool: dims where ``min == max`` (the bounds modes normalize them to 0.0)."""
    return np.asarray(stats["min"], np.float64) == np.asarray(stats["max"], np.float64)


def round_trip_accumulator(batch: ActionBatch, spec: MetricsSpec) -> RoundTripAccumulator:
    """Data round-trip counts of one ``ActionBatch`` (module docstring, part 1)."""
    stats = spec.stats(batch.dataset_name)
    tok = spec.tokenizer
    D = spec.dim
    ids = np.asarray(batch.action_token_ids, np.int64).reshape(-1, D)  # [R*N, D]
    raw = np.asarray(batch.action_chunk, np.float32).reshape(-1, D)
    stored_norm = np.asarray(batch.normalized_action_chunk, np.float32).reshape(-1, D)

    decoded = tok.decode(ids)  # [R*N, D] float64, normalized space
    restored = unnormalize_actions(decoded, stats, spec.normalization, dtype=np.float64)
    error = np.abs(restored - raw.astype(np.float64))
    y = normalize_actions(raw, stats, spec.normalization)  # float32, as the shard writer computes it
    in_range = np.abs(unclipped_normalized(raw, stats, spec.normalization)) <= 1.0
    half_bin = np.abs(tok.compand(decoded) - tok.compand(np.clip(y, -1.0, 1.0))) <= 1.0 / (tok.n_bins - 1) + _TOLERANCE
    valid = tok.is_action_token(ids)
    top = ids == tok.min_token_id
    reencoded = tok.encode(decoded)
    checked = valid & ~top
    acc = RoundTripAccumulator.zeros(D)
    acc.rows = len(batch.action_token_ids)
    acc.values = np.full(D, ids.shape[0], dtype=np.int64)
    acc.error_sum = error.sum(axis=0)
    acc.error_max = error.max(axis=0, initial=0.0)
    acc.error_max_in_range = np.where(in_range, error, 0.0).max(axis=0, initial=0.0)
    acc.in_range = in_range.sum(axis=0)
    acc.in_range_within_half_bin = (in_range & half_bin).sum(axis=0)
    acc.saturated = (np.abs(y) >= 1.0).sum(axis=0)
    acc.encoding_matches = (tok.encode(y) == ids).sum(axis=0)
    acc.roundtrip_checked = checked.sum(axis=0)
    acc.roundtrip_ok = (checked & (reencoded == ids)).sum(axis=0)
    acc.top_bin = top.sum(axis=0)
    acc.top_bin_to_next = (top & (reencoded == ids + 1)).sum(axis=0)
    acc.invalid_ids = (~valid).sum(axis=0)
    acc.normalized_column_diff_max = np.abs(stored_norm.astype(np.float64) - y.astype(np.float64)).max(axis=0, initial=0.0)
    return acc


def model_accumulator(row: ShardRow, generation: Generation, spec: MetricsSpec) -> ModelAccumulator:
    """Model counts of one row (module docstring, part 2). Values are ``[N, D]`` chunk positions."""
    stats = spec.stats(row.dataset_name)
    tok = spec.tokenizer
    D = spec.dim
    stored = np.asarray(row.action_token_ids, np.int64).reshape(-1, D)
    generated = np.asarray(generation.token_ids, np.int64).reshape(stored.shape)
    raw = np.asarray(row.action_chunk, np.float64).reshape(stored.shape)
    stored_norm, generated_norm = tok.decode(stored), tok.decode(generated)
    stored_raw = unnormalize_actions(stored_norm, stats, spec.normalization, dtype=np.float64)
    generated_raw = unnormalize_actions(generated_norm, stats, spec.normalization, dtype=np.float64)
    acc = ModelAccumulator.zeros(D)
    acc.rows = 1
    acc.values = np.full(D, stored.shape[0], dtype=np.int64)
    acc.exact = (generated == stored).sum(axis=0)
    acc.within_one_bin = (np.abs(generated - stored) <= 1).sum(axis=0)
    acc.outside_action_range = (~tok.is_action_token(generated)).sum(axis=0)
    acc.l1_normalized_sum = np.abs(generated_norm - stored_norm).sum(axis=0)
    acc.l1_raw_sum = np.abs(generated_raw - stored_raw).sum(axis=0)
    acc.l1_raw_vs_action_sum = np.abs(generated_raw - raw).sum(axis=0)
    acc.seconds, acc.generate_seconds = generation.seconds, generation.generate_seconds
    acc.devices, acc.dtypes = (generation.device,), (generation.dtype,)
    return acc


class MergeAccumulatorsFn(beam.CombineFn):
    """Merges per-key accumulators (``RoundTripAccumulator`` or ``ModelAccumulator``); exact for counts,
    float64 sums for the error / L1 sums (merge order moves them by rounding only), exact maxima."""

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, element):
        return _merge(accumulator, element)

    def merge_accumulators(self, accumulators):
        out = None
        for acc in accumulators:
            out = _merge(out, acc)
        return out

    def extract_output(self, accumulator):
        return accumulator


def _merge(a, b):
    if a is None:
        return None if b is None else dataclasses.replace(b)  # copy: never mutate an input element
    return a.merge(b)


# --------------------------------------------------------------------------------------------------
# Model


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the handler needs to load and drive a model; cheap to pickle."""

    path: str
    num_new_tokens: int  # N*D
    action_token_min: int  # e.g. 31744
    action_token_max: int  # e.g. 31999
    device: str = "auto"  # auto | cpu | cuda (| cuda:K)
    trust_remote_code: bool = False
    batch_size: int = 8

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValidationError(f"expected --batch-size >= 1, got {self.batch_size}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValidationError(f"expected --device auto, cpu or cuda, got {self.device!r}")


CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _check_safetensors(path: str) -> None:
    """The file is as long as its header says: 8-byte header length, JSON header, then every tensor's bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else None
        if header_len is None or header_len > size - 8:
            raise ValidationError(
                f"expected a complete safetensors file at {path!r}, got {size} bytes, shorter than its header "
                "says (truncated); hint: download or copy the weights again"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValidationError(f"expected a safetensors header in {path!r}, got unreadable bytes ({e}); hint: download the weights again") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        raise ValidationError(
            f"expected {8 + header_len + end} bytes in {path!r} (its header's tensors), got {size} "
            f"({'truncated' if size < 8 + header_len + end else 'trailing bytes'}); hint: download or copy the weights again"
        )


def _check_weights_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValidationError(f"expected the weights file {path!r}, got no such file; hint: download or copy the checkpoint again")
    if path.endswith(".safetensors"):
        _check_safetensors(path)
    elif path.endswith(".bin"):
        import zipfile

        with open(path, "rb") as f:
            is_zip_start = f.read(4) == b"PK\x03\x04"
        if is_zip_start and not zipfile.is_zipfile(path):  # torch's zip format without its end: truncated
            raise ValidationError(f"expected a complete torch checkpoint at {path!r}, got a truncated zip archive; hint: download the weights again")


def check_model_dir(path: str, kind: str) -> None:
    """One ``ValidationError`` naming the file for a missing / truncated / unreadable part of the model directory.

    Weights: an index (``model.safetensors.index.json`` ...) and every shard it names, else
    ``model.safetensors`` / ``pytorch_model.bin``; a tokenizer file (``TOKENIZER_FILES``); an image
    processor config (``IMAGE_PROCESSOR_FILES``; OpenVLA: ``preprocessor_config.json``); for remote code,
    every ``*.py`` module its ``auto_map`` entries name.
    """
    config = _load_json(os.path.join(path, CONFIG_FILE), "a model config.json (a local Hugging Face checkpoint)")
    index = next((os.path.join(path, n) for n in WEIGHT_INDEX_FILES if os.path.exists(os.path.join(path, n))), None)
    if index is not None:
        weight_map = _load_json(index, "a weights index").get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ValidationError(f"expected a 'weight_map' of tensor -> file in {index!r}, got {type(weight_map).__name__}")
        for name in sorted(set(weight_map.values())):
            try:
                shard = confined(path, name, f"{index} weight_map")
            except ValueError as e:
                raise ValidationError(str(e)) from None
            _check_weights_file(shard)
    else:
        single = next((os.path.join(path, n) for n in WEIGHT_FILES if os.path.exists(os.path.join(path, n))), None)
        if single is None:
            raise ValidationError(
                f"expected model weights in {path!r} ({' or '.join(WEIGHT_FILES)}, or an index "
                f"{' / '.join(WEIGHT_INDEX_FILES)} with its shards), got none; hint: is the download complete?"
            )
        _check_weights_file(single)
    if not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES):
        raise ValidationError(
            f"expected a tokenizer in {path!r} (tokenizer.json or tokenizer.model beside tokenizer_config.json), "
            f"got none of {', '.join(TOKENIZER_FILES)}; hint: save the tokenizer with the model (save_pretrained)"
        )
    for name in ("tokenizer_config.json", "special_tokens_map.json", *IMAGE_PROCESSOR_FILES, "generation_config.json"):
        if os.path.exists(os.path.join(path, name)):
            _load_json(os.path.join(path, name), f"a {name}")
    from vlaprep.pipelines.openvla_model import IMAGE_PROCESSOR_CONFIG, is_openvla_config

    wanted = (IMAGE_PROCESSOR_CONFIG,) if is_openvla_config(config) else IMAGE_PROCESSOR_FILES
    if not any(os.path.exists(os.path.join(path, n)) for n in wanted):
        raise ValidationError(
            f"expected the image processor's config in {path!r} ({' or '.join(wanted)}), got none; "
            "hint: save the processor with the model (save_pretrained)"
        )
    if kind == REMOTE_CODE:
        maps = [config.get("auto_map") or {}]
        for name in IMAGE_PROCESSOR_FILES + ("tokenizer_config.json",):
            if os.path.exists(os.path.join(path, name)):
                maps.append(_load_json(os.path.join(path, name), f"a {name}").get("auto_map") or {})
        for auto_map in maps:
            for reference in auto_map.values():
                for ref in reference if isinstance(reference, list) else [reference]:
                    if isinstance(ref, str) and "--" not in ref and "." in ref:  # "repo--module.Class" would be the hub
                        module = os.path.join(path, ref.rsplit(".", 1)[0] + ".py")
                        if not os.path.exists(module):
                            raise ValidationError(
                                f"expected {os.path.basename(module)} in {path!r} (config auto_map names {ref!r}), "
                                "got no such file; hint: copy the checkpoint's *.py files with it"
                            )


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained`` keyword for the dtype: ``dtype=`` from transformers 4.56 on, ``torch_dtype=`` before."""
    import transformers
    from packaging.version import Version

    return {"dtype": dtype} if Version(transformers.__version__).release >= (4, 56) else {"torch_dtype": dtype}


def image_text_auto_class():
    """``AutoModelForImageTextToText`` (transformers >= 4.46 and 5.x), else ``AutoModelForVision2Seq``."""
    try:
        from transformers import AutoModelForImageTextToText as cls
    except ImportError:
        from transformers import AutoModelForVision2Seq as cls
    return cls


def is_openvla_dir(path: str) -> bool:
    from vlaprep.pipelines.openvla_model import is_openvla_config

    return is_openvla_config(_load_json(os.path.join(path, CONFIG_FILE), "a model config.json (a local Hugging Face checkpoint)"))


def model_kind(path: str, trust_remote_code: bool) -> tuple[str, str | None]:
    """``(NATIVE, None)`` or ``(REMOTE_CODE, "module.Class")`` from ``path/config.json``; refuses remote code
    without ``trust_remote_code`` (ValidationError, one line)."""
    config = _load_json(os.path.join(path, "config.json"), "a model config.json (a local Hugging Face checkpoint)")
    auto_map = config.get("auto_map") or {}
    reference = auto_map.get(REMOTE_AUTO_CLASS) or auto_map.get("AutoModelForImageTextToText")
    if reference is None:
        return NATIVE, None
    if not trust_remote_code:
        raise ValidationError(
            f"the model at {path} runs its own code (config.json auto_map[{REMOTE_AUTO_CLASS!r}] = "
            f"{reference!r}, an OpenVLA-style checkpoint); pass --trust-remote-code to load it "
            "(only for checkpoints you trust)"
        )
    return REMOTE_CODE, reference


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValidationError(f"expected a visible CUDA device for --device {device}, got none; hint: --device cpu")
    return device


def prompt_tail(tokenizer, instruction: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(drop, add)``: the inference prompt's ids end with ``drop``; replacing them by ``add`` gives the
    training prompt's ids (``prompt_prefix_ids``). Llama-2: ``((), (29871,))`` -- OpenVLA's append rule."""
    inference = list(tokenizer(openvla_inference_prompt(instruction), add_special_tokens=True).input_ids)
    training = prompt_prefix_ids(tokenizer, instruction)
    common = 0
    while common < min(len(inference), len(training)) and inference[common] == training[common]:
        common += 1
    return tuple(inference[common:]), tuple(training[common:])


class ActionTokenMask:
    """Logits processor: every logit outside ``[low, high]`` (the action ids) becomes -inf."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def __call__(self, input_ids, scores):
        scores[:, : self.low] = -math.inf  # in place: generate hands each step a fresh float32 copy
        scores[:, self.high + 1 :] = -math.inf
        return scores


@dataclasses.dataclass
class LoadedModel:
    model: Any
    processor: Any
    kind: str
    class_name: str
    device: str
    dtype: Any
    pad_id: int
    image_token: str | None
    tails: dict = dataclasses.field(default_factory=dict)
    forward_args: frozenset = frozenset()  # parameters model.forward names (per-token extras must be one)
    openvla: Any = None  # an openvla_model.OpenVLABackend for OpenVLA checkpoints (then model/processor are its)


class VlaModelHandler(ModelHandler[ShardRow, PredictionResult, LoadedModel]):
    """RunInference handler: ``ShardRow`` -> ``PredictionResult(example=ShardRow, inference=Generation)``.

    ``__init__`` only stores the ``ModelSpec``; ``load_model`` imports torch/transformers and loads the
    checkpoint on the worker; ``run_inference`` builds OpenVLA prompts and generates ``N*D`` action ids.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self._spec = spec

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return {"min_batch_size": self._spec.batch_size, "max_batch_size": self._spec.batch_size}

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def load_model(self) -> LoadedModel:
        import inspect

        import torch
        from transformers import AutoProcessor

        spec = self._spec
        kind, reference = model_kind(spec.path, spec.trust_remote_code)
        device = resolve_device(spec.device)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        if kind == REMOTE_CODE and is_openvla_dir(spec.path):
            from vlaprep.pipelines.openvla_model import load_openvla

            backend = load_openvla(spec.path, device, dtype)
            return LoadedModel(backend.model, backend.image_processor, kind, backend.class_name, device, dtype,
                               backend.pad_id, None, openvla=backend)
        common = dict(local_files_only=True, trust_remote_code=spec.trust_remote_code)
        if kind == REMOTE_CODE:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            cls = get_class_from_dynamic_module(reference, spec.path, local_files_only=True)
        else:
            cls = image_text_auto_class()
        model = cls.from_pretrained(spec.path, **dtype_kwargs(dtype), **common)
        model = model.to(device).eval()
        processor = AutoProcessor.from_pretrained(spec.path, **common)
        tokenizer = getattr(processor, "tokenizer", processor)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        image_token = getattr(processor, "image_token", None)  # LLaVA-style processors
        forward_args = frozenset(inspect.signature(model.forward).parameters)
        return LoadedModel(model, processor, kind, type(model).__name__, device, dtype, int(pad_id), image_token,
                           forward_args=forward_args)

    def _encode(self, loaded: LoadedModel, row: ShardRow) -> dict:
        from PIL import Image

        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        prompt = openvla_inference_prompt(row.instruction)
        text = (loaded.image_token or "") + prompt
        image = Image.open(io.BytesIO(row.image_primary)).convert("RGB")
        encoded = dict(loaded.processor(text=text, images=image, return_tensors="pt"))
        ids = encoded["input_ids"][0].tolist()
        if row.instruction not in loaded.tails:
            loaded.tails[row.instruction] = prompt_tail(tokenizer, row.instruction)
        drop, add = loaded.tails[row.instruction]
        if drop and tuple(ids[-len(drop):]) != drop:
            beam.metrics.Metrics.counter(METRICS_NAMESPACE, "prompt_tail_mismatch").inc()
            drop = ()
        length = len(ids)
        ids = ids[: length - len(drop)] + list(add)
        encoded["input_ids"] = ids
        encoded["attention_mask"] = [1] * len(ids)
        for key, value in list(encoded.items()):  # other per-token tensors: cut / extend like the ids
            if key not in ("input_ids", "attention_mask") and hasattr(value, "shape") and value.ndim == 2 and value.shape[1] == length:
                if key not in loaded.forward_args:  # e.g. token_type_ids of a plain tokenizer: 4.x generate rejects it
                    del encoded[key]
                    continue
                kept = value[0].tolist()[: length - len(drop)]
                encoded[key] = kept + [0] * len(add)
        return encoded

    def _collate(self, loaded: LoadedModel, encoded: Sequence[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in encoded)
        batch = {}
        for key in encoded[0]:
            values = [e[key] for e in encoded]
            if isinstance(values[0], list):  # per-token: left-pad
                fill = loaded.pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([[fill] * (width - len(v)) + v for v in values], dtype=torch.long)
            elif hasattr(values[0], "shape"):
                batch[key] = torch.cat(values, dim=0)
        for key, value in batch.items():
            value = value.to(loaded.device)
            batch[key] = value.to(loaded.dtype) if value.is_floating_point() else value
        return batch

    def _run_processor_model(self, batch: Sequence[ShardRow], model: LoadedModel) -> tuple[list[np.ndarray], float]:
        """Native (and other remote-code) models: processor per row, collate, ``model.generate``."""
        encoded = [self._encode(model, row) for row in batch]
        if model.kind == REMOTE_CODE:  # unknown code may not support padding: equal-length sub-batches
            groups: dict[int, list[int]] = {}
            for i, e in enumerate(encoded):
                groups.setdefault(len(e["input_ids"]), []).append(i)
            index_groups = list(groups.values())
        else:
            index_groups = [list(range(len(batch)))]
        generated: list[np.ndarray | None] = [None] * len(batch)
        generate_seconds = 0.0
        for indices in index_groups:
            inputs = self._collate(model, [encoded[i] for i in indices])
            t0 = time.perf_counter()
            ids = self._generate(model, inputs)
            generate_seconds += time.perf_counter() - t0
            for j, i in enumerate(indices):
                generated[i] = ids[j]
        return generated, generate_seconds

    def _generate(self, loaded: LoadedModel, batch: dict) -> np.ndarray:
        import torch
        from transformers import LogitsProcessorList

        spec = self._spec
        with torch.inference_mode():
            out = loaded.model.generate(
                **batch,
                max_new_tokens=spec.num_new_tokens,
                do_sample=False,
                num_beams=1,
                logits_processor=LogitsProcessorList([ActionTokenMask(spec.action_token_min, spec.action_token_max)]),
                pad_token_id=loaded.pad_id,
            )
        return out[:, -spec.num_new_tokens :].cpu().numpy().astype(np.int64)

    def _run_openvla(self, batch: Sequence[ShardRow], model: LoadedModel) -> tuple[list[np.ndarray], float]:
        """OpenVLA: the whole batch in one language-model ``generate`` (openvla_model.OpenVLABackend)."""
        from transformers import LogitsProcessorList

        spec = self._spec
        encoded = [model.openvla.encode(row.instruction, row.image_primary) for row in batch]
        t0 = time.perf_counter()
        ids = model.openvla.generate(
            encoded, spec.num_new_tokens,
            LogitsProcessorList([ActionTokenMask(spec.action_token_min, spec.action_token_max)]),
        )
        return list(ids), time.perf_counter() - t0

    def run_inference(self, batch: Sequence[ShardRow], model: LoadedModel, inference_args=None):
        started = time.perf_counter()
        if model.openvla is not None:
            generated, generate_seconds = self._run_openvla(batch, model)
        else:
            generated, generate_seconds = self._run_processor_model(batch, model)
        seconds = time.perf_counter() - started
        n = len(batch)
        outside = sum(int((~((g >= self._spec.action_token_min) & (g <= self._spec.action_token_max))).sum()) for g in generated)
        if outside:
            beam.metrics.Metrics.counter(METRICS_NAMESPACE, "generated_outside_action_range").inc(outside)
        beam.metrics.Metrics.counter(METRICS_NAMESPACE, "model_samples").inc(n)
        dtype = str(model.dtype).replace("torch.", "")
        for row, ids in zip(batch, generated):
            yield PredictionResult(row, Generation(ids, seconds / n, generate_seconds / n, model.device, dtype), self._spec.path)


# --------------------------------------------------------------------------------------------------
# PTransforms


def _prediction_record(result: PredictionResult) -> dict:
    row, generation = result.example, result.inference
    return {
        "dataset_name": row.dataset_name,
        "episode_id": row.episode_id,
        "step_index": row.step_index,
        "action_token_ids": [int(i) for i in row.action_token_ids],
        "generated_token_ids": [int(i) for i in generation.token_ids],
    }


class RoundTripMetrics(beam.PTransform):
    """PCollection[ActionBatch] -> PCollection[tuple[str, RoundTripAccumulator]] (one per dataset)."""

    def __init__(self, spec: MetricsSpec):
        super().__init__()
        self._spec = spec

    def expand(self, batches):
        spec = self._spec
        return (
            batches
            | "Accumulate" >> beam.Map(lambda b: (b.dataset_name, round_trip_accumulator(b, spec)))
            | "MergePerDataset" >> beam.CombinePerKey(MergeAccumulatorsFn())
        )


class ModelMetrics(beam.PTransform):
    """PCollection[PredictionResult(ShardRow, Generation)] -> PCollection[tuple[str, ModelAccumulator]]."""

    def __init__(self, spec: MetricsSpec):
        super().__init__()
        self._spec = spec

    def expand(self, predictions):
        spec = self._spec
        return (
            predictions
            | "Accumulate" >> beam.Map(lambda r: (r.example.dataset_name, model_accumulator(r.example, r.inference, spec)))
            | "MergePerDataset" >> beam.CombinePerKey(MergeAccumulatorsFn())
        )


class ValidateShards(beam.PTransform):
    """PBegin -> dict of PCollections:

      "round_trip":  tuple[str, RoundTripAccumulator]   per dataset, over every row of the split
      "model":       tuple[str, ModelAccumulator]       per dataset, over the sampled rows
      "predictions": dict                                one per sampled row (``_prediction_record``)

    Reads the split's Parquet files of ``layout`` twice: the action columns of every row
    (``ActionBatch``) and the rows ``sample_indices(rows, max_samples)`` in full (``ShardRow``), which go
    through ``RunInference(VlaModelHandler(model))``.
    """

    def __init__(self, layout: ValidationLayout, model: ModelSpec, max_samples: int | None = None):
        super().__init__()
        self._layout, self._model, self._max_samples = layout, model, max_samples

    def expand(self, pbegin):
        layout, width = self._layout, self._layout.action_chunk * self._layout.action_dim
        spec = layout.metrics_spec()
        all_files = [ReadTask(os.path.join(layout.root, path)) for path, _ in layout.files]
        round_trip = (
            pbegin
            | "ActionFiles" >> beam.Create(all_files)
            | "ReshuffleActionFiles" >> beam.Reshuffle()
            | "ReadActions" >> beam.FlatMap(read_action_batches, width)
            | "RoundTrip" >> RoundTripMetrics(spec)
        )
        predictions = (
            pbegin
            | "SampleTasks" >> beam.Create(model_read_tasks(layout, self._max_samples))
            | "ReadRows" >> beam.FlatMap(read_shard_rows, width)
            | "Generate" >> RunInference(VlaModelHandler(self._model))
        )
        return {
            "round_trip": round_trip,
            "model": predictions | "Model" >> ModelMetrics(spec),
            "predictions": predictions | "PredictionRecords" >> beam.Map(_prediction_record),
        }


# --------------------------------------------------------------------------------------------------
# Report


def _ratio(num, den):
    return float(num) / float(den) if den else None


def round_trip_summary(acc: RoundTripAccumulator, stats: Mapping[str, Any] | None = None) -> dict:
    """Report block: totals over dims, then ``per_dim`` (with the dim's mask / constant flags when ``stats``)."""

    def block(s):  # s: index or slice over dims
        values = acc.values[s].sum()
        return {
            "values": int(values),
            "raw_abs_error_max": float(acc.error_max[s].max(initial=0.0)),
            "raw_abs_error_mean": _ratio(acc.error_sum[s].sum(), values),
            "raw_abs_error_max_in_range": float(acc.error_max_in_range[s].max(initial=0.0)),
            "in_range_fraction": _ratio(acc.in_range[s].sum(), values),
            "in_range_within_half_bin": _ratio(acc.in_range_within_half_bin[s].sum(), acc.in_range[s].sum()),
            "saturated_fraction": _ratio(acc.saturated[s].sum(), values),
            "token_matches_encoding": _ratio(acc.encoding_matches[s].sum(), values),
            "token_roundtrip_accuracy": _ratio(acc.roundtrip_ok[s].sum(), acc.roundtrip_checked[s].sum()),
            "top_bin_values": int(acc.top_bin[s].sum()),
            "top_bin_roundtrip_to_next": int(acc.top_bin_to_next[s].sum()),
            "invalid_token_ids": int(acc.invalid_ids[s].sum()),
            "normalized_column_max_abs_diff": float(acc.normalized_column_diff_max[s].max(initial=0.0)),
        }

    out = {"rows": int(acc.rows), **block(slice(None)), "per_dim": []}
    mask = normalization_mask(stats) if stats is not None else None
    constant = constant_dims(stats) if stats is not None else None
    for d in range(len(acc.values)):
        entry = {"dim": d}
        if stats is not None:
            entry.update(normalized=bool(mask[d]), constant=bool(constant[d]))
        entry.update(block(slice(d, d + 1)))
        out["per_dim"].append(entry)
    return out


def model_summary(acc: ModelAccumulator) -> dict:
    def block(s):
        values = acc.values[s].sum()
        return {
            "values": int(values),
            "exact_accuracy": _ratio(acc.exact[s].sum(), values),
            "within_one_bin_accuracy": _ratio(acc.within_one_bin[s].sum(), values),
            "l1_normalized": _ratio(acc.l1_normalized_sum[s].sum(), values),
            "l1_raw": _ratio(acc.l1_raw_sum[s].sum(), values),
            "l1_raw_vs_action": _ratio(acc.l1_raw_vs_action_sum[s].sum(), values),
            "outside_action_range": int(acc.outside_action_range[s].sum()),
        }

    out = {"samples": int(acc.rows), **block(slice(None)), "per_dim": []}
    for d in range(len(acc.values)):
        out["per_dim"].append({"dim": d, **block(slice(d, d + 1))})
    return out


def build_report(
    layout: ValidationLayout,
    model: ModelSpec,
    round_trip: Mapping[str, RoundTripAccumulator],
    model_metrics: Mapping[str, ModelAccumulator],
    *,
    model_kind_name: str,
    max_samples: int | None,
    wall_seconds: float,
) -> dict:
    """The ``validation_report.json`` document (schemas/validation_report.schema.json)."""
    spec = layout.metrics_spec()
    rt_total = RoundTripAccumulator.zeros(layout.action_dim)
    for name in sorted(round_trip):
        rt_total.merge(round_trip[name])
    m_total = ModelAccumulator.zeros(layout.action_dim)
    for name in sorted(model_metrics):
        m_total.merge(model_metrics[name])
    tok = layout.tokenizer
    return {
        "format": REPORT_FORMAT,
        "shards": layout.root,
        "split": layout.split,
        "manifest": {
            "action_chunk": layout.action_chunk,
            "action_dim": layout.action_dim,
            "normalization": layout.normalization,
            "action_encoding": layout.action_encoding,
            "vocab_size": layout.vocab_size,
            "n_bins": layout.n_bins,
            "action_token_ids": [tok.min_token_id, tok.max_token_id],
            "statistics": layout.statistics_source,
            "statistics_fingerprint": layout.statistics_fingerprint,
            "files": len(layout.files),
            "rows": layout.rows,
            "dataset_rows": dict(layout.dataset_rows),
        },
        "round_trip": {
            "overall": round_trip_summary(rt_total),
            "datasets": {name: round_trip_summary(round_trip[name], spec.statistics[name]) for name in sorted(round_trip)},
        },
        "model": {
            "path": model.path,
            "kind": model_kind_name,
            "device": ",".join(m_total.devices) or None,
            "dtype": ",".join(m_total.dtypes) or None,
            "batch_size": model.batch_size,
            "max_samples": max_samples,
            "samples": int(m_total.rows),
            "new_tokens_per_sample": model.num_new_tokens,
            "seconds": m_total.seconds,
            "generate_seconds": m_total.generate_seconds,
            "samples_per_second": _ratio(m_total.rows, m_total.seconds),
            "chance_exact_accuracy": 1.0 / layout.n_bins,
            "overall": model_summary(m_total),
            "datasets": {name: model_summary(model_metrics[name]) for name in sorted(model_metrics)},
        },
        "wall_seconds": wall_seconds,
    }
