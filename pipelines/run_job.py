"""``vlaprep run --config run.yaml``: statistics -> shards -> validation for a list of datasets.

Outputs in the config's ``output`` directory:
  stats/        dataset_statistics.json (+ cache, quarantine, histograms)      ``vlaprep stats``
  shards/       train/ heldout/ quarantine/ manifest.json                       ``vlaprep shards``
  validation/   validation_report.json, predictions.jsonl                       ``vlaprep validate``
  run_state.json   per stage: fingerprint of its inputs and options, when it last ran
  run_summary.json the accounting and headline numbers of the last run

A stage is reused when the fingerprint of its inputs is unchanged (statistics also per dataset, see
``stats_job``): shards depend on the datasets' content, the statistics file, the tokenizer files and
the shard options; validation on the shards manifest, the model files and the validation options.

Config (YAML)::

    output: runs/demo
    tokenizer: path/to/tokenizer          # local Hugging Face tokenizer directory
    model: path/to/model                  # optional: no validation stage without it
    registry: my_registry.yaml            # optional, custom datasets
    datasets:
      - {name: bridge_orig, path: data/bridge_orig/1.0.0, weight: 1.0}
      - {name: calvin, path: data/calvin}
    stats: {proprio: false}
    shards: {heldout_fraction: 0.05, seed: 0, image_size: 224, cameras: primary, target_shard_mb: 256,
             action_chunk: 1, normalization: bounds_q99, action_encoding: uniform}
    validate: {split: heldout, batch_size: 8, device: auto, max_samples: 256}
    beam_args: ["--direct_num_workers=2"]   # any Beam pipeline options; the command line adds to them

Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import yaml

from vlaprep.pipelines import fingerprint
from vlaprep.pipelines.stats_job import DatasetInput, dataset_fingerprint, run_stats, summary_table, write_json_atomic
from vlaprep.transforms.registry import get_spec, merged_registry

STATE_FILE = "run_state.json"
SUMMARY_FILE = "run_summary.json"
_TOP_KEYS = {"output", "tokenizer", "model", "registry", "datasets", "stats", "shards", "validate", "beam_args", "trust_remote_code"}
_SHARD_KEYS = {"heldout_fraction", "seed", "image_size", "cameras", "target_shard_mb", "action_chunk", "normalization", "action_encoding"}
_VALIDATE_KEYS = {"split", "batch_size", "device", "max_samples"}


class RunConfigError(ValueError):
    """The run config is malformed: reported as one line."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    output: str
    tokenizer: str
    model: str | None
    registry: str | None
    datasets: tuple[dict, ...]
    stats: dict
    shards: dict
    validate: dict
    beam_args: tuple[str, ...]
    trust_remote_code: bool = False


def _resolve(base: str, path: str | None) -> str | None:
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) or "://" in path else os.path.normpath(os.path.join(base, path))


def load_run_config(path: str) -> RunConfig:
    if not os.path.isfile(path):
        raise RunConfigError(f"expected a run config file, got {path!r}, which does not exist")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise RunConfigError(f"expected a mapping at the top of {path}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise RunConfigError(f"expected keys among {sorted(_TOP_KEYS)} in {path}, got unknown {unknown}")
    for key in ("output", "tokenizer", "datasets"):
        if key not in raw:
            raise RunConfigError(f"expected {key!r} in {path}; see `vlaprep run --help` for the layout")
    base = os.path.dirname(os.path.abspath(path))
    datasets = []
    for i, entry in enumerate(raw["datasets"] or []):
        if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
            raise RunConfigError(f"expected datasets[{i}] to be {{name: ..., path: ...}} in {path}, got {entry!r}")
        extra = sorted(set(entry) - {"name", "path", "weight"})
        if extra:
            raise RunConfigError(f"expected datasets[{i}] keys name, path, weight in {path}, got unknown {extra}")
        weight = float(entry.get("weight", 1.0))
        if not weight > 0:
            raise RunConfigError(f"expected a positive weight for dataset {entry['name']!r} in {path}, got {weight}")
        datasets.append({"name": str(entry["name"]), "path": _resolve(base, entry["path"]), "weight": weight})
    if not datasets:
        raise RunConfigError(f"expected at least one dataset in {path}")
    shards = dict(raw.get("shards") or {})
    validate = dict(raw.get("validate") or {})
    for section, allowed, given in (("shards", _SHARD_KEYS, shards), ("validate", _VALIDATE_KEYS, validate)):
        bad = sorted(set(given) - allowed)
        if bad:
            raise RunConfigError(f"expected {section} keys among {sorted(allowed)} in {path}, got unknown {bad}")
    return RunConfig(
        output=_resolve(base, raw["output"]),
        tokenizer=_resolve(base, raw["tokenizer"]),
        model=_resolve(base, raw.get("model")),
        registry=_resolve(base, raw.get("registry")),
        datasets=tuple(datasets),
        stats=dict(raw.get("stats") or {}),
        shards=shards,
        validate=validate,
        beam_args=tuple(str(a) for a in raw.get("beam_args") or ()),
        trust_remote_code=bool(raw.get("trust_remote_code", False)),
    )


def _dataset_inputs(config: RunConfig) -> list[DatasetInput]:
    registry = merged_registry(config.registry)
    inputs = []
    for entry in config.datasets:
        try:
            spec = get_spec(entry["name"], registry)
        except KeyError as e:
            raise RunConfigError(str(e.args[0])) from None
        if not os.path.exists(entry["path"]):
            raise RunConfigError(f"expected an existing path for dataset {entry['name']!r}, got {entry['path']!r}")
        inputs.append(DatasetInput(entry["name"], entry["path"], spec))
    return inputs


def _dir_fingerprint(path: str) -> list:
    files = [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
    return fingerprint.files_fingerprint(files, path)


def stage_fingerprints(config: RunConfig, inputs: Sequence[DatasetInput]) -> dict:
    """Fingerprints of what each stage reads, computable before running anything."""
    datasets = {i.name: dataset_fingerprint(i, bool(config.stats.get("proprio", False))) for i in inputs}
    stats_fp = fingerprint.combine("stats", datasets, config.stats)
    shards_fp = fingerprint.combine("shards", stats_fp, _dir_fingerprint(config.tokenizer), config.shards,
                                    {d["name"]: d["weight"] for d in config.datasets})
    fps = {"stats": stats_fp, "shards": shards_fp}
    if config.model:
        fps["validate"] = fingerprint.combine("validate", shards_fp, _dir_fingerprint(config.model), config.validate)
    return fps


def _load_state(output: str) -> dict:
    path = os.path.join(output, STATE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _stage_done(state: dict, stage: str, fp: str, output_ok: bool) -> bool:
    return output_ok and state.get(stage, {}).get("fingerprint") == fp


def run_pipeline_config(config: RunConfig, beam_args: Sequence[str] = (), force: bool = False, log=print) -> dict:
    """Run the three stages; return the run summary (also written to ``output/run_summary.json``)."""
    from vlaprep.pipelines.shards_job import run_shards, summary, verify_output

    started = time.time()
    args = list(config.beam_args) + list(beam_args)
    inputs = _dataset_inputs(config)
    os.makedirs(config.output, exist_ok=True)
    state = _load_state(config.output)
    fps = stage_fingerprints(config, inputs)
    stats_dir = os.path.join(config.output, "stats")
    shards_dir = os.path.join(config.output, "shards")
    val_dir = os.path.join(config.output, "validation")
    summary_doc: dict[str, Any] = {"datasets": [d["name"] for d in config.datasets], "stages": {}}

    log(f"[run] 1/3 statistics for {', '.join(i.name for i in inputs)}")
    stats = run_stats(inputs, stats_dir, with_proprio=bool(config.stats.get("proprio", False)), force=force, beam_args=args, log=log)
    log(summary_table(stats))
    summary_doc["stages"]["stats"] = {"computed": stats.computed, "reused": stats.reused, "quarantined": len(stats.quarantine)}
    state["stats"] = {"fingerprint": fps["stats"]}
    write_json_atomic(os.path.join(config.output, STATE_FILE), state)

    statistics_file = os.path.join(stats_dir, "dataset_statistics.json")
    shards_ok = False
    if os.path.exists(os.path.join(shards_dir, "manifest.json")):
        try:
            verify_output(shards_dir)
            shards_ok = True
        except (ValueError, OSError):
            shards_ok = False
    if not force and _stage_done(state, "shards", fps["shards"], shards_ok):
        log(f"[run] 2/3 shards: inputs unchanged (fingerprint {fps['shards'][:12]}), reusing {shards_dir}")
        with open(os.path.join(shards_dir, "manifest.json")) as f:
            manifest = json.load(f)
        summary_doc["stages"]["shards"] = {"reused": True}
    else:
        log("[run] 2/3 shards (tokenize, resize images, write Parquet)")
        result = run_shards(inputs, statistics_file, config.tokenizer, shards_dir, beam_args=args, log=log, **config.shards)
        manifest = result.manifest
        log(summary(result))
        summary_doc["stages"]["shards"] = {"reused": False, "seconds": round(result.seconds, 2)}
        state["shards"] = {"fingerprint": fps["shards"]}
        write_json_atomic(os.path.join(config.output, STATE_FILE), state)
    summary_doc["accounting"] = manifest["accounting"]
    summary_doc["splits"] = manifest["splits"]

    if config.model:
        from vlaprep.pipelines.validate_job import run_validate, summary_text

        report_path = os.path.join(val_dir, "validation_report.json")
        if not force and _stage_done(state, "validate", fps["validate"], os.path.exists(report_path)):
            log(f"[run] 3/3 validation: inputs unchanged, reusing {report_path}")
            with open(report_path) as f:
                report = json.load(f)
        else:
            log("[run] 3/3 validation (model inference over held-out episodes)")
            v = config.validate
            report = run_validate(
                shards_dir, config.model, val_dir, split=v.get("split", "heldout"), batch_size=int(v.get("batch_size", 8)),
                device=v.get("device", "auto"), max_samples=v.get("max_samples"), trust_remote_code=config.trust_remote_code,
                statistics=statistics_file, beam_args=args, log=log,
            ).report
            state["validate"] = {"fingerprint": fps["validate"]}
            write_json_atomic(os.path.join(config.output, STATE_FILE), state)
        log(summary_text(report))
        summary_doc["validation"] = {"report": os.path.relpath(report_path, config.output)}
    else:
        log("[run] 3/3 validation skipped: no `model` in the config")
    summary_doc["seconds"] = round(time.time() - started, 2)
    write_json_atomic(os.path.join(config.output, SUMMARY_FILE), summary_doc)
    return summary_doc


def status(config_or_output: str) -> str:
    """What was produced when, from which inputs, and what a run would redo (needs the config)."""
    lines = []
    if os.path.isfile(config_or_output):
        config = load_run_config(config_or_output)
        output = config.output
        fps = stage_fingerprints(config, _dataset_inputs(config))
    else:
        config, output, fps = None, config_or_output, {}
    state = _load_state(output)
    if not state:
        return f"{output}: no vlaprep run has completed a stage here"
    for stage in ("stats", "shards", "validate"):
        if stage not in state:
            lines.append(f"{stage:9} never ran")
            continue
        fp = state[stage]["fingerprint"]
        if fps:
            redo = "up to date" if fps.get(stage) == fp else "would be recomputed (inputs changed)"
        else:
            redo = "pass the run config to see what a run would redo"
        lines.append(f"{stage:9} fingerprint {fp[:12]}  {redo}")
    manifest = os.path.join(output, "shards", "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            m = json.load(f)
        for split, s in m.get("splits", {}).items():
            lines.append(f"  shards/{split}: {s['files']} files, {s['episodes']} episodes, {s['rows']} rows")
        for name, acc in m.get("accounting", {}).items():
            lines.append(f"  {name}: read {acc['read']}, train {acc['train']}, heldout {acc['heldout']}, quarantined {acc['quarantined']}")
    return f"{output}\n" + "\n".join(lines)
