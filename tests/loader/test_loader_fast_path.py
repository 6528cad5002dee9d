"""The loader's fast paths against their references, on shards written by the real pipeline:

* ``decode_frames``: vlaprep's own PNGs (stored deflate, filter "Up") decoded without PIL give exactly
  PIL's pixels; every other image, or a damaged one, goes to PIL (same pixels, same errors).
* Batches: whatever the fast decoder, the column-wise batches equal those built with PIL's decoder, and
  ``collate_vla`` of the items.
* ``_RowGroups``: streams that alternate within a file decode a shared row group once, and a group only
  up to the last row a stream will read from it.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pathlib
import struct
import zlib

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlaprep import loader
from vlaprep.loader import FrameShapeError, ShardDataset, collate_vla, decode_frames
from vlaprep.pipelines import cli
from vlaprep.pipelines.shards.images import encode_png
from vlaprep.schemas.shards import Column
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

_spec = importlib.util.spec_from_file_location("loader_test_module", pathlib.Path(__file__).with_name("test_loader.py"))
tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tl)

IN_MEMORY = "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner"
SIZE = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two datasets with a wrist camera (OXE layouts), 24 px, action chunk 2, through `vlaprep stats` and
    `vlaprep shards`."""
    root = tmp_path_factory.mktemp("real")
    a = generate_rlds(root / "a", layout="jaco_play", episodes=8, image_size=40, max_steps=12, seed=1)
    b = generate_rlds(root / "b", layout="taco_play", episodes=6, image_size=40, max_steps=12, seed=2)
    build_llama_like_tokenizer(root / "tok")
    datasets = ["--dataset", f"jaco_play={a}", "--dataset", f"taco_play={b}"]
    assert cli.main(["stats", *datasets, "--output", str(root / "stats"), IN_MEMORY]) == 0
    assert cli.main(["shards", *datasets, "--statistics", str(root / "stats" / "dataset_statistics.json"),
                     "--tokenizer", str(root / "tok"), "--output", str(root / "shards"), "--image-size", str(SIZE),
                     "--cameras", "primary,wrist", "--action-chunk", "2", "--heldout-fraction", "0.2", IN_MEMORY]) == 0
    return root / "shards"


def shard_images(shards) -> list[bytes]:
    out = []
    for path in sorted(shards.glob("*/*.parquet")):
        table = pq.read_table(path, columns=[Column.IMAGE_PRIMARY, Column.IMAGE_WRIST])
        out += table.column(Column.IMAGE_PRIMARY).to_pylist() + table.column(Column.IMAGE_WRIST).to_pylist()
    return out


def pil_frames(images) -> np.ndarray:
    """The reference: PIL, RGB, channels first."""
    return np.stack([np.asarray(Image.open(io.BytesIO(bytes(x))).convert("RGB")).transpose(2, 0, 1) for x in images])


def pil_reference(images, size=None, digest_checked=False, allocate=None):
    """``decode_frames`` through PIL only: the slow path the fast one must equal (every frame is SIZE)."""
    frames = pil_frames(images)
    if allocate is None:
        return frames
    out = allocate(frames.shape)
    out[...] = frames
    return out


# --------------------------------------------------------------------------------------------------
# decode_frames


def test_vlaprep_pngs_decode_without_pil_to_exactly_pils_pixels(shards, monkeypatch):
    images = shard_images(shards)
    assert len(images) > 2 * loader._ROWWISE_MIN_FRAMES
    expected = pil_frames(images)
    assert expected.shape[1:] == (3, SIZE, SIZE) and expected.std() > 10  # real pictures, not blank
    # The fast path is taken for every image: PIL is not called.
    monkeypatch.setattr(loader, "_decode_with_pil", lambda data: pytest.fail("PIL was used for a vlaprep PNG"))
    for digest_checked in (False, True):
        # One frame (a cumulative sum per frame) and many (one add per pixel row across the frames).
        assert np.array_equal(decode_frames(images[:1], SIZE, digest_checked), expected[:1])
        assert np.array_equal(decode_frames(images[:3], None, digest_checked), expected[:3])
        got = decode_frames(images, SIZE, digest_checked)
        assert got.dtype == np.uint8 and np.array_equal(got, expected)
        assert got.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last memory: [n, H, W, 3] underneath
    assert np.array_equal(loader.decode_frame(images[0]), expected[0].transpose(1, 2, 0))
    assert torch.equal(loader.decode_image(images[0]), torch.from_numpy(expected[0]))


def repack(png: bytes, idat_parts) -> bytes:
    """``png`` with its IDAT chunk replaced by ``idat_parts`` (one IDAT chunk each)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return png[:33] + b"".join(chunk(b"IDAT", p) for p in idat_parts) + chunk(b"IEND", b"")


def idat(png: bytes) -> bytes:
    (length,) = struct.unpack_from(">I", png, 33)
    return png[41: 41 + length]


def encoded(image: Image.Image, format: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format, **save)
    return buf.getvalue()


def test_other_pngs_and_formats_decode_as_pil_does():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    smooth = Image.fromarray(np.cumsum(rng.integers(0, 3, (SIZE, SIZE, 3)), axis=1).astype(np.uint8))
    ours = encode_png(rgb)
    stream = idat(ours)
    variants = {
        "pil-rgb": encoded(smooth),  # PIL's adaptive filters (Sub, Paeth, ...)
        "pil-rgb-stored": encoded(smooth, compress_level=0),
        "grey": encoded(smooth.convert("L")),
        "palette": encoded(smooth.convert("P")),
        "rgba": encoded(smooth.convert("RGBA")),
        "jpeg": encoded(smooth, "JPEG"),
        # vlaprep's layout with compressed deflate blocks (zlib inflates them), or the stream over 3 IDATs.
        "deflated": repack(ours, [zlib.compress(zlib.decompress(stream), 6)]),
        "split-idat": repack(ours, [stream[:100], stream[100:1000], stream[1000:]]),
    }
    filters = zlib.decompress(idat(variants["pil-rgb"]))[:: 3 * SIZE + 1]
    assert set(filters) - {2}, "PIL chose filter Up for every row: the test would not reach the fallback"
    for name, data in variants.items():
        assert np.array_equal(decode_frames([data]), pil_frames([data])), name
    # A batch mixing them: each frame as PIL decodes it.
    batch = list(variants.values()) + [ours] * loader._ROWWISE_MIN_FRAMES
    assert np.array_equal(decode_frames(batch, SIZE), pil_frames(batch))


def test_damaged_pngs_raise_what_pil_raises():
    rng = np.random.default_rng(1)
    ours = encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    flipped_pixel = bytearray(ours)
    flipped_pixel[len(ours) // 2] ^= 0x55  # inside the stored block: only the adler32 notices
    bad_header_crc = bytearray(ours)
    bad_header_crc[30] ^= 0x01
    truncated = repack(ours, [idat(ours)[:-300]])
    for data in (bytes(flipped_pixel), bytes(bad_header_crc), truncated):
        with pytest.raises(Exception) as pil_error:
            pil_frames([data])
        with pytest.raises(type(pil_error.value)):
            decode_frames([data], SIZE)
        with pytest.raises(type(pil_error.value)):
            decode_frames([ours] * loader._ROWWISE_MIN_FRAMES + [data], SIZE)


def test_frame_of_another_size_is_refused_with_its_index():
    frames = [encode_png(np.zeros((SIZE, SIZE, 3), np.uint8))] * 2 + [encode_png(np.zeros((8, SIZE, 3), np.uint8))]
    with pytest.raises(FrameShapeError, match=rf"expected a {SIZE}x{SIZE} RGB image at index 2, got shape \(8, {SIZE}, 3\)"):
        decode_frames(frames, SIZE)
    with pytest.raises(FrameShapeError, match="at index 2"):
        decode_frames(frames)  # the first frame's size
    assert decode_frames([], SIZE).shape == (0, 3, SIZE, SIZE)


# --------------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("kw", [dict(pixel_dtype="uint8"), dict(history=3), dict(mixture="manifest", history=2, pixel_dtype="uint8"),
                                dict(augment="openvla", pixel_dtype="uint8"), dict(decode_images=False)],
                         ids=["uint8", "h3-float32", "mixture-h2", "augment", "png-bytes"])
def test_batches_equal_pils_and_collated_items_on_real_shards(shards, monkeypatch, kw):
    # Units of 21 items (3 windows of 7): batches and history windows cross them; gathers of 8 and 5.
    monkeypatch.setattr(loader, "MIN_UNIT_ROWS", 16)

    B = loader._ROWWISE_MIN_FRAMES  # full batches un-filter row-wise, the last one frame by frame

    def batches(**more):
        return list(ShardDataset(shards, seed=5, shuffle_buffer=7, batch_size=B, pad_token_id=3, **kw, **more))

    fast = batches()
    items = list(ShardDataset(shards, seed=5, shuffle_buffer=7, **kw))
    with monkeypatch.context() as m:
        m.setattr(loader, "decode_frames", pil_reference)
        slow = batches()
    assert len(fast) == len(slow) == -(-len(items) // B) and len(items) % B and len(items) > 2 * 21
    for j, (a, b) in enumerate(zip(fast, slow)):
        for batch in (b, collate_vla(items[B * j: B * j + B], pad_token_id=3)):
            assert list(a) == list(batch)
            for key, value in a.items():
                if isinstance(value, torch.Tensor):
                    assert value.dtype == batch[key].dtype and torch.equal(value, batch[key]), key
                else:
                    assert value == batch[key], key
    if kw.get("decode_images", True):
        assert fast[0]["pixel_values"].shape[-3:] == (3, SIZE, SIZE)
        assert fast[0]["wrist_pixel_values"].shape[-3:] == (3, SIZE, SIZE)


def test_size_mismatch_names_the_row(tmp_path):
    tl.write_shards(tmp_path, [[(0, 2)]], wrist=False, options={"image_size": tl.S + 1})
    with pytest.raises(ValueError, match=rf"expected a {tl.S + 1}x{tl.S + 1} RGB image \(options.image_size\) at "
                                         rf"step 0 of episode 'ep000' in .*shard-00000-of-00001.parquet, got shape "
                                         rf"\({tl.S}, {tl.S}, 3\)"):
        list(ShardDataset(tmp_path, shuffle=False))


# --------------------------------------------------------------------------------------------------
# Row groups shared by streams


def test_streams_share_row_groups_and_decode_only_what_they_will_read(tmp_path, monkeypatch):
    # Dataset a: rows 0-9, b: rows 10-19; row groups [0, 8), [8, 16), [16, 20).
    rows = [(0, t, 10, "a") for t in range(10)] + [(1, t, 10, "b") for t in range(10)]
    tl.write_shards(tmp_path, [rows], rows_override=True, row_group_size=8)
    path = tmp_path / "train" / "shard-00000-of-00001.parquet"
    shard = loader._OpenShard(pafs.LocalFileSystem().open_input_file(str(path)), remote=False)
    whole = pq.read_table(path)
    ds = ShardDataset(tmp_path)
    index = ds._file_index(ds.files[0])
    assert index.group_offsets.tolist() == [0, 8, 16, 20]
    decoded = []
    original = loader._OpenShard.read_group
    monkeypatch.setattr(loader._OpenShard, "read_group",
                        lambda self, k, columns, rows: decoded.append((k, rows)) or original(self, k, columns, rows))

    def read(groups, a, b, stream, until, path="f"):
        table = groups.read(shard, path, whole.schema.names, index, a, b, stream, until)
        assert table.equals(whole.slice(a, b - a)), (a, b)

    groups = loader._RowGroups()
    read(groups, 0, 4, stream=0, until=10)  # a
    read(groups, 10, 14, stream=1, until=20)  # b: group 1 whole (b reads to its end)
    read(groups, 4, 10, stream=0, until=10)  # a again: groups 0 and 1 are still in memory
    read(groups, 14, 20, stream=1, until=20)
    assert decoded == [(0, 8), (1, 8), (2, 4)]
    read(groups, 0, 3, stream=0, until=10, path="g")  # a moves on to another file (its next piece)
    assert set(groups.tables) == {("f", 1), ("f", 2), ("g", 0)}  # f's group 0: no stream reads it any more

    decoded.clear()
    alone = loader._RowGroups()
    read(alone, 0, 6, stream=0, until=10)
    read(alone, 6, 10, stream=0, until=10)  # a ends 2 rows into group 1: only those are decoded
    assert decoded == [(0, 8), (1, 2)]
    read(alone, 10, 12, stream=1, until=20)  # b needs more of group 1: decoded again, further
    assert decoded == [(0, 8), (1, 2), (1, 8)]


# --------------------------------------------------------------------------------------------------
# Hand-off from DataLoader workers


def test_share_batch_packs_every_tensor_into_one_shared_block_with_the_same_values():
    block = loader.shared_frames((2, 3, 4, 4))
    block[...] = np.arange(96, dtype=np.uint8).reshape(2, 3, 4, 4)
    frames = loader.as_shared_tensor(block)
    batch = {"ids": torch.arange(10).reshape(2, 5), "action": torch.linspace(-1, 1, 14).reshape(2, 7),
             "mask": torch.tensor([[True], [False]]), "odd": torch.arange(6, dtype=torch.int16)[::2],
             "names": ["a", "b"], "pixel_values": frames}
    expected = {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) for k, v in batch.items()}
    out = loader.share_batch(batch)
    assert list(out) == list(batch)
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert out[k].is_shared() and out[k].dtype == v.dtype and torch.equal(out[k], v), k
            assert out[k].data_ptr() % 8 == 0, k
        else:
            assert out[k] == v
    storages = {k: out[k].untyped_storage().data_ptr() for k in ("ids", "action", "mask", "odd", "pixel_values")}
    assert len({storages[k] for k in ("ids", "action", "mask", "odd")}) == 1  # one block for the small ones
    assert storages["pixel_values"] != storages["ids"]  # the frames were already shared: not copied
    assert out["pixel_values"].data_ptr() == frames.data_ptr()


def test_views_of_shared_frames_stay_on_their_shared_storage():
    block = loader.shared_frames((4, 3, 2, 2))
    block[...] = np.arange(block.size, dtype=np.uint8).reshape(block.shape)
    for view in (block, block[1:3], block[::2], block[2:].reshape(2, 12)):
        t = loader.as_shared_tensor(view)
        assert t.is_shared() and torch.equal(t, torch.from_numpy(np.ascontiguousarray(view)))
        assert t.data_ptr() == view.ctypes.data  # the same memory, not a copy
    private = np.arange(12, dtype=np.uint8)
    assert not loader.as_shared_tensor(private).is_shared()


def test_worker_batches_cross_as_two_shared_blocks_and_equal_in_process_batches(shards, monkeypatch):
    """In a worker every batch that lies within one read unit arrives as its frames' own shared block (decoded
    there, not copied) plus one block for everything else; a batch spanning two units is packed whole. The
    values are those of the same batches built in the main process."""
    monkeypatch.setattr(loader, "MIN_UNIT_ROWS", 10)  # units of 10 rows: some batches of 4 span two (forked workers see it)
    kw = dict(split="train", seed=3, shuffle_buffer=5, batch_size=4, pixel_dtype="uint8")
    in_process = list(ShardDataset(shards, **kw))
    received = list(torch.utils.data.DataLoader(ShardDataset(shards, **kw), batch_size=None, num_workers=1))
    assert len(received) == len(in_process) > 3
    ds = ShardDataset(shards, **kw)
    unit, total = ds._unit(), ds.worker_lengths(0)[0]
    spanning = {j for j in range(len(in_process)) if (4 * j) // unit != (4 * j + len(in_process[j]["step_index"]) - 1) // unit}
    assert unit == 10 and total > 3 * unit and 0 < len(spanning) < len(in_process) - 3
    for j, (a, b) in enumerate(zip(received, in_process)):
        assert list(a) == list(b)
        storages = set()
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), key
                storages.add(value.untyped_storage().data_ptr())
            else:
                assert value == b[key], key
        for key in ("pixel_values", "wrist_pixel_values"):  # the fixture has both cameras
            frames = a[key]
            own = frames.untyped_storage().nbytes() == frames.numel()
            assert own == (j not in spanning), (j, key)
            # decoded into the block in channels-last order and handed over as it is
            assert own <= frames.is_contiguous(memory_format=torch.channels_last), (j, key)
        assert len(storages) == (3 if j not in spanning else 1), j


def test_a_pooled_block_crosses_as_its_descriptor_and_is_free_again_once_released():
    """A frame block pickled as DataLoader pickles batches: rebuilt as a tensor over the same memory; the
    block stays in use while that tensor or any view of it lives, and is free once they are gone."""
    import gc
    from multiprocessing.reduction import ForkingPickler

    pool = loader._FramePool()
    frames = pool.array((2, 3, 4, 4), np.uint8)
    frames[...] = np.arange(96, dtype=np.uint8).reshape(2, 3, 4, 4)
    (block,) = pool.blocks
    handle = pool.handle(torch.from_numpy(frames))
    assert handle is not None and block.in_use
    assert pool.handle(torch.from_numpy(frames[:1])) is None  # only a tensor filling the block crosses as it
    received = ForkingPickler.loads(bytes(ForkingPickler.dumps(handle)))
    assert received.dtype == torch.uint8 and torch.equal(received, torch.from_numpy(frames.copy()))
    view, array = received[1], received.numpy()
    frames[1, 0, 0, 0] = 200  # the same memory: no copy was made
    assert int(view[0, 0, 0]) == 200 and int(array[1, 0, 0, 0]) == 200
    del received, handle
    gc.collect()
    assert block.in_use  # a view and an array still hold it
    assert pool.array((2, 3, 4, 4), np.uint8) is not None and len(pool.blocks) == 2  # so a new block, not it
    del view, array
    gc.collect()
    assert not block.in_use
    again = pool.array((2, 3, 4, 4), np.uint8)
    assert again.ctypes.data == block.address and len(pool.blocks) == 2  # reused


def test_a_pooled_block_in_channels_last_order_crosses_with_its_strides():
    """Frames decoded as [n, H, W, 3] and handed over as the [n, 3, H, W] view (``decode_frames``' layout):
    rebuilt over the same memory with the same strides, not copied into channels-first order."""
    from multiprocessing.reduction import ForkingPickler

    pool = loader._FramePool()
    hwc = pool.array((2, 4, 5, 3), np.uint8)
    hwc[...] = np.arange(hwc.size, dtype=np.uint8).reshape(hwc.shape)
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    assert chw.shape == (2, 3, 4, 5) and not chw.is_contiguous()
    received = ForkingPickler.loads(bytes(ForkingPickler.dumps(pool.handle(chw))))
    assert received.shape == (2, 3, 4, 5) and received.stride() == chw.stride()
    assert received.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(received, torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))))
    assert pool.handle(chw[:, :2]) is None  # not the whole block
    overlapping = torch.from_numpy(hwc).reshape(-1).as_strided((hwc.size,), (0,))  # same size and start
    assert pool.handle(overlapping) is None  # but not dense


def test_float32_pixels_from_workers_keep_the_frames_memory_order_and_values(shards):
    kw = dict(split="train", seed=5, shuffle_buffer=5, batch_size=4, pixel_dtype="float32")
    in_process = list(ShardDataset(shards, **kw))
    received = list(torch.utils.data.DataLoader(ShardDataset(shards, **kw), batch_size=None, num_workers=1))
    assert len(received) == len(in_process) > 3
    uint8 = list(ShardDataset(shards, **{**kw, "pixel_dtype": "uint8"}))
    for a, b, c in zip(received, in_process, uint8):
        for key in ("pixel_values", "wrist_pixel_values"):
            assert a[key].dtype == b[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key
            assert torch.equal(b[key], c[key].to(torch.float32) / 255.0), key
            assert a[key].is_contiguous(memory_format=torch.channels_last) == c[key].is_contiguous(memory_format=torch.channels_last)


def test_worker_reuses_released_frame_blocks_and_never_one_still_held(shards, monkeypatch, tmp_path):
    """Batches dropped as they come: a worker decodes into a few blocks over and over; batches all kept:
    every one keeps its own frames (blocks in use are not written; beyond the pool, fresh segments)."""
    log = tmp_path / "blocks.log"  # per block handed out in the worker: "new" or "reused"
    original = loader._FramePool.array

    def logged(self, shape, dtype):
        before = {b.address for b in self.blocks}
        out = original(self, shape, dtype)
        if out is not None:
            with open(log, "a") as f:
                f.write("reused\n" if out.ctypes.data in before else "new\n")
        return out

    monkeypatch.setattr(loader._FramePool, "array", logged)
    monkeypatch.setattr(loader, "MIN_UNIT_ROWS", 40)
    kw = dict(split="train", seed=4, shuffle_buffer=5, batch_size=2, pixel_dtype="uint8")
    expected = [(b["pixel_values"].clone(), b["wrist_pixel_values"].clone()) for b in ShardDataset(shards, **kw)]
    assert len(expected) > 2 * loader._POOL_BLOCKS
    dropped = []
    for batch in torch.utils.data.DataLoader(ShardDataset(shards, **kw), batch_size=None, num_workers=1):
        dropped.append(torch.equal(batch["pixel_values"], expected[len(dropped)][0])
                       and torch.equal(batch["wrist_pixel_values"], expected[len(dropped)][1]))
        del batch
    assert all(dropped) and len(dropped) == len(expected)
    events = log.read_text().splitlines()
    # Two cameras: two blocks a batch; a few batches out at once (2 prefetched, 1 here), the rest reused.
    assert 2 <= events.count("new") <= loader._POOL_BLOCKS and events.count("reused") >= len(expected)
    log.unlink()
    kept = list(torch.utils.data.DataLoader(ShardDataset(shards, **kw), batch_size=None, num_workers=1))
    assert len(kept) == len(expected)
    for batch, (primary, wrist) in zip(kept, expected):
        assert torch.equal(batch["pixel_values"], primary) and torch.equal(batch["wrist_pixel_values"], wrist)
    assert log.read_text().splitlines() == ["new"] * loader._POOL_BLOCKS  # the pool filled, then fresh segments


def test_workers_read_the_next_unit_ahead_with_the_same_batches(shards, monkeypatch, tmp_path):
    """In a worker every unit after the first is read on the read-ahead thread (while the previous one is
    gathered); the batches are those of the main process, which reads each unit when it reaches it."""
    import threading

    log = tmp_path / "units.log"
    original = loader._Unit.__init__

    def logged(self, *args):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {threading.current_thread().name}\n")
        original(self, *args)

    monkeypatch.setattr(loader._Unit, "__init__", logged)
    monkeypatch.setattr(loader, "MIN_UNIT_ROWS", 10)
    kw = dict(split="train", seed=6, shuffle_buffer=5, batch_size=3, pixel_dtype="uint8", history=2)
    expected = list(ShardDataset(shards, **kw))
    here = log.read_text().splitlines()
    assert len(here) > 3 and all(line.split()[1] == "MainThread" for line in here)
    log.unlink()
    received = list(torch.utils.data.DataLoader(ShardDataset(shards, **kw), batch_size=None, num_workers=1))
    assert len(received) == len(expected)
    for a, b in zip(received, expected):
        assert all(torch.equal(a[k], b[k]) if isinstance(b[k], torch.Tensor) else a[k] == b[k] for k in b)
    threads = [line.split()[1] for line in log.read_text().splitlines()]
    assert threads[0] == "MainThread" and len(threads) == len(here)
    assert all(t.startswith("vlaprep-read-ahead") for t in threads[1:])
