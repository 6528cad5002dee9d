"""``vlaprep run --config run.yaml``: statistics -> shards -> validation for a list of datasets.

Outputs in the config's ``output`` directory (immutable versions + an atomic pointer):
  LATEST                      {"version", "fingerprints" per stage, "history"}: replaced last, atomically
  current -> versions/<version>   convenience symlink, replaced right after LATEST
  versions/<version>/stats/        dataset_statistics.json (+ cache, quarantine, histograms)
  versions/<version>/shards/       train/ heldout/ quarantine/ manifest.json
  versions/<version>/validation/   validation_report.json, predictions.jsonl
  versions/<version>/run_summary.json   accounting and headline numbers
Training jobs read ``LATEST`` and then ``versions/<version>/shards`` (``vlaprep.loader`` does this).

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
    keep_versions: 3                        # published versions kept (newest first)

Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import yaml

from vlaprep.errors import UserError
from vlaprep import paths
from vlaprep.paths import confined
from vlaprep.pipelines import fingerprint
from vlaprep.pipelines.stats_job import CACHE_FILE, DatasetInput, dataset_fingerprint, run_stats, summary_table, write_json_atomic
from vlaprep.transforms.registry import get_spec, merged_registry

SUMMARY_FILE = "run_summary.json"
LATEST_FILE = "LATEST"
CURRENT_LINK = "current"
VERSIONS_DIR = "versions"
_TOP_KEYS = {"output", "tokenizer", "model", "registry", "datasets", "stats", "shards", "validate", "beam_args",
             "trust_remote_code", "keep_versions"}
_SHARD_KEYS = {"heldout_fraction", "seed", "image_size", "cameras", "target_shard_mb", "action_chunk", "normalization", "action_encoding"}
_VALIDATE_KEYS = {"split", "batch_size", "device", "max_samples"}


class RunConfigError(UserError):
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
    keep_versions: int = 3


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
        keep_versions=int(raw.get("keep_versions", 3)),
    )


def _dataset_inputs(config: RunConfig) -> list[DatasetInput]:
    registry = merged_registry(config.registry)
    inputs = []
    for entry in config.datasets:
        try:
            spec = get_spec(entry["name"], registry)
        except KeyError as e:
            raise RunConfigError(str(e.args[0])) from None
        if not paths.exists(entry["path"]) and not paths.isdir(entry["path"]):
            raise RunConfigError(f"expected an existing path for dataset {entry['name']!r}, got {entry['path']!r}")
        inputs.append(DatasetInput(entry["name"], entry["path"], spec))
    return inputs


def _dir_fingerprint(path: str) -> list:
    return fingerprint.files_fingerprint([paths.join(path, n) for n, _ in paths.list_files(path)], path)


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


def _read_json(path: str) -> dict:
    if paths.isfile(path):
        return json.loads(paths.read_text(path))
    return {}


def read_latest(output: str) -> dict:
    """The published pointer ``{"version", "fingerprints", "history"}``, or {} before the first publish."""
    return _read_json(paths.join(output, LATEST_FILE))


def latest_version_dir(output: str) -> str | None:
    latest = read_latest(output)
    return confined(paths.join(output, VERSIONS_DIR), latest["version"], LATEST_FILE) if latest else None


def _link_tree(src: str, dst: str) -> None:
    """Carry an unchanged stage over into the new version: hard links (published files are immutable);
    in an object store, server-side copies."""
    if paths.is_remote(dst):
        paths.remove_tree(dst)
        paths.copy_tree(src, dst)
        return
    import shutil

    tmp = f"{dst}.carry-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for root, _dirs, names in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(tmp, rel), exist_ok=True)
        for name in names:
            a, b = os.path.join(root, name), os.path.join(tmp, rel, name)
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _point_current(output: str, version: str) -> None:
    """``OUT/current`` -> ``versions/<version>`` for people and tools that prefer a path; replaced atomically."""
    if paths.is_remote(output):
        return  # object stores have no symlinks; LATEST is the pointer
    link = os.path.join(output, CURRENT_LINK)
    tmp = f"{link}.tmp-{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join(VERSIONS_DIR, version), tmp)
        os.replace(tmp, link)
    except OSError:
        pass  # a filesystem without symlinks still has LATEST, the source of truth


def _apply_retention(output: str, keep: list[str]) -> list[str]:
    versions_root = paths.join(output, VERSIONS_DIR)
    removed = []
    for name in paths.listdir(versions_root):
        if name not in keep:
            paths.remove_tree(paths.join(versions_root, name))
            removed.append(name)
    return removed


def run_pipeline_config(config: RunConfig, beam_args: Sequence[str] = (), force: bool = False, log=print) -> dict:
    """Run the three stages into an immutable version directory, then publish it.

    ``OUT/versions/<version>/{stats,shards,validation}`` where ``version`` is derived from the stage
    fingerprints (same inputs and options -> same version). Stages whose fingerprint equals the
    previous version's are carried over by hard links; statistics are also reused per dataset. Only
    when every stage succeeded is ``OUT/LATEST`` replaced (temp + rename): a reader that follows it
    never sees a half-written version, and an interrupted run leaves the previous version published.
    Versions beyond ``keep_versions`` (newest first) are then deleted.
    """
    from vlaprep.pipelines.shards_job import run_shards, summary

    started = time.time()
    args = list(config.beam_args) + list(beam_args)
    inputs = _dataset_inputs(config)
    paths.makedirs(paths.join(config.output, VERSIONS_DIR))
    fps = stage_fingerprints(config, inputs)
    version = "v-" + fingerprint.combine(fps)[:16]
    latest = read_latest(config.output)
    previous = latest_version_dir(config.output)
    previous_fps = latest.get("fingerprints", {}) if latest else {}
    vdir = paths.join(config.output, VERSIONS_DIR, version)
    if latest.get("version") == version:
        if not force:
            log(f"[run] {version} is published and its inputs are unchanged: nothing to do")
            return _read_json(paths.join(vdir, SUMMARY_FILE))
        # A published version is immutable: a forced rebuild of the same inputs gets its own directory.
        version = f"{version}-r{int(time.time())}"
        vdir = paths.join(config.output, VERSIONS_DIR, version)
    paths.makedirs(vdir)
    stats_dir, shards_dir, val_dir = (paths.join(vdir, d) for d in ("stats", "shards", "validation"))
    summary_doc: dict[str, Any] = {
        "version": version,
        "datasets": {d["name"]: {"path": d["path"], "weight": d["weight"]} for d in config.datasets},
        "stages": {},
    }

    log(f"[run] building {version} in {vdir}")
    log(f"[run] 1/3 statistics for {', '.join(i.name for i in inputs)}")
    if previous and not force and paths.isfile(paths.join(previous, "stats", CACHE_FILE)) and not paths.isfile(paths.join(stats_dir, CACHE_FILE)):
        paths.makedirs(stats_dir)  # per-dataset reuse: unchanged datasets are not re-read
        paths.copy_file(paths.join(previous, "stats", CACHE_FILE), paths.join(stats_dir, CACHE_FILE))
    stats = run_stats(inputs, stats_dir, with_proprio=bool(config.stats.get("proprio", False)), force=force, beam_args=args, log=log)
    log(summary_table(stats))
    summary_doc["stages"]["stats"] = {"computed": stats.computed, "reused": stats.reused, "quarantined": len(stats.quarantine)}

    statistics_file = paths.join(stats_dir, "dataset_statistics.json")
    def carry_over(stage: str, directory: str, marker: str) -> bool:
        """Reuse a whole stage of the previous version when its input fingerprint is unchanged."""
        if not previous or force or previous_fps.get(stage) != fps[stage] or not paths.isfile(paths.join(previous, directory, marker)):
            return False
        log(f"[run] {stage}: inputs unchanged (fingerprint {fps[stage][:12]}), carried over from {latest['version']}")
        if previous.rstrip("/") != vdir.rstrip("/"):
            _link_tree(paths.join(previous, directory), paths.join(vdir, directory))
        summary_doc["stages"][stage] = {"reused": True}
        return True

    if not carry_over("shards", "shards", "manifest.json"):
        log("[run] 2/3 shards (tokenize, resize images, write Parquet)")
        # Datasets whose rows are unchanged are read back from the previous version's shards.
        reuse = paths.join(previous, "shards") if previous and not force else None
        result = run_shards(inputs, statistics_file, config.tokenizer, shards_dir, beam_args=args, log=log,
                            reuse_from=reuse, **config.shards)
        log(summary(result))
        summary_doc["stages"]["shards"] = {"reused": False, "seconds": round(result.seconds, 2)}
    manifest = _read_json(paths.join(shards_dir, "manifest.json"))
    summary_doc["accounting"] = manifest["accounting"]
    summary_doc["splits"] = manifest["splits"]

    if config.model:
        from vlaprep.pipelines.validate_job import run_validate, summary_text

        report_path = paths.join(val_dir, "validation_report.json")
        if not carry_over("validate", "validation", "validation_report.json"):
            log("[run] 3/3 validation (model inference over held-out episodes)")
            v = config.validate
            run_validate(
                shards_dir, config.model, val_dir, split=v.get("split", "heldout"), batch_size=int(v.get("batch_size", 8)),
                device=v.get("device", "auto"), max_samples=v.get("max_samples"), trust_remote_code=config.trust_remote_code,
                beam_args=args, log=log,
            )
            summary_doc["stages"]["validate"] = {"reused": False}
        report = _read_json(report_path)
        log(summary_text(report))
        summary_doc["validation"] = {
            "report": paths.relpath(report_path, vdir),
            "exact_accuracy": report.get("model", {}).get("overall", {}).get("exact_accuracy"),
        }
    else:
        log("[run] 3/3 validation skipped: no `model` in the config")
    summary_doc["seconds"] = round(time.time() - started, 2)
    write_json_atomic(paths.join(vdir, SUMMARY_FILE), summary_doc)
    # Publish: the pointer is replaced last, atomically.
    history = [version] + [v for v in latest.get("history", []) if v != version]
    keep = history[: max(1, config.keep_versions)]
    write_json_atomic(paths.join(config.output, LATEST_FILE), {"version": version, "fingerprints": fps, "history": keep})
    _point_current(config.output, version)
    removed = _apply_retention(config.output, keep)
    if removed:
        log(f"[run] retention: removed {', '.join(removed)} (keeping {len(keep)} versions)")
    log(f"[run] published {version}: {paths.join(config.output, LATEST_FILE)} -> {vdir}")
    return summary_doc


def status(config_or_output: str) -> str:
    """What is published, from which inputs, and (given the config) what a run would redo."""
    if os.path.isfile(config_or_output):
        config = load_run_config(config_or_output)
        output = config.output
        fps = stage_fingerprints(config, _dataset_inputs(config))
    else:
        config, output, fps = None, config_or_output, {}
    latest = read_latest(output)
    if not latest:
        return f"{output}: nothing published yet (no {LATEST_FILE})"
    vdir = latest_version_dir(output)
    summary_doc = _read_json(paths.join(vdir, SUMMARY_FILE))
    published = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(paths.getmtime(paths.join(output, LATEST_FILE))))
    lines = [f"{output}: published {latest['version']} at {published} (kept: {', '.join(latest.get('history', []))})"]
    for name, d in summary_doc.get("datasets", {}).items():
        lines.append(f"  input {name}: {d['path']} (weight {d['weight']})")
    for stage in ("stats", "shards", "validate"):
        fp = latest["fingerprints"].get(stage)
        if fp is None:
            lines.append(f"  {stage:9} not part of this version")
            continue
        if fps:
            redo = "up to date" if fps.get(stage) == fp else "would be recomputed (inputs changed)"
        else:
            redo = "pass the run config to see what a run would redo"
        lines.append(f"  {stage:9} fingerprint {fp[:12]}  {redo}")
    for split, s_ in summary_doc.get("splits", {}).items():
        lines.append(f"  shards/{split}: {s_['files']} files, {s_['episodes']} episodes, {s_['rows']} rows")
    for name, acc in summary_doc.get("accounting", {}).items():
        lines.append(f"  {name}: read {acc['read']}, train {acc['train']}, heldout {acc['heldout']}, quarantined {acc['quarantined']}")
    return "\n".join(lines)
