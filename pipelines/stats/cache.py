"""What makes the statistics incremental, without Beam: dataset fingerprints, unit keys and per-unit
projection files.

A dataset whose ``dataset_fingerprint`` matches its entry in ``dataset_statistics.cache.json`` is not
recomputed at all. Otherwise the statistics pipeline runs over its source units, and never moves an
episode between stages: one worker call reads a whole ``SourceUnit`` (an RLDS shard, a run of CALVIN
windows), transforms its episodes and writes the unit's compact projection (``project_unit``); what
travels on is a small ``UnitSummary`` per unit. Both passes of the exact statistics then read the
projection file again (``unit_matrices``) instead of a PCollection the runner would have to hold: a
local runner buffers every element that crosses a stage boundary in the driver's memory, so
per-episode elements there made the driver grow with the data.

After a unit is read and transformed, its compact projection is kept:
the transformed ``action [N, D]`` and ``proprio [N, P]`` float32 rows with per-trajectory lengths and
ids, its quarantine records and its episode count (~28 bytes per step, none of the images). A later run
whose unit key matches loads this file instead of reading the unit's TFRecords again, so adding shards to
a dataset costs reading the new shards only, and the statistics stay exact (both passes run over the
union of projections and new rows).

The unit key covers the unit's file digests, the dataset-wide metadata files, the registry entry and
transform code, the proprio flag and the vlaprep version. Files are written with temp + rename and
deterministic content, so a retried bundle rewrites the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from typing import Sequence

import numpy as np

from vlaprep import paths
from vlaprep.errors import UserError
from vlaprep.paths import write_bytes_atomic
from vlaprep.pipelines import fingerprint
from vlaprep.pipelines.sources import ResolvedDataset, SourceUnit
from vlaprep.pipelines.stats.records import ACTION, PROPRIO, transform_episode
from vlaprep.schemas.episode import QuarantineRecord
from vlaprep.transforms.registry import DatasetSpec

CACHE_DIR = "stats_cache"


def dataset_fingerprint(item: ResolvedDataset, with_proprio: bool) -> str:
    """The key of ``item``'s entry in ``dataset_statistics.cache.json``: all its source files, the registry
    entry and transform code, the proprio flag and the vlaprep version."""
    files = list(item.files)
    root = paths.commonpath(files) if len(files) > 1 else paths.dirname(files[0]) if files else item.path
    return fingerprint.combine(
        "stats",
        fingerprint.version_fingerprint(),
        item.spec.fingerprint(),
        {"proprio": with_proprio},
        fingerprint.files_fingerprint(files, root),
    )


def unit_key(unit: SourceUnit, spec: DatasetSpec, with_proprio: bool, digests: dict | None = None) -> str:
    """``digests``: ``fingerprint.digests`` of the unit's files (computed for all units at once by callers)."""
    digests = digests if digests is not None else fingerprint.digests(unit.files + unit.shared)
    files = [{"blake2b": digests[f][1]} for f in unit.files]
    shared = [{"name": paths.basename(f), "blake2b": digests[f][1]} for f in unit.shared]
    # By content, not by name: TFDS renames every shard (`-of-000N`) when shards are added.
    files = [f["blake2b"] for f in files]
    # And by the record count dataset_info.json declares for an RLDS shard: a short or missing shard
    # quarantines the records it lacks. An empty or missing shard has no content to tell it apart from
    # another one, so its name does.
    declared = []
    if unit.declared is not None:
        declared.append(unit.declared)
        if not unit.files or all(digests[f][0] == 0 for f in unit.files):
            declared.append(unit.name)
    return fingerprint.combine(
        "stats-unit", fingerprint.version_fingerprint(), spec.fingerprint(), with_proprio, files, shared, *declared
    )


def projection_path(output_dir: str, dataset: str, key: str) -> str:
    return paths.join(output_dir, CACHE_DIR, dataset, f"{key}.npz")


def write_projection(path: str, records: list, quarantine: list, episodes_read: int, prefix: str) -> None:
    """Write one unit's projection atomically; records sorted by episode id (deterministic bytes).

    Episode ids are stored without the unit's ``prefix`` (its split/shard name), which a later run
    re-applies: a shard renamed by TFDS keeps its projection."""
    records = sorted(records, key=lambda r: r.episode_id)

    def local(episode_id: str) -> str:
        if not episode_id.startswith(prefix):
            raise ValueError(f"expected episode ids of this unit to start with {prefix!r}, got {episode_id!r}")
        return episode_id[len(prefix):]

    quarantine = sorted(
        ({**q.to_json_dict(), "episode_id": local(q.episode_id)} for q in quarantine),
        key=lambda q: (q["episode_id"], q["stage"], q["reason"]),
    )
    width = records[0].trajectory.action.shape[1] if records else 0
    pwidth = records[0].trajectory.proprio.shape[1] if records else 0
    meta = {
        "episode_ids": [local(r.episode_id) for r in records],
        "splits": [r.split for r in records],
        "languages": [r.language for r in records],
        "quarantine": quarantine,
        "episodes_read": int(episodes_read),
    }
    buffer = io.BytesIO()
    np.savez(
        buffer,
        action=np.concatenate([r.trajectory.action for r in records]).astype(np.float32) if records else np.zeros((0, width), np.float32),
        proprio=np.concatenate([r.trajectory.proprio for r in records]).astype(np.float32) if records else np.zeros((0, pwidth), np.float32),
        lengths=np.array([r.trajectory.num_steps for r in records], np.int64),
        meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8),
    )
    write_bytes_atomic(path, buffer.getvalue())


class StatsCacheError(UserError):
    """A cached unit projection (``stats_cache/<dataset>/<key>.npz``) vanished or cannot be read."""


@dataclasses.dataclass(frozen=True)
class UnitTask:
    """One unit of one dataset for the statistics pipeline; ``cached``: its projection exists already."""

    dataset: str
    unit: SourceUnit
    path: str  # the unit's projection file
    cached: bool


@dataclasses.dataclass(frozen=True)
class UnitSummary:
    """What the statistics need of a unit besides its rows (which stay in the projection file at ``path``)."""

    dataset: str
    path: str
    episodes_read: int  # episodes the source produced (quarantined "read" records not included)
    num_trajectories: int  # episodes that passed the transform: rows in the projection
    quarantine: tuple[QuarantineRecord, ...]


def _read_projection(path: str, dataset: str):
    try:
        with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("action", "proprio", "lengths")}
            meta = json.loads(z["meta"].tobytes().decode())
    except (FileNotFoundError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise StatsCacheError(
            f"expected a readable cached projection {path!r} of dataset {dataset!r}, got {type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}; hint: rerun with --force to recompute it from the sources"
        ) from e
    return arrays, meta


def project_unit(task: UnitTask, dataset: ResolvedDataset, with_proprio: bool, parser=None) -> UnitSummary:
    """Read, transform and project one unit (or, when ``task.cached``, read its projection's summary).

    Episodes that cannot be read or transformed become quarantine records (stage ``read`` /
    ``transform``), as everywhere; memory is bounded by one unit's compact rows (no images are read).
    ``parser``: ``dataset.parser()``, reused across the dataset's units.
    """
    spec = dataset.spec
    if not task.cached:
        records, quarantine, read = [], [], 0
        for item in dataset.iter_episodes(task.unit, (), parser):
            if isinstance(item, QuarantineRecord):
                quarantine.append(item)
                continue
            read += 1
            try:
                records.append(transform_episode(item, spec, allow_empty=True))
            except ValueError as e:  # transform_episode's contract: the data is not what the entry expects
                quarantine.append(QuarantineRecord(spec.name, item.episode_id, "transform", f"{type(e).__name__}: {e}"))
        write_projection(task.path, records, quarantine, read, task.unit.prefix)
    arrays, meta = _read_projection(task.path, task.dataset)
    prefix = task.unit.prefix
    quarantine = tuple(QuarantineRecord(**{**q, "episode_id": prefix + q["episode_id"]}) for q in meta["quarantine"])
    return UnitSummary(task.dataset, task.path, int(meta["episodes_read"]), int(len(arrays["lengths"])), quarantine)


def unit_matrices(summary: UnitSummary, with_proprio: bool) -> list:
    """-> [((dataset, field), [N, D] float32)]: the unit's rows for each statistics field (none if empty)."""
    arrays, _meta = _read_projection(summary.path, summary.dataset)
    out = []
    if len(arrays["action"]):
        out.append(((summary.dataset, ACTION), arrays["action"]))
        if with_proprio and arrays["proprio"].shape[1] > 0:
            out.append(((summary.dataset, PROPRIO), arrays["proprio"]))
    return out


def plan_units(inputs: Sequence[ResolvedDataset], with_proprio: bool, output_dir: str, force: bool = False) -> list[UnitTask]:
    """-> [UnitTask] for every source unit of every input; ``cached`` where its projection exists (not with ``force``)."""
    tasks = []
    for item in inputs:
        # One listing per dataset, not one existence check per unit (each is a request on object stores).
        projection_dir = paths.dirname(projection_path(output_dir, item.name, "x"))
        present = set() if force else {paths.join(projection_dir, n) for n, _ in paths.list_files(projection_dir)}
        units = item.units
        digests = fingerprint.digests([f for u in units for f in u.files + u.shared])
        for unit in units:
            key = unit_key(unit, item.spec, with_proprio, digests)
            path = projection_path(output_dir, item.name, key)
            tasks.append(UnitTask(item.name, unit, path, path in present))
    return tasks
