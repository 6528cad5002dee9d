"""Loader throughput by pixel dtype and history, steady state (second pass over the same shards).

  python benchmarks/loader_benchmark.py SHARDS_DIR [--workers 2] [--batch-size 32]

Each configuration iterates the train split twice in one process with a fresh DataLoader each time
(2 worker processes); the first pass warms the page cache and imports, the second is reported.
"""

import argparse
import time

import torch
from torch.utils.data import DataLoader

from vlaprep.loader import ShardDataset, collate_vla


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dtype in ("float32", "uint8"):
        rates = {}
        for history in (1, 2):
            ds = ShardDataset(args.shards, split="train", seed=0, history=history, pixel_dtype=dtype)
            for _ in range(2):
                start, n = time.perf_counter(), 0
                for batch in DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_vla):
                    n += batch["input_ids"].shape[0]
                rates[history] = n / (time.perf_counter() - start)
            print(f"pixel_dtype={dtype:7} history={history}: {rates[history]:7.0f} samples/s")
        print(f"pixel_dtype={dtype:7} history 2 vs 1: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
