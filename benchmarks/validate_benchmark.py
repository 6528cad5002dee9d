"""Benchmark `vlaprep validate` model throughput on an OpenVLA checkpoint: batch 1 vs batch 8 / 32, same checkpoint.

Builds (offline) a small checkpoint with OpenVLA's own HF classes (``vlaprep.synthetic.openvla``: fused
DINOv2-reg4 + SigLIP-style timm towers at 224 px -> 256 patches per row as openvla-7b, a Llama text model
``--hidden`` x ``--layers``), hand-written held-out shards of ``--rows`` rows (5 instructions of different
lengths, 40x40 PNGs, chunk 1: 7 new ids per row), then runs ``run_validate`` in-process (FnApiRunner, one
worker, CPU, fp32) once per batch size, ``--reps`` times, alternating. Reported per run:

  samples/s      rows / time inside RunInference (preprocessing + vision + generate; the report's figure)
  generate s     time inside the language model's generate (+ vision backbone and projector)
  wall s         the whole validate call (Beam start-up, reading the shards, round-trip metrics, writing)

and the median and best samples/s per batch size with their ratio to batch 1 (best: the run least
disturbed by other processes on a shared machine). Every run's predictions.jsonl must be
identical (batching changes speed, not ids); the script stops otherwise.

  python benchmarks/validate_benchmark.py [--rows 64] [--batches 1,8,32] [--reps 2] [--hidden 256] [--layers 4]
      [--threads N] [--out benchmarks/results_validate_2core.txt]

Needs OpenVLA's three HF files (``../shared/reference/openvla_hf`` or ``--code``) and timm + torchvision
(``vlaprep.synthetic.openvla.prepare_openvla_imports``: the ``<venv>/openvla-deps`` side directory). The
machine is shared: the load average before and after is recorded with the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "pipelines", "validate"))  # the tests' shard writer (conftest.write_shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, 2 here)")
    parser.add_argument("--code", default=os.path.join(os.path.dirname(REPO), "shared", "reference", "openvla_hf"))
    parser.add_argument("--out", default=os.path.join(HERE, "results_validate_2core.txt"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from vlaprep.synthetic.openvla import build_tiny_openvla, prepare_openvla_imports, register_tiny_timm_models

    deps = prepare_openvla_imports()
    register_tiny_timm_models()
    import numpy as np
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    import conftest as shards_helpers  # tests/pipelines/validate/conftest.py (plain functions)
    from vlaprep.pipelines.validate.job import run_validate
    from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

    load_before = os.getloadavg()
    work = tempfile.mkdtemp(prefix="vlaprep-validate-bench-")
    tokenizer = build_llama_like_tokenizer(os.path.join(work, "tokenizer"))
    steps = max(1, args.rows // 8)
    episodes, actions = shards_helpers.bridge_like_episodes(np.random.default_rng(0), episodes=(args.rows + steps - 1) // steps, steps=steps)
    stats = {"bridge_orig": shards_helpers.statistics_entry(actions, [True] * 6 + [False])}
    stats_path = shards_helpers.write_shards(os.path.join(work, "shards"), episodes, stats, tokenizer)
    model_dir = os.path.join(work, "openvla")
    t0 = time.perf_counter()
    model = build_tiny_openvla(model_dir, os.path.join(work, "tokenizer"), args.code, image_size=args.image_size,
                               hidden=args.hidden, layers=args.layers, heads=max(4, args.hidden // 64),
                               norm_stats={"bridge_orig": {"action": stats["bridge_orig"]["action"]}})
    params = sum(p.numel() for p in model.parameters())
    patches = (args.image_size // 14) ** 2  # patch 14; fused towers concatenate features, not tokens
    del model
    build_seconds = time.perf_counter() - t0
    rows = len(actions)

    results, reference = [], None
    for rep in range(args.reps):
        for batch in batches:
            out = os.path.join(work, f"val-b{batch}-r{rep}")
            t0 = time.perf_counter()
            report = run_validate(os.path.join(work, "shards"), model_dir, out, batch_size=batch, device="cpu",
                                  trust_remote_code=True, statistics=stats_path,
                                  beam_args=["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner"],
                                  log=lambda m: None).report
            wall = time.perf_counter() - t0
            with open(os.path.join(out, "predictions.jsonl")) as f:
                predictions = f.read()
            if reference is None:
                reference = predictions
            elif predictions != reference:
                raise SystemExit(f"batch {batch} (rep {rep}) predicted other ids than the first run: batching must not change ids")
            m = report["model"]
            results.append({"batch": batch, "rep": rep, "samples": m["samples"], "samples_per_second": m["samples_per_second"],
                            "seconds": m["seconds"], "generate_seconds": m["generate_seconds"], "wall": wall})
            print(f"batch {batch:>3} rep {rep}: {m['samples_per_second']:.2f} samples/s "
                  f"(run_inference {m['seconds']:.2f} s, generate {m['generate_seconds']:.2f} s, wall {wall:.2f} s)", flush=True)
    load_after = os.getloadavg()

    medians = {b: statistics.median(r["samples_per_second"] for r in results if r["batch"] == b) for b in batches}
    lines = [
        f"# vlaprep validate throughput, OpenVLA checkpoint (OpenVLA's own classes), CPU fp32 -- "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}",
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, timm {deps['timm']}, torchvision {deps['torchvision']} (ops shim {deps['shim']})",
        f"# load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (shared machine: other processes compete for the 2 cores)",
        f"# checkpoint: fused tiny DINOv2-reg4 + SigLIP towers at {args.image_size} px ({patches} patches per tower, "
        f"{patches} tokens per row), Llama {args.hidden} x {args.layers}, vocab 32064; {params / 1e6:.1f}M parameters; built in {build_seconds:.1f} s",
        f"# shards: {rows} held-out rows, 7 new ids per row (chunk 1), 5 instructions of different lengths (left padding)",
        f"# predictions.jsonl identical across all {len(results)} runs",
        f"{'batch':>5} {'rep':>3} {'samples':>7} {'samples/s':>9} {'infer s':>8} {'generate s':>10} {'wall s':>7}",
    ]
    for r in results:
        lines.append(f"{r['batch']:>5} {r['rep']:>3} {r['samples']:>7} {r['samples_per_second']:>9.2f} {r['seconds']:>8.2f} "
                     f"{r['generate_seconds']:>10.2f} {r['wall']:>7.2f}")
    best = {b: max(r["samples_per_second"] for r in results if r["batch"] == b) for b in batches}
    lines.append("# median samples/s: " + ", ".join(
        f"batch {b} {medians[b]:.2f} ({medians[b] / medians[batches[0]]:.2f}x batch {batches[0]})" for b in batches))
    lines.append("# best samples/s (least disturbed by other processes): " + ", ".join(
        f"batch {b} {best[b]:.2f} ({best[b] / best[batches[0]]:.2f}x batch {batches[0]})" for b in batches))
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
