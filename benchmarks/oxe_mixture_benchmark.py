"""One `vlaprep stats --mixture` pipeline against the sum of one `vlaprep stats` run per dataset.

For ``--mixture NAME`` (default ``oxe_magic_soup_plus``): expand it as OpenVLA does
(``vlaprep.transforms.mixtures.expand_mixture``), write every dataset synthetic in its real OXE layout
(``vlaprep.synthetic.layouts.generate_layout_rlds``, small images) under ``ROOT/<name>/<version>``, then
time, as whole processes, alternating, ``--reps`` times each:

  mixture  ``vlaprep stats --mixture NAME --data-dir ROOT --output X --proprio --force``
  singles  ``vlaprep stats --dataset NAME=PATH --output Y --proprio --force`` once per dataset, summed

and report the ratio and the start-up saved per dataset ((singles - mixture) / (datasets - 1)).

Usage: ``python benchmarks/oxe_mixture_benchmark.py [--mixture NAME] [--episodes N] [--reps R] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from vlaprep.synthetic.layouts import generate_layout_rlds  # noqa: E402
from vlaprep.transforms.mixtures import expand_mixture  # noqa: E402

VLAPREP = os.path.join(os.path.dirname(sys.executable), "vlaprep")


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixture", default="oxe_magic_soup_plus")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    expansion = expand_mixture(args.mixture)
    root = args.workdir or tempfile.mkdtemp(prefix="oxe-mixture-")
    data_dir = os.path.join(root, "data")
    versions = {}
    for name in expansion.names:
        existing = os.path.join(data_dir, name)
        if os.path.isdir(existing):
            versions[name] = os.path.join(existing, sorted(os.listdir(existing))[-1])
        else:
            versions[name] = str(generate_layout_rlds(data_dir, name, episodes=args.episodes, image_size=8,
                                                      max_steps=args.max_steps))
    out = os.path.join(root, "out")
    mixture_cmd = [VLAPREP, "stats", "--mixture", args.mixture, "--data-dir", data_dir, "--output",
                   os.path.join(out, "mixture"), "--proprio", "--force"]
    mixture_times, single_times = [], []
    for _ in range(args.reps):
        mixture_times.append(timed(mixture_cmd))
        single_times.append(sum(
            timed([VLAPREP, "stats", "--dataset", f"{name}={path}", "--output", os.path.join(out, name), "--proprio", "--force"])
            for name, path in versions.items()
        ))
    shutil.rmtree(out, ignore_errors=True)
    n = len(versions)
    m, s = statistics.median(mixture_times), statistics.median(single_times)
    print(f"mixture {args.mixture}: {n} datasets, {args.episodes} episodes each (generated in {root})")
    print(f"one --mixture run: {m:.1f} s; {n} single-dataset runs: {s:.1f} s (medians of {args.reps})")
    print(f"ratio {m / s:.3f}; start-up saved per dataset: {(s - m) / max(1, n - 1):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
