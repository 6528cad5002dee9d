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

  python benchmarks/shards_benchmark.py [--episodes 250] [--reps 3] [--data DIR]
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
    from vlaprep.pipelines.sources import RLDSParser, iter_tfrecord_file
    version_dir, part, parts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    files = sorted(glob.glob(os.path.join(version_dir, "*.tfrecord-*")))[part::parts]
    parser = RLDSParser(version_dir, ["observation/image_0"])
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=250)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", default=os.environ.get("VLAPREP_BENCH_DATA", "/tmp/vlaprep_bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    version_dir = ensure_dataset(args.data, args.episodes)
    scratch = tempfile.mkdtemp(prefix="vlaprep-shards-bench-")
    try:
        from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

        tok_dir = os.path.join(scratch, "tok")
        build_llama_like_tokenizer(tok_dir)
        stats_dir = os.path.join(scratch, "stats")
        subprocess.run([VLAPREP, "stats", "--dataset", f"bridge_orig={version_dir}", "--output", stats_dir], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        statistics_file = os.path.join(stats_dir, "dataset_statistics.json")

        def shards_cmd(chunk: int, out: str) -> list[str]:
            return [VLAPREP, "shards", "--dataset", f"bridge_orig={version_dir}", "--statistics", statistics_file,
                    "--tokenizer", tok_dir, "--output", out, "--action-chunk", str(chunk)]

        shards_out = os.path.join(scratch, "shards_c1")
        runs: dict[str, list] = {k: [] for k in ("shards_c1", "shards_c8", "image_floor", "online", "loader_h1", "loader_h2")}
        online_limit = 1500
        for rep in range(args.reps + 1):
            for name in runs:
                if name.startswith("shards"):
                    out = os.path.join(scratch, f"{name}_{rep}")
                    m = measure(shards_cmd(1 if name == "shards_c1" else 8, out))
                    if name == "shards_c1" and rep == 0:
                        shutil.copytree(out, shards_out)
                    shutil.rmtree(out, ignore_errors=True)
                elif name == "image_floor":
                    m = measure(_floor_cmd(scratch, version_dir))
                elif name == "online":
                    m = measure([PY, _script(scratch, "online", ONLINE), version_dir, tok_dir, str(online_limit)])
                else:
                    history = 1 if name == "loader_h1" else 2
                    m = measure([PY, _script(scratch, "loader", LOADER), shards_out, str(history), "100000000"])
                if rep:
                    runs[name].append(m)
        with open(os.path.join(shards_out, "manifest.json")) as f:
            manifest = json.load(f)
        rows = manifest["splits"]["train"]["rows"] + manifest["splits"]["heldout"]["rows"]
        train_rows = manifest["splits"]["train"]["rows"]
        # the floor decodes every step of every source episode (quarantined ones too)
        import glob

        from vlaprep.pipelines.sources import RLDSParser, iter_tfrecord_file

        p = RLDSParser(version_dir, ["action"])
        frames = sum(len(p.parse(r)["action"]) for f in glob.glob(os.path.join(version_dir, "*.tfrecord-*")) for r in iter_tfrecord_file(f))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: {q: statistics.median(m[q] for m in v) for q in ("wall", "cpu", "rss_mib")} for k, v in runs.items()}
    rate = {
        "shards_c1": rows / med["shards_c1"]["wall"],
        "shards_c8": rows / med["shards_c8"]["wall"],
        "image_floor": frames / med["image_floor"]["wall"],
        "online": online_limit / med["online"]["wall"],
        "loader_h1": train_rows / med["loader_h1"]["wall"],
        "loader_h2": train_rows / med["loader_h2"]["wall"],
    }
    print(f"{'program':>12} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9} {'items/s':>9}")
    for k in runs:
        print(f"{k:>12} {med[k]['wall']:>8.2f} {med[k]['cpu']:>8.2f} {med[k]['rss_mib']:>9.0f} {rate[k]:>9.1f}")
    print(f"rows written {rows} (train {train_rows}); frames in the source {frames}")
    print(f"shards vs image floor (steps/s): {rate['shards_c1'] / rate['image_floor']:.2f}x (target >= 0.70)")
    print(f"--action-chunk 8 time vs 1: {med['shards_c8']['wall'] / med['shards_c1']['wall']:.3f}x (target <= 1.10)")
    print(f"loader vs online baseline (samples/s): {rate['loader_h1'] / rate['online']:.1f}x (target >= 5)")
    print(f"loader history=2 vs 1: {rate['loader_h2'] / rate['loader_h1']:.2f}x (target >= 0.70)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians": med, "rates": rate, "rows": rows, "frames": frames}, f, indent=2)


if __name__ == "__main__":
    main()
