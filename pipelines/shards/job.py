"""``vlaprep shards``: check the arguments, run the shard pipeline, publish the output atomically.

Output in ``OUT`` (names are the contract: ``vlaprep.schemas.layout``; ``schemas/manifest.schema.json``
describes the manifest):
  train/shard-00000-of-0000N.parquet     training rows (``schemas/shards.py``)
  heldout/shard-00000-of-0000M.parquet   held-out episodes (hash of seed, dataset, episode_id)
  quarantine/quarantine.jsonl            one record per rejected episode: dataset_name, episode_id, stage, reason
  inputs/dataset_statistics.json         the statistics the rows were normalized with
  manifest.json                          written LAST: every file with rows, episodes, bytes, sha256;
                                         totals, accounting, schema, input fingerprints, options

Every argument is checked before any Beam work (``run_shards``: options, inputs, OUT, statistics,
tokenizer). The pipeline's last step (``ShardsFinalizer``, after every shard is written) checks the
files and the accounting and publishes (``publish.publish``), so a run submitted without waiting
(``--no-wait``, Dataflow Flex Templates) publishes by itself. It refuses (``PublishRefused``; OUT stays
as it was) when no episode is kept, unless ``allow_empty``, and when OUT gained foreign entries since
the launch (``publish.foreign_entries``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from typing import Sequence

import apache_beam as beam
import numpy as np

from vlaprep import paths
from vlaprep.errors import in_chain
from vlaprep.paths import write_bytes_atomic
from vlaprep.pipelines.job import DatasetInput, beam_options, resolve_datasets
from vlaprep.pipelines.sources import ResolvedDataset
from vlaprep.pipelines.shards.beam import build_shards_pipeline
from vlaprep.pipelines.shards.manifest import build_manifest, manifest_bytes, plan_reuse, rows_fingerprint
from vlaprep.pipelines.shards.options import ShardOptions, ShardsArgumentError, check_options
from vlaprep.pipelines.shards.publish import (
    OUTPUT_ENTRIES,
    OWNER_FILE,
    STAGING_PREFIX,
    WORK_DIR,
    PublishRefused,
    foreign_entries,
    owner_record,
    publish,
    reclaim_stale_staging,
    recover_publish,
    refuse_foreign,
    remove_owned,
)
from vlaprep.pipelines.shards.rows import EncoderConfig
from vlaprep.pipelines.shards.tokenization import TokenizerFiles, load_tokenizer, prompt_ids_backend
from vlaprep.schemas import layout, validate_json
from vlaprep.pipelines.stats.records import transform_episode
from vlaprep.schemas.episode import Episode, quarantine_jsonl
from vlaprep.schemas.layout import HELDOUT, MANIFEST_FILE, SHARDS_QUARANTINE_FILE, SPLITS, STATISTICS_COPY, TRAIN
from vlaprep.transforms.normalization import normalize_actions

REUSE_OUTPUT = object()  # reuse_from default: the output directory itself (its current manifest)
_log = logging.getLogger("vlaprep.shards")


@dataclasses.dataclass
class ShardsResult:
    output_dir: str
    manifest: dict
    quarantine: list
    seconds: float
    job: object = None  # the Beam PipelineResult of a run that did not wait (``wait=False``)


# --------------------------------------------------------------------------------------------------
# Argument checks (no Beam work before they all pass)
# --------------------------------------------------------------------------------------------------


def load_statistics(path: str, inputs: Sequence[DatasetInput]) -> tuple[dict, bytes]:
    """``{dataset: action block}`` for every input, checked against the registry; and the file's bytes."""
    try:
        raw = paths.read_bytes(path)
    except Exception as e:  # noqa: BLE001 - OSError locally; BeamIOError and client errors remotely
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise ShardsArgumentError(f"expected a readable --statistics file, got {path!r}: {reason}") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ShardsArgumentError(f"expected JSON in --statistics {path!r}, got a parse error: {e}") from None
    if not isinstance(doc, dict):
        raise ShardsArgumentError(f"expected a JSON object of datasets in {path!r}, got {type(doc).__name__}")
    blocks = {}
    for item in inputs:
        if item.name not in doc:
            raise ShardsArgumentError(
                f"expected an entry for {item.name!r} in {path}, got entries {sorted(doc)!r}; "
                f"hint: run vlaprep stats with --dataset {item.name}=..."
            )
        block = doc[item.name].get("action") if isinstance(doc[item.name], dict) else None
        if not isinstance(block, dict):
            raise ShardsArgumentError(f"expected an 'action' block for {item.name!r} in {path}, got {block!r}")
        widths = {k: len(v) for k, v in block.items() if isinstance(v, list)}
        if set(widths.values()) != {item.spec.action_dim}:
            raise ShardsArgumentError(
                f"expected action statistics of width {item.spec.action_dim} (the registry's action_dim) for "
                f"{item.name!r} in {path}, got widths {widths!r}; hint: recompute with vlaprep stats"
            )
        blocks[item.name] = block
    return blocks, raw


def _check_normalization(blocks: dict, normalization: str, path: str, action_dim: int) -> None:
    """Every dataset's statistics can normalize one action row in the chosen mode (keys, mask, shapes)."""
    for name, block in blocks.items():
        try:
            normalize_actions(np.zeros((1, action_dim), np.float32), block, normalization)
        except (KeyError, ValueError, TypeError) as e:
            raise ShardsArgumentError(f"expected statistics usable with --normalization {normalization} for {name!r} in {path}, got: {e}") from None


def _check_inputs(inputs: Sequence[DatasetInput], cameras: tuple[str, ...]) -> int:
    """One action width for all datasets (returned), each dataset once, with every camera asked for."""
    if not inputs:
        raise ShardsArgumentError("expected at least one --dataset NAME=PATH")
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise ShardsArgumentError(f"expected each dataset once, got {names!r}")
    dims = {i.name: i.spec.action_dim for i in inputs}
    if len(set(dims.values())) != 1:
        raise ShardsArgumentError(
            f"expected one action width for all datasets (one shard schema), got {dims!r}; hint: run vlaprep shards once per width"
        )
    for item in inputs:
        if item.spec.camera_key("primary") is None:
            raise ShardsArgumentError(f"expected a primary camera for dataset {item.name!r}, got none in its registry entry")
        if "wrist" in cameras and item.spec.camera_key("wrist") is None:
            raise ShardsArgumentError(
                f"expected a wrist camera for dataset {item.name!r} (--cameras {','.join(cameras)}), got none in its "
                "registry entry; hint: use --cameras primary, or declare wrist_image with --registry"
            )
    return next(iter(dims.values()))


def probe_proprio_dims(inputs: Sequence[ResolvedDataset], log=print, tries: int = 8) -> dict[str, int]:
    """{dataset: the proprio width its transform gives} (read from a few of its episodes on the launcher;
    0 when it has no state). ``ShardOptions`` turns it into the column: the widest, zero-padded, with every
    dataset's own width in the manifest when they differ."""
    widths = {}
    for item in inputs:
        width = None
        parser = item.parser()
        candidates = (e for u in item.units for e in item.iter_episodes(u, (), parser))
        # Only episodes count as tries: a short, missing or corrupt shard yields one quarantine record per
        # record it lacks, and those say nothing about the width.
        episodes = (e for e in candidates if isinstance(e, Episode))
        for episode in itertools.islice(episodes, tries):
            try:
                width = int(transform_episode(episode, item.spec).trajectory.proprio.shape[1])
                break
            except ValueError:  # transform_episode's contract: this episode does not fit the entry
                continue
        widths[item.name] = width or 0
    if len(set(widths.values())) > 1:
        log(f"[shards] proprio widths differ across datasets {widths}: the column is {max(widths.values())} wide, "
            "each dataset's rows zero-padded; the manifest records each width (options.proprio_dims)")
    return widths


def _check_output_dir(output_dir: str, log=print) -> None:
    """OUT is new, empty or vlaprep's (see ``publish.foreign_entries``); publishes into it that were
    interrupted (a process killed midway) are undone first. Raises ShardsArgumentError naming the other entries."""
    if paths.isfile(output_dir):
        raise ShardsArgumentError(f"expected --output to be a directory, got the file {output_dir!r}")
    if not paths.isdir(output_dir):
        return
    recover_publish(output_dir, log)
    refuse_foreign(output_dir, foreign_entries(output_dir, log))


# --------------------------------------------------------------------------------------------------
# The pipeline's last step
# --------------------------------------------------------------------------------------------------


def _check_files(staging: str, file_infos: list) -> None:
    """The shard files are exactly ``shard-0..n-1-of-n`` per split, as reported by their writers."""
    for split in SPLITS:
        infos = [i for i in file_infos if i["split"] == split]
        counts = {i["num_shards"] for i in infos}
        if infos and (counts != {len(infos)} or sorted(i["shard_index"] for i in infos) != list(range(len(infos)))):
            raise RuntimeError(f"expected shards 0..{len(infos) - 1} of {split}, got {[i['path'] for i in infos]!r}")
        directory = paths.join(staging, split)
        listed = dict(paths.list_files(directory))
        for name in [n for n in listed if paths.basename(n).startswith(".tmp-")]:
            paths.remove_tree(paths.join(directory, name))  # a worker killed mid-write leaves its temp file; retries rewrote it
            del listed[name]
        on_disk = sorted(listed)
        expected = sorted(paths.basename(i["path"]) for i in infos)
        if on_disk != expected:
            raise RuntimeError(f"expected exactly {expected!r} in {split}/, got {on_disk!r}")
        for info in infos:
            if listed[paths.basename(info["path"])] != info["bytes"]:
                raise RuntimeError(f"expected {info['path']} to have {info['bytes']} bytes, got another size")


@dataclasses.dataclass(frozen=True)
class ShardsFinalizer:
    """What checking and publishing the shards needs besides the pipeline's results (pickled to the worker
    that runs the last step)."""

    inputs: tuple
    options: ShardOptions
    statistics_bytes: bytes
    tokenizer_files: TokenizerFiles
    staging: str
    output_dir: str
    rows_fingerprints: dict = dataclasses.field(default_factory=dict)
    reused: dict = dataclasses.field(default_factory=dict)  # dataset -> manifest.ReusedDataset
    allow_empty: bool = False  # publish even when no episode is kept (default: refuse, OUT stays as it was)
    weights: dict = dataclasses.field(default_factory=dict)  # dataset -> sampling weight (manifest "mixture"; default 1.0)

    def finalize(self, file_infos: list, quarantine: list, read_counts: dict) -> dict:
        """Check the staged files, write the quarantine file, build and validate the manifest, publish.

        ``file_infos``/``quarantine``: JSON dicts. Returns the manifest; raises RuntimeError when the
        files or the accounting disagree, and ``PublishRefused`` when no episode is kept (unless
        ``allow_empty``) or OUT holds entries vlaprep did not write; nothing is published then."""
        if recover_publish(self.output_dir, _log.warning, staging=self.staging):  # a retry after a killed publish
            return layout.read_manifest(self.output_dir).document
        file_infos = sorted(file_infos, key=lambda i: i["path"])
        quarantine = sorted(quarantine, key=lambda r: (r["dataset_name"], r["episode_id"], r["stage"]))
        paths.remove_tree(paths.join(self.staging, WORK_DIR))
        _check_files(self.staging, file_infos)
        data = quarantine_jsonl(quarantine)
        write_bytes_atomic(paths.join(self.staging, SHARDS_QUARANTINE_FILE), data)
        quarantine_info = {"path": SHARDS_QUARANTINE_FILE, "records": len(quarantine), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = build_manifest(
            self.inputs, self.options, file_infos, quarantine, read_counts, quarantine_info, self.statistics_bytes,
            self.tokenizer_files, self.rows_fingerprints, weights=self.weights,
        )
        validate_json(manifest, "manifest")
        if not self.allow_empty and not any(s["episodes"] for s in manifest["splits"].values()):
            raise PublishRefused(self._empty_message(manifest, quarantine))
        # OUT was checked at launch; a --no-wait job publishes much later: check again before moving anything.
        refuse_foreign(self.output_dir, foreign_entries(self.output_dir, lambda m: None), PublishRefused)
        publish(self.staging, self.output_dir, manifest_bytes(manifest))
        return manifest

    def _empty_message(self, manifest: dict, quarantine: list) -> str:
        accounting = manifest["accounting"]
        read = sum(a["read"] for a in accounting.values())
        if read:
            stages: dict[str, int] = {}
            for a in accounting.values():
                for stage, n in a["quarantined_by_stage"].items():
                    stages[stage] = stages.get(stage, 0) + n
            first = quarantine[0]
            reason = " ".join(str(first["reason"]).split())[:160]
            what = (f"all {read} episodes read were quarantined ({', '.join(f'{n} at {s}' for s, n in sorted(stages.items()))}; "
                    f"e.g. {first['dataset_name']} {first['episode_id']!r}: {reason})")
        else:
            what = f"no episode was read from {', '.join(sorted(accounting))}"
        kept = ("its previous output is kept as it was" if paths.isfile(paths.join(self.output_dir, MANIFEST_FILE))
                else "nothing was published")
        return (f"expected at least one episode to publish into {self.output_dir!r}, got 0: {what}; {kept}; hint: check "
                "the inputs and the quarantine reasons, or pass --allow-empty to publish an empty output")


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def run_shards(
    inputs: Sequence[DatasetInput | ResolvedDataset],
    statistics: str,
    tokenizer: str,
    output_dir: str,
    *,
    beam_args: Sequence[str] = (),
    log=print,
    wait: bool = True,
    reuse_from: str | None | object = REUSE_OUTPUT,
    weights: dict | None = None,
    **options,
) -> ShardsResult:
    """Build ``output_dir`` (layout in the module docstring). Raises ``ShardsArgumentError`` for bad
    arguments before any Beam work; any pipeline failure leaves ``output_dir`` as it was.

    ``options``: the user's shard options (``pipelines/options.SHARD_OPTIONS``: image_size, cameras,
    heldout_fraction, seed, action_chunk, normalization, action_encoding, target_shard_mb, allow_empty),
    absent ones at their defaults.

    ``reuse_from``: a previous shards output (default: ``output_dir`` itself; None: none). Datasets whose
    rows fingerprint (``manifest.rows_fingerprint``) matches its manifest are read back from its files
    instead of being read and encoded again; the output is byte-identical to a run from the sources.

    ``allow_empty``: publish even when every episode is quarantined (or none was read). By default the
    pipeline's last step refuses (``PublishRefused``, also for ``wait=False`` jobs) and OUT stays as it was.

    ``weights``: ``{dataset: sampling weight > 0}`` (default 1.0 each), recorded in the manifest's ``mixture``
    with OpenVLA's balanced sampling probabilities (see ``manifest.build_manifest``); they do not change any row.

    OUT must be new, empty or vlaprep's (see ``publish.foreign_entries``); vlaprep deletes only what it can
    prove it wrote. A failed publish restores the previous output exactly (see ``publish.publish``)."""
    started = time.time()
    names = [i.name for i in inputs]
    for name, w in dict(weights or {}).items():
        if name not in names:
            raise ShardsArgumentError(f"expected --weight for one of the datasets {names!r}, got {name!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ShardsArgumentError(f"expected a finite weight > 0 for dataset {name!r}, got {w!r}; hint: --weight NAME=W")
    # An explicit weight wins; else the input's own (a mixture's weight, run.yaml's `weight`, 1.0).
    weights = {i.name: float(dict(weights or {}).get(i.name, i.weight)) for i in inputs}
    # --- checks, cheapest first -------------------------------------------------------------------
    draft = check_options(**options)
    allow_empty = bool(options.get("allow_empty", False))
    cameras, action_chunk, normalization = draft["cameras"], draft["action_chunk"], draft["normalization"]
    action_dim = _check_inputs(inputs, cameras)
    _check_output_dir(output_dir, log)
    blocks, statistics_bytes = load_statistics(statistics, inputs)
    _check_normalization(blocks, normalization, statistics, action_dim)
    files, hf_tokenizer, vocab_size, eos_id, max_length, tokenization = load_tokenizer(tokenizer, action_chunk * action_dim)
    inputs = resolve_datasets(inputs)  # the first read of the sources
    proprio_dims = probe_proprio_dims(inputs, log)
    proprio_dim = max(proprio_dims.values(), default=0)
    differing = tuple(sorted(proprio_dims.items())) if len(set(proprio_dims.values())) > 1 else ()
    options = ShardOptions(
        **draft, action_dim=action_dim, vocab_size=vocab_size, eos_id=eos_id, model_max_length=max_length,
        tokenization=tokenization, proprio_dim=proprio_dim, proprio_dims=differing,
    )
    # Workers tokenize prompts with the Rust tokenizer when it matches HF on every probe (no transformers import).
    backend_json = prompt_ids_backend(hf_tokenizer, options.chunk_width, vocab_size)
    specs = {i.name: i.spec for i in inputs}
    if backend_json is not None:
        config = EncoderConfig(options, specs, blocks, backend_json=backend_json, eos_token=hf_tokenizer.eos_token)
    else:
        config = EncoderConfig(options, specs, blocks, tokenizer_files=files)
    log(
        f"[shards] tokenizer: vocab_size {vocab_size}, EOS {eos_id}, tokenization {tokenization}, workers use "
        f"{'its Rust tokenizer' if backend_json else 'transformers'}; {len(inputs)} dataset(s), chunk {action_chunk}, "
        f"{options.normalization}, {options.action_encoding}"
    )

    # --- build in staging; the pipeline's last step publishes -------------------------------------
    fingerprints = {i.name: rows_fingerprint(i, blocks[i.name], options, files) for i in inputs}
    reused = plan_reuse(output_dir if reuse_from is REUSE_OUTPUT else reuse_from, fingerprints, options, log)
    created = not paths.exists(output_dir)
    paths.makedirs(output_dir)
    reclaim_stale_staging(output_dir, log)
    staging = paths.make_temp_dir(output_dir, STAGING_PREFIX)
    launched = False
    try:
        write_bytes_atomic(paths.join(staging, OWNER_FILE), json.dumps(owner_record(wait)).encode())
        finalizer = ShardsFinalizer(tuple(inputs), options, statistics_bytes, files, staging, output_dir, fingerprints, reused,
                                    allow_empty, weights)
        for name in OUTPUT_ENTRIES:
            paths.makedirs(paths.join(staging, name))
        # A copy travels with the shards, so `vlaprep validate` and trainers un-normalize from OUT alone.
        write_bytes_atomic(paths.join(staging, STATISTICS_COPY), statistics_bytes)
        pipeline = beam.Pipeline(options=beam_options(beam_args))
        build_shards_pipeline(pipeline, inputs, config, finalizer)
        launched = True
        job = pipeline.run()
        if not wait:
            log(f"[shards] submitted; {output_dir} is published by the pipeline's last step when it finishes")
            return ShardsResult(output_dir, {}, [], time.time() - started, job)
        job.wait_until_finish()
    except BaseException as e:
        if wait or not launched:  # a --no-wait job may still be running (or be retried): its staging stays
            try:
                remove_owned(staging)
            except OSError as cleanup_error:  # keep the run's own error; the next run reclaims the staging
                log(f"[shards] could not remove {staging} ({cleanup_error})")
            if created and not paths.is_remote(output_dir):
                try:
                    os.rmdir(output_dir)  # only if still empty
                except OSError:
                    pass
        refusal = _refusal_in(e) if isinstance(e, Exception) else None
        if refusal is not None:  # the last step refused to publish: one line, not the runner's traceback
            raise PublishRefused(refusal) from e
        raise
    manifest = layout.read_manifest(output_dir)
    text = paths.read_text(manifest.path(manifest.quarantine["path"]))
    quarantine = [json.loads(line) for line in text.splitlines() if line.strip()]
    return ShardsResult(output_dir, manifest.document, quarantine, time.time() - started)


_BEAM_SUFFIX = re.compile(r"(\s*\[while running '[^']*'\])+\s*$")


def _refusal_in(exc: BaseException) -> str | None:
    """The message of a ``PublishRefused`` raised by the last step, from the runner's exception: the
    exception itself in-process, or the remote traceback's text (Beam appends "[while running ...]")."""
    found = in_chain(exc, lambda e: isinstance(e, PublishRefused))
    if found is not None:
        return _BEAM_SUFFIX.sub("", str(found))
    marker = f"{PublishRefused.__name__}: "
    lines = [line for line in str(exc).splitlines() if marker in line]
    return _BEAM_SUFFIX.sub("", lines[-1].split(marker, 1)[1]) if lines else None


def summary(result: ShardsResult) -> str:
    """Per dataset and per split: episodes, rows, files and bytes of a finished run, one line each."""
    m = result.manifest
    lines = []
    for name, acc in m["accounting"].items():
        rows = m["datasets"][name]
        lines.append(
            f"{name}: read {acc['read']} episodes -> train {acc['train']} ({rows[TRAIN]['rows']} rows), "
            f"heldout {acc['heldout']} ({rows[HELDOUT]['rows']} rows), quarantined {acc['quarantined']} {acc['quarantined_by_stage']}"
        )
    for split, s in m["splits"].items():
        lines.append(f"{split}: {s['files']} files, {s['episodes']} episodes, {s['rows']} rows, {s['bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)

