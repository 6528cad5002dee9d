"""Beam composition for the pre-tokenized Parquet training shards (one row = one OpenVLA sample).

Pipeline shape (all datasets in one pipeline; ``shards_job.py`` drives it and publishes the result):

  Episode --EncodeEpisodes--> ((split, dataset, episode_id), EpisodeRef)   rows spilled as Arrow IPC
          --WriteShards-->    one JSON line per Parquet file written into the staging directory
  (and a QuarantineRecord for every episode that cannot become rows)

Determinism. The bytes of every file are a function of the inputs and options only, never of the
runner, the worker count or the bundle boundaries:
  * an episode's rows are built in one place (``EpisodeEncoder.encode``), in step order, chunk by
    chunk into one spill file, so its rows are contiguous and ordered in exactly one shard file; the
    chunk size changes no byte (the writer hands Parquet the same arrays as for a whole episode);
  * the split is a hash of (seed, dataset, episode_id) (``heldout_split``), never random;
  * the shard of an episode comes from a plan over the globally sorted list of
    ``(split, dataset, episode_id, nbytes)`` (``plan_shards``): episodes fill consecutive shards in
    key order up to the target size; the plan travels to the workers as a small side input (shard
    boundaries, not one entry per episode);
  * a shard's writer sorts its episodes by key, checks it got exactly the planned episodes, and writes
    Parquet with fixed settings and no wall-clock metadata (``write_shard_file``).

Element logic lives in plain functions and the ``EpisodeEncoder`` class, testable without Beam; the
DoFns only adapt them (and build the prompt tokenizer once per worker in ``setup``).

Data flow. Encoded episodes are spilled as Arrow IPC files under the staging directory and only
``EpisodeRef``s (name, bytes, rows) go through the shuffle (see ``EncodeEpisodes``): temporary disk
of about the rows' uncompressed size (~150 KB per 224x224 frame) under ``OUT/.staging-*/.work``.

Memory does not grow with episode length. Per episode a worker holds its source record (encoded
frames, as read) and per-step arrays without pixels (actions, ids: ~0.5 KB a step); frames are
decoded, resized and PNG-encoded one chunk of steps at a time (``CHUNK_ROWS``, ``EpisodeRows``),
each chunk appended to the spill file as its own record batch; the writer streams record batches
back and Parquet row groups out (``write_shard_file``). Measured (``benchmarks/long_episode_memory.py``,
2 episodes of 128x128 frames, 2 worker processes, summed RSS of driver + workers): 2,000 / 10,000 /
20,000 steps peak at 2.8 / 3.0 / 3.3 GB, against 3.6 / 8.1 / 13.0 GB when whole episodes were
decoded at once; what still grows (~13 KB a step) is the source record, read whole (``sources``).

Performance (a shared, noisy 2-core VM; 256x256 JPEG Bridge-layout frames -> 224x224). Per frame,
one thread: decode 0.45 ms + lanczos3 resize and rounding 2.0 ms = 2.45 ms; the shard path adds
PNG 0.2 ms (stored deflate, ``encode_png``; PIL ``compress_level=1`` would be 4-7 ms), ids / Arrow
0.1 ms, spill 0.1-0.2 ms and the Parquet write with zstd 0.5-0.6 ms: ~70 % of the decode+resize
throughput. Whole pipeline, 7,697 frames, FnApiRunner with 2 worker processes, read included in
both: read+decode+resize 31.6 CPU-s / 29.4 s wall, ``vlaprep shards`` 44.5 CPU-s / 40.2 s wall
(0.71 / 0.73). Workers tokenize with the tokenizer's Rust backend when it matches HF on the probes
(``prompt_ids_backend``): importing transformers costs ~2 CPU-s per process.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from collections.abc import Mapping, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlaprep.errors import UserError
from vlaprep import paths
from vlaprep.pipelines.stats import transform_episode
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.schemas.shards import LABEL_IGNORE, shard_schema, validate_table_schema
from vlaprep.transforms.action_tokenizer import ActionTokenizer
from vlaprep.transforms.normalization import NormalizationSpec, normalize_actions
from vlaprep.transforms.prompt import build_training_ids, openvla_prompt, prompt_prefix_ids
from vlaprep.transforms.base import EmptyTrajectoryError
from vlaprep.transforms.registry import DatasetSpec

QUARANTINE = "quarantine"
_NAMESPACE = "vlaprep"

# --- On-disk layout (relative to OUT) -------------------------------------------------------------
TRAIN = "train"
HELDOUT = "heldout"
SPLITS = (TRAIN, HELDOUT)
QUARANTINE_DIR = "quarantine"
QUARANTINE_FILE = "quarantine/quarantine.jsonl"
MANIFEST_FILE = "manifest.json"
SHARD_NAME = "shard-{index:05d}-of-{count:05d}.parquet"

CAMERAS = ("primary", "wrist")
N_BINS = 256  # OpenVLA's action bins: the last 256 ids of the base vocabulary
TEXT_ROUND_TRIP = "text_round_trip"
IDS_DIRECT = "ids_direct"
TOKENIZATION_MODES = (TEXT_ROUND_TRIP, IDS_DIRECT)

EMPTY_LANGUAGE_REASON = "empty language instruction (OpenVLA drops unlabeled episodes)"
# A trajectory the transform standardizes to zero steps (a 2-step Bridge episode loses its first and last
# step): OpenVLA's statistics count it in num_trajectories, and it has no sample to write.
EMPTY_TRAJECTORY_REASON = "empty after transform (counted in num_trajectories as OpenVLA does; no row to write)"
STAGE_SHARD = "shard"
STAGE_TRANSFORM = "transform"

# Memory does not grow with episode length: an episode is encoded in chunks of consecutive steps
# (decode -> resize -> PNG -> Arrow -> one record batch appended to its spill file), and the shard
# writer streams those record batches back. A chunk has at most CHUNK_ROWS steps and about
# CHUNK_PIXEL_BYTES of output pixels over all cameras (224 px, one camera: 256 steps, 38 MiB; 2048 px:
# 5 steps). Within a chunk, frames are decoded and resized per TF call in groups of at most
# MAX_RESIZE_BATCH frames whose float32 working set stays under RESIZE_BATCH_BYTES (256x256 -> 224:
# 50 frames). Neither changes a byte of the output: each image is decoded, resized and PNG-encoded
# independently, and the writer rebuilds the chunking the Parquet writer sees (``write_shard_file``).
CHUNK_ROWS = 256
CHUNK_PIXEL_BYTES = 64 << 20
MAX_RESIZE_BATCH = 256
RESIZE_BATCH_BYTES = 128 << 20
# Upper bounds of the size options (``ShardOptions``). --image-size: a 4096x4096 PNG row is 48 MiB,
# three quarters of a row group (ROW_GROUP_BYTES), and its float32 resize alone needs ~0.8 GB; VLA
# models take 224-448 px. --target-shard-mb: 1 TiB, far above any useful shard (a reader decodes one
# shard file at a time), so that inf or 1e300 is an error rather than a 1e306-byte "target".
MAX_IMAGE_SIZE = 4096
MAX_TARGET_SHARD_BYTES = 1 << 40
# Parquet row groups: ~1000 rows, fewer when rows are large, so a reader streams <= ~64 MiB at a time.
ROW_GROUP_ROWS = 1000
ROW_GROUP_BYTES = 64 << 20
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 1  # explicit: a library default that changes would change the bytes

EpisodeKey = tuple  # (split, dataset_name, episode_id): the sort key of everything in the output


class ShardsArgumentError(UserError):
    """A bad option or input for ``vlaprep shards``: reported as one line before any Beam work."""


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def parse_cameras(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"primary"`` / ``"primary,wrist"`` (or a sequence) -> ``("primary",)`` / ``("primary", "wrist")``."""
    items = [c.strip() for c in text.split(",")] if isinstance(text, str) else [str(c).strip() for c in text]
    if not items or any(c not in CAMERAS for c in items) or len(set(items)) != len(items) or items[0] != "primary":
        raise ShardsArgumentError(
            f"expected --cameras primary or primary,wrist, got {text!r}; hint: OpenVLA trains on the primary camera"
        )
    return tuple(items)


def canonical_encoding(text: str) -> str:
    """``"uniform"`` / ``"mu_law"`` / ``"mu_law:MU"`` -> the form the manifest records (``mu_law:255.0``)."""
    from vlaprep.transforms.action_tokenizer import MU_LAW, parse_action_encoding

    try:
        encoding, mu = parse_action_encoding(text)
    except (TypeError, ValueError) as e:
        raise ShardsArgumentError(f"invalid --action-encoding: {e}") from None
    return f"{MU_LAW}:{mu!r}" if encoding == MU_LAW else encoding


def canonical_normalization(text: str) -> str:
    """``bounds_q99 | bounds | normal | fixed:LOW,HIGH`` -> its canonical string (``fixed:-0.65,0.65``)."""
    try:
        return str(NormalizationSpec.parse(text))
    except (TypeError, ValueError) as e:
        raise ShardsArgumentError(f"invalid --normalization: {e}") from None


def target_shard_bytes(mb) -> int:
    """``--target-shard-mb`` (MiB, a number or its text) -> bytes; a ShardsArgumentError unless finite and
    in (0, MAX_TARGET_SHARD_BYTES] (``inf``, ``nan``, negative and absurd values are the user's to fix)."""
    try:
        value = float(mb)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(mb, bool) or not math.isfinite(value) or not 1 <= int(value * (1 << 20)) <= MAX_TARGET_SHARD_BYTES:
        raise ShardsArgumentError(
            f"expected --target-shard-mb a finite number in (0, {MAX_TARGET_SHARD_BYTES >> 20}] (MiB), got {mb!r}; "
            "hint: 256 is the default"
        )
    return int(value * (1 << 20))


@dataclasses.dataclass(frozen=True)
class ShardOptions:
    """Every option that changes the bytes of the output (recorded in the manifest as ``options``).

    normalization / action_encoding are canonical strings (``canonical_normalization``,
    ``canonical_encoding``); vocab_size is the ActionTokenizer's base vocabulary (the last 256 ids are
    the action ids); tokenization says whether the stored ids equal the tokenizer's own tokenization
    of OpenVLA's full training text (``text_round_trip``) or were built from ids (``ids_direct``).
    """

    image_size: int
    cameras: tuple[str, ...]
    heldout_fraction: float
    seed: int
    action_chunk: int
    normalization: str
    action_encoding: str
    target_shard_bytes: int
    action_dim: int
    vocab_size: int
    eos_id: int
    model_max_length: int
    tokenization: str
    proprio_dim: int = 0  # P of the `proprio` column: the widest dataset's; 0 = no column (no dataset has state)
    # ((dataset, width), ...) when the datasets' widths differ: each row holds its dataset's width,
    # zero-padded to P (recorded in the manifest, so no state is dropped or mistaken). () when all agree.
    proprio_dims: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "cameras", parse_cameras(self.cameras))
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
            raise ShardsArgumentError(
                f"expected --image-size in [1, {MAX_IMAGE_SIZE}] pixels, got {size!r}; hint: OpenVLA uses 224"
            )
        fraction = self.heldout_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ShardsArgumentError(
                f"expected --heldout-fraction in [0, 1), got {fraction!r}; hint: 0 keeps every episode in train"
            )
        object.__setattr__(self, "heldout_fraction", float(fraction))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ShardsArgumentError(f"expected an integer --seed, got {self.seed!r}")
        if isinstance(self.action_chunk, bool) or not isinstance(self.action_chunk, int) or self.action_chunk < 1:
            raise ShardsArgumentError(f"expected --action-chunk >= 1, got {self.action_chunk!r}; hint: 1 gives OpenVLA's rows")
        object.__setattr__(self, "normalization", canonical_normalization(self.normalization))
        object.__setattr__(self, "action_encoding", canonical_encoding(self.action_encoding))
        target = self.target_shard_bytes
        if isinstance(target, bool) or not isinstance(target, int) or not 1 <= target <= MAX_TARGET_SHARD_BYTES:
            raise ShardsArgumentError(
                f"expected --target-shard-mb in (0, {MAX_TARGET_SHARD_BYTES >> 20}] MiB, got {target!r} bytes; hint: 256 is the default"
            )
        if self.tokenization not in TOKENIZATION_MODES:
            raise ShardsArgumentError(f"expected tokenization in {TOKENIZATION_MODES!r}, got {self.tokenization!r}")

    @property
    def chunk_width(self) -> int:
        """N*D: action ids (and floats) per row."""
        return self.action_chunk * self.action_dim

    @property
    def wrist(self) -> bool:
        return "wrist" in self.cameras

    def schema(self) -> pa.Schema:
        return shard_schema(self.action_dim, chunk=self.action_chunk, proprio_dim=self.proprio_dim, wrist=self.wrist)

    def action_tokenizer(self) -> ActionTokenizer:
        return ActionTokenizer.from_encoding(self.action_encoding, vocab_size=self.vocab_size, n_bins=N_BINS)

    def manifest_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "cameras": list(self.cameras),
            "heldout_fraction": self.heldout_fraction,
            "seed": self.seed,
            "action_chunk": self.action_chunk,
            "normalization": self.normalization,
            "action_encoding": self.action_encoding,
            "target_shard_bytes": self.target_shard_bytes,
            "action_dim": self.action_dim,
            "n_bins": N_BINS,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "model_max_length": self.model_max_length,
            "tokenization": self.tokenization,
            "proprio_dim": self.proprio_dim,
            **({"proprio_dims": dict(self.proprio_dims)} if self.proprio_dims else {}),
        }

    def proprio_width(self, dataset: str) -> int:
        """The width of ``dataset``'s own proprio inside the (zero-padded) ``proprio`` column."""
        return dict(self.proprio_dims).get(dataset, self.proprio_dim)


# --------------------------------------------------------------------------------------------------
# Tokenizer: the files the manifest fingerprints, the probes, and what workers tokenize prompts with
# --------------------------------------------------------------------------------------------------

# Top-level files of a HF tokenizer directory. A model directory (openvla-7b) also holds GBs of
# weights: those are never read, hashed or shipped.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
)
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
    """The tokenizer directory's files as ``((name, bytes), ...)``, sorted by name (a few MB at most).

    Shipping the bytes (rather than a path) means every worker, local or remote, that needs the HF
    tokenizer (when its Rust backend cannot stand in, see ``prompt_ids_backend``) loads exactly the
    files whose sha256 the manifest records.
    """

    files: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_dir(cls, path: str) -> TokenizerFiles:
        if not path or not paths.isdir(path):
            raise ShardsArgumentError(f"expected --tokenizer to be a tokenizer directory, got {path!r}, which does not exist")
        present = [n for n, _ in paths.list_files(path) if "/" not in n and os.sep not in n]
        names = sorted(n for n in present if n in TOKENIZER_FILE_NAMES or n.endswith(".tiktoken"))
        if not any(n in _VOCAB_FILES or n.endswith(".tiktoken") for n in names):
            raise ShardsArgumentError(
                f"expected a tokenizer directory with one of {list(_VOCAB_FILES)!r}, got files "
                f"{present!r} in {path!r}; hint: pass the directory saved by save_pretrained"
            )
        return cls(tuple((name, paths.read_bytes(paths.join(path, name))) for name in names))

    def fingerprint(self) -> dict:
        """``{"sha256": combined, "files": [{"name", "bytes", "sha256"}]}`` (combined = sha256 of the
        JSON list of (name, sha256) pairs)."""
        entries = [{"name": n, "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in self.files]
        combined = hashlib.sha256(json.dumps([[e["name"], e["sha256"]] for e in entries]).encode()).hexdigest()
        return {"sha256": combined, "files": entries}

    def load(self):
        """``AutoTokenizer`` from a private copy of the files (offline; never the hub, never remote code)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer

        tmp = tempfile.mkdtemp(prefix="vlaprep-tokenizer-")
        try:
            for name, data in self.files:
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# A fixed probe: every one of the 256 action ids, the extremes repeated, next to a plain instruction.
PROBE_INSTRUCTION = "Put the carrot in the pot"


def probe_tokenization(tokenizer, chunk_width: int, vocab_size: int) -> str:
    """``text_round_trip`` if, for every probe, the tokenizer's own tokenization of OpenVLA's full text
    (``prompt + decode(actions) + eos_token``) equals ``prefix ids + action ids + [EOS]`` -- the ids the
    shards store; ``ids_direct`` otherwise (the ids are still what the model must see).

    The prompt/action boundary does not depend on the instruction, so one probe per tokenizer decides.
    """
    ids = list(range(vocab_size - N_BINS, vocab_size))
    probes = [ids[i : i + chunk_width] for i in range(0, N_BINS, chunk_width)]
    probes += [[ids[0]] * chunk_width, [ids[-1]] * chunk_width, [ids[N_BINS // 2]] * chunk_width]
    prefix = prompt_prefix_ids(tokenizer, PROBE_INSTRUCTION)
    eos = int(tokenizer.eos_token_id)
    for actions in probes:
        full, _, round_trips = build_training_ids(tokenizer, PROBE_INSTRUCTION, actions)
        if not round_trips or full != prefix + list(actions) + [eos]:
            return IDS_DIRECT
    return TEXT_ROUND_TRIP


class HFPromptIds:
    """Prompt ids through the HF tokenizer itself (the reference semantics)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def prefix_ids(self, instruction: str) -> list[int]:
        """``tokenizer(openvla_prompt(instruction)).input_ids`` (BOS included)."""
        return [int(i) for i in prompt_prefix_ids(self.tokenizer, instruction)]

    def full_text_ids(self, instruction: str, action_ids: Sequence[int]) -> list[int]:
        """The tokenization of OpenVLA's whole training text: prompt + decode(actions) + eos_token."""
        text = openvla_prompt(instruction) + self.tokenizer.decode(list(action_ids)) + self.tokenizer.eos_token
        return [int(i) for i in self.tokenizer(text, add_special_tokens=True).input_ids]


class BackendPromptIds:
    """The same ids through the fast tokenizer's own Rust ``tokenizers.Tokenizer`` (what HF's fast
    tokenizers call underneath). Workers use it when the driver verified it equals ``HFPromptIds`` on
    the probes (``prompt_ids_backend``): importing ``tokenizers`` takes 0.06 s, ``transformers`` ~2 s of
    CPU per worker process."""

    def __init__(self, backend_json: str, eos_token: str):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(backend_json)
        self.eos_token = eos_token

    def prefix_ids(self, instruction: str) -> list[int]:
        return list(self.backend.encode(openvla_prompt(instruction), add_special_tokens=True).ids)

    def full_text_ids(self, instruction: str, action_ids: Sequence[int]) -> list[int]:
        text = openvla_prompt(instruction) + self.backend.decode(list(action_ids), skip_special_tokens=False) + self.eos_token
        return list(self.backend.encode(text, add_special_tokens=True).ids)


PROBE_INSTRUCTIONS = (
    PROBE_INSTRUCTION,
    "PICK UP the green block.",
    "  keep  double spaces,\ttabs and 2 digits ",
    "\u00d6ffne die T\u00fcr \u2014 \u00fcn\u00efcode \u2713",
    "close the drawer</s> then stop",
)


def prompt_ids_backend(tokenizer, chunk_width: int, vocab_size: int) -> str | None:
    """The serialized Rust tokenizer if it gives exactly the HF tokenizer's prefix and full-text ids on
    every probe (instructions x action-id sequences); None (workers load the HF tokenizer) otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    eos_token = getattr(tokenizer, "eos_token", None)
    if backend is None or eos_token is None:
        return None
    serialized = backend.to_str()
    fast, reference = BackendPromptIds(serialized, eos_token), HFPromptIds(tokenizer)
    ids = list(range(vocab_size - N_BINS, vocab_size))
    actions = [ids[:chunk_width], ids[-chunk_width:], [ids[N_BINS // 2]] * chunk_width]
    for instruction in PROBE_INSTRUCTIONS:
        if fast.prefix_ids(instruction) != reference.prefix_ids(instruction):
            return None
        for action_ids in actions:
            if fast.full_text_ids(instruction, action_ids) != reference.full_text_ids(instruction, action_ids):
                return None
    return serialized


# --------------------------------------------------------------------------------------------------
# Split, chunks, images
# --------------------------------------------------------------------------------------------------


def heldout_score(seed: int, dataset: str, episode_id: str) -> float:
    """``int(sha256(f"{seed}\\0{dataset}\\0{episode_id}")[:8]) / 2**64`` in [0, 1)."""
    digest = hashlib.sha256(f"{seed}\0{dataset}\0{episode_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_split(seed: int, fraction: float, dataset: str, episode_id: str) -> str:
    """``"heldout"`` iff ``heldout_score < fraction``, else ``"train"``: per episode, never per step."""
    return HELDOUT if heldout_score(seed, dataset, episode_id) < fraction else TRAIN


def chunk_indices(num_steps: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index [T, N] int64, mask [T, N] bool)``: row t takes steps t..t+N-1; past the end, the last."""
    raw = np.arange(num_steps)[:, None] + np.arange(chunk)[None, :]  # [T, N]
    return np.minimum(raw, num_steps - 1), raw < num_steps


def decode_frames(images, indices: np.ndarray, expected_shape: tuple | None = None):
    """The frames at ``indices``: ``[K, H, W, 3] uint8`` (a NumPy array or, for encoded images, a tf.Tensor).

    ``images`` is a list of encoded images (JPEG/PNG bytes: decoded with ``tf.io.decode_image``, as
    OpenVLA's dlimp pipeline does, so the pixels match libjpeg-turbo-in-TF exactly) or a decoded
    ``[T, H, W, 3] uint8`` array (CALVIN). Each distinct frame is decoded once; decoded frames stay
    tensors (``tf.gather`` / ``tf.stack``) so the resize gets them without NumPy round trips, which on
    this machine cost as much as the decode (~0.5 ms per 256x256 frame in copies). Every frame must
    have ``expected_shape`` (``(H, W, 3)``; default: the first one decoded) -- the encoder passes the
    shape of the episode's first frame, so the check spans the episode's chunks.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected frames [T, H, W, 3] uint8, got {images.shape!r} {images.dtype}")
        return images[indices]
    import tensorflow as tf

    unique, inverse = np.unique(indices, return_inverse=True)
    decoded = []
    for i in unique:
        frame = tf.io.decode_image(images[int(i)], channels=3, expand_animations=False, dtype=tf.uint8)
        reference = expected_shape if expected_shape is not None else (tuple(decoded[0].shape) if decoded else None)
        if reference is not None and tuple(frame.shape) != tuple(reference):
            raise ValueError(f"expected every frame of the episode to be {tuple(reference)!r}, got {tuple(frame.shape)!r} at step {int(i)}")
        decoded.append(frame)
    stacked = tf.stack(decoded)
    return stacked if len(unique) == len(indices) and np.array_equal(unique, indices) else tf.gather(stacked, inverse.reshape(-1))


def resize_batch_size(height: int, width: int, size: int) -> int:
    """Frames per TF resize call: at most MAX_RESIZE_BATCH, and as many as keep the call's float32
    working set (input, one separable pass, output and its rounding: ``12 * (H*W + H*S + 2*S*S)`` bytes
    a frame) under RESIZE_BATCH_BYTES."""
    per_frame = 12 * (height * width + height * size + 2 * size * size)
    return max(1, min(MAX_RESIZE_BATCH, RESIZE_BATCH_BYTES // per_frame))


def resize_frames(frames, size: int) -> np.ndarray:
    """``[K, H, W, 3] uint8`` -> ``[K, S, S, 3] uint8`` exactly as OpenVLA: ``tf.image.resize(...,
    method="lanczos3", antialias=True)``, rounded (half to even, like ``tf.round``), clamped to
    [0, 255] and cast (``tf.saturate_cast`` == clip_by_value + cast). Batched by ``resize_batch_size``."""
    import tensorflow as tf

    out = np.empty((frames.shape[0], size, size, 3), np.uint8)
    step = resize_batch_size(int(frames.shape[1]), int(frames.shape[2]), size)
    for start in range(0, frames.shape[0], step):
        batch = frames[start : start + step]
        resized = tf.image.resize(batch, (size, size), method="lanczos3", antialias=True)
        out[start : start + batch.shape[0]] = tf.saturate_cast(tf.round(resized), tf.uint8).numpy()
    return out


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2
PNG_DEFLATE_LEVEL = 0  # stored blocks; the Parquet page's zstd compresses (see encode_png)


def encode_png(image: np.ndarray) -> bytes:
    """``[H, W, 3] uint8`` -> a lossless 8-bit RGB PNG (deterministic bytes: no timestamp, no variable chunk).

    Why PNG: the stored pixels are exactly the ones OpenVLA's pipeline feeds the model (TF lanczos3
    resize, rounded), so a reader needs no TF and there is no second lossy step (re-encoding as JPEG
    would change them). Every PNG decoder (PIL, TF, libpng) returns them exactly.

    Why this encoder: PNG's deflate is the expensive part. PIL (5 trial filters per row, deflate level
    1) takes 4-7 ms per 224x224 camera frame here, zlib level 1 alone ~1.1 ms -- against ~2.5 ms to
    decode and resize the frame. So every row gets the PNG "Up" filter (one vectorized uint8
    subtraction) and the deflate stream uses stored blocks (``PNG_DEFLATE_LEVEL`` 0, ~0.2 ms); the
    Parquet column is then compressed with zstd (``write_shard_file``), which is faster than deflate and
    smaller on disk (it sees several consecutive, similar frames per page: 62 vs 88 KB per frame on the
    synthetic Bridge data), and readers decode these PNGs ~3x faster. A PNG copied out of the shard is
    therefore uncompressed (3 bytes per pixel + 1 per row).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.shape!r} {image.dtype}")
    height, width, _ = image.shape
    rows = np.ascontiguousarray(image).reshape(height, width * 3)
    raw = np.empty((height, width * 3 + 1), np.uint8)
    raw[:, 0] = _PNG_FILTER_UP
    raw[0, 1:] = rows[0]  # "Up" with the implicit all-zero row above
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    compressor = zlib.compressobj(PNG_DEFLATE_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY)
    data = compressor.compress(raw.data) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolor, deflate, adaptive, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# One episode -> its rows, chunk by chunk
# --------------------------------------------------------------------------------------------------


def _fixed_size_list(values: np.ndarray, width: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), width)


def _int32_lists(values) -> pa.ListArray:
    """A ``[K, L]`` array (one prompt) or a list of K rows of different lengths -> list<int32>."""
    if isinstance(values, np.ndarray):
        return _regular_list(values)
    return pa.array([np.asarray(v, np.int32) for v in values], pa.list_(pa.int32()))


def _regular_list(values: np.ndarray) -> pa.ListArray:
    """``[T, L]`` int32 -> list<int32> with every list of length L."""
    rows, length = values.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * length, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.int32()))


def _buffer_counts(array: pa.Array) -> list[tuple[str, int]]:
    """The buffers an Arrow IPC writer writes for ``array`` (no nulls), in order, as (kind, count):
    ``validity`` (empty without nulls), ``offsets`` (count = rows; 4 * (rows + 1) bytes), ``bits``
    (bit-packed booleans) or ``bytes``. Counts add up over chunks: the whole episode's layout is the
    sum of its chunks'. Slices count only the rows they hold."""
    kind = array.type
    if array.null_count:
        raise ValueError(f"expected no nulls in a shard column, got {array.null_count} in a {kind} column")
    rows = len(array)
    if pa.types.is_boolean(kind):
        return [("validity", 0), ("bits", rows)]
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        data = pc.sum(pc.binary_length(array)).as_py() or 0
        return [("validity", 0), ("offsets", rows), ("bytes", int(data))]
    if pa.types.is_list(kind):
        return [("validity", 0), ("offsets", rows)] + _buffer_counts(array.flatten())
    if pa.types.is_fixed_size_list(kind):
        return [("validity", 0)] + _buffer_counts(array.flatten())
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return [("validity", 0), ("bytes", rows * kind.bit_width // 8)]
    raise TypeError(f"expected a shard column type (string, binary, int, float, bool, lists of them), got {kind}")


class _EpisodeLayout:
    """The buffer sizes of an episode's rows as ONE record batch, added up chunk by chunk.

    What the plan and the writer need of an episode was, before episodes were chunked, measured on
    its one record batch: the size of its one-batch Arrow IPC file (``EpisodeRef.nbytes``, what shards
    are filled with) and pyarrow's ``nbytes`` of it read back (``EpisodeRef.arrow_nbytes``, what the
    row-group size divides). Both are functions of these sizes, so they are computed exactly without
    ever holding the whole episode (``tests/pipelines/test_shards_long_episodes.py`` checks both
    against a real one-batch file).
    """

    def __init__(self):
        self.kinds: list[str] | None = None
        self.counts: list[int] = []
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        items = [item for column in batch.columns for item in _buffer_counts(column)]
        if self.kinds is None:
            self.kinds, self.counts = [k for k, _ in items], [0] * len(items)
        elif [k for k, _ in items] != self.kinds:
            raise ValueError("expected every chunk of an episode to have the same columns, got another layout")
        for i, (_, count) in enumerate(items):
            self.counts[i] += count
        self.rows += batch.num_rows

    def _lengths(self, offsets_extra: int) -> list[int]:
        sizes = {"validity": lambda c: 0, "offsets": lambda c: 4 * (c + offsets_extra), "bits": lambda c: -(-c // 8), "bytes": lambda c: c}
        return [sizes[k](c) for k, c in zip(self.kinds or (), self.counts)]

    def ipc_body_bytes(self) -> int:
        """Body of the one-batch IPC message: every buffer padded to 8 bytes (Arrow's IPC alignment)."""
        return sum(-(-n // 8) * 8 for n in self._lengths(1))

    def arrow_nbytes(self) -> int:
        """``RecordBatch.nbytes`` of the one batch read back from IPC: offsets count 4 bytes per row,
        booleans ceil(bits / 8), absent validity buffers nothing."""
        return sum(self._lengths(0))


def _ipc_file_size(batch: pa.RecordBatch) -> int:
    sink = pa.MockOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.size()


@dataclasses.dataclass(frozen=True)
class EpisodeRef:
    """Where one encoded episode waits for its shard writer: an Arrow IPC file in the spill directory,
    one record batch per chunk."""

    name: str  # file name inside the spill directory (a hash of the key: no paths, no collisions)
    nbytes: int  # size of the rows as a one-batch IPC file ~ their in-memory Arrow size; what the shard plan adds up
    rows: int
    arrow_nbytes: int  # pyarrow nbytes of the rows as one batch; the writer's row-group size divides it


def spill_name(key: EpisodeKey) -> str:
    return hashlib.sha256("\0".join(key).encode("utf-8")).hexdigest()[:40] + ".arrow"


class _DigestWriter:
    """A write-only file object passing bytes through to ``file`` while counting them and hashing them
    (sha256). ``close`` leaves ``file`` open: its owner (``paths.open_write_atomic``) publishes it."""

    def __init__(self, file):
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self._file.write(view)
        self._hash.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _write_ipc(sink, first: pa.RecordBatch, rest, layout: _EpisodeLayout) -> None:
    """``first`` then every batch of ``rest`` (produced as they are written) into one IPC file."""
    with pa.ipc.new_file(sink, first.schema) as writer:
        batch = first
        while batch is not None:
            layout.add(batch)
            writer.write_batch(batch)
            batch = next(rest, None)


def spill_episode(spill_dir: str, key: EpisodeKey, rows) -> EpisodeRef:
    """Write the episode's rows -- one record batch, or an iterable of record batches in step order (the
    encoder's chunks, produced while this writes) -- as one Arrow IPC file, a record batch per chunk,
    and return its reference. Temp file + rename: a retried bundle rewrites the same bytes; an error
    while the chunks are produced removes the temp file and propagates. Holds one chunk at a time."""
    name = spill_name(key)
    batches = iter([rows] if isinstance(rows, pa.RecordBatch) else rows)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"expected at least one row for episode {key!r}, got none")
    layout, alone = _EpisodeLayout(), _EpisodeLayout()
    alone.add(first)
    # The one-batch file = this file's header, schema, footer and first message metadata (their sizes do
    # not depend on the row count) + the body of the whole episode as one message.
    nbytes = _ipc_file_size(first) - alone.ipc_body_bytes()
    if paths.is_remote(spill_dir):
        with paths.open_write_atomic(paths.join(spill_dir, name)) as f, pa.PythonFile(_DigestWriter(f), mode="w") as sink:
            _write_ipc(sink, first, batches, layout)
    else:
        path = os.path.join(spill_dir, name)
        tmp = os.path.join(spill_dir, f".tmp-{uuid.uuid4().hex}-{name}")
        try:
            with pa.OSFile(tmp, "wb") as sink:
                _write_ipc(sink, first, batches, layout)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return EpisodeRef(name, nbytes + layout.ipc_body_bytes(), layout.rows, layout.arrow_nbytes())


def read_spilled(spill_dir: str, ref: EpisodeRef):
    """The episode's record batches (its chunks), read one at a time (never memory-mapped: a 20,000-step
    episode's pages would all count in the worker's memory); checks the row count at the end."""
    path = paths.join(spill_dir, ref.name)
    source = pa.PythonFile(paths.open_read(path), mode="r") if paths.is_remote(spill_dir) else pa.OSFile(path, "rb")
    rows = 0
    with source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            rows += batch.num_rows
            yield batch
    if rows != ref.rows:
        raise ValueError(f"expected {ref.rows} rows in spilled episode {ref.name}, got {rows}")


@dataclasses.dataclass(frozen=True)
class SpilledEpisode:
    """An episode's rows in the spill directory, as the shard writer reads them (chunk by chunk)."""

    spill_dir: str
    ref: EpisodeRef

    @property
    def rows(self) -> int:
        return self.ref.rows

    @property
    def arrow_nbytes(self) -> int:
        return self.ref.arrow_nbytes

    def batches(self):
        return read_spilled(self.spill_dir, self.ref)


class _InMemoryEpisode:
    """An episode's rows already in memory (one record batch or its chunks): tests and small tools."""

    def __init__(self, batches: Sequence[pa.RecordBatch]):
        self._batches = list(batches)
        layout = _EpisodeLayout()
        for batch in self._batches:
            layout.add(batch)
        self.rows, self.arrow_nbytes = layout.rows, layout.arrow_nbytes()

    def batches(self):
        return iter(self._batches)


def _episode_rows(value):
    """A ``write_shard_file`` item's rows: a SpilledEpisode, a record batch or a list of record batches."""
    if isinstance(value, pa.RecordBatch):
        return _InMemoryEpisode([value])
    if isinstance(value, (list, tuple)):
        return _InMemoryEpisode(value)
    return value


class EpisodeEncoder:
    """``Episode`` -> ``(EpisodeKey, rows)`` or a ``QuarantineRecord``.

    Holds the prompt tokenizer (one per worker: ``HFPromptIds`` or ``BackendPromptIds``; a bare HF
    tokenizer is wrapped in ``HFPromptIds``) and a small instruction -> prompt ids cache. Per
    episode, what scales with steps only is vectorized over all of them at once (normalization, action
    tokens, chunk indices: ``[T, D]`` and ``[T, N]`` arrays, the prompt tokenized once); what scales
    with steps x pixels is done ``chunk_rows`` steps at a time (``EpisodeRows``), so the memory of an
    encoder does not grow with the episode's length.
    """

    def __init__(self, options: ShardOptions, specs: Mapping[str, DatasetSpec], action_stats: Mapping[str, dict], tokenizer,
                 chunk_rows: int | None = None):
        self.options = options
        self.specs = dict(specs)
        self.action_stats = dict(action_stats)
        self.prompts = tokenizer if isinstance(tokenizer, (HFPromptIds, BackendPromptIds)) else HFPromptIds(tokenizer)
        self.action_tokenizer = options.action_tokenizer()
        self.schema = options.schema()
        self.chunk_rows = int(chunk_rows) if chunk_rows is not None else default_chunk_rows(options)
        if self.chunk_rows < 1:
            raise ValueError(f"expected chunk_rows >= 1, got {chunk_rows!r}")
        self._prefix_cache: dict[str, list[int]] = {}

    def prefix_ids(self, instruction: str) -> list[int]:
        ids = self._prefix_cache.get(instruction)
        if ids is None:
            if len(self._prefix_cache) > 4096:
                self._prefix_cache.clear()
            ids = self._prefix_cache[instruction] = self.prompts.prefix_ids(instruction)
        return ids

    def encode(self, episode: Episode, spill_dir: str | None = None):
        """-> ``(key, rows)`` or ``QuarantineRecord`` (stage "transform" or "shard").

        With ``spill_dir`` (the pipeline), rows is the ``EpisodeRef`` of the episode spilled there chunk
        by chunk; without, the episode's rows as one record batch (whole in memory: tests, short
        episodes). The bytes of the rows are the same either way."""
        name, episode_id = episode.dataset_name, episode.episode_id
        if not episode.language.strip():
            return QuarantineRecord(name, episode_id, STAGE_SHARD, EMPTY_LANGUAGE_REASON)
        try:
            record = transform_episode(episode, self.specs[name])
        except EmptyTrajectoryError as e:  # statistics count it (as OpenVLA); there is no row to write
            return QuarantineRecord(name, episode_id, STAGE_TRANSFORM, f"{EMPTY_TRAJECTORY_REASON}: {e}")
        except ValueError as e:  # the transform's contract (TransformError); anything else is a bug
            return QuarantineRecord(name, episode_id, STAGE_TRANSFORM, f"{type(e).__name__}: {e}")
        import tensorflow as tf  # a corrupt image raises tf.errors.InvalidArgumentError (an OpError)

        split = heldout_split(self.options.seed, self.options.heldout_fraction, name, episode_id)
        key = (split, name, episode_id)
        try:
            rows = self.episode_rows(episode, record.trajectory)
            if spill_dir is None:
                out = pa.Table.from_batches(list(rows.batches()), schema=self.schema).combine_chunks().to_batches()[0]
            else:
                out = spill_episode(spill_dir, key, rows.batches())
        except (ValueError, KeyError, IndexError, tf.errors.OpError) as e:
            message = (str(e).strip().splitlines() or [""])[0][:300]
            return QuarantineRecord(name, episode_id, STAGE_SHARD, f"{type(e).__name__}: {message}")
        return key, out

    def episode_rows(self, episode: Episode, trajectory) -> EpisodeRows:
        """The whole-episode part of the rows (T = trajectory steps) and every check that needs no pixels."""
        opts = self.options
        action = np.ascontiguousarray(trajectory.action, dtype=np.float32)  # [T, D]
        t, d = action.shape
        if t == 0:
            raise ValueError("expected at least one step after the dataset transform, got 0")
        n = opts.action_chunk
        normalized = normalize_actions(action, self.action_stats[episode.dataset_name], opts.normalization)  # [T, D]
        tokens = self.action_tokenizer.encode(normalized).astype(np.int32)  # [T, D]
        index, mask = chunk_indices(t, n)  # [T, N]: row t looks ahead to t+N-1, across chunk boundaries
        steps = trajectory.step_index.astype(np.int64)  # [T] source step of each row
        # OpenVLA's prompt uses each step's own instruction (RLDS stores one per step).
        instructions = [episode.instruction_at(int(i)) for i in steps]
        prefixes = {text: self.prefix_ids(text) for text in dict.fromkeys(instructions)}
        longest = max(len(p) for p in prefixes.values())
        length = longest + n * d + 1
        if length > opts.model_max_length:
            raise ValueError(
                f"expected prompt + {n * d} action ids + EOS within the tokenizer's model_max_length "
                f"{opts.model_max_length}, got {length} ids ({longest} prompt ids)"
            )
        rows = EpisodeRows(self, episode, steps, action, normalized, tokens, index, mask, instructions, prefixes)
        if opts.tokenization == TEXT_ROUND_TRIP:
            for text in prefixes:  # one full-text tokenization per distinct instruction
                row = instructions.index(text)
                input_ids, _, action_ids = rows.ids(row, row + 1)
                self._check_text_round_trip(text, np.asarray(input_ids[0]), np.asarray(action_ids[0]))
        if opts.proprio_dim:
            proprio = np.ascontiguousarray(trajectory.proprio, dtype=np.float32)  # [T, P_dataset]
            width = opts.proprio_width(episode.dataset_name)
            if proprio.shape != (t, width):
                raise ValueError(f"expected proprio [T, {width}] like the dataset's other episodes, got {proprio.shape!r}")
            if width < opts.proprio_dim:  # zero-padded to the column's width (the manifest records `width`)
                proprio = np.concatenate([proprio, np.zeros((t, opts.proprio_dim - width), np.float32)], axis=1)
            rows.proprio = proprio
        return rows

    def _check_text_round_trip(self, instruction: str, input_ids: np.ndarray, action_ids: np.ndarray) -> None:
        """One full-text tokenization per episode: it must equal the prefix path's ids (the probe said so)."""
        if self.prompts.full_text_ids(instruction, action_ids.tolist()) != input_ids.tolist():
            raise ValueError(
                "expected the prompt ids + action ids to equal the tokenization of OpenVLA's full text "
                f"(tokenization {TEXT_ROUND_TRIP}), got a difference for instruction {instruction!r}"
            )


def default_chunk_rows(options: ShardOptions) -> int:
    """Steps per chunk: CHUNK_ROWS, fewer when their output pixels (all cameras) pass CHUNK_PIXEL_BYTES."""
    per_row = options.image_size * options.image_size * 3 * len(options.cameras)
    return max(1, min(CHUNK_ROWS, CHUNK_PIXEL_BYTES // per_row))


class EpisodeRows:
    """One episode's rows, produced ``encoder.chunk_rows`` steps at a time by ``batches()``.

    Holds the whole-episode arrays that scale with steps only (``action``, ``normalized``, ``tokens``:
    ``[T, D]``; ``index``, ``mask``: ``[T, N]``; ``proprio``: ``[T, P]``; ``steps``: ``[T]`` source
    steps) and, per camera, the shape of its first frame. Pixels exist one chunk at a time: its frames
    are decoded, resized and PNG-encoded in groups of ``resize_batch_size``.

    Errors come out as they did when an episode was one batch (the quarantine reason is part of the
    output): a camera's frames were all decoded before the next camera's, so an error in a later
    camera is reported only once the earlier cameras' remaining frames decode (``_first_error``).
    """

    def __init__(self, encoder: EpisodeEncoder, episode: Episode, steps, action, normalized, tokens, index, mask,
                 instructions: list[str], prefixes: dict[str, list[int]]):
        self.encoder = encoder
        self.episode = episode
        self.steps = steps
        self.action = action
        self.normalized = normalized
        self.tokens = tokens
        self.index = index
        self.mask = mask
        self.instructions = instructions  # [T] each row's instruction (its source step's)
        self.prefixes = prefixes  # instruction -> prompt ids (BOS + prompt)
        self.proprio = None
        self.frame_shapes: dict[str, tuple] = {}

    @property
    def num_rows(self) -> int:
        return int(self.action.shape[0])

    def ids(self, start: int, stop: int):
        """``(input_ids, labels, action_ids [K, N*D])`` int32 of rows start..stop-1, checked. ``input_ids``
        and ``labels`` are ``[K, L]`` arrays, or lists of K rows when the rows' instructions differ."""
        opts = self.encoder.options
        k, d = stop - start, self.action.shape[1]
        action_ids = self.tokens[self.index[start:stop]].reshape(k, opts.action_chunk * d)  # row-major, step t first
        runs = []  # (first row, last row + 1, prompt ids) of consecutive rows with one instruction
        for row in range(start, stop):
            if runs and self.instructions[row] == self.instructions[runs[-1][0]]:
                runs[-1][1] = row + 1
            else:
                runs.append([row, row + 1, self.prefixes[self.instructions[row]]])
        parts = []
        for first, end, prefix in runs:
            ids = action_ids[first - start : end - start]
            input_ids = np.empty((end - first, len(prefix) + ids.shape[1] + 1), np.int32)  # prefix ++ action ids ++ EOS
            input_ids[:, : len(prefix)] = np.asarray(prefix, np.int32)
            input_ids[:, len(prefix) : -1] = ids
            input_ids[:, -1] = opts.eos_id
            labels = input_ids.copy()
            labels[:, : len(prefix)] = LABEL_IGNORE
            verify_training_rows(input_ids, labels, ids, opts.eos_id)
            parts.append((input_ids, labels))
        if len(parts) == 1:
            return parts[0][0], parts[0][1], action_ids
        return [r for p in parts for r in p[0]], [r for p in parts for r in p[1]], action_ids

    def batches(self):
        """Record batches of rows [0, K), [K, 2K), ... (K = the encoder's chunk_rows), in step order."""
        for start in range(0, self.num_rows, self.encoder.chunk_rows):
            yield self.batch(start, min(self.num_rows, start + self.encoder.chunk_rows))

    def batch(self, start: int, stop: int) -> pa.RecordBatch:
        opts, schema = self.encoder.options, self.encoder.schema
        episode, t, k = self.episode, self.num_rows, stop - start
        n, d = opts.action_chunk, self.action.shape[1]
        input_ids, labels, action_ids = self.ids(start, stop)
        index = self.index[start:stop]  # [K, N]
        columns = {
            "dataset_name": pa.array([episode.dataset_name] * k, pa.string()),
            "episode_id": pa.array([episode.episode_id] * k, pa.string()),
            "step_index": pa.array(np.arange(start, stop, dtype=np.int32)),
            "num_steps": pa.array(np.full(k, t, np.int32)),
            "instruction": pa.array(self.instructions[start:stop], pa.string()),
            "input_ids": _int32_lists(input_ids),
            "labels": _int32_lists(labels),
            "action_token_ids": _fixed_size_list(action_ids, n * d, pa.int32()),
            "action": _fixed_size_list(self.action[start:stop], d, pa.float32()),
            "normalized_action": _fixed_size_list(self.normalized[start:stop], d, pa.float32()),
            "action_chunk": _fixed_size_list(self.action[index], n * d, pa.float32()),
            "action_chunk_mask": _fixed_size_list(self.mask[start:stop], n, pa.bool_()),
            "normalized_action_chunk": _fixed_size_list(self.normalized[index], n * d, pa.float32()),
        }
        if self.proprio is not None:
            columns["proprio"] = _fixed_size_list(self.proprio[start:stop], opts.proprio_dim, pa.float32())
        import tensorflow as tf

        for position, role in enumerate(opts.cameras):
            try:
                columns[f"image_{role}"] = pa.array(self.pngs(role, start, stop), pa.binary())
            except (ValueError, KeyError, IndexError, tf.errors.OpError) as e:
                raise self._first_error(position, stop, e) from None
        return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)

    def pngs(self, role: str, start: int, stop: int, encode: bool = True) -> list[bytes]:
        """The PNGs of camera ``role`` for rows start..stop-1 (``encode=False``: only decode and check)."""
        if role not in self.episode.images:
            raise ValueError(f"expected {role} camera images in the episode, got roles {sorted(self.episode.images)!r}")
        images, size = self.episode.images[role], self.encoder.options.image_size
        out = []
        position = start
        while position < stop:
            shape = self.frame_shapes.get(role)
            take = 1 if shape is None else resize_batch_size(shape[0], shape[1], size)  # [take, H, W, 3] at a time
            frames = decode_frames(images, self.steps[position : min(stop, position + take)], expected_shape=shape)
            self.frame_shapes.setdefault(role, tuple(int(x) for x in frames.shape[1:]))
            if encode:
                out.extend(encode_png(frame) for frame in resize_frames(frames, size))
            position += int(frames.shape[0])
        return out

    def _first_error(self, position: int, stop: int, error: Exception) -> Exception:
        """The error a whole-episode pass would have met first: one in an earlier camera's later frames
        (decoded only, to find it) before ``error`` in camera ``position`` at rows before ``stop``."""
        import tensorflow as tf

        for role in self.encoder.options.cameras[:position]:
            for start in range(stop, self.num_rows, self.encoder.chunk_rows):
                try:
                    self.pngs(role, start, min(self.num_rows, start + self.encoder.chunk_rows), encode=False)
                except (ValueError, KeyError, IndexError, tf.errors.OpError) as earlier:
                    return earlier
        return error


def verify_training_rows(input_ids: np.ndarray, labels: np.ndarray, action_ids: np.ndarray, eos_id: int) -> None:
    """Every row: the last N*D+1 ids are the action ids + EOS, labels are those and -100 elsewhere."""
    width = action_ids.shape[1] + 1
    tail = np.concatenate([action_ids, np.full((action_ids.shape[0], 1), eos_id, action_ids.dtype)], axis=1)
    if not (np.array_equal(input_ids[:, -width:], tail) and np.array_equal(labels[:, -width:], tail)):
        raise RuntimeError("expected the last N*D+1 input ids and labels to be the action ids + EOS, got others")
    if not np.all(labels[:, :-width] == LABEL_IGNORE):
        raise RuntimeError(f"expected labels {LABEL_IGNORE} before the action ids, got others")


# --------------------------------------------------------------------------------------------------
# Shard plan
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Consecutive shards per split over the episodes sorted by key.

    boundaries[split]:  first ``(dataset, episode_id)`` of each shard, ascending (one per shard)
    episodes[split]:    episodes in each shard (the writer checks it got exactly these many)
    """

    boundaries: Mapping[str, tuple[tuple[str, str], ...]]
    episodes: Mapping[str, tuple[int, ...]]

    def __post_init__(self):
        for split, bounds in self.boundaries.items():
            if list(bounds) != sorted(set(bounds)) or len(bounds) != len(self.episodes.get(split, ())):
                raise ValueError(
                    f"expected strictly ascending boundaries, one per shard, for split {split!r}, got "
                    f"{len(bounds)} boundaries and {len(self.episodes.get(split, ()))} shard sizes"
                )

    def num_shards(self, split: str) -> int:
        return len(self.boundaries.get(split, ()))

    def shard_of(self, key: EpisodeKey) -> int:
        split, dataset, episode_id = key
        index = bisect.bisect_right(self.boundaries[split], (dataset, episode_id)) - 1
        if index < 0:
            raise ValueError(f"expected episode {key!r} in the shard plan, got none that holds it")
        return index


def plan_shards(sizes: Sequence[tuple[EpisodeKey, int]], target_bytes: int) -> ShardPlan:
    """Greedy, in key order: a shard takes the next episode unless that would push it past
    ``target_bytes`` (a shard always holds at least one episode, so one huge episode is its own shard)."""
    ordered = sorted((tuple(key), int(n)) for key, n in sizes)
    for (a, _), (b, _) in zip(ordered, ordered[1:]):
        if a == b:
            raise ValueError(f"expected unique (split, dataset, episode_id) keys, got {a!r} twice; hint: two sources give the same episode ids")
    boundaries: dict[str, list] = {}
    episodes: dict[str, list] = {}
    current: dict[str, int] = {}
    for (split, dataset, episode_id), nbytes in ordered:
        if split not in boundaries or current[split] + nbytes > target_bytes:
            boundaries.setdefault(split, []).append((dataset, episode_id))
            episodes.setdefault(split, []).append(0)
            current[split] = 0
        current[split] += nbytes
        episodes[split][-1] += 1
    return ShardPlan({s: tuple(b) for s, b in boundaries.items()}, {s: tuple(e) for s, e in episodes.items()})


# --------------------------------------------------------------------------------------------------
# Writing one shard
# --------------------------------------------------------------------------------------------------


def shard_relpath(split: str, index: int, count: int) -> str:
    return f"{split}/{SHARD_NAME.format(index=index, count=count)}"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with paths.open_read(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_episode_batch(batch: pa.RecordBatch, key: EpisodeKey, start: int = 0, num_steps: int | None = None) -> None:
    """The reader-side invariant, per chunk: rows start..start+K-1 of one episode of ``num_steps`` steps
    (default: this batch is the whole episode), in step order, each with num_steps == T."""
    k = batch.num_rows
    t = k if num_steps is None else num_steps
    steps = batch.column("step_index").to_numpy()
    if k == 0 or not np.array_equal(steps, np.arange(start, start + k)) or not np.all(batch.column("num_steps").to_numpy() == t):
        raise ValueError(f"expected rows {start}..{start + k - 1} of episode {key!r} in step order with num_steps {t}, got others")


def _one_batch(pieces: list, schema: pa.Schema) -> pa.RecordBatch:
    if len(pieces) == 1:
        return pieces[0]
    return pa.Table.from_batches(pieces, schema=schema).combine_chunks().to_batches()[0]


def _row_groups(episodes: Sequence, row_group: int, schema: pa.Schema, relpath: str):
    """``[(key, rows)]`` in key order -> one ``pa.Table`` per Parquet row group (``row_group`` rows, the
    last fewer), streamed from the episodes' chunks and checked on the way.

    Each table holds one chunk per episode it covers (that episode's rows in the group, as one array):
    exactly what ``pq.write_table`` saw when it sliced the table of whole-episode batches (one chunk per
    episode) into row groups. The Parquet writer cuts pages per input array, so this -- not how the
    encoder chunked the episode -- is what keeps the bytes of every file as they were. Memory: one row
    group (<= ~ROW_GROUP_BYTES) plus one spilled chunk.
    """
    group, filled = [], 0
    for key, episode in episodes:
        pieces, start = [], 0
        for batch in episode.batches():
            validate_table_schema(batch.schema, schema, relpath)
            check_episode_batch(batch, key, start, episode.rows)
            start += batch.num_rows
            offset = 0
            while offset < batch.num_rows:
                take = min(batch.num_rows - offset, row_group - filled)
                pieces.append(batch.slice(offset, take))
                offset += take
                filled += take
                if filled == row_group:
                    group.append(_one_batch(pieces, schema))
                    yield pa.Table.from_batches(group, schema=schema)
                    group, pieces, filled = [], [], 0
        if start != episode.rows:
            raise ValueError(f"expected {episode.rows} rows of episode {key!r}, got {start}")
        if pieces:
            group.append(_one_batch(pieces, schema))
    if group:
        yield pa.Table.from_batches(group, schema=schema)


def write_shard_file(
    root: str, split: str, index: int, count: int, items: Sequence[tuple[EpisodeKey, object]], schema: pa.Schema, expected_episodes: int
) -> dict:
    """Write ``root/<split>/shard-<index>-of-<count>.parquet`` (temp file + fsync + rename) -> file info.

    ``items``: ``(key, rows)`` per episode, rows a ``SpilledEpisode`` (the pipeline), a record batch or a
    list of record batches (its chunks). Episodes in key order, each one's rows contiguous; zstd; row
    groups of ~1000 rows or ~64 MiB (from the episodes' one-batch Arrow size, ``EpisodeRef.arrow_nbytes``);
    statistics for every non-image column; dictionary encoding only for the string columns.
    Streamed: row group by row group from the spilled chunks into the file, hashed on the way, so a
    shard of one 20,000-step episode takes one row group of memory, not the episode or the file.
    Idempotent: a retried bundle rewrites the same bytes.
    """
    episodes = sorted(((tuple(key), _episode_rows(value)) for key, value in items), key=lambda kv: kv[0])
    if len(episodes) != expected_episodes:
        raise RuntimeError(f"expected {expected_episodes} episodes for {split} shard {index}, got {len(episodes)}")
    per_dataset = {}
    for key, episode in episodes:
        counts = per_dataset.setdefault(key[1], {"episodes": 0, "rows": 0})
        counts["episodes"] += 1
        counts["rows"] += episode.rows
    relpath = shard_relpath(split, index, count)
    rows = sum(episode.rows for _, episode in episodes)
    row_bytes = max(1, sum(episode.arrow_nbytes for _, episode in episodes) // max(1, rows))
    row_group = max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes))
    binary = [f.name for f in schema if f.type == pa.binary()]
    path = paths.join(root, relpath)
    with paths.open_write_atomic(path) as f:
        digest = _DigestWriter(f)
        with pa.PythonFile(digest, mode="w") as sink, pq.ParquetWriter(
            sink,
            schema,
            compression=PARQUET_COMPRESSION,
            compression_level=PARQUET_COMPRESSION_LEVEL,
            use_dictionary=[f.name for f in schema if f.type == pa.string()],
            write_statistics=[f.name for f in schema if f.name not in binary],
        ) as writer:
            for table in _row_groups(episodes, row_group, schema, relpath):
                writer.write_table(table, row_group_size=row_group)
    return {
        "path": relpath,
        "split": split,
        "shard_index": index,
        "num_shards": count,
        "rows": rows,
        "episodes": len(episodes),
        "bytes": digest.size,
        "sha256": digest.hexdigest(),
        "row_groups": -(-rows // row_group),
        "datasets": dict(sorted(per_dataset.items())),
    }


def _dataset_pieces(parquet: pq.ParquetFile, dataset: str, schema: pa.Schema):
    """``(episode_id, record batch)`` runs of ``dataset``'s rows, in file order, CHUNK_ROWS rows at a time."""
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
        batch = batch.filter(pc.equal(batch.column("dataset_name"), dataset))
        if batch.num_rows == 0:
            continue
        if batch.schema != schema:
            batch = pa.Table.from_batches([batch]).cast(schema).combine_chunks().to_batches()[0]
        ids = batch.column("episode_id").to_pylist()
        start = 0
        for end in [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]:
            yield ids[start], batch.slice(start, end - start)
            start = end


def reload_shard_episodes(path: str, sha256: str, dataset: str, spill_dir: str, schema: pa.Schema):
    """A previous shard file -> ``(EpisodeKey, EpisodeRef)`` for each of ``dataset``'s episodes in it,
    spilled like freshly encoded ones (same ``EpisodeRef`` sizes, so the same plan and bytes).

    The file's sha256 is checked first (a streaming read): a changed file fails the run. Then it is
    read a batch of CHUNK_ROWS rows at a time (Parquet decodes a row group at a time), so a reused
    20,000-step episode takes the memory of a new one, not of its shard file."""
    if file_sha256(path) != sha256:
        raise RuntimeError(
            f"expected {path} to have sha256 {sha256} as its manifest says, got another digest; "
            "hint: the previous output was modified, delete it to rebuild from the sources"
        )
    split = paths.basename(paths.dirname(path))
    source = pa.PythonFile(paths.open_read(path), mode="r") if paths.is_remote(path) else pa.OSFile(path, "rb")
    with source:
        pieces = _dataset_pieces(pq.ParquetFile(source), dataset, schema)
        for episode_id, run in itertools.groupby(pieces, key=lambda piece: piece[0]):  # an episode's rows are contiguous
            key = (split, dataset, episode_id)
            yield key, spill_episode(spill_dir, key, (batch for _, batch in run))


# --------------------------------------------------------------------------------------------------
# Beam adapters
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What a worker needs to build an ``EpisodeEncoder`` (pickles: options, specs, statistics and either
    the verified Rust tokenizer JSON or the tokenizer files)."""

    options: ShardOptions
    specs: Mapping[str, DatasetSpec]
    action_stats: Mapping[str, dict]
    tokenizer_files: TokenizerFiles | None = None
    backend_json: str | None = None
    eos_token: str | None = None

    def __post_init__(self):
        if (self.tokenizer_files is None) == (self.backend_json is None):
            raise ValueError("expected exactly one of tokenizer_files and backend_json")
        if self.backend_json is not None and not self.eos_token:
            raise ValueError("expected eos_token with backend_json")

    def build(self) -> EpisodeEncoder:
        if self.backend_json is not None:
            prompts = BackendPromptIds(self.backend_json, self.eos_token)
        else:
            prompts = HFPromptIds(self.tokenizer_files.load())
        return EpisodeEncoder(self.options, self.specs, self.action_stats, prompts)


class _EncodeEpisodeFn(beam.DoFn):
    def __init__(self, config: EncoderConfig, spill_dir: str):
        self._config = config
        self._spill_dir = spill_dir
        self._encoder = None

    def setup(self):
        self._encoder = self._config.build()
        paths.makedirs(self._spill_dir)

    def process(self, episode: Episode):
        result = self._encoder.encode(episode, self._spill_dir)
        if isinstance(result, QuarantineRecord):
            beam.metrics.Metrics.counter(_NAMESPACE, f"quarantined_{result.stage}").inc()
            yield beam.pvalue.TaggedOutput(QUARANTINE, result)
            return
        beam.metrics.Metrics.counter(_NAMESPACE, "shard_episodes_encoded").inc()
        yield result


class EncodeEpisodes(beam.PTransform):
    """PCollection[Episode] -> {"encoded": PCollection[(EpisodeKey, EpisodeRef)], "quarantine": PCollection[QuarantineRecord]}.

    Per episode: empty-language check, the dataset transform (``stats.transform_episode``, the same
    one statistics use, here next to the images it needs), then its rows, chunk by chunk, spilled to
    an Arrow IPC file in ``spill_dir``. Only the small ``EpisodeRef`` travels through the shuffle:
    the rows (mostly PNG bytes) would otherwise pass through the runner's shuffle -- for the local
    FnApiRunner that is its own process memory, which both limits the dataset size and cost as much
    as decoding and resizing (measured: ~1 ms per 150 KB row). ``spill_dir`` must be visible to every
    worker (a local run, or a shared file system), as must the shard output.
    """

    def __init__(self, config: EncoderConfig, spill_dir: str):
        super().__init__()
        self._config = config
        self._spill_dir = spill_dir

    def expand(self, episodes):
        results = episodes | "Encode" >> beam.ParDo(_EncodeEpisodeFn(self._config, self._spill_dir)).with_outputs(
            QUARANTINE, main="encoded"
        )
        return {"encoded": results.encoded, "quarantine": results[QUARANTINE]}


def _episode_size(key: EpisodeKey, ref: EpisodeRef):
    return tuple(key), ref.nbytes


def _plan(sizes: list, target_bytes: int) -> ShardPlan:
    return plan_shards(sizes, target_bytes)


def _assign_shard(element, plan: ShardPlan):
    key, ref = element
    return (key[0], plan.shard_of(key)), (key, ref)


class _WriteShardFn(beam.DoFn):
    def __init__(self, root: str, spill_dir: str, schema: pa.Schema):
        self._root = root
        self._spill_dir = spill_dir
        self._schema = schema

    def process(self, element, plan: ShardPlan):
        (split, index), refs = element
        items = [(key, SpilledEpisode(self._spill_dir, ref)) for key, ref in refs]
        info = write_shard_file(self._root, split, index, plan.num_shards(split), items, self._schema, plan.episodes[split][index])
        beam.metrics.Metrics.counter(_NAMESPACE, "shard_files_written").inc()
        beam.metrics.Metrics.counter(_NAMESPACE, "shard_rows_written").inc(info["rows"])
        yield json.dumps(info, sort_keys=True)


class WriteShards(beam.PTransform):
    """PCollection[(EpisodeKey, EpisodeRef)] -> PCollection[str]: one JSON file info per Parquet file
    written under ``root`` (``<split>/shard-XXXXX-of-YYYYY.parquet``).

    The sorted (key, nbytes) list is gathered in one place (small: no rows), turned into a
    ``ShardPlan`` and given to the workers as a side input; episode references are grouped by (split,
    shard) and each writer reads its episodes from ``spill_dir``. The shard size target counts the
    rows' uncompressed Arrow size (what a reader holds once a shard is decoded); the files are smaller
    by Parquet's zstd ratio.
    """

    def __init__(self, root: str, spill_dir: str, schema: pa.Schema, target_bytes: int):
        super().__init__()
        self._root = root
        self._spill_dir = spill_dir
        self._schema = schema
        self._target_bytes = int(target_bytes)

    def expand(self, encoded):
        plan = (
            encoded
            | "EpisodeSizes" >> beam.MapTuple(_episode_size)
            | "AllSizes" >> beam.combiners.ToList()
            | "PlanShards" >> beam.Map(_plan, self._target_bytes)
        )
        return (
            encoded
            | "AssignShard" >> beam.Map(_assign_shard, plan=beam.pvalue.AsSingleton(plan))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShardFn(self._root, self._spill_dir, self._schema), plan=beam.pvalue.AsSingleton(plan))
        )
