"""Benchmark incremental regeneration: one dataset of two changes; what does a rerun cost?

In one run, on generated data (Bridge-like RLDS with 256x256 JPEG cameras, and CALVIN), after a first
full run of both, one CALVIN frame's action is edited (so CALVIN's statistics and rows change, Bridge's
do not). Then, as whole processes, alternating, medians:

  stats_incremental   `vlaprep stats` into a copy of the first run's output (Bridge reused from its cache)
  stats_full          `vlaprep stats --force` (both datasets from their sources)
  shards_incremental  `vlaprep shards` into a copy of the first run's output (Bridge's rows read back
                      from its Parquet files, CALVIN encoded from its sources, all files rewritten)
  shards_full         `vlaprep shards --force` (both datasets encoded from their sources)

and checks that each incremental output is byte-identical to the full one. The copies of the first
run's outputs are made before each timed command and are not timed.

  python benchmarks/incremental_benchmark.py [--episodes 150] [--calvin-frames 600] [--reps 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from stats_benchmark import ensure_dataset, measure  # noqa: E402

PY = sys.executable
VLAPREP = os.path.join(os.path.dirname(PY), "vlaprep")


def tree_bytes(root: str, skip=("stats_cache",)) -> dict:
    out = {}
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def edit_calvin(src: str, dst: str) -> None:
    """Copy CALVIN and shift the relative action of one frame inside the first language window."""
    import numpy as np

    from vlaprep.pipelines.sources.calvin import calvin_frame_path, list_calvin_windows

    shutil.copytree(src, dst)
    window = list_calvin_windows(dst)[0]
    frame = calvin_frame_path(window.split_dir, window.start + 1)
    with np.load(frame) as z:
        arrays = dict(z)
    arrays["rel_actions"] = np.clip(arrays["rel_actions"] + 0.25, -1, 1)
    np.savez(frame, **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=150)
    parser.add_argument("--calvin-frames", type=int, default=600)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "vlaprep-bench"))
    args = parser.parse_args()

    rlds = ensure_dataset(args.data, args.episodes)
    work = tempfile.mkdtemp(prefix="vlaprep-incr-")
    try:
        calvin = os.path.join(work, "calvin")
        subprocess.run([VLAPREP, "generate", "calvin", "--output", calvin, "--frames", str(args.calvin_frames), "--seed", "5"],
                       check=True, stdout=subprocess.DEVNULL)
        from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

        tok = os.path.join(work, "tok")
        build_llama_like_tokenizer(tok)

        def stats_cmd(calvin_dir, out, *extra):
            return [VLAPREP, "stats", "--dataset", f"bridge_orig={rlds}", "--dataset", f"calvin={calvin_dir}", "--output", out, *extra]

        def shards_cmd(calvin_dir, statistics_file, out, *extra):
            return [VLAPREP, "shards", "--dataset", f"bridge_orig={rlds}", "--dataset", f"calvin={calvin_dir}",
                    "--statistics", statistics_file, "--tokenizer", tok, "--output", out, *extra]

        # First full run of the original inputs: what the incremental runs start from.
        first_stats, first_shards = os.path.join(work, "first_stats"), os.path.join(work, "first_shards")
        measure(stats_cmd(calvin, first_stats))
        measure(shards_cmd(calvin, os.path.join(first_stats, "dataset_statistics.json"), first_shards))
        edited = os.path.join(work, "calvin_edited")
        edit_calvin(calvin, edited)
        statistics_file = os.path.join(work, "stats_full", "dataset_statistics.json")
        measure(stats_cmd(edited, os.path.join(work, "stats_full"), "--force"))  # warm-up; also the statistics for shards

        times: dict[str, list[float]] = {k: [] for k in ("stats_incremental", "stats_full", "shards_incremental", "shards_full")}
        for rep in range(args.reps):
            for name in (("stats_incremental", "stats_full") if rep % 2 == 0 else ("stats_full", "stats_incremental")):
                out = os.path.join(work, name)
                shutil.rmtree(out, ignore_errors=True)
                if name == "stats_incremental":
                    shutil.copytree(first_stats, out)
                    times[name].append(measure(stats_cmd(edited, out))["wall"])
                else:
                    times[name].append(measure(stats_cmd(edited, out, "--force"))["wall"])
            for name in (("shards_incremental", "shards_full") if rep % 2 == 0 else ("shards_full", "shards_incremental")):
                out = os.path.join(work, name)
                shutil.rmtree(out, ignore_errors=True)
                if name == "shards_incremental":
                    shutil.copytree(first_shards, out)
                    times[name].append(measure(shards_cmd(edited, statistics_file, out))["wall"])
                else:
                    times[name].append(measure(shards_cmd(edited, statistics_file, out, "--force"))["wall"])
        same_stats = (tree_bytes(os.path.join(work, "stats_incremental"))["dataset_statistics.json"]
                      == tree_bytes(os.path.join(work, "stats_full"))["dataset_statistics.json"])
        inc, full = tree_bytes(os.path.join(work, "shards_incremental")), tree_bytes(os.path.join(work, "shards_full"))
        same_shards = inc == full
        if not same_shards:
            print("differing files:", sorted(set(inc) ^ set(full)) + [k for k in inc if k in full and inc[k] != full[k]])
            for name, files in (("incremental", inc), ("full", full)):
                print(name, json.loads(files["manifest.json"])["accounting"])
        with open(os.path.join(work, "shards_full", "manifest.json")) as f:
            manifest = json.load(f)
        rows = {name: sum(v["rows"] for v in d.values()) for name, d in manifest["datasets"].items()}
        medians = {k: statistics.median(v) for k, v in times.items()}
        print(f"data: bridge_orig {args.episodes} episodes ({rows['bridge_orig']} rows, unchanged), "
              f"calvin {args.calvin_frames} frames ({rows['calvin']} rows, one frame edited); {os.cpu_count()} cores")
        for k, v in times.items():
            print(f"{k:20s} median {medians[k]:7.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
        print(f"stats:  incremental / full = {medians['stats_incremental'] / medians['stats_full']:.3f}   "
              f"byte-identical: {same_stats}")
        print(f"shards: incremental / full = {medians['shards_incremental'] / medians['shards_full']:.3f}   "
              f"byte-identical: {same_shards}")
        if not (same_stats and same_shards):
            sys.exit("incremental output differs from the full rebuild")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
