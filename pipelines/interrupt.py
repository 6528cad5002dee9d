"""SIGINT / SIGTERM for the ``vlaprep`` command line: stop the worker processes, publish nothing, exit 128+signum.

Beam's local FnApiRunner with worker processes (``--direct_running_mode=multi_processing``, the default
for large inputs) starts one ``apache_beam.runners.worker.sdk_worker_main`` per worker, through ``sh -c``;
a worker pool (``worker_pool_main``) starts its workers below itself. With Python's default handling,
SIGTERM ends only the driver: the workers are left waiting on their gRPC channels for about two
minutes and print tracebacks when they give up.

``on_signals(command)`` (used by ``cli.main`` around the command) replaces that, in the main thread. On
the first SIGINT or SIGTERM:

  1. stderr is muted: from here on the runner's threads and the dying workers only have noise to say
     (lost gRPC channels, "worker exited with -15", a KeyboardInterrupt traceback from each worker when
     a terminal's Ctrl-C reached the whole process group). For that, the command's fd 2 -- which the
     workers inherit -- is a pipe copied to the real stderr by a thread (``_StderrRelay``) until then;
  2. every descendant process gets SIGTERM, then SIGKILL if it is still there after ``GRACE_SECONDS``
     (``stop_descendants``: found through the ``/proc/<pid>/stat`` parent links, or ``ps`` where there is
     no ``/proc``, and looked up again until none is left, so a worker started meanwhile is caught too);
  3. ``RunInterrupted`` -- a ``KeyboardInterrupt``, so no ``except Exception`` on the way swallows it --
     is raised in the main thread, wherever it is waiting. Every clean-up written for failures runs:
     ``run_shards`` deletes its staging directory (``except BaseException``), and statistics are
     written only by the pipeline's last step, which did not run.

The command then calls ``Stop.report()``: one line on the kept stderr, ``vlaprep <cmd>: interrupted
(SIGTERM); workers stopped, nothing published``, and exit code 128 + signum (130 for SIGINT, 143 for
SIGTERM), the shell's convention. Whatever the interruption became on its way out (Beam re-raises a
DoFn's exception as a ``RuntimeError`` when it cannot rebuild it), the CLI reports the signal.

A second signal while stopping is ignored. A watchdog thread ends the process (``os._exit``, same code,
same line) ``WATCHDOG_SECONDS`` after the signal if it has not ended by then -- a runner thread that is
not a daemon would otherwise hold the interpreter open at exit.

Limits: a run whose last step had already published when the signal came still says "nothing
published" (its output is complete and valid: publishing is atomic). Remote runners (Dataflow) are not
stopped: their jobs are not processes of this machine.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_SECONDS = 2.0  # SIGTERM -> SIGKILL: Beam's workers exit at once on SIGTERM; this is for anything that lingers
WATCHDOG_SECONDS = 30.0  # signal -> forced exit, when clean-up (deleting staging) and interpreter exit take longer
_POLL_SECONDS = 0.05
RELAY_DELAY_SECONDS = 0.25  # stderr is copied this late, so output written around a signal can still be dropped


class RunInterrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGINT/SIGTERM once the workers are stopped (see the module docstring)."""


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """``{pid: (ppid, state, start time)}`` of every process, from ``/proc`` (Linux) or ``ps``."""
    table = {}
    if os.path.isdir("/proc/self"):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read().decode("ascii", "replace")
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ... starttime (#22)
            table[int(name)] = (int(fields[1]), fields[0], fields[19])
        return table
    out = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "stat=", "-o", "lstart="],
                         capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[0].isdigit():
            table[int(parts[0])] = (int(parts[1]), parts[2][:1], parts[3])
    return table


def descendants(pid: int | None = None, table: dict | None = None) -> dict[int, str]:
    """``{pid: start time}`` of the live (not zombie) descendants of ``pid`` (default: this process)."""
    root = os.getpid() if pid is None else pid
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, stack = {}, list(children.get(root, ()))
    while stack:
        child = stack.pop()
        if child in found or child == root:
            continue
        ppid, state, started = table[child]
        if state != "Z":
            found[child] = started
        stack.extend(children.get(child, ()))
    return found


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_descendants(grace: float = GRACE_SECONDS, pid: int | None = None) -> list[int]:
    """SIGTERM every descendant of ``pid`` (default: this process), SIGKILL those left after ``grace`` s.

    The tree is looked up again every 50 ms until everything signalled is gone: a process started
    meanwhile is signalled too, and one already seen stays tracked when its parent dies first (it is
    re-parented away from us). Processes are identified by (pid, start time), so a reused pid is never
    signalled. Returns the pids signalled."""
    signalled: dict[int, str] = {}
    deadline = time.monotonic() + grace
    killed = False
    while True:
        table = _proc_table()
        for child, started in descendants(pid, table).items():
            if child not in signalled:
                signalled[child] = started
                _signal(child, signal.SIGKILL if killed else signal.SIGTERM)
        alive = [p for p, started in signalled.items() if p in table and table[p][1] != "Z" and table[p][2] == started]
        if not alive:
            return sorted(signalled)
        if time.monotonic() >= deadline:
            if killed and time.monotonic() >= deadline + grace:
                return sorted(signalled)  # unkillable (uninterruptible I/O): give up rather than hang
            killed = True
            for p in alive:
                _signal(p, signal.SIGKILL)
        time.sleep(_POLL_SECONDS)


class _StderrRelay:
    """fd 2 -> a pipe whose reader thread copies everything to the real stderr, ``RELAY_DELAY_SECONDS``
    late, until SIGINT/SIGTERM arrives.

    Worker processes inherit fd 2, so what they print while dying is dropped along with the driver's
    own noise, and ``write_line``'s line is the last one. A terminal's Ctrl-C reaches the workers at the
    same moment as the driver: they print a KeyboardInterrupt traceback within milliseconds, before
    the driver's Python handler may run. So the thread learns of the signal from the interpreter's C
    handler (``signal.set_wakeup_fd``), and holds output back briefly: what was written around the
    signal is still held, and dropped. Order is kept (one pipe). ``close()`` puts fd 2 back and drains.
    """

    def __init__(self):
        self.stderr = os.dup(2)  # the real stderr
        read, write = os.pipe()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(write, 2)
        os.close(write)
        self._read = read
        self._previous_wakeup = signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        self._lock = threading.Lock()
        self._muted = False
        self._thread = threading.Thread(target=self._copy, name="vlaprep-stderr-relay", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        pending: list[tuple[float, bytes]] = []  # (time read, data), oldest first
        watched = [self._read, self._wake_read]
        try:
            while True:
                timeout = max(0.0, pending[0][0] + RELAY_DELAY_SECONDS - time.monotonic()) if pending else None
                ready, _, _ = select.select(watched, [], [], timeout)
                if self._wake_read in ready:
                    wake = os.read(self._wake_read, 512)
                    if not wake:
                        watched.remove(self._wake_read)  # closed by close()
                    elif set(wake) & set(SIGNALS):
                        self.mute()
                data = os.read(self._read, 1 << 16) if self._read in ready else None
                now = time.monotonic()
                if data:
                    pending.append((now, data))
                due = len(pending) if data == b"" else sum(1 for t, _ in pending if t + RELAY_DELAY_SECONDS <= now)
                with self._lock:
                    if due and not self._muted:
                        os.write(self.stderr, b"".join(d for _, d in pending[:due]))
                del pending[:due]
                if data == b"":  # EOF: fd 2 is back to the real stderr and no child holds the pipe
                    return
        except OSError:
            pass
        finally:
            with self._lock:
                for fd in (self._read, self._wake_read):
                    os.close(fd)
                if not self._muted:
                    os.close(self.stderr)

    def mute(self) -> None:
        with self._lock:
            self._muted = True

    def write_line(self, line: str) -> None:
        with self._lock:
            try:
                os.write(self.stderr, (line + "\n").encode())
            except OSError:
                pass

    def close(self) -> None:
        """Back to the real stderr (unless muted: the process is ending, its last line is written)."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        signal.set_wakeup_fd(self._previous_wakeup)
        if self._muted:
            return
        os.close(self._wake_write)
        os.dup2(self.stderr, 2)  # the pipe's last writers now are children that still hold it
        self._thread.join(timeout=2.0)  # EOF once they are gone (Beam's workers are, when run() returns)


class Stop:
    """The state of ``on_signals``: ``signum`` is None until a signal came."""

    def __init__(self, command: str):
        self.command = command
        self.signum: int | None = None
        self._relay: _StderrRelay | None = None
        self._reported = threading.Lock()
        self._done = False

    def line(self) -> str:
        name = signal.Signals(self.signum).name
        return f"{self.command}: interrupted ({name}); workers stopped, nothing published"

    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def report(self) -> int:
        """Stop any worker started while the run unwound, write the one line to the real stderr (once),
        and return the exit code."""
        with self._reported:
            if not self._done:
                self._done = True
                stop_descendants()
                if self._relay is not None:
                    self._relay.write_line(self.line())
                else:
                    os.write(2, (self.line() + "\n").encode())
        return self.exit_code()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return  # already stopping
        self.signum = signum
        if self._relay is not None:
            self._relay.mute()
        threading.Thread(target=self._watchdog, name="vlaprep-interrupt-watchdog", daemon=True).start()
        stop_descendants()
        raise RunInterrupted(signal.Signals(signum).name)

    def _watchdog(self) -> None:
        time.sleep(WATCHDOG_SECONDS)
        code = self.report()
        os._exit(code)


class on_signals:
    """``with on_signals("vlaprep stats") as stop: ...``: SIGINT/SIGTERM handling for one command, in the
    main thread (elsewhere it does nothing). Inside, stderr goes through ``_StderrRelay``; after a
    signal it stays muted -- the process is ending and its last line is ``stop.report()``'s."""

    def __init__(self, command: str):
        self.stop = Stop(command)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            try:
                self.stop._relay = _StderrRelay()
            except OSError:  # no usable fd 2 (a daemon): signals are still handled, nothing to mute
                self.stop._relay = None
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self.stop._handle)
        return self.stop

    def __exit__(self, exc_type, exc, tb) -> bool:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self.stop._relay is not None:
            self.stop._relay.close()
        return False
