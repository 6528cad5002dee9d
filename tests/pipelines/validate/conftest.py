"""Fixtures for the OpenVLA validation tests: hand-written shards, OpenVLA's code directory, its dependencies.

Shards are written here with ``vlaprep.schemas.shards.shard_schema`` and a complete manifest
(``tests/manifest_helpers.py``, as test_job.py does), from a Llama-like tokenizer and
hand-made statistics, so every stored id is known without running the stats / shards pipelines.

OpenVLA's three HF files live in ``../shared/reference/openvla_hf`` beside the repository (CI has it); a
test that needs them skips, saying so, where that directory is absent -- the only skip these tests make.
OpenVLA's code also needs timm and torchvision, which are kept out of the main environment (see
``vlaprep.synthetic.openvla``): ``openvla_deps`` finds them (``$VLAPREP_OPENVLA_DEPS`` or
``<venv>/openvla-deps``) and *fails* with the install command when they are missing.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlaprep.schemas.shards import shard_schema
from vlaprep.transforms.action_tokenizer import ActionTokenizer
from vlaprep.transforms.normalization import normalize_actions
from vlaprep.transforms.prompt import build_training_ids_from_prefix, prompt_prefix_ids

REPO = pathlib.Path(__file__).resolve().parents[3]


def _load_manifest_helpers():
    """``tests/manifest_helpers.py`` (importlib import mode: ``tests`` is not a package)."""
    spec = importlib.util.spec_from_file_location("manifest_helpers", REPO / "tests" / "manifest_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_manifest = _load_manifest_helpers().write_manifest
OPENVLA_HF = REPO.parent / "shared" / "reference" / "openvla_hf"
VOCAB = 32000
IN_PROCESS = ("--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner",)
# Different lengths on purpose: a batch mixes prompt lengths, so left padding is exercised.
INSTRUCTIONS = (
    "Put the eggplant in the pot",
    "pick up the red block",
    "open the top drawer",
    "move the knife to the right side of the table",
    "close the microwave",
)


@pytest.fixture(scope="session")
def openvla_code() -> str:
    if not OPENVLA_HF.is_dir():
        pytest.skip(f"OpenVLA's HF files are not at {OPENVLA_HF} (../shared/reference/openvla_hf beside the repo)")
    return str(OPENVLA_HF)


@pytest.fixture(scope="session")
def openvla_deps() -> dict:
    """timm + torchvision for OpenVLA's code, checked in a subprocess (the main process stays without them)."""
    probe = (
        "import json; from vlaprep.synthetic.openvla import prepare_openvla_imports; "
        "print(json.dumps(prepare_openvla_imports()))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        pytest.fail(
            "OpenVLA's code needs timm 0.9.16 and torchvision, kept in a side directory: "
            f"{sys.executable} -m pip install --no-deps --target {os.path.join(sys.prefix, 'openvla-deps')} "
            f"timm==0.9.16 torchvision==0.28.0 (make setup does it). Probe said: {done.stderr.strip().splitlines()[-1:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def statistics_entry(actions: np.ndarray, mask) -> dict:
    a = np.asarray(actions, np.float64)
    block = {
        "mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "max": a.max(0).tolist(), "min": a.min(0).tolist(),
        "q01": np.quantile(a, 0.05, axis=0).tolist(), "q99": np.quantile(a, 0.95, axis=0).tolist(), "mask": list(mask),
    }
    zeros = [0.0] * a.shape[1]
    return {"action": block, "proprio": {k: zeros for k in ("mean", "std", "max", "min", "q01", "q99")},
            "num_transitions": len(a), "num_trajectories": 1}


def write_shards(root, episodes, statistics, tokenizer, chunk: int = 1, normalization: str = "bounds_q99") -> str:
    """episodes: [(dataset, episode_id, actions [T, D], instruction)] -> ``root`` with heldout/, the statistics
    copy in inputs/ and a complete manifest.json.

    Returns the path of the statistics file outside ``root`` (what ``--statistics`` is given)."""
    root = str(root)
    os.makedirs(os.path.join(root, "heldout"), exist_ok=True)
    stats_path = root + "_statistics.json"
    with open(stats_path, "w") as f:
        json.dump(statistics, f, indent=2)
    tok = ActionTokenizer.from_encoding("uniform", vocab_size=VOCAB)
    D = len(episodes[0][2][0])
    rows = []
    for e, (dataset, episode_id, actions, instruction) in enumerate(episodes):
        actions = np.asarray(actions, np.float32)
        T = len(actions)
        prefix = prompt_prefix_ids(tokenizer, instruction)
        for t in range(T):
            steps = [min(t + i, T - 1) for i in range(chunk)]
            raw = actions[steps]  # [N, D]
            norm = normalize_actions(raw, statistics[dataset]["action"], normalization)
            ids = tok.encode(norm).reshape(-1)
            input_ids, labels = build_training_ids_from_prefix(prefix, ids, 2)
            rows.append({
                "dataset_name": dataset, "episode_id": episode_id, "step_index": t, "num_steps": T,
                "instruction": instruction, "input_ids": input_ids, "labels": labels,
                "action_token_ids": ids.tolist(), "action": actions[t].tolist(),
                "normalized_action": norm[0].tolist(), "action_chunk": raw.reshape(-1).tolist(),
                "action_chunk_mask": [t + i < T for i in range(chunk)],
                "normalized_action_chunk": norm.reshape(-1).tolist(), "image_primary": png(1000 * e + t),
            })
    path = "heldout/shard-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=shard_schema(D, chunk)), os.path.join(root, path), row_group_size=7)
    write_manifest(root, statistics_path=stats_path, tokenizer=tokenizer, options={
        "image_size": 40, "cameras": ["primary"], "action_chunk": chunk, "normalization": normalization,
        "action_encoding": "uniform", "action_dim": D, "n_bins": 256, "vocab_size": VOCAB, "eos_id": 2})
    return stats_path


def bridge_like_episodes(rng, episodes: int, steps: int) -> tuple[list, np.ndarray]:
    """Bridge-like actions (6 small deltas + a 0/1 gripper), one instruction per episode."""
    out, everything = [], []
    for e in range(episodes):
        a = np.concatenate([rng.normal(0, 0.02, (steps, 6)), rng.integers(0, 2, (steps, 1))], axis=1).astype(np.float32)
        out.append(("bridge_orig", f"ep{e}", a, INSTRUCTIONS[e % len(INSTRUCTIONS)]))
        everything.append(a)
    return out, np.concatenate(everything)


@pytest.fixture(scope="session")
def helpers():
    """The helpers above for test modules (importlib import mode: a conftest is not importable by name)."""
    return types.SimpleNamespace(
        REPO=REPO, OPENVLA_HF=OPENVLA_HF, IN_PROCESS=IN_PROCESS, INSTRUCTIONS=INSTRUCTIONS, png=png,
        statistics_entry=statistics_entry, write_shards=write_shards, bridge_like_episodes=bridge_like_episodes,
    )
