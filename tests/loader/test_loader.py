"""ShardDataset / collate_vla over small shard directories written here with pyarrow.

Every image is a uniform 8x8 PNG whose channels encode (episode, step, camera), so a test can tell which
frame came back. Actions encode (episode, step) the same way.
"""

import collections
import functools
import importlib.util
import io
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlaprep import loader
from vlaprep.loader import ShardDataset, ShardSlice, collate_vla, load_manifest
from vlaprep.schemas.shards import LABEL_IGNORE, shard_schema

_spec = importlib.util.spec_from_file_location("manifest_helpers", pathlib.Path(__file__).parents[1] / "manifest_helpers.py")
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)

D, N, P, S = 3, 2, 2, 8  # action width, chunk, proprio width, image size
LOADER_OPTIONS = {"action_dim": D, "vocab_size": 32000, "tokenization": "ids_direct"}  # the manifest's, for these toy rows
PRIMARY, WRIST = 11, 22  # blue channel of each camera's frames
ACTION_BASE = 31744

# Files of (episode, length); episodes of length 1 included, several spanning row groups.
MANY_FILES = [[(0, 3), (1, 1)], [(2, 5)], [(3, 2), (4, 4)], [(5, 1)], [(6, 6), (7, 2)]]
FEW_FILES = [[(0, 3), (1, 1), (2, 5), (3, 2)], [(4, 4), (5, 1), (6, 6), (7, 2), (8, 7)]]
ONE_FILE = [[(0, 3), (1, 1), (2, 5), (3, 2), (4, 4), (5, 1), (6, 6), (7, 2)]]


# --------------------------------------------------------------------------------------------------
# Writing toy shards


def png(episode: int, step: int, camera: int) -> bytes:
    arr = np.empty((S, S, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = episode, step, camera
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def frame_id(pixels: torch.Tensor) -> tuple[int, int, int]:
    """(episode, step, camera) of one float frame [3, S, S] in [0, 1]; checks the frame is uniform."""
    values = torch.round(pixels * 255).to(torch.int64)
    assert torch.equal(values, values[:, :1, :1].expand_as(values))
    return tuple(int(v) for v in values[:, 0, 0])


def episode_id(episode: int) -> str:
    return f"ep{episode:03d}"


def action_ids(episode: int, step: int, length: int) -> list[int]:
    return [
        ACTION_BASE + (episode * 7 + min(step + i, length - 1) * 3 + j) % 256 for i in range(N) for j in range(D)
    ]


def rows_table(rows, *, wrist=True, proprio=True) -> pa.Table:
    """rows: (episode, step, num_steps) -> a table of shard_schema(D, N, P, wrist)."""
    cols = collections.defaultdict(list)
    for ep, t, length, *dataset in rows:
        ids = action_ids(ep, t, length)
        prefix = [1] + [10 + ep] * (1 + (ep + t) % 3)
        chunk_steps = [min(t + i, length - 1) for i in range(N)]
        cols["dataset_name"].append(dataset[0] if dataset else "toy")
        cols["episode_id"].append(episode_id(ep))
        cols["step_index"].append(t)
        cols["num_steps"].append(length)
        cols["instruction"].append(f"Pick Up Block {ep}")
        cols["input_ids"].append(prefix + ids + [2])
        cols["labels"].append([LABEL_IGNORE] * len(prefix) + ids + [2])
        cols["action_token_ids"].append(ids)
        cols["action"].append([ep, t, 0.25])
        cols["normalized_action"].append([ep / 10, t / 10, -0.5])
        cols["action_chunk"].append([v for s in chunk_steps for v in (ep, s, 0.25)])
        cols["action_chunk_mask"].append([t + i < length for i in range(N)])
        cols["normalized_action_chunk"].append([v for s in chunk_steps for v in (ep / 10, s / 10, -0.5)])
        cols["image_primary"].append(png(ep, t, PRIMARY))
        if wrist:
            cols["image_wrist"].append(png(ep, t, WRIST))
        if proprio:
            cols["proprio"].append([ep, t])
    return pa.Table.from_pydict(dict(cols), schema=shard_schema(D, N, P if proprio else 0, wrist))


def episode_rows(episodes):
    return [(ep, t, length) for ep, length in episodes for t in range(length)]


def write_shards(root, files, *, split="train", row_group_size=3, manifest=True, wrist=True, proprio=True,
                 options=None, rows_override=None, mixture=None, num_transitions=None):
    """Write ``root/split/shard-i-of-k.parquet`` (+ manifest.json) -> every (episode_id, step) in file order.

    Rows may name their dataset as a 4th field (default "toy"); a file's rows must then be sorted by
    dataset, as the shard writer sorts them."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    keys = []
    for i, episodes in enumerate(files):
        rel = f"{split}/shard-{i:05d}-of-{len(files):05d}.parquet"
        rows = episodes if rows_override else episode_rows(episodes)
        pq.write_table(rows_table(rows, wrist=wrist, proprio=proprio), os.path.join(root, rel), row_group_size=row_group_size)
        keys += [(episode_id(r[0]), r[1]) for r in rows]
    if manifest:
        opts = {"action_chunk": N, "image_size": S, "cameras": ["primary", "wrist"] if wrist else ["primary"],
                "normalization": "bounds_q99", "action_encoding": "uniform"}
        opts.update(options or {})
        helper.write_manifest(root, options={**LOADER_OPTIONS, **opts}, mixture=mixture, num_transitions=num_transitions)
    return keys


def read_manifest_json(root):
    with open(os.path.join(root, "manifest.json")) as f:
        return json.load(f)


def write_manifest_json(root, doc):
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(doc, f)


def window(step: int, history: int) -> tuple[list[int], list[bool]]:
    """Expected frame steps and mask of the history window ending at ``step`` (first frame repeated)."""
    steps = [step - history + 1 + k for k in range(history)]
    return [max(s, 0) for s in steps], [s >= 0 for s in steps]


def check_item(item, history):
    """Every field of one (uncollated) item agrees with the (episode, step) it claims to be."""
    ep, t, length = int(item["episode_id"][2:]), int(item["step_index"]), int(item["num_steps"])
    ids = action_ids(ep, t, length)
    assert item["input_ids"].dtype == torch.int64 and item["labels"].dtype == torch.int64
    assert item["input_ids"][-N * D - 1 :].tolist() == ids + [2]
    assert item["labels"][-N * D - 1 :].tolist() == ids + [2]
    assert (item["labels"][: -N * D - 1] == LABEL_IGNORE).all()
    assert item["action_token_ids"].tolist() == ids
    assert item["action"].tolist() == [ep, t, 0.25]
    chunk_steps = [min(t + i, length - 1) for i in range(N)]
    assert item["action_chunk"].shape == (N, D)
    assert item["action_chunk"].tolist() == [[ep, s, 0.25] for s in chunk_steps]
    assert item["normalized_action_chunk"].shape == (N, D)
    assert item["action_chunk_mask"].tolist() == [t + i < length for i in range(N)]
    assert frame_id(item["wrist_pixel_values"]) == (ep, t, WRIST)
    if history == 1:
        assert item["pixel_values"].shape == (3, S, S)
        assert frame_id(item["pixel_values"]) == (ep, t, PRIMARY)
        assert item["proprio"].tolist() == [ep, t]
        assert "history_mask" not in item
    else:
        steps, mask = window(t, history)
        assert item["pixel_values"].shape == (history, 3, S, S) and item["pixel_values"].dtype == torch.float32
        assert [frame_id(f) for f in item["pixel_values"]] == [(ep, s, PRIMARY) for s in steps]
        assert item["history_mask"].dtype == torch.bool and item["history_mask"].tolist() == mask
        assert item["proprio"].tolist() == [[ep, s] for s in steps]


def uncollate(batch):
    return [{k: v[j] for k, v in batch.items()} for j in range(len(batch["episode_id"]))]


def keys_of(ds):
    return [(item["episode_id"], item["step_index"]) for item in ds]


# --------------------------------------------------------------------------------------------------
# Exactly once across ranks x workers


@pytest.mark.parametrize("files,row_group_size", [(MANY_FILES, 3), (FEW_FILES, 3), (ONE_FILE, 2)],
                         ids=["files>=workers", "files<workers", "one-file"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_row_exactly_once_over_2_ranks_x_2_workers(tmp_path, files, row_group_size, shuffle):
    expected = write_shards(tmp_path, files, row_group_size=row_group_size)
    seen = []
    for rank in range(2):
        ds = ShardDataset(tmp_path, rank=rank, world_size=2, shuffle=shuffle, seed=3, shuffle_buffer=4, history=3)
        dl = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=functools.partial(collate_vla, pad_token_id=0))
        rank_keys = []
        for batch in dl:
            # The padded batch keeps each row's tokens up front, attention on exactly those.
            lengths = batch["attention_mask"].sum(1)
            for j, item in enumerate(uncollate(batch)):
                n = int(lengths[j])
                item["input_ids"], item["labels"] = item["input_ids"][:n], item["labels"][:n]
                check_item(item, history=3)
                rank_keys.append((item["episode_id"], int(item["step_index"])))
        assert rank_keys, f"rank {rank} got no rows"
        seen += rank_keys
    assert collections.Counter(seen) == collections.Counter(expected)
    assert len(seen) == len(expected)


def test_fewer_files_than_workers_splits_at_episode_aligned_row_groups(tmp_path):
    write_shards(tmp_path, FEW_FILES, row_group_size=3)
    pieces = []
    for rank in range(2):
        ds = ShardDataset(tmp_path, rank=rank, world_size=2, shuffle=False)
        for worker in range(2):
            mine = ds.slices_for(worker, 2)
            assert mine, f"global worker {rank * 2 + worker} got no work"
            pieces += mine
    starts = {}
    for f, episodes in enumerate(FEW_FILES):
        rel = f"train/shard-{f:05d}-of-{len(FEW_FILES):05d}.parquet"
        rows = episode_rows(episodes)
        starts[rel] = ([i for i, r in enumerate(rows) if r[1] == 0], len(rows))
    for rel, (episode_starts, num_rows) in starts.items():
        mine = sorted((p.start, p.stop) for p in pieces if p.path == rel)
        assert mine[0][0] == 0 and mine[-1][1] == num_rows
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:])), mine  # disjoint and covering
        assert all(a in episode_starts for a, _ in mine), mine  # every piece starts an episode
        assert len(mine) > 1


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (1, 3), (3, 2)])
def test_workers_get_contiguous_runs_cut_at_the_episode_start_nearest_an_equal_share(tmp_path, world_size, num_workers):
    """Without shuffling the split is its files in order; global worker g reads the rows between the episode
    starts nearest g/G and (g+1)/G of them (ties: the earlier), so workers differ by about an episode, not
    by a file (dealing whole files gave 10 and 14 of these 24 rows to two workers)."""
    write_shards(tmp_path, MANY_FILES)
    lengths = [n for episodes in MANY_FILES for _, n in episodes]
    starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]  # every episode start, then the end
    total, G = starts[-1], world_size * num_workers
    cuts = [0] + [min(starts, key=lambda x: (abs(x - round(k * total / G)), x)) for k in range(1, G)] + [total]
    file_rows = [sum(n for _, n in episodes) for episodes in MANY_FILES]
    file_first = [sum(file_rows[:f]) for f in range(len(file_rows))]
    for rank in range(world_size):
        ds = ShardDataset(tmp_path, rank=rank, world_size=world_size, shuffle=False)
        lengths_now = ds.worker_lengths(num_workers)
        for worker in range(num_workers):
            g = rank * num_workers + worker
            got = [(int(p.path.split("-")[1]), p.start, p.stop) for p in ds.slices_for(worker, num_workers)]
            want = [(f, max(cuts[g], first) - first, min(cuts[g + 1], first + n) - first)
                    for f, (first, n) in enumerate(zip(file_first, file_rows)) if max(cuts[g], first) < min(cuts[g + 1], first + n)]
            assert got == want, (g, got, want)
            assert lengths_now[worker] == cuts[g + 1] - cuts[g]


# --------------------------------------------------------------------------------------------------
# Order and shuffling


def test_no_shuffle_is_file_order_then_row_order(tmp_path):
    expected = write_shards(tmp_path, MANY_FILES)
    assert keys_of(ShardDataset(tmp_path, shuffle=False)) == expected


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    expected = write_shards(tmp_path, MANY_FILES)
    a = keys_of(ShardDataset(tmp_path, seed=0, shuffle_buffer=8))
    assert sorted(a) == sorted(expected) and a != expected
    assert keys_of(ShardDataset(tmp_path, seed=0, shuffle_buffer=8)) == a
    assert keys_of(ShardDataset(tmp_path, seed=1, shuffle_buffer=8)) != a
    ds = ShardDataset(tmp_path, seed=0, shuffle_buffer=8)
    ds.set_epoch(1)
    b = keys_of(ds)
    assert b != a and sorted(b) == sorted(expected)
    assert keys_of(ShardDataset(tmp_path, seed=0, shuffle_buffer=8, epoch=1)) == b
    ds.set_epoch(0)
    assert keys_of(ds) == a


def test_shard_order_is_permuted_and_rows_stay_in_order_without_buffer(tmp_path):
    write_shards(tmp_path, MANY_FILES)
    blocks = [tuple((episode_id(ep), t) for ep, t, _ in episode_rows(f)) for f in MANY_FILES]
    orders = set()
    for seed in range(6):
        got = keys_of(ShardDataset(tmp_path, seed=seed, shuffle_buffer=1))
        order, pos = [], 0
        while pos < len(got):
            block = next(b for b in blocks if tuple(got[pos : pos + len(b)]) == b)
            order.append(blocks.index(block))
            pos += len(block)
        assert sorted(order) == list(range(len(blocks)))
        orders.add(tuple(order))
    assert len(orders) > 1


def test_dataloader_order_is_deterministic(tmp_path):
    write_shards(tmp_path, FEW_FILES)

    def run(seed):
        ds = ShardDataset(tmp_path, seed=seed, shuffle_buffer=5, history=2)
        dl = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_vla)
        return [(e, int(s)) for b in dl for e, s in zip(b["episode_id"], b["step_index"])]

    first = run(7)
    assert run(7) == first
    assert run(8) != first


# --------------------------------------------------------------------------------------------------
# History windows and decoding


def test_history_windows_at_episode_start_and_middle(tmp_path):
    write_shards(tmp_path, [[(0, 1), (1, 5)], [(2, 2)]])
    items = {(it["episode_id"], it["step_index"]): it for it in ShardDataset(tmp_path, shuffle=False, history=3)}
    assert len(items) == 8
    for item in items.values():
        check_item(item, history=3)

    def ids(item):
        return [frame_id(f)[:2] for f in item["pixel_values"]], item["history_mask"].tolist()

    # Written out by hand: the first frame repeats (mask False) before the episode start.
    assert ids(items["ep000", 0]) == ([(0, 0), (0, 0), (0, 0)], [False, False, True])
    assert ids(items["ep001", 0]) == ([(1, 0), (1, 0), (1, 0)], [False, False, True])
    assert ids(items["ep001", 1]) == ([(1, 0), (1, 0), (1, 1)], [False, True, True])
    assert ids(items["ep001", 2]) == ([(1, 0), (1, 1), (1, 2)], [True, True, True])
    assert ids(items["ep001", 4]) == ([(1, 2), (1, 3), (1, 4)], [True, True, True])
    assert ids(items["ep002", 1]) == ([(2, 0), (2, 0), (2, 1)], [False, True, True])
    assert items["ep001", 1]["proprio"].tolist() == [[1, 0], [1, 0], [1, 1]]


def test_history_one_gives_single_frames(tmp_path):
    write_shards(tmp_path, [[(0, 1), (1, 3)]])
    items = list(ShardDataset(tmp_path, shuffle=False))
    assert len(items) == 4
    for item in items:
        check_item(item, history=1)
        assert item["dataset_name"] == "toy" and item["instruction"].startswith("Pick Up Block")


@pytest.mark.parametrize("world_size", [1, 4])
def test_each_frame_is_decoded_once_per_pass(tmp_path, monkeypatch, world_size):
    expected = write_shards(tmp_path, ONE_FILE if world_size > 1 else MANY_FILES, row_group_size=2)
    calls = collections.Counter()
    original = loader.decode_frames

    def counting(images, *args, **kwargs):
        frames = original(images, *args, **kwargs)  # [n, 3, S, S]
        for frame in frames:
            calls[tuple(int(v) for v in frame[:, 0, 0])] += 1
        return frames

    monkeypatch.setattr(loader, "decode_frames", counting)
    seen = []
    for rank in range(world_size):
        ds = ShardDataset(tmp_path, rank=rank, world_size=world_size, history=4, shuffle_buffer=6)
        seen += keys_of(ds)
    assert sorted(seen) == sorted(expected)
    want = collections.Counter()
    for ep_id, t in expected:
        want[int(ep_id[2:]), t, PRIMARY] += 1
        want[int(ep_id[2:]), t, WRIST] += 1
    assert calls == want


def test_decode_images_false_and_column_subset(tmp_path):
    write_shards(tmp_path, [[(0, 2)]])
    items = list(ShardDataset(tmp_path, shuffle=False, decode_images=False, history=2))
    assert items[1]["image_primary"] == [png(0, 0, PRIMARY), png(0, 1, PRIMARY)]
    assert items[1]["image_wrist"] == png(0, 1, WRIST)
    assert "pixel_values" not in items[1]
    items = list(ShardDataset(tmp_path, shuffle=False, columns=["input_ids", "labels"]))
    assert set(items[0]) == {"dataset_name", "episode_id", "step_index", "num_steps", "input_ids", "labels"}
    with pytest.raises(ValueError, match="unknown"):
        ShardDataset(tmp_path, columns=["pixels"])


# --------------------------------------------------------------------------------------------------
# Manifest handling


def test_without_manifest_globs_split_and_infers_chunk(tmp_path):
    expected = write_shards(tmp_path, MANY_FILES, manifest=False, wrist=False, proprio=False)
    (tmp_path / "train" / ".tmp-0123-shard-00000-of-00005.parquet").write_bytes(b"half written")
    assert load_manifest(tmp_path) is None
    with pytest.raises(loader.UnpublishedShardsError, match=f"expected manifest.json in {re.escape(repr(str(tmp_path)))}.*unpublished"):
        ShardDataset(tmp_path, shuffle=False)
    with pytest.warns(UserWarning, match="no manifest.json"):
        ds = ShardDataset(tmp_path, shuffle=False, require_manifest=False)
    assert ds.layout.chunk == N and ds.layout.action_dim == D and not ds.layout.wrist
    items = list(ds)
    assert [(i["episode_id"], i["step_index"]) for i in items] == expected
    assert items[0]["action_chunk"].shape == (N, D)
    assert "wrist_pixel_values" not in items[0] and "proprio" not in items[0]


def test_manifest_lists_split_files_and_its_options_are_checked(tmp_path):
    write_shards(tmp_path, MANY_FILES)
    write_shards(tmp_path / "x", [[(9, 2)]], split="heldout")
    os.replace(tmp_path / "x" / "heldout", tmp_path / "heldout")
    helper.write_manifest(tmp_path, options={**LOADER_OPTIONS, "action_chunk": N, "image_size": S})
    manifest = read_manifest_json(tmp_path)
    assert isinstance(load_manifest(tmp_path), loader.layout.Manifest)
    assert keys_of(ShardDataset(tmp_path, "heldout", shuffle=False)) == [("ep009", 0), ("ep009", 1)]
    with pytest.raises(ValueError, match="expected shard files for split 'validation'"):
        ShardDataset(tmp_path, "validation")

    manifest["options"]["action_chunk"] = 3
    write_manifest_json(tmp_path, manifest)
    with pytest.raises(ValueError, match="action_chunk N=3"):
        ShardDataset(tmp_path)

    manifest["options"]["action_chunk"] = N
    entry = next(e for e in manifest["files"] if e["path"] == "train/shard-00001-of-00005.parquet")
    for key in ("rows", "bytes"):
        entry[key] += 1
        write_manifest_json(tmp_path, manifest)
        with pytest.raises(ValueError, match=f"{key} in .*{re.escape('shard-00001-of-00005.parquet')}"):
            list(ShardDataset(tmp_path, shuffle=False))
        entry[key] -= 1


# --------------------------------------------------------------------------------------------------
# Episode contiguity


@pytest.mark.parametrize(
    "rows,message",
    [
        ([(0, 0, 3), (0, 1, 3), (1, 0, 1), (0, 2, 3)], "expected episode 'ep000' of dataset 'toy' to have 3 steps"),
        ([(0, 0, 3), (0, 2, 3)], "expected step 1 of episode 'ep000'"),
        ([(0, 0, 3), (0, 1, 3)], "expected episode 'ep000' of dataset 'toy' to have 3 steps"),
        ([(0, 1, 3), (0, 2, 3)], "expected an episode start"),
        ([(0, 0, 1), (1, 0, 1), (0, 0, 1)], "starts a second time"),
        ([(0, 0, 2), (0, 1, 2), (0, 2, 2)], "expected step_index < num_steps"),
    ],
    ids=["interleaved", "gap", "truncated", "mid-episode-start", "duplicate", "past-num-steps"],
)
@pytest.mark.parametrize("world_size", [1, 4])
def test_contiguity_violation_raises_naming_the_file(tmp_path, rows, message, world_size):
    good = episode_rows([(5, 2), (6, 3)])
    write_shards(tmp_path, [good, rows], rows_override=True, row_group_size=2)
    bad = "shard-00001-of-00002.parquet"
    with pytest.raises(ValueError, match=message) as info:
        for rank in range(world_size):
            list(ShardDataset(tmp_path, rank=rank, world_size=world_size, shuffle=False))
    assert bad in str(info.value)


def test_same_episode_id_in_two_datasets_of_one_file_is_not_a_violation(tmp_path):
    rows = [(0, t, 2, "bridge") for t in range(2)] + [(0, t, 3, "calvin") for t in range(3)]
    write_shards(tmp_path, [rows], rows_override=True)
    for world_size in (1, 4):
        got = [(it["dataset_name"], it["episode_id"], it["step_index"])
               for rank in range(world_size) for it in ShardDataset(tmp_path, rank=rank, world_size=world_size, history=2)]
        assert sorted(got) == sorted((r[3], episode_id(r[0]), r[1]) for r in rows)


# --------------------------------------------------------------------------------------------------
# Collation


def test_collate_pads_right_and_masks_from_lengths():
    def item(ids, labels, step, name):
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "action": torch.tensor([step, 1.0]),
                "pixel_values": torch.full((3, 2, 2), step / 10), "history_mask": torch.tensor([False, True]),
                "dataset_name": name, "episode_id": f"e{step}", "step_index": step}

    # The pad id 5 is also a real token of the first item: the mask comes from lengths, not from ids.
    collate = functools.partial(collate_vla, pad_token_id=5)
    collate = pickle.loads(pickle.dumps(collate))
    out = collate([item([1, 5, 7], [-100, 5, 7], 0, "a"), item([1, 2, 3, 4, 9], [-100, -100, 3, 4, 9], 3, "b")])
    assert out["input_ids"].tolist() == [[1, 5, 7, 5, 5], [1, 2, 3, 4, 9]]
    assert out["labels"].tolist() == [[-100, 5, 7, -100, -100], [-100, -100, 3, 4, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["input_ids"].dtype == out["labels"].dtype == out["attention_mask"].dtype == torch.int64
    assert out["action"].tolist() == [[0.0, 1.0], [3.0, 1.0]]
    assert out["pixel_values"].shape == (2, 3, 2, 2)
    assert out["history_mask"].tolist() == [[False, True], [False, True]]
    assert out["step_index"].tolist() == [0, 3] and out["step_index"].dtype == torch.int64
    assert out["dataset_name"] == ["a", "b"] and out["episode_id"] == ["e0", "e3"]
    assert collate_vla([item([4], [4], 1, "c")])["attention_mask"].tolist() == [[1]]

    bad = item([1], [1], 2, "c")
    bad["pixel_values"] = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="'pixel_values' of shape \\(3, 2, 2\\)"):
        collate_vla([item([1], [1], 1, "a"), bad])


# --------------------------------------------------------------------------------------------------
# Other readers, pickling, imports


def test_pyarrow_reads_the_split_directory(tmp_path):
    expected = write_shards(tmp_path, MANY_FILES)
    table = pq.read_table(tmp_path / "train")
    assert table.num_rows == len(expected)
    assert table.schema.names == shard_schema(D, N, P, wrist=True).names
    assert sorted(zip(table["episode_id"].to_pylist(), table["step_index"].to_pylist())) == sorted(expected)


def test_dataset_pickles_and_reads_the_same(tmp_path):
    write_shards(tmp_path, FEW_FILES)
    ds = ShardDataset(tmp_path, seed=4, shuffle_buffer=5, history=2)
    list(ds)  # opens files: the cached filesystem must not travel
    clone = pickle.loads(pickle.dumps(ds))
    assert keys_of(clone) == keys_of(ds)
    assert pickle.loads(pickle.dumps(ShardSlice("train/x.parquet", 3, 9))) == ShardSlice("train/x.parquet", 3, 9)


def test_constructor_rejects_bad_arguments(tmp_path):
    write_shards(tmp_path, MANY_FILES)
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(tmp_path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="history"):
        ShardDataset(tmp_path, history=0)
    with pytest.raises(ValueError, match="wrap it in a list"):
        ShardDataset(tmp_path, columns="input_ids")


def test_import_needs_neither_beam_nor_tensorflow():
    code = (
        "import sys, vlaprep.loader\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('apache_beam', 'tensorflow', 'tensorflow_datasets'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
