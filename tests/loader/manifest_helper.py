"""``write_manifest``: a ``manifest.json`` (+ ``inputs/dataset_statistics.json``) that matches
schemas/manifest.schema.json, around shard files a test wrote itself with pyarrow.

The loader reads manifests only through ``vlaprep.schemas.layout.Manifest`` (schema-checked), so toy
outputs carry every required field; the values that matter to the loader (files, rows, bytes, sha256,
per-file dataset counts, options, statistics num_transitions, mixture) come from the test.

Test modules import it by path (pytest runs with --import-mode=importlib)::

    helper = import_helper()   # see test_loader.py
"""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow.parquet as pq

_ZERO = "0" * 64


def file_entry(root, rel: str, split: str, index: int, count: int, rows_by_dataset: dict[str, tuple[int, int]]) -> dict:
    """One ``files`` entry for ``root/rel``; rows_by_dataset: {dataset: (episodes, rows)}."""
    path = os.path.join(root, rel)
    with open(path, "rb") as f:
        data = f.read()
    return {
        "path": rel, "split": split, "shard_index": index, "num_shards": count,
        "rows": sum(r for _, r in rows_by_dataset.values()), "episodes": sum(e for e, _ in rows_by_dataset.values()),
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "row_groups": pq.read_metadata(path).num_row_groups,
        "datasets": {name: {"episodes": e, "rows": r} for name, (e, r) in sorted(rows_by_dataset.items())},
    }


def write_manifest(root, entries: list[dict], *, options: dict | None = None, num_transitions: dict | None = None,
                   mixture: dict | None = None, action_dim: int = 3) -> dict:
    """Write ``root/manifest.json`` and the statistics copy; returns the document."""
    names = sorted({n for e in entries for n in e["datasets"]} | set(num_transitions or {}))
    totals = {n: {s: {"episodes": 0, "rows": 0} for s in ("train", "heldout")} for n in names}
    splits = {s: {"files": 0, "episodes": 0, "rows": 0, "bytes": 0} for s in ("train", "heldout")}
    for e in entries:
        s = splits[e["split"]]
        s["files"] += 1
        s["episodes"] += e["episodes"]
        s["rows"] += e["rows"]
        s["bytes"] += e["bytes"]
        for n, c in e["datasets"].items():
            totals[n][e["split"]]["episodes"] += c["episodes"]
            totals[n][e["split"]]["rows"] += c["rows"]
    transitions = num_transitions or {n: totals[n]["train"]["rows"] + totals[n]["heldout"]["rows"] for n in names}
    stats = json.dumps({n: {"num_transitions": int(transitions[n]), "num_trajectories": 1} for n in names}).encode()
    os.makedirs(os.path.join(root, "inputs"), exist_ok=True)
    with open(os.path.join(root, "inputs", "dataset_statistics.json"), "wb") as f:
        f.write(stats)
    opts = {"image_size": 8, "cameras": ["primary", "wrist"], "heldout_fraction": 0.05, "seed": 0, "action_chunk": 1,
            "normalization": "bounds_q99", "action_encoding": "uniform", "target_shard_bytes": 1 << 20,
            "action_dim": action_dim, "n_bins": 256, "vocab_size": 32000, "eos_id": 2, "model_max_length": 2048,
            "tokenization": "ids_direct"}
    opts.update(options or {})
    doc = {
        "format": "vlaprep.shards", "format_version": 1, "vlaprep_version": "0.1.0",
        "software": {k: "test" for k in ("vlaprep", "apache_beam", "numpy", "pyarrow", "tensorflow", "transformers", "zlib")},
        "options": opts,
        "schema": {"arrow": "test", "columns": [{"name": "action", "type": "test", "nullable": False}]},
        "inputs": {
            "statistics": {"sha256": hashlib.sha256(stats).hexdigest(), "bytes": len(stats), "path": "inputs/dataset_statistics.json"},
            "tokenizer": {"sha256": _ZERO, "files": [{"name": "tokenizer.json", "bytes": 1, "sha256": _ZERO}]},
            "datasets": {n: {"source_format": "rlds", "registry_fingerprint": _ZERO} for n in names},
        },
        "splits": splits,
        "datasets": totals,
        "accounting": {n: {"read": totals[n]["train"]["episodes"] + totals[n]["heldout"]["episodes"],
                           "train": totals[n]["train"]["episodes"], "heldout": totals[n]["heldout"]["episodes"],
                           "quarantined": 0, "quarantined_by_stage": {}} for n in names},
        "files": sorted(entries, key=lambda e: e["path"]),
        "quarantine": {"path": "quarantine/quarantine.jsonl", "records": 0, "bytes": 0,
                       "sha256": hashlib.sha256(b"").hexdigest()},
    }
    if mixture is not None:
        doc["mixture"] = mixture
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(doc, f)
    return doc
