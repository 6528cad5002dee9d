"""A complete, schema-valid ``manifest.json`` for shards written by hand in a test.

``write_manifest(root, ...)`` describes the Parquet files already under ``root/{train,heldout}/``
(rows, episodes, bytes, sha256, row groups and per-dataset counts, all read back from the files), copies
the statistics to ``root/inputs/dataset_statistics.json`` (or writes the counts a reader needs when the
test has no statistics file), writes ``root/quarantine/quarantine.jsonl``, checks the document against
``schemas/manifest.schema.json`` and writes ``root/manifest.json``: the output ``vlaprep shards`` would
have written for those files, so readers (validation, the loader) see what they see in production.

Test modules run in pytest's importlib mode (``tests`` is not a package): they load this file with
``importlib.util.spec_from_file_location`` rather than importing it by name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow.parquet as pq

import vlaprep
from vlaprep.schemas import layout, validate_json
from vlaprep.schemas.episode import quarantine_jsonl

# Options the hand-written tests do not vary; ``write_manifest``'s ``options`` override them.
OPTION_DEFAULTS = {
    "cameras": ["primary"],
    "heldout_fraction": 0.5,
    "seed": 0,
    "action_chunk": 1,
    "normalization": "bounds_q99",
    "action_encoding": "uniform",
    "target_shard_bytes": 1 << 27,
    "n_bins": 256,
    "eos_id": 2,
    "model_max_length": 2048,
    "tokenization": "text_round_trip",
}
# A hand-written output read without a tokenizer (the loader's tests) records this one.
_STAND_IN_TOKENIZER = {"sha256": "0" * 64, "files": [{"name": "tokenizer.json", "bytes": 1, "sha256": "0" * 64}]}
_SHARD_NAME = re.compile(r"^shard-(\d{5})-of-(\d{5})\.parquet$")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _tokenizer_fingerprint(tokenizer) -> dict:
    """``inputs.tokenizer`` as ``vlaprep shards`` records it: the directory's files (a tokenizer object is
    saved to a temporary directory first)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return _directory_fingerprint(os.fspath(tokenizer))
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return _directory_fingerprint(directory)


def _directory_fingerprint(directory: str) -> dict:
    files = []
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if os.path.isfile(full):
            data = pathlib.Path(full).read_bytes()
            files.append({"name": name, "bytes": len(data), "sha256": _sha256(data)})
    combined = _sha256(json.dumps([[f["name"], f["sha256"]] for f in files]).encode())
    return {"sha256": combined, "files": files}


def _describe_shard(root: str, relative: str) -> tuple[dict, dict[str, set]]:
    """One ``files[]`` entry read back from the Parquet file, and its episodes per dataset."""
    full = os.path.join(root, relative)
    data = pathlib.Path(full).read_bytes()
    split, name = relative.split("/")
    index, count = (int(g) for g in _SHARD_NAME.match(name).groups())
    table = pq.read_table(full, columns=["dataset_name", "episode_id"])
    episodes: dict[str, set] = {}
    rows: dict[str, int] = {}
    for dataset, episode in zip(table["dataset_name"].to_pylist(), table["episode_id"].to_pylist()):
        episodes.setdefault(dataset, set()).add(episode)
        rows[dataset] = rows.get(dataset, 0) + 1
    entry = {
        "path": relative, "split": split, "shard_index": index, "num_shards": count, "rows": table.num_rows,
        "episodes": sum(len(e) for e in episodes.values()), "bytes": len(data), "sha256": _sha256(data),
        "row_groups": pq.read_metadata(full).num_row_groups,
        "datasets": {d: {"episodes": len(episodes[d]), "rows": rows[d]} for d in sorted(episodes)},
    }
    return entry, episodes


def write_manifest(
    root: str | os.PathLike,
    *,
    options: Mapping[str, Any],
    statistics_path: str | os.PathLike | None = None,
    tokenizer=None,
    quarantine: Iterable[Mapping[str, Any]] = (),
    num_transitions: Mapping[str, int] | None = None,
    mixture: Mapping[str, Any] | None = None,
) -> dict:
    """Write ``root``'s ``inputs/``, ``quarantine/`` and ``manifest.json`` for the shards already in it.

    ``options``: at least ``image_size``, ``action_dim`` and ``vocab_size`` (the rest default to
    ``OPTION_DEFAULTS``); ``statistics_path``: the statistics the shards were written with, or None for
    ``{dataset: {num_transitions, num_trajectories: 1}}`` (``num_transitions``: default each dataset's rows);
    ``tokenizer``: its directory, the tokenizer object, or None (a stand-in record); ``quarantine``: the
    records of ``quarantine/quarantine.jsonl`` (each counted as a read episode of its dataset); ``mixture``:
    the manifest's ``mixture`` block. Returns the document, checked against ``schemas/manifest.schema.json``."""
    root = os.fspath(root)
    os.makedirs(os.path.join(root, layout.INPUTS_DIR), exist_ok=True)
    records = sorted((dict(r) for r in quarantine), key=lambda r: (r["dataset_name"], r["episode_id"], r["stage"]))
    quarantine_bytes = quarantine_jsonl(records)  # the one writer of quarantine.jsonl
    os.makedirs(os.path.join(root, layout.QUARANTINE_DIR), exist_ok=True)
    pathlib.Path(root, layout.SHARDS_QUARANTINE_FILE).write_bytes(quarantine_bytes)

    files, episodes = [], {split: {} for split in layout.SPLITS}  # split -> dataset -> episode ids
    for split in layout.SPLITS:
        directory = os.path.join(root, split)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            entry, in_file = _describe_shard(root, f"{split}/{name}")
            files.append(entry)
            for dataset, ids in in_file.items():
                episodes[split].setdefault(dataset, set()).update(ids)
    names = sorted({d for f in files for d in f["datasets"]} | {r["dataset_name"] for r in records} | set(num_transitions or {}))
    if statistics_path is not None:
        shutil.copyfile(statistics_path, os.path.join(root, layout.STATISTICS_COPY))
    else:
        rows = {n: sum(f["datasets"].get(n, {}).get("rows", 0) for f in files) for n in names}
        counts = {n: {"num_transitions": int((num_transitions or rows)[n]), "num_trajectories": 1} for n in names}
        pathlib.Path(root, layout.STATISTICS_COPY).write_text(json.dumps(counts))
    statistics = pathlib.Path(root, layout.STATISTICS_COPY).read_bytes()
    totals = {
        name: {
            split: {
                "episodes": len(episodes[split].get(name, ())),
                "rows": sum(f["datasets"].get(name, {}).get("rows", 0) for f in files if f["split"] == split),
            }
            for split in layout.SPLITS
        }
        for name in names
    }
    accounting = {}
    for name in names:
        by_stage: dict[str, int] = {}
        for r in records:
            if r["dataset_name"] == name:
                by_stage[r["stage"]] = by_stage.get(r["stage"], 0) + 1
        kept = {split: totals[name][split]["episodes"] for split in layout.SPLITS}
        accounting[name] = {"read": sum(kept.values()) + sum(by_stage.values()), **kept,
                            "quarantined": sum(by_stage.values()), "quarantined_by_stage": by_stage}
    # Read back from Parquet, so list items are named "element" where the writer's schema says "item"
    # (only ``vlaprep shards``' reuse compares this string, never with a hand-written output).
    schema = pq.read_schema(os.path.join(root, files[0]["path"]))
    document = {
        "format": layout.MANIFEST_FORMAT,
        "format_version": layout.MANIFEST_FORMAT_VERSION,
        "vlaprep_version": vlaprep.__version__,
        "software": {
            "vlaprep": vlaprep.__version__, "apache_beam": _version("apache-beam"), "numpy": _version("numpy"),
            "pyarrow": _version("pyarrow"), "tensorflow": _version("tensorflow"),
            "transformers": _version("transformers"), "zlib": zlib.ZLIB_VERSION,
        },
        "options": {**OPTION_DEFAULTS, **options},
        "schema": {
            "arrow": schema.to_string(show_schema_metadata=False),
            "columns": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
        },
        "inputs": {
            "statistics": {"sha256": _sha256(statistics), "bytes": len(statistics), "path": layout.STATISTICS_COPY},
            "tokenizer": _tokenizer_fingerprint(tokenizer) if tokenizer is not None else _STAND_IN_TOKENIZER,
            # A hand-written output has no registry entry: a stand-in digest of the name.
            "datasets": {name: {"source_format": "rlds", "registry_fingerprint": _sha256(name.encode())} for name in names},
        },
        "splits": {
            split: {
                "files": sum(f["split"] == split for f in files),
                "episodes": sum(len(ids) for ids in episodes[split].values()),
                "rows": sum(f["rows"] for f in files if f["split"] == split),
                "bytes": sum(f["bytes"] for f in files if f["split"] == split),
            }
            for split in layout.SPLITS
        },
        "datasets": totals,
        "accounting": accounting,
        "files": sorted(files, key=lambda f: f["path"]),
        "quarantine": {"path": layout.SHARDS_QUARANTINE_FILE, "records": len(records), "bytes": len(quarantine_bytes),
                       "sha256": _sha256(quarantine_bytes)},
    }
    if mixture is not None:
        document["mixture"] = dict(mixture)
    validate_json(document, "manifest")
    pathlib.Path(root, layout.MANIFEST_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return document
