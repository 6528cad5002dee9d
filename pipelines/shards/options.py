"""The shard stage's options and fixed settings.

``ShardOptions`` holds every option that changes the bytes of the output (the manifest's ``options``):
the user's request, checked before any input is read (``check_options``: the draft), completed by
what the inputs and the tokenizer decide (action width, vocabulary, EOS, tokenization mode, proprio
width). Next to it: the stage's vocabulary (cameras, action bins, tokenization modes, quarantine
stages and reasons) and its fixed settings (chunk, resize-batch and row-group sizes, Parquet
compression), which the modules that use them import from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import pyarrow as pa

from vlaprep.errors import UserError
from vlaprep.pipelines.options import SHARD_OPTIONS
from vlaprep.schemas.shards import shard_schema
from vlaprep.transforms.action_tokenizer import ActionTokenizer
from vlaprep.transforms.normalization import NormalizationSpec

CAMERAS = ("primary", "wrist")
N_BINS = 256  # OpenVLA's action bins: the last 256 ids of the base vocabulary
TEXT_ROUND_TRIP = "text_round_trip"
IDS_DIRECT = "ids_direct"
TOKENIZATION_MODES = (TEXT_ROUND_TRIP, IDS_DIRECT)

# Quarantine records of the shard stage: the stage that rejected an episode, and the fixed reasons.
STAGE_SHARD = "shard"
STAGE_TRANSFORM = "transform"
EMPTY_LANGUAGE_REASON = "empty language instruction (OpenVLA drops unlabeled episodes)"
# A trajectory the transform standardizes to zero steps (a 2-step Bridge episode loses its first and last
# step): OpenVLA's statistics count it in num_trajectories, and it has no sample to write.
EMPTY_TRAJECTORY_REASON = "empty after transform (counted in num_trajectories as OpenVLA does; no row to write)"

# Memory does not grow with episode length: an episode is encoded in chunks of consecutive steps
# (decode -> resize -> PNG -> Arrow -> one record batch appended to its spill file), and the shard
# writer streams those record batches back. A chunk has at most CHUNK_ROWS steps and about
# CHUNK_PIXEL_BYTES of output pixels over all cameras (224 px, one camera: 256 steps, 38 MiB; 2048 px:
# 5 steps). Within a chunk, frames are decoded and resized per TF call in groups of at most
# MAX_RESIZE_BATCH frames whose float32 working set stays under RESIZE_BATCH_BYTES (256x256 -> 224:
# 50 frames). Neither changes a byte of the output: each image is decoded, resized and PNG-encoded
# independently, and the writer rebuilds the chunking the Parquet writer sees (``write.write_shard_file``).
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
# Parquet data pages close at this size (Arrow's default: 1 MiB), above any row group's column (~ROW_GROUP_BYTES):
# each column of a row group is one page. A reader decoding a group then reserves its images at once; with a
# page per episode (2-9 MB at 224 px) Arrow's binary builder grew by reallocation, copying every image again
# into fresh memory: ~10% more CPU a row and ~20% more page faults in a DataLoader worker
# (benchmarks/results_loader_2core.txt); writing takes 2-4% longer. Parquet's page sizes are int32: < 2 GiB.
PARQUET_PAGE_BYTES = 1 << 30


class ShardsArgumentError(UserError):
    """A bad option or input for ``vlaprep shards``: reported as one line before any Beam work."""


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


def check_options(**options) -> dict:
    """The user's shard options (``pipelines/options.SHARD_OPTIONS``; absent ones at their defaults),
    checked before any input is read -> the ``ShardOptions`` fields they decide (the draft). Raises
    ShardsArgumentError naming the flag. ``job.run_shards`` and ``vlaprep run``'s config check call this."""
    unknown = sorted(set(options) - set(SHARD_OPTIONS.names))
    if unknown:
        raise ShardsArgumentError(f"expected shard options among {list(SHARD_OPTIONS.names)}, got unknown {unknown}")
    o = {**SHARD_OPTIONS.defaults(), **options}
    if not isinstance(o["allow_empty"], bool):
        raise ShardsArgumentError(f"expected allow_empty to be True or False, got {o['allow_empty']!r}")
    draft = dict(
        image_size=o["image_size"], cameras=parse_cameras(o["cameras"]), heldout_fraction=o["heldout_fraction"],
        seed=o["seed"], action_chunk=o["action_chunk"], normalization=o["normalization"],
        action_encoding=o["action_encoding"], target_shard_bytes=target_shard_bytes(o["target_shard_mb"]),
    )
    # The dataclass checks every field; placeholders stand in for what the inputs and tokenizer decide.
    checked = ShardOptions(**draft, action_dim=1, vocab_size=N_BINS + 1, eos_id=0, model_max_length=1, tokenization=IDS_DIRECT)
    return {k: getattr(checked, k) for k in draft}
