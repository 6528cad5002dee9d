"""One statistics run over a whole OpenVLA mixture, each dataset synthetic in its real OXE layout.

For ``--mixture NAME`` (default ``oxe_magic_soup_plus``): expand it as OpenVLA does
(``vlaprep.transforms.mixtures.expand_mixture``: repeats and JOINT_POS datasets skipped), write every
dataset with ``vlaprep.synthetic.layouts.generate_layout_rlds`` under ``ROOT/<name>/1.0.0`` (the
``--data-dir`` layout OpenVLA reads), then run ``run_stats`` once over all of them and report wall times.
Datasets the sources cannot read yet are reported and left out (see ``--skip``).

Usage: ``python benchmarks/oxe_mixture_benchmark.py [--mixture NAME] [--episodes N] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats_job import run_stats  # noqa: E402
from vlaprep.synthetic.layouts import generate_layout_rlds  # noqa: E402
from vlaprep.transforms.mixtures import expand_mixture  # noqa: E402
from vlaprep.transforms.registry import REGISTRY  # noqa: E402

IN_PROCESS = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixture", default="oxe_magic_soup_plus")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--skip", default="kuka,bc_z", help="datasets to leave out (comma-separated)")
    parser.add_argument("--multi-process", action="store_true", help="Beam's default runner options instead of in-process")
    args = parser.parse_args(argv)

    expansion = expand_mixture(args.mixture)
    skip = {s for s in args.skip.split(",") if s}
    names = [n for n in expansion.names if n not in skip]
    for dataset, weight, reason in expansion.skipped:
        print(f"skipped by OpenVLA's rules: {dataset} ({weight}): {reason}")
    for dataset in sorted(set(expansion.names) & skip):
        print(f"skipped (--skip): {dataset}")
    root = args.workdir or tempfile.mkdtemp(prefix="oxe-mixture-")
    data_dir = os.path.join(root, "data")

    started = time.time()
    paths = {
        n: generate_layout_rlds(data_dir, n, episodes=args.episodes, image_size=8, max_steps=args.max_steps)
        for n in names
    }
    generated = time.time() - started

    started = time.time()
    inputs = [DatasetInput(n, str(paths[n]), REGISTRY[n]) for n in names]
    result = run_stats(inputs, os.path.join(root, "stats"), with_proprio=True,
                       beam_args=[] if args.multi_process else IN_PROCESS, log=lambda m: None)
    computed = time.time() - started
    transitions = sum(e["num_transitions"] for e in result.statistics.values())
    print(f"mixture {args.mixture}: {len(names)} datasets, {args.episodes} episodes each, {transitions} transitions")
    print(f"generate: {generated:.1f} s; one statistics run: {computed:.1f} s; quarantined: {len(result.quarantine)}")
    print(f"outputs in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
