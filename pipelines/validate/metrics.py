"""Validation metrics: per-dataset accumulators over NumPy arrays, their summaries and the report.

Pure NumPy: imports neither Beam nor torch (``beam.py`` wraps these functions, ``job.py`` writes the report).

1. **Data round trip** (every row of the split, action columns only; ``round_trip_accumulator``). Per stored
   value (``[rows*N, D]``, every position of the chunk including the padded steps past an episode's end,
   which are stored and trained on like the rest):

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

2. **Model** (the sampled rows; ``model_accumulator``). The ``N*D`` generated ids of a row (``Generation``)
   compared with the stored ``action_token_ids``: exact and within-one-bin accuracy, L1 in normalized
   units, in raw units against the stored tokens and against the raw ``action_chunk``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from vlaprep.pipelines.validate.layout import ValidationError, ValidationLayout
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

if TYPE_CHECKING:  # element types and the model's spec, for annotations only (model.py imports Beam)
    from vlaprep.pipelines.validate.model import ModelSpec
    from vlaprep.pipelines.validate.read import ActionBatch, ShardRow

REPORT_FORMAT = "vlaprep.validation_report/1"
_TOLERANCE = 1e-9  # on the half-bin test: the bound is exact up to float64 rounding of edges and centers


@dataclasses.dataclass(frozen=True)
class Generation:
    """What ``VlaModelHandler`` predicts for one row: ``token_ids`` [N*D] int64 and its share of the batch time."""

    token_ids: np.ndarray
    seconds: float
    generate_seconds: float
    device: str
    dtype: str


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

    @classmethod
    def from_layout(cls, layout: ValidationLayout) -> MetricsSpec:
        """The ``action`` statistics of every dataset in the split, with the manifest's options."""
        return cls(
            statistics={name: layout.statistics[name]["action"] for name in layout.dataset_rows},
            normalization=layout.normalization,
            action_encoding=layout.action_encoding,
            vocab_size=layout.vocab_size,
            n_bins=layout.n_bins,
            chunk=layout.action_chunk,
            dim=layout.action_dim,
        )

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
    """The report document (schemas/validation_report.schema.json); ``job.py`` writes it as ``layout.VALIDATION_REPORT_FILE``."""
    spec = MetricsSpec.from_layout(layout)
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
