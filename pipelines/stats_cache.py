"""Per-source-unit partial state for incremental statistics.

After a unit (one RLDS shard, one CALVIN split) is read and transformed, its compact projection is kept:
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

import io
import json
import os

import numpy as np

from vlaprep import paths
from vlaprep.paths import write_bytes_atomic
from vlaprep.pipelines import fingerprint
from vlaprep.pipelines.sources import SourceUnit
from vlaprep.pipelines.stats import TrajectoryRecord
from vlaprep.schemas.episode import QuarantineRecord
from vlaprep.transforms.base import Trajectory
from vlaprep.transforms.registry import DatasetSpec

CACHE_DIR = "stats_cache"


def unit_key(unit: SourceUnit, spec: DatasetSpec, with_proprio: bool, digests: dict | None = None) -> str:
    """``digests``: ``fingerprint.digests`` of the unit's files (computed for all units at once by callers)."""
    digests = digests if digests is not None else fingerprint.digests(unit.files + unit.shared)
    files = [{"blake2b": digests[f][1]} for f in unit.files]
    shared = [{"name": paths.basename(f), "blake2b": digests[f][1]} for f in unit.shared]
    # By content, not by name: TFDS renames every shard (`-of-000N`) when shards are added.
    files = [f["blake2b"] for f in files]
    return fingerprint.combine("stats-unit", fingerprint.version_fingerprint(), spec.fingerprint(), with_proprio, files, shared)


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


def load_projection(path: str, dataset: str, prefix: str):
    """-> (list[TrajectoryRecord], list[QuarantineRecord], episodes_read), ids under the unit's current ``prefix``."""
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as z:
        action, proprio, lengths = z["action"], z["proprio"], z["lengths"]
        meta = json.loads(z["meta"].tobytes().decode())
    records, start = [], 0
    for episode_id, split, language, n in zip(meta["episode_ids"], meta["splits"], meta["languages"], lengths):
        n = int(n)
        trajectory = Trajectory(action[start : start + n], proprio[start : start + n], np.arange(n, dtype=np.int64))
        records.append(TrajectoryRecord(dataset, prefix + episode_id, split, language, trajectory))
        start += n
    quarantine = [QuarantineRecord(**{**q, "episode_id": prefix + q["episode_id"]}) for q in meta["quarantine"]]
    return records, quarantine, int(meta["episodes_read"])
