"""``vlaprep shards``: check the arguments, run the shard pipeline, publish the output atomically.

Output in ``OUT`` (names are the contract; ``schemas/manifest.schema.json`` describes the manifest):
  train/shard-00000-of-0000N.parquet     training rows (``schemas/shards.py``)
  heldout/shard-00000-of-0000M.parquet   held-out episodes (hash of seed, dataset, episode_id)
  quarantine/quarantine.jsonl            one record per rejected episode: dataset_name, episode_id, stage, reason
  manifest.json                          written LAST: every file with rows, episodes, bytes, sha256;
                                         totals, accounting, schema, input fingerprints, options

Atomicity. Everything is built in ``OUT/.staging-<random>/``. The pipeline's last step
(``ShardsFinalizer``, after every shard is written) checks the files and the accounting and publishes,
so a run submitted without waiting (``--no-wait``, Dataflow Flex Templates) publishes by itself. Only
after the accounting balanced: the old ``manifest.json`` (if any) is removed, the old ``train/ heldout/
quarantine/`` are moved aside, the new ones renamed into place, and the new manifest is written with
temp file + fsync + rename. A crash at any point leaves either the old complete output with its
manifest, or files without a manifest (never a manifest that names missing or partial files).
A reader trusts ``OUT`` only when ``manifest.json`` exists and lists what it reads.

Disk: while the pipeline runs, encoded episodes wait in ``OUT/.staging-*/.work/episodes`` (about the
rows' uncompressed size); they are deleted before publishing. A run killed hard (SIGKILL, power loss)
may leave a ``.staging-*`` directory behind; it is never read. The next local run into the same
``OUT`` on the same host deletes it (its owner process is gone); one from a remote or ``--no-wait`` job
is left alone and reported, to be deleted once that job is known to be dead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from typing import Sequence

import apache_beam as beam
import numpy as np

import vlaprep
from vlaprep import paths
from vlaprep.paths import confined, fsync_dir, write_bytes_atomic
from vlaprep.pipelines import fingerprint, sources
from vlaprep.pipelines.shards import (
    HELDOUT,
    MANIFEST_FILE,
    N_BINS,
    QUARANTINE_DIR,
    QUARANTINE_FILE,
    SPLITS,
    TRAIN,
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
)
from vlaprep.pipelines.stats_job import DatasetInput, beam_options, dataset_fingerprint
from vlaprep.schemas import validate_json
from vlaprep.transforms.normalization import normalize_actions
from vlaprep.transforms.prompt import prompt_prefix_ids

MANIFEST_FORMAT = "vlaprep.shards"
MANIFEST_FORMAT_VERSION = 1
_STAGING_PREFIX = ".staging-"
_OLD_PREFIX = ".old-"
_WORK = ".work"
# Who builds a staging directory: {"host", "pid"} of a local driver that waits for its job. Lets a later
# run on the same host delete the staging of a run that was killed (the pid is gone) without touching
# one that is still building; staging without it (remote, --no-wait) is never deleted automatically.
_OWNER_FILE = ".owner.json"


def _owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def reclaim_stale_staging(output_dir: str, log=print) -> list[str]:
    """Delete ``OUT/.staging-*`` left by killed local runs on this host; return their names.

    Only directories whose owner file names this host and a process that no longer exists are removed
    (a reused pid keeps a directory, which is the safe direction). Others are reported, not touched.
    """
    if paths.is_remote(output_dir) or not os.path.isdir(output_dir):
        return []
    host, removed = _owner_record()["host"], []
    for name in sorted(os.listdir(output_dir)):
        if not name.startswith(_STAGING_PREFIX):
            continue
        directory = os.path.join(output_dir, name)
        try:
            with open(os.path.join(directory, _OWNER_FILE)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            log(f"[shards] left alone: {directory} (no owner record: a remote or --no-wait job may still use it)")
            continue
        if owner.get("host") == host and not _pid_alive(int(owner.get("pid", -1))):
            paths.remove_tree(directory)
            removed.append(name)
            log(f"[shards] removed {directory}: staging of an interrupted run (pid {owner.get('pid')} is gone)")
    return removed
REUSE_OUTPUT = object()  # reuse_from default: the output directory itself (its current manifest)
INPUTS_DIR = "inputs"
STATISTICS_COPY = "inputs/dataset_statistics.json"  # the statistics the rows were normalized with
_OUTPUT_ENTRIES = (TRAIN, HELDOUT, QUARANTINE_DIR, INPUTS_DIR)


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
        if item.spec.primary_image is None:
            raise ShardsArgumentError(f"expected a primary camera for dataset {item.name!r}, got none in its registry entry")
        if "wrist" in cameras and item.spec.wrist_image is None:
            raise ShardsArgumentError(
                f"expected a wrist camera for dataset {item.name!r} (--cameras {','.join(cameras)}), got none in its "
                "registry entry; hint: use --cameras primary, or declare wrist_image with --registry"
            )
    return next(iter(dims.values()))


def probe_proprio_dim(inputs: Sequence[DatasetInput], log=print, tries: int = 8) -> int:
    """P of the `proprio` column: the width every dataset's transform gives (read from a few episodes on
    the launcher), or 0 when a dataset has no state or the widths differ (one schema per run)."""
    from vlaprep.pipelines.stats import transform_episode
    from vlaprep.schemas.episode import Episode as _Episode

    widths = {}
    for item in inputs:
        width = None
        if item.spec.source_format == "rlds":
            source = sources.ReadRLDS(item.path, item.spec)
            candidates = (e for shard in source.shards for e in sources.read_rlds_shard(shard, item.spec))
        else:
            candidates = (_try_calvin(w, item.spec) for w in sources.list_calvin_windows(item.path))
        for i, episode in enumerate(candidates):
            if i >= tries:
                break
            if isinstance(episode, _Episode):
                try:
                    width = int(transform_episode(episode, item.spec).trajectory.proprio.shape[1])
                    break
                except (ValueError, KeyError, IndexError, TypeError):
                    continue
        widths[item.name] = width or 0
    distinct = set(widths.values())
    if len(distinct) == 1:
        return distinct.pop()
    log(f"[shards] no proprio column: widths differ across datasets {widths}; run them separately to keep it")
    return 0


def _try_calvin(window, spec):
    try:
        return sources.load_calvin_window(window, spec)
    except (ValueError, OSError):
        return None


def _check_output_dir(output_dir: str) -> None:
    if paths.isfile(output_dir):
        raise ShardsArgumentError(f"expected --output to be a directory, got the file {output_dir!r}")
    if not paths.isdir(output_dir):
        return
    ours = set(_OUTPUT_ENTRIES) | {MANIFEST_FILE}
    foreign = sorted(
        n for n in paths.listdir(output_dir) if n not in ours and not n.startswith((_STAGING_PREFIX, _OLD_PREFIX, ".tmp-"))
    )
    if foreign:
        raise ShardsArgumentError(
            f"expected --output to be empty or a previous vlaprep shards output, got other entries {foreign[:8]!r} in "
            f"{output_dir!r}; hint: pick a new directory (the output replaces train/, heldout/ and quarantine/)"
        )


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
        read = pipeline | f"Read[{item.name}]" >> sources.read_episodes(item.path, item.spec, image_roles=roles)
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
    where = paths.join(previous_dir, MANIFEST_FILE)
    try:
        manifest = json.loads(paths.read_text(where))
        validate_json(manifest, "manifest")
    except ValueError as e:
        log(f"[shards] previous output {previous_dir} has an unreadable manifest ({str(e)[:200]}); recomputing everything")
        return {}
    if manifest["schema"]["arrow"] != options.schema().to_string(show_schema_metadata=False):
        return {}
    recorded = {name: d.get("rows_fingerprint") for name, d in manifest["inputs"]["datasets"].items()}
    names = [name for name, fp in fingerprints.items() if recorded.get(name) == fp]
    if not names:
        return {}
    lines = paths.read_text(confined(previous_dir, manifest["quarantine"]["path"], where)).splitlines()
    reused = {}
    for name in names:
        files = tuple(
            (confined(previous_dir, f["path"], where), f["sha256"]) for f in manifest["files"] if name in f["datasets"]
        )
        accounting = manifest["accounting"][name]
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
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from vlaprep.pipelines.shards import spill_episode

        path, sha256 = element
        data = paths.read_bytes(path)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(
                f"expected {path} to have sha256 {sha256} as its manifest says, got another digest; "
                "hint: the previous output was modified, delete it to rebuild from the sources"
            )
        table = pq.read_table(pa.BufferReader(data))
        table = table.filter(pc.equal(table["dataset_name"], self._dataset)).combine_chunks()
        if table.schema != self._schema:
            table = table.cast(self._schema)
        split = paths.basename(paths.dirname(path))
        ids = table["episode_id"].to_pylist()
        start = 0
        while start < len(ids):  # an episode's rows are contiguous, in step order
            end = start
            while end < len(ids) and ids[end] == ids[start]:
                end += 1
            batch = table.slice(start, end - start).to_batches()[0]
            key = (split, self._dataset, ids[start])
            yield key, spill_episode(self._spill_dir, key, batch)
            beam.metrics.Metrics.counter("vlaprep", "shard_episodes_reused").inc()
            start = end


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

    def finalize(self, file_infos: list, quarantine: list, read_counts: dict) -> dict:
        """Check the staged files, write the quarantine file, build and validate the manifest, publish.

        ``file_infos``/``quarantine``: JSON dicts. Returns the manifest; raises RuntimeError when the
        files or the accounting disagree (nothing is published then)."""
        file_infos = sorted(file_infos, key=lambda i: i["path"])
        quarantine = sorted(quarantine, key=lambda r: (r["dataset_name"], r["episode_id"], r["stage"]))
        paths.remove_tree(paths.join(self.staging, _WORK))
        _check_files(self.staging, file_infos)
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in quarantine).encode("utf-8")
        write_bytes_atomic(paths.join(self.staging, QUARANTINE_FILE), data)
        quarantine_info = {"path": QUARANTINE_FILE, "records": len(quarantine), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = build_manifest(
            self.inputs, self.options, file_infos, quarantine, read_counts, quarantine_info, self.statistics_bytes,
            self.tokenizer_files, self.rows_fingerprints,
        )
        validate_json(manifest, "manifest")
        publish(self.staging, self.output_dir, manifest_bytes(manifest))
        return manifest


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
) -> dict:
    """The manifest document; raises RuntimeError if any input episode is unaccounted for."""
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
    return {
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


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8")


def publish(staging: str, output_dir: str, manifest_data: bytes) -> None:
    """Swap the staged output into ``output_dir``; the manifest goes last (see the module docstring)."""
    manifest = paths.join(output_dir, MANIFEST_FILE)
    if paths.exists(manifest):
        paths.remove_tree(manifest)  # from here on OUT is "incomplete" until the new manifest lands
        if not paths.is_remote(output_dir):
            fsync_dir(output_dir)
    old = paths.make_temp_dir(output_dir, _OLD_PREFIX)
    for name in _OUTPUT_ENTRIES:
        target = paths.join(output_dir, name)
        if paths.exists(target) or paths.isdir(target) or (not paths.is_remote(target) and os.path.lexists(target)):
            paths.move(target, paths.join(old, name))
        paths.move(paths.join(staging, name), target)
    if not paths.is_remote(output_dir):
        fsync_dir(output_dir)
    write_bytes_atomic(manifest, manifest_data)
    paths.remove_tree(old)
    paths.remove_tree(staging)
    for name in paths.listdir(output_dir):  # leftovers of runs that crashed mid-publish
        if name.startswith(_OLD_PREFIX):
            paths.remove_tree(paths.join(output_dir, name))


def verify_output(output_dir: str, manifest: dict | None = None) -> dict:
    """Every file the manifest names exists with its size and sha256 (what a careful reader does)."""
    if manifest is None:
        manifest = json.loads(paths.read_text(paths.join(output_dir, MANIFEST_FILE)))
    entries = list(manifest["files"]) + [manifest["quarantine"]]
    for entry in entries:
        path = confined(output_dir, entry["path"], paths.join(output_dir, MANIFEST_FILE))
        if not paths.isfile(path):
            raise RuntimeError(f"expected {entry['path']} listed in the manifest to exist in {output_dir!r}, got no such file")
        size = paths.getsize(path)
        if size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise RuntimeError(f"expected {entry['path']} to have {entry['bytes']} bytes and sha256 {entry['sha256']}, got {size} bytes / another digest")
    return manifest


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def run_shards(
    inputs: Sequence[DatasetInput],
    statistics: str,
    tokenizer: str,
    output_dir: str,
    *,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    image_size: int = 224,
    cameras: str | Sequence[str] = "primary",
    target_shard_mb: float = 256.0,
    action_chunk: int = 1,
    normalization: str = "bounds_q99",
    action_encoding: str = "uniform",
    beam_args: Sequence[str] = (),
    log=print,
    wait: bool = True,
    reuse_from: str | None | object = REUSE_OUTPUT,
) -> ShardsResult:
    """Build ``output_dir`` (layout in the module docstring). Raises ``ShardsArgumentError`` for bad
    arguments before any Beam work; any pipeline failure leaves ``output_dir`` as it was.

    ``reuse_from``: a previous shards output (default: ``output_dir`` itself; None: none). Datasets whose
    rows fingerprint (``rows_fingerprint``) matches its manifest are read back from its files instead
    of being read and encoded again; the output is byte-identical to a run from the sources."""
    started = time.time()
    # --- checks, cheapest first -------------------------------------------------------------------
    cameras = parse_cameras(cameras)
    if isinstance(action_chunk, bool) or not isinstance(action_chunk, int) or action_chunk < 1:
        raise ShardsArgumentError(f"expected --action-chunk >= 1, got {action_chunk!r}; hint: 1 gives OpenVLA's rows")
    try:
        target_bytes = int(float(target_shard_mb) * (1 << 20))
    except (TypeError, ValueError):
        target_bytes = 0
    if target_bytes < 1:
        raise ShardsArgumentError(f"expected --target-shard-mb > 0 (MiB), got {target_shard_mb!r}")
    draft = dict(
        image_size=image_size, cameras=cameras, heldout_fraction=heldout_fraction, seed=seed,
        action_chunk=action_chunk, normalization=normalization, action_encoding=action_encoding,
        target_shard_bytes=target_bytes,
    )
    # Validate the user-facing options once, with placeholders for what the inputs decide.
    ShardOptions(**draft, action_dim=1, vocab_size=N_BINS + 1, eos_id=0, model_max_length=1, tokenization="ids_direct")
    action_dim = _check_inputs(inputs, cameras)
    _check_output_dir(output_dir)
    blocks, statistics_bytes = load_statistics(statistics, inputs)
    _check_normalization(blocks, normalization, statistics, action_dim)
    files, hf_tokenizer, vocab_size, eos_id, max_length, tokenization = load_tokenizer(tokenizer, action_chunk * action_dim)
    proprio_dim = probe_proprio_dim(inputs, log)
    options = ShardOptions(
        **draft, action_dim=action_dim, vocab_size=vocab_size, eos_id=eos_id, model_max_length=max_length,
        tokenization=tokenization, proprio_dim=proprio_dim,
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
    created = not paths.exists(output_dir)
    paths.makedirs(output_dir)
    reclaim_stale_staging(output_dir, log)
    staging = paths.make_temp_dir(output_dir, _STAGING_PREFIX)
    if wait and not paths.is_remote(output_dir):
        write_bytes_atomic(paths.join(staging, _OWNER_FILE), json.dumps(_owner_record()).encode())
    fingerprints = {i.name: rows_fingerprint(i, blocks[i.name], options, files) for i in inputs}
    reused = plan_reuse(output_dir if reuse_from is REUSE_OUTPUT else reuse_from, fingerprints, options, log)
    finalizer = ShardsFinalizer(tuple(inputs), options, statistics_bytes, files, staging, output_dir, fingerprints, reused)
    try:
        for name in _OUTPUT_ENTRIES:
            paths.makedirs(paths.join(staging, name))
        # A copy travels with the shards, so `vlaprep validate` and trainers un-normalize from OUT alone.
        write_bytes_atomic(paths.join(staging, STATISTICS_COPY), statistics_bytes)
        pipeline = beam.Pipeline(options=beam_options(beam_args))
        build_shards_pipeline(pipeline, inputs, config, finalizer)
        job = pipeline.run()
        if not wait:
            log(f"[shards] submitted; {output_dir} is published by the pipeline's last step when it finishes")
            return ShardsResult(output_dir, {}, [], time.time() - started, job)
        job.wait_until_finish()
    except BaseException:
        if wait:
            paths.remove_tree(staging)
            if created and not paths.is_remote(output_dir):
                try:
                    os.rmdir(output_dir)  # only if still empty
                except OSError:
                    pass
        raise
    manifest = json.loads(paths.read_text(paths.join(output_dir, MANIFEST_FILE)))
    text = paths.read_text(paths.join(output_dir, QUARANTINE_FILE))
    quarantine = [json.loads(line) for line in text.splitlines() if line.strip()]
    return ShardsResult(output_dir, manifest, quarantine, time.time() - started)


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
