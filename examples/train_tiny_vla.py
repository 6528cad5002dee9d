#!/usr/bin/env python
"""Train a tiny LLaVA-style VLA on vlaprep shards (CPU, minutes) and save it for ``vlaprep validate``.

    HF_HUB_OFFLINE=1 python examples/train_tiny_vla.py \\
        --shards DEMO/run/shards --tokenizer DEMO/tokenizer --output MODEL_OUT [--minutes 4]
    vlaprep validate --shards DEMO/run/shards --model MODEL_OUT --output VAL \\
        --statistics DEMO/run/stats/dataset_statistics.json

What it does:

1. Builds a random tiny ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` with
   ``vlaprep.synthetic.model.build_tiny_llava`` (CLIP vision tower with ``image_size // 4`` patches, so 16
   image tokens; Llama text model ``--hidden`` x ``--layers``).
2. Streams the ``train`` split with ``vlaprep.loader.ShardDataset`` (``decode_images=False``: the PNG bytes)
   and batches with ``vlaprep.loader.collate_vla`` in a ``DataLoader`` (``--num-workers`` 0 or 1).
3. Turns every shard item into exactly what ``vlaprep validate`` feeds the model at inference
   (``llava_training_example``, below) plus the supervised tail, and trains with teacher forcing:
   cross-entropy on the action ids + EOS only (the shard's ``labels``), AdamW, warmup then cosine decay
   over the wall-clock budget.
4. Saves model + processor with ``save_pretrained`` to ``--output`` (plus ``training_summary.json``).

Training inputs == validation inputs. The shards hold text-only ids (``BOS + prompt + actions + EOS``)
and 224 px PNG frames; ``vlaprep validate`` instead runs the *processor* on
``processor.image_token + openvla_inference_prompt(instruction)`` and the PIL image, and patches the
prompt's tail to the training prompt's (``prompt_tail``: appends the lone-space id 29871). So the model
sees ``[BOS] + [<image>] * 16 + prompt ids + 29871`` and CLIP-normalized pixels resized by the processor
to ``image_size`` (bicubic, no crop). ``llava_training_example`` builds the same prompt with the same
calls, appends the shard's supervised ids (``action_token_ids + EOS``), and puts -100 on the image and
prompt positions; the pixels go through the same image processor from the same PNG bytes. The loader's
own ``pixel_values`` ([0, 1], 224 px, not normalized) are *not* what the model sees at inference, so they
are not used. At start-up the first items are checked against ``VlaModelHandler._encode`` of
``vlaprep validate`` itself (ids and pixels bit for bit) and every instruction's prompt is checked against
the shard's stored prefix (image tokens inserted after BOS).

Padding: training right-pads (``collate_vla``), validate left-pads; both give the same positions (HF
``generate`` derives ``position_ids`` from the attention mask), so padding does not change the inputs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from vlaprep.loader import ShardDataset, collate_vla  # noqa: E402
from vlaprep.transforms.prompt import IGNORE_INDEX, openvla_inference_prompt  # noqa: E402

# Columns the training needs (ShardDataset always adds its bookkeeping columns).
COLUMNS = ("dataset_name", "episode_id", "step_index", "instruction", "input_ids", "labels", "action_token_ids", "image_primary")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Shard item -> the model's inputs, exactly as `vlaprep validate` builds them


def prompt_tail(tokenizer, instruction: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Same as ``vlaprep.pipelines.validate.model.prompt_tail`` (imported from there when Beam is installed)."""
    from vlaprep.pipelines.validate.model import prompt_tail as validate_prompt_tail

    return validate_prompt_tail(tokenizer, instruction)


def inference_prompt_ids(processor, instruction: str, image: Image.Image) -> list[int]:
    """The prompt ids ``vlaprep validate`` gives the model: ``[BOS] + image tokens + prompt + tail``."""
    text = processor.image_token + openvla_inference_prompt(instruction)
    ids = processor(text=text, images=image, return_tensors="pt")["input_ids"][0].tolist()
    drop, add = prompt_tail(processor.tokenizer, instruction)
    if drop and tuple(ids[-len(drop):]) == drop:
        ids = ids[: len(ids) - len(drop)]
    return ids + list(add)


def llava_training_example(
    item: dict, processor, prompt_cache: dict, stats: dict | None = None, pixel_cache: dict | None = None
) -> dict:
    """One ShardDataset item (``decode_images=False``) -> LLaVA training inputs matching validation.

    Returns ``input_ids`` = validation prompt ids (``[BOS] + [<image>] * n + prompt + 29871``) + the shard's
    supervised ids (actions + EOS), ``labels`` = -100 on every image/prompt position and the supervised ids
    after them, ``pixel_values`` [3, S, S] from the processor's image processor on the stored PNG (as in
    validate), ``action_token_ids`` unchanged. ``prompt_cache`` maps instruction -> prompt ids.
    ``stats`` (optional) counts ``prefix_mismatch``: the shard's stored prefix with the image tokens inserted
    after BOS differs from the validation prompt (training then follows the validation prompt).
    ``pixel_cache`` (optional): (dataset_name, episode_id, step_index) -> pixel_values, so that later epochs
    skip the PNG decode and resize (the same bytes always give the same tensor).
    """
    instruction = item["instruction"]
    key = (item.get("dataset_name"), item.get("episode_id"), item.get("step_index"))
    pixel_values = pixel_cache.get(key) if pixel_cache is not None else None
    image = None
    if pixel_values is None or instruction not in prompt_cache:
        image = Image.open(io.BytesIO(item["image_primary"])).convert("RGB")
    shard_ids = item["input_ids"].tolist()
    shard_labels = item["labels"].tolist()
    supervised = sum(1 for v in shard_labels if v != IGNORE_INDEX)  # N*D actions + EOS, at the end
    target = shard_ids[len(shard_ids) - supervised:]
    if shard_labels[len(shard_labels) - supervised:] != target or target[:-1] != item["action_token_ids"].tolist():
        raise ValueError(f"expected labels to supervise the last action ids + EOS, got labels {shard_labels!r}")
    prompt = prompt_cache.get(instruction)
    if prompt is None:
        prompt = prompt_cache[instruction] = inference_prompt_ids(processor, instruction, image)
        n_image = sum(1 for i in prompt if i == processor.image_token_id)
        expected = shard_ids[:1] + [processor.image_token_id] * n_image + shard_ids[1: len(shard_ids) - supervised]
        if expected != prompt and stats is not None:
            stats["prefix_mismatch"] = stats.get("prefix_mismatch", 0) + 1
            _log(f"[train] WARNING prompt of {instruction!r}: shard prefix {expected} != validation prompt {prompt}")
    if pixel_values is None:
        pixel_values = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0].to(torch.float32)
        if pixel_cache is not None:
            pixel_cache[key] = pixel_values
    return {
        "input_ids": torch.tensor(prompt + target, dtype=torch.long),
        "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + target, dtype=torch.long),
        "pixel_values": pixel_values,
        "action_token_ids": item["action_token_ids"],
    }


class LlavaCollate:
    """DataLoader ``collate_fn``: ``llava_training_example`` per item, then ``collate_vla`` (right padding).

    ``cache=True`` keeps every item's pixel values in memory (about 12 KB per row at 32 px): with
    ``num_workers=0`` (the collate runs in the training process) epochs after the first skip the PNG decode
    and resize. A DataLoader worker's cache dies with the worker at the end of each epoch.
    """

    def __init__(self, processor, pad_token_id: int, cache: bool = True):
        self.processor = processor
        self.pad_token_id = pad_token_id
        self.prompt_cache: dict = {}
        self.pixel_cache: dict | None = {} if cache else None
        self.stats: dict = {}

    def __call__(self, items):
        examples = [
            llava_training_example(it, self.processor, self.prompt_cache, self.stats, self.pixel_cache) for it in items
        ]
        return collate_vla(examples, pad_token_id=self.pad_token_id)


def check_against_validate(model_dir: str, processor, items: list[dict], collate: LlavaCollate) -> int:
    """Compares ``llava_training_example`` with ``vlaprep validate``'s own encoder on ``items``; returns how
    many matched (ids of the prompt and pixel values bit for bit). Skipped (returns -1) without Beam."""
    try:
        from vlaprep.pipelines.validate.model import LoadedModel, ModelSpec, VlaModelHandler
        from vlaprep.pipelines.validate.read import ShardRow
    except ImportError:
        _log("[train] apache_beam not importable: skipping the check against vlaprep validate's encoder")
        return -1
    spec = ModelSpec(path=model_dir, num_new_tokens=1, action_token_min=0, action_token_max=1, device="cpu")
    handler = VlaModelHandler(spec)
    tok = processor.tokenizer
    loaded = LoadedModel(None, processor, "native", "", "cpu", torch.float32, int(tok.pad_token_id), processor.image_token)
    matched = 0
    for it in items:
        row = ShardRow(
            dataset_name="", episode_id="", step_index=0, instruction=it["instruction"],
            action_token_ids=it["action_token_ids"].numpy(), action_chunk=np.zeros(1, np.float32),
            image_primary=it["image_primary"],
        )
        ref = handler._encode(loaded, row)
        ours = llava_training_example(it, processor, collate.prompt_cache)
        n_sup = int((ours["labels"] != IGNORE_INDEX).sum())
        same_ids = ours["input_ids"][:-n_sup].tolist() == list(ref["input_ids"])
        same_px = torch.equal(ours["pixel_values"], ref["pixel_values"][0].to(torch.float32))
        if same_ids and same_px:
            matched += 1
        else:
            _log(f"[train] WARNING mismatch with validate's encoder for {it['instruction']!r}: "
                 f"ids {'ok' if same_ids else 'DIFFER'}, pixels {'ok' if same_px else 'DIFFER'}")
    return matched


# --------------------------------------------------------------------------------------------------
# Loss


def supervised_loss(model, batch: dict) -> torch.Tensor:
    """Teacher-forced cross-entropy (full vocabulary) on the supervised positions (labels != -100).

    Equal to ``model(..., labels=batch["labels"]).loss`` (HF shifts the labels and averages over the
    non-ignored tokens) but projects only those positions through the 32002-wide head: ~3-5x faster on CPU.
    """
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    ).last_hidden_state
    target = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = target != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep])


# --------------------------------------------------------------------------------------------------
# Evaluation (teacher forced, restricted to the action ids like validate's greedy decoding)


@torch.no_grad()
def teacher_forced_accuracy(model, batches: list[dict], low: int, high: int, action_dim: int) -> dict:
    """Per-dim exact / within-one-bin accuracy of argmax over the action ids given the true previous ids."""
    model.eval()
    hits = np.zeros(action_dim)
    near = np.zeros(action_dim)
    count = np.zeros(action_dim)
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
        logits = out.logits[:, :-1, low: high + 1]  # position t predicts token t+1
        target = b["labels"][:, 1:]
        pred = logits.argmax(-1) + low
        for j in range(target.shape[0]):
            pos = (target[j] != IGNORE_INDEX).nonzero().flatten()[:-1]  # action ids, not the EOS
            t, p = target[j, pos].numpy(), pred[j, pos].numpy()
            k = np.arange(len(t)) % action_dim
            np.add.at(hits, k, t == p)
            np.add.at(near, k, np.abs(t - p) <= 1)
            np.add.at(count, k, 1)
    model.train()
    return {
        "samples": int(count[0]),
        "exact": float(hits.sum() / count.sum()),
        "within_one_bin": float(near.sum() / count.sum()),
        "per_dim_exact": [float(x) for x in hits / np.maximum(count, 1)],
    }


def _fmt_eval(e: dict) -> str:
    dims = " ".join(f"{x:.2f}" for x in e["per_dim_exact"])
    return f"exact {e['exact']:.4f} within1 {e['within_one_bin']:.4f} per dim [{dims}] ({e['samples']} samples)"


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard directory (with train/, heldout/, manifest.json)")
    p.add_argument("--tokenizer", required=True, help="saved tokenizer directory (the one the shards were built with)")
    p.add_argument("--output", required=True, help="where the trained model + processor are saved")
    p.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget (default 4)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: time only)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32, help="model image size (divisible by 4; 16 patches)")
    p.add_argument("--hidden", type=int, default=128,
                   help="vision and text width of build_tiny_llava (default 128; 64 learned less in 4 minutes)")
    p.add_argument("--layers", type=int, default=2, help="vision and text layers of build_tiny_llava")
    p.add_argument("--num-workers", type=int, default=0, choices=(0, 1),
                   help="DataLoader workers (default 0: the in-memory pixel cache then lasts across epochs)")
    p.add_argument("--no-cache", action="store_true", help="decode and resize every frame in every epoch")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the matrices are tiny, and on a shared or busy 2-core machine "
                        "2 threads measured up to 10x slower per step than 1; 0 = torch's default)")
    p.add_argument("--eval-samples", type=int, default=128, help="held-out rows for the teacher-forced check")
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds between teacher-forced checks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoProcessor

    from vlaprep.synthetic.model import build_tiny_llava

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    train = ShardDataset(args.shards, "train", seed=args.seed, shuffle=True, shuffle_buffer=args.shuffle_buffer,
                         columns=COLUMNS, decode_images=False)
    layout = train.layout
    options = (train.manifest or {}).get("options", {})
    n_bins, vocab = int(options.get("n_bins", 256)), int(options.get("vocab_size", 32000))
    low, high = vocab - n_bins, vocab - 1  # OpenVLA's action ids (uniform encoding: vocab - digitize)

    # 1. Model: built (random, seeded) into a scratch directory, trained, saved to --output at the end.
    scratch = tempfile.mkdtemp(prefix=".train-tiny-vla-")
    model = build_tiny_llava(scratch, args.tokenizer, image_size=args.image_size, hidden=args.hidden,
                             layers=args.layers, seed=args.seed)
    processor = AutoProcessor.from_pretrained(scratch)
    tok = processor.tokenizer
    if tok.vocab_size != vocab:
        raise SystemExit(f"expected the tokenizer's base vocab to be the shards' vocab_size {vocab}, got {tok.vocab_size}")
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"[train] model: LLaVA hidden {args.hidden} x {args.layers} layers, image {args.image_size} px, "
         f"{n_params / 1e6:.2f}M params; shards {args.shards}: action chunk {layout.chunk} x {layout.action_dim}, "
         f"action ids {low}..{high}; torch threads {torch.get_num_threads()}")

    collate = LlavaCollate(processor, pad_token_id=int(tok.pad_token_id), cache=not args.no_cache)
    eval_collate = LlavaCollate(processor, pad_token_id=int(tok.pad_token_id), cache=False)

    # 2. Held-out rows for the teacher-forced check, and the check against validate's own encoder.
    heldout = ShardDataset(args.shards, "heldout", shuffle=False, columns=COLUMNS, decode_images=False)
    rows = []
    for it in heldout:
        rows.append(it)
    if rows:
        pick = np.linspace(0, len(rows) - 1, min(args.eval_samples, len(rows))).round().astype(int)
        rows = [rows[i] for i in pick]
    matched = check_against_validate(scratch, processor, rows[:16], collate)
    if matched >= 0:
        _log(f"[train] inputs vs vlaprep validate's encoder: {matched}/{len(rows[:16])} items identical (ids + pixels)")
    eval_batches = [eval_collate(rows[i: i + 32]) for i in range(0, len(rows), 32)]

    # 3. Training.
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    budget = args.minutes * 60.0

    def lr_at(step: int, elapsed: float) -> float:
        warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
        frac = min(1.0, elapsed / budget)
        if args.max_steps:
            frac = max(frac, min(1.0, step / args.max_steps))
        return args.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))

    if eval_batches:
        _log(f"[train] before training, held-out teacher forced: {_fmt_eval(teacher_forced_accuracy(model, eval_batches, low, high, layout.action_dim))}")
    step, samples, epoch = 0, 0, 0
    loss_ema = None
    t0 = time.time()
    last_log = last_eval = t0
    data_wait = 0.0
    done = False
    while not done:
        train.set_epoch(epoch)
        loader = DataLoader(train, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate,
                            drop_last=True)
        t_fetch = time.time()
        for batch in loader:
            data_wait += time.time() - t_fetch
            elapsed = time.time() - t0
            if elapsed >= budget or (args.max_steps and step >= args.max_steps):
                done = True
                break
            lr = lr_at(step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_t = supervised_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss_t.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            samples += batch["input_ids"].shape[0]
            loss = float(loss_t.detach())
            loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
            now = time.time()
            if now - last_log >= 15:
                _log(f"[train] step {step} epoch {epoch} samples {samples} loss {loss_ema:.3f} lr {lr:.2e} "
                     f"{samples / (now - t0):.1f} samples/s (waiting for data {data_wait / (now - t0):.0%})")
                last_log = now
            if eval_batches and now - last_eval >= args.eval_every:
                _log(f"[train] step {step}: held-out teacher forced {_fmt_eval(teacher_forced_accuracy(model, eval_batches, low, high, layout.action_dim))}")
                last_eval = time.time()
            t_fetch = time.time()
        else:
            epoch += 1
    train_seconds = time.time() - t0
    if collate.stats.get("prefix_mismatch"):
        _log(f"[train] WARNING {collate.stats['prefix_mismatch']} instructions whose shard prompt differs from validate's")

    # 4. Save.
    final = teacher_forced_accuracy(model, eval_batches, low, high, layout.action_dim) if eval_batches else None
    model.eval()
    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    summary = {
        "shards": os.path.abspath(args.shards),
        "args": vars(args),
        "parameters": n_params,
        "steps": step,
        "samples": samples,
        "epochs": round(samples / max(1, sum(f.rows or 0 for f in train.files)), 2) if train.files[0].rows else None,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "final_loss_ema": loss_ema,
        "heldout_teacher_forced": final,
        "validate_encoder_check": {"matched": matched, "checked": len(rows[:16])},
        "prompt_prefix_mismatches": collate.stats.get("prefix_mismatch", 0),
    }
    with open(os.path.join(args.output, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if final:
        _log(f"[train] final held-out teacher forced: {_fmt_eval(final)}")
    _log(f"[train] {step} steps, {samples} samples ({summary['epochs']} epochs) in {train_seconds:.0f}s; "
         f"saved model + processor to {args.output}")
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
