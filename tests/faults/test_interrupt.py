"""SIGTERM / Ctrl-C during `vlaprep stats` with Beam worker processes: the workers go with the driver,
stderr ends with exactly one line, the exit code is 128 + signum and nothing is published.

The worker processes are found here from ``/proc`` directly (not with the code under test) while the
run is going, then the signal is sent once two ``sdk_worker_main`` processes exist.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from vlaprep.pipelines import interrupt
from vlaprep.synthetic.rlds import generate_rlds

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process tree from /proc")

WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]  # forced: small inputs would run in-process


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 60 episodes in 4 files: the run lasts ~8 s after its workers start (2 shared cores), time enough to interrupt it.
    return generate_rlds(tmp_path_factory.mktemp("interrupt") / "rlds", episodes=60, image_size=8, num_shards=4, max_steps=60)


def _stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def _tree(root: int) -> dict[int, str]:
    """{pid: command line} of the descendants of ``root``."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            parents[int(name)] = stat[0]
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        found[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                frontier.append(pid)
    return found


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"  # a zombie has exited; only its parent's wait is missing


def _interrupt_stats(dataset, out, tmp_path, send):
    """Run `vlaprep stats` with 2 workers, ``send(proc)`` once both run; -> (exit code, stderr, pids seen, seconds to exit)."""
    err_path = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "vlaprep.pipelines.cli", "stats", "--dataset", f"bridge_orig={dataset}", "--output", str(out), *WORKERS]
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    seen: dict[int, str] = {}
    try:
        deadline, ready = time.time() + 60, None
        while proc.poll() is None and time.time() < deadline:
            seen.update(_tree(proc.pid))
            workers = [p for p, c in seen.items() if "sdk_worker_main" in c and not c.startswith("/bin/sh") and _alive(p)]
            if len(workers) >= 2 and ready is None:
                ready = time.time()
            if ready is not None and time.time() - ready > 1.0:  # connected and reading by now
                break
            time.sleep(0.05)
        assert proc.poll() is None and ready is not None, "expected the run to be going with 2 workers"
        sent = time.time()
        send(proc)
        code = proc.wait(timeout=30)
        waited = time.time() - sent
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in seen):
            time.sleep(0.05)
        return code, err_path.read_text(), seen, waited
    finally:
        for pid in [proc.pid, *seen]:  # whatever the outcome, nothing of this test outlives it
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.timeout(120)
def test_sigterm_stops_workers_and_publishes_nothing(dataset, tmp_path):
    out = tmp_path / "stats"
    code, err, seen, waited = _interrupt_stats(dataset, out, tmp_path, lambda proc: proc.send_signal(signal.SIGTERM))
    assert [pid for pid in seen if _alive(pid)] == []
    assert len([c for c in seen.values() if "sdk_worker_main" in c]) >= 2
    assert code == 128 + signal.SIGTERM == 143
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "vlaprep stats: interrupted (SIGTERM); workers stopped, nothing published"
    assert "Traceback" not in err and "interrupted" not in "\n".join(lines[:-1]), err
    assert waited < 10
    assert not (out / "dataset_statistics.json").exists()


@pytest.mark.timeout(120)
def test_ctrl_c_reaching_every_process_prints_one_line(dataset, tmp_path):
    """A terminal's Ctrl-C signals the whole process group: the workers die of it too, silently."""
    out = tmp_path / "stats"
    code, err, seen, _ = _interrupt_stats(dataset, out, tmp_path, lambda proc: os.killpg(proc.pid, signal.SIGINT))
    assert [pid for pid in seen if _alive(pid)] == []
    assert code == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "vlaprep stats: interrupted (SIGINT); workers stopped, nothing published"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not (out / "dataset_statistics.json").exists()


def test_stop_descendants_escalates_to_sigkill_and_spares_the_rest(tmp_path):
    """A child that ignores SIGTERM is killed after the grace period; processes outside the tree are untouched."""
    script = (
        "import signal, subprocess, sys, time\n"
        "stubborn = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)'\n"
        "a = subprocess.Popen([sys.executable, '-c', stubborn], stdout=subprocess.PIPE)\n"
        "b = subprocess.Popen(['sleep', '60'])\n"
        "a.stdout.readline()\n"
        "print(a.pid, b.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        stubborn, plain = (int(x) for x in parent.stdout.readline().split())
        started = time.time()
        stopped = interrupt.stop_descendants(grace=0.5, pid=parent.pid)
        assert sorted(stopped) == sorted([stubborn, plain])
        assert not _alive(stubborn) and not _alive(plain)
        assert 0.5 <= time.time() - started < 5
        assert _alive(parent.pid) and _alive(bystander.pid)
    finally:
        for proc in (parent, bystander):
            proc.kill()
            proc.wait()
