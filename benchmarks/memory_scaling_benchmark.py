"""Peak memory of `vlaprep stats` (and optionally `vlaprep shards`) against the number of episodes.

For each size N, on generated Bridge-like RLDS data with small images (`vlaprep generate rlds
--image-size 32`, so images barely count), runs the command as a whole process with 2 Beam worker
processes (`--direct_running_mode=multi_processing`, the default above 256 MiB of input; `--in-process`
for one process) and samples, every 0.1 s,
the resident set size of the driver and of every descendant process (the Beam workers). Reports the
peak of the driver and of the largest worker, and the growth between sizes (issue #19's target:
every process grows by at most 15% from 2,000 to 16,000 episodes, and from 16,000 to 64,000).

It also times the single-threaded TFRecord read floor (`read_floor.py`) on each size and reports the
marginal throughput of `vlaprep stats` as in `stats_benchmark.py`: the floor's extra wall from one
size to the next over vlaprep's (start-up cancels; the target is >= 1.3x with 2 workers on 2 cores).

  python benchmarks/memory_scaling_benchmark.py [--sizes 2000,16000,64000] [--shards] [--in-process] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
VLAPREP = os.path.join(os.path.dirname(PY), "vlaprep")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (Beam starts its workers from other threads than the main one)."""
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return out


def _tree(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(_children(p))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


def run_sampled(cmd: list[str]) -> dict:
    """Run ``cmd``; -> {"seconds", "driver": peak bytes, "workers": {pid: peak bytes}}."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            peaks[pid] = max(peaks.get(pid, 0), _rss(pid))
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    driver = peaks.pop(proc.pid, 0)
    return {"seconds": time.perf_counter() - started, "driver": driver, "workers": peaks}


def ensure_dataset(root: str, episodes: int) -> str:
    path = os.path.join(root, f"bridge-{episodes}-32px")
    version = os.path.join(path, "bridge_orig", "1.0.0")
    if not os.path.isfile(os.path.join(version, "dataset_info.json")):
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([VLAPREP, "generate", "rlds", "--output", path, "--episodes", str(episodes), "--image-size", "32",
                        "--seed", "7"], check=True, stdout=subprocess.DEVNULL)
    return version


def _mb(b: int) -> str:
    return f"{b / 2**20:7.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,16000")
    parser.add_argument("--shards", action="store_true", help="also measure vlaprep shards (slower)")
    parser.add_argument("--in-process", action="store_true", help="one process (FnApiRunner in_memory) instead of 2 workers")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "vlaprep-bench-memory"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="vlaprep-memory-")
    rows = []
    mode = ["--direct_running_mode=in_memory"] if args.in_process else ["--direct_running_mode=multi_processing",
                                                                         "--direct_num_workers=2"]
    try:
        tok = None
        for n in sizes:
            data = ensure_dataset(args.data, n)
            input_mb = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)) / 2**20
            floor = run_sampled([PY, os.path.join(HERE, "read_floor.py"), data])
            rows.append(("floor", n, input_mb, floor))
            out = os.path.join(work, f"stats-{n}")
            r = run_sampled([VLAPREP, "stats", "--dataset", f"bridge_orig={data}", "--output", out, "--force", *mode])
            rows.append(("stats", n, input_mb, r))
            if args.shards:
                if tok is None:
                    from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

                    tok = os.path.join(work, "tok")
                    build_llama_like_tokenizer(tok)
                r = run_sampled([VLAPREP, "shards", "--dataset", f"bridge_orig={data}", "--statistics",
                                 os.path.join(out, "dataset_statistics.json"), "--tokenizer", tok, "--output",
                                 os.path.join(work, f"shards-{n}"), "--image-size", "32", "--force", *mode])
                rows.append(("shards", n, input_mb, r))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'command':7} {'episodes':>8} {'input':>9} {'wall':>8} {'driver peak':>12} {'largest worker':>15} {'workers':>7}")
    for cmd, n, mb, r in rows:
        worker = max(r["workers"].values(), default=0)
        print(f"{cmd:7} {n:>8} {mb:>6.0f} MB {r['seconds']:>7.1f}s {_mb(r['driver']):>12} {_mb(worker):>15} {len(r['workers']):>7}")
    floors = {n: r["seconds"] for c, n, _mb_, r in rows if c == "floor"}
    stats_walls = [(n, r["seconds"]) for c, n, _mb_, r in rows if c == "stats"]
    for (n0, w0), (n1, w1) in zip(stats_walls, stats_walls[1:]):
        extra_floor, extra_stats = floors[n1] - floors[n0], w1 - w0
        print(f"stats marginal {n0} -> {n1} episodes: extra wall {extra_stats:.1f}s vs read floor {extra_floor:.1f}s "
              f"-> {extra_floor / extra_stats:.2f}x the single-threaded read floor")
    for cmd in ("stats", "shards"):
        mine = [(n, r) for c, n, _mb_, r in rows if c == cmd]
        for (n0, r0), (n1, r1) in zip(mine, mine[1:]):
            w0, w1 = max(r0["workers"].values(), default=0), max(r1["workers"].values(), default=0)
            growth_w = f"{w1 / w0:.2f}x" if w0 else "n/a (in-process at the smaller size)"
            print(f"{cmd}: {n0} -> {n1} episodes: driver {r1['driver'] / r0['driver']:.2f}x, largest worker {growth_w}")


if __name__ == "__main__":
    main()
