"""``vlaprep stats``, the driver: reuse cached results, run the statistics pipeline, publish its outputs.

Outputs in ``DIR``:
  dataset_statistics.json        OpenVLA layout, datasets in sorted order, validated against the schema
  dataset_statistics.cache.json  per dataset: fingerprint of its inputs + its entry + quarantine count
  quarantine.jsonl               one QuarantineRecord per rejected episode (this run's datasets)
  stats_cache/<dataset>/*.npz    per source unit (RLDS shard, CALVIN split): transformed rows, for reuse
  <dataset>_histograms.png       per action dim histogram with q01/q99 marked

Before any Beam work the output directory is created and a probe file written and removed there
(``job.check_output_dir``): a file in the way, a parent that is a file, a read-only or full disk fail at
once as one ``OutputError`` naming the path. A refusal inside the pipeline (no valid episode, an
unreadable cached projection) leaves a note (``failure.FAILURE_FILE``) that the driver turns back into
the same error, since Beam's runners do not carry exception types across processes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Sequence

import apache_beam as beam

from vlaprep import paths
from vlaprep.paths import write_bytes_atomic
from vlaprep.pipelines.job import DatasetInput, beam_options, check_output_dir, resolve_datasets, write_json_atomic
from vlaprep.pipelines.sources import ResolvedDataset
from vlaprep.pipelines.stats.beam import build_stats_pipeline
from vlaprep.pipelines.stats.cache import dataset_fingerprint
from vlaprep.pipelines.stats.failure import FAILURE_FILE, NoValidEpisodesError, note_failure, noted_failure
from vlaprep.pipelines.stats.histogram import render_histograms
from vlaprep.pipelines.stats.records import HISTOGRAM_KEY
from vlaprep.schemas import validate_json
from vlaprep.schemas.episode import quarantine_jsonl
from vlaprep.schemas.layout import QUARANTINE_FILE_NAME, STATISTICS_CACHE_FILE, STATISTICS_FILE


@dataclasses.dataclass
class StatsResult:
    """What ``run_stats`` published (read back from ``output_dir``) and how: reused and computed datasets,
    unit counts, seconds; ``job`` instead of results for a run that did not wait."""

    statistics: dict
    quarantine: list
    reused: list
    computed: list
    episodes_read: dict
    seconds: float
    units: dict = dataclasses.field(default_factory=dict)
    job: object = None  # the Beam PipelineResult of a run that did not wait (``wait=False``)


def _write_quarantine(path: str, records: list) -> None:
    """``quarantine.jsonl``: ``records`` (JSON dicts) written by the one quarantine writer, atomically."""
    write_bytes_atomic(path, quarantine_jsonl(records))


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
            _write_quarantine(paths.join(self.output_dir, QUARANTINE_FILE_NAME), quarantine)
            counts = {n: sum(1 for r in quarantine if r["dataset_name"] == n) for n in missing}
            message = (
                f"expected statistics for every dataset, got none for {missing!r}: no valid episode "
                f"({counts} quarantined); see {paths.join(self.output_dir, QUARANTINE_FILE_NAME)} for the reasons"
            )
            note_failure(self.output_dir, NoValidEpisodesError, message)
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
            _write_quarantine(paths.join(self.output_dir, QUARANTINE_FILE_NAME), quarantine)
        # Statistics, then the cache that vouches for them: a crash between the two only costs a recompute.
        write_json_atomic(paths.join(self.output_dir, STATISTICS_FILE), statistics)
        write_json_atomic(paths.join(self.output_dir, STATISTICS_CACHE_FILE), new_cache, indent=1)


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


def run_stats(
    inputs: Sequence[DatasetInput | ResolvedDataset],
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
    check_output_dir(output_dir, "statistics output")
    cache_path = paths.join(output_dir, STATISTICS_CACHE_FILE)
    cache = {} if force else load_cache(cache_path, log)
    failure_path = paths.join(output_dir, FAILURE_FILE)
    if paths.exists(failure_path):
        paths.remove_tree(failure_path)
    inputs = resolve_datasets(inputs)
    fingerprints = {item.name: dataset_fingerprint(item, with_proprio) for item in inputs}
    todo = [item for item in inputs if force or cache.get(item.name, {}).get("fingerprint") != fingerprints[item.name]]
    reused = [item.name for item in inputs if item.name not in {i.name for i in todo}]
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
        input_bytes = sum(sum(paths.sizes(list(item.files)).values()) for item in todo)
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
            noted = noted_failure(failure_path)  # a step refused: report its reason as such
            if noted is not None:
                raise noted from None
            raise
        log(f"[stats] read {units['units_read']} source units, reused {units['units_reused']} cached unit projections")
    statistics = json.loads(paths.read_text(paths.join(output_dir, STATISTICS_FILE)))
    new_cache = json.loads(paths.read_text(cache_path))
    quarantine = []
    if todo:
        text = paths.read_text(paths.join(output_dir, QUARANTINE_FILE_NAME))
        quarantine = [json.loads(line) for line in text.splitlines() if line.strip()]
    read_counts = {i.name: new_cache[i.name]["episodes_read"] for i in todo}
    return StatsResult(statistics, quarantine, reused, [i.name for i in todo], read_counts, time.time() - started, units)


def summary_table(result: StatsResult) -> str:
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
