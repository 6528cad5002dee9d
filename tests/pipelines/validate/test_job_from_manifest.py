"""`vlaprep validate` on real chunked mu-law shards, from the manifest alone (no --statistics)."""

import json

import pytest

from vlaprep.pipelines.shards.job import run_shards
from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.pipelines.validate.job import run_validate
from vlaprep.synthetic.model import build_tiny_llava
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.registry import get_spec

FAST = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


@pytest.mark.parametrize("chunk,normalization,encoding", [(2, "bounds_q99", "mu_law"), (3, "fixed:-0.65,0.65", "mu_law:100"), (1, "normal", "uniform")])
def test_round_trip_passes_for_every_combination(tmp_path_factory, chunk, normalization, encoding):
    root = tmp_path_factory.mktemp("vm")
    version_dir = generate_rlds(root / "rlds", episodes=10, seed=13, image_size=16, num_shards=2)
    build_llama_like_tokenizer(root / "tok")
    build_tiny_llava(root / "model", root / "tok", image_size=16)
    inputs = [DatasetInput("bridge_orig", str(version_dir), get_spec("bridge_orig"))]
    run_stats(inputs, str(root / "stats"), beam_args=FAST, log=lambda m: None)
    run_shards(inputs, str(root / "stats" / "dataset_statistics.json"), str(root / "tok"), str(root / "shards"),
               heldout_fraction=0.5, image_size=16, action_chunk=chunk, normalization=normalization,
               action_encoding=encoding, beam_args=FAST, log=lambda m: None)
    result = run_validate(str(root / "shards"), str(root / "model"), str(root / "val"), max_samples=4, batch_size=2,
                          beam_args=FAST, log=lambda m: None)
    report = json.loads((root / "val" / "validation_report.json").read_text())
    assert report["manifest"]["action_chunk"] == chunk
    assert report["manifest"]["action_encoding"].startswith(encoding.split(":")[0])
    overall = report["round_trip"]["overall"]
    assert overall["token_matches_encoding"] == 1.0  # every stored id == encode(normalize(raw action))
    assert overall["invalid_token_ids"] == 0
    if normalization != "normal":  # bounded modes: every in-range value comes back within half a bin
        assert overall["in_range_within_half_bin"] == 1.0
    assert report["model"]["overall"]["samples"] == 4
    assert result.report_path.endswith("validation_report.json")
