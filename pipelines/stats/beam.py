"""Beam wiring of ``vlaprep stats``; the work is done by ``exact``, ``records`` and ``cache``, which the
CombineFns and DoFns here only adapt.

Pipeline shape (per run, all datasets in one pipeline, keyed by dataset name)::

  UnitTask --ProjectUnits (read + transform + projection file)--> UnitSummary
           --ComputeDatasetStatistics (two passes over the projection files)--> (dataset, entry)
           --FinalizeStatistics (one element, every result as side inputs)--> the published files

``entry`` is OpenVLA's per-dataset block (``records.openvla_entry``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Sequence

import apache_beam as beam

from vlaprep import paths
from vlaprep.pipelines.sources import ResolvedDataset
from vlaprep.pipelines.stats.cache import StatsCacheError, UnitSummary, UnitTask, plan_units, project_unit, unit_matrices
from vlaprep.pipelines.stats.exact import MomentsAccumulator, SelectionAccumulator, plan_order_statistics
from vlaprep.pipelines.stats.failure import note_failure
from vlaprep.pipelines.stats.records import dataset_entry, field_block
from vlaprep.schemas.layout import STATISTICS_FILE

if TYPE_CHECKING:
    from vlaprep.pipelines.stats.job import StatsFinalizer

_METRICS_NAMESPACE = "vlaprep"


class MergeExactAccumulatorsCombineFn(beam.CombineFn):
    """Per-unit partial accumulators (``MomentsAccumulator`` in pass 1, ``SelectionAccumulator`` in pass 2)
    -> one merged accumulator. ``merge`` is exact integer arithmetic and associative (it mutates its
    first argument, as Beam allows), so any bundling or merge order gives the same result."""

    def create_accumulator(self):
        return None  # empty: the first partial becomes the accumulator

    def add_input(self, acc, partial):
        return partial if acc is None else acc.merge(partial)

    def merge_accumulators(self, accumulators):
        merged = None
        for acc in accumulators:
            if acc is None:
                continue
            merged = acc if merged is None else merged.merge(acc)
        return merged

    def compact(self, acc):
        return acc.compact() if acc is not None else acc

    def extract_output(self, acc):
        return acc.compact() if acc is not None else None


def _unit_moments(summary: UnitSummary, with_proprio: bool):
    """Pass 1 of one unit: UnitSummary -> ((dataset, field), MomentsAccumulator) per field, from its projection file."""
    for key, rows in unit_matrices(summary, with_proprio):
        yield key, MomentsAccumulator(rows.shape[1]).add(rows).compact()


def _unit_selections(summary: UnitSummary, with_proprio: bool, plans: dict):
    """Pass 2 of one unit: UnitSummary -> ((dataset, field), SelectionAccumulator) per field: counts of the
    values whose 16-bit prefix the field's plan wants, read from the unit's projection file again."""
    for key, rows in unit_matrices(summary, with_proprio):
        yield key, SelectionAccumulator(rows.shape[1]).add(rows, plans[key]).compact()


def _join_passes(element):
    """((dataset, field), both passes' accumulators and the plan) -> (dataset, (field, block, rows))."""
    (dataset, field), grouped = element
    (moments,) = grouped["moments"]
    (plan,) = grouped["plans"]
    (selection,) = grouped["selections"]
    return dataset, (field, field_block(field, moments, selection, plan), moments.count)


def _join_fields(element, masks: dict):
    """(dataset, its field blocks and trajectory count) -> (dataset, OpenVLA entry)."""
    dataset, grouped = element
    (num_trajectories,) = grouped["trajectories"] or (0,)
    return dataset, dataset_entry(grouped["fields"], num_trajectories, masks[dataset])


class ComputeDatasetStatistics(beam.PTransform):
    """PCollection[UnitSummary] -> PCollection[tuple[str, dict]]: (dataset name, OpenVLA entry).

    Two passes over the compact ``[N, D]`` action/proprio rows of each source unit (never the images).
    In each pass one call per unit reads the unit's projection file (``cache.unit_matrices``) and turns
    its rows into that unit's partial accumulator per (dataset, field) at once, so no PCollection ever
    holds rows: pass 1 yields ``MomentsAccumulator``s; their merge plans which 16-bit key prefixes hold
    the q01/q99 ranks, and the plans go to pass 2 as a side input, which yields ``SelectionAccumulator``s.
    ``MergeExactAccumulatorsCombineFn`` merges each pass per (dataset, field).

    Why the rows must stay inside the calls: pass 2 waits for the plans, so its input crosses a stage
    boundary, and a local runner (FnApiRunner, in-process or with worker processes) holds every element
    that crosses one in the driver's memory -- rows there grew the driver with the number of steps.
    What crosses now is one small summary per unit and, after combiner lifting, one partial accumulator
    per (dataset, field) per bundle (bounded by its counters: <= 65,536 per dim).
    """

    def __init__(self, masks: dict[str, tuple[bool, ...]], with_proprio: bool = False):
        super().__init__()
        self._masks = dict(masks)
        self._with_proprio = with_proprio

    def expand(self, summaries):
        with_proprio = self._with_proprio
        moments = (
            summaries
            | "UnitMoments" >> beam.FlatMap(_unit_moments, with_proprio)
            | "ExactMoments" >> beam.CombinePerKey(MergeExactAccumulatorsCombineFn())
        )
        plans = moments | "PlanOrderStatistics" >> beam.MapTuple(lambda key, acc: (key, plan_order_statistics(acc)))
        selections = (
            summaries
            | "UnitSelections" >> beam.FlatMap(_unit_selections, with_proprio, plans=beam.pvalue.AsDict(plans))
            | "ExactOrderStatistics" >> beam.CombinePerKey(MergeExactAccumulatorsCombineFn())
        )
        fields = (
            {"moments": moments, "plans": plans, "selections": selections}
            | "JoinPasses" >> beam.CoGroupByKey()
            | "FieldStatistics" >> beam.Map(_join_passes)
        )
        trajectory_counts = (
            summaries
            | "TrajectoriesOfUnit" >> beam.FlatMap(lambda s: [(s.dataset, s.num_trajectories)] if s.num_trajectories else [])
            | "CountTrajectories" >> beam.CombinePerKey(sum)
        )
        return (
            {"fields": fields, "trajectories": trajectory_counts}
            | "JoinFields" >> beam.CoGroupByKey()
            | "OpenVLAEntry" >> beam.Map(_join_fields, self._masks)
        )


class _ProjectUnitFn(beam.DoFn):
    """UnitTask -> UnitSummary (``cache.project_unit``); a projection that cannot be read is noted
    for the driver (``failure.note_failure``), which reports it as one line."""

    def __init__(self, datasets: dict, with_proprio: bool, output_dir: str):
        self._datasets = datasets
        self._with_proprio = with_proprio
        self._output_dir = output_dir
        self._parsers = None

    def setup(self):
        self._parsers = {}  # dataset -> its reader state (RLDS: the parsed features), built once per worker

    def process(self, task: UnitTask):
        dataset = self._datasets[task.dataset]
        parser = None
        if not task.cached:
            if task.dataset not in self._parsers:
                self._parsers[task.dataset] = dataset.parser()
            parser = self._parsers[task.dataset]
        try:
            summary = project_unit(task, dataset, self._with_proprio, parser)
        except StatsCacheError as e:
            note_failure(self._output_dir, StatsCacheError, str(e))
            raise
        beam.metrics.Metrics.counter(_METRICS_NAMESPACE, "stats_units_reused" if task.cached else "stats_units_read").inc()
        yield summary


class ProjectUnits(beam.PTransform):
    """PCollection[UnitTask] -> PCollection[UnitSummary]: each source unit read, transformed and written to
    its projection file in one worker call (a cached unit: its projection's summary read back).

    Episodes that cannot be read or transformed travel as the summary's quarantine records. An unreadable
    cached projection fails the step with ``StatsCacheError``, noted in ``output_dir`` for the driver.
    """

    def __init__(self, datasets: Sequence[ResolvedDataset], with_proprio: bool, output_dir: str):
        super().__init__()
        self._datasets = {d.name: d for d in datasets}
        self._with_proprio = with_proprio
        self._output_dir = output_dir

    def expand(self, tasks):
        return tasks | "ProjectUnit" >> beam.ParDo(_ProjectUnitFn(self._datasets, self._with_proprio, self._output_dir))


class _FinalizeStatsFn(beam.DoFn):
    """The pipeline's last step: one element; side inputs are complete only once every dataset is done."""

    def __init__(self, finalizer: "StatsFinalizer"):
        self._finalizer = finalizer

    def process(self, _unused, entries, quarantine, counts):
        self._finalizer.finalize(dict(entries), [json.loads(q) for q in quarantine], dict(counts))
        yield paths.join(self._finalizer.output_dir, STATISTICS_FILE)


def _task_at(index: int, tasks: list[UnitTask]) -> UnitTask:
    return tasks[index]


def build_stats_pipeline(
    pipeline: beam.Pipeline, inputs: Sequence[ResolvedDataset], with_proprio: bool, finalizer: "StatsFinalizer", force: bool = False
) -> dict:
    """Wire source units -> projections -> statistics -> ``FinalizeStatistics``, which writes the outputs.

    One element per source unit (RLDS shard, CALVIN window run) from start to end: a unit is read,
    transformed and projected in one worker call, or its cached projection is used; only unit indices,
    per-unit summaries and per-bundle accumulators cross stage boundaries, so the driver's and each
    worker's memory do not grow with the number of episodes (the driver keeps ~1 KB per unit).
    Returns ``{"units_read": n, "units_reused": m}``.
    """
    tasks = plan_units(inputs, with_proprio, finalizer.output_dir, force)
    summaries = (
        pipeline
        # Indices, not the tasks, go through Create and the Reshuffle it adds: a local runner decodes a
        # Reshuffle's elements in the driver (~14 KB of driver memory per UnitTask, measured); the task
        # list travels once, pickled with the next step.
        | "ListUnits" >> beam.Create(range(len(tasks)))
        | "UnitTask" >> beam.Map(_task_at, tasks)
        | "ProjectUnits" >> ProjectUnits(inputs, with_proprio, finalizer.output_dir)
    )
    entries = summaries | "Statistics" >> ComputeDatasetStatistics(
        {item.name: item.spec.normalization_mask for item in inputs}, with_proprio=with_proprio
    )
    quarantine = summaries | "QuarantineJson" >> beam.FlatMap(
        lambda s: [json.dumps(r.to_json_dict(), sort_keys=True) for r in s.quarantine]
    )
    counts = (
        summaries
        | "EpisodesOfUnit" >> beam.Map(lambda s: (s.dataset, s.episodes_read))
        | "CountRead" >> beam.CombinePerKey(sum)
    )
    _ = (
        pipeline
        | "FinalizeTrigger" >> beam.Create([None])
        | "FinalizeStatistics" >> beam.ParDo(
            _FinalizeStatsFn(finalizer),
            beam.pvalue.AsList(entries),
            beam.pvalue.AsList(quarantine),
            beam.pvalue.AsList(counts),
        )
    )
    cached = sum(1 for t in tasks if t.cached)
    return {"units_read": len(tasks) - cached, "units_reused": cached}
