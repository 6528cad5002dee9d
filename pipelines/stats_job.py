"""``vlaprep stats``: build and run the statistics pipeline, reuse cached results, write outputs atomically.

Outputs in ``DIR``:
  dataset_statistics.json        OpenVLA layout, datasets in sorted order, validated against the schema
  dataset_statistics.cache.json  per dataset: fingerprint of its inputs + its entry + quarantine count
  quarantine.jsonl               one QuarantineRecord per rejected episode (this run's datasets)
  stats_cache/<dataset>/*.npz    per source unit (RLDS shard, CALVIN split): transformed rows, for reuse
  <dataset>_histograms.png       per action dim histogram with q01/q99 marked

Before any Beam work the output directory is created and a probe file written and removed there
(``check_output_dir``): a file in the way, a parent that is a file, a read-only or full disk fail at once
as one ``OutputError`` naming the path. A refusal inside the pipeline (no valid episode, an unreadable
cached projection) leaves a note (``FAILURE_FILE``) that the driver turns back into the same error, since
Beam's runners do not carry exception types across processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from typing import Sequence

import apache_beam as beam

from vlaprep.errors import OutputError, UserError, describe_environment_error
from vlaprep import paths
from vlaprep.paths import write_bytes_atomic
from vlaprep.pipelines import fingerprint, sources, stats_cache
from vlaprep.pipelines.job import DatasetInput, beam_options
from vlaprep.pipelines.histogram_png import render_histograms
from vlaprep.pipelines.stats import HISTOGRAM_KEY, ComputeDatasetStatistics
from vlaprep.pipelines.stats_cache import StatsCacheError
from vlaprep.schemas import validate_json
from vlaprep.schemas.episode import quarantine_jsonl

STATS_FILE = "dataset_statistics.json"
CACHE_FILE = "dataset_statistics.cache.json"
QUARANTINE_FILE = "quarantine.jsonl"
FAILURE_FILE = ".stats-failure.json"  # why the last run's pipeline refused (read by a waiting driver)
PROBE_PREFIX = ".write-probe-"  # check_output_dir's probe file, removed at once

class NoValidEpisodesError(UserError):
    """Every episode of a dataset was quarantined: there is nothing to compute statistics from."""


# Errors a pipeline step reports through FAILURE_FILE, by name.
_PIPELINE_ERRORS = {cls.__name__: cls for cls in (NoValidEpisodesError, StatsCacheError)}


def dataset_fingerprint(item: DatasetInput, with_proprio: bool) -> str:
    files = sources.source_files(item.path, item.spec)
    root = paths.commonpath(files) if len(files) > 1 else paths.dirname(files[0]) if files else item.path
    return fingerprint.combine(
        "stats",
        fingerprint.version_fingerprint(),
        item.spec.fingerprint(),
        {"proprio": with_proprio},
        fingerprint.files_fingerprint(files, root),
    )


def write_json_atomic(path: str, document, indent: int | None = 2) -> None:
    write_bytes_atomic(path, json.dumps(document, indent=indent).encode())


def check_output_dir(output_dir: str, what: str = "statistics output") -> None:
    """Create ``output_dir`` and write and remove a probe file there, before any Beam work.

    Raises ``OutputError`` naming the path when it is a file, a parent is a file, it is not writable
    (read-only, permissions) or the disk is full, instead of failing in the pipeline's last step.
    Object stores (no directories): one probe object written and deleted.
    """
    probe_name = f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if paths.is_remote(output_dir):
        try:
            probe = paths.join(output_dir, probe_name)
            write_bytes_atomic(probe, b"vlaprep write probe\n")
            paths.remove_tree(probe)
        except OSError as e:  # Beam's filesystems raise BeamIOError (an IOError) for refused writes
            raise OutputError(f"expected a writable {what} {output_dir!r}, got {type(e).__name__}: {e}") from e
        return
    local = output_dir[len("file://"):] if output_dir.startswith("file://") else output_dir
    if os.path.lexists(local) and not os.path.isdir(local):
        raise OutputError(
            f"expected the {what} {output_dir!r} to be a directory, got a file (or a broken link); "
            "hint: choose another --output"
        )
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the {what} {output_dir!r}: {describe_environment_error(e)}") from e
    probe = os.path.join(local, probe_name)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"vlaprep write probe\n")
        finally:
            os.close(fd)
            if os.path.lexists(probe):
                os.unlink(probe)
    except OSError as e:
        where = OSError(e.errno, e.strerror or os.strerror(e.errno or 0), output_dir)
        raise OutputError(f"expected a writable {what} directory, got {describe_environment_error(where)}") from e


class _ProjectUnitFn(beam.DoFn):
    """UnitTask -> UnitSummary (``stats_cache.project_unit``); a projection that cannot be read is noted
    in FAILURE_FILE for the driver, which reports it as one line."""

    def __init__(self, specs: dict, with_proprio: bool, output_dir: str):
        self._specs = specs
        self._with_proprio = with_proprio
        self._output_dir = output_dir
        self._parsers = None

    def setup(self):
        self._parsers = {}  # (dataset, dataset dir) -> RLDS parser, built once per worker

    def process(self, task: stats_cache.UnitTask):
        spec = self._specs[task.dataset]
        parser = None
        if not task.cached:
            key = (task.dataset, task.unit.path)
            if key not in self._parsers:
                self._parsers[key] = sources.unit_parser(spec, task.unit)
            parser = self._parsers[key]
        try:
            summary = stats_cache.project_unit(task, spec, self._with_proprio, parser)
        except StatsCacheError as e:
            _note_failure(self._output_dir, StatsCacheError, str(e))
            raise
        beam.metrics.Metrics.counter("vlaprep", "stats_units_reused" if task.cached else "stats_units_read").inc()
        yield summary


def plan_units(inputs: Sequence[DatasetInput], with_proprio: bool, output_dir: str, force: bool = False) -> list:
    """-> [UnitTask] for every source unit of every input; ``cached`` where its projection exists (not with ``force``)."""
    tasks = []
    for item in inputs:
        # One listing per dataset, not one existence check per unit (each is a request on object stores).
        projection_dir = paths.dirname(stats_cache.projection_path(output_dir, item.name, "x"))
        present = set() if force else {paths.join(projection_dir, n) for n, _ in paths.list_files(projection_dir)}
        units = sources.source_units(item.path, item.spec)
        digests = fingerprint.digests([f for u in units for f in u.files + u.shared])
        for unit in units:
            key = stats_cache.unit_key(unit, item.spec, with_proprio, digests)
            path = stats_cache.projection_path(output_dir, item.name, key)
            tasks.append(stats_cache.UnitTask(item.name, unit, path, path in present))
    return tasks


def build_stats_pipeline(
    pipeline: beam.Pipeline, inputs: Sequence[DatasetInput], with_proprio: bool, finalizer: "StatsFinalizer", force: bool = False
) -> dict:
    """Wire source units -> projections -> statistics -> ``FinalizeStatistics``, which writes the outputs.

    One element per source unit (RLDS shard, CALVIN window run) from start to end: a unit is read,
    transformed and projected in one worker call, or its cached projection is used; only per-unit
    summaries and combiner accumulators cross stage boundaries, so the driver's and each worker's memory
    do not grow with the number of episodes. Returns ``{"units_read": n, "units_reused": m}``.
    """
    tasks = plan_units(inputs, with_proprio, finalizer.output_dir, force)
    specs = {item.name: item.spec for item in inputs}
    summaries = (
        pipeline
        | "ListUnits" >> beam.Create(tasks)
        | "ProjectUnits" >> beam.ParDo(_ProjectUnitFn(specs, with_proprio, finalizer.output_dir))
    )
    entries = summaries | "Statistics" >> ComputeDatasetStatistics(
        {item.name: item.spec.normalization_mask for item in inputs}, with_proprio=with_proprio
    )
    quarantine = summaries | "QuarantineJson" >> beam.FlatMap(
        lambda s: [json.dumps(r.to_json_dict(), sort_keys=True) for r in s.quarantine]
    )
    counts = (
        summaries
        | "EpisodesOfUnit" >> beam.Map(lambda s: (s.dataset, s.episodes_read))
        | "CountRead" >> beam.CombinePerKey(sum)
    )
    _ = (
        pipeline
        | "FinalizeTrigger" >> beam.Create([None])
        | "FinalizeStatistics" >> beam.ParDo(
            _FinalizeStatsFn(finalizer),
            beam.pvalue.AsList(entries),
            beam.pvalue.AsList(quarantine),
            beam.pvalue.AsList(counts),
        )
    )
    cached = sum(1 for t in tasks if t.cached)
    return {"units_read": len(tasks) - cached, "units_reused": cached}


@dataclasses.dataclass
class StatsResult:
    statistics: dict
    quarantine: list
    reused: list
    computed: list
    episodes_read: dict
    seconds: float
    units: dict = dataclasses.field(default_factory=dict)
    job: object = None  # the Beam PipelineResult of a run that did not wait (``wait=False``)


@dataclasses.dataclass(frozen=True)
class StatsFinalizer:
    """What publishing the statistics needs besides the pipeline's results; pickled to the worker that runs
    the pipeline's last step (or used on the driver when every dataset is reused)."""

    output_dir: str
    names: tuple[str, ...]  # every input dataset
    todo: tuple[str, ...]  # the datasets computed in this run
    fingerprints: dict
    cache: dict  # the previous cache document: entries of reused datasets

    def finalize(self, new_entries: dict, quarantine: list, read_counts: dict) -> None:
        """Write histograms, ``quarantine.jsonl``, ``dataset_statistics.json`` and its cache, in that order.

        ``quarantine``: JSON dicts of this run's records. Raises NoValidEpisodesError (after writing the
        quarantine and a failure note for the driver) when a computed dataset has no valid episode.
        """
        quarantine = sorted(quarantine, key=lambda r: (r["dataset_name"], r["episode_id"], r["stage"]))
        new_entries = {name: dict(entry) for name, entry in new_entries.items()}
        for name, entry in sorted(new_entries.items()):
            histogram = entry.pop(HISTOGRAM_KEY, None)
            if histogram is not None:
                render_histograms(name, histogram, entry["action"], paths.join(self.output_dir, f"{name}_histograms.png"))
        missing = [name for name in self.todo if name not in new_entries]
        if missing:
            # Keep the reasons on disk before failing: they are what the user needs to fix the input.
            _write_jsonl_atomic(paths.join(self.output_dir, QUARANTINE_FILE), quarantine)
            counts = {n: sum(1 for r in quarantine if r["dataset_name"] == n) for n in missing}
            message = (
                f"expected statistics for every dataset, got none for {missing!r}: no valid episode "
                f"({counts} quarantined); see {paths.join(self.output_dir, QUARANTINE_FILE)} for the reasons"
            )
            _note_failure(self.output_dir, NoValidEpisodesError, message)
            raise NoValidEpisodesError(message)
        statistics, new_cache = {}, {}
        for name in sorted(self.names):
            if name in new_entries:
                new_cache[name] = {
                    "fingerprint": self.fingerprints[name],
                    "entry": new_entries[name],
                    "quarantined": sum(1 for r in quarantine if r["dataset_name"] == name),
                    "episodes_read": read_counts.get(name, 0),
                }
            else:
                new_cache[name] = self.cache[name]
            statistics[name] = new_cache[name]["entry"]
        validate_json(statistics, "dataset_statistics")
        if self.todo:
            _write_jsonl_atomic(paths.join(self.output_dir, QUARANTINE_FILE), quarantine)
        # Statistics, then the cache that vouches for them: a crash between the two only costs a recompute.
        write_json_atomic(paths.join(self.output_dir, STATS_FILE), statistics)
        write_json_atomic(paths.join(self.output_dir, CACHE_FILE), new_cache, indent=1)


def _note_failure(output_dir: str, error: type, message: str) -> None:
    """Leave the reason of a refusal inside the pipeline for the driver (see ``run_stats``)."""
    write_json_atomic(paths.join(output_dir, FAILURE_FILE), {"error": error.__name__, "message": message})


def _noted_failure(failure_path: str) -> UserError | None:
    """The error a pipeline step noted in ``failure_path``, if any."""
    if not paths.isfile(failure_path):
        return None
    try:
        note = json.loads(paths.read_text(failure_path))
        return _PIPELINE_ERRORS[note["error"]](str(note["message"]))
    except (ValueError, KeyError, TypeError):  # a note from another version: the pipeline's own error stands
        return None


def load_cache(cache_path: str, log=print) -> dict:
    """The previous run's cache document, keeping only well-formed entries; {} when it is absent or
    unreadable (a recompute then rebuilds it: the cache only saves work)."""
    if not paths.isfile(cache_path):
        return {}
    try:
        document = json.loads(paths.read_text(cache_path))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        log(f"[stats] {cache_path} is unreadable ({' '.join(str(e).split())[:200]}); recomputing every dataset")
        return {}
    if not isinstance(document, dict):
        log(f"[stats] {cache_path} holds a {type(document).__name__}, expected an object; recomputing every dataset")
        return {}
    cache = {
        name: entry for name, entry in document.items()
        if isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str) and isinstance(entry.get("entry"), dict)
    }
    dropped = sorted(set(document) - set(cache))
    if dropped:
        log(f"[stats] {cache_path}: malformed entries for {dropped!r}; recomputing them")
    return cache


class _FinalizeStatsFn(beam.DoFn):
    """The pipeline's last step: one element; side inputs are complete only once every dataset is done."""

    def __init__(self, finalizer: StatsFinalizer):
        self._finalizer = finalizer

    def process(self, _unused, entries, quarantine, counts):
        self._finalizer.finalize(dict(entries), [json.loads(q) for q in quarantine], dict(counts))
        yield paths.join(self._finalizer.output_dir, STATS_FILE)


def run_stats(
    inputs: Sequence[DatasetInput],
    output_dir: str,
    with_proprio: bool = False,
    force: bool = False,
    beam_args: Sequence[str] = (),
    log=print,
    wait: bool = True,
) -> StatsResult:
    """Compute and publish the statistics of ``inputs`` into ``output_dir`` (local path or ``gs://``).

    The pipeline's last step writes the outputs (``StatsFinalizer``), so a run submitted with
    ``wait=False`` (Dataflow Flex Templates, ``--no-wait``) produces them without this process.
    User errors: ``OutputError`` (before any Beam work), ``NoValidEpisodesError``, ``StatsCacheError``;
    a full or read-only disk while writing is an ``OSError`` naming the file.
    """
    started = time.time()
    check_output_dir(output_dir)
    cache_path = paths.join(output_dir, CACHE_FILE)
    cache = {} if force else load_cache(cache_path, log)
    failure_path = paths.join(output_dir, FAILURE_FILE)
    if paths.exists(failure_path):
        paths.remove_tree(failure_path)
    fingerprints = {item.name: dataset_fingerprint(item, with_proprio) for item in inputs}
    todo = [item for item in inputs if force or cache.get(item.name, {}).get("fingerprint") != fingerprints[item.name]]
    reused = [item.name for item in inputs if item not in todo]
    for name in reused:
        log(f"[stats] {name}: inputs unchanged (fingerprint {fingerprints[name][:12]}), reusing cached statistics")
    finalizer = StatsFinalizer(
        output_dir, tuple(i.name for i in inputs), tuple(i.name for i in todo), fingerprints,
        {name: cache[name] for name in reused},
    )
    units = {}
    if not todo:
        finalizer.finalize({}, [], {})
    else:
        log(f"[stats] computing {', '.join(i.name for i in todo)} ...")
        input_bytes = sum(sum(paths.sizes(sources.source_files(item.path, item.spec)).values()) for item in todo)
        pipeline = beam.Pipeline(options=beam_options(beam_args, input_bytes))
        units.update(build_stats_pipeline(pipeline, todo, with_proprio, finalizer, force))
        try:
            # Local runners execute the whole pipeline inside run(); others inside wait_until_finish().
            job = pipeline.run()
            if not wait:
                log(f"[stats] submitted; {output_dir} is written by the pipeline's last step when it finishes")
                return StatsResult({}, [], reused, [i.name for i in todo], {}, time.time() - started, units, job)
            job.wait_until_finish()
        except Exception:
            noted = _noted_failure(failure_path)  # a step refused: report its reason as such
            if noted is not None:
                raise noted from None
            raise
        log(f"[stats] read {units['units_read']} source units, reused {units['units_reused']} cached unit projections")
    statistics = json.loads(paths.read_text(paths.join(output_dir, STATS_FILE)))
    new_cache = json.loads(paths.read_text(cache_path))
    quarantine = []
    if todo:
        text = paths.read_text(paths.join(output_dir, QUARANTINE_FILE))
        quarantine = [json.loads(line) for line in text.splitlines() if line.strip()]
    read_counts = {i.name: new_cache[i.name]["episodes_read"] for i in todo}
    return StatsResult(statistics, quarantine, reused, [i.name for i in todo], read_counts, time.time() - started, units)


def _write_jsonl_atomic(path: str, records: list) -> None:
    write_bytes_atomic(path, quarantine_jsonl(records))


def summary_table(result: StatsResult, cache: dict | None = None) -> str:
    """Human-readable per-dataset summary: trajectories, transitions, quarantined, q01/q99 per action dim."""
    lines = []
    for name, entry in result.statistics.items():
        q = sum(1 for r in result.quarantine if r["dataset_name"] == name)
        state = "cached" if name in result.reused else "computed"
        lines.append(
            f"{name}: {entry['num_trajectories']} trajectories, {entry['num_transitions']} transitions, "
            f"{q} quarantined ({state})"
        )
        lines.append(f"  {'dim':>3} {'q01':>12} {'q99':>12} {'min':>12} {'max':>12} norm")
        a = entry["action"]
        for d in range(len(a["q01"])):
            lines.append(
                f"  {d:>3} {a['q01'][d]:>12.6g} {a['q99'][d]:>12.6g} {a['min'][d]:>12.6g} {a['max'][d]:>12.6g} "
                f"{'yes' if a['mask'][d] else 'no'}"
            )
    reasons = {}
    for r in result.quarantine:
        reasons.setdefault((r["dataset_name"], r["reason"].split(":")[0]), 0)
        reasons[(r["dataset_name"], r["reason"].split(":")[0])] += 1
    for (name, kind), n in sorted(reasons.items()):
        lines.append(f"quarantined {name}: {n} x {kind}")
    return "\n".join(lines)
