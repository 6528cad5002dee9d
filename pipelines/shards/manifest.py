"""The shards manifest (``manifest.json``, written last; ``schemas/manifest.schema.json`` describes it)
and what it makes possible next time: datasets whose rows would come out identical are read back from
the previous output instead of being encoded again (``rows_fingerprint``, ``plan_reuse``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Sequence

import apache_beam as beam
import numpy as np

import vlaprep
from vlaprep import paths
from vlaprep.pipelines import fingerprint
from vlaprep.pipelines.sources import ResolvedDataset
from vlaprep.pipelines.shards.options import ShardOptions
from vlaprep.pipelines.shards.tokenization import TokenizerFiles
from vlaprep.pipelines.stats.cache import dataset_fingerprint
from vlaprep.schemas import layout
from vlaprep.schemas.layout import (
    HELDOUT,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    SPLITS,
    STATISTICS_COPY,
    TRAIN,
)


def _software_versions() -> dict:
    import pyarrow
    import tensorflow as tf
    import transformers

    return {
        "vlaprep": vlaprep.__version__,
        "apache_beam": beam.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "tensorflow": tf.__version__,
        "transformers": transformers.__version__,
        "zlib": __import__("zlib").ZLIB_RUNTIME_VERSION,
    }


def build_manifest(
    inputs: Sequence[ResolvedDataset],
    options: ShardOptions,
    file_infos: list,
    quarantine: list,
    read_counts: dict,
    quarantine_info: dict,
    statistics_bytes: bytes,
    tokenizer_files: TokenizerFiles,
    rows_fingerprints: dict | None = None,
    weights: dict | None = None,
) -> dict:
    """The manifest document; raises RuntimeError if any input episode is unaccounted for.

    ``mixture`` records, per dataset, its sampling ``weight`` (``weights``, default 1.0), its
    ``num_transitions`` from the statistics the rows were normalized with, and OpenVLA's balanced
    ``sampling_probability`` = weight * num_transitions / sum over datasets (``make_interleaved_dataset``
    with ``balance_weights=True``); ``vlaprep.loader.ShardDataset(mixture="manifest")`` samples with it.
    Left out when a dataset's statistics carry no num_transitions."""
    names = sorted(i.name for i in inputs)
    totals = {n: {s: {"episodes": 0, "rows": 0} for s in SPLITS} for n in names}
    splits = {s: {"files": 0, "episodes": 0, "rows": 0, "bytes": 0} for s in SPLITS}
    for info in file_infos:
        split = splits[info["split"]]
        split["files"] += 1
        split["episodes"] += info["episodes"]
        split["rows"] += info["rows"]
        split["bytes"] += info["bytes"]
        for name, counts in info["datasets"].items():
            totals[name][info["split"]]["episodes"] += counts["episodes"]
            totals[name][info["split"]]["rows"] += counts["rows"]
    accounting = {}
    for name in names:
        by_stage: dict[str, int] = {}
        for record in quarantine:
            if record["dataset_name"] == name:
                by_stage[record["stage"]] = by_stage.get(record["stage"], 0) + 1
        # read = episodes the source produced + records it could not read
        read = int(read_counts.get(name, 0)) + by_stage.get("read", 0)
        entry = {
            "read": read,
            "train": totals[name][TRAIN]["episodes"],
            "heldout": totals[name][HELDOUT]["episodes"],
            "quarantined": sum(by_stage.values()),
            "quarantined_by_stage": dict(sorted(by_stage.items())),
        }
        if entry["read"] != entry["train"] + entry["heldout"] + entry["quarantined"]:
            raise RuntimeError(
                f"expected read = train + heldout + quarantined for {name!r}, got {entry!r}; an episode was lost or duplicated"
            )
        accounting[name] = entry
    schema = options.schema()
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "vlaprep_version": vlaprep.__version__,
        "software": _software_versions(),
        "options": options.manifest_dict(),
        "schema": {
            "arrow": schema.to_string(show_schema_metadata=False),
            "columns": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
        },
        "inputs": {
            "statistics": {
                "sha256": hashlib.sha256(statistics_bytes).hexdigest(),
                "bytes": len(statistics_bytes),
                "path": STATISTICS_COPY,
            },
            "tokenizer": tokenizer_files.fingerprint(),
            "datasets": {
                i.name: {
                    "source_format": i.spec.source_format,
                    "registry_fingerprint": i.spec.fingerprint(),
                    **({"rows_fingerprint": rows_fingerprints[i.name]} if rows_fingerprints else {}),
                }
                for i in sorted(inputs, key=lambda i: i.name)
            },
        },
        "splits": splits,
        "datasets": totals,
        "accounting": accounting,
        "files": [
            {k: info[k] for k in ("path", "split", "shard_index", "num_shards", "rows", "episodes", "bytes", "sha256", "row_groups", "datasets")}
            for info in file_infos
        ],
        "quarantine": quarantine_info,
    }
    # OpenVLA's balance_weights: p = weight * num_transitions / sum (num_transitions of the statistics used).
    statistics = json.loads(statistics_bytes)
    transitions = {n: statistics[n].get("num_transitions") if isinstance(statistics.get(n), dict) else None for n in names}
    weights = {n: float((weights or {}).get(n, 1.0)) for n in names}
    if names and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in transitions.values()):
        total = sum(weights[n] * transitions[n] for n in names)
        if total > 0:
            manifest["mixture"] = {n: {"weight": weights[n], "num_transitions": transitions[n],
                                       "sampling_probability": weights[n] * transitions[n] / total} for n in names}
    return manifest


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8")


def rows_fingerprint(item: ResolvedDataset, action_block: dict, options: ShardOptions, tokenizer_files: TokenizerFiles) -> str:
    """Everything a dataset's rows depend on: its sources' content and registry entry (the statistics
    fingerprint, which covers the transform code and vlaprep's version), its normalization statistics,
    the row options (not the shard size target) and the tokenizer files."""
    row_options = {k: v for k, v in options.manifest_dict().items() if k != "target_shard_bytes"}
    return fingerprint.combine(
        "shard-rows", dataset_fingerprint(item, False), action_block, row_options, tokenizer_files.fingerprint()["sha256"]
    )


@dataclasses.dataclass(frozen=True)
class ReusedDataset:
    """One dataset carried over from a previous output: its shard files (path, sha256), its quarantine
    records (JSON lines) and the number of episodes its source produced."""

    files: tuple[tuple[str, str], ...]
    quarantine: tuple[str, ...]
    read: int


def plan_reuse(previous_dir: str | None, fingerprints: dict, options: ShardOptions, log=print) -> dict:
    """{dataset: ReusedDataset} for every input whose rows fingerprint equals the one ``previous_dir``'s
    manifest records (same schema too); {} without a previous output."""
    if previous_dir is None or not paths.isfile(paths.join(previous_dir, MANIFEST_FILE)):
        return {}
    try:
        manifest = layout.read_manifest(previous_dir)
    except layout.ManifestError as e:
        log(f"[shards] previous output {previous_dir} has an unreadable manifest ({str(e)[:200]}); recomputing everything")
        return {}
    if manifest.arrow_schema != options.schema().to_string(show_schema_metadata=False):
        return {}
    recorded = {name: d.get("rows_fingerprint") for name, d in manifest.input_datasets.items()}
    names = [name for name, fp in fingerprints.items() if recorded.get(name) == fp]
    if not names:
        return {}
    lines = paths.read_text(manifest.path(manifest.quarantine["path"])).splitlines()
    reused = {}
    for name in names:
        files = tuple((manifest.path(f.path), f.sha256) for f in manifest.files() if name in f.datasets)
        accounting = manifest.accounting[name]
        reused[name] = ReusedDataset(
            files,
            tuple(line for line in lines if line.strip() and json.loads(line)["dataset_name"] == name),
            accounting["read"] - accounting["quarantined_by_stage"].get("read", 0),
        )
        log(f"[shards] {name}: rows unchanged (fingerprint {fingerprints[name][:12]}), reusing {len(files)} file(s) of {previous_dir}")
    return reused
