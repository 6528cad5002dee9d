"""Fault injection on the read and statistics path: each case asserts the exact outcome.

Either the command fails at once with one clear line naming the problem, or it completes with the bad
episodes quarantined, counted and explained, and read + quarantined still equals what the source holds.
"""

import json
import os
import shutil

import numpy as np
import pytest

from vlaprep.pipelines import cli
from vlaprep.pipelines.sources.calvin import list_calvin_windows
from vlaprep.pipelines.sources.rlds import rlds_shard_files
from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.synthetic.calvin import generate_calvin
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.transforms.registry import get_spec, load_registry_yaml

FAST = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


@pytest.fixture(scope="module")
def rlds(tmp_path_factory):
    return generate_rlds(tmp_path_factory.mktemp("faults"), episodes=16, seed=21, image_size=16, num_shards=2,
                         nan_episodes=2, short_episodes=(0, 1, 2))


def _run(tmp_path, version_dir, name="bridge_orig", spec=None, **kw):
    spec = spec or get_spec(name)
    return run_stats([DatasetInput(name, str(version_dir), spec)], str(tmp_path), beam_args=FAST, log=lambda m: None, **kw)


def _one_error_line(err: str) -> bool:
    """Progress lines may precede it; the failure itself is exactly one `vlaprep <cmd>: error:` line."""
    errors = [line for line in err.splitlines() if ": error:" in line]
    return len(errors) == 1 and "Traceback" not in err


def _total_records(version_dir):
    return sum(n for _, _, n in rlds_shard_files(str(version_dir)))


def test_nan_and_short_episodes_quarantined_with_reasons(tmp_path, rlds):
    result = _run(tmp_path, rlds)
    reasons = [q["reason"] for q in result.quarantine]
    assert sum("expected finite values" in r for r in reasons) == 2
    # 0 and 1 steps; a 2-step episode standardizes to an empty trajectory, which OpenVLA counts (no transitions)
    assert sum("expected at least 3 steps, got" in r for r in reasons) == 2
    entry = result.statistics["bridge_orig"]
    assert entry["num_trajectories"] + len(result.quarantine) == _total_records(rlds) == 16 + 3
    assert result.episodes_read["bridge_orig"] == _total_records(rlds)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_shard_completes_and_accounts_for_every_record(tmp_path, rlds, damage):
    data = tmp_path / "data"
    shutil.copytree(rlds, data)
    shard = sorted(p for p in os.listdir(data) if "train.tfrecord" in p)[0]
    raw = bytearray((data / shard).read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 3] ^= 0x5A
    (data / shard).write_bytes(bytes(raw))
    result = _run(tmp_path / "out", data)
    unreadable = [q for q in result.quarantine if q["stage"] == "read"]
    assert unreadable and all(shard in q["reason"] for q in unreadable)
    entry = result.statistics["bridge_orig"]
    assert entry["num_trajectories"] + len(result.quarantine) == _total_records(data)
    lines = (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()
    assert len(lines) == len(result.quarantine)


def test_wrong_action_width_quarantines_every_episode_then_fails_one_line(tmp_path, rlds, capsys):
    registry = tmp_path / "reg.yaml"
    registry.write_text(
        "datasets:\n  narrow:\n    format: rlds\n    action_keys: [action]\n    action_dim: 6\n    gripper: none\n"
        "    primary_image: observation/image_0\n    language_key: language_instruction\n"
    )
    code = cli.main(["stats", "--registry", str(registry), "--dataset", f"narrow={rlds}", "--output", str(tmp_path / "o"),
                     *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "no valid episode" in err and "narrow" in err and _one_error_line(err)
    quarantine = [json.loads(l) for l in (tmp_path / "o" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == _total_records(rlds)
    assert any("expected 6" in q["reason"] or "width" in q["reason"] for q in quarantine)


def test_missing_key_in_dataset_fails_at_once(tmp_path, rlds, capsys):
    registry = tmp_path / "reg.yaml"
    registry.write_text(
        "datasets:\n  wrongkey:\n    format: rlds\n    action_keys: [action/world_vector]\n    action_dim: 3\n    gripper: none\n"
        "    primary_image: observation/image_0\n    language_key: language_instruction\n"
    )
    code = cli.main(["stats", "--registry", str(registry), "--dataset", f"wrongkey={rlds}", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "action/world_vector" in err and _one_error_line(err)


def test_missing_language_key_still_counts_in_statistics(tmp_path, rlds):
    registry = tmp_path / "reg.yaml"
    registry.write_text(
        "datasets:\n  nolang:\n    format: rlds\n    action_keys: [action]\n    action_dim: 7\n    gripper: binarize\n"
        "    primary_image: observation/image_0\n    language_key: observation/instruction_that_does_not_exist\n"
    )
    spec = load_registry_yaml(str(registry))["nolang"]
    result = _run(tmp_path / "o", rlds, name="nolang", spec=spec)
    # statistics include unlabeled trajectories, as OpenVLA's do
    assert result.statistics["nolang"]["num_trajectories"] + len(result.quarantine) == _total_records(rlds)


@pytest.mark.parametrize("bad", ["../escape", "a/b", "x\\y", ".."])
def test_dataset_names_with_path_parts_are_refused(tmp_path, rlds, bad, capsys):
    registry = tmp_path / "reg.yaml"
    registry.write_text(
        f"datasets:\n  '{bad}':\n    format: rlds\n    action_keys: [action]\n    action_dim: 7\n    gripper: none\n"
        "    primary_image: observation/image_0\n    language_key: language_instruction\n"
    )
    code = cli.main(["stats", "--registry", str(registry), "--dataset", f"{bad}={rlds}", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and _one_error_line(err)
    assert not (tmp_path / "o").exists() or not any(".." in p for p in os.listdir(tmp_path / "o"))


def test_calvin_duplicate_window_is_quarantined_not_double_counted(tmp_path):
    root = generate_calvin(tmp_path / "c", frames=300, seed=4, image_static=8, image_gripper=8)
    from vlaprep.pipelines import safe_pickle

    path = root / "training" / "lang_annotations" / "auto_lang_ann.npy"
    ann = safe_pickle.load_pickled_npy(str(path))
    ann["language"]["ann"].append(ann["language"]["ann"][0] + " again")
    ann["info"]["indx"].append(ann["info"]["indx"][0])
    np.save(path, np.array(ann, dtype=object), allow_pickle=True)
    windows = list_calvin_windows(str(root))
    result = run_stats([DatasetInput("calvin", str(root), get_spec("calvin"))], str(tmp_path / "o"), beam_args=FAST, log=lambda m: None)
    dup = [q for q in result.quarantine if "duplicate episode id" in q["reason"]]
    assert len(dup) == 1
    assert result.statistics["calvin"]["num_trajectories"] == len(windows) - 1
