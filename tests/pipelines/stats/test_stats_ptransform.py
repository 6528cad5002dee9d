"""The statistics PTransforms in a Beam ``TestPipeline``, each against independent expectations.

``ProjectUnits``: UnitTask elements -> UnitSummary, each unit's transformed rows in its projection file;
expected rows are read straight through tfds with OpenVLA's bridge rule (``conftest.py``).
``ComputeDatasetStatistics``: UnitSummary elements -> (dataset, OpenVLA entry); expected values are
computed here from all the rows with NumPy and the NumPy 1.x quantile rule of openvla.md; the units are
merged in any grouping.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that

from vlaprep.pipelines.sources import resolve_dataset
from vlaprep.pipelines.stats.beam import ComputeDatasetStatistics, ProjectUnits
from vlaprep.pipelines.stats.cache import UnitSummary, plan_units, write_projection
from vlaprep.pipelines.stats.failure import FAILURE_FILE
from vlaprep.schemas.episode import TrajectoryRecord
from vlaprep.transforms.base import Trajectory
from vlaprep.transforms.registry import get_spec

BRIDGE = get_spec("bridge_orig")


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

    with BeamTestPipeline() as p:
        entries = (
            [p | f"Unit{i}" >> beam.Create([s]) for i, s in enumerate(summaries)]
            | beam.Flatten()
            | ComputeDatasetStatistics({"d": mask})
            | beam.MapTuple(lambda name, entry: (name, {k: v for k, v in entry.items() if not k.startswith("_")}))
        )
        assert_that(entries, check)


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def _project(dataset, tasks, output_dir, check=None) -> dict[str, int]:
    """Run ``ProjectUnits`` over ``tasks`` of ``dataset`` (``check``: a matcher of the summaries); -> its Beam
    counters by name."""
    pipeline = BeamTestPipeline()
    summaries = pipeline | beam.Create(tasks) | ProjectUnits([dataset], False, str(output_dir))
    if check is not None:
        assert_that(summaries, check)
    result = pipeline.run()
    result.wait_until_finish()
    return {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}


def _check_against_reference(tasks, reference):
    """A matcher: one summary per task, whose counts add up to what tfds and OpenVLA's rule give."""
    _actions, trajectories, skipped = reference

    def check(summaries):
        assert sorted(s.path for s in summaries) == sorted(t.path for t in tasks)
        assert {s.dataset for s in summaries} == {"bridge_orig"}
        assert sum(s.num_trajectories for s in summaries) == trajectories
        assert sum(s.episodes_read for s in summaries) == trajectories + skipped
        quarantine = [r for s in summaries for r in s.quarantine]
        assert len(quarantine) == skipped and {r.stage for r in quarantine} == {"transform"}

    return check


def _projected_actions(output_dir) -> np.ndarray:
    """Every projection file's action rows, read with NumPy alone; lengths checked against the rows."""
    blocks = []
    projection_dir = output_dir / "stats_cache" / "bridge_orig"
    for name in sorted(os.listdir(projection_dir)):
        with np.load(projection_dir / name, allow_pickle=False) as z:
            assert int(z["lengths"].sum()) == len(z["action"]), name
            blocks.append(z["action"])
    return np.concatenate(blocks)


def test_project_units_writes_each_units_transformed_rows(tmp_path, bridge, bridge_reference):
    dataset = resolve_dataset("bridge_orig", str(bridge), BRIDGE)
    tasks = plan_units([dataset], False, str(tmp_path))
    assert len(tasks) > 1 and not any(t.cached for t in tasks)
    counters = _project(dataset, tasks, tmp_path, _check_against_reference(tasks, bridge_reference))
    assert counters == {"stats_units_read": len(tasks)}
    got = _projected_actions(tmp_path)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(_sorted_rows(got), _sorted_rows(bridge_reference[0]))


def test_project_units_reads_a_cached_unit_from_its_projection_only(tmp_path, bridge, bridge_reference):
    data = tmp_path / "data"
    shutil.copytree(bridge, data)
    inputs = [resolve_dataset("bridge_orig", str(data), BRIDGE)]
    out = tmp_path / "out"
    _project(inputs[0], plan_units(inputs, False, str(out)), out)
    tasks = plan_units(inputs, False, str(out))
    assert tasks and all(t.cached for t in tasks)
    for name in os.listdir(data):  # the sources are gone: only the projections can answer
        if ".tfrecord-" in name:
            os.remove(data / name)
    counters = _project(inputs[0], tasks, out, _check_against_reference(tasks, bridge_reference))
    assert counters == {"stats_units_reused": len(tasks)}


def test_project_units_notes_an_unreadable_projection_for_the_driver(tmp_path, bridge):
    inputs = [resolve_dataset("bridge_orig", str(bridge), BRIDGE)]
    _project(inputs[0], plan_units(inputs, False, str(tmp_path)), tmp_path)
    tasks = plan_units(inputs, False, str(tmp_path))
    with open(tasks[0].path, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    with pytest.raises(Exception, match="expected a readable cached projection"):
        _project(inputs[0], tasks, tmp_path)
    with open(tmp_path / FAILURE_FILE) as f:
        note = json.load(f)
    assert note["error"] == "StatsCacheError"
    assert os.path.basename(tasks[0].path) in note["message"] and "--force" in note["message"]
