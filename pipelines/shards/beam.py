"""The shard stage as Beam steps: thin adapters over ``rows``, ``plan``, ``write`` and ``job``.

Pipeline shape (all datasets in one pipeline, ``build_shards_pipeline``):

  Episode --EncodeEpisodes--> ((split, dataset, episode_id), EpisodeRef)   rows spilled as Arrow IPC
          --WriteShards-->    one JSON line per Parquet file written into the staging directory
  (and a QuarantineRecord for every episode that cannot become rows)
          --FinalizeShards--> checks, manifest, publish (``job.ShardsFinalizer``), once every file is written

Data flow. Encoded episodes are spilled as Arrow IPC files under the staging directory and only
``EpisodeRef``s (name, bytes, rows), packed by the thousand, go through the shuffle (see
``EncodeEpisodes``, ``WriteShards``): temporary disk
of about the rows' uncompressed size (~150 KB per 224x224 frame) under ``OUT/.staging-*/.work``.
Every encoded, quarantined, reused or written item increments a counter in the ``vlaprep`` namespace.
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, Sequence

import apache_beam as beam
import pyarrow as pa

from vlaprep import paths
from vlaprep.pipelines.sources import ReadDataset, ResolvedDataset
from vlaprep.pipelines.shards.plan import ShardPlan, plan_shards
from vlaprep.pipelines.shards.publish import WORK_DIR
from vlaprep.pipelines.shards.rows import EncoderConfig
from vlaprep.pipelines.shards.spill import EpisodeRef, SpilledEpisode
from vlaprep.pipelines.shards.write import reload_shard_episodes, write_shard_file
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.schemas.layout import MANIFEST_FILE

if TYPE_CHECKING:
    from vlaprep.pipelines.shards.job import ShardsFinalizer

QUARANTINE = "quarantine"  # the tag of EncodeEpisodes' quarantine output
_NAMESPACE = "vlaprep"


class _EncodeEpisodeFn(beam.DoFn):
    """Builds the worker's ``EpisodeEncoder`` once (``setup``: the prompt tokenizer) and adapts its ``encode``."""

    def __init__(self, config: EncoderConfig, spill_dir: str):
        self._config = config
        self._spill_dir = spill_dir
        self._encoder = None

    def setup(self):
        self._encoder = self._config.build()
        paths.makedirs(self._spill_dir)

    def process(self, episode: Episode):
        result = self._encoder.encode(episode, self._spill_dir)
        if isinstance(result, QuarantineRecord):
            beam.metrics.Metrics.counter(_NAMESPACE, f"quarantined_{result.stage}").inc()
            yield beam.pvalue.TaggedOutput(QUARANTINE, result)
            return
        beam.metrics.Metrics.counter(_NAMESPACE, "shard_episodes_encoded").inc()
        yield result


class EncodeEpisodes(beam.PTransform):
    """PCollection[Episode] -> {"encoded": PCollection[(EpisodeKey, EpisodeRef)], "quarantine": PCollection[QuarantineRecord]}.

    EpisodeKey = (split, dataset_name, episode_id); the EpisodeRef names the episode's rows (input_ids,
    labels, action_token_ids [N*D] int32, action [D] float32, PNG images, ...) spilled in ``spill_dir``.

    Per episode (``rows.EpisodeEncoder.encode``): empty-language check, the dataset transform
    (``stats.records.transform_episode``, the same one statistics use, here next to the images it needs), then
    its rows, chunk by chunk, spilled to an Arrow IPC file in ``spill_dir``. Only the small ``EpisodeRef``
    travels through the shuffle: the rows (mostly PNG bytes) would otherwise pass through the runner's
    shuffle -- for the local FnApiRunner that is its own process memory, which both limits the dataset
    size and cost as much as decoding and resizing (measured: ~1 ms per 150 KB row). ``spill_dir`` must
    be visible to every worker (a local run, or a shared file system), as must the shard output.
    """

    def __init__(self, config: EncoderConfig, spill_dir: str):
        super().__init__()
        self._config = config
        self._spill_dir = spill_dir

    def expand(self, episodes):
        results = episodes | "Encode" >> beam.ParDo(_EncodeEpisodeFn(self._config, self._spill_dir)).with_outputs(
            QUARANTINE, main="encoded"
        )
        return {"encoded": results.encoded, "quarantine": results[QUARANTINE]}


REFS_PER_BATCH = 4096  # episode references packed into one element; bounds the packing worker's buffer


def _pack_refs(items) -> bytes:
    """[(EpisodeKey, EpisodeRef)] -> one element: their fields as JSON rows sorted by key, zlib-compressed
    (~50 bytes per episode instead of a few KB of Python objects where a local runner holds them)."""
    rows = [[*key, ref.name, ref.nbytes, ref.rows, ref.arrow_nbytes] for key, ref in sorted(items, key=lambda kv: tuple(kv[0]))]
    return zlib.compress(json.dumps(rows, separators=(",", ":")).encode("utf-8"))


def _unpack_refs(packed: bytes) -> list:
    """``_pack_refs`` reversed: [(EpisodeKey, EpisodeRef)] sorted by key."""
    return [((split, dataset, episode_id), EpisodeRef(name, nbytes, rows, arrow_nbytes))
            for split, dataset, episode_id, name, nbytes, rows, arrow_nbytes in json.loads(zlib.decompress(packed))]


def _plan_packed(batches: list, target_bytes: int) -> ShardPlan:
    """Every packed batch -> ``plan_shards`` over their (key, nbytes)."""
    return plan_shards([(key, ref.nbytes) for packed in batches for key, ref in _unpack_refs(packed)], target_bytes)


def _split_by_shard(packed: bytes, plan: ShardPlan):
    """A packed batch -> ((split, shard index), packed references of that shard) per shard it holds episodes
    of. The batch is sorted and a shard is a contiguous key range, so each shard is one run of it."""
    runs = []
    for key, ref in _unpack_refs(packed):
        target = (key[0], plan.shard_of(key))
        if runs and runs[-1][0] == target:
            runs[-1][1].append((key, ref))
        else:
            runs.append((target, [(key, ref)]))
    for target, items in runs:
        yield target, _pack_refs(items)


class _WriteShardFn(beam.DoFn):
    """((split, shard index), [packed references of its episodes]) -> the written file's info as one JSON line."""

    def __init__(self, root: str, spill_dir: str, schema: pa.Schema):
        self._root = root
        self._spill_dir = spill_dir
        self._schema = schema

    def process(self, element, plan: ShardPlan):
        (split, index), batches = element
        items = [(key, SpilledEpisode(self._spill_dir, ref)) for packed in batches for key, ref in _unpack_refs(packed)]
        info = write_shard_file(self._root, split, index, plan.num_shards(split), items, self._schema, plan.episodes[split][index])
        beam.metrics.Metrics.counter(_NAMESPACE, "shard_files_written").inc()
        beam.metrics.Metrics.counter(_NAMESPACE, "shard_rows_written").inc(info["rows"])
        yield json.dumps(info, sort_keys=True)


class WriteShards(beam.PTransform):
    """PCollection[(EpisodeKey, EpisodeRef)] -> PCollection[str]: one JSON file info per Parquet file
    written under ``root`` (``<split>/shard-XXXXX-of-YYYYY.parquet``; keys of ``write.write_shard_file``).

    The references are first packed, right where they are produced, into batches of up to
    ``REFS_PER_BATCH`` (compressed bytes): every later step crosses a stage boundary (the plan waits for
    all sizes, the writers for the plan), and a local runner (FnApiRunner, in-process or with worker
    processes) holds every element crossing one in the driver's memory, where one Python object per
    episode grew the driver by a few KB per episode. The (key, nbytes) of every batch are gathered in one
    place (no rows), turned into a ``ShardPlan`` and given to the workers as a side input; each batch is
    split into runs by (split, shard), grouped per shard, and each writer reads its episodes from
    ``spill_dir``. The shard size target counts the rows' uncompressed Arrow size (what a reader holds
    once a shard is decoded); the files are smaller by Parquet's zstd ratio.
    """

    def __init__(self, root: str, spill_dir: str, schema: pa.Schema, target_bytes: int):
        super().__init__()
        self._root = root
        self._spill_dir = spill_dir
        self._schema = schema
        self._target_bytes = int(target_bytes)

    def expand(self, encoded):
        batches = (
            encoded
            | "BatchRefs" >> beam.BatchElements(min_batch_size=REFS_PER_BATCH, max_batch_size=REFS_PER_BATCH)
            | "PackRefs" >> beam.Map(_pack_refs)
        )
        plan = (
            batches
            | "AllBatches" >> beam.combiners.ToList()
            | "PlanShards" >> beam.Map(_plan_packed, self._target_bytes)
        )
        return (
            batches
            | "SplitByShard" >> beam.FlatMap(_split_by_shard, plan=beam.pvalue.AsSingleton(plan))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShardFn(self._root, self._spill_dir, self._schema), plan=beam.pvalue.AsSingleton(plan))
        )


class _ReloadEpisodesFn(beam.DoFn):
    """(previous shard file, its sha256) -> (EpisodeKey, EpisodeRef) for each of ``dataset``'s episodes in it,
    spilled like freshly encoded ones. The file's digest is checked first: a changed file fails the run."""

    def __init__(self, dataset: str, spill_dir: str, schema: pa.Schema):
        self._dataset = dataset
        self._spill_dir = spill_dir
        self._schema = schema

    def setup(self):
        paths.makedirs(self._spill_dir)

    def process(self, element):
        path, sha256 = element
        for key, ref in reload_shard_episodes(path, sha256, self._dataset, self._spill_dir, self._schema):
            yield key, ref
            beam.metrics.Metrics.counter(_NAMESPACE, "shard_episodes_reused").inc()


class _FinalizeShardsFn(beam.DoFn):
    """The pipeline's last step: one element; its side inputs are complete once every shard is written."""

    def __init__(self, finalizer: ShardsFinalizer):
        self._finalizer = finalizer

    def process(self, _unused, files, quarantine, counts):
        if not paths.isdir(self._finalizer.staging) and paths.isfile(paths.join(self._finalizer.output_dir, MANIFEST_FILE)):
            return  # a retry of a step that already published: staging was consumed by publish
        self._finalizer.finalize([json.loads(f) for f in files], [json.loads(q) for q in quarantine], dict(counts))
        yield paths.join(self._finalizer.output_dir, MANIFEST_FILE)


def _json_line(record) -> str:
    return json.dumps(record.to_json_dict(), sort_keys=True)


def _dataset_of(episode) -> tuple:
    return episode.dataset_name, 1


def build_shards_pipeline(pipeline: beam.Pipeline, inputs: Sequence[ResolvedDataset], config: EncoderConfig,
                          finalizer: ShardsFinalizer) -> None:
    """Sources -> EncodeEpisodes -> WriteShards into ``finalizer.staging`` -> ``FinalizeShards`` (checks,
    manifest, publish) with the file infos, quarantine records and read counts as side inputs; encoded
    episodes wait in ``staging/.work/episodes`` (removed before publishing). A dataset in
    ``finalizer.reused`` is read back from the previous output's shard files instead of its sources."""
    staging = finalizer.staging
    work = paths.join(staging, WORK_DIR)
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
        read = pipeline | f"Read[{item.name}]" >> ReadDataset(item, image_roles=roles)
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
