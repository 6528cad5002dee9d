"""Element logic of the statistics, without Beam: one episode through its dataset's transform, and one
dataset's OpenVLA entry from the exact accumulators of its fields.

A field is ``ACTION`` (``[N, D]`` float32 rows) or ``PROPRIO`` (``[N, P]``); its block holds
mean, std, max, min, q01, q99 (lists of D floats). The action block also carries the display histogram
(``HISTOGRAM_KEY``) to the driver, which renders and drops it before writing.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from vlaprep.pipelines.stats.exact import MomentsAccumulator, OrderStatisticPlan, SelectionAccumulator
from vlaprep.schemas.episode import Episode, TrajectoryRecord
from vlaprep.transforms.base import EmptyTrajectoryError, Trajectory
from vlaprep.transforms.registry import DatasetSpec

ACTION = "action"
PROPRIO = "proprio"
HISTOGRAM_KEY = "_histogram"  # travels with the action block to the driver, which pops it before writing


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


def _float32_list(values) -> list[float]:
    return [float(np.float32(v)) for v in values]


def field_statistics(moments: MomentsAccumulator, selection: SelectionAccumulator, plan: OrderStatisticPlan) -> dict:
    """One field's block {mean, std, max, min, q01, q99} from both passes' merged accumulators."""
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


def field_block(field: str, moments: MomentsAccumulator, selection: SelectionAccumulator, plan: OrderStatisticPlan) -> dict:
    """``field_statistics``; the action block also carries its display histogram under ``HISTOGRAM_KEY``."""
    block = field_statistics(moments, selection, plan)
    if field == ACTION:
        block[HISTOGRAM_KEY] = {"counts": selection.histogram.tolist(), "min": list(plan.minimum), "max": list(plan.maximum)}
    return block


def openvla_entry(fields: dict, num_transitions: int, num_trajectories: int, mask: tuple[bool, ...]) -> dict:
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
        "num_transitions": int(num_transitions),
        "num_trajectories": int(num_trajectories),
    }
    if histogram is not None:
        entry[HISTOGRAM_KEY] = histogram
    return entry


def dataset_entry(fields: Iterable[tuple[str, dict, int]], num_trajectories: int, mask: tuple[bool, ...]) -> dict:
    """(field, block, rows) for each field of one dataset -> its ``openvla_entry``; the action rows are the
    dataset's transitions."""
    blocks, num_transitions = {}, 0
    for field, block, rows in fields:
        blocks[field] = block
        if field == ACTION:
            num_transitions = rows
    return openvla_entry(blocks, num_transitions, num_trajectories, mask)
