"""Peak memory of `vlaprep shards` on long episodes: does it grow with the episode's length?

Generated Bridge-layout RLDS datasets of 2 episodes each, of N steps (default 2,000 and 20,000),
128x128 JPEG cameras; `vlaprep shards --image-size 128` runs as a whole process with 2 worker
processes (FnApiRunner multi_processing), and the summed RSS of the process tree (driver + Beam
workers, read from /proc every 20 ms) gives the peak. Each version runs from its own source tree:

  after    the installed vlaprep (this working tree); with ``--after-files``, the ``--before-rev`` tree
           with just these files taken from the working tree (one change measured alone while
           others are in flight)
  before   ``--before-rev REV``: the package as of git revision REV (``git archive``), laid out as
           pyproject's package-dir says and put first on PYTHONPATH (workers inherit it)

When both run, their shard files are compared by sha256 (the output must not change).

  python benchmarks/long_episode_memory.py [--steps 2000,20000] [--before-rev HEAD [--after-files pipelines/shards/rows.py,...]] [--data DIR]

Generating the 20,000-step dataset takes ~40 s and ~5 GB (the generator renders every frame first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
PACKAGE_DIRS = {"vlaprep": "vlaprep", "vlaprep/pipelines": "pipelines", "vlaprep/transforms": "transforms", "vlaprep/schemas": "schemas"}
WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
IN_MEMORY = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


def ensure_data(root: str, steps: int, image_size: int) -> tuple[str, str]:
    """(RLDS version dir, dataset_statistics.json) of 2 episodes of ``steps`` steps, generated once."""
    from vlaprep.synthetic.rlds import generate_rlds

    base = os.path.join(root, f"rlds_{steps}x{image_size}")
    version_dir = os.path.join(base, "bridge_orig", "1.0.0")
    if not os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
        shutil.rmtree(base, ignore_errors=True)
        generate_rlds(base, name="bridge_orig", episodes=2, seed=0, image_size=image_size, num_shards=2, val_fraction=0.0,
                      empty_language_fraction=0.0, min_steps=steps, max_steps=steps)
    stats_dir = os.path.join(root, f"stats_{steps}x{image_size}")
    if not os.path.isfile(os.path.join(stats_dir, "dataset_statistics.json")):
        subprocess.run([PY, "-m", "vlaprep.pipelines.cli", "stats", "--dataset", f"bridge_orig={version_dir}", "--output", stats_dir, *IN_MEMORY],
                       check=True, capture_output=True, cwd=root)
    return version_dir, os.path.join(stats_dir, "dataset_statistics.json")


def ensure_tokenizer(root: str) -> str:
    from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

    path = os.path.join(root, "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        build_llama_like_tokenizer(path)
    return path


def source_tree(rev: str, into: str) -> str:
    """The package as of git ``rev``, importable from ``into`` (returned, for PYTHONPATH)."""
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, *sorted(set(PACKAGE_DIRS.values()))], check=True, capture_output=True).stdout
    raw = os.path.join(into, "raw")
    os.makedirs(raw)
    subprocess.run(["tar", "x", "-C", raw], input=archive, check=True)
    for package, folder in sorted(PACKAGE_DIRS.items()):
        shutil.move(os.path.join(raw, folder), os.path.join(into, package))
    os.rmdir(raw)
    return into


def _rss_tree(root: int) -> int:
    """Summed resident set size (bytes) of ``root`` and its descendants."""
    parents, rss = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/statm") as f:
                rss[int(name)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError):
            continue
        parents[int(name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    total, frontier, seen = 0, [root], set()
    while frontier:
        pid = frontier.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        frontier.extend(p for p, parent in parents.items() if parent == pid)
    return total


def measure(cmd: list[str], env: dict, cwd: str) -> dict:
    """Run cmd in ``cwd``; wall seconds and the peak of the process tree's summed RSS (MiB).

    ``cwd`` must not be the repository: ``python -m`` puts the working directory first on sys.path,
    ahead of PYTHONPATH, and the repository's ``vlaprep/`` would shadow the tree being measured."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _rss_tree(proc.pid))
            time.sleep(0.02)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd!r} failed ({proc.returncode}): {err.read().decode()[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "peak_mib": peak / 2**20}


def shard_files(out: str) -> tuple[list[str], int]:
    """(sha256 of every shard file, rows) from the output's manifest."""
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    return [entry["sha256"] for entry in manifest["files"]], sum(entry["rows"] for entry in manifest["files"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", default="2000,20000", help="episode lengths (2 episodes each)")
    parser.add_argument("--image-size", type=int, default=128, help="camera and output size")
    parser.add_argument("--before-rev", default=None, help="also measure the package as of this git revision")
    parser.add_argument("--after-files", default=None, help="comma-separated repo paths: after = before-rev + these working-tree files")
    parser.add_argument("--data", default=os.environ.get("VLAPREP_BENCH_DATA", "/tmp/vlaprep_long_bench"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.makedirs(args.data, exist_ok=True)
    tokenizer = ensure_tokenizer(args.data)
    scratch = tempfile.mkdtemp(prefix="vlaprep-long-")
    try:
        variants = {}
        if args.before_rev:
            variants["before"] = source_tree(args.before_rev, os.path.join(scratch, "before"))
        variants["after"] = None
        if args.after_files:
            if not args.before_rev:
                parser.error("--after-files needs --before-rev")
            after = variants["after"] = source_tree(args.before_rev, os.path.join(scratch, "after"))
            for relpath in args.after_files.split(","):
                # pipelines/shards/rows.py -> vlaprep/pipelines/shards/rows.py (the longest mapped folder wins)
                folder = max((f for f in PACKAGE_DIRS.values() if relpath.startswith(f + "/")), key=len)
                package = next(p for p, f in PACKAGE_DIRS.items() if f == folder)
                target = os.path.join(after, package, os.path.relpath(relpath, folder))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(os.path.join(REPO, relpath), target)
        rows = []
        for steps in (int(s) for s in args.steps.split(",")):
            version_dir, statistics = ensure_data(args.data, steps, args.image_size)
            digests = {}
            for name, tree in variants.items():
                env = dict(os.environ)
                if tree:
                    env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
                out = os.path.join(scratch, f"out_{name}_{steps}")
                cmd = [PY, "-m", "vlaprep.pipelines.cli", "shards", "--dataset", f"bridge_orig={version_dir}", "--statistics", statistics,
                       "--tokenizer", tokenizer, "--output", out, "--image-size", str(args.image_size), "--heldout-fraction", "0", *WORKERS]
                result = measure(cmd, env, cwd=scratch)
                digests[name], result["rows"] = shard_files(out)
                shutil.rmtree(out)
                rows.append((name, steps, result))
                print(f"{name:>7} {steps:>7} steps x 2 episodes: {result['wall_s']:7.1f} s, peak {result['peak_mib']:8.0f} MiB", flush=True)
            if len(digests) == 2:
                print(f"        shard files identical before/after: {digests['before'] == digests['after']} ({len(digests['after'])} files)")
        print(f"\n{'version':>7} {'steps':>7} {'rows':>7} {'wall s':>8} {'peak MiB':>9}")
        for name, steps, result in rows:
            print(f"{name:>7} {steps:>7} {result['rows']:>7} {result['wall_s']:8.1f} {result['peak_mib']:9.0f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
