"""Guard of the structural cause behind issue #19 (statistics memory growing with the episode count).

A local Beam runner keeps every element that crosses a stage boundary in the driver's memory. The
statistics pipeline must therefore never carry one element per episode (or per step), nor an element
holding a unit's rows: elements are per source unit (an RLDS shard, a run of CALVIN windows), per
dataset field, or the combiners' accumulators. The tests run the real pipeline and read Beam's own
metrics of every PCollection: element counts (none may have more elements than the dataset has source
units, although it has many more episodes), and the size of each PCollection's largest element on the
same units with every episode twice (no element may grow by anything like the rows it summarizes). No
timing or memory threshold is involved; ``benchmarks/memory_scaling_benchmark.py`` measures the memory.

What the second test catches is what issue #19's profile found: the projection rows were a
PCollection, and since pass 2 waits for its plans, they crossed a stage boundary and every row of the
dataset passed through the driver.
"""

from __future__ import annotations

import json
import os
import shutil

import apache_beam as beam
from apache_beam.metrics import monitoring_infos
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from vlaprep.pipelines.sources import resolve_dataset
from vlaprep.pipelines.stats.beam import build_stats_pipeline
from vlaprep.pipelines.stats.job import StatsFinalizer
from vlaprep.synthetic.calvin import generate_calvin
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.transforms.registry import get_spec


def _element_counts(result) -> dict[str, int]:
    counts = {}
    for info in result.monitoring_infos():
        if info.urn == monitoring_infos.ELEMENT_COUNT_URN:
            name = info.labels.get(monitoring_infos.PCOLLECTION_LABEL)
            counts[name] = max(counts.get(name, 0), int(monitoring_infos.extract_counter_value(info)))
    return counts


def test_no_pcollection_of_the_statistics_pipeline_grows_with_the_episodes(tmp_path):
    rlds = generate_rlds(tmp_path / "rlds", name="bridge_orig", episodes=40, image_size=8, max_steps=6, num_shards=3)
    calvin = generate_calvin(tmp_path / "calvin", frames=300, image_static=8, image_gripper=8)
    with open(os.path.join(rlds, "dataset_info.json")) as f:
        info = json.load(f)
    rlds_units = sum(len(split.get("shardLengths", [])) for split in info["splits"])
    rlds_episodes = sum(int(n) for split in info["splits"] for n in split.get("shardLengths", []))
    calvin_windows = sum(
        len(__import__("numpy").load(os.path.join(calvin, s, "lang_annotations", "auto_lang_ann.npy"), allow_pickle=True)
            .item()["info"]["indx"])
        for s in ("training", "validation")
    )
    assert rlds_episodes >= 5 * rlds_units  # the premise: many episodes per unit
    inputs = [
        resolve_dataset("bridge_orig", str(rlds), get_spec("bridge_orig")),
        resolve_dataset("calvin", str(calvin), get_spec("calvin")),
    ]
    out = tmp_path / "stats"
    out.mkdir()
    finalizer = StatsFinalizer(str(out), ("bridge_orig", "calvin"), ("bridge_orig", "calvin"),
                               {"bridge_orig": "a", "calvin": "b"}, {})
    pipeline = beam.Pipeline(runner=FnApiRunner())
    units = build_stats_pipeline(pipeline, inputs, True, finalizer)
    result = pipeline.run()
    result.wait_until_finish()
    # Every episode was read and counted (the pipeline did its work) ...
    with open(out / "dataset_statistics.json") as f:
        statistics = json.load(f)
    with open(out / "dataset_statistics.cache.json") as f:
        cache = json.load(f)
    assert cache["bridge_orig"]["episodes_read"] + cache["bridge_orig"]["quarantined"] == rlds_episodes
    assert cache["calvin"]["episodes_read"] + cache["calvin"]["quarantined"] == calvin_windows
    assert statistics["calvin"]["num_trajectories"] > 0
    # ... and no PCollection carried more elements than source units x statistics fields (action, proprio).
    counts = _element_counts(result)
    assert counts, "expected Beam's element counts from the FnApiRunner"
    bound = 2 * (units["units_read"] + units["units_reused"])
    assert bound < rlds_episodes + calvin_windows
    assert max(counts.values()) <= bound, sorted(counts.items(), key=lambda kv: -kv[1])[:5]


def _largest_elements(result) -> dict[str, int]:
    """PCollection -> encoded size of its largest element. Beam samples sizes, but always the first 10
    elements of a bundle, so with at most 10 elements per PCollection the maximum is exact."""
    largest = {}
    for info in result.monitoring_infos():
        if info.urn == monitoring_infos.SAMPLED_BYTE_SIZE_URN:
            name = info.labels.get(monitoring_infos.PCOLLECTION_LABEL)
            count, _total, _smallest, biggest = monitoring_infos.extract_distribution(info)
            if count:
                largest[name] = max(largest.get(name, 0), int(biggest))
    return largest


def _with_every_episode_twice(version_dir, copy_dir) -> str:
    """A copy of an RLDS dataset whose every shard holds each of its records twice: the same source units
    and the same distinct values, twice the episodes and rows."""
    shutil.copytree(version_dir, copy_dir)
    for name in os.listdir(copy_dir):
        if ".tfrecord-" in name:
            path = os.path.join(copy_dir, name)
            with open(path, "rb") as f:
                records = f.read()
            with open(path, "wb") as f:
                f.write(records + records)
    info_path = os.path.join(copy_dir, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    for split in info["splits"]:
        split["shardLengths"] = [str(2 * int(n)) for n in split["shardLengths"]]
        split["numBytes"] = str(2 * int(split.get("numBytes", 0)))
    with open(info_path, "w") as f:
        json.dump(info, f)
    return str(copy_dir)


def _run_statistics(path: str, out) -> tuple[dict, dict, dict]:
    """One dataset through the real statistics pipeline -> (element counts, largest elements, its entry)."""
    out.mkdir()
    finalizer = StatsFinalizer(str(out), ("bridge_orig",), ("bridge_orig",), {"bridge_orig": "a"}, {})
    pipeline = beam.Pipeline(runner=FnApiRunner())
    build_stats_pipeline(pipeline, [resolve_dataset("bridge_orig", path, get_spec("bridge_orig"))], True, finalizer)
    result = pipeline.run()
    result.wait_until_finish()
    with open(out / "dataset_statistics.json") as f:
        return _element_counts(result), _largest_elements(result), json.load(f)["bridge_orig"]


def test_no_element_of_the_statistics_pipeline_grows_with_the_rows_of_a_unit(tmp_path):
    # 2 shards per split: 4 source units x 2 fields = 8 elements at most per PCollection (all sampled).
    once = generate_rlds(tmp_path / "rlds", name="bridge_orig", episodes=40, image_size=8, min_steps=20, max_steps=40,
                         num_shards=2, empty_language_fraction=0.0)
    twice = _with_every_episode_twice(once, tmp_path / "twice")
    counts_once, largest_once, entry_once = _run_statistics(str(once), tmp_path / "out_once")
    counts_twice, largest_twice, entry_twice = _run_statistics(twice, tmp_path / "out_twice")
    # The premise: the second run read every episode twice (the pipeline did its work) ...
    assert entry_twice["num_trajectories"] == 2 * entry_once["num_trajectories"] > 0
    assert entry_twice["num_transitions"] == 2 * entry_once["num_transitions"]
    assert max(counts_once.values()) <= 10, "more than 10 elements in a PCollection: their sizes would be sampled"
    # ... in the same elements: per unit and field, never per episode ...
    assert counts_twice == counts_once
    # ... none of which grew by the rows it summarizes (a unit's action rows: steps x 7 float32; the
    # summaries and accumulators hold counters, which grow by a few bytes at most).
    unit_rows_bytes = entry_once["num_transitions"] * 7 * 4 // 4  # 4 source units
    grown = {name: largest_twice.get(name, 0) - size for name, size in largest_once.items()}
    assert max(grown.values()) < unit_rows_bytes // 4, sorted(grown.items(), key=lambda kv: -kv[1])[:5]
