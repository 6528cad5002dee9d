"""``ComputeDatasetStatistics`` as a PTransform in a Beam ``TestPipeline``: UnitSummary elements (each unit's
rows in its projection file) -> (dataset, OpenVLA entry). Expected values are computed here from all the
rows with NumPy and the NumPy 1.x quantile rule of openvla.md; the units are merged in any grouping."""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from vlaprep.pipelines.stats import ComputeDatasetStatistics
from vlaprep.pipelines.stats_cache import UnitSummary, write_projection
from vlaprep.schemas.episode import TrajectoryRecord
from vlaprep.transforms.base import Trajectory


def numpy1_quantile(column: np.ndarray, q: float) -> float:
    s = np.sort(column.astype(np.float32))
    h = (len(s) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(s) - 1)
    g = h - lo
    d = np.float32(s[hi] - s[lo])
    return float(np.float64(s[hi]) - np.float64(d) * (1 - g)) if g >= 0.5 else float(np.float64(s[lo]) + np.float64(d) * g)


def _units(tmp_path, rng):
    """Three units of one dataset (one holds no trajectory, one an empty trajectory) -> (summaries, all rows)."""
    summaries, rows = [], []
    for u, lengths in enumerate([(5, 9, 3), (), (0, 12)]):
        records = []
        for i, n in enumerate(lengths):
            action = rng.normal(0, 1, (n, 3)).astype(np.float32)
            action[:, 2] = rng.integers(0, 2, n)
            records.append(TrajectoryRecord("d", f"u{u}/{i}", "train", "x",
                                            Trajectory(action, np.zeros((n, 0), np.float32), np.arange(n))))
            rows.append(action)
        path = str(tmp_path / f"unit{u}.npz")
        write_projection(path, records, [], len(records), f"u{u}/")
        summaries.append(UnitSummary("d", path, len(records), len(records), ()))
    return summaries, np.concatenate(rows)


def test_statistics_ptransform_matches_numpy_on_all_rows(tmp_path):
    summaries, rows = _units(tmp_path, np.random.default_rng(3))
    mask = (True, True, False)

    def check(entries):
        assert len(entries) == 1
        name, entry = entries[0]
        assert name == "d"
        a = entry["action"]
        assert a["min"] == [float(v) for v in rows.min(axis=0)] and a["max"] == [float(v) for v in rows.max(axis=0)]
        assert a["q01"] == [numpy1_quantile(rows[:, j], 0.01) for j in range(3)]
        assert a["q99"] == [numpy1_quantile(rows[:, j], 0.99) for j in range(3)]
        np.testing.assert_allclose(a["mean"], rows.astype(np.float64).mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(a["std"], rows.astype(np.float64).std(axis=0), rtol=1e-9)
        assert a["mask"] == list(mask)
        assert entry["num_transitions"] == len(rows) == 29
        assert entry["num_trajectories"] == 5  # the empty trajectory counts, as OpenVLA counts it
        assert entry["proprio"]["mean"] == [0.0] * 3

    with TestPipeline() as p:
        entries = (
            [p | f"Unit{i}" >> beam.Create([s]) for i, s in enumerate(summaries)]
            | beam.Flatten()
            | ComputeDatasetStatistics({"d": mask})
            | beam.MapTuple(lambda name, entry: (name, {k: v for k, v in entry.items() if not k.startswith("_")}))
        )
        assert_that(entries, check)
