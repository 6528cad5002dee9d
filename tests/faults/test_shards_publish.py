"""Publishing ``vlaprep shards --output OUT``: vlaprep deletes only what it can prove it wrote, a failed or
killed publish leaves the previous output exactly as it was, and an all-quarantined run does not
replace a good output with an empty one.

Every expectation is a snapshot taken before the run (every file's bytes and every directory of OUT)
or a real output of ``run_shards`` on generated RLDS data; faults are one OS call made to fail
(``os.rename``/the manifest's atomic write raising ENOSPC) or a process killed with ``os._exit``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from vlaprep import paths
from vlaprep.pipelines import cli
from vlaprep.pipelines.shards import job as shards_job
from vlaprep.pipelines.shards import publish as shards_publish
from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.registry import get_spec

FAST = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]
ENTRIES = ("train", "heldout", "quarantine", "inputs")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six good Bridge episodes, three whose instruction is empty (all quarantined), their statistics, a
    tokenizer, and two real outputs of the good ones: A (seed 0) and B (seed 1, other splits)."""
    root = tmp_path_factory.mktemp("publish")
    good = generate_rlds(root / "good", episodes=6, seed=5, image_size=32, max_steps=6, num_shards=1,
                         val_fraction=0.0, empty_language_fraction=0.0)
    unlabeled = generate_rlds(root / "unlabeled", episodes=3, seed=6, image_size=32, max_steps=6, num_shards=1,
                              val_fraction=0.0, empty_language_fraction=1.0)
    build_llama_like_tokenizer(root / "tok")
    spec = get_spec("bridge_orig")
    run_stats([DatasetInput("bridge_orig", str(good), spec)], str(root / "stats"), beam_args=FAST, log=lambda m: None)
    d = {"root": root, "good": str(good), "unlabeled": str(unlabeled), "tok": str(root / "tok"),
         "stats": str(root / "stats" / "dataset_statistics.json")}
    for name, seed in (("A", 0), ("B", 1)):
        shards_job.run_shards([DatasetInput("bridge_orig", str(good), spec)], d["stats"], d["tok"], str(root / name),
                              image_size=32, heldout_fraction=0.3, seed=seed, beam_args=FAST, log=lambda m: None)
    d["A"], d["B"] = root / "A", root / "B"
    return d


def snapshot(root, skip=()):
    """{relative path: bytes} of every file and {relative path: None} of every directory under root
    (except the top-level entries named in ``skip``)."""
    out = {}
    for base, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, root)
            if rel.split(os.sep)[0] in skip:
                continue
            if name in dirs:
                out[rel] = None
            else:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


def shards_argv(data, out, dataset="good", *extra):
    return ["shards", "--dataset", f"bridge_orig={data[dataset]}", "--statistics", data["stats"], "--tokenizer", data["tok"],
            "--output", str(out), "--image-size", "32", "--heldout-fraction", "0.3", *extra, *FAST]


def one_error_line(capsys):
    """The error, as one line; besides it stderr holds only the run's "[shards] ..." progress lines."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[shards] ")]
    assert len(err) == 1 and err[0].startswith("vlaprep shards: error: "), err
    return err[0]


def copy_of(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------------------------------
# 1. Only what vlaprep can prove it wrote
# --------------------------------------------------------------------------------------------------


def _foreign_train(out, data):
    (out / "train").mkdir(parents=True)
    (out / "train" / "mine.bin").write_bytes(b"user data")
    return "train"


def _foreign_inputs(out, data):
    (out / "inputs").mkdir(parents=True)
    (out / "inputs" / "notes.txt").write_text("keep me")
    return "inputs"


def _unmarked_old(out, data):
    (out / ".old-backup").mkdir(parents=True)
    (out / ".old-backup" / "photo.jpg").write_bytes(b"\xff\xd8")
    return ".old-backup"


def _unmarked_staging(out, data):
    (out / ".staging-mine").mkdir(parents=True)
    (out / ".staging-mine" / ".owner.json").write_text(json.dumps({"by": "someone else", "host": "h", "pid": 1}))
    return ".staging-mine"


def _extra_file_in_our_train(out, data):
    copy_of(data["A"], out)
    (out / "train" / "extra.parquet").write_bytes(b"not listed in the manifest")
    return "train/extra.parquet"


def _not_a_vlaprep_manifest(out, data):
    copy_of(data["A"], out)
    (out / "manifest.json").write_text(json.dumps({"format": "someone.else", "files": []}))
    return "manifest.json"


@pytest.mark.parametrize("make", [_foreign_train, _foreign_inputs, _unmarked_old, _unmarked_staging,
                                  _extra_file_in_our_train, _not_a_vlaprep_manifest])
def test_directories_vlaprep_did_not_write_are_refused_and_untouched(data, tmp_path, capsys, make):
    out = tmp_path / "out"
    foreign = make(out, data)
    before = snapshot(out)
    assert cli.main(shards_argv(data, out)) == 2
    line = one_error_line(capsys)
    assert str(out) in line and repr(foreign) in line and "hint: choose an empty or new directory" in line, line
    assert snapshot(out) == before


def test_own_output_is_rebuilt_and_unproven_leftovers_are_left_alone(data, tmp_path, capsys):
    """A published OUT with a killed run's staging (vlaprep's record, pid gone), an unmarked ``.old-*``
    and a foreign-owned ``.staging-*``: the run replaces the output, reclaims only the first."""
    out = copy_of(data["A"], tmp_path / "out")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".staging-killed" / "train").mkdir(parents=True)
    (out / ".staging-killed" / "train" / "shard-00000-of-00001.parquet").write_bytes(b"partial")
    (out / ".staging-killed" / ".owner.json").write_text(json.dumps(shards_publish.owner_record() | {"pid": dead.pid}))
    (out / ".old-mine").mkdir()
    (out / ".old-mine" / "keep.txt").write_text("not vlaprep's")
    (out / ".staging-theirs").mkdir()
    (out / ".staging-theirs" / ".owner.json").write_text(json.dumps({"by": "other tool", "host": socket.gethostname(), "pid": dead.pid}))
    untouched = {k: v for k, v in snapshot(out).items() if k.startswith((".old-mine", ".staging-theirs"))}
    assert cli.main(shards_argv(data, out, "good", "--seed", "1")) == 0
    assert sorted(os.listdir(out)) == sorted([".old-mine", ".staging-theirs", *ENTRIES, "manifest.json"])
    assert {k: v for k, v in snapshot(out).items() if k.startswith((".old-mine", ".staging-theirs"))} == untouched
    assert snapshot(out, skip=(".old-mine", ".staging-theirs")) == snapshot(data["B"])  # the seed-1 output, exactly
    err = capsys.readouterr().err
    assert "left alone" in err and ".staging-theirs" in err and "removed" in err and ".staging-killed" in err


def test_reclaim_removes_only_staging_with_vlaprep_record_of_a_dead_waiting_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    records = {
        "dead": {"by": "vlaprep shards", "host": host, "pid": dead.pid, "wait": True},
        "legacy": {"host": host, "pid": dead.pid},  # written before "by": a waiting local run
        "no-wait": {"by": "vlaprep shards", "host": host, "pid": dead.pid, "wait": False},
        "other-tool": {"by": "other tool", "host": host, "pid": dead.pid},
        "not-json": None,
    }
    for name, record in records.items():
        (tmp_path / f".staging-{name}" / "train").mkdir(parents=True)
        (tmp_path / f".staging-{name}" / "train" / "f").write_bytes(b"x")
        (tmp_path / f".staging-{name}" / ".owner.json").write_text("{oops" if record is None else json.dumps(record))
    (tmp_path / ".staging-empty").mkdir()  # killed between mkdir and its record: rmdir only
    messages = []
    assert shards_publish.reclaim_stale_staging(str(tmp_path), messages.append) == [".staging-dead", ".staging-empty", ".staging-legacy"]
    assert sorted(os.listdir(tmp_path)) == [".staging-no-wait", ".staging-not-json", ".staging-other-tool"]
    assert all((tmp_path / n / "train" / "f").read_bytes() == b"x" for n in os.listdir(tmp_path))
    assert sum("left alone" in m for m in messages) == 3


# --------------------------------------------------------------------------------------------------
# 2. A failed publish is all or nothing
# --------------------------------------------------------------------------------------------------


def _fail_manifest_write(monkeypatch, out):
    real = shards_publish.write_bytes_atomic

    def write(path, payload):
        if path.endswith("manifest.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, payload)

    monkeypatch.setattr(shards_publish, "write_bytes_atomic", write)


def _fail_heldout_move(monkeypatch, out):
    real = os.rename

    def rename(src, dst, *a, **kw):
        if os.path.basename(os.path.dirname(str(src))).startswith(".staging-") and str(dst) == str(out / "heldout"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))  # rename(2) can: no room for the entry
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("fault", [_fail_manifest_write, _fail_heldout_move])
def test_disk_full_while_publishing_restores_the_previous_output(data, tmp_path, capsys, monkeypatch, fault):
    out = copy_of(data["A"], tmp_path / "out")
    before = snapshot(out)
    fault(monkeypatch, out)
    assert cli.main(shards_argv(data, out, "good", "--seed", "1")) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "hint: free space or choose another --output" in line, line
    assert snapshot(out) == before  # same files, same bytes, old manifest back; no staging, no .old-*
    shards_publish.verify_output(str(out))


def _staged(data, out, name=".staging-test"):
    """OUT/.staging-test holding output B's entries and vlaprep's record, as the pipeline leaves it."""
    staging = out / name
    staging.mkdir()
    for entry in ENTRIES:
        shutil.copytree(data["B"] / entry, staging / entry)
    (staging / ".owner.json").write_text(json.dumps(shards_publish.owner_record()))
    return str(staging), (data["B"] / "manifest.json").read_bytes()


def _count_calls(monkeypatch, module, name, fail_at):
    """Wrap module.name; the call number ``fail_at`` raises ENOSPC. Returns the list of calls made."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kw):
        calls.append(args)
        if len(calls) - 1 == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1] if name == "rename" else args[0]))
        return real(*args, **kw)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("target", ["rename", "write_bytes_atomic"])
def test_publish_undoes_a_failure_at_every_step(data, tmp_path, monkeypatch, target):
    module = os if target == "rename" else shards_publish
    out = copy_of(data["A"], tmp_path / "out")
    staging, manifest = _staged(data, out)
    old_output, staged = snapshot(out, skip=(".staging-test",)), snapshot(staging)
    calls = _count_calls(monkeypatch, module, target, fail_at=-1)  # a clean run, to count the steps
    reference = tmp_path / "reference"
    copy_of(out, reference)
    shards_publish.publish(str(reference / ".staging-test"), str(reference), manifest)
    steps = len(calls)
    moves = 1 + 2 * len(ENTRIES) + 1  # park the old manifest and entries, bring the new ones, the manifest last
    assert steps == (moves if target == "rename" else 1 + 1 + moves)  # the staged manifest, the journal + one per move
    assert snapshot(reference) == snapshot(data["B"])
    for fail_at in range(steps):
        monkeypatch.undo()
        _count_calls(monkeypatch, module, target, fail_at)
        with pytest.raises(OSError) as caught:
            shards_publish.publish(staging, str(out), manifest)
        assert caught.value.errno == errno.ENOSPC
        assert snapshot(out, skip=(".staging-test",)) == old_output, f"step {fail_at}"
        assert {k: v for k, v in snapshot(staging).items() if k != "manifest.json"} == staged, f"step {fail_at}"
    monkeypatch.undo()
    shards_publish.publish(staging, str(out), manifest)
    assert snapshot(out) == snapshot(data["B"])


_KILL = textwrap.dedent("""
    import os, sys
    from vlaprep.pipelines.shards import publish as shards_publish
    out, staging, manifest, call, kind = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    real, seen = getattr(os, kind), []
    def die(*args, **kw):
        seen.append(args)
        if len(seen) - 1 == call:
            os._exit(9)  # as SIGKILL: no except, no finally
        return real(*args, **kw)
    setattr(os, kind, die)
    shards_publish.publish(staging, out, open(manifest, "rb").read())
    sys.exit(3)  # not reached
""")


@pytest.mark.parametrize("call, kind, expect, by", [
    (0, "rename", "A", "launcher"), (5, "rename", "A", "launcher"), (9, "rename", "A", "launcher"), (0, "rmdir", "B", "launcher"),
    (5, "rename", "A", "retry"), (0, "rmdir", "B", "retry"),
])
def test_a_killed_publish_is_undone_or_finished_by_the_next_run(data, tmp_path, call, kind, expect, by):
    """Killed at the first move (old manifest parked), mid-way (new train/ in, old heldout/ parked), at the
    last move (the manifest), or after it (cleanup): the next run's check restores A, or finishes B; so
    does a retry of the pipeline's last step for its own staging (it then publishes again, or not)."""
    out = copy_of(data["A"], tmp_path / "out")
    staging, _ = _staged(data, out)
    staged = snapshot(staging)
    (tmp_path / "manifest.json").write_bytes((data["B"] / "manifest.json").read_bytes())
    proc = subprocess.run([sys.executable, "-c", _KILL, str(out), staging, str(tmp_path / "manifest.json"), str(call), kind],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert [n for n in os.listdir(out) if n.startswith(".old-")], "the killed publish leaves its journal"
    messages = []
    if by == "launcher":
        shards_job._check_output_dir(str(out), messages.append)  # what the next run does first
    else:
        assert shards_publish.recover_publish(str(out), messages.append, staging=staging) == (expect == "B")
    if expect == "A":
        assert snapshot(out, skip=(".staging-test",)) == snapshot(data["A"])
        assert {k: v for k, v in snapshot(staging).items() if k != "manifest.json"} == staged  # new entries back in staging
        assert any("undid the interrupted publish" in m for m in messages)
    else:
        assert snapshot(out) == snapshot(data["B"])
        assert any("finished the interrupted publish" in m for m in messages)


def test_an_unfinished_publish_of_a_live_process_is_not_touched(data, tmp_path, capsys):
    out = copy_of(data["A"], tmp_path / "out")
    (out / ".old-live").mkdir()
    journal = shards_publish.owner_record() | {"staging": ".staging-x", "steps": [["manifest.json", ".old-live/manifest.json"]],
                                            "started": 0, "time": 0}
    (out / ".old-live" / ".owner.json").write_text(json.dumps(journal))  # this very process: alive
    os.rename(out / "manifest.json", out / ".old-live" / "manifest.json")
    before = snapshot(out)
    assert cli.main(shards_argv(data, out)) == 2
    line = one_error_line(capsys)
    assert "expected no other vlaprep shards run publishing into" in line and str(out) in line and ".old-live" in line, line
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------------------
# 3. Empty over good
# --------------------------------------------------------------------------------------------------


def test_all_quarantined_run_does_not_replace_a_good_output(data, tmp_path, capsys):
    out = copy_of(data["A"], tmp_path / "out")
    before = snapshot(out)
    assert cli.main(shards_argv(data, out, "unlabeled")) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"vlaprep shards: error: expected at least one episode to publish into {str(out)!r}, got 0: "
                           "all 3 episodes read were quarantined (3 at shard; e.g. bridge_orig "), line
    assert "its previous output is kept as it was" in line and "--allow-empty" in line and "[while running" not in line
    assert snapshot(out) == before

    assert cli.main(shards_argv(data, out, "unlabeled", "--allow-empty")) == 0  # opted in: an empty output, accounted
    manifest = shards_publish.verify_output(str(out))
    assert manifest["files"] == [] and manifest["accounting"]["bridge_orig"] == {
        "read": 3, "train": 0, "heldout": 0, "quarantined": 3, "quarantined_by_stage": {"shard": 3}}
    assert sorted(os.listdir(out)) == sorted([*ENTRIES, "manifest.json"])


def test_first_run_with_no_rows_is_refused(data, tmp_path, capsys):
    out = tmp_path / "new"
    assert cli.main(shards_argv(data, out, "unlabeled")) == 2
    line = one_error_line(capsys)
    assert f"into {str(out)!r}, got 0: all 3 episodes read were quarantined" in line and "nothing was published" in line, line
    assert not out.exists()


def test_no_wait_job_refuses_in_its_last_step(data, tmp_path):
    """The refusal lives in the finalizer: a job submitted without waiting refuses too (the in-process
    runner runs it inside ``pipeline.run()``); its staging stays, marked, for the next run to see."""
    out = copy_of(data["A"], tmp_path / "out")
    before = snapshot(out)
    inputs = [DatasetInput("bridge_orig", data["unlabeled"], get_spec("bridge_orig"))]
    with pytest.raises(shards_publish.PublishRefused, match=r"^expected at least one episode to publish into .*--allow-empty") as caught:
        shards_job.run_shards(inputs, data["stats"], data["tok"], str(out), image_size=32, beam_args=FAST,
                              log=lambda m: None, wait=False)
    assert "\n" not in str(caught.value)
    (staging,) = [n for n in os.listdir(out) if n.startswith(".staging-")]
    assert json.loads((out / staging / ".owner.json").read_text())["wait"] is False
    assert snapshot(out, skip=(staging,)) == before
    # The next waiting run leaves the --no-wait job's staging alone and publishes.
    good = [DatasetInput("bridge_orig", data["good"], get_spec("bridge_orig"))]
    shards_job.run_shards(good, data["stats"], data["tok"], str(out), image_size=32, heldout_fraction=0.3, seed=1,
                          beam_args=FAST, log=lambda m: None)
    assert snapshot(out, skip=(staging,)) == snapshot(data["B"])


@pytest.mark.timeout(300)
def test_refusal_in_a_worker_process_reaches_the_launcher_as_one_line(data, tmp_path):
    """With worker processes the runner re-raises a RuntimeError carrying the worker's traceback text;
    the launcher finds the refusal in it and raises it alone, without Beam's "[while running ...]"."""
    out = copy_of(data["A"], tmp_path / "out")
    before = snapshot(out)
    inputs = [DatasetInput("bridge_orig", data["unlabeled"], get_spec("bridge_orig"))]
    with pytest.raises(shards_publish.PublishRefused) as caught:
        shards_job.run_shards(inputs, data["stats"], data["tok"], str(out), image_size=32, log=lambda m: None,
                              beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert type(caught.value.__cause__) is RuntimeError  # not our exception type: it came as text from a worker
    assert str(caught.value) == (
        f"expected at least one episode to publish into {str(out)!r}, got 0: all 3 episodes read were quarantined "
        f"(3 at shard; e.g. bridge_orig {_first_unlabeled(data)!r}: empty language instruction (OpenVLA drops unlabeled "
        "episodes)); its previous output is kept as it was; hint: check the inputs and the quarantine reasons, or pass "
        "--allow-empty to publish an empty output"
    )
    assert snapshot(out) == before


def _first_unlabeled(data):
    """The episode id of the unlabeled dataset's first episode (the reader's ``split/file/index``)."""
    (shard,) = [n for n in os.listdir(data["unlabeled"]) if "train.tfrecord" in n]
    return f"train/{shard}/0"


# --------------------------------------------------------------------------------------------------
# Object store (gs:// through the local emulator): the same restore through vlaprep.paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_remote_publish_failure_restores_the_previous_output(data, tmp_path, gcs_prefix, monkeypatch):
    out = paths.join(gcs_prefix, "out")
    paths.copy_tree(str(data["A"]), out)
    staging = paths.join(out, ".staging-test")
    for entry in ENTRIES:
        paths.copy_tree(str(data["B"] / entry), paths.join(staging, entry))
    paths.write_bytes_atomic(paths.join(staging, ".owner.json"), json.dumps(shards_publish.owner_record()).encode())
    manifest = (data["B"] / "manifest.json").read_bytes()

    def remote_tree(keep=lambda name: True):
        return {n: paths.read_bytes(paths.join(out, n)) for n, _ in paths.list_files(out) if keep(n)}

    def in_staging(name):
        return name.startswith(".staging-") and name != ".staging-test/manifest.json"

    def published(name):
        return not name.startswith(".staging-")

    old_output, staged = remote_tree(published), remote_tree(in_staging)
    assert old_output == {k: v for k, v in snapshot(data["A"]).items() if v is not None}
    real_move = paths.move

    def move(src, dst):
        if "/.staging-test/" in src and dst == paths.join(out, "heldout"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
        return real_move(src, dst)

    monkeypatch.setattr(paths, "move", move)
    with pytest.raises(OSError, match="No space left"):
        shards_publish.publish(staging, out, manifest)
    assert remote_tree(published) == old_output
    assert remote_tree(in_staging) == staged
    monkeypatch.setattr(paths, "move", real_move)
    shards_publish.publish(staging, out, manifest)
    assert remote_tree() == {k: v for k, v in snapshot(data["B"]).items() if v is not None}
    assert shards_publish.foreign_entries(out) == []
