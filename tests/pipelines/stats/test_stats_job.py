"""End-to-end `vlaprep stats` against an independent reference read straight through tfds."""

import json
import os
import shutil
from fractions import Fraction

import numpy as np
import pytest

from vlaprep.pipelines import cli
from vlaprep.pipelines.sources.calvin import list_calvin_windows, load_calvin_window
from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.synthetic.calvin import generate_calvin
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.transforms.registry import get_spec

IN_PROCESS = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]
MULTI_PROCESS = [
    "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=2",
]
PORTABLE = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]


def reference_quantile(column, q):
    s = np.sort(np.asarray(column, np.float32))
    h = (len(s) - 1) * q
    lo = int(np.floor(h))
    hi = min(lo + 1, len(s) - 1)
    g = h - lo
    d = np.float64(np.float32(s[hi] - s[lo]))
    return float(np.float64(s[hi]) - d * (1 - g)) if g >= 0.5 else float(np.float64(s[lo]) + d * g)


def reference_entry(actions: np.ndarray, num_trajectories: int, mask) -> dict:
    """Independent: plain NumPy + rationals over all actions gathered in memory (what the reference does)."""
    block = {"mean": [], "std": [], "max": [], "min": [], "q01": [], "q99": []}
    for j in range(actions.shape[1]):
        col = actions[:, j]
        values = [Fraction(float(v)) for v in col]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        block["mean"].append(float(mean))
        block["std"].append(float(var) ** 0.5)
        block["max"].append(float(col.max()))
        block["min"].append(float(col.min()))
        block["q01"].append(reference_quantile(col, 0.01))
        block["q99"].append(reference_quantile(col, 0.99))
    block["mask"] = list(mask)
    return {"action": block, "num_transitions": len(actions), "num_trajectories": num_trajectories}


def _stats(tmp_path, version_dir, beam_args, **kw):
    spec = get_spec("bridge_orig")
    return run_stats([DatasetInput("bridge_orig", str(version_dir), spec)], str(tmp_path), beam_args=beam_args, log=lambda m: None, **kw)


def test_bridge_statistics_match_independent_reference(tmp_path, bridge, bridge_reference):
    result = _stats(tmp_path, bridge, IN_PROCESS)
    got = result.statistics["bridge_orig"]
    actions, n_traj, skipped = bridge_reference
    ref = reference_entry(actions, n_traj, [True] * 6 + [False])
    assert skipped == 2  # the NaN episode and the 1-step episode (the 2-step one is an empty, counted trajectory)
    assert got["num_trajectories"] == ref["num_trajectories"]
    assert got["num_transitions"] == ref["num_transitions"]
    for key in ("max", "min", "q01", "q99", "mask", "mean"):
        assert got["action"][key] == ref["action"][key], key
    assert got["action"]["std"] == pytest.approx(ref["action"]["std"], rel=1e-12)
    assert got["proprio"]["mean"] == [0.0] * 7
    assert list(got["action"]) == ["mean", "std", "max", "min", "q01", "q99", "mask"]
    assert list(got) == ["action", "proprio", "num_transitions", "num_trajectories"]
    reasons = sorted(r["reason"].split(":")[0] + "@" + r["stage"] for r in result.quarantine)
    assert len(result.quarantine) == 2, result.quarantine
    assert any("finite" in r["reason"] for r in result.quarantine)
    assert sum("at least 3 steps" in r["reason"] for r in result.quarantine) == 1
    from PIL import Image

    png = Image.open(tmp_path / "bridge_orig_histograms.png")
    assert png.format == "PNG" and png.size[0] >= 4 * 300
    on_disk = [json.loads(l) for l in open(tmp_path / "quarantine.jsonl")]
    assert on_disk == result.quarantine
    assert reasons


def test_byte_identical_across_runners_and_workers(tmp_path, bridge):
    outputs = []
    for i, args in enumerate((IN_PROCESS, MULTI_PROCESS, PORTABLE)):
        out = tmp_path / f"run{i}"
        _stats(out, bridge, args)
        outputs.append((out / "dataset_statistics.json").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_cache_hit_change_and_force(tmp_path, bridge):
    data = tmp_path / "data"
    shutil.copytree(bridge, data)
    first = _stats(tmp_path / "out", data, IN_PROCESS)
    assert first.computed == ["bridge_orig"]
    again = _stats(tmp_path / "out", data, IN_PROCESS)
    assert again.reused == ["bridge_orig"] and again.computed == []
    assert again.statistics == first.statistics
    forced = _stats(tmp_path / "out", data, IN_PROCESS, force=True)
    assert forced.computed == ["bridge_orig"] and forced.statistics == first.statistics
    # Drop one shard from the dataset's metadata-described files: a changed input must be recomputed.
    shard = sorted(p for p in os.listdir(data) if "train.tfrecord" in p)[0]
    os.utime(data / shard, ns=(1, 1))  # same bytes, new stat: re-hashed, fingerprint unchanged
    assert _stats(tmp_path / "out", data, IN_PROCESS).reused == ["bridge_orig"]
    with open(data / "features.json", "a") as f:
        f.write(" ")  # content change
    assert _stats(tmp_path / "out", data, IN_PROCESS).computed == ["bridge_orig"]


def test_calvin_statistics_with_proprio(tmp_path):
    root = generate_calvin(tmp_path / "calvin", frames=400, seed=1, image_static=16, image_gripper=8)
    spec = get_spec("calvin")
    result = run_stats([DatasetInput("calvin", str(root), spec)], str(tmp_path / "out"), with_proprio=True,
                       beam_args=IN_PROCESS, log=lambda m: None)
    got = result.statistics["calvin"]
    windows = list_calvin_windows(str(root))
    actions, proprio = [], []
    for w in windows:
        ep = load_calvin_window(w, spec)
        rel = ep.steps["rel_actions"]
        actions.append(np.concatenate([rel[:, :6], (rel[:, 6:] + 1) / 2], axis=1).astype(np.float32))
        proprio.append(ep.steps["robot_obs"].astype(np.float32))
    actions, proprio = np.concatenate(actions), np.concatenate(proprio)
    ref = reference_entry(actions, len(windows), [True] * 6 + [False])
    for key in ("max", "min", "q01", "q99", "mean"):
        assert got["action"][key] == ref["action"][key], key
    assert got["num_trajectories"] == len(windows)
    assert got["num_transitions"] == sum(w.end - w.start for w in windows)
    assert len(got["proprio"]["q99"]) == 15
    assert got["proprio"]["q99"] == [reference_quantile(proprio[:, j], 0.99) for j in range(15)]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["stats", "--dataset", f"bridge_orig={tmp_path}/missing", "--output", str(tmp_path / "o")]) == 2
    assert "expected an existing path" in capsys.readouterr().err
    assert cli.main(["stats", "--dataset", f"nope={tmp_path}", "--output", str(tmp_path / "o")]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert cli.main(["stats", "--dataset", f"bridge_orig={tmp_path}", "--output", str(tmp_path / "o")]) == 2
    assert "expected a TFDS dataset" in capsys.readouterr().err


def _add_train_shard(version_dir, donor_version_dir):
    """Append the donor's first train shard to the dataset as a new shard, renaming files the TFDS way."""
    info_path = version_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    donor = json.loads((donor_version_dir / "dataset_info.json").read_text())
    split = next(s for s in info["splits"] if s["name"] == "train")
    donor_split = next(s for s in donor["splits"] if s["name"] == "train")
    old_n = len(split["shardLengths"])
    new_n = old_n + 1
    for i in range(old_n):
        os.rename(version_dir / f"bridge_orig-train.tfrecord-{i:05d}-of-{old_n:05d}",
                  version_dir / f"bridge_orig-train.tfrecord-{i:05d}-of-{new_n:05d}")
    shutil.copy(donor_version_dir / f"bridge_orig-train.tfrecord-00000-of-{len(donor_split['shardLengths']):05d}",
                version_dir / f"bridge_orig-train.tfrecord-{old_n:05d}-of-{new_n:05d}")
    split["shardLengths"] = split["shardLengths"] + [donor_split["shardLengths"][0]]
    split["numBytes"] = str(int(split.get("numBytes", 0)) + 1)
    info_path.write_text(json.dumps(info))


def test_adding_a_shard_reads_only_the_new_shard(tmp_path, bridge):
    data = tmp_path / "data"
    shutil.copytree(bridge, data)
    donor = generate_rlds(tmp_path / "donor", name="bridge_orig", episodes=8, seed=77, image_size=32, num_shards=2)
    first = _stats(tmp_path / "out", data, IN_PROCESS)
    total_units = len(os.listdir(data)) - 2  # shard files minus dataset_info.json and features.json
    assert first.units == {"units_read": total_units, "units_reused": 0}
    _add_train_shard(data, donor)
    second = _stats(tmp_path / "out", data, IN_PROCESS)
    assert second.computed == ["bridge_orig"]
    assert second.units == {"units_read": 1, "units_reused": total_units}
    scratch = _stats(tmp_path / "scratch", data, IN_PROCESS)
    assert scratch.units["units_reused"] == 0
    assert (tmp_path / "out/dataset_statistics.json").read_bytes() == (tmp_path / "scratch/dataset_statistics.json").read_bytes()
    assert (tmp_path / "out/quarantine.jsonl").read_bytes() == (tmp_path / "scratch/quarantine.jsonl").read_bytes()
    assert second.statistics["bridge_orig"]["num_trajectories"] > first.statistics["bridge_orig"]["num_trajectories"]
    forced = _stats(tmp_path / "out", data, IN_PROCESS, force=True)
    assert forced.units == {"units_read": total_units + 1, "units_reused": 0}
