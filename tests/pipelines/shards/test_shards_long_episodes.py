"""Episodes encoded in chunks (``EpisodeEncoder.chunk_rows``) and streamed back by the shard writer.

Long episodes are made short here: the chunk is shrunk to 3-4 steps, so every boundary case (an
action chunk looking ahead across a chunk, a row group cutting through chunks, a camera error in a
later chunk) occurs on small generated data. Each claim is checked against something computed
without chunks: a one-batch IPC file, ``pq.write_table`` over whole episodes (how shards were written
before), per-frame TF resizes, or a run with the default chunk size.
"""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from vlaprep.pipelines import cli
from vlaprep.pipelines.sources import resolve_dataset
from vlaprep.pipelines.shards import rows as shards_rows
from vlaprep.pipelines.shards import write as shards_write
from vlaprep.pipelines.shards.job import run_shards
from vlaprep.pipelines.shards.options import ShardOptions, ShardsArgumentError, target_shard_bytes
from vlaprep.pipelines.shards.rows import EpisodeEncoder
from vlaprep.pipelines.shards.spill import SpilledEpisode, read_spilled, spill_name
from vlaprep.pipelines.shards.write import reload_shard_episodes, write_shard_file
from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.schemas.episode import Episode
from vlaprep.synthetic.calvin import generate_calvin
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.registry import get_spec

IN_MEMORY = ("--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory")
SIZE = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_episodes")
    rlds = generate_rlds(root / "rlds", episodes=5, image_size=32, min_steps=9, max_steps=30, seed=2, val_fraction=0.0,
                         empty_language_fraction=0.0)
    calvin = generate_calvin(root / "calvin", frames=250, image_static=32, image_gripper=24)
    build_llama_like_tokenizer(root / "tokenizer")
    inputs = [DatasetInput("bridge_orig", str(rlds), get_spec("bridge_orig")), DatasetInput("calvin", str(calvin), get_spec("calvin"))]
    run_stats(inputs, str(root / "stats"), beam_args=IN_MEMORY, log=lambda m: None)
    with open(root / "stats" / "dataset_statistics.json") as f:
        statistics = json.load(f)
    return {"root": root, "inputs": {i.name: i for i in inputs}, "statistics": statistics,
            "statistics_path": str(root / "stats" / "dataset_statistics.json"), "tokenizer_dir": str(root / "tokenizer")}


def options(**kw):
    base = dict(image_size=SIZE, cameras=("primary",), heldout_fraction=0.0, seed=0, action_chunk=1, normalization="bounds_q99",
                action_encoding="uniform", target_shard_bytes=1 << 20, action_dim=7, vocab_size=32000, eos_id=2,
                model_max_length=2048, tokenization="ids_direct")
    base.update(kw)
    return ShardOptions(**base)


def encoder(data, name, chunk_rows, **kw):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data["tokenizer_dir"])
    return EpisodeEncoder(options(**kw), {name: get_spec(name)}, {name: data["statistics"][name]["action"]}, tok, chunk_rows=chunk_rows)


def episodes_of(data, name, roles=("primary",)):
    item = data["inputs"][name]
    dataset = resolve_dataset(item.name, item.path, item.spec)
    return [e for u in dataset.units for e in dataset.iter_episodes(u, roles)
            if isinstance(e, Episode)]


def first_episode(data, name, roles=("primary",)):
    """CALVIN: the first window; RLDS: the longest episode."""
    episodes = episodes_of(data, name, roles)
    return episodes[0] if name == "calvin" else max(episodes, key=lambda e: e.num_steps)


def spilled_episodes(data, spill, names, per_dataset=3):
    """The first ``per_dataset`` episodes of each dataset, encoded 4 rows a chunk into ``spill``:
    ``[(key, SpilledEpisode)]`` in the order given."""
    spill.mkdir()
    items = []
    for name in names:
        enc = encoder(data, name, chunk_rows=4)
        for episode in episodes_of(data, name)[:per_dataset]:
            key, ref = enc.encode(episode, str(spill))
            items.append((key, SpilledEpisode(str(spill), ref)))
    return items


def one_batch_file(batch, path):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return os.path.getsize(path), pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0).nbytes


@pytest.mark.parametrize("name, kw", [
    ("bridge_orig", {}),
    ("bridge_orig", {"action_chunk": 5}),  # bool mask column of width 5: bit-packed across chunks
    ("calvin", {"cameras": ("primary", "wrist"), "proprio_dim": 15, "action_chunk": 3}),
])
def test_chunked_spill_reports_the_sizes_of_the_one_batch_episode(data, tmp_path, name, kw):
    episode = first_episode(data, name, kw.get("cameras", ("primary",)))
    key, whole = encoder(data, name, chunk_rows=1000, **kw).encode(episode)
    t = whole.num_rows
    assert t >= 8
    file_bytes, arrow_nbytes = one_batch_file(whole, tmp_path / "whole.arrow")
    for chunk_rows in (1, 3, 4, t):
        spill = tmp_path / f"spill{chunk_rows}"
        spill.mkdir()
        got_key, ref = encoder(data, name, chunk_rows=chunk_rows, **kw).encode(episode, str(spill))
        assert got_key == key
        assert (ref.rows, ref.nbytes, ref.arrow_nbytes) == (t, file_bytes, arrow_nbytes), chunk_rows
        assert pickle.loads(pickle.dumps(SpilledEpisode(str(spill), ref))).ref == ref
        batches = list(read_spilled(str(spill), ref))
        assert [b.num_rows for b in batches] == [min(chunk_rows, t - s) for s in range(0, t, chunk_rows)]
        assert pa.Table.from_batches(batches).equals(pa.Table.from_batches([whole]))
        assert os.listdir(spill) == [spill_name(key)]


def test_chunked_rows_match_per_step_references(data):
    """Action chunks look ahead across chunk boundaries; every image is the TF resize of its own frame."""
    episode = first_episode(data, "bridge_orig")
    trajectory = get_spec("bridge_orig").transform(episode.steps)
    action = np.asarray(trajectory.action, np.float32)
    t, n = action.shape[0], 4
    _, batch = encoder(data, "bridge_orig", chunk_rows=3, action_chunk=n).encode(episode)
    rows = batch.to_pylist()
    assert [r["step_index"] for r in rows] == list(range(t)) and {r["num_steps"] for r in rows} == {t}
    for step, row in enumerate(rows):
        take = [min(step + i, t - 1) for i in range(n)]
        np.testing.assert_array_equal(np.asarray(row["action_chunk"], np.float32), action[take].reshape(-1))
        assert row["action_chunk_mask"] == [step + i < t for i in range(n)]
        frame = tf.io.decode_jpeg(episode.images["primary"][int(trajectory.step_index[step])], channels=3)
        want = np.clip(np.round(tf.image.resize(frame, (SIZE, SIZE), method="lanczos3", antialias=True).numpy()), 0, 255)
        np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(row["image_primary"]))), want.astype(np.uint8))


def reference_shard(whole_batches, schema):
    """The file one ``pq.write_table`` makes of the whole-episode batches (read back from IPC) as one array
    per column, row groups from that table's ``nbytes``: each row group's column one array, so one page."""
    loaded = []
    for batch in whole_batches:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        loaded.append(pa.ipc.open_file(pa.BufferReader(sink.getvalue())).get_batch(0))
    table = pa.Table.from_batches(loaded, schema=schema)
    row_group = max(1, min(shards_write.ROW_GROUP_ROWS, shards_write.ROW_GROUP_BYTES // max(1, table.nbytes // table.num_rows)))
    out = pa.BufferOutputStream()
    pq.write_table(table.combine_chunks(), out, row_group_size=row_group, compression="zstd", compression_level=1,
                   use_dictionary=[f.name for f in schema if f.type == pa.string()],
                   write_statistics=[f.name for f in schema if f.type != pa.binary()])
    return out.getvalue().to_pybytes(), row_group


@pytest.mark.parametrize("size, row_group_rows, row_group_bytes", [
    (SIZE, 7, 64 << 20),
    (SIZE, 1000, 20_000),  # groups sized by the rows' Arrow bytes
    (224, 40, 64 << 20),  # 150 KB PNGs: a group's image column is one page, however the episodes were cut
])
def test_streamed_shard_is_byte_identical_to_whole_episode_write(data, tmp_path, monkeypatch, size, row_group_rows, row_group_bytes):
    """Row groups cut through episodes and through their chunks; the file is the same as one write of
    the whole episodes as one array, so one page per column of a group. (At Parquet's default 1 MiB page
    size pages are cut per input array: one per episode or spilled chunk in the 224 px case.)"""
    monkeypatch.setattr(shards_write, "ROW_GROUP_ROWS", row_group_rows)
    monkeypatch.setattr(shards_write, "ROW_GROUP_BYTES", row_group_bytes)
    episodes = episodes_of(data, "bridge_orig")
    chunked = encoder(data, "bridge_orig", chunk_rows=4, image_size=size)
    whole = encoder(data, "bridge_orig", chunk_rows=1000, image_size=size)
    spill = tmp_path / "spill"
    spill.mkdir()
    items, wholes = [], []
    for episode in episodes:
        key, ref = chunked.encode(episode, str(spill))
        items.append((key, SpilledEpisode(str(spill), ref)))
        wholes.append((key, whole.encode(episode)[1]))
    wholes.sort(key=lambda kv: kv[0])
    want, row_group = reference_shard([b for _, b in wholes], whole.schema)
    assert sum(b.num_rows for _, b in wholes) > 2 * row_group  # several groups, cutting episodes
    info = write_shard_file(str(tmp_path / "out"), "train", 0, 1, list(reversed(items)), whole.schema, len(items))
    got = (tmp_path / "out" / info["path"]).read_bytes()
    assert got == want
    assert (info["bytes"], info["row_groups"]) == (len(want), pq.ParquetFile(io.BytesIO(want)).num_row_groups)
    # The same rows given in memory, as record batches cut differently, make the same file.
    lists = [(k, [b.slice(s, 5) for s in range(0, b.num_rows, 5)]) for k, b in wholes]
    info = write_shard_file(str(tmp_path / "out2"), "train", 0, 1, lists, whole.schema, len(items))
    assert (tmp_path / "out2" / info["path"]).read_bytes() == want


def test_reloaded_episodes_spill_like_fresh_ones(data, tmp_path, monkeypatch):
    """A previous shard file (two datasets, row groups of 5 rows) read back 3 rows at a time: the same
    references and rows as encoding the episodes again; a modified file is refused."""
    monkeypatch.setattr(shards_write, "ROW_GROUP_ROWS", 5)
    monkeypatch.setattr(shards_write, "CHUNK_ROWS", 3)  # the previous file is read back 3 rows at a time
    spill = tmp_path / "spill"
    items = spilled_episodes(data, spill, ("bridge_orig", "calvin"))
    fresh = {key: episode.ref for key, episode in items}
    schema = options().schema()
    info = write_shard_file(str(tmp_path / "out"), "train", 0, 1, items, schema, len(items))
    path = tmp_path / "out" / info["path"]
    again = tmp_path / "again"
    again.mkdir()
    got = dict(reload_shard_episodes(str(path), info["sha256"], "calvin", str(again), schema))
    want = {k: r for k, r in fresh.items() if k[1] == "calvin"}
    assert sorted(got) == sorted(want) and len(got) == 3
    for key, ref in got.items():
        assert (ref.nbytes, ref.rows, ref.arrow_nbytes) == (want[key].nbytes, want[key].rows, want[key].arrow_nbytes)
        assert pa.Table.from_batches(list(read_spilled(str(again), ref))).equals(
            pa.Table.from_batches(list(read_spilled(str(spill), want[key]))))
    changed = bytearray(path.read_bytes())
    changed[len(changed) // 2] ^= 1
    path.write_bytes(bytes(changed))
    with pytest.raises(RuntimeError, match="the previous output was modified"):
        list(reload_shard_episodes(str(path), info["sha256"], "calvin", str(again), schema))


def test_pipeline_output_does_not_depend_on_the_chunk_size(data, tmp_path, monkeypatch):
    def run(out, **kw):
        run_shards([data["inputs"]["bridge_orig"], data["inputs"]["calvin"]], data["statistics_path"], data["tokenizer_dir"],
                   str(out), image_size=SIZE, heldout_fraction=0.3, target_shard_mb=0.05, beam_args=IN_MEMORY,
                   log=lambda m: None, **kw)
        return {os.path.relpath(os.path.join(d, n), out): open(os.path.join(d, n), "rb").read() for d, _, names in os.walk(out) for n in names}

    monkeypatch.setattr(shards_write, "ROW_GROUP_ROWS", 7)
    default = run(tmp_path / "default", action_chunk=2)
    monkeypatch.setattr(shards_rows, "CHUNK_ROWS", 3)  # the encoder's default chunk
    assert run(tmp_path / "chunked", action_chunk=2) == default


def test_camera_errors_are_reported_in_whole_episode_order(data, tmp_path):
    """A wrist JPEG corrupt in the first chunk and a primary frame of another size in the third: a
    whole-episode pass decoded all primary frames first, so the primary's error is the reason."""
    episode = first_episode(data, "bridge_orig")
    assert episode.num_steps >= 14
    primary = list(episode.images["primary"])
    wrist = list(primary)
    small = tf.io.encode_jpeg(np.zeros((16, 16, 3), np.uint8)).numpy()
    primary[10], wrist[2] = small, b"not a jpeg"
    broken = Episode(episode.dataset_name, episode.episode_id, episode.split, episode.language, episode.steps,
                     {"primary": primary, "wrist": wrist})
    want = "ValueError: expected every frame of the episode to be (32, 32, 3), got (16, 16, 3) at step 10"
    for chunk_rows in (4, 1000):
        spill = tmp_path / f"spill{chunk_rows}"
        spill.mkdir()
        record = encoder(data, "bridge_orig", chunk_rows=chunk_rows, cameras=("primary", "wrist")).encode(broken, str(spill))
        assert (record.stage, record.reason) == ("shard", want)
        assert os.listdir(spill) == []  # the partial spill file is gone
    wrist_only = Episode(episode.dataset_name, episode.episode_id, episode.split, episode.language, episode.steps,
                         {"primary": list(episode.images["primary"]), "wrist": wrist})
    record = encoder(data, "bridge_orig", chunk_rows=4, cameras=("primary", "wrist")).encode(wrist_only, str(tmp_path))
    assert record.reason.startswith("InvalidArgumentError: ")


def test_size_options_have_bounds():
    for size in (0, -3, 4097, 100_000, True, 224.0):
        with pytest.raises(ShardsArgumentError, match=r"expected --image-size in \[1, 4096\] pixels"):
            options(image_size=size)
    assert options(image_size=4096).image_size == 4096
    for target in (0, -1, (1 << 40) + 1, 1.5, True):
        with pytest.raises(ShardsArgumentError, match="expected --target-shard-mb in"):
            options(target_shard_bytes=target)
    assert options(target_shard_bytes=1 << 40).target_shard_bytes == 1 << 40
    for mb in ("inf", float("inf"), "-inf", float("nan"), "nan", -1, 0, 1e-9, 1e300, 1048577, "x", None, True):
        with pytest.raises(ShardsArgumentError, match=r"expected --target-shard-mb a finite number in \(0, 1048576\]"):
            target_shard_bytes(mb)
    assert [target_shard_bytes(v) for v in ("0.5", 256, 1048576)] == [1 << 19, 256 << 20, 1 << 40]


@pytest.mark.parametrize("flag, value, message", [
    ("--image-size", "100000", "expected --image-size in [1, 4096] pixels, got 100000; hint: OpenVLA uses 224"),
    ("--image-size", "0", "expected --image-size in [1, 4096] pixels, got 0; hint: OpenVLA uses 224"),
    ("--target-shard-mb", "1e300", "expected --target-shard-mb "),
    ("--target-shard-mb", "inf", "expected --target-shard-mb "),
    ("--target-shard-mb", "nan", "expected --target-shard-mb "),
    ("--target-shard-mb", "-5", "expected --target-shard-mb "),
])
def test_absurd_sizes_are_one_line_user_errors(tmp_path, capsys, flag, value, message):
    argv = ["shards", "--dataset", f"bridge_orig={tmp_path}", "--statistics", str(tmp_path / "s.json"), "--tokenizer", str(tmp_path),
            "--output", str(tmp_path / "out"), flag, value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlaprep shards: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_each_datasets_rows_start_a_row_group(data, tmp_path, monkeypatch):
    """Two datasets in one file, row groups of 7 rows: no group holds both datasets' rows (a mixture reads
    each dataset as its own stream), every dataset's rows fill groups of 7 from its first row, the manifest's
    count is the file's, and the rows are those given, in key order."""
    monkeypatch.setattr(shards_write, "ROW_GROUP_ROWS", 7)
    items = spilled_episodes(data, tmp_path / "spill", ("calvin", "bridge_orig"))
    schema = options().schema()
    info = write_shard_file(str(tmp_path / "out"), "train", 0, 1, items, schema, len(items))
    parquet = pq.ParquetFile(tmp_path / "out" / info["path"])
    rows = {name: sum(e.rows for key, e in items if key[1] == name) for name in ("bridge_orig", "calvin")}
    assert all(n % 7 for n in rows.values())  # neither dataset ends on a group boundary: the old writer mixed them
    groups = [parquet.read_row_group(k, columns=["dataset_name", "episode_id", "step_index"]) for k in range(parquet.num_row_groups)]
    names = [sorted(set(g.column("dataset_name").to_pylist())) for g in groups]
    assert all(len(n) == 1 for n in names)
    for name, n in rows.items():
        sizes = [g.num_rows for g, ns in zip(groups, names) if ns == [name]]
        assert sizes == [7] * (n // 7) + [n % 7]
    assert info["row_groups"] == parquet.num_row_groups == sum(-(-n // 7) for n in rows.values())
    got = pa.concat_tables(groups)
    want = sorted((k[1], k[2], step) for k, e in items for step in range(e.rows))
    assert list(zip(*(got.column(c).to_pylist() for c in ("dataset_name", "episode_id", "step_index")))) == want
