"""`vlaprep run` publishing: nothing lost, nothing deleted that is not ours.

Versions are built in ``versions/.building-*`` and renamed into place (bytes equal to a fresh run, no
staging path recorded), a version published first by an overlapping run is kept untouched, retention
deletes only marked versions of the history, and a second run on a locked output fails at once."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from vlaprep.pipelines import cli, run_job
from vlaprep.pipelines.shards import job as shards_job
from vlaprep.pipelines.run_job import load_run_config, run_pipeline_config
from vlaprep.synthetic.model import build_tiny_llava
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

FAST = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]
TIMING = ("seconds", "wall_seconds", "generate_seconds", "samples_per_second")  # wall-clock values, not outputs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    generate_rlds(root / "rlds", episodes=6, seed=9, image_size=32, num_shards=1)
    build_llama_like_tokenizer(root / "tok")
    build_tiny_llava(root / "model", root / "tok", image_size=16)
    return root


def write_config(workspace, path, output, model=True, **changes) -> str:
    doc = {
        "output": str(output),
        "tokenizer": str(workspace / "tok"),
        "datasets": [{"name": "bridge_orig", "path": str(workspace / "rlds" / "bridge_orig" / "1.0.0")}],
        "shards": {"image_size": 16, "heldout_fraction": 0.3, "target_shard_mb": 1},
        "validate": {"max_samples": 4, "batch_size": 4},
        "beam_args": FAST,
        **changes,
    }
    if model:
        doc["model"] = str(workspace / "model")
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def tree(root) -> dict:
    """{relative path: (inode, mtime_ns, bytes)} of every file under ``root``."""
    out = {}
    for directory, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(directory, name)
            st = os.stat(full)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = (st.st_ino, st.st_mtime_ns, f.read())
    return out


def without_timing(document):
    if isinstance(document, dict):
        return {k: without_timing(v) for k, v in document.items() if k not in TIMING}
    if isinstance(document, list):
        return [without_timing(v) for v in document]
    return document


@pytest.fixture(scope="module")
def published(workspace):
    """The same config run twice into the same path: once (moved aside to ``first``), then fresh."""
    out, first = workspace / "out", workspace / "first"
    config = write_config(workspace, workspace / "run.yaml", out)
    a = run_pipeline_config(load_run_config(config), log=lambda m: None)
    os.rename(out, first)
    b = run_pipeline_config(load_run_config(config), log=lambda m: None)
    return config, out, first, a, b


def test_published_version_equals_a_fresh_run_byte_for_byte(published):
    _config, out, first, a, b = published
    assert a["version"] == b["version"]
    version = a["version"]
    new, ref = tree(out / "versions" / version), tree(first / "versions" / version)
    assert sorted(new) == sorted(ref)
    assert {"run_summary.json", ".vlaprep-version.json", "shards/manifest.json", "stats/dataset_statistics.json",
            "validation/validation_report.json", "validation/predictions.jsonl"} <= set(new)
    for name in new:
        assert b".building-" not in new[name][2], f"{name} records the staging directory"
        if name in ("run_summary.json", "validation/validation_report.json"):
            assert without_timing(json.loads(new[name][2])) == without_timing(json.loads(ref[name][2])), name
        else:
            assert new[name][2] == ref[name][2], name
    report = json.loads(new["validation/validation_report.json"][2])
    assert report["shards"] == str(out / "versions" / version / "shards")
    assert report["manifest"]["statistics"] == str(out / "versions" / version / "shards" / "inputs" / "dataset_statistics.json")
    assert json.loads(new[".vlaprep-version.json"][2]) == {"format": "vlaprep.version", "version": version}
    # The layout contract: LATEST, current -> versions/<v>, nothing else left in versions/.
    assert json.loads((out / "LATEST").read_text())["version"] == version
    assert os.readlink(out / "current") == os.path.join("versions", version)
    assert os.listdir(out / "versions") == [version]
    assert oct(os.stat(out / "versions" / version).st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_version_published_first_by_an_overlapping_run_is_kept(published, workspace, tmp_path, monkeypatch):
    """An identical run (object stores: not serialized by a lock) publishes the version while this one
    builds: this build is discarded, the published files keep their bytes, inodes and mtimes."""
    _config, _out, first, a, _b = published
    version = a["version"]
    out = tmp_path / "out"
    config = write_config(workspace, tmp_path / "run.yaml", out)
    real_run_shards = shards_job.run_shards
    before = {}

    def other_run_publishes_first(*args, **kwargs):
        shutil.copytree(first / "versions" / version, out / "versions" / version, copy_function=shutil.copy2)
        shutil.copy2(first / "LATEST", out / "LATEST")
        before.update(tree(out / "versions" / version))
        return real_run_shards(*args, **kwargs)

    monkeypatch.setattr(shards_job, "run_shards", other_run_publishes_first)
    logs = []
    summary = run_pipeline_config(load_run_config(config), log=logs.append)
    assert before and tree(out / "versions" / version) == before
    assert summary == json.loads((out / "versions" / version / "run_summary.json").read_text()) == json.loads(
        (first / "versions" / version / "run_summary.json").read_text())
    assert any("published meanwhile" in line for line in logs), logs
    assert os.listdir(out / "versions") == [version]  # this run's staging is gone
    assert json.loads((out / "LATEST").read_text())["version"] == version


def test_retention_deletes_only_marked_versions_of_the_history(workspace, tmp_path):
    """keep_versions: 1 over three runs with changed shard options: the previous marked version goes;
    a user's ``versions/my_model_v1/``, a version without marker, and live or foreign staging stay."""
    out = tmp_path / "out"
    versions = out / "versions"
    (versions / "my_model_v1").mkdir(parents=True)
    (versions / "my_model_v1" / "weights.bin").write_bytes(b"\x01" * 1000)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    owners = {".building-live": {"host": socket.gethostname(), "pid": os.getpid()},
              ".building-dead": {"host": socket.gethostname(), "pid": int(dead.stdout)},
              ".building-elsewhere": {"host": "another-machine", "pid": 1}}
    for name, owner in owners.items():
        (versions / name).mkdir()
        (versions / name / ".owner.json").write_text(json.dumps(owner))
    config = tmp_path / "run.yaml"
    runs, logs = [], []
    for seed in (0, 1):
        write_config(workspace, config, out, model=False, keep_versions=1, shards={"image_size": 16, "seed": seed})
        runs.append(run_pipeline_config(load_run_config(str(config)), log=logs.append)["version"])
    assert runs[0] != runs[1]
    assert sorted(os.listdir(versions)) == sorted([".building-elsewhere", ".building-live", "my_model_v1", runs[1]])
    assert (versions / "my_model_v1" / "weights.bin").read_bytes() == b"\x01" * 1000
    assert json.loads((out / "LATEST").read_text())["history"] == [runs[1]]
    # A version without the marker (published by an older vlaprep) is never deleted, only reported.
    os.unlink(versions / runs[1] / ".vlaprep-version.json")
    write_config(workspace, config, out, model=False, keep_versions=1, shards={"image_size": 16, "seed": 2})
    logs.clear()
    runs.append(run_pipeline_config(load_run_config(str(config)), log=logs.append)["version"])
    assert sorted(os.listdir(versions)) == sorted([".building-elsewhere", ".building-live", "my_model_v1", runs[1], runs[2]])
    assert any("left alone" in line and runs[1] in line for line in logs), logs
    # LATEST naming a version that was deleted by hand: `status` says so, the next run rebuilds it.
    shutil.rmtree(versions / runs[2])
    assert cli.main(["status", str(out)]) == 2
    rebuilt = run_pipeline_config(load_run_config(str(config)), log=logs.append)
    assert rebuilt["version"] == runs[2] and (versions / runs[2] / "shards" / "manifest.json").exists()
    assert run_job.status(str(out)).startswith(f"{out}: published {runs[2]}")


def _version(out, name, marked=True):
    (out / "versions" / name).mkdir(parents=True)
    (out / "versions" / name / "run_summary.json").write_text("{}")
    if marked:
        (out / "versions" / name / ".vlaprep-version.json").write_text(json.dumps({"format": "vlaprep.version", "version": name}))


def test_retention_rules(tmp_path):
    """Beyond keep_versions in the history AND marked AND not named by LATEST: only then deleted."""
    out = tmp_path / "out"
    for name in ("v-c", "v-b", "v-a", "v-other-marker"):
        _version(out, name)
    _version(out, "v-unmarked", marked=False)
    (out / "versions" / "v-other-marker" / ".vlaprep-version.json").write_text(json.dumps({"format": "vlaprep.version", "version": "v-c"}))
    (out / "versions" / ".building-x").mkdir()
    (out / "versions" / "not-in-history").mkdir()
    (out / "LATEST").write_text(json.dumps({"version": "v-b", "fingerprints": {}, "history": ["v-b"]}))
    history = ["v-c", "v-b", "v-a", "v-unmarked", "v-other-marker", ".building-x", "v-gone"]
    removed = run_job._apply_retention(str(out), history, 1, log=lambda m: None)
    assert removed == ["v-a"]
    assert sorted(os.listdir(out / "versions")) == [".building-x", "not-in-history", "v-b", "v-c", "v-other-marker", "v-unmarked"]


HOLD_LOCK = """
import sys
from vlaprep.pipelines.run_job import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_second_run_fails_at_once_while_another_holds_the_output(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "versions").mkdir(parents=True)
    config = write_config(workspace, tmp_path / "run.yaml", out, model=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["run", "--config", config]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1, err
        assert f"pid {holder.pid}" in err[0] and socket.gethostname() in err[0] and "started 20" in err[0], err[0]
        assert os.listdir(out / "versions") == [] and not (out / "LATEST").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert (out / ".vlaprep.lock").read_bytes() == b""  # released: the holder record is emptied
    # A holder killed hard releases the lock too (the kernel drops it with the process).
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    holder.stdin.close()
    with run_job.output_lock(str(out)):
        assert json.loads((out / ".vlaprep.lock").read_text())["pid"] == os.getpid()


def test_changed_validation_option_carries_shards_over_by_hard_links(published, workspace, tmp_path):
    """Only `validate:` changed: the new version's shards are hard links to the previous version's files
    (carried over into the staging directory, then renamed with it); validation is recomputed."""
    _config, _out, first, a, _b = published
    out = tmp_path / "out"
    shutil.copytree(first, out, symlinks=True)
    config = write_config(workspace, tmp_path / "run.yaml", out, validate={"max_samples": 2, "batch_size": 2})
    summary = run_pipeline_config(load_run_config(config), log=lambda m: None)
    assert summary["version"] != a["version"]
    assert summary["stages"]["shards"] == {"reused": True} and summary["stages"]["validate"] == {"reused": False}
    old, new = out / "versions" / a["version"] / "shards", out / "versions" / summary["version"] / "shards"
    names = sorted(str(p.relative_to(old)) for p in old.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(new)) for p in new.rglob("*") if p.is_file())
    for name in names:
        assert os.stat(new / name).st_ino == os.stat(old / name).st_ino, name
    report = json.loads((out / "versions" / summary["version"] / "validation" / "validation_report.json").read_text())
    assert report["model"]["samples"] == 2 and report["shards"] == str(new)
    assert json.loads((out / "LATEST").read_text())["history"] == [summary["version"], a["version"]]


def test_interrupted_first_build_is_resumed_not_lost(workspace, tmp_path, monkeypatch):
    """A run that fails in the shard stage publishes nothing and leaves its build marked abandoned; the
    rerun of the same version resumes it (finished statistics reused), drops what was left half-done,
    and publishes."""
    out = tmp_path / "out"
    config = write_config(workspace, tmp_path / "run.yaml", out, model=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill in the shard stage")

    monkeypatch.setattr(shards_job, "run_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline_config(load_run_config(config), log=lambda m: None)
    monkeypatch.undo()
    (building,) = os.listdir(out / "versions")
    assert building.startswith(".building-") and not (out / "LATEST").exists()
    staging = out / "versions" / building
    assert json.loads((staging / ".owner.json").read_text())["abandoned"] is True
    assert (staging / "stats" / "dataset_statistics.json").exists()
    (staging / "shards.carry-999").mkdir()  # what a kill inside a carry-over would leave
    (staging / "stats" / ".tmp-abc").write_bytes(b"half")
    logs = []
    summary = run_pipeline_config(load_run_config(config), log=logs.append)
    assert summary["stages"]["stats"]["reused"] == ["bridge_orig"] and summary["stages"]["stats"]["computed"] == []
    assert any("resuming" in line for line in logs), logs
    assert os.listdir(out / "versions") == [summary["version"]]
    vdir = out / "versions" / summary["version"]
    assert sorted(os.listdir(vdir)) == [".vlaprep-version.json", "run_summary.json", "shards", "stats"]
    assert not list(vdir.rglob(".tmp-*")) and not list(vdir.rglob(".owner.json"))
