"""`vlaprep run`: the three stages from one config, accounting, and reuse by fingerprint."""

import json
import os

import pytest
import yaml

from vlaprep.pipelines import cli
from vlaprep.pipelines.run_job import RunConfigError, load_run_config, run_pipeline_config, status
from vlaprep.pipelines.sources import list_calvin_windows, rlds_shard_files
from vlaprep.synthetic.calvin import generate_calvin
from vlaprep.synthetic.model import build_tiny_llava
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

FAST = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    generate_rlds(root / "rlds", episodes=10, seed=1, image_size=32, num_shards=2, nan_episodes=1, short_episodes=(1,))
    generate_calvin(root / "calvin", frames=300, seed=1, image_static=16, image_gripper=8)
    build_llama_like_tokenizer(root / "tok")
    build_tiny_llava(root / "model", root / "tok", image_size=16)
    config = {
        "output": "out",
        "tokenizer": "tok",
        "model": "model",
        "datasets": [{"name": "bridge_orig", "path": "rlds/bridge_orig/1.0.0"}, {"name": "calvin", "path": "calvin", "weight": 0.5}],
        "shards": {"image_size": 16, "heldout_fraction": 0.3, "target_shard_mb": 1},
        "validate": {"max_samples": 8, "batch_size": 4},
        "beam_args": FAST,
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_run_all_stages_then_reuse(workspace):
    config = load_run_config(str(workspace / "run.yaml"))
    logs = []
    summary = run_pipeline_config(config, log=logs.append)
    out = workspace / "out"
    for path in ("stats/dataset_statistics.json", "shards/manifest.json", "validation/validation_report.json", "run_summary.json"):
        assert (out / path).exists(), path
    rlds_records = sum(n for _, _, n in rlds_shard_files(str(workspace / "rlds/bridge_orig/1.0.0")))
    calvin_windows = len(list_calvin_windows(str(workspace / "calvin")))
    acc = summary["accounting"]
    assert acc["bridge_orig"]["read"] == rlds_records == 11
    assert acc["calvin"]["read"] == calvin_windows
    for name in ("bridge_orig", "calvin"):
        a = acc[name]
        assert a["read"] == a["train"] + a["heldout"] + a["quarantined"]
    assert acc["bridge_orig"]["quarantined"] >= 2  # the NaN and the 1-step episode at least
    report = json.loads((out / "validation/validation_report.json").read_text())
    assert report is not None
    # Second run: every stage's inputs are unchanged, so nothing is recomputed.
    logs.clear()
    again = run_pipeline_config(config, log=logs.append)
    assert again["stages"]["stats"]["reused"] == ["bridge_orig", "calvin"]
    assert again["stages"]["shards"] == {"reused": True}
    assert any("validation: inputs unchanged" in line for line in logs)
    assert "up to date" in status(str(workspace / "run.yaml"))


def test_changed_option_recomputes_only_downstream(workspace, tmp_path):
    raw = yaml.safe_load((workspace / "run.yaml").read_text())
    raw["shards"]["seed"] = 7
    for key in ("tokenizer", "model"):
        raw[key] = str(workspace / raw[key])
    for d in raw["datasets"]:
        d["path"] = str(workspace / d["path"])
    raw["output"] = str(workspace / "out")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert "shards    " in status(str(path)) and "would be recomputed" in status(str(path))
    summary = run_pipeline_config(load_run_config(str(path)), log=lambda m: None)
    assert summary["stages"]["stats"]["reused"] == ["bridge_orig", "calvin"]
    assert summary["stages"]["shards"]["reused"] is False


def test_bad_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output": "o", "tokenizer": "t", "datasets": [{"name": "nope", "path": "."}], "bogus": 1}))
    with pytest.raises(RunConfigError, match="unknown \\['bogus'\\]"):
        load_run_config(str(path))
    assert cli.main(["run", "--config", str(path)]) == 2
    assert "bogus" in capsys.readouterr().err
