"""The prompt tokenizer of the shard stage: the files the manifest fingerprints, the probes that decide
how ids are built (``probe_tokenization``, ``prompt_ids_backend``), and what workers tokenize prompts
with (``HFPromptIds``, or ``BackendPromptIds`` when the Rust tokenizer gives the same ids).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

from vlaprep import paths
from vlaprep.pipelines.shards.options import IDS_DIRECT, N_BINS, TEXT_ROUND_TRIP, ShardsArgumentError
from vlaprep.transforms.prompt import build_training_ids, openvla_prompt, prompt_prefix_ids

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


def load_tokenizer(tokenizer_dir: str, chunk_width: int):
    """-> (tokenizer files, loaded tokenizer, vocab_size, eos_id, model_max_length, tokenization mode).

    Raises ShardsArgumentError unless the tokenizer loads, has an EOS token, holds the N_BINS action ids
    clear of special tokens and fits a short prompt + ``chunk_width`` action ids + EOS."""
    files = TokenizerFiles.from_dir(tokenizer_dir)
    try:
        tokenizer = files.load()
    except Exception as e:  # transformers raises OSError/ValueError/KeyError/...; one line with the cause
        raise ShardsArgumentError(f"expected a loadable tokenizer in {tokenizer_dir!r}, got {type(e).__name__}: {e}") from e
    vocab_size = int(tokenizer.vocab_size)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ShardsArgumentError(f"expected a tokenizer with an EOS token in {tokenizer_dir!r}, got none; hint: set eos_token")
    eos_id = int(eos_id)
    action_ids = range(vocab_size - N_BINS, vocab_size)
    special = sorted({int(i) for i in tokenizer.all_special_ids if i is not None} & set(action_ids))
    if vocab_size <= N_BINS or special:
        raise ShardsArgumentError(
            f"expected a base vocabulary that holds the {N_BINS} action ids (the last {N_BINS} ids, clear of "
            f"special tokens), got vocab_size {vocab_size}" + (f" with special ids {special!r} among them" if special else "")
            + f" in {tokenizer_dir!r}; hint: use the model's tokenizer (Llama-2: 32000)"
        )
    max_length = int(min(getattr(tokenizer, "model_max_length", 1 << 31) or (1 << 31), 1 << 31))
    prompt = len(prompt_prefix_ids(tokenizer, "put the carrot in the pot"))
    if prompt + chunk_width + 1 > max_length:
        raise ShardsArgumentError(
            f"expected prompt + {chunk_width} action ids (--action-chunk x action_dim) + EOS within the tokenizer's "
            f"model_max_length {max_length}, got {prompt + chunk_width + 1} ids for a short instruction; "
            "hint: lower --action-chunk"
        )
    return files, tokenizer, vocab_size, eos_id, max_length, probe_tokenization(tokenizer, chunk_width, vocab_size)
