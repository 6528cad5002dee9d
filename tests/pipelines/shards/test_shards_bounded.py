"""Guard of the structural cause behind issue #19 for the shard stage (driver memory growing with the
episode count).

A local Beam runner keeps every element that crosses a stage boundary in the driver's memory. In
``WriteShards`` every step after the first crosses one (the plan waits for every episode's size, the
writers for the plan), so per-episode elements there -- one (key, size) for the plan and one (key,
EpisodeRef) for the shuffle per episode -- made the driver grow by a few KB per episode. Now the episode
references are packed by the thousand where they are produced. This test runs ``WriteShards`` on many
more episodes than it writes files and reads Beam's own element counts: no PCollection inside it may
hold more elements than there are files. No timing or memory threshold is involved;
``benchmarks/memory_scaling_benchmark.py --shards`` measures the memory.
"""

from __future__ import annotations

import os

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import monitoring_infos
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from vlaprep.pipelines.shards.beam import WriteShards
from vlaprep.pipelines.shards.options import ShardOptions
from vlaprep.pipelines.shards.rows import EpisodeEncoder
from vlaprep.pipelines.sources import resolve_dataset
from vlaprep.schemas.episode import Episode
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.registry import get_spec

NAME = "bridge_orig"


def _encoded_episodes(tmp_path, episodes: int, spill: str) -> tuple[list, ShardOptions]:
    """``episodes`` generated Bridge episodes (8 px) encoded into ``spill`` -> [(EpisodeKey, EpisodeRef)]."""
    rlds = generate_rlds(tmp_path / "rlds", episodes=episodes, seed=5, image_size=8, min_steps=3, max_steps=6,
                         val_fraction=0.0, empty_language_fraction=0.0)
    spec = get_spec(NAME)
    dataset = resolve_dataset(NAME, str(rlds), spec)
    read = [e for u in dataset.units for e in dataset.iter_episodes(u, ("primary",)) if isinstance(e, Episode)]
    actions = np.concatenate([spec.transform(e.steps).action for e in read]).astype(np.float64)
    block = {"q01": actions.min(0).tolist(), "q99": actions.max(0).tolist(), "min": actions.min(0).tolist(),
             "max": actions.max(0).tolist(), "mean": actions.mean(0).tolist(), "std": actions.std(0).tolist(),
             "mask": list(spec.normalization_mask)}
    options = ShardOptions(image_size=8, cameras=("primary",), heldout_fraction=0.2, seed=1, action_chunk=1,
                           normalization="bounds_q99", action_encoding="uniform", target_shard_bytes=1 << 20, action_dim=7,
                           vocab_size=32000, eos_id=2, model_max_length=2048, tokenization="text_round_trip")
    tokenizer = build_llama_like_tokenizer(tmp_path / "tokenizer")
    encoder = EpisodeEncoder(options, {NAME: spec}, {NAME: block}, tokenizer)
    return [encoder.encode(episode, spill) for episode in read], options


def test_no_pcollection_of_write_shards_holds_one_element_per_episode(tmp_path):
    spill, root = str(tmp_path / "spill"), str(tmp_path / "out")
    os.makedirs(spill)
    encoded, options = _encoded_episodes(tmp_path, 60, spill)
    target_bytes = sum(ref.nbytes for _, ref in encoded) // 4  # about 4 train files and 1 heldout file
    pipeline = beam.Pipeline(runner=FnApiRunner())
    _ = pipeline | beam.Create(encoded) | "WriteShards" >> WriteShards(root, spill, options.schema(), target_bytes)
    result = pipeline.run()
    result.wait_until_finish()
    written = {split: sorted(os.listdir(os.path.join(root, split))) for split in sorted(os.listdir(root))}
    files = [os.path.join(root, split, name) for split, names in written.items() for name in names]
    # Every episode's rows were written (the step did its work), into far fewer files than episodes ...
    assert sum(pq.read_metadata(f).num_rows for f in files) == sum(ref.rows for _, ref in encoded)
    assert sorted(written) == ["heldout", "train"]
    assert 3 <= len(files) <= len(encoded) // 10
    # ... and inside WriteShards no PCollection held more elements than there are files.
    producers = {
        pcollection: transform.unique_name
        for transform in pipeline.to_runner_api().components.transforms.values() if not transform.subtransforms
        for pcollection in transform.outputs.values()
    }
    counts = {}
    for info in result.monitoring_infos():
        if info.urn == monitoring_infos.ELEMENT_COUNT_URN:
            name = producers.get(info.labels.get(monitoring_infos.PCOLLECTION_LABEL), "")
            if name.startswith("WriteShards/"):
                counts[name] = max(counts.get(name, 0), int(monitoring_infos.extract_counter_value(info)))
    assert "WriteShards/WriteShard" in counts, sorted(counts)
    assert max(counts.values()) <= len(files), sorted(counts.items(), key=lambda kv: -kv[1])[:5]
