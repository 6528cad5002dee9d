"""`vlaprep run`: the three stages from one config, accounting, and reuse by fingerprint."""

import json
import os

import pytest
import yaml

from vlaprep.pipelines import cli
from vlaprep.pipelines.run_job import RunConfigError, load_run_config, run_pipeline_config, status
from vlaprep.pipelines.sources.calvin import list_calvin_windows
from vlaprep.pipelines.sources.rlds import rlds_shard_files
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
    latest = json.loads((workspace / "out" / "LATEST").read_text())
    assert latest["version"] == summary["version"] and latest["history"] == [summary["version"]]
    out = workspace / "out" / "versions" / latest["version"]
    assert os.path.realpath(workspace / "out" / "current") == os.path.realpath(out)
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
    # Second run: every stage's inputs are unchanged, so nothing is recomputed or republished.
    logs.clear()
    again = run_pipeline_config(config, log=logs.append)
    assert again == summary
    assert any("nothing to do" in line for line in logs)
    assert status(str(workspace / "run.yaml")).count("up to date") == 3


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
    before = json.loads((workspace / "out" / "LATEST").read_text())
    summary = run_pipeline_config(load_run_config(str(path)), log=lambda m: None)
    assert summary["stages"]["stats"]["reused"] == ["bridge_orig", "calvin"]
    assert summary["stages"]["shards"]["reused"] is False
    after = json.loads((workspace / "out" / "LATEST").read_text())
    assert after["version"] == summary["version"] != before["version"]
    assert after["history"] == [after["version"], before["version"]]
    # The previous version is kept intact (immutable) until retention removes it.
    assert (workspace / "out" / "versions" / before["version"] / "shards" / "manifest.json").exists()


def test_interrupted_run_keeps_previous_version_and_rerun_matches(workspace, tmp_path, monkeypatch):
    from vlaprep.pipelines.shards import job as shards_job

    raw = yaml.safe_load((workspace / "run.yaml").read_text())
    for key in ("tokenizer", "model"):
        raw[key] = str(workspace / raw[key])
    for d in raw["datasets"]:
        d["path"] = str(workspace / d["path"])
    raw["output"] = str(tmp_path / "out")
    raw.pop("model")
    raw["keep_versions"] = 1
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    first = run_pipeline_config(load_run_config(str(path)), log=lambda m: None)
    raw["shards"]["seed"] = 11
    path.write_text(yaml.safe_dump(raw))

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash in the middle of the shard stage")

    monkeypatch.setattr(shards_job, "run_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline_config(load_run_config(str(path)), log=lambda m: None)
    assert json.loads((tmp_path / "out" / "LATEST").read_text())["version"] == first["version"]
    monkeypatch.undo()
    resumed = run_pipeline_config(load_run_config(str(path)), log=lambda m: None)
    clean_dir = tmp_path / "clean"
    raw["output"] = str(clean_dir)
    path.write_text(yaml.safe_dump(raw))
    clean = run_pipeline_config(load_run_config(str(path)), log=lambda m: None)
    assert resumed["version"] == clean["version"]
    a = tmp_path / "out" / "versions" / resumed["version"] / "shards"
    b = clean_dir / "versions" / clean["version"] / "shards"
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    for rel in json.loads((a / "manifest.json").read_text())["files"]:
        assert (a / rel["path"]).read_bytes() == (b / rel["path"]).read_bytes()
    # keep_versions: 1 -> only the newest version remains.
    assert sorted(os.listdir(tmp_path / "out" / "versions")) == [resumed["version"]]


def test_bad_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output": "o", "tokenizer": "t", "datasets": [{"name": "nope", "path": "."}], "bogus": 1}))
    with pytest.raises(RunConfigError, match="unknown \\['bogus'\\]"):
        load_run_config(str(path))
    assert cli.main(["run", "--config", str(path)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_loader_follows_latest_pointer(workspace):
    from vlaprep.loader import ShardDataset

    latest = json.loads((workspace / "out" / "LATEST").read_text())
    manifest = json.loads((workspace / "out" / "versions" / latest["version"] / "shards" / "manifest.json").read_text())
    rows = list(ShardDataset(str(workspace / "out"), split="train", shuffle=False, decode_images=False))
    assert len(rows) == manifest["splits"]["train"]["rows"]


def test_loader_uint8_pixels_equal_float_pixels_times_255(workspace):
    import torch

    from vlaprep.loader import ShardDataset

    floats = list(ShardDataset(str(workspace / "out"), split="train", shuffle=False, history=2))
    raw = list(ShardDataset(str(workspace / "out"), split="train", shuffle=False, history=2, pixel_dtype="uint8"))
    assert len(floats) == len(raw) > 0
    for a, b in zip(floats, raw):
        assert b["pixel_values"].dtype == torch.uint8 and a["pixel_values"].dtype == torch.float32
        assert torch.equal(b["pixel_values"].to(torch.float32) / 255.0, a["pixel_values"])
        assert torch.equal(a["history_mask"], b["history_mask"])
    with pytest.raises(ValueError, match="pixel_dtype"):
        ShardDataset(str(workspace / "out"), pixel_dtype="float16")


@pytest.mark.timeout(600)
def test_changed_dataset_recomputes_only_that_dataset(workspace, tmp_path):
    """One dataset's source changes: statistics recompute it alone, shards read the other's rows back
    from the previous version; the new version equals a from-scratch run of the same inputs."""
    import shutil

    import numpy as np

    from vlaprep.pipelines.sources.calvin import calvin_frame_path

    shutil.copytree(workspace / "calvin", tmp_path / "calvin")
    raw = yaml.safe_load((workspace / "run.yaml").read_text())
    raw.pop("model")
    raw["tokenizer"] = str(workspace / "tok")
    raw["datasets"] = [{"name": "bridge_orig", "path": str(workspace / "rlds/bridge_orig/1.0.0")},
                       {"name": "calvin", "path": str(tmp_path / "calvin"), "weight": 0.5}]
    for name in ("out", "scratch"):
        raw["output"] = str(tmp_path / name)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    first = run_pipeline_config(load_run_config(str(tmp_path / "out.yaml")), log=lambda m: None)
    window = list_calvin_windows(str(tmp_path / "calvin"))[0]
    frame = calvin_frame_path(window.split_dir, window.start + 1)
    with np.load(frame) as z:
        arrays = dict(z)
    arrays["rel_actions"] = np.clip(arrays["rel_actions"] - 0.3, -1, 1)
    np.savez(frame, **arrays)
    logs = []
    second = run_pipeline_config(load_run_config(str(tmp_path / "out.yaml")), log=logs.append)
    assert second["version"] != first["version"]
    assert second["stages"]["stats"] == {"computed": ["calvin"], "reused": ["bridge_orig"], "quarantined": second["stages"]["stats"]["quarantined"]}
    assert [line.split(":")[0] for line in logs if "rows unchanged" in line] == ["[shards] bridge_orig"]
    scratch = run_pipeline_config(load_run_config(str(tmp_path / "scratch.yaml")), force=True, log=lambda m: None)
    new = tmp_path / "out" / "versions" / second["version"] / "shards"
    ref = tmp_path / "scratch" / "versions" / scratch["version"] / "shards"
    names = sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(new)) for p in new.rglob("*") if p.is_file())
    for name in names:
        assert (new / name).read_bytes() == (ref / name).read_bytes(), name
