"""Beam composition for ``dataset_statistics.json``: transform episodes, then exact mergeable statistics.

Pipeline shape (per run, all datasets in one pipeline, keyed by dataset name):

  SourceUnit --project_unit (read + transform + projection file)--> UnitSummary
             --ComputeDatasetStatistics (two passes over the projection files)--> (dataset, entry)

``entry`` is OpenVLA's per-dataset block (see ``openvla_entry``). The numerics live in
``exact_stats.py``; the CombineFns here only adapt them.
"""

from __future__ import annotations


import apache_beam as beam
import numpy as np

from vlaprep.pipelines.exact_stats import (
    MomentsAccumulator,
    OrderStatisticPlan,
    SelectionAccumulator,
    plan_order_statistics,
)
from vlaprep.schemas.episode import Episode, TrajectoryRecord
from vlaprep.transforms.base import EmptyTrajectoryError, Trajectory
from vlaprep.transforms.registry import DatasetSpec

QUARANTINE = "quarantine"
_NAMESPACE = "vlaprep"
ACTION = "action"
PROPRIO = "proprio"


def _check_width(trajectory: Trajectory, spec: DatasetSpec) -> None:
    action = np.asarray(trajectory.action)
    if action.ndim != 2 or action.shape[1] != spec.action_dim:
        raise ValueError(
            f"expected action [T, {spec.action_dim}] after {spec.name!r}'s transform, got {action.shape!r}; "
            "hint: the registry entry's action_dim or action keys do not match the data"
        )


def transform_episode(episode: Episode, spec: DatasetSpec, allow_empty: bool = False) -> TrajectoryRecord:
    """Apply the dataset's transform and check the result; raises ``ValueError`` with the reason.

    ``allow_empty`` (statistics): an episode the transform standardizes to zero steps *as OpenVLA does*
    (``EmptyTrajectoryError``: a 2-step Bridge episode loses its first and last step) is returned as a
    0-step trajectory, which OpenVLA counts in ``num_trajectories``; without it (shards: no row to
    write) it raises that error, whose message says so.

    Non-finite values are rejected in the raw float fields too, not only in the output: a NaN in a
    column the transform happens to overwrite (bridge relabels actions from states) still marks a
    corrupt recording.
    """
    for key, values in episode.steps.items():
        values = np.asarray(values)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = np.argwhere(~np.isfinite(values))[0]
            raise ValueError(
                f"expected finite values, got {values[tuple(bad)]!r} in step key {key!r} at index {tuple(int(i) for i in bad)!r} "
                f"({int((~np.isfinite(values)).sum())} non-finite in all)"
            )
    try:
        trajectory = spec.transform(episode.steps)
    except EmptyTrajectoryError as e:  # OpenVLA keeps it: a trajectory of 0 steps, counted in num_trajectories
        trajectory = e.trajectory
        if allow_empty:
            _check_width(trajectory, spec)
            return TrajectoryRecord(episode.dataset_name, episode.episode_id, episode.split, episode.language, trajectory)
        raise
    action = np.asarray(trajectory.action)
    _check_width(trajectory, spec)
    if trajectory.num_steps == 0:
        raise ValueError(f"expected at least one step after {spec.name!r}'s transform, got 0 (source had {episode.num_steps})")
    for name, values in ((ACTION, action), (PROPRIO, np.asarray(trajectory.proprio))):
        finite = np.isfinite(values)
        if not finite.all():
            t, d = (int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(f"expected finite {name} values, got {values[t, d]!r} at step {t} dim {d} ({int((~finite).sum())} non-finite in all)")
    return TrajectoryRecord(episode.dataset_name, episode.episode_id, episode.split, episode.language, trajectory)


class _FoldingCombineFn(beam.CombineFn):
    """Accumulators with an exact, associative ``merge`` (mutating the first) and ``compact``; None = empty."""

    def create_accumulator(self):
        return None

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


class ExactMomentsCombineFn(_FoldingCombineFn):
    """[N, D] float32 blocks -> ``MomentsAccumulator``: exact count, sums, min, max and 16-bit-prefix
    histogram. Exact and associative (integer arithmetic), so any bundling gives the same result."""

    def add_input(self, acc, rows):
        if acc is None:
            acc = MomentsAccumulator(rows.shape[1])
        return acc.add(rows)


class ExactOrderStatisticsCombineFn(_FoldingCombineFn):
    """``SelectionAccumulator``s (pass 2 partial counts) -> one merged ``SelectionAccumulator``."""

    def add_input(self, acc, partial):
        return partial if acc is None else acc.merge(partial)


class _SelectForPlanFn(beam.DoFn):
    """Pass 2 per element: keep only the values whose 16-bit prefix the plan wants, as counts."""

    def process(self, keyed_rows, plans):
        key, rows = keyed_rows
        plan = plans[key]
        acc = SelectionAccumulator(rows.shape[1]).add(rows, plan)
        yield key, acc.compact()


def _float32_list(values) -> list[float]:
    return [float(np.float32(v)) for v in values]


def field_statistics(moments: MomentsAccumulator, selection: SelectionAccumulator, plan: OrderStatisticPlan) -> dict:
    means, stds = moments.mean_std()
    quantiles = selection.quantiles(plan)
    return {
        "mean": means,
        "std": stds,
        "max": _float32_list(moments.maximum),
        "min": _float32_list(moments.minimum),
        "q01": quantiles[0.01],
        "q99": quantiles[0.99],
    }


HISTOGRAM_KEY = "_histogram"  # travels with the action block to the driver, which pops it before writing


def openvla_entry(fields: dict, num_trajectories: int, mask: tuple[bool, ...]) -> dict:
    """OpenVLA's per-dataset block: key order action{mean,std,max,min,q01,q99,mask}, proprio{...},
    num_transitions, num_trajectories. Without proprio statistics the block is zeros of the action width."""
    action = dict(fields[ACTION])
    histogram = action.pop(HISTOGRAM_KEY, None)
    action["mask"] = [bool(m) for m in mask]
    width = len(action["mean"])
    proprio = fields.get(PROPRIO) or {k: [0.0] * width for k in ("mean", "std", "max", "min", "q01", "q99")}
    entry = {
        "action": action,
        "proprio": proprio,
        "num_transitions": int(fields["_num_transitions"]),
        "num_trajectories": int(num_trajectories),
    }
    if histogram is not None:
        entry[HISTOGRAM_KEY] = histogram
    return entry


def _assemble_field(element):
    key, grouped = element
    (moments,) = grouped["moments"]
    (plan,) = grouped["plans"]
    (selection,) = grouped["selections"]
    dataset, field = key
    stats = field_statistics(moments, selection, plan)
    if field == ACTION:
        stats[HISTOGRAM_KEY] = {"counts": selection.histogram.tolist(), "min": list(plan.minimum), "max": list(plan.maximum)}
    return dataset, (field, stats, moments.count)


def _assemble_dataset(element, masks: dict):
    dataset, grouped = element
    fields = {}
    for field, stats, count in grouped["fields"]:
        fields[field] = stats
        if field == ACTION:
            fields["_num_transitions"] = count
    (num_trajectories,) = grouped["trajectories"] or (0,)
    return dataset, openvla_entry(fields, num_trajectories, masks[dataset])


class ComputeDatasetStatistics(beam.PTransform):
    """PCollection[UnitSummary] -> PCollection[tuple[str, dict]]: (dataset name, OpenVLA entry).

    Two passes over the compact ``[N, D]`` action/proprio rows of each source unit (never the images),
    each reading the unit's projection file again (``stats_cache.unit_matrices``), so no per-episode
    or per-row collection is ever held between stages: pass 1 is ``ExactMomentsCombineFn`` per
    (dataset, field); its plan (which 16-bit key prefixes hold the q01/q99 ranks) goes to pass 2 as a
    side input, whose counts ``ExactOrderStatisticsCombineFn`` merges. What crosses a stage boundary is
    one small summary per unit and the combiners' accumulators (bounded by their counters).
    """

    def __init__(self, masks: dict[str, tuple[bool, ...]], with_proprio: bool = False):
        super().__init__()
        self._masks = dict(masks)
        self._with_proprio = with_proprio

    def expand(self, summaries):
        from vlaprep.pipelines.stats_cache import unit_matrices

        with_proprio = self._with_proprio
        moments = (
            summaries
            | "Pass1Rows" >> beam.FlatMap(unit_matrices, with_proprio)
            | "ExactMoments" >> beam.CombinePerKey(ExactMomentsCombineFn())
        )
        plans = moments | "PlanOrderStatistics" >> beam.MapTuple(lambda key, acc: (key, plan_order_statistics(acc)))
        selections = (
            summaries
            | "Pass2Rows" >> beam.FlatMap(unit_matrices, with_proprio)
            | "SelectForPlan" >> beam.ParDo(_SelectForPlanFn(), plans=beam.pvalue.AsDict(plans))
            | "ExactOrderStatistics" >> beam.CombinePerKey(ExactOrderStatisticsCombineFn())
        )
        fields = (
            {"moments": moments, "plans": plans, "selections": selections}
            | "JoinPasses" >> beam.CoGroupByKey()
            | "FieldStatistics" >> beam.Map(_assemble_field)
        )
        trajectory_counts = (
            summaries
            | "TrajectoriesOfUnit" >> beam.FlatMap(lambda s: [(s.dataset, s.num_trajectories)] if s.num_trajectories else [])
            | "CountTrajectories" >> beam.CombinePerKey(sum)
        )
        return (
            {"fields": fields, "trajectories": trajectory_counts}
            | "JoinFields" >> beam.CoGroupByKey()
            | "OpenVLAEntry" >> beam.Map(_assemble_dataset, self._masks)
        )
