"""``vlaprep shards``: check the arguments, run the shard pipeline, publish the output atomically.

Output in ``OUT`` (names are the contract; ``schemas/manifest.schema.json`` describes the manifest):
  train/shard-00000-of-0000N.parquet     training rows (``schemas/shards.py``)
  heldout/shard-00000-of-0000M.parquet   held-out episodes (hash of seed, dataset, episode_id)
  quarantine/quarantine.jsonl            one record per rejected episode: dataset_name, episode_id, stage, reason
  manifest.json                          written LAST: every file with rows, episodes, bytes, sha256;
                                         totals, accounting, schema, input fingerprints, options

Ownership. vlaprep deletes only what it can prove it wrote: OUT must be new, empty, or hold a valid
vlaprep manifest, and then ``train/ heldout/ quarantine/ inputs/`` may hold only the files that manifest
lists; ``.staging-*`` and ``.old-*`` are vlaprep's only when they carry its record (``.owner.json``).
Anything else is refused before any Beam work, as one line naming the entries (``foreign_entries``).

Atomicity. Everything is built in ``OUT/.staging-<random>/``. The pipeline's last step
(``ShardsFinalizer``, after every shard is written) checks the files and the accounting and publishes,
so a run submitted without waiting (``--no-wait``, Dataflow Flex Templates) publishes by itself. It
refuses (``PublishRefused``; OUT stays as it was) when no episode is kept, unless ``allow_empty``, and
when OUT gained foreign entries since the launch. Publishing (``publish``) is all or nothing: a journal
in ``OUT/.old-<random>/`` records each move (old manifest and entries parked there, new ones renamed in,
the new manifest last); any failure undoes the moves in reverse, so OUT is byte for byte the previous
output again. A process killed midway leaves the journal, and the next run (or a retry of the last step)
undoes it, or finishes it when the new manifest had landed (``recover_publish``). A reader trusts
``OUT`` only when ``manifest.json`` exists and lists what it reads.

Disk: while the pipeline runs, encoded episodes wait in ``OUT/.staging-*/.work/episodes`` (about the
rows' uncompressed size); they are deleted before publishing; the previous output stays on disk until
the new manifest is in place. A run killed hard (SIGKILL, power loss) may leave a ``.staging-*``
directory behind; it is never read. The next local run into the same ``OUT`` on the same host deletes
it (its owner process is gone); one from a remote or ``--no-wait`` job is left alone and reported, to
be deleted once that job is known to be dead.
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
import socket
import time
from typing import Sequence

import apache_beam as beam
import numpy as np

import vlaprep
from vlaprep import paths
from vlaprep.errors import environment_error, in_chain
from vlaprep.paths import confined, fsync_dir, write_bytes_atomic
from vlaprep.pipelines import fingerprint, sources
from vlaprep.pipelines.shards import (
    N_BINS,
    IDS_DIRECT,
    EncodeEpisodes,
    EncoderConfig,
    ShardOptions,
    ShardsArgumentError,
    TokenizerFiles,
    WriteShards,
    file_sha256,
    parse_cameras,
    probe_tokenization,
    prompt_ids_backend,
    target_shard_bytes,
)
from vlaprep.pipelines.options import SHARD_OPTIONS
from vlaprep.pipelines.job import DatasetInput, beam_options, pid_alive
from vlaprep.pipelines.stats_job import dataset_fingerprint
from vlaprep.schemas import layout, validate_json
from vlaprep.schemas.episode import quarantine_jsonl
from vlaprep.schemas.layout import (
    HELDOUT,
    INPUTS_DIR,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    QUARANTINE_DIR,
    SHARDS_QUARANTINE_FILE,
    SPLITS,
    STATISTICS_COPY,
    TRAIN,
)
from vlaprep.transforms.normalization import normalize_actions
from vlaprep.transforms.prompt import prompt_prefix_ids

REUSE_OUTPUT = object()  # reuse_from default: the output directory itself (its current manifest)
_OUTPUT_ENTRIES = (TRAIN, HELDOUT, QUARANTINE_DIR, INPUTS_DIR)
_STAGING_PREFIX = ".staging-"
_OLD_PREFIX = ".old-"
_WORK = ".work"
# vlaprep's record in each directory it creates inside OUT, written right after the directory. In
# ``.staging-*``: {"by", "host", "pid", "wait"} of the launcher; a later run on the same host deletes the
# staging of a waiting run that was killed (the pid is gone) and never one of a --no-wait job. In
# ``.old-*``: the publish journal (see ``publish``). A ``.staging-*``/``.old-*`` without it is not
# vlaprep's: it is never touched.
_OWNER_FILE = ".owner.json"
_OWNER_BY = "vlaprep shards"
# An unfinished publish from another host is undone by the next run only once its journal has not moved
# for this long (publishing renames a few directories; an object store copies them server-side).
_STALE_PUBLISH_S = 6 * 3600
_log = logging.getLogger("vlaprep.shards")


class PublishRefused(ShardsArgumentError):
    """The pipeline's last step would not publish (no episode to publish, or entries in OUT that vlaprep
    did not write); OUT is left as it was. Raised on a worker; the launcher reports it as one line."""


def _owner_record(wait: bool = True) -> dict:
    return {"by": _OWNER_BY, "host": socket.gethostname(), "pid": os.getpid(), "wait": bool(wait)}


def _read_owner(directory: str) -> dict | None:
    """vlaprep's owner record (or publish journal) in ``directory``; None when there is none.

    Records written before ``by`` existed ({"host", "pid"} of a waiting local run) are accepted too."""
    try:
        record = json.loads(paths.read_bytes(paths.join(directory, _OWNER_FILE)))
    except (OSError, ValueError):  # missing or not JSON (BeamIOError is an OSError)
        return None
    if not isinstance(record, dict) or record.get("by", _OWNER_BY) != _OWNER_BY:
        return None
    pid = record.get("pid")
    if not isinstance(record.get("host"), str) or not isinstance(pid, int) or isinstance(pid, bool):
        return None
    return record


def _empty_local_dir(path: str) -> bool:
    """A local directory with nothing in it (a run killed between creating it and writing its record)."""
    return not paths.is_remote(path) and os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _present(path: str) -> bool:
    """A file, directory or symlink (local), or an object or a non-empty prefix (remote)."""
    if paths.is_remote(path):
        return paths.exists(path) or paths.isdir(path)
    return os.path.lexists(path)


def _remove_owned(directory: str) -> None:
    """Delete one of vlaprep's own directories, its owner record last: an interrupted removal leaves a
    directory that is still recognisably vlaprep's (and so is removed by a later run, never refused)."""
    if not _present(directory):
        return
    for name in paths.listdir(directory):
        if name != _OWNER_FILE:
            paths.remove_tree(paths.join(directory, name))
    paths.remove_tree(paths.join(directory, _OWNER_FILE))
    if not paths.is_remote(directory):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass


def reclaim_stale_staging(output_dir: str, log=print) -> list[str]:
    """Delete ``OUT/.staging-*`` left by killed local runs on this host; return their names.

    Only directories whose owner record names this host, a waiting run and a process that no longer
    exists are removed (a reused pid keeps a directory, which is the safe direction); an empty one (a run
    killed before writing its record) is removed with ``rmdir``, which cannot delete a file. Others are
    reported, not touched: without vlaprep's record a directory is not vlaprep's.
    """
    if paths.is_remote(output_dir) or not os.path.isdir(output_dir):
        return []
    host, removed = socket.gethostname(), []
    for name in sorted(os.listdir(output_dir)):
        if not name.startswith(_STAGING_PREFIX):
            continue
        directory = os.path.join(output_dir, name)
        if _empty_local_dir(directory):
            os.rmdir(directory)
            removed.append(name)
            continue
        owner = _read_owner(directory)
        if owner is None:
            log(f"[shards] left alone: {directory} (no vlaprep owner record: not vlaprep's, or an older --no-wait job's)")
            continue
        if not owner.get("wait", True):
            log(f"[shards] left alone: {directory} (staging of a --no-wait job, which may still be running)")
            continue
        if owner["host"] == host and not pid_alive(owner["pid"]):
            _remove_owned(directory)
            removed.append(name)
            log(f"[shards] removed {directory}: staging of an interrupted run (pid {owner['pid']} is gone)")
    return removed


def _own_manifest(output_dir: str) -> layout.Manifest | None:
    """OUT's manifest when it is a valid vlaprep shards manifest (the proof that OUT is vlaprep's)."""
    if not paths.isfile(paths.join(output_dir, MANIFEST_FILE)):
        return None
    try:
        return layout.read_manifest(output_dir)
    except (OSError, layout.ManifestError):
        return None


def foreign_entries(output_dir: str, log=print) -> list[str]:
    """Entries of ``output_dir`` that vlaprep cannot prove it wrote (relative names; [] when it may publish).

    Proof: a valid vlaprep manifest in OUT (then ``train/ heldout/ quarantine/ inputs/`` may hold only
    the files it lists) and vlaprep's owner record in ``.staging-*``/``.old-*``. Without a manifest only
    vlaprep's own staging and journal directories may be there (a new, empty or never-published OUT).
    A ``.staging-*``/``.old-*``/``.tmp-*`` without a record is left alone in a published OUT (publishing
    never touches it) and counts as foreign in any other.
    """
    if not paths.isdir(output_dir):
        return []
    manifest = _own_manifest(output_dir)
    listed = set()
    if manifest is not None:
        listed = {f.path for f in manifest.files()} | {manifest.quarantine["path"], manifest.statistics_relpath}
    foreign = []
    for name in paths.listdir(output_dir):
        full = paths.join(output_dir, name)
        if name.startswith((_STAGING_PREFIX, _OLD_PREFIX)) and (_read_owner(full) is not None or _empty_local_dir(full)):
            continue
        if manifest is None:
            foreign.append(name)
        elif name == MANIFEST_FILE:
            continue
        elif name.startswith((_STAGING_PREFIX, _OLD_PREFIX, ".tmp-")):
            log(f"[shards] left alone: {full} (vlaprep cannot prove it wrote it: no vlaprep owner record)")
        elif name in _OUTPUT_ENTRIES:
            if paths.isfile(full) or (not paths.is_remote(full) and (os.path.islink(full) or not os.path.isdir(full))):
                foreign.append(name)  # publishing would move it aside and delete it
                continue
            names = (f"{name}/{rel}".replace(os.sep, "/") for rel, _ in paths.list_files(full))
            foreign.extend(n for n in names if n not in listed)
        else:
            foreign.append(name)
    return foreign


def _refuse_foreign(output_dir: str, foreign: list[str], error=ShardsArgumentError) -> None:
    if foreign:
        shown = repr(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise error(
            f"expected --output to be empty or a previous vlaprep shards output, got entries vlaprep did not write "
            f"{shown} in {output_dir!r}; hint: choose an empty or new directory (vlaprep deletes only files its own "
            "manifest lists, and those only when that manifest is valid)"
        )


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


def load_tokenizer(tokenizer_dir: str, chunk_width: int):
    """-> (tokenizer files, loaded tokenizer, vocab_size, eos_id, model_max_length, tokenization mode)."""
    files = TokenizerFiles.from_dir(tokenizer_dir)
    try:
        tokenizer = files.load()
    except Exception as e:  # transformers raises OSError/ValueError/KeyError/...; one line with the cause
        raise ShardsArgumentError(f"expected a loadable tokenizer in {tokenizer_dir!r}, got {type(e).__name__}: {e}") from e
    vocab_size = int(tokenizer.vocab_size)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ShardsArgumentError(f"expected a tokenizer with an EOS token in {tokenizer_dir!r}, got none; hint: set eos_token")
    eos_id = int(eos_id)
    action_ids = range(vocab_size - N_BINS, vocab_size)
    special = sorted({int(i) for i in tokenizer.all_special_ids if i is not None} & set(action_ids))
    if vocab_size <= N_BINS or special:
        raise ShardsArgumentError(
            f"expected a base vocabulary that holds the {N_BINS} action ids (the last {N_BINS} ids, clear of "
            f"special tokens), got vocab_size {vocab_size}" + (f" with special ids {special!r} among them" if special else "")
            + f" in {tokenizer_dir!r}; hint: use the model's tokenizer (Llama-2: 32000)"
        )
    max_length = int(min(getattr(tokenizer, "model_max_length", 1 << 31) or (1 << 31), 1 << 31))
    prompt = len(prompt_prefix_ids(tokenizer, "put the carrot in the pot"))
    if prompt + chunk_width + 1 > max_length:
        raise ShardsArgumentError(
            f"expected prompt + {chunk_width} action ids (--action-chunk x action_dim) + EOS within the tokenizer's "
            f"model_max_length {max_length}, got {prompt + chunk_width + 1} ids for a short instruction; "
            "hint: lower --action-chunk"
        )
    return files, tokenizer, vocab_size, eos_id, max_length, probe_tokenization(tokenizer, chunk_width, vocab_size)


def _check_inputs(inputs: Sequence[DatasetInput], cameras: tuple[str, ...]) -> int:
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


def probe_proprio_dims(inputs: Sequence[DatasetInput], log=print, tries: int = 8) -> dict[str, int]:
    """{dataset: the proprio width its transform gives} (read from a few of its episodes on the launcher;
    0 when it has no state). ``ShardOptions`` turns it into the column: the widest, zero-padded, with every
    dataset's own width in the manifest when they differ."""
    from vlaprep.pipelines.stats import transform_episode
    from vlaprep.schemas.episode import Episode as _Episode

    widths = {}
    for item in inputs:
        width = None
        units = sources.source_units(item.path, item.spec)
        candidates = (e for u in units for e in sources.iter_unit_episodes(u, item.spec, (), sources.unit_parser(item.spec, u)))
        # Only episodes count as tries: a short, missing or corrupt shard yields one quarantine record per
        # record it lacks, and those say nothing about the width.
        episodes = (e for e in candidates if isinstance(e, _Episode))
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
    """OUT is new, empty or vlaprep's (see ``foreign_entries``); publishes into it that were interrupted
    (a process killed midway) are undone first. Raises ShardsArgumentError naming the other entries."""
    if paths.isfile(output_dir):
        raise ShardsArgumentError(f"expected --output to be a directory, got the file {output_dir!r}")
    if not paths.isdir(output_dir):
        return
    recover_publish(output_dir, log)
    _refuse_foreign(output_dir, foreign_entries(output_dir, log))


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------


def _json_line(record) -> str:
    return json.dumps(record.to_json_dict(), sort_keys=True)


def _dataset_of(episode) -> tuple:
    return episode.dataset_name, 1


def build_shards_pipeline(pipeline: beam.Pipeline, inputs: Sequence[DatasetInput], config: EncoderConfig,
                          finalizer: "ShardsFinalizer") -> None:
    """Sources -> EncodeEpisodes -> WriteShards into ``finalizer.staging`` -> ``FinalizeShards`` (checks,
    manifest, publish) with the file infos, quarantine records and read counts as side inputs; encoded
    episodes wait in ``staging/.work/episodes`` (removed before publishing)."""
    staging = finalizer.staging
    work = paths.join(staging, _WORK)
    roles = config.options.cameras
    spill = paths.join(work, "episodes")
    episodes, quarantined, reloaded, reused_counts = [], [], [], []
    for item in inputs:
        reuse = finalizer.reused.get(item.name)
        if reuse is not None:  # rows identical to what encoding would give: read back from the previous output
            reloaded.append(
                pipeline
                | f"Reuse[{item.name}]" >> beam.Create(reuse.files)
                | f"Reload[{item.name}]" >> beam.ParDo(_ReloadEpisodesFn(item.name, spill, config.options.schema()))
            )
            quarantined.append(pipeline | f"ReusedQuarantine[{item.name}]" >> beam.Create(list(reuse.quarantine)))
            reused_counts.append(pipeline | f"ReusedCount[{item.name}]" >> beam.Create([(item.name, reuse.read)]))
            continue
        read = pipeline | f"Read[{item.name}]" >> sources.ReadDataset(item.path, item.spec, image_roles=roles)
        episodes.append(read["episodes"])
        quarantined.append(read["quarantine"] | f"QuarantineJson[{item.name}]" >> beam.Map(_json_line))
    all_episodes = episodes | "AllEpisodes" >> beam.Flatten(pipeline=pipeline)
    encoded = all_episodes | "EncodeEpisodes" >> EncodeEpisodes(config, spill)
    quarantined.append(encoded["quarantine"] | "QuarantineJson" >> beam.Map(_json_line))
    all_encoded = [encoded["encoded"]] + reloaded | "AllEncoded" >> beam.Flatten()
    files = all_encoded | "WriteShards" >> WriteShards(staging, spill, config.options.schema(), config.options.target_shard_bytes)
    quarantine = quarantined | "AllQuarantine" >> beam.Flatten()
    counts = (
        [all_episodes | "DatasetOfEpisode" >> beam.Map(_dataset_of)] + reused_counts
        | "AllCounts" >> beam.Flatten()
        | "CountRead" >> beam.CombinePerKey(sum)
    )
    _ = (
        pipeline
        | "FinalizeTrigger" >> beam.Create([None])
        | "FinalizeShards" >> beam.ParDo(
            _FinalizeShardsFn(finalizer), beam.pvalue.AsList(files), beam.pvalue.AsList(quarantine), beam.pvalue.AsList(counts)
        )
    )


# --------------------------------------------------------------------------------------------------
# Reuse: datasets whose rows would come out identical are read back from the previous output
# --------------------------------------------------------------------------------------------------


def rows_fingerprint(item: DatasetInput, action_block: dict, options: ShardOptions, tokenizer_files: TokenizerFiles) -> str:
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


class _ReloadEpisodesFn(beam.DoFn):
    """(previous shard file, its sha256) -> (EpisodeKey, EpisodeRef) for each of ``dataset``'s episodes in it,
    spilled like freshly encoded ones. The file's digest is checked first: a changed file fails the run."""

    def __init__(self, dataset: str, spill_dir: str, schema):
        self._dataset = dataset
        self._spill_dir = spill_dir
        self._schema = schema

    def setup(self):
        paths.makedirs(self._spill_dir)

    def process(self, element):
        from vlaprep.pipelines.shards import reload_shard_episodes

        path, sha256 = element
        for key, ref in reload_shard_episodes(path, sha256, self._dataset, self._spill_dir, self._schema):
            yield key, ref
            beam.metrics.Metrics.counter("vlaprep", "shard_episodes_reused").inc()


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
    reused: dict = dataclasses.field(default_factory=dict)  # dataset -> ReusedDataset
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
        paths.remove_tree(paths.join(self.staging, _WORK))
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
        _refuse_foreign(self.output_dir, foreign_entries(self.output_dir, lambda m: None), PublishRefused)
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


class _FinalizeShardsFn(beam.DoFn):
    """The pipeline's last step: one element; its side inputs are complete once every shard is written."""

    def __init__(self, finalizer: ShardsFinalizer):
        self._finalizer = finalizer

    def process(self, _unused, files, quarantine, counts):
        if not paths.isdir(self._finalizer.staging) and paths.isfile(paths.join(self._finalizer.output_dir, MANIFEST_FILE)):
            return  # a retry of a step that already published: staging was consumed by publish
        self._finalizer.finalize([json.loads(f) for f in files], [json.loads(q) for q in quarantine], dict(counts))
        yield paths.join(self._finalizer.output_dir, MANIFEST_FILE)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


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
    inputs: Sequence[DatasetInput],
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


def publish(staging: str, output_dir: str, manifest_data: bytes, log=_log.warning) -> None:
    """Swap the staged output into ``output_dir``, all or nothing; ``manifest.json`` lands last.

    The new manifest is written into ``staging`` (temp file + fsync + rename), then a journal
    (``OUT/.old-<random>/.owner.json``: the planned moves and the one started) is written before each
    move: park the old ``manifest.json`` and ``train/ heldout/ quarantine/ inputs/`` in ``.old-<random>/``,
    bring each staged one in, and last move the new manifest into place (one rename). Any exception at
    any step undoes the started moves in reverse order, the old manifest last, so OUT is again exactly
    what it was (same files, same bytes) and ``staging`` holds the new output again; then it propagates
    (the caller removes ``staging``). A process killed midway leaves the journal: ``recover_publish``
    (the next run, or a retry of the last step) undoes the same way, or finishes a publish whose
    manifest landed. Local outputs use atomic renames; on an object store a move copies then deletes, so
    every object is at its source or its destination at any time and the same undo applies.
    """
    staging_name = paths.basename(staging)
    if not staging_name.startswith(_STAGING_PREFIX) or not _same_path(paths.dirname(staging), output_dir):
        raise ValueError(f"expected a {_STAGING_PREFIX}* directory directly inside {output_dir!r}, got {staging!r}")
    write_bytes_atomic(paths.join(staging, MANIFEST_FILE), manifest_data)
    old = paths.make_temp_dir(output_dir, _OLD_PREFIX)
    old_name = paths.basename(old)
    steps = [[MANIFEST_FILE, f"{old_name}/{MANIFEST_FILE}"]] if _present(paths.join(output_dir, MANIFEST_FILE)) else []
    for name in _OUTPUT_ENTRIES:
        if _present(paths.join(output_dir, name)):
            steps.append([name, f"{old_name}/{name}"])
        if _present(paths.join(staging, name)):
            steps.append([f"{staging_name}/{name}", name])
    steps.append([f"{staging_name}/{MANIFEST_FILE}", MANIFEST_FILE])
    journal = {**_owner_record(), "staging": staging_name, "steps": steps, "started": -1}
    try:
        _write_journal(old, journal)
    except BaseException:
        paths.remove_tree(old)  # created just above: nothing but an unfinished journal can be in it
        raise
    where = paths.join(old, _OWNER_FILE)
    try:
        for index, (src, dst) in enumerate(steps):
            journal["started"] = index
            _write_journal(old, journal)
            _move(output_dir, src, dst, where)
    except BaseException as error:
        try:
            _undo(output_dir, journal, where)
        except BaseException as undo_error:
            log(f"[shards] could not restore the previous output of {output_dir} after a failed publish "
                f"({undo_error!r}); the next vlaprep shards run into it restores it from {old_name}")
            raise error
        try:
            _remove_owned(old)
        except OSError as e:
            log(f"[shards] restored {output_dir}; could not remove {old} ({e}); the next run removes it")
        raise
    # Published (manifest.json is in place); the rest is cleanup, which the next run finishes if it stops.
    try:
        _remove_owned(staging)
        _remove_owned(old)
    except OSError as e:
        log(f"[shards] published {output_dir}; could not remove {staging_name} or {old_name} ({e}); the next run removes them")


def _same_path(a: str, b: str) -> bool:
    if paths.is_remote(a) or paths.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _write_journal(old_dir: str, journal: dict) -> None:
    journal["time"] = time.time()
    write_bytes_atomic(paths.join(old_dir, _OWNER_FILE), json.dumps(journal, sort_keys=True).encode("utf-8"))


def _move(output_dir: str, src_rel: str, dst_rel: str, where: str) -> None:
    src, dst = confined(output_dir, src_rel, where), confined(output_dir, dst_rel, where)
    paths.move(src, dst)
    if not paths.is_remote(output_dir):  # make the rename durable before the journal moves on
        fsync_dir(os.path.dirname(src))
        fsync_dir(os.path.dirname(dst))


def _undo(output_dir: str, journal: dict, where: str) -> None:
    """Move back, in reverse order, whatever the started steps put at their destination."""
    staging = journal["staging"]
    for src_rel, dst_rel in reversed(journal["steps"][: journal["started"] + 1]):
        dst = confined(output_dir, dst_rel, where)
        if not _present(dst):
            continue
        if src_rel.startswith(staging + "/") and not _present(confined(output_dir, staging, where)):
            paths.remove_tree(dst)  # a new entry whose staging was already removed: nothing to go back to
            continue
        _move(output_dir, dst_rel, src_rel, where)


def _committed(output_dir: str, journal: dict, where: str) -> bool:
    """The journal's last step (the new manifest into place) has happened."""
    return journal["started"] == len(journal["steps"]) - 1 and _present(confined(output_dir, journal["steps"][-1][1], where))


def _check_publisher_gone(output_dir: str, name: str, journal: dict) -> None:
    age = time.time() - float(journal.get("time") or 0)
    if journal["host"] == socket.gethostname():
        if not pid_alive(journal["pid"]):
            return
        later = "once that process is gone"
    else:
        if age > _STALE_PUBLISH_S:
            return
        later = f"{_STALE_PUBLISH_S // 3600} h after its last step"
    raise ShardsArgumentError(
        f"expected no other vlaprep shards run publishing into {output_dir!r}, got the unfinished publish {name} of "
        f"host {journal['host']!r} pid {journal['pid']} (last step {age:.0f} s ago); hint: wait for that run to end "
        f"(a later run undoes an interrupted publish {later})"
    )


def recover_publish(output_dir: str, log=print, staging: str | None = None) -> bool:
    """Finish or undo the publishes into ``output_dir`` that a killed process left half done.

    Each is found by its journal (``.old-*/.owner.json``). One whose last step (the manifest) happened is
    finished: the previous output parked in ``.old-*`` and the emptied staging are deleted. Any other is
    undone step by step in reverse, so OUT is again exactly the previous output (its manifest last) and
    the new entries are back in their staging. The launcher (``staging=None``) handles journals whose
    process is provably gone (same host, pid gone; another host: silent for ``_STALE_PUBLISH_S``) and
    refuses while one may be live; a retried last step (``staging``) handles its own only. Returns True
    when the publish of ``staging`` had finished.
    """
    finished = False
    if not paths.isdir(output_dir):
        return False
    for name in paths.listdir(output_dir):
        if not name.startswith(_OLD_PREFIX):
            continue
        directory = paths.join(output_dir, name)
        journal = _read_owner(directory)
        if journal is None or not isinstance(journal.get("steps"), list) or not isinstance(journal.get("staging"), str) \
                or not isinstance(journal.get("started"), int):
            continue  # not a journal: not vlaprep's, or a journal's directory before its first write
        mine = staging is not None and journal["staging"] == paths.basename(staging)
        if staging is not None and not mine:
            continue
        if not mine:
            _check_publisher_gone(output_dir, name, journal)
        where = paths.join(directory, _OWNER_FILE)
        try:
            if _committed(output_dir, journal, where):
                _remove_owned(confined(output_dir, journal["staging"], where))
                _remove_owned(directory)
                finished = finished or mine
                log(f"[shards] finished the interrupted publish of {output_dir}: removed the previous output parked in {name}")
            else:
                _undo(output_dir, journal, where)
                _remove_owned(directory)
                log(f"[shards] undid the interrupted publish {name}: {output_dir} holds its previous output again")
        except OSError as e:
            if environment_error(e) is not None:
                raise
            raise ShardsArgumentError(
                f"expected to undo the interrupted publish {name} in {output_dir!r}, got {type(e).__name__}: {e}; hint: "
                f"restore it by hand ({name}/{_OWNER_FILE} lists the moves, in order) or choose a new directory"
            ) from e
    return finished


def verify_output(output_dir: str, manifest: dict | None = None) -> dict:
    """Every file the manifest names exists with its size and sha256 (what a careful reader does).

    ``manifest``: a document already read (default: ``output_dir``'s, read with ``vlaprep.schemas.layout``)."""
    checked = layout.read_manifest(output_dir) if manifest is None else layout.Manifest(output_dir, manifest)
    for entry in [*checked.document["files"], checked.quarantine]:
        path = checked.path(entry["path"])
        if not paths.isfile(path):
            raise RuntimeError(f"expected {entry['path']} listed in the manifest to exist in {output_dir!r}, got no such file")
        size = paths.getsize(path)
        if size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise RuntimeError(f"expected {entry['path']} to have {entry['bytes']} bytes and sha256 {entry['sha256']}, got {size} bytes / another digest")
    return checked.document


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def check_options(**options) -> dict:
    """The user's shard options (``pipelines/options.SHARD_OPTIONS``; absent ones at their defaults),
    checked before any input is read -> the ``ShardOptions`` fields they decide. Raises
    ShardsArgumentError naming the flag. ``run_shards`` and ``vlaprep run``'s config check call this."""
    unknown = sorted(set(options) - set(SHARD_OPTIONS.names))
    if unknown:
        raise ShardsArgumentError(f"expected shard options among {list(SHARD_OPTIONS.names)}, got unknown {unknown}")
    o = {**SHARD_OPTIONS.defaults(), **options}
    if not isinstance(o["allow_empty"], bool):
        raise ShardsArgumentError(f"expected allow_empty to be True or False, got {o['allow_empty']!r}")
    draft = dict(
        image_size=o["image_size"], cameras=parse_cameras(o["cameras"]), heldout_fraction=o["heldout_fraction"],
        seed=o["seed"], action_chunk=o["action_chunk"], normalization=o["normalization"],
        action_encoding=o["action_encoding"], target_shard_bytes=target_shard_bytes(o["target_shard_mb"]),
    )
    # The dataclass checks every field; placeholders stand in for what the inputs and tokenizer decide.
    checked = ShardOptions(**draft, action_dim=1, vocab_size=N_BINS + 1, eos_id=0, model_max_length=1, tokenization=IDS_DIRECT)
    return {k: getattr(checked, k) for k in draft}


def run_shards(
    inputs: Sequence[DatasetInput],
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
    rows fingerprint (``rows_fingerprint``) matches its manifest are read back from its files instead
    of being read and encoded again; the output is byte-identical to a run from the sources.

    ``allow_empty``: publish even when every episode is quarantined (or none was read). By default the
    pipeline's last step refuses (``PublishRefused``, also for ``wait=False`` jobs) and OUT stays as it was.

    ``weights``: ``{dataset: sampling weight > 0}`` (default 1.0 each), recorded in the manifest's ``mixture``
    with OpenVLA's balanced sampling probabilities (see ``build_manifest``); they do not change any row.

    OUT must be new, empty or vlaprep's (see ``foreign_entries``); vlaprep deletes only what it can prove it
    wrote. A failed publish restores the previous output exactly (see ``publish``)."""
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
    staging = paths.make_temp_dir(output_dir, _STAGING_PREFIX)
    launched = False
    try:
        write_bytes_atomic(paths.join(staging, _OWNER_FILE), json.dumps(_owner_record(wait)).encode())
        finalizer = ShardsFinalizer(tuple(inputs), options, statistics_bytes, files, staging, output_dir, fingerprints, reused,
                                    allow_empty, weights)
        for name in _OUTPUT_ENTRIES:
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
                _remove_owned(staging)
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


def summary(result: ShardsResult) -> str:
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
