"""``vlaprep demo``: generate a Bridge-like RLDS dataset and a CALVIN dataset, then ``vlaprep run`` over both.

Everything is local and offline: the tokenizer is a tiny Llama-structured one and the model a tiny
random LLaVA, both built on the spot (so the validation stage runs, and its model accuracy is chance
level: `examples/train_tiny_vla.py` shows a trained one beating chance).
"""

from __future__ import annotations

import os
import sys
import time

import yaml

from vlaprep.pipelines.run_job import load_run_config, run_pipeline_config


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_demo(output: str, episodes: int = 60, calvin_frames: int = 900, beam_args=(), log=_log) -> dict:
    started = time.time()
    output = os.path.abspath(output)
    data = os.path.join(output, "data")
    rlds_root = os.path.join(data, "rlds")
    calvin_root = os.path.join(data, "calvin")
    tokenizer_dir = os.path.join(output, "tokenizer")
    model_dir = os.path.join(output, "model")
    if not os.path.exists(os.path.join(rlds_root, "bridge_orig", "1.0.0", "dataset_info.json")):
        from vlaprep.synthetic.rlds import generate_rlds

        log(f"[demo] generating {episodes} Bridge-like RLDS episodes (two 128 px JPEG cameras) ...")
        generate_rlds(rlds_root, name="bridge_orig", episodes=episodes, seed=0, image_size=128, num_shards=4,
                      nan_episodes=1, short_episodes=(2,))
    if not os.path.exists(os.path.join(calvin_root, "training", "ep_start_end_ids.npy")):
        from vlaprep.synthetic.calvin import generate_calvin

        log(f"[demo] generating a CALVIN split tree with {calvin_frames} frames ...")
        generate_calvin(calvin_root, frames=calvin_frames, seed=0, image_static=96, image_gripper=48)
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

        log("[demo] building a tiny Llama-structured tokenizer (vocab 32000, offline) ...")
        build_llama_like_tokenizer(tokenizer_dir)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        from vlaprep.synthetic.model import build_tiny_llava

        log("[demo] building a tiny random LLaVA (offline) ...")
        build_tiny_llava(model_dir, tokenizer_dir, image_size=32)
    config = {
        "output": "run",
        "tokenizer": "tokenizer",
        "model": "model",
        "datasets": [
            {"name": "bridge_orig", "path": "data/rlds/bridge_orig/1.0.0", "weight": 1.0},
            {"name": "calvin", "path": "data/calvin", "weight": 1.0},
        ],
        "stats": {"proprio": True},
        "shards": {"heldout_fraction": 0.1, "seed": 0, "image_size": 224, "cameras": "primary", "target_shard_mb": 64},
        "validate": {"split": "heldout", "batch_size": 16, "device": "auto", "max_samples": 64},
    }
    config_path = os.path.join(output, "run.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    log(f"[demo] running `vlaprep run --config {config_path}`")
    summary = run_pipeline_config(load_run_config(config_path), beam_args=beam_args, log=log)
    run_dir = os.path.join(output, "run")
    _log(f"[demo] done in {time.time() - started:.0f}s; published {summary.get('version')} under {run_dir} "
         f"(see {os.path.join(run_dir, 'LATEST')})")
    return summary
