"""Per-dataset weights reach the manifest (``vlaprep shards --weight``, ``vlaprep run`` datasets[].weight)
with OpenVLA's balanced sampling probability, and ``ShardDataset(mixture="manifest")`` samples with them.
Real runs on generated data; expectations recomputed here from the statistics file."""

from __future__ import annotations

import json

import pytest
import yaml

from vlaprep.loader import ShardDataset
from vlaprep.pipelines import cli
from vlaprep.pipelines.run_job import load_run_config, run_pipeline_config
from vlaprep.schemas import layout
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

IN_MEMORY = "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    a = generate_rlds(root / "a", name="bridge_orig", episodes=5, image_size=32, max_steps=6, seed=1)
    b = generate_rlds(root / "b", name="bridge_dataset", episodes=3, image_size=32, max_steps=9, seed=2)
    build_llama_like_tokenizer(root / "tok")
    assert cli.main(["stats", "--dataset", f"bridge_orig={a}", "--dataset", f"bridge_dataset={b}",
                     "--output", str(root / "stats"), IN_MEMORY]) == 0
    return root, a, b


def expected_mixture(statistics_path, weights):
    with open(statistics_path) as f:
        stats = json.load(f)
    total = sum(w * stats[n]["num_transitions"] for n, w in weights.items())
    return {n: {"weight": w, "num_transitions": stats[n]["num_transitions"],
                "sampling_probability": w * stats[n]["num_transitions"] / total} for n, w in weights.items()}


@pytest.mark.timeout(600)
def test_shards_weight_flag_is_recorded_and_sampled_with(inputs):
    root, a, b = inputs
    out = root / "shards"
    assert cli.main(["shards", "--dataset", f"bridge_orig={a}", "--dataset", f"bridge_dataset={b}", "--statistics",
                     str(root / "stats" / "dataset_statistics.json"), "--tokenizer", str(root / "tok"), "--output", str(out),
                     "--image-size", "32", "--heldout-fraction", "0.2", "--weight", "bridge_dataset=3", IN_MEMORY]) == 0
    manifest = layout.read_manifest(str(out))  # schema-checked
    expected = expected_mixture(out / "inputs" / "dataset_statistics.json", {"bridge_dataset": 3.0, "bridge_orig": 1.0})
    assert manifest.document["mixture"].keys() == expected.keys()
    for name, entry in expected.items():
        got = manifest.document["mixture"][name]
        assert got["weight"] == entry["weight"] and got["num_transitions"] == entry["num_transitions"]
        assert got["sampling_probability"] == pytest.approx(entry["sampling_probability"], rel=1e-15)
    ds = ShardDataset(str(out), mixture="manifest")
    assert dict(zip(ds.mixture.names, ds.mixture.probabilities)) == pytest.approx(
        {n: e["sampling_probability"] for n, e in expected.items()}, rel=1e-15)
    seen = {it["dataset_name"] for it in ds}
    assert seen == {"bridge_orig", "bridge_dataset"}
    assert cli.main(["shards", "--dataset", f"bridge_orig={a}", "--statistics", str(root / "stats" / "dataset_statistics.json"),
                     "--tokenizer", str(root / "tok"), "--output", str(root / "bad"), "--weight", "nope=2", IN_MEMORY]) == 2
    assert cli.main(["shards", "--dataset", f"bridge_orig={a}", "--statistics", str(root / "stats" / "dataset_statistics.json"),
                     "--tokenizer", str(root / "tok"), "--output", str(root / "bad"), "--weight", "bridge_orig=-1", IN_MEMORY]) == 2


@pytest.mark.timeout(600)
def test_run_config_weights_reach_the_manifest(inputs, tmp_path):
    root, a, b = inputs
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output": str(tmp_path / "out"), "tokenizer": str(root / "tok"),
        "datasets": [{"name": "bridge_orig", "path": str(a), "weight": 0.5}, {"name": "bridge_dataset", "path": str(b)}],
        "shards": {"image_size": 32, "heldout_fraction": 0.2}, "beam_args": [IN_MEMORY],
    }))
    run_pipeline_config(load_run_config(str(config)), log=lambda m: None)
    ds = ShardDataset(str(tmp_path / "out"), mixture="manifest")  # follows LATEST
    expected = expected_mixture(f"{ds.root}/inputs/dataset_statistics.json", {"bridge_dataset": 1.0, "bridge_orig": 0.5})
    assert ds.mixture.weights == (1.0, 0.5)  # sorted names: bridge_dataset, bridge_orig
    assert list(ds.mixture.probabilities) == pytest.approx([expected[n]["sampling_probability"] for n in ds.mixture.names], rel=1e-15)
