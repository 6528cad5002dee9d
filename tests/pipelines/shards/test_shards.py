"""``vlaprep shards`` end to end on generated data, checked against an independent reference.

The reference (``expected_rows``) is written here from openvla.md alone: NumPy float32 normalization,
``np.digitize`` on ``linspace(-1, 1, 256)`` bins, the HF tokenizer on OpenVLA's full training text,
per-image TF lanczos3 resize. It shares no code with ``pipelines/shards/`` beyond the source readers
and the dataset transforms (tested in their own files).
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from vlaprep.pipelines import cli
from vlaprep.pipelines.sources import resolve_dataset
from vlaprep.pipelines.sources.calvin import calvin_frame_path, list_calvin_windows
from vlaprep.pipelines.shards import beam as shards_beam
from vlaprep.pipelines.shards import publish as shards_publish
from vlaprep.pipelines.shards.beam import _EncodeEpisodeFn
from vlaprep.pipelines.shards.images import encode_png
from vlaprep.pipelines.shards.job import run_shards
from vlaprep.pipelines.shards.options import ShardOptions, ShardsArgumentError
from vlaprep.pipelines.shards.plan import heldout_score, heldout_split, plan_shards
from vlaprep.pipelines.shards.publish import reclaim_stale_staging, verify_output
from vlaprep.pipelines.shards.rows import EncoderConfig, EpisodeEncoder, chunk_indices
from vlaprep.pipelines.shards.tokenization import TokenizerFiles, load_tokenizer, prompt_ids_backend
from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.schemas import validate_json
from vlaprep.synthetic.calvin import generate_calvin
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.registry import get_spec

IN_MEMORY = ("--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner",)
MULTI_PROCESS_2 = ("--direct_num_workers=2",)  # beam_options' default: FnApiRunner multi_processing
SIZE = 32
EMPTY = "empty language instruction (OpenVLA drops unlabeled episodes)"


# --------------------------------------------------------------------------------------------------
# Fixtures: one generated RLDS (Bridge) and one CALVIN dataset, their statistics, a tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards_data")
    rlds = generate_rlds(
        root / "rlds", name="bridge_orig", episodes=10, image_size=64, max_steps=12,
        empty_language_fraction=0.2, nan_episodes=1, short_episodes=(0, 1, 2, 3, 4),
    )
    calvin = generate_calvin(root / "calvin", frames=250, image_static=64, image_gripper=48)
    build_llama_like_tokenizer(root / "tokenizer")
    inputs = [
        DatasetInput("bridge_orig", str(rlds), get_spec("bridge_orig")),
        DatasetInput("calvin", str(calvin), get_spec("calvin")),
    ]
    run_stats(inputs, str(root / "stats"), beam_args=IN_MEMORY, log=lambda m: None)
    with open(root / "stats" / "dataset_statistics.json") as f:
        statistics = json.load(f)
    from transformers import AutoTokenizer

    return {
        "root": root,
        "inputs": inputs,
        "statistics_path": str(root / "stats" / "dataset_statistics.json"),
        "statistics": statistics,
        "tokenizer_dir": str(root / "tokenizer"),
        "tokenizer": AutoTokenizer.from_pretrained(str(root / "tokenizer")),
    }


def source_episodes(item: DatasetInput, roles):
    """Every source record of the dataset: Episode, or QuarantineRecord for unreadable ones."""
    dataset = resolve_dataset(item.name, item.path, item.spec)
    return [e for u in dataset.units for e in dataset.iter_episodes(u, roles)]


def run(data, out, beam_args=IN_MEMORY, datasets=("bridge_orig", "calvin"), **kw):
    inputs = [i for i in data["inputs"] if i.name in datasets]
    kw.setdefault("image_size", SIZE)
    return run_shards(
        inputs, data["statistics_path"], data["tokenizer_dir"], str(out), beam_args=beam_args, log=lambda m: None, **kw
    )


def read_output(out):
    """{(dataset, episode_id): (split, file, [rows])} plus the per-file episode order (reader checks)."""
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    episodes = {}
    for entry in manifest["files"]:
        rows = pq.read_table(os.path.join(out, entry["path"])).to_pylist()
        assert len(rows) == entry["rows"]
        seen_in_file = []
        for row in rows:
            key = (row["dataset_name"], row["episode_id"])
            if not seen_in_file or seen_in_file[-1] != key:
                assert key not in episodes, f"episode {key} is not contiguous in one file"
                seen_in_file.append(key)
                episodes[key] = (entry["split"], entry["path"], [])
            episodes[key][2].append(row)
        assert len(seen_in_file) == entry["episodes"]
        assert [k for k in seen_in_file] == sorted(seen_in_file), "episodes are in key order within a file"
    for key, (_, _, rows) in episodes.items():
        assert [r["step_index"] for r in rows] == list(range(len(rows)))
        assert {r["num_steps"] for r in rows} == {len(rows)}
    return manifest, episodes


# --------------------------------------------------------------------------------------------------
# The independent reference
# --------------------------------------------------------------------------------------------------


def ref_normalize(x, block, mode):
    x = np.asarray(x, np.float32)
    mask = np.asarray(block["mask"], bool)
    if mode.startswith("fixed:"):
        low, high = (float(v) for v in mode[len("fixed:"):].split(","))
        y = np.float32(2) * (np.clip(x, np.float32(low), np.float32(high)) - np.float32(low)) / np.float32(high - low) - np.float32(1)
        return np.where(mask, y, x).astype(np.float32)
    if mode == "normal":
        mean = np.asarray(block["mean"], np.float64)
        std = np.asarray(block["std"], np.float64)
        y = (x - mean.astype(np.float32)) / (std + 1e-8).astype(np.float32)
        return np.where(mask, y, x).astype(np.float32)
    lo_key, hi_key = ("q01", "q99") if mode == "bounds_q99" else ("min", "max")
    low = np.asarray(block[lo_key], np.float64)
    high = np.asarray(block[hi_key], np.float64)
    y = np.clip(np.float32(2) * (x - low.astype(np.float32)) / (high - low + 1e-8).astype(np.float32) - np.float32(1), -1, 1)
    y = np.where(mask, y, x)
    return np.where(np.asarray(block["min"]) == np.asarray(block["max"]), np.float32(0), y).astype(np.float32)


def ref_tokens(y, vocab, encoding):
    y = np.clip(np.asarray(y, np.float64), -1.0, 1.0)
    if encoding.startswith("mu_law"):
        mu = float(encoding.split(":")[1]) if ":" in encoding else 255.0
        y = np.sign(y) * np.log1p(mu * np.abs(y)) / np.log1p(mu)
    return vocab - np.digitize(y, np.linspace(-1, 1, 256))


def ref_image(source, index):
    frame = source[index] if isinstance(source, np.ndarray) else tf.io.decode_jpeg(source[index], channels=3).numpy()
    resized = tf.image.resize(frame, (SIZE, SIZE), method="lanczos3", antialias=True).numpy()
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def expected_rows(episode, trajectory, block, tokenizer, chunk=1, normalization="bounds_q99", encoding="uniform", cameras=("primary",), proprio=False):
    action = np.asarray(trajectory.action, np.float32)
    t, d = action.shape
    normalized = ref_normalize(action, block, normalization)
    tokens = ref_tokens(normalized, 32000, encoding)
    rows = []
    for step in range(t):
        take = [min(step + i, t - 1) for i in range(chunk)]
        ids = [int(v) for v in tokens[take].reshape(-1)]
        text = f"In: What action should the robot take to {episode.language.lower()}?\nOut: " + tokenizer.decode(ids) + "</s>"
        input_ids = tokenizer(text, add_special_tokens=True).input_ids
        assert input_ids[-(len(ids) + 1):] == ids + [2]
        row = {
            "dataset_name": episode.dataset_name,
            "episode_id": episode.episode_id,
            "step_index": step,
            "num_steps": t,
            "instruction": episode.language,
            "input_ids": input_ids,
            "labels": [-100] * (len(input_ids) - len(ids) - 1) + ids + [2],
            "action_token_ids": ids,
            "action": action[step],
            "normalized_action": normalized[step],
            "action_chunk": action[take].reshape(-1),
            "action_chunk_mask": [step + i < t for i in range(chunk)],
            "normalized_action_chunk": normalized[take].reshape(-1),
        }
        for role in cameras:
            row[f"image_{role}"] = ref_image(episode.images[role], int(trajectory.step_index[step]))
        if proprio:  # proprio: the column's width; a narrower dataset's state is zero-padded to it
            own = np.asarray(trajectory.proprio[step], np.float32)
            row["proprio"] = np.concatenate([own, np.zeros(proprio - own.shape[0], np.float32)])
        rows.append(row)
    return rows


def expected_dataset(item, data, roles):
    """{episode_id: rows} for kept episodes and {episode_id: stage} for quarantined ones."""
    kept, quarantined = {}, {}
    for episode in source_episodes(item, roles):
        if not hasattr(episode, "steps"):
            quarantined[episode.episode_id] = "read"
            continue
        if not episode.language.strip():
            quarantined[episode.episode_id] = "shard"
            continue
        raw = [np.asarray(v) for v in episode.steps.values()]
        if not all(np.isfinite(v).all() for v in raw if v.dtype.kind == "f"):  # a NaN anywhere marks a corrupt recording
            quarantined[episode.episode_id] = "transform"
            continue
        try:
            trajectory = item.spec.transform(episode.steps)
        except ValueError:
            quarantined[episode.episode_id] = "transform"
            continue
        if not (np.isfinite(trajectory.action).all() and np.isfinite(trajectory.proprio).all()):
            quarantined[episode.episode_id] = "transform"
            continue
        kept[episode.episode_id] = (episode, trajectory)
    return kept, quarantined


def check_output(out, data, *, datasets, chunk=1, normalization="bounds_q99", encoding="uniform", cameras=("primary",), fraction=0.3, seed=0):
    manifest, got = read_output(out)
    verify_output(str(out), manifest)
    validate_json(manifest, "manifest")
    assert manifest["options"]["tokenization"] == "text_round_trip"
    assert manifest["options"]["vocab_size"] == 32000
    quarantine = [json.loads(line) for line in open(os.path.join(out, "quarantine", "quarantine.jsonl"))]
    checked = 0
    for item in [i for i in data["inputs"] if i.name in datasets]:
        kept, quarantined = expected_dataset(item, data, cameras)
        block = data["statistics"][item.name]["action"]
        assert {r["episode_id"]: r["stage"] for r in quarantine if r["dataset_name"] == item.name} == quarantined
        assert {eid for (name, eid) in got if name == item.name} == set(kept)
        splits = {"train": 0, "heldout": 0}
        for episode_id, (episode, trajectory) in kept.items():
            split, _, rows = got[(item.name, episode_id)]
            score = int.from_bytes(hashlib.sha256(f"{seed}\0{item.name}\0{episode_id}".encode()).digest()[:8], "big") / 2**64
            assert split == ("heldout" if score < fraction else "train")
            splits[split] += 1
            width = manifest["options"]["proprio_dim"]
            # every dataset's own width: options.proprio_dims when they differ, else the column's
            assert manifest["options"].get("proprio_dims", {}).get(item.name, width) == trajectory.proprio.shape[1]
            want = expected_rows(episode, trajectory, block, data["tokenizer"], chunk, normalization, encoding, cameras, width)
            assert len(rows) == len(want)
            for row, ref in zip(rows, want):
                assert set(row) == set(ref), (set(row) ^ set(ref))
                for column, value in ref.items():
                    if column.startswith("image_"):
                        image = np.array(Image.open(io.BytesIO(row[column])))
                        assert image.shape == (SIZE, SIZE, 3)
                        np.testing.assert_array_equal(image, value, err_msg=f"{column} of {episode_id} step {row['step_index']}")
                    elif isinstance(value, np.ndarray):
                        np.testing.assert_array_equal(np.asarray(row[column], np.float32), value, err_msg=column)
                    else:
                        assert row[column] == value, (column, episode_id, row["step_index"])
                checked += 1
        acc = manifest["accounting"][item.name]
        assert acc == {
            "read": len(kept) + len(quarantined),
            "train": splits["train"],
            "heldout": splits["heldout"],
            "quarantined": len(quarantined),
            "quarantined_by_stage": {s: list(quarantined.values()).count(s) for s in sorted(set(quarantined.values()))},
        }
        for split in ("train", "heldout"):
            want_rows = sum(len(got[(item.name, e)][2]) for e in kept if got[(item.name, e)][0] == split)
            assert manifest["datasets"][item.name][split] == {"episodes": splits[split], "rows": want_rows}
    assert checked == sum(s["rows"] for s in manifest["splits"].values())
    return manifest, got


def output_bytes(out):
    files = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, out)] = f.read()
    return files


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def main_output(data):
    """N=1, bounds_q99, uniform (OpenVLA's rows); 2 worker processes; small shards (several per split)."""
    out = data["root"] / "out_mp"
    run(data, out, beam_args=MULTI_PROCESS_2, heldout_fraction=0.3, target_shard_mb=0.04)
    return out


def test_every_column_of_every_row_matches_the_reference(main_output, data):
    manifest, got = check_output(main_output, data, datasets=("bridge_orig", "calvin"))
    assert manifest["splits"]["train"]["files"] >= 3 and manifest["splits"]["heldout"]["files"] >= 2
    # Bridge's state (8) and CALVIN's robot_obs (15) differ: one 15-wide column, each width recorded, none dropped
    assert manifest["options"]["proprio_dims"] == {"bridge_orig": 8, "calvin": 15}
    assert manifest["options"]["proprio_dim"] == 15
    datasets_per_split = {(s, name) for (name, _), (s, _, _) in got.items()}
    assert datasets_per_split == {(s, n) for s in ("train", "heldout") for n in ("bridge_orig", "calvin")}
    quarantine = [json.loads(line) for line in open(main_output / "quarantine" / "quarantine.jsonl")]
    reasons = {r["reason"] for r in quarantine}
    assert EMPTY in reasons
    assert any("finite" in r for r in reasons) and any("at least 3 steps" in r for r in reasons)
    assert all(set(r) == {"dataset_name", "episode_id", "stage", "reason"} for r in quarantine)


def test_manifest_lists_exactly_the_complete_files(main_output):
    manifest = verify_output(str(main_output))
    on_disk = {p for p in output_bytes(main_output) if p != "manifest.json"}
    assert on_disk == {f["path"] for f in manifest["files"]} | {manifest["quarantine"]["path"], manifest["inputs"]["statistics"]["path"]}
    copy = main_output / manifest["inputs"]["statistics"]["path"]
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == manifest["inputs"]["statistics"]["sha256"]
    for split in ("train", "heldout"):
        paths = [f["path"] for f in manifest["files"] if f["split"] == split]
        n = len(paths)
        assert paths == [f"{split}/shard-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    assert manifest["schema"]["arrow"] == ShardOptions(
        **{k: manifest["options"][k] for k in ("image_size", "cameras", "heldout_fraction", "seed", "action_chunk", "normalization",
                                               "action_encoding", "target_shard_bytes", "action_dim", "vocab_size", "eos_id",
                                               "model_max_length", "tokenization", "proprio_dim")}
    ).schema().to_string(show_schema_metadata=False)
    stats = manifest["inputs"]["statistics"]
    assert len(stats["sha256"]) == 64 and [f["name"] for f in manifest["inputs"]["tokenizer"]["files"]] == ["tokenizer.json", "tokenizer_config.json"]
    text = (main_output / "manifest.json").read_text()
    assert "tmp" not in text and str(main_output) not in text  # no absolute paths, no timestamps


def test_splits_are_disjoint_and_deterministic_across_runners(main_output, data, tmp_path):
    """FnApiRunner in memory (through the CLI) vs 2 worker processes: byte-identical, manifest included."""
    out = tmp_path / "out_mem"
    argv = ["shards", "--statistics", data["statistics_path"], "--tokenizer", data["tokenizer_dir"], "--output", str(out),
            "--image-size", str(SIZE), "--heldout-fraction", "0.3", "--target-shard-mb", "0.04", *IN_MEMORY]
    for item in data["inputs"]:
        argv += ["--dataset", f"{item.name}={item.path}"]
    assert cli.main(argv) == 0
    first, second = output_bytes(main_output), output_bytes(out)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], name
    _, got = read_output(out)
    train = {k for k, v in got.items() if v[0] == "train"}
    heldout = {k for k, v in got.items() if v[0] == "heldout"}
    assert train and heldout and not train & heldout


def test_chunks_fixed_normalization_and_mu_law(data, tmp_path):
    """N=3 with episodes of 1 and 2 steps (shorter than N), fixed:-0.65,0.65 and mu_law."""
    out = tmp_path / "out_chunk"
    run(data, out, action_chunk=3, normalization="fixed:-0.65,0.65", action_encoding="mu_law", heldout_fraction=0.3, seed=5)
    manifest, got = check_output(out, data, datasets=("bridge_orig", "calvin"), chunk=3, normalization="fixed:-0.65,0.65",
                                 encoding="mu_law", seed=5)
    assert manifest["options"]["action_encoding"] == "mu_law:255.0"
    short = [rows for _, _, rows in got.values() if len(rows) < 3]
    assert {len(rows) for rows in short} == {1, 2}
    assert short[0][-1]["action_chunk_mask"] == [True, False, False]
    assert len(short[0][0]["action_token_ids"]) == 21 and len(short[0][0]["action_chunk"]) == 21


def test_wrist_camera_and_normal_mode(data, tmp_path):
    out = tmp_path / "out_wrist"
    run(data, out, datasets=("calvin",), cameras="primary,wrist", normalization="normal", heldout_fraction=0.0, seed=7)
    manifest, got = check_output(out, data, datasets=("calvin",), normalization="normal", cameras=("primary", "wrist"), fraction=0.0, seed=7)
    assert manifest["splits"]["heldout"] == {"files": 0, "episodes": 0, "rows": 0, "bytes": 0}
    names = pq.read_schema(out / manifest["files"][0]["path"]).names
    assert names[-2:] == ["image_wrist", "proprio"]  # one dataset: its proprio (CALVIN robot_obs) is a column
    assert manifest["options"]["proprio_dim"] == 15


def test_failed_pipeline_leaves_no_manifest_and_no_partial_files(data, tmp_path, monkeypatch):
    real = shards_beam.write_shard_file

    def crash_after_first_file(root, split, index, *args, **kw):
        info = real(root, split, index, *args, **kw)  # a complete file lands in staging...
        if index == 1:
            raise RuntimeError("simulated worker crash")  # ...then the pipeline dies
        return info

    monkeypatch.setattr(shards_beam, "write_shard_file", crash_after_first_file)
    fresh = tmp_path / "fresh"
    with pytest.raises(Exception, match="simulated worker crash"):
        run(data, fresh, datasets=("calvin",), target_shard_mb=0.02)
    assert not fresh.exists()

    # Over an older complete output: the old output stays, untouched and valid.
    monkeypatch.setattr(shards_beam, "write_shard_file", real)
    old = tmp_path / "old"
    run(data, old, datasets=("calvin",), target_shard_mb=0.02)
    before = output_bytes(old)
    monkeypatch.setattr(shards_beam, "write_shard_file", crash_after_first_file)
    with pytest.raises(Exception, match="simulated worker crash"):
        run(data, old, datasets=("calvin",), target_shard_mb=0.02, seed=1)
    assert output_bytes(old) == before and sorted(os.listdir(old)) == ["heldout", "inputs", "manifest.json", "quarantine", "train"]
    verify_output(str(old))

    # An interrupt while publishing (here: writing the new manifest): publishing is all or nothing, so
    # the previous output is back, byte for byte (tests/faults/test_shards_publish.py fails every step).
    monkeypatch.setattr(shards_beam, "write_shard_file", real)
    real_write = shards_publish.write_bytes_atomic

    def crash_on_manifest(path, payload):
        if path.endswith("manifest.json"):
            raise KeyboardInterrupt("simulated crash while publishing")
        return real_write(path, payload)

    monkeypatch.setattr(shards_publish, "write_bytes_atomic", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        run(data, old, datasets=("calvin",), target_shard_mb=0.02, seed=1)
    assert output_bytes(old) == before and sorted(os.listdir(old)) == ["heldout", "inputs", "manifest.json", "quarantine", "train"]
    monkeypatch.setattr(shards_publish, "write_bytes_atomic", real_write)
    result = run(data, old, datasets=("calvin",), target_shard_mb=0.02, seed=1)
    verify_output(str(old), result.manifest)
    assert sorted(os.listdir(old)) == ["heldout", "inputs", "manifest.json", "quarantine", "train"]


def test_units_split_rule_plan_and_png():
    assert heldout_split(0, 0.0, "d", "e") == "train"
    score = int.from_bytes(hashlib.sha256(b"3\0bridge_orig\0train/x/7").digest()[:8], "big") / 2**64
    assert heldout_score(3, "bridge_orig", "train/x/7") == score
    sizes = [(("train", "a", f"{i}"), 10) for i in range(7)] + [(("heldout", "a", "z"), 100)]
    plan = plan_shards(list(reversed(sizes)), target_bytes=25)
    assert plan.episodes == {"train": (2, 2, 2, 1), "heldout": (1,)}
    assert [plan.shard_of(k) for k, _ in sizes] == [0, 0, 1, 1, 2, 2, 3, 0]
    with pytest.raises(ValueError, match="twice"):
        plan_shards(sizes + sizes[:1], 25)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    png = encode_png(image)
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(png))), image)
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), image)
    assert encode_png(image) == png
    index, mask = chunk_indices(2, 3)
    assert index.tolist() == [[0, 1, 1], [1, 1, 1]] and mask.tolist() == [[True, True, False], [True, False, False]]


def test_encoder_config_pickles_and_prompt_backends_agree(data, tmp_path):
    import pickle

    from apache_beam.internal import pickler  # what Beam ships DoFns with

    files = TokenizerFiles.from_dir(data["tokenizer_dir"])
    options = ShardOptions(
        image_size=SIZE, cameras=("primary",), heldout_fraction=0.1, seed=0, action_chunk=1, normalization="bounds_q99",
        action_encoding="uniform", target_shard_bytes=1 << 20, action_dim=7, vocab_size=32000, eos_id=2,
        model_max_length=2048, tokenization="text_round_trip",
    )
    hf = data["tokenizer"]
    backend_json = prompt_ids_backend(hf, chunk_width=7, vocab_size=32000)
    assert backend_json is not None  # the Llama-like fast tokenizer's Rust tokenizer matches HF on every probe
    stats = {"bridge_orig": data["statistics"]["bridge_orig"]["action"]}
    specs = {"bridge_orig": get_spec("bridge_orig")}
    by_files = EncoderConfig(options, specs, stats, tokenizer_files=files)
    by_backend = EncoderConfig(options, specs, stats, backend_json=backend_json, eos_token="</s>")
    for config in (by_files, by_backend):
        assert pickle.loads(pickle.dumps(config)) == config
        fn = pickler.loads(pickler.dumps(_EncodeEpisodeFn(config, str(tmp_path))))
        fn.setup()
        prompts = fn._encoder.prompts
        for instruction in ("Put the Carrot in the pot", "OPEN the drawer, then stop.", "  two  spaces "):
            text = f"In: What action should the robot take to {instruction.lower()}?\nOut: "
            assert prompts.prefix_ids(instruction) == hf(text).input_ids
            actions = [31744, 31999, 31872, 31800, 31801, 31802, 31744]
            assert prompts.full_text_ids(instruction, actions) == hf(text + hf.decode(actions) + "</s>").input_ids
    with pytest.raises(ValueError, match="exactly one"):
        EncoderConfig(options, specs, stats)


def test_ids_direct_tokenizer(data, tmp_path):
    """A byte-level tokenizer whose action ids do not round-trip through text: ids are built directly."""
    from vlaprep.synthetic.tokenizer import build_gpt2_like_tokenizer

    build_gpt2_like_tokenizer(tmp_path / "gpt2")
    files, tok, vocab, eos, _, mode = load_tokenizer(str(tmp_path / "gpt2"), chunk_width=14)
    assert (vocab, eos, mode) == (33000, 256, "ids_direct")
    item = data["inputs"][1]
    options = ShardOptions(
        image_size=SIZE, cameras=("primary",), heldout_fraction=0.0, seed=0, action_chunk=2, normalization="bounds",
        action_encoding="uniform", target_shard_bytes=1 << 20, action_dim=7, vocab_size=vocab, eos_id=eos,
        model_max_length=tok.model_max_length, tokenization=mode,
    )
    encoder = EpisodeEncoder(options, {item.name: item.spec}, {item.name: data["statistics"][item.name]["action"]}, tok)
    episode = source_episodes(item, ("primary",))[0]
    (split, name, episode_id), batch = encoder.encode(episode)
    assert (split, name, episode_id) == ("train", "calvin", episode.episode_id)
    trajectory = item.spec.transform(episode.steps)
    want = expected_rows(episode, trajectory, data["statistics"][item.name]["action"], data["tokenizer"], chunk=2, normalization="bounds")
    prefix = tok(f"In: What action should the robot take to {episode.language.lower()}?\nOut: ").input_ids
    for row, ref in zip(batch.to_pylist(), want):
        ids = [vocab - (32000 - i) for i in ref["action_token_ids"]]  # same bins, shifted to this vocabulary
        assert row["action_token_ids"] == ids
        assert row["input_ids"] == prefix + ids + [eos]
        assert row["labels"] == [-100] * len(prefix) + ids + [eos]


# --- bad arguments: one line, exit 2, nothing written ---------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    stats = dict(data["statistics"])
    narrow = json.loads(json.dumps(stats["bridge_orig"]))
    narrow["action"] = {k: v[:6] for k, v in narrow["action"].items()}
    (root / "narrow.json").write_text(json.dumps({"bridge_orig": narrow, "calvin": stats["calvin"]}))
    (root / "only_calvin.json").write_text(json.dumps({"calvin": stats["calvin"]}))
    (root / "broken_tok").mkdir()
    (root / "broken_tok" / "tokenizer.json").write_text("{not json")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(str(root / "small_tok"))
    return root


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--statistics": "only_calvin.json"}, "expected an entry for 'bridge_orig' in .*only_calvin.json, got entries \\['calvin'\\]; hint: run vlaprep stats with --dataset bridge_orig="),
        ({"--statistics": "narrow.json"}, "expected action statistics of width 7 .* for 'bridge_orig'"),
        ({"--tokenizer": "missing_dir"}, "expected --tokenizer to be a tokenizer directory"),
        ({"--tokenizer": "broken_tok"}, "expected a loadable tokenizer"),
        ({"--tokenizer": "small_tok"}, "expected a base vocabulary that holds the 256 action ids"),
        ({"--action-chunk": "300"}, "model_max_length 2048"),
        ({"--action-chunk": "0"}, "expected --action-chunk >= 1"),
        ({"--normalization": "fixed:1,-1"}, "invalid --normalization: expected LOW < HIGH"),
        ({"--normalization": "q95"}, "invalid --normalization"),
        ({"--action-encoding": "mu_law:-3"}, "invalid --action-encoding"),
        ({"--heldout-fraction": "1.0"}, "expected --heldout-fraction in \\[0, 1\\)"),
        ({"--heldout-fraction": "-0.1"}, "expected --heldout-fraction in \\[0, 1\\)"),
        ({"--cameras": "primary,wrist"}, "expected a wrist camera for dataset 'bridge_orig'"),
        ({"--cameras": "wrist"}, "expected --cameras primary or primary,wrist"),
    ],
)
def test_bad_arguments_fail_at_once(data, bad_inputs, tmp_path, capsys, change, message):
    import re

    out = tmp_path / "never"
    args = {"--statistics": data["statistics_path"], "--tokenizer": data["tokenizer_dir"], "--output": str(out)}
    for flag, value in change.items():
        args[flag] = str(bad_inputs / value) if flag in ("--statistics", "--tokenizer") else value
    argv = ["shards", *[x for kv in args.items() for x in kv], *IN_MEMORY]
    for item in data["inputs"]:
        argv += ["--dataset", f"{item.name}={item.path}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlaprep shards: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_output_dir_with_foreign_files_is_refused(data, tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ShardsArgumentError, match="expected --output to be empty or a previous vlaprep shards output"):
        run(data, tmp_path, datasets=("calvin",))
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_only_staging_of_dead_local_owners_is_reclaimed(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def staging(name, owner):
        directory = tmp_path / f".staging-{name}"
        (directory / "train").mkdir(parents=True)
        if owner is not None:
            (directory / ".owner.json").write_text(json.dumps(owner))

    staging("dead", {"host": socket.gethostname(), "pid": dead.pid})
    staging("alive", {"host": socket.gethostname(), "pid": os.getpid()})
    staging("other-host", {"host": socket.gethostname() + "-elsewhere", "pid": dead.pid})
    staging("no-owner", None)  # a --no-wait or remote job's staging: cannot tell, keep
    (tmp_path / "manifest.json").write_text("{}")
    messages = []
    assert reclaim_stale_staging(str(tmp_path), messages.append) == [".staging-dead"]
    assert sorted(os.listdir(tmp_path)) == [".staging-alive", ".staging-no-owner", ".staging-other-host", "manifest.json"]
    assert any("left alone" in m and ".staging-no-owner" in m for m in messages)


def _edited_calvin_copy(data, tmp_path):
    """A copy of the CALVIN dataset with one action of its first window changed, and statistics for it."""
    import shutil

    calvin = tmp_path / "calvin"
    shutil.copytree(next(i.path for i in data["inputs"] if i.name == "calvin"), calvin)
    window = list_calvin_windows(str(calvin))[0]
    frame = calvin_frame_path(window.split_dir, window.start + 1)
    with np.load(frame) as z:
        arrays = dict(z)
    arrays["rel_actions"] = np.clip(arrays["rel_actions"] + 0.25, -1, 1)
    np.savez(frame, **arrays)
    inputs = [data["inputs"][0], DatasetInput("calvin", str(calvin), get_spec("calvin"))]
    run_stats(inputs, str(tmp_path / "stats"), beam_args=IN_MEMORY, log=lambda m: None)
    return inputs, str(tmp_path / "stats" / "dataset_statistics.json")


def test_unchanged_dataset_rows_are_read_back_and_output_is_identical(data, tmp_path):
    """Incremental shards: after one dataset changes, the other's rows come from the previous output
    (checked by sha256), not from its sources; the result is byte for byte a run from the sources."""
    options = dict(image_size=SIZE, heldout_fraction=0.3, target_shard_mb=0.04, beam_args=IN_MEMORY)
    out = tmp_path / "out"
    before = run(data, out, **{k: v for k, v in options.items() if k != "image_size"}).manifest["inputs"]["datasets"]
    inputs, statistics = _edited_calvin_copy(data, tmp_path)
    logs = []
    again = run_shards(inputs, statistics, data["tokenizer_dir"], str(out), log=logs.append, **options)
    reused = [line for line in logs if "rows unchanged" in line]
    assert len(reused) == 1 and reused[0].startswith("[shards] bridge_orig:")
    scratch = tmp_path / "scratch"
    run_shards(inputs, statistics, data["tokenizer_dir"], str(scratch), log=lambda m: None, reuse_from=None, **options)
    first, second = output_bytes(out), output_bytes(scratch)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], name
    after = again.manifest["inputs"]["datasets"]  # the unchanged dataset kept its fingerprint, the edited one did not
    assert after["bridge_orig"]["rows_fingerprint"] == before["bridge_orig"]["rows_fingerprint"]
    assert after["calvin"]["rows_fingerprint"] != before["calvin"]["rows_fingerprint"]


def test_a_modified_previous_output_is_not_reused_silently(data, tmp_path):
    options = dict(heldout_fraction=0.3, target_shard_mb=0.04)
    out = tmp_path / "out"
    first = run(data, out, **options)
    victim = out / next(f["path"] for f in first.manifest["files"] if "bridge_orig" in f["datasets"])
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    inputs, statistics = _edited_calvin_copy(data, tmp_path)
    with pytest.raises(Exception, match="previous output was modified"):
        run_shards(inputs, statistics, data["tokenizer_dir"], str(out), image_size=SIZE, beam_args=IN_MEMORY,
                   log=lambda m: None, **options)
    assert json.loads((out / "manifest.json").read_text()) == first.manifest  # the old output stays published
