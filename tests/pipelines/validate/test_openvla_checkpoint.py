"""``vlaprep validate`` on a tiny checkpoint built with OpenVLA's own HF classes == OpenVLA's ``predict_action``.

The checkpoint (``vlaprep.synthetic.openvla.build_tiny_openvla``): OpenVLAConfig / OpenVLAForActionPrediction /
PrismaticImageProcessor from ``../shared/reference/openvla_hf`` (unmodified), fused DINOv2-reg4 + SigLIP-style
timm towers and a Llama text model, all tiny, weights drawn so that rows predict different ids, saved as
openvla-7b is (sharded safetensors + index, tokenizer with ``<PAD>``, preprocessor_config.json).

``openvla_worker.py`` (a subprocess: timm / torchvision stay out of this process) runs vlaprep's validation
(batch 1, batch 8 through the CLI; chunked shards with N = 2, batch 8) and, for every held-out row,
OpenVLA's ``predict_action`` as its README calls it. Here: the ids are equal on every row, they vary between
rows, and ``predict_action``'s un-normalized actions equal the stored statistics applied by hand to vlaprep's ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vlaprep.pipelines.validate.job import validate_predictions
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openvla_worker.py")
LOW, HIGH = 31744, 31999
D = 7


@pytest.fixture(scope="module")
def run(openvla_code, openvla_deps, helpers, tmp_path_factory):
    h = helpers
    root = tmp_path_factory.mktemp("openvla")
    tokenizer = build_llama_like_tokenizer(root / "tokenizer")
    rng = np.random.default_rng(3)
    episodes, actions = h.bridge_like_episodes(rng, episodes=5, steps=4)  # 20 rows, 5 instructions
    stats = {"bridge_orig": h.statistics_entry(actions, [True] * 6 + [False])}
    plain_stats = h.write_shards(root / "plain", episodes, stats, tokenizer, chunk=1)
    chunk_stats = h.write_shards(root / "chunk", episodes[:3], stats, tokenizer, chunk=2)
    action = stats["bridge_orig"]["action"]
    norm_stats = {
        "bridge_orig": {"action": action},
        # OFT-style chunk of 2: predict_action generates len(q01) = 2 * 7 ids with the statistics tiled
        "bridge_orig_chunk2": {"action": {k: action[k] * 2 for k in ("q01", "q99", "mask")}},
    }
    spec = {
        "code_dir": openvla_code,
        "tokenizer_dir": str(root / "tokenizer"),
        "model_dir": str(root / "openvla-tiny"),
        "norm_stats": norm_stats,
        "max_shard_size": "6MB",  # several safetensors shards + index, as openvla-7b
        "work": str(root / "work"),
        "out": str(root / "result.json"),
        "beam_args": list(h.IN_PROCESS),
        "shards": {
            "plain": {"root": str(root / "plain"), "stats": plain_stats, "unnorm_key": "bridge_orig", "batches": [1, 8], "cli": 8},
            "chunk": {"root": str(root / "chunk"), "stats": chunk_stats, "unnorm_key": "bridge_orig_chunk2", "batches": [8]},
        },
    }
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec))
    # one thread: tiny matrices gain nothing from more, and OpenMP spinning on a shared 2-core machine costs minutes
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(root / "hf_modules"),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, WORKER, str(spec_path)], capture_output=True, text=True, cwd=h.REPO, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((root / "result.json").read_text())
    result["stats"] = stats
    result["model_dir"] = spec["model_dir"]
    result["code_dir"] = openvla_code
    return result


def by_key(lines):
    return {f"{p['dataset_name']}/{p['episode_id']}/{p['step_index']}": p for p in lines}


def test_checkpoint_has_openvla_7b_layout(run):
    files = set(os.listdir(run["model_dir"]))
    assert {"config.json", "configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py",
            "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= files
    assert len([f for f in files if f.startswith("model-") and f.endswith(".safetensors")]) >= 2
    config = json.loads(open(os.path.join(run["model_dir"], "config.json")).read())
    assert config["model_type"] == "openvla" and config["architectures"] == ["OpenVLAForActionPrediction"]
    assert config["auto_map"]["AutoModelForVision2Seq"] == "modeling_prismatic.OpenVLAForActionPrediction"
    assert config["use_fused_vision_backbone"] is True and config["text_config"]["vocab_size"] == 32064
    for name in ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py"):  # unmodified
        with open(os.path.join(run["model_dir"], name), "rb") as a, open(os.path.join(run["code_dir"], name), "rb") as b:
            assert a.read() == b.read()


def test_reference_ids_vary_between_rows(run):
    """A match proves something only if the model's answer depends on the row."""
    ref = run["reference"]["plain"]
    ids = np.array([v["ids"] for v in ref.values()])  # [rows, 7]
    assert ids.shape == (20, D)
    assert ((ids >= LOW) & (ids <= HIGH)).all()  # unrestricted predict_action picks action ids (the head's design)
    assert len({tuple(r) for r in ids}) >= 15  # nearly every row its own answer
    assert all(len(set(ids[:, d])) >= 5 for d in range(D))  # and every position varies


@pytest.mark.parametrize("run_name", ["plain-b1", "plain-b8"])
def test_vlaprep_ids_equal_predict_action_on_every_row(run, run_name):
    ref = run["reference"]["plain"]
    got = by_key(run["vlaprep"][run_name])
    assert sorted(got) == sorted(ref)  # every held-out row (no --max-samples)
    mismatches = {k: (got[k]["generated_token_ids"], ref[k]["ids"]) for k in ref if got[k]["generated_token_ids"] != ref[k]["ids"]}
    assert not mismatches
    batch = int(run_name.split("-b")[1])
    sizes = [rows for rows, _ in run["batches"][run_name]]
    assert max(sizes) == batch and sum(sizes) == 20  # really batched (the last batch may be smaller)
    if batch > 1:  # and a batch mixed prompt lengths, so left padding was exercised
        assert any(len(lengths) > 1 for _, lengths in run["batches"][run_name])
    report = run["reports"][run_name]
    assert report["kind"] == "remote_code" and report["dtype"] == "float32" and report["device"] == "cpu"
    assert report["batch_size"] == int(run_name.split("-b")[1]) and report["samples"] == 20
    assert report["outside_action_range"] == 0


def test_chunked_shards_ask_for_n_times_d_ids(run):
    ref = run["reference"]["chunk"]
    got = by_key(run["vlaprep"]["chunk-b8"])
    assert run["reports"]["chunk-b8"]["new_tokens_per_sample"] == 2 * D
    assert sorted(got) == sorted(ref) and len(ref) == 12
    for key, r in ref.items():
        assert len(r["ids"]) == 2 * D
        assert got[key]["generated_token_ids"] == r["ids"], key
        assert len(got[key]["action_token_ids"]) == 2 * D


def test_predict_action_actions_are_the_ids_unnormalized(run):
    """predict_action's actions == OpenVLA's formula (openvla.md §3, §5) applied by hand to vlaprep's ids."""
    st = run["stats"]["bridge_orig"]["action"]
    q01, q99, mask = np.array(st["q01"]), np.array(st["q99"]), np.array(st["mask"])
    got = by_key(run["vlaprep"]["plain-b8"])
    for key, r in run["reference"]["plain"].items():
        ids = np.array(got[key]["generated_token_ids"])
        k = np.clip(32000 - ids - 1, 0, 254)
        normalized = -1.0 + (k + 0.5) * 2.0 / 255.0  # bin centers
        expected = np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)
        assert np.allclose(r["actions"], expected, rtol=0, atol=1e-12), key


def test_predictions_file_matches_its_schema(run):
    for name, report in run["reports"].items():
        with open(report["predictions_path"]) as f:
            lines = [json.loads(line) for line in f]
        validate_predictions(lines)
        assert lines == sorted(lines, key=lambda p: (p["dataset_name"], p["episode_id"], p["step_index"]))


def test_reference_setup_is_recorded(run):
    """What the reference needed on this transformers (printed with -rA / on failure): no patch on 4.40.1."""
    assert run["deps"]["timm"] in ("0.9.10", "0.9.11", "0.9.12", "0.9.16")
    if run["transformers"] == "4.40.1":
        assert run["reference_patches"] == []
    print(f"transformers {run['transformers']}, timm {run['deps']['timm']}, torchvision {run['deps']['torchvision']} "
          f"(ops shim {run['deps']['shim']}); reference patches: {run['reference_patches']}")
