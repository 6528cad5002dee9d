"""``vlaprep stats``: build and run the statistics pipeline, reuse cached results, write outputs atomically.

Outputs in ``DIR``:
  dataset_statistics.json        OpenVLA layout, datasets in sorted order, validated against the schema
  dataset_statistics.cache.json  per dataset: fingerprint of its inputs + its entry + quarantine count
  quarantine.jsonl               one QuarantineRecord per rejected episode (this run's datasets)
  stats_cache/<dataset>/*.npz    per source unit (RLDS shard, CALVIN split): transformed rows, for reuse
  <dataset>_histograms.png       per action dim histogram with q01/q99 marked
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from vlaprep.errors import UserError
from vlaprep import paths
from vlaprep.paths import write_bytes_atomic
from vlaprep.pipelines import fingerprint, sources, stats_cache
from vlaprep.pipelines.histogram_png import render_histograms
from vlaprep.pipelines.stats import HISTOGRAM_KEY, ApplyDatasetTransform, ComputeDatasetStatistics
from vlaprep.schemas import validate_json
from vlaprep.transforms.registry import DatasetSpec

STATS_FILE = "dataset_statistics.json"
CACHE_FILE = "dataset_statistics.cache.json"
QUARANTINE_FILE = "quarantine.jsonl"
FAILURE_FILE = ".stats-failure.json"  # why the last run's final step refused (read by a waiting driver)

# Local runs must never reach for the network: the plain DirectRunner first tries to download Prism.
DEFAULT_BEAM_ARGS = (
    "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner",
    "--default_sdk_harness_log_level=WARNING",
)
# Worker processes cost ~4 s to start (each imports Beam and the pipeline's modules) and then read in
# parallel; below this much input one in-process worker finishes first (measured: benchmarks/).
PARALLEL_MIN_BYTES = 256 << 20


class NoValidEpisodesError(UserError):
    """Every episode of a dataset was quarantined: there is nothing to compute statistics from."""


@dataclasses.dataclass(frozen=True)
class DatasetInput:
    name: str
    path: str
    spec: DatasetSpec


def beam_options(beam_args: Sequence[str], input_bytes: int | None = None) -> PipelineOptions:
    """PipelineOptions from the pass-through flags, with network-free local defaults when no runner is named.

    Default: Beam's FnApiRunner with one worker process per core, or in-process when ``input_bytes`` is
    known to be below ``PARALLEL_MIN_BYTES`` (or there is one core). ``--direct_running_mode`` and
    ``--direct_num_workers`` override the choice; ``--runner`` replaces all of it.
    """
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args = list(DEFAULT_BEAM_ARGS) + args
        cores = os.cpu_count() or 1
        if not any(a.startswith("--direct_running_mode") for a in args):
            small = input_bytes is not None and input_bytes < PARALLEL_MIN_BYTES
            args.append("--direct_running_mode=" + ("in_memory" if small or cores == 1 else "multi_processing"))
        if not any(a.startswith("--direct_num_workers") for a in args):
            args.append(f"--direct_num_workers={cores}")
    return PipelineOptions(args)


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


class _WriteProjectionFn(beam.DoFn):
    """((dataset, unit), {"path", "trajectories", "quarantine", "read"}) -> writes the unit's projection."""

    def process(self, element):
        (_dataset, _unit), grouped = element
        for path, prefix in grouped["path"]:  # only units read in this run have a target path
            stats_cache.write_projection(
                path, list(grouped["trajectories"]), list(grouped["quarantine"]), sum(grouped["read"]), prefix
            )
            beam.metrics.Metrics.counter("vlaprep", "stats_units_written").inc()


class _LoadProjectionFn(beam.DoFn):
    """(dataset, projection path) -> TrajectoryRecords; tagged QuarantineRecords and read counts."""

    def process(self, element):
        dataset, path, prefix = element
        records, quarantine, episodes_read = stats_cache.load_projection(path, dataset, prefix)
        beam.metrics.Metrics.counter("vlaprep", "stats_units_reused").inc()
        yield from records
        for q in quarantine:
            yield beam.pvalue.TaggedOutput("quarantine", q)
        yield beam.pvalue.TaggedOutput("read", (dataset, episodes_read))


def plan_units(inputs: Sequence[DatasetInput], with_proprio: bool, output_dir: str, force: bool = False):
    """-> (new units to read: [(DatasetInput, [(SourceUnit, projection path)])], cached: [(dataset, path, prefix)])."""
    new, cached = [], []
    for item in inputs:
        todo = []
        # One listing per dataset, not one existence check per unit (each is a request on object stores).
        projection_dir = paths.dirname(stats_cache.projection_path(output_dir, item.name, "x"))
        present = set() if force else {paths.join(projection_dir, n) for n, _ in paths.list_files(projection_dir)}
        units = sources.source_units(item.path, item.spec)
        digests = fingerprint.digests([f for u in units for f in u.files + u.shared])
        for unit in units:
            key = stats_cache.unit_key(unit, item.spec, with_proprio, digests)
            path = stats_cache.projection_path(output_dir, item.name, key)
            if path in present:
                cached.append((item.name, path, unit.prefix))
            else:
                todo.append((unit, path))
        if todo:
            new.append((item, todo))
    return new, cached


def build_stats_pipeline(
    pipeline: beam.Pipeline, inputs: Sequence[DatasetInput], with_proprio: bool, finalizer: "StatsFinalizer", force: bool = False
) -> dict:
    """Wire sources -> transforms -> statistics -> ``FinalizeStatistics``, which writes the outputs.

    Source units (RLDS shards, CALVIN splits) whose projection is cached are not read: their transformed
    rows come from the cache; the others are read and their projections written for the next run.
    Returns ``{"units_read": n, "units_reused": m}``.
    """
    new, cached = plan_units(inputs, with_proprio, finalizer.output_dir, force)
    specs = {item.name: item.spec for item in inputs}
    episodes, quarantined, targets = [], [], []
    for item, todo in new:
        read = pipeline | f"Read[{item.name}]" >> sources.read_units([u for u, _ in todo], item.spec)
        episodes.append(read["episodes"])
        quarantined.append(read["quarantine"])
        targets += [((item.name, u.name), (path, u.prefix)) for u, path in todo]
    all_episodes = episodes | "AllEpisodes" >> beam.Flatten(pipeline=pipeline)
    transformed = all_episodes | "ApplyTransforms" >> ApplyDatasetTransform(specs)
    new_quarantine = (quarantined + [transformed["quarantine"]]) | "NewQuarantine" >> beam.Flatten(pipeline=pipeline)

    def unit_key(dataset: str, episode_id: str):
        return dataset, sources.episode_unit(specs[dataset], episode_id)

    _ = (
        {
            "path": pipeline | "UnitTargets" >> beam.Create(targets),
            "trajectories": transformed["trajectories"] | "TrajectoryUnit" >> beam.Map(lambda r: (unit_key(r.dataset_name, r.episode_id), r)),
            "quarantine": new_quarantine | "QuarantineUnit" >> beam.Map(lambda q: (unit_key(q.dataset_name, q.episode_id), q)),
            "read": all_episodes | "EpisodeUnit" >> beam.Map(lambda e: (unit_key(e.dataset_name, e.episode_id), 1)),
        }
        | "GroupByUnit" >> beam.CoGroupByKey()
        | "WriteProjections" >> beam.ParDo(_WriteProjectionFn())
    )
    loaded = (
        pipeline
        | "CachedUnits" >> beam.Create(cached)
        | "LoadProjections" >> beam.ParDo(_LoadProjectionFn()).with_outputs("quarantine", "read", main="trajectories")
    )
    trajectories = (transformed["trajectories"], loaded.trajectories) | "AllTrajectories" >> beam.Flatten()
    entries = trajectories | "Statistics" >> ComputeDatasetStatistics(
        {item.name: item.spec.normalization_mask for item in inputs}, with_proprio=with_proprio
    )
    quarantine = (
        (new_quarantine, loaded.quarantine)
        | "AllQuarantine" >> beam.Flatten()
        | "QuarantineJson" >> beam.Map(lambda r: json.dumps(r.to_json_dict(), sort_keys=True))
    )
    counts = (
        (all_episodes | "DatasetOfEpisode" >> beam.Map(lambda e: (e.dataset_name, 1)), loaded.read)
        | "AllReadCounts" >> beam.Flatten()
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
    return {"units_read": len(targets), "units_reused": len(cached)}


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
            write_json_atomic(paths.join(self.output_dir, FAILURE_FILE), {"error": "NoValidEpisodesError", "message": message})
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
    """
    started = time.time()
    paths.makedirs(output_dir)
    cache_path = paths.join(output_dir, CACHE_FILE)
    cache = {}
    if not force and paths.isfile(cache_path):
        cache = json.loads(paths.read_text(cache_path))
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
        job = pipeline.run()
        if not wait:
            log(f"[stats] submitted; {output_dir} is written by the pipeline's last step when it finishes")
            return StatsResult({}, [], reused, [i.name for i in todo], {}, time.time() - started, units, job)
        try:
            job.wait_until_finish()
        except Exception:
            if paths.isfile(failure_path):  # the pipeline's last step refused: report its reason as such
                raise NoValidEpisodesError(json.loads(paths.read_text(failure_path))["message"]) from None
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
    write_bytes_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


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


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
