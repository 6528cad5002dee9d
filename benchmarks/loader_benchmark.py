"""Loader throughput against the online reference-style pipeline, with a 3-dataset mixture, and from GCS.

    python benchmarks/loader_benchmark.py [--small 40] [--large 120] [--reps 2] [--data DIR]

In one run, on generated Bridge-like RLDS data (256x256 JPEG cameras; `vlaprep shards` at 224 px), as
whole processes, alternating (A B C D A B C D ...), medians of --reps after a warm-up round:

  online     the reference way to build the same samples per training step: tf.data over the builder,
             decode + lanczos3 resize + per-sample prompt tokenization (benchmarks/shards_benchmark.py)
  loader     ShardDataset(batch_size=32, pixel_dtype="uint8") in a DataLoader with 2 workers (batches
             assembled column-wise in the workers)                              -> target >= 5x online
  mixture    the same shards rewritten as 3 datasets (episodes dealt round-robin), mixture="manifest"
                                                                                -> target >= 0.90x loader
  gcs        loader over the same shards uploaded to the local GCS emulator (pyarrow GcsFileSystem,
             each file hashed by streaming it once, then read with range requests)  -> vs loader

Rates are marginal (extra items / extra wall between the two sizes), so each program's start-up
(imports, worker processes, tokenizer load) cancels. The first line is the cost of ``verify_sha256``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from shards_benchmark import ONLINE, _count_frames, _script  # noqa: E402
from stats_benchmark import ensure_dataset, measure  # noqa: E402

PY = sys.executable
VLAPREP = os.path.join(os.path.dirname(PY), "vlaprep")

LOADER = textwrap.dedent(
    """
    import sys, torch
    from torch.utils.data import DataLoader
    from vlaprep.loader import ShardDataset
    root, mixture = sys.argv[1], (None if sys.argv[2] == "none" else sys.argv[2])
    torch.set_num_threads(1)
    ds = ShardDataset(root, split="train", seed=0, pixel_dtype="uint8", batch_size=32, mixture=mixture)
    n = 0
    for batch in DataLoader(ds, batch_size=None, num_workers=2):
        n += batch["input_ids"].shape[0]
    print(n)
    """
)


def hash_cost(shards: str) -> str:
    from vlaprep import loader
    from vlaprep.loader import ShardDataset

    ds = ShardDataset(shards, split="train", shuffle=False, verify_sha256=False, pixel_dtype="uint8", batch_size=32)
    files = [os.path.join(shards, f.path) for f in ds.files]
    size = sum(os.path.getsize(f) for f in files)
    import pyarrow.fs as pafs

    for f in files:
        loader.sha256_file(pafs.LocalFileSystem(), f)  # warm the page cache
    start = time.perf_counter()
    for f in files:
        loader.sha256_file(pafs.LocalFileSystem(), f)
    hashing = time.perf_counter() - start
    start = time.perf_counter()
    n = sum(b["input_ids"].shape[0] for b in ds)
    epoch = time.perf_counter() - start
    return (f"sha256 of {len(files)} train files ({size / 1e6:.0f} MB): {hashing:.3f} s; one epoch in one process "
            f"(no workers): {epoch:.2f} s ({n} samples); hashing = {100 * hashing / epoch:.1f}% of an epoch")


def as_three_datasets(src: str, dst: str) -> None:
    """Rewrite a one-dataset shards output as 3 datasets (episode k -> bridge_{a,b,c}[k % 3]): rows sorted by
    (dataset, episode) per file as the writer sorts them; manifest, statistics copy and digests updated."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "manifest.json")) as f:
        manifest = json.load(f)
    (old,) = manifest["datasets"]
    names = [f"bridge_{c}" for c in "abc"]
    order = {}
    totals = {n: {s: {"episodes": 0, "rows": 0} for s in ("train", "heldout")} for n in names}
    for entry in manifest["files"]:
        path = os.path.join(dst, entry["path"])
        table = pq.read_table(path)
        episodes = table["episode_id"].to_pylist()
        for e in episodes:
            order.setdefault(e, names[len(order) % 3])
        table = table.set_column(table.schema.get_field_index("dataset_name"), "dataset_name",
                                 pa.array([order[e] for e in episodes], pa.string()))
        idx = pc.sort_indices(table, sort_keys=[("dataset_name", "ascending"), ("episode_id", "ascending"), ("step_index", "ascending")])
        table = table.take(idx)
        meta = pq.read_metadata(path)
        pq.write_table(table, path, row_group_size=meta.row_group(0).num_rows, compression="zstd")
        with open(path, "rb") as f:
            data = f.read()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        entry["row_groups"] = pq.read_metadata(path).num_row_groups
        counts = {}
        for n, e in zip(table["dataset_name"].to_pylist(), table["episode_id"].to_pylist()):
            c = counts.setdefault(n, [set(), 0])
            c[0].add(e)
            c[1] += 1
        entry["datasets"] = {n: {"episodes": len(c[0]), "rows": c[1]} for n, c in sorted(counts.items())}
        for n, c in entry["datasets"].items():
            totals[n][entry["split"]]["episodes"] += c["episodes"]
            totals[n][entry["split"]]["rows"] += c["rows"]
    stats_path = os.path.join(dst, "inputs", "dataset_statistics.json")
    with open(stats_path) as f:
        stats = json.load(f)
    block = stats.pop(old)
    for n in names:
        stats[n] = {**block, "num_transitions": totals[n]["train"]["rows"] + totals[n]["heldout"]["rows"]}
    data = json.dumps(stats, indent=2).encode()
    with open(stats_path, "wb") as f:
        f.write(data)
    manifest["inputs"]["statistics"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest["inputs"]["datasets"] = {n: manifest["inputs"]["datasets"][old] for n in names}
    manifest["datasets"] = totals
    manifest["accounting"] = {n: {"read": t["train"]["episodes"] + t["heldout"]["episodes"], "train": t["train"]["episodes"],
                                  "heldout": t["heldout"]["episodes"], "quarantined": 0, "quarantined_by_stage": {}}
                              for n, t in totals.items()}  # (the quarantine file keeps the old name)
    manifest.pop("mixture", None)  # "manifest" then means weight 1.0 each, num_transitions from the statistics
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


def start_emulator() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([PY, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                             "--default-bucket=bench"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("gcp-storage-emulator did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=40)
    parser.add_argument("--large", type=int, default=120)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--data", default=os.environ.get("VLAPREP_BENCH_DATA", "/tmp/vlaprep_bench"))
    parser.add_argument("--gcs", action="store_true",
                        help="also time the GCS emulator (gcp-storage-emulator serves ~64 MB objects too slowly for "
                             "pyarrow's read deadline on 2 cores: DEADLINE_EXCEEDED; use small --target-shard-mb data)")
    args = parser.parse_args()
    sizes = {"small": args.small, "large": args.large}
    dirs = {k: ensure_dataset(args.data, n) for k, n in sizes.items()}
    scratch = tempfile.mkdtemp(prefix="vlaprep-loader-bench-")
    emulator, host = start_emulator() if args.gcs else (None, "")
    if args.gcs:
        os.environ["STORAGE_EMULATOR_HOST"] = host
    programs = ("online", "loader", "mixture", "gcs") if args.gcs else ("online", "loader", "mixture")
    runs = {k: {p: [] for p in programs} for k in sizes}
    items = {k: {} for k in sizes}
    try:
        import pyarrow.fs as pafs

        from vlaprep.loader import _gcs_filesystem
        from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

        tok = os.path.join(scratch, "tok")
        build_llama_like_tokenizer(tok)
        shards, mixed, remote = {}, {}, {}
        for size, version_dir in dirs.items():
            stats = os.path.join(scratch, f"stats_{size}")
            subprocess.run([VLAPREP, "stats", "--dataset", f"bridge_orig={version_dir}", "--output", stats], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shards[size] = os.path.join(scratch, f"shards_{size}")
            subprocess.run([VLAPREP, "shards", "--dataset", f"bridge_orig={version_dir}", "--statistics",
                            os.path.join(stats, "dataset_statistics.json"), "--tokenizer", tok, "--output", shards[size]],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            mixed[size] = os.path.join(scratch, f"mixed_{size}")
            as_three_datasets(shards[size], mixed[size])
            remote[size] = f"gs://bench/{size}"
            if args.gcs:
                pafs.copy_files(shards[size], f"bench/{size}", destination_filesystem=_gcs_filesystem())
        with open(os.path.join(shards["large"], "manifest.json")) as f:
            print(f"large: {json.load(f)['splits']['train']['rows']} train rows; " + hash_cost(shards["large"]), flush=True)
        script = _script(scratch, "loader", LOADER)
        online = _script(scratch, "online", ONLINE)
        for rep in range(args.reps + 1):
            for size in sizes:
                for name in programs:
                    if name == "online":
                        m = measure([PY, online, dirs[size], tok, "100000000"])
                    elif name == "loader":
                        m = measure([PY, script, shards[size], "none"])
                    elif name == "mixture":
                        m = measure([PY, script, mixed[size], "manifest"])
                    else:
                        m = measure([PY, script, remote[size], "none"])
                    if rep:
                        runs[size][name].append(m)
                    print(f"  rep {rep} {size:5} {name:8} {m['wall']:7.2f} s", flush=True)
        for size in sizes:
            from vlaprep.loader import ShardDataset

            rows = ShardDataset(shards[size], verify_sha256=False).worker_lengths(0)[0]
            mix_rows = ShardDataset(mixed[size], verify_sha256=False, mixture="manifest").mixture.epoch_length
            items[size] = {"online": _count_frames(dirs[size], "train"), "loader": rows, "mixture": mix_rows, "gcs": rows}
    finally:
        if emulator is not None:
            emulator.terminate()
            emulator.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: {p: statistics.median(m["wall"] for m in v) for p, v in r.items()} for k, r in runs.items()}
    marginal = {p: (items["large"][p] - items["small"][p]) / (med["large"][p] - med["small"][p]) for p in programs}
    print(f"{'program':>8} {'size':>6} {'items':>6} {'wall s':>8}")
    for p in programs:
        for size in sizes:
            print(f"{p:>8} {sizes[size]:>6} {items[size][p]:>6} {med[size][p]:>8.2f}")
    print("marginal rates (extra items / extra wall from small to large; start-up cancels):")
    for p in programs:
        print(f"  {p:>8}: {marginal[p]:8.1f} samples/s")
    print(f"loader (uint8, batch-level) vs online: {marginal['loader'] / marginal['online']:.2f}x (target >= 5)")
    print(f"3-dataset mixture vs unmixed loader: {marginal['mixture'] / marginal['loader']:.2f}x (target >= 0.90)")
    if args.gcs:
        print(f"GCS emulator vs local files: {marginal['gcs'] / marginal['loader']:.2f}x")


if __name__ == "__main__":
    main()
