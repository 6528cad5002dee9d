"""Scale-out of the statistics and shard pipelines with the number of Beam worker processes.

For each worker count N (FnApiRunner, multi_processing, --direct_num_workers=N), as whole processes,
alternating over N within each repetition, on generated Bridge-like RLDS data (256x256 JPEG cameras):

  stats   `vlaprep stats --force` on a small and a large dataset
  shards  `vlaprep shards` (224 px) on a small and a large dataset

Rates are marginal: (large - small) work / (median wall large - median wall small), so start-up (imports,
worker processes) cancels. Speedup(N) = rate(N) / rate(N0) for the first count N0 (1 by default);
efficiency = speedup / (N / N0).

  python benchmarks/scaling_benchmark.py [--workers 1,2] [--stats-sizes 250,2500] [--shards-sizes 100,300] [--reps 3]

On the 16-core device: --workers 1,4,8,16 (the issue's target: efficiency >= 0.7 at 16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from stats_benchmark import ensure_dataset, measure  # noqa: E402

from vlaprep import paths  # noqa: E402

PY = sys.executable
VLAPREP = os.path.join(os.path.dirname(PY), "vlaprep")


def beam_args(workers: int) -> list[str]:
    return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]


def rows_of(shards_dir: str) -> int:
    with open(os.path.join(shards_dir, "manifest.json")) as f:
        return sum(s["rows"] for s in json.load(f)["splits"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--stats-sizes", default="250,2500")
    parser.add_argument("--shards-sizes", default="100,300")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "vlaprep-bench"))
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    stats_sizes = [int(s) for s in args.stats_sizes.split(",")]
    shards_sizes = [int(s) for s in args.shards_sizes.split(",")]
    data = {n: ensure_dataset(args.data, n) for n in sorted(set(stats_sizes + shards_sizes))}
    work = tempfile.mkdtemp(prefix="vlaprep-scaling-")
    try:
        from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

        tok = os.path.join(work, "tok")
        build_llama_like_tokenizer(tok)
        stats_files = {}
        for n in shards_sizes:
            out = os.path.join(work, f"stats-{n}")
            measure([VLAPREP, "stats", "--dataset", f"bridge_orig={data[n]}", "--output", out])
            stats_files[n] = os.path.join(out, "dataset_statistics.json")

        def stats_cmd(n, w):
            return [VLAPREP, "stats", "--dataset", f"bridge_orig={data[n]}", "--output", os.path.join(work, f"s-{n}-{w}"),
                    "--force", *beam_args(w)]

        def shards_cmd(n, w):
            out = os.path.join(work, f"sh-{n}-{w}")
            shutil.rmtree(out, ignore_errors=True)
            return [VLAPREP, "shards", "--dataset", f"bridge_orig={data[n]}", "--statistics", stats_files[n], "--tokenizer", tok,
                    "--output", out, "--force", *beam_args(w)]

        walls: dict = {}
        for rep in range(args.reps + 1):  # round 0 warms caches and is discarded
            order = workers if rep % 2 == 0 else list(reversed(workers))
            for w in order:
                for n in stats_sizes:
                    wall = measure(stats_cmd(n, w))["wall"]
                    if rep:
                        walls.setdefault(("stats", w, n), []).append(wall)
                for n in shards_sizes:
                    wall = measure(shards_cmd(n, w))["wall"]
                    if rep:
                        walls.setdefault(("shards", w, n), []).append(wall)
        sizes = {n: sum(size for _, size in paths.list_files(data[n])) for n in stats_sizes}
        rows = {n: rows_of(os.path.join(work, f"sh-{n}-{workers[0]}")) for n in shards_sizes}
        print(f"# {os.cpu_count()} cores; workers {workers}; stats {stats_sizes} episodes "
              f"({', '.join(f'{sizes[n] / 1e6:.0f} MB' for n in stats_sizes)}); shards {shards_sizes} episodes "
              f"({', '.join(f'{rows[n]} rows' for n in shards_sizes)}); {args.reps} reps alternating")
        for key, values in sorted(walls.items()):
            print(f"{key[0]:6s} w{key[1]:<3d} n{key[2]:<5d} " + " ".join(f"{v:.2f}" for v in values))
        for stage, sizes_, work_units, unit in (
            ("stats", stats_sizes, {n: sizes[n] / 1e6 for n in stats_sizes}, "MB/s"),
            ("shards", shards_sizes, rows, "rows/s"),
        ):
            small, large = sizes_
            rate = {}
            for w in workers:
                extra = statistics.median(walls[(stage, w, large)]) - statistics.median(walls[(stage, w, small)])
                rate[w] = (work_units[large] - work_units[small]) / extra
            base = workers[0]
            for w in workers:
                speedup = rate[w] / rate[base]
                print(f"# {stage}: {w:2d} workers  marginal {rate[w]:8.1f} {unit}  speedup vs {base}: {speedup:5.2f}x  "
                      f"efficiency {speedup / (w / base):4.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
