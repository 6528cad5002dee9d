"""``RoundTripMetrics`` and ``ModelMetrics`` as PTransforms in a Beam ``TestPipeline``.

Hand-made elements of two datasets, one dataset's elements split over two ``Create``s beside an empty one
(``Flatten``), so the per-dataset merge runs over several inputs. Expected counts and sums are computed
here from openvla.md's bin formulas (bin ``floor((clip(x) + 1) * 255 / 2)``, id ``31999 - bin``, center
``-1 + (min(bin, 254) + 0.5) * 2/255``) and the normalization's definition, not with ``ActionTokenizer``
or ``vlaprep.transforms.normalization``.
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from vlaprep.pipelines.validate.beam import ModelMetrics, RoundTripMetrics
from vlaprep.pipelines.validate.metrics import Generation, MetricsSpec
from vlaprep.pipelines.validate.read import ActionBatch, ShardRow

D = 2  # action dims
N = 2  # chunk
TOP_ID, BOTTOM_ID = 31744, 31999  # vocab 32000, 256 bins
INVALID_ID = 7  # below the action ids


def token_of(x: float) -> int:
    """The id of ``clip(x, -1, 1)`` (test values stay off bin edges)."""
    return BOTTOM_ID - math.floor((min(max(x, -1.0), 1.0) + 1.0) * 255.0 / 2.0)


def center_of(token: int) -> float:
    """The decoded value of an id (ids below the range decode to the top center, as clipping does)."""
    return -1.0 + (min(BOTTOM_ID - token, 254) + 0.5) * 2.0 / 255.0


def statistics_block(low, high, mask) -> dict:
    return {"min": list(low), "max": list(high), "q01": list(low), "q99": list(high),
            "mean": [0.0] * D, "std": [1.0] * D, "mask": list(mask)}


def spec_for(normalization: str, statistics: dict) -> MetricsSpec:
    return MetricsSpec(statistics=statistics, normalization=normalization, action_encoding="uniform",
                       vocab_size=32000, n_bins=256, chunk=N, dim=D)


def merged_inputs(p, first: list, second: list):
    """``first`` and ``second`` as two ``Create``s plus an empty one, flattened."""
    return (
        [p | "First" >> beam.Create(first), p | "Empty" >> beam.Create([]), p | "Second" >> beam.Create(second)]
        | beam.Flatten()
    )


def equals(expected: dict[str, dict]):
    """Matcher: ``(dataset, accumulator)`` pairs whose ``to_json()`` equals ``expected`` (floats to 1e-12)."""

    def check(actual):
        got = {name: acc.to_json() for name, acc in actual}
        assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
        for name, want in expected.items():
            assert sorted(got[name]) == sorted(want), (name, sorted(got[name]), sorted(want))
            for key, value in want.items():
                if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                    np.testing.assert_allclose(got[name][key], value, rtol=0, atol=1e-12, err_msg=f"{name}.{key}")
                else:
                    assert got[name][key] == value, (name, key, got[name][key], value)

    return check


# --------------------------------------------------------------------------------------------------
# RoundTripMetrics: fixed:-1,1 normalization, so a masked-in value normalizes to clip(x) and a
# masked-out one passes through as x; every decoded value un-normalizes to itself.
# --------------------------------------------------------------------------------------------------

ROUND_TRIP_MASKS = {"a": (True, False), "b": (True, True)}


def action_batch(name: str, x_rows, edits=(), normalized_edits=()) -> ActionBatch:
    """Rows of raw values ``[R, N*D]`` (dyadic: exact in float32) with their ids and normalized values as a
    shard stores them; ``edits``: ``(row, column, id)`` stored instead; ``normalized_edits``: ``(row, column, delta)``."""
    x = np.asarray(x_rows, np.float32)
    mask = np.tile(ROUND_TRIP_MASKS[name], N)
    ids = np.vectorize(token_of)(x.astype(np.float64)).astype(np.int64)
    normalized = np.where(mask, np.clip(x, -1.0, 1.0), x).astype(np.float32)
    for r, c, token in edits:
        ids[r, c] = token
    for r, c, delta in normalized_edits:
        normalized[r, c] += delta
    return ActionBatch(name, ids, x, normalized)


def expected_round_trip(batches: list[ActionBatch]) -> dict:
    """The accumulator of ``batches`` (one dataset), from the formulas of the module docstring."""
    mask = np.asarray(ROUND_TRIP_MASKS[batches[0].dataset_name])
    x = np.concatenate([b.action_chunk.reshape(-1, D) for b in batches]).astype(np.float64)  # [M, D]
    ids = np.concatenate([b.action_token_ids.reshape(-1, D) for b in batches])
    stored = np.concatenate([b.normalized_action_chunk.reshape(-1, D) for b in batches]).astype(np.float64)
    y = np.where(mask, np.clip(x, -1.0, 1.0), x)
    decoded = np.vectorize(center_of)(ids)
    error = np.abs(decoded - x)
    in_range = np.abs(x) <= 1.0
    within_half_bin = np.abs(decoded - np.clip(x, -1.0, 1.0)) <= 1.0 / 255 + 1e-9
    valid = (ids >= TOP_ID) & (ids <= BOTTOM_ID)
    top = ids == TOP_ID
    reencoded = np.vectorize(token_of)(decoded)
    checked = valid & ~top
    return {
        "rows": sum(len(b.action_token_ids) for b in batches),
        "values": [len(x)] * D,
        "error_sum": error.sum(axis=0).tolist(),
        "in_range": in_range.sum(axis=0).tolist(),
        "in_range_within_half_bin": (in_range & within_half_bin).sum(axis=0).tolist(),
        "saturated": (np.abs(y) >= 1.0).sum(axis=0).tolist(),
        "encoding_matches": (ids == np.vectorize(token_of)(x)).sum(axis=0).tolist(),
        "roundtrip_checked": checked.sum(axis=0).tolist(),
        "roundtrip_ok": (checked & (reencoded == ids)).sum(axis=0).tolist(),
        "top_bin": top.sum(axis=0).tolist(),
        "top_bin_to_next": (top & (reencoded == ids + 1)).sum(axis=0).tolist(),
        "invalid_ids": (~valid).sum(axis=0).tolist(),
        "error_max": error.max(axis=0).tolist(),
        "error_max_in_range": np.where(in_range, error, 0.0).max(axis=0).tolist(),
        "normalized_column_diff_max": np.abs(stored - y).max(axis=0).tolist(),
    }


def test_round_trip_metrics_per_dataset_over_flattened_inputs():
    # columns of a row: (step 0: dim 0, dim 1), (step 1: dim 0, dim 1)
    a1 = action_batch("a", [[-1.0, 0.5, 0.5, 2.0], [0.75, -0.25, 1.0, -3.0]],
                      edits=[(1, 0, token_of(0.75) + 1)])  # a neighbouring id: not what encode gives
    a2 = action_batch("a", [[0.0, 0.25, -0.5, 0.125]], edits=[(0, 3, INVALID_ID)], normalized_edits=[(0, 2, 0.125)])
    b = action_batch("b", [[0.375, -0.875, 0.625, 0.0625], [1.5, 1.0, -0.0625, -1.25]])
    expected = {"a": expected_round_trip([a1, a2]), "b": expected_round_trip([b])}
    # the hand-picked values exercise every count (so no branch of the comparison is vacuous)
    assert expected["a"]["invalid_ids"] == [0, 1] and expected["a"]["top_bin"] == [1, 1]
    assert expected["a"]["encoding_matches"] == [5, 5] and expected["b"]["saturated"] == [1, 2]
    assert expected["a"]["normalized_column_diff_max"] == [0.125, 0.0]
    spec = spec_for("fixed:-1,1", {name: statistics_block([-1.0] * D, [1.0] * D, mask)
                                   for name, mask in ROUND_TRIP_MASKS.items()})

    with TestPipeline() as p:
        metrics = merged_inputs(p, [a1, b], [a2]) | RoundTripMetrics(spec)
        assert_that(metrics, equals(expected))


# --------------------------------------------------------------------------------------------------
# ModelMetrics: bounds normalization, a different range per dataset; dim 1 of "a" passes through.
# --------------------------------------------------------------------------------------------------

MODEL_STATS = {
    "a": statistics_block([-2.0, 0.0], [2.0, 1.0], (True, False)),
    "b": statistics_block([0.0, -1.0], [4.0, 1.0], (True, True)),
}


def unnormalized(name: str, y: np.ndarray) -> np.ndarray:
    """``0.5 * (y + 1) * (max - min) + min`` on masked-in dims, ``y`` elsewhere; ``y``: [M, D]."""
    s = MODEL_STATS[name]
    low, high, mask = np.asarray(s["min"]), np.asarray(s["max"]), np.asarray(s["mask"])
    return np.where(mask, 0.5 * (y + 1.0) * (high - low) + low, y)


def prediction(name: str, step: int, stored, generated, action, seconds: float, device: str, dtype: str):
    row = ShardRow(name, "ep0", step, "pick up the block", np.asarray(stored, np.int64),
                   np.asarray(action, np.float32), b"")
    generation = Generation(np.asarray(generated, np.int64), seconds, seconds / 2, device, dtype)
    return PredictionResult(row, generation)


def expected_model(results: list[PredictionResult]) -> dict:
    name = results[0].example.dataset_name
    stored = np.concatenate([r.example.action_token_ids.reshape(-1, D) for r in results])
    generated = np.concatenate([r.inference.token_ids.reshape(-1, D) for r in results])
    action = np.concatenate([r.example.action_chunk.reshape(-1, D) for r in results]).astype(np.float64)
    stored_norm, generated_norm = np.vectorize(center_of)(stored), np.vectorize(center_of)(generated)
    generated_raw = unnormalized(name, generated_norm)
    return {
        "rows": len(results),
        "values": [len(stored)] * D,
        "exact": (generated == stored).sum(axis=0).tolist(),
        "within_one_bin": (np.abs(generated - stored) <= 1).sum(axis=0).tolist(),
        "outside_action_range": ((generated < TOP_ID) | (generated > BOTTOM_ID)).sum(axis=0).tolist(),
        "l1_normalized_sum": np.abs(generated_norm - stored_norm).sum(axis=0).tolist(),
        "l1_raw_sum": np.abs(generated_raw - unnormalized(name, stored_norm)).sum(axis=0).tolist(),
        "l1_raw_vs_action_sum": np.abs(generated_raw - action).sum(axis=0).tolist(),
        "seconds": sum(r.inference.seconds for r in results),
        "generate_seconds": sum(r.inference.generate_seconds for r in results),
        "devices": sorted({r.inference.device for r in results}),
        "dtypes": sorted({r.inference.dtype for r in results}),
    }


def test_model_metrics_per_dataset_over_flattened_inputs():
    a1 = prediction("a", 0, [31800, 31900, 31850, 31744], [31800, 31901, 31852, 31744],
                    [0.5, 0.25, 1.0, 0.75], 0.5, "cpu", "float32")
    a2 = prediction("a", 1, [31760, 31999, 31870, 31870], [INVALID_ID, 31999, 31871, 31869],
                    [1.75, -1.0, 0.0, 0.5], 0.25, "cuda", "bfloat16")
    b = prediction("b", 0, [31900, 31820, 31744, 31999], [31899, 31820, 31745, 31990],
                   [0.75, 0.5, 3.875, -1.0], 1.0, "cpu", "float32")
    expected = {"a": expected_model([a1, a2]), "b": expected_model([b])}
    # the hand-picked ids exercise every count (so no comparison is vacuous)
    assert expected["a"]["exact"] == [1, 2] and expected["a"]["within_one_bin"] == [2, 4]
    assert expected["a"]["outside_action_range"] == [1, 0] and expected["a"]["devices"] == ["cpu", "cuda"]
    spec = spec_for("bounds", MODEL_STATS)

    with TestPipeline() as p:
        metrics = merged_inputs(p, [a1, b], [a2]) | ModelMetrics(spec)
        assert_that(metrics, equals(expected))
