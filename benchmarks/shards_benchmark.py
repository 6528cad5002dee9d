"""Benchmark `vlaprep shards` and the loader against the image floor and a reference-style online pipeline.

In one run, on generated Bridge-like RLDS data (two 256x256 JPEG cameras, primary used), as whole
processes, alternating, medians after a warm-up round:

  shards_c1     `vlaprep shards` (default options, 2 worker processes)            -> steps/s
  shards_c8     the same with --action-chunk 8                                    -> time vs shards_c1 (target <= 1.10x)
  image_floor   decode + lanczos3 resize of the same primary frames, nothing else, same 2 cores (two
                processes, half the shard files each)                               -> steps/s (target: shards >= 0.70x)
  online        the reference way to build the same samples per training step: tf.data over the builder,
                decode + lanczos3 resize + per-sample prompt tokenization            -> samples/s
  loader_h1     vlaprep.loader.ShardDataset over the written shards, DataLoader with 2 workers,
                PNG -> float tensor, collate                                         -> samples/s (target >= 5x online)
  loader_h2     the same with history=2                                             -> samples/s (target >= 0.7x loader_h1)

  python benchmarks/shards_benchmark.py [--small 100] [--large 300] [--reps 2] [--data DIR]

Rates are marginal (extra items / extra wall between the two sizes), so each program's start-up
(imports, worker processes, tokenizer load) cancels, as in the statistics benchmark.
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
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from stats_benchmark import ensure_dataset, measure  # noqa: E402

PY = sys.executable
VLAPREP = os.path.join(os.path.dirname(PY), "vlaprep")

IMAGE_FLOOR = textwrap.dedent(
    """
    import os, sys, glob
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    from vlaprep.pipelines.sources.rlds import rlds_parser
    from vlaprep.pipelines.sources.tfrecord import iter_tfrecord_file
    version_dir, part, parts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    files = sorted(glob.glob(os.path.join(version_dir, "*.tfrecord-*")))[part::parts]
    parser = rlds_parser(version_dir, ["observation/image_0"])
    n = 0
    for f in files:
        for record in iter_tfrecord_file(f):
            frames = [tf.io.decode_image(b, channels=3, expand_animations=False) for b in parser.parse(record)["observation/image_0"]]
            if frames:
                out = tf.image.resize(tf.stack(frames), (224, 224), method="lanczos3", antialias=True)
                tf.saturate_cast(tf.round(out), tf.uint8).numpy()
                n += len(frames)
    print(n)
    """
)

ONLINE = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np, tensorflow as tf, tensorflow_datasets as tfds
    from transformers import AutoTokenizer
    version_dir, tokenizer_dir, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    builder = tfds.builder_from_directory(version_dir)
    ds = builder.as_dataset(split="train", decoders={"steps": tfds.decode.SkipDecoding()})
    def steps(ep):
        s = ep["steps"]
        return tf.data.Dataset.from_tensor_slices({"image": s["observation"]["image_0"], "action": s["action"],
                                                   "lang": s["language_instruction"]})
    def frame(x):
        img = tf.io.decode_image(x["image"], channels=3, expand_animations=False)
        img = tf.image.resize(img, (224, 224), method="lanczos3", antialias=True)
        return {"image": tf.saturate_cast(tf.round(img), tf.uint8), "action": x["action"], "lang": x["lang"]}
    ds = ds.flat_map(steps).map(frame, num_parallel_calls=tf.data.AUTOTUNE).prefetch(64)
    bins = np.linspace(-1, 1, 256)
    n = 0
    for x in ds.as_numpy_iterator():   # per-sample tokenization, as RLDSBatchTransform does
        ids = 32000 - np.digitize(np.clip(x["action"], -1, 1), bins)
        text = "In: What action should the robot take to " + x["lang"].decode().lower() + "?\\nOut: " + tok.decode(ids) + "</s>"
        tok(text, add_special_tokens=True)
        n += 1
        if n >= limit:
            break
    print(n)
    """
)

LOADER = textwrap.dedent(
    """
    import sys, torch
    from torch.utils.data import DataLoader
    from vlaprep.loader import ShardDataset, collate_vla
    root, history, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    ds = ShardDataset(root, split="train", seed=0, history=history)
    n = 0
    for batch in DataLoader(ds, batch_size=32, num_workers=2, collate_fn=collate_vla):
        n += batch["input_ids"].shape[0]
        if n >= limit:
            break
    print(n)
    """
)


def _script(scratch: str, name: str, text: str) -> str:
    path = os.path.join(scratch, f"{name}.py")
    with open(path, "w") as f:
        f.write(text)
    return path


def _floor_cmd(scratch: str, version_dir: str) -> list[str]:
    """Two processes in parallel (the 2 cores), as one whole command."""
    script = _script(scratch, "image_floor", IMAGE_FLOOR)
    return ["bash", "-c", f"'{PY}' '{script}' '{version_dir}' 0 2 & '{PY}' '{script}' '{version_dir}' 1 2 & wait"]


def _count_frames(version_dir: str, split: str | None = None) -> int:
    import glob

    from vlaprep.pipelines.sources.rlds import rlds_parser
    from vlaprep.pipelines.sources.tfrecord import iter_tfrecord_file

    parser = rlds_parser(version_dir, ["action"])
    pattern = f"*-{split}.tfrecord-*" if split else "*.tfrecord-*"
    return sum(len(parser.parse(r)["action"]) for f in glob.glob(os.path.join(version_dir, pattern)) for r in iter_tfrecord_file(f))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=300)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--data", default=os.environ.get("VLAPREP_BENCH_DATA", "/tmp/vlaprep_bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sizes = {"small": args.small, "large": args.large}
    dirs = {k: ensure_dataset(args.data, n) for k, n in sizes.items()}
    scratch = tempfile.mkdtemp(prefix="vlaprep-shards-bench-")
    programs = ("shards_c1", "shards_c8", "image_floor", "online", "loader_h1", "loader_h2")
    runs = {k: {p: [] for p in programs} for k in sizes}
    items = {k: {} for k in sizes}
    try:
        from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

        tok_dir = os.path.join(scratch, "tok")
        build_llama_like_tokenizer(tok_dir)
        stats_files, shard_dirs = {}, {}
        for size, version_dir in dirs.items():
            out = os.path.join(scratch, f"stats_{size}")
            subprocess.run([VLAPREP, "stats", "--dataset", f"bridge_orig={version_dir}", "--output", out], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stats_files[size] = os.path.join(out, "dataset_statistics.json")
            shard_dirs[size] = os.path.join(scratch, f"shards_{size}")

        def shards_cmd(size: str, chunk: int, out: str) -> list[str]:
            return [VLAPREP, "shards", "--dataset", f"bridge_orig={dirs[size]}", "--statistics", stats_files[size],
                    "--tokenizer", tok_dir, "--output", out, "--action-chunk", str(chunk)]

        for rep in range(args.reps + 1):  # round 0 is the warm-up, discarded (it also writes the loader's input)
            for size in sizes:
                for name in programs:
                    if name.startswith("shards"):
                        out = os.path.join(scratch, f"{name}_{size}_{rep}")
                        m = measure(shards_cmd(size, 1 if name == "shards_c1" else 8, out))
                        if name == "shards_c1" and rep == 0:
                            shutil.copytree(out, shard_dirs[size])
                        shutil.rmtree(out, ignore_errors=True)
                    elif name == "image_floor":
                        m = measure(_floor_cmd(scratch, dirs[size]))
                    elif name == "online":
                        m = measure([PY, _script(scratch, "online", ONLINE), dirs[size], tok_dir, "100000000"])
                    else:
                        history = 1 if name == "loader_h1" else 2
                        m = measure([PY, _script(scratch, "loader", LOADER), shard_dirs[size], str(history), "100000000"])
                    if rep:
                        runs[size][name].append(m)
        for size in sizes:
            with open(os.path.join(shard_dirs[size], "manifest.json")) as f:
                manifest = json.load(f)
            rows = manifest["splits"]["train"]["rows"] + manifest["splits"]["heldout"]["rows"]
            items[size] = {
                "shards_c1": rows, "shards_c8": rows,
                "image_floor": _count_frames(dirs[size]),          # the floor decodes every source frame
                "online": _count_frames(dirs[size], "train"),     # the online pipeline walks the train split
                "loader_h1": manifest["splits"]["train"]["rows"], "loader_h2": manifest["splits"]["train"]["rows"],
            }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: {p: {q: statistics.median(m[q] for m in v) for q in ("wall", "cpu", "rss_mib")} for p, v in r.items()} for k, r in runs.items()}
    marginal = {p: (items["large"][p] - items["small"][p]) / (med["large"][p]["wall"] - med["small"][p]["wall"]) for p in programs}
    print(f"{'program':>12} {'size':>6} {'items':>6} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}")
    for p in programs:
        for size in sizes:
            m = med[size][p]
            print(f"{p:>12} {sizes[size]:>6} {items[size][p]:>6} {m['wall']:>8.2f} {m['cpu']:>8.2f} {m['rss_mib']:>9.0f}")
    print("marginal rates (extra items / extra wall from small to large; start-up cancels):")
    for p in programs:
        print(f"  {p:>12}: {marginal[p]:8.1f} items/s")
    print(f"shards vs image floor (steps/s): {marginal['shards_c1'] / marginal['image_floor']:.2f}x (target >= 0.70)")
    c8 = (med["large"]["shards_c8"]["wall"] - med["small"]["shards_c8"]["wall"]) / (med["large"]["shards_c1"]["wall"] - med["small"]["shards_c1"]["wall"])
    print(f"--action-chunk 8 time vs 1: marginal {c8:.3f}x, whole process {med['large']['shards_c8']['wall'] / med['large']['shards_c1']['wall']:.3f}x (target <= 1.10)")
    print(f"loader vs online baseline (samples/s): {marginal['loader_h1'] / marginal['online']:.1f}x (target >= 5)")
    print(f"loader history=2 vs 1: {marginal['loader_h2'] / marginal['loader_h1']:.2f}x (target >= 0.70)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians": med, "items": items, "marginal": marginal, "sizes": sizes}, f, indent=2)


if __name__ == "__main__":
    main()
