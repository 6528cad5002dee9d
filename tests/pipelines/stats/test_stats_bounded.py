"""Guard of the structural cause behind issue #19 (statistics memory growing with the episode count).

A local Beam runner keeps every element that crosses a stage boundary in the driver's memory. The
statistics pipeline must therefore never carry one element per episode (or per step): elements are
per source unit (an RLDS shard, a run of CALVIN windows), per dataset field, or the combiners'
accumulators. This test runs the real pipeline and reads Beam's own element counts of every
PCollection: none may have more elements than the dataset has source units (counted here from
``dataset_info.json``), although the dataset has many more episodes than units. No timing or memory
threshold is involved; ``benchmarks/memory_scaling_benchmark.py`` measures the memory itself.
"""

from __future__ import annotations

import json
import os

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
