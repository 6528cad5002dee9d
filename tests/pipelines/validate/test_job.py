"""``vlaprep validate`` on hand-written shards and a tiny random LLaVA, checked against independent recounts.

Shards are written here with ``vlaprep.schemas.shards.shard_schema`` and a complete manifest
(``tests/manifest_helpers.py``: what ``vlaprep shards`` writes for those files, with the statistics copy
in ``inputs/``), so every stored value and its expected round-trip error are known. Expected numbers are computed from
openvla.md's formulas directly (bin index ``floor((x + 1) * 255 / 2)``, center ``-1 + (k + 0.5) * 2/255``),
not with ``ActionTokenizer``. Model metrics are recounted from ``predictions.jsonl``, and the
predictions themselves are re-derived with a hand-written greedy loop over the model's forward pass.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import pathlib
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from apache_beam.internal import pickler
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlaprep.pipelines import cli
from vlaprep.pipelines.validate.job import run_validate
from vlaprep.pipelines.validate.layout import ValidationError, load_layout
from vlaprep.pipelines.validate.metrics import MetricsSpec
from vlaprep.pipelines.validate.model import ModelSpec, VlaModelHandler, prompt_tail
from vlaprep.pipelines.validate.read import sample_indices
from vlaprep.schemas import validate_json
from vlaprep.schemas.layout import ManifestError
from vlaprep.schemas.shards import shard_schema
from vlaprep.synthetic.model import build_tiny_llava
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.action_tokenizer import ActionTokenizer
from vlaprep.transforms.normalization import normalize_actions
from vlaprep.transforms.prompt import build_training_ids_from_prefix, openvla_inference_prompt, prompt_prefix_ids



def _load_manifest_helpers():
    """``tests/manifest_helpers.py`` (importlib import mode: ``tests`` is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "manifest_helpers", pathlib.Path(__file__).resolve().parents[2] / "manifest_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_manifest = _load_manifest_helpers().write_manifest
IN_PROCESS = ("--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner",)
VOCAB = 32000
LOW_ID, HIGH_ID = VOCAB - 256, VOCAB - 1
INSTRUCTIONS = ("Put the eggplant in the pot", "pick up the red block", "open the top drawer")


# --------------------------------------------------------------------------------------------------
# Fixtures: tokenizer, tiny LLaVA, shard directories
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llava")
    tokenizer = build_llama_like_tokenizer(root / "tokenizer")
    build_tiny_llava(root / "model", root / "tokenizer", image_size=32, hidden=64, layers=2, seed=0)
    return {"tokenizer": tokenizer, "tokenizer_dir": str(root / "tokenizer"), "model_dir": str(root / "model")}


def png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def statistics_entry(actions: np.ndarray, mask) -> dict:
    """A hand-made dataset_statistics entry: exact min/max, q01/q99 = min/max (fine for a test)."""
    a = np.asarray(actions, np.float64)
    block = {
        "mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "max": a.max(0).tolist(), "min": a.min(0).tolist(),
        "q01": a.min(0).tolist(), "q99": a.max(0).tolist(), "mask": list(mask),
    }
    zeros = [0.0] * a.shape[1]
    return {"action": block, "proprio": {k: zeros for k in ("mean", "std", "max", "min", "q01", "q99")},
            "num_transitions": len(a), "num_trajectories": 1}


def episode_rows(dataset, episode_id, actions, instruction, stats, tokenizer, chunk, normalization, encoding, seed):
    """Rows of one episode, built the way schemas/shards.py describes them (chunk padded with the last step)."""
    tok = ActionTokenizer.from_encoding(encoding, vocab_size=VOCAB)
    actions = np.asarray(actions, np.float32)
    T, D = actions.shape
    prefix = prompt_prefix_ids(tokenizer, instruction)
    rows = []
    for t in range(T):
        steps = [min(t + i, T - 1) for i in range(chunk)]
        chunk_raw = actions[steps]  # [N, D]
        chunk_norm = normalize_actions(chunk_raw, stats["action"], normalization)
        ids = tok.encode(chunk_norm).reshape(-1)
        input_ids, labels = build_training_ids_from_prefix(prefix, ids, 2)
        rows.append({
            "dataset_name": dataset, "episode_id": episode_id, "step_index": t, "num_steps": T,
            "instruction": instruction, "input_ids": input_ids, "labels": labels,
            "action_token_ids": ids.tolist(), "action": actions[t].tolist(),
            "normalized_action": chunk_norm[0].tolist(), "action_chunk": chunk_raw.reshape(-1).tolist(),
            "action_chunk_mask": [t + i < T for i in range(chunk)],
            "normalized_action_chunk": chunk_norm.reshape(-1).tolist(), "image_primary": png(seed * 1000 + t),
        })
    return rows


def write_shards(root, episodes, statistics, *, tokenizer, chunk=1, normalization="bounds_q99", encoding="uniform",
                 rows_per_file=None, train_episodes=()):
    """episodes: [(dataset, episode_id, actions [T, D], instruction)] -> OUT with heldout/ (and train/), the
    statistics copy in inputs/ and a complete manifest.

    Returns the path of the statistics file outside OUT (what ``--statistics`` is given)."""
    os.makedirs(root, exist_ok=True)
    stats_path = os.path.join(root, "..", os.path.basename(root) + "_statistics.json")
    with open(stats_path, "w") as f:
        json.dump(statistics, f, indent=2)
    D = len(episodes[0][2][0])
    schema = shard_schema(D, chunk)
    for split, eps in (("heldout", episodes), ("train", train_episodes)):
        rows = []
        for i, (dataset, episode_id, actions, instruction) in enumerate(eps):
            rows += episode_rows(dataset, episode_id, actions, instruction, statistics[dataset], tokenizer,
                                 chunk, normalization, encoding, seed=i)
        if not rows:
            continue
        per_file = rows_per_file or len(rows)
        parts = [rows[i : i + per_file] for i in range(0, len(rows), per_file)]
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for k, part in enumerate(parts):
            path = f"{split}/shard-{k:05d}-of-{len(parts):05d}.parquet"
            table = pa.Table.from_pylist(part, schema=schema)
            pq.write_table(table, os.path.join(root, path), row_group_size=3)  # several row groups per file
    write_manifest(root, statistics_path=stats_path, tokenizer=tokenizer, options={
        "image_size": 32, "cameras": ["primary"], "action_chunk": chunk, "normalization": normalization,
        "action_encoding": encoding, "action_dim": D, "n_bins": 256, "vocab_size": VOCAB, "eos_id": 2})
    return stats_path


# Known-error dataset: fixed:-1,1 normalization (y = x exactly in float32), dims: two normalized, one
# pass-through gripper. Every value's error is worked out from the bin formula below.
KNOWN_DIM0 = [-1.0, 0.0, 1.0, 2.0, -3.0, 0.5, 0.25]  # includes out-of-range 2.0 and -3.0
KNOWN_DIM1 = [0.5, 0.5, -0.5, 0.0, 0.999, 0.1, -0.75]
KNOWN_GRIP = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def ref_center(y):
    """OpenVLA bin center of clip(y, -1, 1): bin k = floor((y + 1) * 255 / 2), capped at 254 (top-bin quirk)."""
    y = min(max(float(y), -1.0), 1.0)
    k = min(math.floor((y + 1.0) * 255.0 / 2.0), 254)
    return -1.0 + (k + 0.5) * 2.0 / 255.0


@pytest.fixture(scope="module")
def known(tiny, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("known") / "shards")
    actions = np.stack([KNOWN_DIM0, KNOWN_DIM1, KNOWN_GRIP], axis=1).astype(np.float32)
    stats = {"known": statistics_entry(actions, [True, True, False])}
    episodes = [("known", "ep0", actions[:4], INSTRUCTIONS[0]), ("known", "ep1", actions[4:], INSTRUCTIONS[1])]
    stats_path = write_shards(root, episodes, stats, tokenizer=tiny["tokenizer"], chunk=2,
                              normalization="fixed:-1,1", rows_per_file=5)
    return {"root": root, "stats_path": stats_path, "episodes": episodes}


@pytest.fixture(scope="module")
def two_datasets(tiny, tmp_path_factory):
    """Bridge-like (7 dims, gripper masked out, q01/q99 bounds) and a second dataset with a constant dim;
    mu-law tokens, chunk 2, three files, a train split beside heldout."""
    rng = np.random.default_rng(7)
    a = np.concatenate([rng.normal(0, 0.02, (30, 6)), rng.integers(0, 2, (30, 1))], axis=1).astype(np.float32)
    b = np.concatenate([rng.uniform(-2, 3, (20, 6)), np.ones((20, 1))], axis=1).astype(np.float32)
    b[:, 3] = 0.25  # min == max -> normalized to 0 (masked in)
    stats = {"bridge_orig": statistics_entry(a, [True] * 6 + [False]), "other": statistics_entry(b, [True] * 7)}
    # q01/q99 inside the data range so some values saturate
    for name, arr in (("bridge_orig", a), ("other", b)):
        stats[name]["action"]["q01"] = np.quantile(arr.astype(np.float64), 0.1, axis=0).tolist()
        stats[name]["action"]["q99"] = np.quantile(arr.astype(np.float64), 0.9, axis=0).tolist()
    episodes = [
        ("bridge_orig", "b0", a[:12], INSTRUCTIONS[0]),
        ("bridge_orig", "b1", a[12:30], INSTRUCTIONS[1]),
        ("other", "o0", b[:9], INSTRUCTIONS[2]),
        ("other", "o1", b[9:], INSTRUCTIONS[0]),
    ]
    root = str(tmp_path_factory.mktemp("two") / "shards")
    stats_path = write_shards(root, episodes, stats, tokenizer=tiny["tokenizer"], chunk=2, encoding="mu_law:255",
                              rows_per_file=20, train_episodes=[("bridge_orig", "t0", a[:3], INSTRUCTIONS[2])])
    return {"root": root, "stats_path": stats_path, "stats": stats, "episodes": episodes}


@pytest.fixture(scope="module")
def validated(tiny, two_datasets, tmp_path_factory):
    """The CLI run every model test reads: 7 samples, batch 3 (left padding), CPU."""
    out = str(tmp_path_factory.mktemp("val"))
    argv = ["validate", "--shards", two_datasets["root"], "--model", tiny["model_dir"], "--output", out,
            "--batch-size", "3", "--device", "cpu", "--max-samples", "7", "--statistics", two_datasets["stats_path"],
            *IN_PROCESS]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "validation_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, "predictions.jsonl")) as f:
        predictions = [json.loads(line) for line in f]
    return {"out": out, "report": report, "predictions": predictions}


# --------------------------------------------------------------------------------------------------
# Data round trip
# --------------------------------------------------------------------------------------------------


def test_round_trip_matches_hand_computed_errors(tiny, known, tmp_path):
    result = run_validate(known["root"], tiny["model_dir"], str(tmp_path), device="cpu", max_samples=2,
                          statistics=known["stats_path"], beam_args=IN_PROCESS, log=lambda m: None)
    block = result.report["round_trip"]["datasets"]["known"]
    # every stored value: the chunk of 2 per row, padded with the episode's last step
    values = []
    for _, _, actions, _ in known["episodes"]:
        T = len(actions)
        for t in range(T):
            values += [actions[min(t + i, T - 1)] for i in range(2)]
    values = np.asarray(values, np.float64)  # [rows * 2, 3]
    assert block["rows"] == 7 and block["values"] == values.size
    for d, entry in enumerate(block["per_dim"]):
        x = values[:, d]
        restored = np.array([ref_center(v) for v in x])  # fixed:-1,1 and pass-through: raw == normalized
        err = np.abs(restored - x)
        in_range = np.abs(x) <= 1
        assert entry["values"] == len(x)
        assert entry["raw_abs_error_max"] == pytest.approx(err.max(), abs=1e-12)
        assert entry["raw_abs_error_mean"] == pytest.approx(err.mean(), abs=1e-12)
        assert entry["raw_abs_error_max_in_range"] == pytest.approx(err[in_range].max(), abs=1e-12)
        assert entry["in_range_fraction"] == pytest.approx(in_range.mean())
        assert entry["saturated_fraction"] == pytest.approx((np.abs(x) >= 1).mean())
        assert entry["top_bin_values"] == entry["top_bin_roundtrip_to_next"] == int((x >= 1).sum())
        assert entry["in_range_within_half_bin"] == 1.0
        assert entry["token_matches_encoding"] == 1.0
        assert entry["token_roundtrip_accuracy"] == 1.0
        assert entry["invalid_token_ids"] == 0 and entry["normalized_column_max_abs_diff"] == 0.0
        assert entry["normalized"] is (d < 2) and entry["constant"] is False
    # the worked numbers themselves: +-1.0 come back 1/255 off, 2.0 and -3.0 (clipped) 1 + 1/255 and 2 + 1/255
    assert block["per_dim"][0]["raw_abs_error_max"] == pytest.approx(2.0 + 1.0 / 255)  # -3.0 -> -1 + 1/255
    assert block["per_dim"][2]["raw_abs_error_max"] == pytest.approx(1.0 / 255)  # gripper 1.0 -> 0.99608
    overall = result.report["round_trip"]["overall"]
    assert overall["values"] == values.size
    assert overall["raw_abs_error_max"] == pytest.approx(2.0 + 1.0 / 255)
    assert overall["top_bin_values"] == int((values >= 1).sum())


def test_round_trip_mu_law_chunks_and_constant_dim(validated, two_datasets):
    report = validated["report"]
    assert report["manifest"]["action_encoding"] == "mu_law:255" and report["manifest"]["action_chunk"] == 2
    assert report["manifest"]["dataset_rows"] == {"bridge_orig": 30, "other": 20}
    for name, block in report["round_trip"]["datasets"].items():
        assert block["token_matches_encoding"] == 1.0
        assert block["in_range_within_half_bin"] == 1.0
        assert block["token_roundtrip_accuracy"] == 1.0
        assert block["invalid_token_ids"] == 0
        assert block["top_bin_roundtrip_to_next"] == block["top_bin_values"]
        assert 0 < block["saturated_fraction"] < 1  # q01/q99 at the 10th/90th percentile
    other = report["round_trip"]["datasets"]["other"]["per_dim"]
    assert other[3]["constant"] and other[3]["raw_abs_error_max"] == pytest.approx(0.0, abs=1e-7)
    # independent raw error for bridge dim 0 (masked in, q01/q99): mu-law center of the stored bin
    stats = two_datasets["stats"]["bridge_orig"]["action"]
    mu = 255.0
    errs, x_all = [], []
    for dataset, _, actions, _ in two_datasets["episodes"]:
        if dataset != "bridge_orig":
            continue
        T = len(actions)
        for t in range(T):
            for i in range(2):
                x = float(actions[min(t + i, T - 1), 0])
                q01, q99 = stats["q01"][0], stats["q99"][0]
                y = min(max(2 * (x - q01) / (q99 - q01 + 1e-8) - 1, -1.0), 1.0)
                c = math.copysign(math.log1p(mu * abs(y)) / math.log1p(mu), y)
                center = ref_center(c)
                yd = math.copysign(math.expm1(abs(center) * math.log1p(mu)) / mu, center)
                errs.append(abs(0.5 * (yd + 1) * (q99 - q01) + q01 - x))
                x_all.append(x)
    dim0 = report["round_trip"]["datasets"]["bridge_orig"]["per_dim"][0]
    assert dim0["values"] == len(errs)
    assert dim0["raw_abs_error_max"] == pytest.approx(max(errs), rel=1e-6)
    assert dim0["raw_abs_error_mean"] == pytest.approx(float(np.mean(errs)), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def test_report_validates_and_max_samples_is_honored(validated):
    report = validated["report"]
    validate_json(report, "validation_report")
    model = report["model"]
    assert model["samples"] == 7 == len(validated["predictions"]) == model["max_samples"]
    assert sum(b["samples"] for b in model["datasets"].values()) == 7
    assert model["device"] == "cpu" and model["dtype"] == "float32" and model["kind"] == "native"
    assert model["new_tokens_per_sample"] == 14 and model["samples_per_second"] > 0
    assert model["chance_exact_accuracy"] == 1 / 256
    # the 7 rows are spread evenly over the 50 heldout rows (both datasets), not the first 7
    assert {p["dataset_name"] for p in validated["predictions"]} == {"bridge_orig", "other"}


def test_generation_is_restricted_to_action_ids(validated):
    for p in validated["predictions"]:
        assert len(p["generated_token_ids"]) == 14
        assert all(LOW_ID <= i <= HIGH_ID for i in p["generated_token_ids"])
    assert validated["report"]["model"]["overall"]["outside_action_range"] == 0


def test_model_metrics_equal_an_independent_recount(validated, two_datasets):
    report, preds = validated["report"], validated["predictions"]
    stats = two_datasets["stats"]

    def center(i):  # mu-law decode, from the formula
        c = -1.0 + (min(VOCAB - i - 1, 254) + 0.5) * 2.0 / 255.0
        return math.copysign(math.expm1(abs(c) * math.log1p(255.0)) / 255.0, c)

    def recount(rows):
        g = np.array([r["generated_token_ids"] for r in rows]).reshape(-1, 7)
        s = np.array([r["action_token_ids"] for r in rows]).reshape(-1, 7)
        dg, ds = np.vectorize(center)(g), np.vectorize(center)(s)
        raw = []
        for r, a, b in zip(np.repeat([r["dataset_name"] for r in rows], 2), dg, ds):
            st = stats[r]["action"]
            lo, hi, m = np.array(st["q01"]), np.array(st["q99"]), np.array(st["mask"])
            un = lambda y: np.where(m, 0.5 * (y + 1) * (hi - lo) + lo, y)
            raw.append(np.abs(un(a) - un(b)))
        return {
            "exact_accuracy": (g == s).mean(), "within_one_bin_accuracy": (np.abs(g - s) <= 1).mean(),
            "l1_normalized": np.abs(dg - ds).mean(), "l1_raw": np.mean(raw),
            "per_dim_exact": (g == s).mean(axis=0),
        }

    for name, block in [("overall", report["model"]["overall"])] + list(report["model"]["datasets"].items()):
        rows = preds if name == "overall" else [p for p in preds if p["dataset_name"] == name]
        want = recount(rows)
        for key in ("exact_accuracy", "within_one_bin_accuracy", "l1_normalized", "l1_raw"):
            assert 0 <= block[key] and (block[key] <= 1 or key == "l1_raw")
            assert block[key] == pytest.approx(want[key], abs=1e-9), (name, key)
        assert [d["exact_accuracy"] for d in block["per_dim"]] == pytest.approx(want["per_dim_exact"].tolist())
    # the stored ids in predictions.jsonl are the shard's ids
    table = pa.concat_tables([pq.read_table(os.path.join(two_datasets["root"], p)) for p in sorted(
        f"heldout/{n}" for n in os.listdir(os.path.join(two_datasets["root"], "heldout")))])
    stored = {(r["dataset_name"], r["episode_id"], r["step_index"]): r["action_token_ids"] for r in table.to_pylist()}
    for p in preds:
        assert stored[(p["dataset_name"], p["episode_id"], p["step_index"])] == p["action_token_ids"]


def test_predictions_equal_a_hand_written_greedy_loop(tiny, validated, two_datasets):
    """Batch 3 with left padding in the pipeline == one sample at a time through model(...) here."""
    import torch
    from transformers import AutoProcessor

    from vlaprep.pipelines.validate.model import image_text_auto_class  # AutoModelForImageTextToText, or 4.45's Vision2Seq

    model = image_text_auto_class().from_pretrained(tiny["model_dir"], local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(tiny["model_dir"], local_files_only=True)
    rows = {}
    for name in os.listdir(os.path.join(two_datasets["root"], "heldout")):
        for r in pq.read_table(os.path.join(two_datasets["root"], "heldout", name)).to_pylist():
            rows[(r["dataset_name"], r["episode_id"], r["step_index"])] = r
    for p in validated["predictions"]:
        r = rows[(p["dataset_name"], p["episode_id"], p["step_index"])]
        image = Image.open(io.BytesIO(r["image_primary"])).convert("RGB")
        enc = processor(text="<image>" + openvla_inference_prompt(r["instruction"]), images=image, return_tensors="pt")
        ids = enc["input_ids"]
        assert ids[0, -1].item() != 29871
        ids = torch.cat([ids, torch.tensor([[29871]])], dim=1)  # OpenVLA's predict_action rule
        out = []
        with torch.no_grad():
            for _ in range(14):
                logits = model(input_ids=ids, pixel_values=enc["pixel_values"]).logits[0, -1]
                masked = torch.full_like(logits, -math.inf)
                masked[LOW_ID : HIGH_ID + 1] = logits[LOW_ID : HIGH_ID + 1]
                nxt = int(masked.argmax())
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert out == p["generated_token_ids"], p


def test_cli_prints_a_summary(tiny, known, tmp_path, capsys):
    argv = ["validate", "--shards", known["root"], "--model", tiny["model_dir"], "--output", str(tmp_path),
            "--max-samples", "2", "--statistics", known["stats_path"], *IN_PROCESS]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "data round trip" in out and "samples/s" in out and "validation_report.json" in out


# --------------------------------------------------------------------------------------------------
# Refusals and units
# --------------------------------------------------------------------------------------------------


def test_remote_code_checkpoint_is_refused_without_the_flag(known, tmp_path, capsys):
    model_dir = tmp_path / "openvla"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "openvla",
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
    }))
    with pytest.raises(ValidationError, match="pass --trust-remote-code"):
        run_validate(known["root"], str(model_dir), str(tmp_path / "val"), statistics=known["stats_path"])
    argv = ["validate", "--shards", known["root"], "--model", str(model_dir), "--output", str(tmp_path / "val"),
            "--statistics", known["stats_path"]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trust-remote-code" in err and "AutoModelForVision2Seq" in err
    assert not (tmp_path / "val" / "validation_report.json").exists()


def test_remote_code_path_with_the_flag(tiny, known, tmp_path):
    """A checkpoint whose class ships as code (auto_map AutoModelForVision2Seq), loaded via
    get_class_from_dynamic_module; same predictions as the native class on the same weights."""
    model_dir = tmp_path / "remote"
    shutil.copytree(tiny["model_dir"], model_dir)
    (model_dir / "modeling_fakevla.py").write_text(
        "from transformers import LlavaForConditionalGeneration\n\n"
        "FakeVLA = LlavaForConditionalGeneration  # a subclass would lose LLaVA's checkpoint key mapping\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForVision2Seq": "modeling_fakevla.FakeVLA"}
    (model_dir / "config.json").write_text(json.dumps(config))
    kw = dict(device="cpu", max_samples=3, batch_size=3, statistics=known["stats_path"], beam_args=IN_PROCESS, log=lambda m: None)
    remote = run_validate(known["root"], str(model_dir), str(tmp_path / "a"), trust_remote_code=True, **kw)
    native = run_validate(known["root"], tiny["model_dir"], str(tmp_path / "b"), **kw)
    assert remote.report["model"]["kind"] == "remote_code"
    with open(remote.predictions_path) as a, open(native.predictions_path) as b:
        assert a.read() == b.read()


def test_statistics_must_match_the_manifest_hash(tiny, known, two_datasets, tmp_path):
    # without the flag: the manifest's copy (inputs/dataset_statistics.json, as vlaprep shards writes it)
    copy_path = os.path.join(known["root"], "inputs", "dataset_statistics.json")
    assert load_layout(known["root"], "heldout").statistics_source == copy_path
    # --statistics overrides it, and must hash to the manifest's inputs.statistics.sha256 too
    assert load_layout(known["root"], "heldout", known["stats_path"]).statistics_source == known["stats_path"]
    with pytest.raises(ValidationError, match="sha256"):
        load_layout(known["root"], "heldout", two_datasets["stats_path"])
    with pytest.raises(ValidationError, match="got splits \\['heldout'\\]"):
        load_layout(known["root"], "train", known["stats_path"])
    layout = load_layout(two_datasets["root"], "train", two_datasets["stats_path"])
    assert layout.rows == 3 and layout.action_dim == 7 and layout.action_chunk == 2
    # a copy that is not the statistics the rows were written with is refused; the flag still overrides it
    copy = tmp_path / "shards"
    shutil.copytree(known["root"], copy)
    shutil.copy(two_datasets["stats_path"], copy / "inputs" / "dataset_statistics.json")
    with pytest.raises(ValidationError, match="sha256"):
        load_layout(str(copy), "heldout")
    assert load_layout(str(copy), "heldout", known["stats_path"]).statistics_source == known["stats_path"]
    # no copy and no flag: one error saying what to pass
    os.remove(copy / "inputs" / "dataset_statistics.json")
    with pytest.raises(ValidationError, match="no such file; hint: pass --statistics FILE"):
        load_layout(str(copy), "heldout")
    # nothing else is looked for: a manifest key the writer never writes makes the manifest invalid
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["statistics_path"] = known["stats_path"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="does not match"):
        load_layout(str(copy), "heldout")


def test_llava_of_size_hits_the_parameter_target(tiny):
    """Shape only (meta device: no memory, no time); the GPU benchmark builds the real one."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vlaprep.synthetic.model import _add_special_tokens, _configs, llava_parameter_count, size_for_params

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["tokenizer_dir"])  # a fresh copy: tokens get added
    _add_special_tokens(tokenizer)
    for target in (1e9, 3e8):
        size = size_for_params(target, vocab=len(tokenizer))
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(_configs(size, tokenizer))
        count = sum(p.numel() for p in model.parameters())
        assert count == llava_parameter_count(size, len(tokenizer))
        assert abs(count - target) / target < 0.05
        assert size.num_image_tokens == 256  # 224 px, patch 14: OpenVLA's 256 patches


def test_units_sampling_prompt_tail_and_pickling(tiny, known):
    assert sample_indices(10, 4) == [0, 2, 5, 7]
    assert sample_indices(3, 10) == [0, 1, 2] and sample_indices(5, None) == [0, 1, 2, 3, 4]
    drop, add = prompt_tail(tiny["tokenizer"], "Put the eggplant in the pot")
    assert drop == () and add == (29871,)  # OpenVLA: append the lone space when missing
    handler = VlaModelHandler(ModelSpec(tiny["model_dir"], 14, LOW_ID, HIGH_ID, batch_size=5))
    assert handler.batch_elements_kwargs() == {"min_batch_size": 5, "max_batch_size": 5}
    clone = pickler.loads(pickler.dumps(handler))
    assert clone.spec == handler.spec
    layout = load_layout(known["root"], "heldout", known["stats_path"])
    assert MetricsSpec.from_layout(pickler.loads(pickler.dumps(layout))) == MetricsSpec.from_layout(layout)


def test_predictions_jsonl_matches_its_schema(validated):
    """Every line of predictions.jsonl against schemas/predictions.schema.json, and what the schema refuses."""
    import copy

    import jsonschema

    from vlaprep.pipelines.validate.job import validate_predictions
    from vlaprep.schemas import load_json_schema

    lines = validated["predictions"]
    validate_predictions(lines)
    schema = load_json_schema("predictions")
    assert set(schema["required"]) == set(lines[0]) == {
        "dataset_name", "episode_id", "step_index", "action_token_ids", "generated_token_ids"}
    good = lines[0]
    broken = []
    for key in good:
        missing = copy.deepcopy(good)
        del missing[key]
        broken.append(missing)
    broken += [
        {**good, "extra": 1},
        {**good, "step_index": -1},
        {**good, "step_index": "3"},
        {**good, "generated_token_ids": [str(i) for i in good["generated_token_ids"]]},
        {**good, "action_token_ids": []},
        {**good, "generated_token_ids": good["generated_token_ids"][:-1]},  # lengths differ
    ]
    for record in broken:
        with pytest.raises(jsonschema.ValidationError):
            validate_predictions([good, record])


# --------------------------------------------------------------------------------------------------
# Shards in an object store: read in place, each file checked against the manifest
# --------------------------------------------------------------------------------------------------


def _without_timings(report: dict) -> dict:
    """The report without what names where the shards are (``shards``, the statistics copy) and timings."""
    report = json.loads(json.dumps(report))
    report.pop("shards")
    report["manifest"].pop("statistics")
    report.pop("wall_seconds", None)
    model = report.get("model", {})
    for key in [k for k in model if "seconds" in k or k == "samples_per_second"]:
        model.pop(key)
    return report


@pytest.mark.timeout(300)
def test_shards_in_a_bucket_are_read_in_place_and_a_changed_file_is_refused(tiny, two_datasets, gcs_prefix, tmp_path):
    from vlaprep import paths

    remote = paths.join(gcs_prefix, "shards")
    paths.copy_tree(two_datasets["root"], remote)
    kw = dict(device="cpu", max_samples=5, batch_size=2, beam_args=IN_PROCESS, log=lambda m: None)
    local = run_validate(two_datasets["root"], tiny["model_dir"], str(tmp_path / "local"), **kw)
    streamed = run_validate(remote, tiny["model_dir"], str(tmp_path / "remote"), **kw)
    assert streamed.report["shards"] == remote
    assert streamed.report["manifest"]["statistics"] == paths.join(remote, "inputs", "dataset_statistics.json")
    assert _without_timings(streamed.report) == _without_timings(local.report)
    with open(streamed.predictions_path) as a, open(local.predictions_path) as b:
        assert a.read() == b.read()
    assert not list(tmp_path.glob("**/*.parquet"))  # nothing was copied to local disk

    manifest = json.loads(paths.read_text(paths.join(remote, "manifest.json")))
    victim = next(f["path"] for f in manifest["files"] if f["split"] == "heldout")
    data = bytearray(paths.read_bytes(paths.join(remote, victim)))
    data[len(data) // 2] ^= 0xFF
    paths.write_bytes_atomic(paths.join(remote, victim), bytes(data))
    with pytest.raises(ValidationError, match=f"expected {victim} with sha256 .* got"):
        run_validate(remote, tiny["model_dir"], str(tmp_path / "tampered"), **kw)
