"""SIGKILL in the middle of `vlaprep shards` and `vlaprep stats`: the output directory holds the previous
complete version or nothing new (never a manifest pointing at partial files), and the rerun produces
byte-identical results to an uninterrupted run."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

VLAPREP = os.path.join(os.path.dirname(sys.executable), "vlaprep")
FAST = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


def _tree(root):
    out = {}
    for base, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(base, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _published(root):
    """Files a reader may trust: the manifest and what it lists (plus the manifest's own side files)."""
    manifest_path = os.path.join(root, "manifest.json")
    if not os.path.exists(manifest_path):
        return None
    manifest = json.load(open(manifest_path))
    for entry in manifest["files"]:
        path = os.path.join(root, entry["path"])
        assert os.path.getsize(path) == entry["bytes"], entry["path"]
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == entry["sha256"], entry["path"]
    return manifest


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    version_dir = generate_rlds(root / "rlds", episodes=40, seed=3, image_size=64, num_shards=4)
    build_llama_like_tokenizer(root / "tok")
    subprocess.run([VLAPREP, "stats", "--dataset", f"bridge_orig={version_dir}", "--output", str(root / "stats"), *FAST],
                   check=True, capture_output=True)
    return root, version_dir


def _shards_cmd(root, version_dir, out, seed):
    return [VLAPREP, "shards", "--dataset", f"bridge_orig={version_dir}", "--statistics", str(root / "stats" / "dataset_statistics.json"),
            "--tokenizer", str(root / "tok"), "--output", str(out), "--image-size", "64", "--seed", str(seed),
            "--target-shard-mb", "1", *FAST]


def _kill_midway(cmd, out, marker_glob_dir):
    """Start cmd, SIGKILL it once it has started writing (staging exists) or after a bounded wait."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(out) and any(n.startswith(".staging-") for n in os.listdir(out)):
            time.sleep(1.0)  # let it write some shard files
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode


@pytest.mark.timeout(600)
def test_sigkill_during_shards_keeps_old_version_and_rerun_is_identical(workspace, tmp_path):
    root, version_dir = workspace
    out = tmp_path / "out"
    subprocess.run(_shards_cmd(root, version_dir, out, seed=0), check=True, capture_output=True)
    old = _published(out)
    old_tree = {k: v for k, v in _tree(out).items()}
    # Kill a regeneration with different options in the middle.
    _kill_midway(_shards_cmd(root, version_dir, out, seed=1), out, out)
    manifest = _published(out)
    assert manifest == old, "the previous complete output must still be what the manifest describes"
    assert {k: v for k, v in _tree(out).items() if not k.startswith(".staging-")} == old_tree
    # Rerun to completion: identical to an uninterrupted run into a fresh directory.
    assert any(n.startswith(".staging-") for n in os.listdir(out)), "expected the killed run's staging to be left"
    subprocess.run(_shards_cmd(root, version_dir, out, seed=1), check=True, capture_output=True)
    assert not [n for n in os.listdir(out) if n.startswith(".")], "the rerun reclaims the killed run's staging"
    clean = tmp_path / "clean"
    subprocess.run(_shards_cmd(root, version_dir, clean, seed=1), check=True, capture_output=True)
    published = _published(out)
    assert published == _published(clean)
    for entry in published["files"]:
        assert (out / entry["path"]).read_bytes() == (clean / entry["path"]).read_bytes()


@pytest.mark.timeout(600)
def test_sigkill_during_first_shards_run_leaves_no_manifest(workspace, tmp_path):
    root, version_dir = workspace
    out = tmp_path / "fresh"
    _kill_midway(_shards_cmd(root, version_dir, out, seed=0), out, out)
    assert _published(out) is None  # nothing new is trusted: no manifest


@pytest.mark.timeout(600)
def test_sigkill_during_stats_then_rerun_is_identical(workspace, tmp_path):
    root, version_dir = workspace
    out = tmp_path / "stats"
    cmd = [VLAPREP, "stats", "--dataset", f"bridge_orig={version_dir}", "--output", str(out), *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    projections = out / "stats_cache" / "bridge_orig"
    while time.time() < deadline and proc.poll() is None:
        # The first unit projection is written mid-pipeline, before the statistics' final step.
        if projections.is_dir() and any(n.endswith(".npz") for n in os.listdir(projections)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "expected to catch the stats run mid-pipeline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    expected = (root / "stats" / "dataset_statistics.json").read_bytes()
    stats = out / "dataset_statistics.json"
    assert not stats.exists() or stats.read_bytes() == expected  # never a partial file
    rerun = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert stats.read_bytes() == expected
    reused = re.search(r"reused (\d+) cached unit projections", rerun.stderr)
    assert reused and int(reused.group(1)) >= 1  # projections written before the kill are not read again
