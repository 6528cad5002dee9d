"""Benchmark `vlaprep stats` against the reference-style baseline and the TFRecord read floor.

Whole processes, alternating (A B C A B C ...), medians of --reps after one warm-up round, page cache
warm. Reports wall, CPU (user+sys of the process tree) and peak RSS (sum over the tree, polled), and the
marginal throughput: (floor's extra wall from small to large) / (vlaprep's extra wall).

  python benchmarks/stats_benchmark.py [--small N] [--large N] [--reps 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
VLAPREP = os.path.join(os.path.dirname(PY), "vlaprep")


def ensure_dataset(root: str, episodes: int) -> str:
    version_dir = os.path.join(root, f"e{episodes}", "bridge_orig", "1.0.0")
    if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
        shutil.rmtree(os.path.join(root, f"e{episodes}"), ignore_errors=True)
        subprocess.run([VLAPREP, "generate", "rlds", "--output", os.path.join(root, f"e{episodes}"), "--episodes", str(episodes),
                        "--image-size", "256", "--seed", "11", "--shards", str(max(2, episodes // 32))], check=True,
                       stdout=subprocess.DEVNULL)
    return version_dir


def measure(cmd: list[str]) -> dict:
    """Run cmd; return wall seconds, CPU seconds of the whole tree, and peak summed RSS (MiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed: {proc.stderr.read().decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "rss_mib": peak / 2**20}


def commands(version_dir: str, scratch: str) -> dict:
    return {
        "vlaprep": [VLAPREP, "stats", "--dataset", f"bridge_orig={version_dir}", "--output", os.path.join(scratch, "vlaprep"), "--force"],
        "baseline": [PY, os.path.join(HERE, "baseline_stats.py"), version_dir, os.path.join(scratch, "baseline.json")],
        "floor": [PY, os.path.join(HERE, "read_floor.py"), version_dir],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=250)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", default=os.environ.get("VLAPREP_BENCH_DATA", "/tmp/vlaprep_bench"))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    sizes = {"small": args.small, "large": args.large}
    dirs = {k: ensure_dataset(args.data, n) for k, n in sizes.items()}
    results = {k: {name: [] for name in ("vlaprep", "baseline", "floor")} for k in sizes}
    scratch = tempfile.mkdtemp(prefix="vlaprep-bench-")
    try:
        tiny = ensure_dataset(args.data, 10)
        startup = {"vlaprep_10_episodes": [], "import_tensorflow": []}
        for rep in range(args.reps + 1):  # round 0 is the warm-up, discarded
            for size in sizes:
                for name, cmd in commands(dirs[size], scratch).items():
                    m = measure(cmd)
                    if rep:
                        results[size][name].append(m)
            t = measure(commands(tiny, scratch)["vlaprep"])
            i = measure([PY, "-c", "import tensorflow"])
            if rep:
                startup["vlaprep_10_episodes"].append(t["wall"])
                startup["import_tensorflow"].append(i["wall"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {s: {n: {k: statistics.median(m[k] for m in runs) for k in ("wall", "cpu", "rss_mib")} for n, runs in r.items()} for s, r in results.items()}
    print(f"{'size':>6} {'program':>9} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}")
    for s in sizes:
        for n in ("vlaprep", "baseline", "floor"):
            m = med[s][n]
            print(f"{sizes[s]:>6} {n:>9} {m['wall']:>8.2f} {m['cpu']:>8.2f} {m['rss_mib']:>9.0f}")
    marginal = {n: med["large"][n]["wall"] - med["small"][n]["wall"] for n in ("vlaprep", "baseline", "floor")}
    ratio = marginal["floor"] / marginal["vlaprep"]
    base_ratio = marginal["floor"] / marginal["baseline"]
    st = {k: statistics.median(v) for k, v in startup.items()}
    print(f"marginal wall (large - small): vlaprep {marginal['vlaprep']:.2f}s, baseline {marginal['baseline']:.2f}s, floor {marginal['floor']:.2f}s")
    print(f"marginal throughput vs read floor: vlaprep {ratio:.2f}x, baseline {base_ratio:.2f}x (target vlaprep >= 1.3x)")
    print(f"peak RSS growth small->large: vlaprep {med['large']['vlaprep']['rss_mib'] / med['small']['vlaprep']['rss_mib']:.2f}x, "
          f"baseline {med['large']['baseline']['rss_mib'] / med['small']['baseline']['rss_mib']:.2f}x")
    print(f"start-up: vlaprep on 10 episodes {st['vlaprep_10_episodes']:.2f}s vs import tensorflow {st['import_tensorflow']:.2f}s "
          f"(+{st['vlaprep_10_episodes'] - st['import_tensorflow']:.2f}s; target <= +3s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians": med, "marginal": marginal, "ratio_vs_floor": ratio, "startup": st, "sizes": sizes}, f, indent=2)


if __name__ == "__main__":
    main()
