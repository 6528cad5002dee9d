"""Output problems are one line: `vlaprep stats|shards|run` with an output that is a file, whose parent is
a file, that is not writable, or whose disk fills up while the job writes. Exit code 2, one
`vlaprep <cmd>: error:` line naming the problem, no traceback, and the previous outputs left intact.

Disk full is injected in-process: ``vlaprep.paths.open_write_atomic`` (behind every atomic write) is
replaced by a subclass whose file refuses writes with ENOSPC for chosen names, and the real
``cli.main`` runs in this process with the in-memory runner, so Beam runs the DoFns here too.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from vlaprep import paths
from vlaprep.pipelines import cli
from vlaprep.pipelines.job import PROBE_PREFIX, DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.schemas.layout import STATISTICS_CACHE_FILE
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.registry import get_spec

FAST = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("outerr")
    version_dir = generate_rlds(root / "rlds", episodes=6, seed=5, image_size=16, num_shards=1)
    build_llama_like_tokenizer(root / "tok")
    run_stats([DatasetInput("bridge_orig", str(version_dir), get_spec("bridge_orig"))], str(root / "stats"),
              beam_args=FAST, log=lambda m: None)
    (root / "a_file").write_text("not a directory\n")
    return root, version_dir


def _stats(ws, out, *extra):
    return ["stats", "--dataset", f"bridge_orig={ws[1]}", "--output", str(out), *FAST, *extra]


def _shards(ws, out):
    root = ws[0]
    return ["shards", "--dataset", f"bridge_orig={ws[1]}", "--statistics", str(root / "stats" / "dataset_statistics.json"),
            "--tokenizer", str(root / "tok"), "--output", str(out), "--image-size", "16", *FAST]


def _run(ws, tmp_path, out):
    config = {"output": str(out), "tokenizer": str(ws[0] / "tok"), "beam_args": FAST, "shards": {"image_size": 16},
              "datasets": [{"name": "bridge_orig", "path": str(ws[1])}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return ["run", "--config", str(tmp_path / "run.yaml")]


def _error_line(capsys, command: str, code: int) -> str:
    """Exit 2 and exactly one error line, the last one; only `[stage]` progress and summary lines before it."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith(f"vlaprep {command}: error: "), err
    return errors[0]


class _FullDisk(paths.open_write_atomic):
    """An atomic write whose file raises ENOSPC on write when the target's name contains one of ``FULL``."""

    FULL: tuple = ()

    def __enter__(self):
        f = super().__enter__()
        if not any(marker in os.path.basename(self.path) for marker in self.FULL):
            return f

        class Refusing:
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(f, name)

        return Refusing()


@pytest.fixture
def full_disk(monkeypatch):
    def at(*markers):
        monkeypatch.setattr(_FullDisk, "FULL", markers)
        monkeypatch.setattr(paths, "open_write_atomic", _FullDisk)

    return at


def _files(root):
    return {os.path.relpath(os.path.join(b, n), root): open(os.path.join(b, n), "rb").read()
            for b, _, names in os.walk(root) for n in names}


# --------------------------------------------------------------------------------------------------
# Output in the way: a file, or a parent that is a file


@pytest.mark.parametrize("command", ["stats", "shards", "run"])
@pytest.mark.parametrize("where", ["parent-is-a-file", "is-a-file"])
def test_output_that_is_or_sits_under_a_file_is_one_line(ws, tmp_path, capsys, command, where):
    out = ws[0] / "a_file" / "out" if where == "parent-is-a-file" else ws[0] / "a_file"
    argv = {"stats": _stats(ws, out), "shards": _shards(ws, out), "run": _run(ws, tmp_path, out)}[command]
    line = _error_line(capsys, command, cli.main(argv))
    assert str(ws[0] / "a_file") in line
    assert re.search(r"not a directory|(a|the) file", line, re.IGNORECASE), line
    assert (ws[0] / "a_file").read_text() == "not a directory\n"


def test_stats_preflight_fails_before_any_beam_work(ws, capsys):
    code = cli.main(_stats(ws, ws[0] / "a_file" / "out"))
    err = capsys.readouterr().err
    # Only the error: no "[stats] computing" progress line, so the pipeline was never built.
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot create the statistics output" in err and "a parent of the path is a file" in err


# --------------------------------------------------------------------------------------------------
# Not writable, or already full


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC], ids=["read-only", "permissions", "full"])
def test_stats_unwritable_output_is_one_line_naming_it(ws, tmp_path, capsys, monkeypatch, code):
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):  # the probe only; every other open is the real one
        if PROBE_PREFIX in os.fspath(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    out = tmp_path / "out"
    line = _error_line(capsys, "stats", cli.main(_stats(ws, out)))
    assert f"{os.strerror(code)} for {str(out)!r}" in line, line
    assert os.listdir(out) == []  # nothing written, no probe left


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a chmod 0o555 directory anyway; the read-only case is injected above")
def test_stats_chmod_read_only_output_is_one_line(ws, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        line = _error_line(capsys, "stats", cli.main(_stats(ws, out)))
    finally:
        out.chmod(0o755)
    assert "Permission denied" in line and str(out) in line


# --------------------------------------------------------------------------------------------------
# Disk full while writing


@pytest.mark.parametrize("name", ["dataset_statistics.json", "quarantine.jsonl", ".npz"],
                         ids=["statistics", "quarantine", "cache-projection"])
def test_stats_disk_full_while_writing_is_one_line_and_keeps_the_previous_output(ws, tmp_path, capsys, full_disk, name):
    out = tmp_path / "stats"
    shutil.copytree(ws[0] / "stats", out)
    before = _files(out)
    full_disk(name)
    line = _error_line(capsys, "stats", cli.main(_stats(ws, out, "--force")))
    assert "No space left on device" in line and "free space" in line
    if name.endswith("json") or name.endswith("jsonl"):
        assert f"{str(out / name)!r}" in line, line
    after = _files(out)
    assert after["dataset_statistics.json"] == before["dataset_statistics.json"]
    assert after[STATISTICS_CACHE_FILE] == before[STATISTICS_CACHE_FILE]
    assert not [p for p in after if os.path.basename(p).startswith(".tmp-")]


def test_shards_disk_full_while_writing_a_shard_is_one_line(ws, tmp_path, capsys, full_disk):
    full_disk(".parquet")
    line = _error_line(capsys, "shards", cli.main(_shards(ws, tmp_path / "shards")))
    assert "No space left on device" in line
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_run_disk_full_in_the_statistics_stage_is_one_line(ws, tmp_path, capsys, full_disk):
    full_disk("dataset_statistics.json")
    out = tmp_path / "run"
    line = _error_line(capsys, "run", cli.main(_run(ws, tmp_path, out)))
    assert "No space left on device" in line and "dataset_statistics.json" in line
    assert not (out / "LATEST").exists()


# --------------------------------------------------------------------------------------------------
# The statistics cache: unreadable cache document, unreadable unit projection


def test_unreadable_cache_document_is_recomputed(ws, tmp_path):
    out = tmp_path / "stats"
    shutil.copytree(ws[0] / "stats", out)
    expected = (out / "dataset_statistics.json").read_bytes()
    (out / STATISTICS_CACHE_FILE).write_text("{truncated")
    logs = []
    result = run_stats([DatasetInput("bridge_orig", str(ws[1]), get_spec("bridge_orig"))], str(out), beam_args=FAST,
                       log=logs.append)
    assert result.computed == ["bridge_orig"] and result.reused == []
    assert any("is unreadable" in m and "recomputing" in m for m in logs), logs
    assert (out / "dataset_statistics.json").read_bytes() == expected
    assert json.loads((out / STATISTICS_CACHE_FILE).read_text())["bridge_orig"]["fingerprint"]


def test_unreadable_cached_projection_is_one_line_and_force_recomputes(ws, tmp_path, capsys):
    out = tmp_path / "stats"
    assert cli.main(_stats(ws, out)) == 0
    expected = (out / "dataset_statistics.json").read_bytes()
    capsys.readouterr()
    projections = sorted((out / "stats_cache" / "bridge_orig").iterdir())
    projections[0].write_bytes(b"PK\x03\x04 truncated")
    (out / STATISTICS_CACHE_FILE).unlink()  # the dataset is recomputed from its unit projections
    line = _error_line(capsys, "stats", cli.main(_stats(ws, out)))
    assert projections[0].name in line and "--force" in line, line
    assert cli.main(_stats(ws, out, "--force")) == 0
    assert (out / "dataset_statistics.json").read_bytes() == expected


# --------------------------------------------------------------------------------------------------
# What a user's terminal shows (a separate process: Beam's own logging reaches the real stderr)

_INJECT = """
import errno, os, sys
from vlaprep import paths
from vlaprep.pipelines import cli

class FullDisk(paths.open_write_atomic):
    def __enter__(self):
        f = super().__enter__()
        if os.path.basename(self.path) != os.environ["FULL_AT"]:
            return f
        class Refusing:
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            def __getattr__(self, name):
                return getattr(f, name)
        return Refusing()

paths.open_write_atomic = FullDisk
sys.exit(cli.main(sys.argv[1:]))
"""


def test_disk_full_inside_the_pipeline_is_one_line_on_the_real_stderr(ws, tmp_path):
    script = tmp_path / "inject.py"
    script.write_text(_INJECT)
    proc = subprocess.run([sys.executable, str(script), *_stats(ws, tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "FULL_AT": "dataset_statistics.json"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("[stats]")]
    assert len(lines) == 1 and lines[0].startswith("vlaprep stats: error: No space left on device"), proc.stderr
