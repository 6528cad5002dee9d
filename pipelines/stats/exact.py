"""Exact, mergeable, bounded-memory statistics of float32 matrices (pure NumPy; the CombineFns in
``stats/beam.py`` only adapt these).

Everything is exact and independent of how the rows are split into bundles or merged:

* **mean / std** from exact sums. Every float32 is ``m * 2**k`` with an integer ``|m| < 2**24``. Rows
  are buffered; on compaction, per (dim, k) the ``m`` and the two 24-bit halves of ``m**2`` are summed
  with ``np.bincount`` in float64, exact because each partial sum stays below ``2**53`` (at most
  ``2**29`` values per call), and folded into Python integers scaled by ``2**172`` (``2**344`` for the
  squares). Mean and population std (ddof 0) are then the correctly rounded float64 of the rational
  results — order-independent, so the JSON is byte-identical on any runner.
* **min / max** exact float32.
* **q01 / q99** under NumPy 1.x's rule (what OpenVLA ran; see ``numpy1_quantile``), by exact radix
  selection in two passes over the data:
    1. ``MomentsAccumulator`` also counts values per 16-bit prefix of the order-preserving 32-bit key
       of each float32 (<= 65,536 counters per dim, however large the dataset);
    2. ``plan_order_statistics`` finds which prefixes hold the ranks the rule needs
       (``floor((n-1)q)`` and the next), and ``SelectionAccumulator`` counts the full 32-bit keys
       inside those prefixes only (<= 65,536 counters per wanted rank).
  The k-th smallest value is then read off exactly. Memory per worker is bounded by those counters and
  the compaction buffer, independent of the number of steps.

``-0.0`` is canonicalized to ``+0.0`` (NumPy's sort treats them as equal; canonical keys keep the result
deterministic). NaN/inf never reach here: episodes holding them are quarantined upstream.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction

import numpy as np

_K_OFFSET = 172  # float32 = m * 2**k with k in [-172, 104]; k + 172 indexes bins 0..276
_K_BINS = 277
_COMPACT_ROWS = 1 << 16  # rows buffered before folding into counters (bounds memory)
PREFIX_BITS = 16
_LOW_MASK = (1 << (32 - PREFIX_BITS)) - 1


def canonical_float32(x: np.ndarray) -> np.ndarray:
    """float32 copy with -0.0 turned into +0.0 (IEEE: -0.0 + 0.0 == +0.0)."""
    return np.asarray(x, dtype=np.float32) + np.float32(0.0)


def order_keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values: ``a < b`` iff ``key(a) < key(b)`` (no NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def keys_to_float32(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.uint32)
    positive = (keys >> np.uint32(31)).astype(bool)
    bits = np.where(positive, keys & np.uint32(0x7FFFFFFF), ~keys)
    return bits.astype(np.uint32).view(np.float32)


def numpy1_quantile(sorted_column: np.ndarray, q: float) -> float:
    """NumPy 1.x ``np.quantile(x, q)`` (linear) on a sorted float32 column, as OpenVLA computed it.

    ``h = (n-1) q``; ``lo = floor(h)``; ``hi = min(lo+1, n-1)``; ``g = h - lo``;
    ``d = float32(s[hi] - s[lo])`` (difference in float32); the result is float64:
    ``s[hi] - d (1-g)`` if ``g >= 0.5`` else ``s[lo] + d g``.
    """
    n = len(sorted_column)
    lo, hi, g = quantile_ranks(n, q)
    return _lerp_rule(sorted_column[lo], sorted_column[hi], g)


def quantile_ranks(n: int, q: float) -> tuple[int, int, float]:
    if n <= 0:
        raise ValueError(f"expected at least one value for quantile {q}, got n={n}")
    h = float(n - 1) * float(q)
    lo = int(math.floor(h))
    hi = min(lo + 1, n - 1)
    return lo, hi, h - lo


def _lerp_rule(s_lo, s_hi, g: float) -> float:
    s_lo = np.float32(s_lo)
    s_hi = np.float32(s_hi)
    d = np.float64(np.float32(s_hi - s_lo))
    if g >= 0.5:
        return float(np.float64(s_hi) - d * (1.0 - g))
    return float(np.float64(s_lo) + d * g)


def _decompose(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N] -> (m int64, k + 172 int64) with x == m * 2**k exactly."""
    f, e = np.frexp(x.astype(np.float64))
    m = np.ldexp(f, 24).astype(np.int64)
    return m, (e.astype(np.int64) - 24 + _K_OFFSET)


def _sparse_add(keys_a, counts_a, keys_b, counts_b):
    if len(keys_a) == 0:
        return keys_b, counts_b
    if len(keys_b) == 0:
        return keys_a, counts_a
    keys = np.concatenate([keys_a, keys_b])
    counts = np.concatenate([counts_a, counts_b])
    uniq, inverse = np.unique(keys, return_inverse=True)
    summed = np.zeros(len(uniq), np.int64)
    np.add.at(summed, inverse, counts)
    return uniq, summed


def _sparse_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq, counts.astype(np.int64)


@dataclasses.dataclass
class MomentsAccumulator:
    """Pass 1 over a ``[N, D]`` float32 matrix: count, exact sums, min, max, 16-bit-prefix histogram."""

    dim: int
    count: int = 0
    sum_m: list = None  # per dim: exact sum scaled by 2**172 (Python int)
    sum_m2: list = None  # per dim: exact sum of squares scaled by 2**344 (Python int)
    minimum: np.ndarray = None  # [D] float32
    maximum: np.ndarray = None  # [D] float32
    prefix_keys: list = None  # per dim: sorted uint32 prefixes
    prefix_counts: list = None  # per dim: int64 counts
    buffer: list = None  # pending [n_i, D] float32 blocks
    buffered_rows: int = 0

    def __post_init__(self):
        d = self.dim
        self.sum_m = self.sum_m if self.sum_m is not None else [0] * d
        self.sum_m2 = self.sum_m2 if self.sum_m2 is not None else [0] * d
        if self.minimum is None:
            self.minimum = np.full(d, np.inf, np.float32)
            self.maximum = np.full(d, -np.inf, np.float32)
        if self.prefix_keys is None:
            self.prefix_keys = [np.zeros(0, np.uint32) for _ in range(d)]
            self.prefix_counts = [np.zeros(0, np.int64) for _ in range(d)]
        self.buffer = self.buffer if self.buffer is not None else []

    def add(self, rows: np.ndarray) -> "MomentsAccumulator":
        rows = canonical_float32(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape [N, {self.dim}], got {rows.shape!r}")
        if rows.shape[0] == 0:
            return self
        self.buffer.append(rows)
        self.buffered_rows += rows.shape[0]
        if self.buffered_rows >= _COMPACT_ROWS:
            self.compact()
        return self

    def compact(self) -> "MomentsAccumulator":
        if not self.buffer:
            return self
        block = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        self.buffer = []
        self.buffered_rows = 0
        self.count += block.shape[0]
        self.minimum = np.minimum(self.minimum, block.min(axis=0))
        self.maximum = np.maximum(self.maximum, block.max(axis=0))
        for j in range(self.dim):
            column = block[:, j]
            m, kidx = _decompose(column)
            # Each bincount partial sum is below 2**24 * 2**16 < 2**53: exact in float64.
            s1 = np.bincount(kidx, weights=m.astype(np.float64), minlength=_K_BINS)
            m2 = m * m  # < 2**48, exact in int64
            hi = np.bincount(kidx, weights=(m2 >> 24).astype(np.float64), minlength=_K_BINS)
            lo = np.bincount(kidx, weights=(m2 & 0xFFFFFF).astype(np.float64), minlength=_K_BINS)
            total1 = self.sum_m[j]
            total2 = self.sum_m2[j]
            for b in np.flatnonzero((s1 != 0) | (hi != 0) | (lo != 0)):
                b = int(b)
                total1 += int(s1[b]) << b
                total2 += ((int(hi[b]) << 24) + int(lo[b])) << (2 * b)
            self.sum_m[j] = total1
            self.sum_m2[j] = total2
            prefixes = order_keys(column) >> np.uint32(32 - PREFIX_BITS)
            keys, counts = _sparse_counts(prefixes)
            self.prefix_keys[j], self.prefix_counts[j] = _sparse_add(self.prefix_keys[j], self.prefix_counts[j], keys, counts)
        return self

    def merge(self, other: "MomentsAccumulator") -> "MomentsAccumulator":
        """Fold ``other`` into ``self`` (Beam lets a merge mutate its first accumulator)."""
        if other.dim != self.dim:
            raise ValueError(f"expected accumulators of width {self.dim}, got {other.dim}")
        other.compact()
        self.compact()
        self.count += other.count
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)
        for j in range(self.dim):
            self.sum_m[j] += other.sum_m[j]
            self.sum_m2[j] += other.sum_m2[j]
            self.prefix_keys[j], self.prefix_counts[j] = _sparse_add(
                self.prefix_keys[j], self.prefix_counts[j], other.prefix_keys[j], other.prefix_counts[j]
            )
        return self

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Correctly rounded float64 of the exact mean and population std, per dim."""
        self.compact()
        n = self.count
        means, stds = [], []
        for j in range(self.dim):
            s1 = Fraction(self.sum_m[j], 1 << _K_OFFSET)
            s2 = Fraction(self.sum_m2[j], 1 << (2 * _K_OFFSET))
            mean = s1 / n
            var = s2 / n - mean * mean  # exact rational, >= 0
            means.append(float(mean))
            stds.append(_sqrt_fraction(var))
        return means, stds


def _sqrt_fraction(value: Fraction) -> float:
    """float64 of sqrt(value) for an exact non-negative rational (error far below 1 ulp)."""
    if value <= 0:
        return 0.0
    num, den = value.numerator, value.denominator
    # sqrt(num/den) = sqrt(num*den)/den; scale by 2**(2p) to keep >= 64 significant bits.
    p = max(0, 64 - (num * den).bit_length() // 2 + den.bit_length())
    root = math.isqrt((num * den) << (2 * p))
    return float(Fraction(root, den << p))


@dataclasses.dataclass(frozen=True)
class OrderStatisticPlan:
    """Which order statistics pass 2 must find: for each dim, the wanted ranks and their 16-bit prefixes.

    ``wanted[j]`` is a tuple of (rank, prefix, rank of the first value with that prefix).
    """

    count: int
    quantiles: tuple[float, ...]
    wanted: tuple[tuple[tuple[int, int, int], ...], ...]
    minimum: tuple[float, ...] = ()  # per dim, for the display histogram's range
    maximum: tuple[float, ...] = ()

    @functools.cached_property
    def prefix_table(self) -> np.ndarray:
        """[D, W] uint32 wanted prefixes per dim (rows padded by repeating their first entry)."""
        rows = [sorted({p for _, p, _ in entries}) for entries in self.wanted]
        width = max(len(r) for r in rows)
        return np.array([r + [r[0]] * (width - len(r)) for r in rows], dtype=np.uint32)


def plan_order_statistics(acc: MomentsAccumulator, quantiles=(0.01, 0.99)) -> OrderStatisticPlan:
    acc.compact()
    n = acc.count
    wanted = []
    for j in range(acc.dim):
        cumulative = np.cumsum(acc.prefix_counts[j])
        ranks = sorted({r for q in quantiles for r in quantile_ranks(n, q)[:2]})
        entries = []
        for rank in ranks:
            pos = int(np.searchsorted(cumulative, rank, side="right"))
            first = int(cumulative[pos - 1]) if pos > 0 else 0
            entries.append((rank, int(acc.prefix_keys[j][pos]), first))
        wanted.append(tuple(entries))
    return OrderStatisticPlan(
        count=n,
        quantiles=tuple(quantiles),
        wanted=tuple(wanted),
        minimum=tuple(float(v) for v in acc.minimum),
        maximum=tuple(float(v) for v in acc.maximum),
    )


HISTOGRAM_BINS = 64


def histogram_bins(rows: np.ndarray, plan: OrderStatisticPlan) -> np.ndarray:
    """[N, D] -> [D, HISTOGRAM_BINS] int64 counts of equal-width bins over each dim's [min, max]."""
    lo = np.asarray(plan.minimum, np.float64)
    span = np.asarray(plan.maximum, np.float64) - lo
    scaled = (rows.astype(np.float64) - lo) / np.where(span > 0, span, 1.0) * HISTOGRAM_BINS
    index = np.clip(np.floor(scaled).astype(np.int64), 0, HISTOGRAM_BINS - 1)  # [N, D]
    flat = index + np.arange(rows.shape[1])[None, :] * HISTOGRAM_BINS
    return np.bincount(flat.reshape(-1), minlength=rows.shape[1] * HISTOGRAM_BINS).reshape(rows.shape[1], HISTOGRAM_BINS)


@dataclasses.dataclass
class SelectionAccumulator:
    """Pass 2: exact counts of the full 32-bit keys whose prefix the plan wants, per dim."""

    dim: int
    keys: list = None  # per dim: sorted unique uint32 keys
    counts: list = None  # per dim: int64 counts
    pending: list = None  # per dim: list of unsorted selected keys awaiting compaction
    pending_count: int = 0
    histogram: np.ndarray = None  # [D, HISTOGRAM_BINS] int64, for people to check normalization by eye

    def __post_init__(self):
        if self.keys is None:
            self.keys = [np.zeros(0, np.uint32) for _ in range(self.dim)]
            self.counts = [np.zeros(0, np.int64) for _ in range(self.dim)]
        if self.pending is None:
            self.pending = [[] for _ in range(self.dim)]
        if self.histogram is None:
            self.histogram = np.zeros((self.dim, HISTOGRAM_BINS), np.int64)

    def add(self, rows: np.ndarray, plan: OrderStatisticPlan) -> "SelectionAccumulator":
        rows = canonical_float32(rows)
        if plan.minimum:
            self.histogram += histogram_bins(rows, plan)
        keys = order_keys(rows)  # [N, D]
        table = plan.prefix_table  # [D, W]
        hit = ((keys >> np.uint32(32 - PREFIX_BITS))[:, :, None] == table[None, :, :]).any(axis=2)  # [N, D]
        for j in np.flatnonzero(hit.any(axis=0)):
            selected = keys[hit[:, j], j]
            self.pending[j].append(selected)
            self.pending_count += len(selected)
        if self.pending_count >= _COMPACT_ROWS:
            self.compact()
        return self

    def compact(self) -> "SelectionAccumulator":
        for j in range(self.dim):
            if self.pending[j]:
                k, c = _sparse_counts(np.concatenate(self.pending[j]))
                self.keys[j], self.counts[j] = _sparse_add(self.keys[j], self.counts[j], k, c)
                self.pending[j] = []
        self.pending_count = 0
        return self

    def merge(self, other: "SelectionAccumulator") -> "SelectionAccumulator":
        """Fold ``other`` into ``self`` (Beam lets a merge mutate its first accumulator)."""
        self.compact()
        other.compact()
        for j in range(self.dim):
            self.keys[j], self.counts[j] = _sparse_add(self.keys[j], self.counts[j], other.keys[j], other.counts[j])
        self.histogram = self.histogram + other.histogram
        return self

    def order_statistic(self, j: int, rank: int, prefix: int, first_rank: int) -> np.float32:
        self.compact()
        inside = (self.keys[j] >> np.uint32(32 - PREFIX_BITS)) == np.uint32(prefix)
        keys = self.keys[j][inside]
        cumulative = np.cumsum(self.counts[j][inside])
        pos = int(np.searchsorted(cumulative, rank - first_rank, side="right"))
        if pos >= len(keys):
            raise RuntimeError(
                f"expected rank {rank} inside prefix {prefix:#x} of dim {j}, got only {int(cumulative[-1]) if len(cumulative) else 0} "
                "values there; the two passes saw different data"
            )
        return keys_to_float32(keys[pos : pos + 1])[0]

    def quantiles(self, plan: OrderStatisticPlan) -> dict[float, list[float]]:
        out = {}
        for q in plan.quantiles:
            lo, hi, g = quantile_ranks(plan.count, q)
            values = []
            for j in range(self.dim):
                by_rank = {rank: (prefix, first) for rank, prefix, first in plan.wanted[j]}
                s_lo = self.order_statistic(j, lo, *by_rank[lo])
                s_hi = self.order_statistic(j, hi, *by_rank[hi])
                values.append(_lerp_rule(s_lo, s_hi, g))
            out[q] = values
        return out
