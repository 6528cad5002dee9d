"""Loader throughput against the online reference-style pipeline, with a 3-dataset mixture, and from GCS.

    python benchmarks/loader_benchmark.py [--small 40] [--large 240] [--reps 7] [--data DIR] [--no-gcs]

In one run, on generated Bridge-like RLDS data (256x256 JPEG cameras; `vlaprep shards` at 224 px), as
whole processes, alternating (A B C D, B C D A, ...), medians of --reps after a warm-up round:

  online     the reference way to build the same samples per training step: tf.data over the builder,
             decode + lanczos3 resize + per-sample prompt tokenization (benchmarks/shards_benchmark.py)
  loader     ShardDataset(batch_size=32, pixel_dtype="uint8") in a DataLoader with 2 workers (batches
             assembled column-wise in the workers)                              -> target >= 5x online
  mixture    the same shards rewritten as 3 datasets (episodes dealt round-robin, each file written again
             by the shard writer), mixture="manifest"                           -> target >= 0.90x loader
  gcs        loader over the same shards uploaded to the local GCS emulator (pyarrow GcsFileSystem,
             each file hashed by streaming it once, then read with range requests)  -> vs loader;
             the emulator (a Python server that copies the whole object for every range request)
             runs on the same 2 cores, outside the measured process tree's CPU

Rates are marginal (extra items / extra wall between the two sizes), so each program's start-up
(imports, worker processes, tokenizer load) cancels; ratios are given of the median rates and as the
median (min..max) of the per-repeat ratios (each repeat runs every program once, back to back). CPU
per sample (user + sys of the process tree, marginal the same way) is printed too: on a busy machine
it moves less than wall time. The first line is the cost of ``verify_sha256``.

The emulator runs with a threaded HTTP server (``EMULATOR``): its own is single-threaded, and pyarrow's
GCS client opens a whole-object download that it does not drain before the next (range) request, so
that request waits behind a blocked response for any object larger than the socket buffers (a few MB)
and pyarrow gives up with DEADLINE_EXCEEDED -- what timed out on the 64 MB files before, not their size.
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
    """Rewrite a one-dataset shards output as 3 datasets (episode k -> bridge_{a,b,c}[k % 3]), each file
    written again by the shard writer itself (``write_shard_file``: rows sorted by (dataset, episode), its
    Parquet settings and row groups, each dataset's rows starting a new group); manifest, statistics copy
    and digests updated."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlaprep.pipelines.shards.write import write_shard_file

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
        bounds = [i for i in range(1, len(episodes)) if episodes[i] != episodes[i - 1]]
        items = [((entry["split"], order[episodes[a]], episodes[a]), table.slice(a, b - a).combine_chunks().to_batches()[0])
                 for a, b in zip([0] + bounds, bounds + [len(episodes)])]
        os.unlink(path)
        info = write_shard_file(dst, entry["split"], entry["shard_index"], entry["num_shards"], items, table.schema, len(items))
        assert info["path"] == entry["path"]
        entry.update({k: info[k] for k in ("bytes", "sha256", "row_groups", "datasets")})
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


# gcp-storage-emulator's server, threaded (see the module docstring).
EMULATOR = textwrap.dedent(
    """
    import http.server
    from gcp_storage_emulator import server
    from gcp_storage_emulator.__main__ import main
    server.server.HTTPServer = http.server.ThreadingHTTPServer
    main()
    """
)


def start_emulator(launcher: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([PY, launcher, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                             "--default-bucket=bench"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("gcp-storage-emulator did not start")


def marginal(items: dict, walls: dict, program: str) -> float:
    """Extra items / extra seconds from the small to the large size."""
    return (items["large"][program] - items["small"][program]) / (walls["large"][program] - walls["small"][program])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=40)
    parser.add_argument("--large", type=int, default=240)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--data", default=os.environ.get("VLAPREP_BENCH_DATA", "/tmp/vlaprep_bench"))
    parser.add_argument("--no-gcs", dest="gcs", action="store_false", help="leave out the GCS emulator")
    args = parser.parse_args()
    sizes = {"small": args.small, "large": args.large}
    dirs = {k: ensure_dataset(args.data, n) for k, n in sizes.items()}
    scratch = tempfile.mkdtemp(prefix="vlaprep-loader-bench-")
    emulator, host = start_emulator(_script(scratch, "emulator", EMULATOR)) if args.gcs else (None, "")
    if args.gcs:
        os.environ["STORAGE_EMULATOR_HOST"] = host
    programs = ("online", "loader", "mixture") + (("gcs",) if args.gcs else ())
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
            # Each repeat starts one program later: none always runs right after the memory-hungry online one.
            order = programs[rep % len(programs):] + programs[:rep % len(programs)]
            for size in sizes:
                for name in order:
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
                    print(f"  rep {rep} {size:5} {name:8} {m['wall']:7.2f} s wall {m['cpu']:7.2f} s cpu", flush=True)
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
    med_cpu = {k: {p: statistics.median(m["cpu"] for m in v) for p, v in r.items()} for k, r in runs.items()}
    med_rss = {k: {p: statistics.median(m["rss_mib"] for m in v) for p, v in r.items()} for k, r in runs.items()}
    rates = {p: marginal(items, med, p) for p in programs}
    cpu_per_item = {p: 1 / marginal(items, med_cpu, p) for p in programs}
    per_rep = [{p: marginal(items, {k: {q: runs[k][q][i]["wall"] for q in programs} for k in sizes}, p) for p in programs}
               for i in range(args.reps)]
    print(f"{'program':>8} {'size':>6} {'items':>6} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}   (medians of {args.reps})")
    for p in programs:
        for size in sizes:
            print(f"{p:>8} {sizes[size]:>6} {items[size][p]:>6} {med[size][p]:>8.2f} {med_cpu[size][p]:>8.2f} "
                  f"{med_rss[size][p]:>9.0f}")
    print("marginal (extra items / extra wall or cpu from small to large; start-up cancels):")
    for p in programs:
        print(f"  {p:>8}: {rates[p]:8.1f} samples/s   {1e3 * cpu_per_item[p]:6.3f} cpu ms/sample")

    def ratio(a: str, b: str, target: str) -> str:
        each = sorted(r[a] / r[b] for r in per_rep)
        return (f"{rates[a] / rates[b]:.2f}x of the medians; per repeat {statistics.median(each):.2f}x "
                f"({each[0]:.2f}..{each[-1]:.2f}); cpu per sample {cpu_per_item[b] / cpu_per_item[a]:.2f}x{target}")

    print(f"loader (uint8, batch-level) vs online: {ratio('loader', 'online', ' (target >= 5)')}")
    print(f"3-dataset mixture vs unmixed loader: {ratio('mixture', 'loader', ' (target >= 0.90)')}")
    if args.gcs:
        print(f"GCS emulator vs local files: {ratio('gcs', 'loader', '')}")


if __name__ == "__main__":
    main()
