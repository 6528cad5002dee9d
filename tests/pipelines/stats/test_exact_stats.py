"""Exactness of the mergeable statistics against independent references (NumPy-1.x rule, rationals)."""

from fractions import Fraction

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that

from vlaprep.pipelines.stats.exact import (
    MomentsAccumulator,
    SelectionAccumulator,
    keys_to_float32,
    order_keys,
    plan_order_statistics,
)
from vlaprep.pipelines.stats.beam import MergeExactAccumulatorsCombineFn


def reference_quantile(column: np.ndarray, q: float) -> float:
    """Written from openvla.md §1 independently of the implementation under test."""
    s = np.sort(column.astype(np.float32))
    n = len(s)
    h = (n - 1) * q
    lo = int(np.floor(h))
    hi = min(lo + 1, n - 1)
    g = h - lo
    d = np.float64(np.float32(s[hi] - s[lo]))
    if g >= 0.5:
        return float(np.float64(s[hi]) - d * (1 - g))
    return float(np.float64(s[lo]) + d * g)


def reference_mean_std(column: np.ndarray) -> tuple[Fraction, Fraction]:
    values = [Fraction(float(v)) for v in column]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return mean, var


def exact_statistics(shards: list[np.ndarray], dim: int):
    """Run both passes by hand over the given sharding (as Beam would over bundles)."""
    partial = []
    for shard in shards:
        acc = MomentsAccumulator(dim)
        acc.add(shard)
        partial.append(acc)
    moments = partial[0]
    for acc in partial[1:]:
        moments = moments.merge(acc)
    plan = plan_order_statistics(moments)
    selections = [SelectionAccumulator(dim).add(shard, plan) for shard in shards]
    selection = selections[0]
    for s in selections[1:]:
        selection = selection.merge(s)
    return moments, selection.quantiles(plan)


def _datasets():
    rng = np.random.default_rng(7)
    heavy = (rng.standard_t(1.5, size=(5000, 3)) * 0.02).astype(np.float32)
    ties = np.round(rng.normal(size=(3000, 3)) * 4).astype(np.float32) / 4
    constant = np.tile(np.array([[0.5, -0.0, 1.0]], np.float32), (257, 1))
    tiny = rng.normal(size=(2, 3)).astype(np.float32)
    single = rng.normal(size=(1, 3)).astype(np.float32)
    extreme = np.array([[3.4e38, -1e-45, 1e-30], [-3.4e38, 1e-45, -1e-30], [0.0, 0.0, 2.0]], np.float32)
    return {"heavy": heavy, "ties": ties, "constant": constant, "tiny": tiny, "single": single, "extreme": extreme}


@pytest.mark.parametrize("name", sorted(_datasets()))
@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_exact_against_reference_for_any_sharding(name, num_shards):
    data = _datasets()[name]
    rng = np.random.default_rng(num_shards)
    order = rng.permutation(len(data))
    shards = np.array_split(data[order], num_shards)
    shards.append(np.zeros((0, 3), np.float32))  # an empty shard must not change anything
    moments, quantiles = exact_statistics(shards, 3)
    assert moments.count == len(data)
    for j in range(3):
        assert quantiles[0.01][j] == reference_quantile(data[:, j], 0.01)
        assert quantiles[0.99][j] == reference_quantile(data[:, j], 0.99)
        assert moments.minimum[j] == data[:, j].min() and moments.maximum[j] == data[:, j].max()
    means, stds = moments.mean_std()
    for j in range(3):
        mean, var = reference_mean_std(data[:, j])
        assert means[j] == float(mean)  # correctly rounded exact mean
        assert stds[j] == pytest.approx(float(var) ** 0.5, rel=1e-15, abs=0)


def test_order_keys_sort_like_floats():
    values = np.array([-np.inf, -3.0, -1e-45, 0.0, 1e-45, 2.5, np.inf], np.float32)
    keys = order_keys(values)
    assert (np.diff(keys.astype(np.int64)) > 0).all()
    assert (keys_to_float32(keys) == values).all()


def test_bounded_accumulator_on_many_distinct_values():
    rng = np.random.default_rng(0)
    acc = MomentsAccumulator(1)
    for _ in range(20):
        acc.add(rng.normal(size=(50_000, 1)).astype(np.float32))
    acc.compact()
    # 1M distinct values, but the prefix histogram is bounded by 2**16 entries per dim.
    assert acc.count == 1_000_000
    assert len(acc.prefix_keys[0]) <= 1 << 16
    assert not acc.buffer


def test_combine_fn_through_test_pipeline_with_flattened_creates():
    data = _datasets()["heavy"]
    parts = np.array_split(data, 4)
    expected_means, _ = exact_statistics([data], 3)[0].mean_std()

    def check(outputs):
        (acc,) = outputs
        means, _ = acc.mean_std()
        assert acc.count == len(data)
        assert means == expected_means

    with BeamTestPipeline() as p:
        pcs = [
            p | f"Create{i}" >> beam.Create([MomentsAccumulator(3).add(part[k : k + 100]) for k in range(0, len(part), 100)])
            for i, part in enumerate(parts)
        ]
        result = pcs | beam.Flatten() | beam.CombineGlobally(MergeExactAccumulatorsCombineFn())
        assert_that(result, check)
