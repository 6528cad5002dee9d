"""Offline test tokenizers with the layouts vlaprep has to handle (no hub, no sentencepiece).

``build_llama_like_tokenizer`` mirrors the Llama-2 ``tokenizer.json`` that openvla-7b ships, at a
fraction of its training cost:

  ids 0, 1, 2        ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS), also registered as special tokens
  ids 3..258         byte-fallback pieces ``<0x00>``..``<0xFF>`` (so ``"\\n"`` is ``<0x0A>`` = 13, as in Llama)
  ids 259..          a BPE trained on a small built-in English corpus (robot instructions, OpenVLA prompt)
  the rest           filler: one distinct rare unicode character per id (CJK ideographs, then Hangul),
                     the way Llama-2's last ids are single rare characters
  id 29871           ``"▁"`` (the lone SentencePiece space) when ``vocab_size == 32000``, as in Llama-2

Pipeline, as in Llama-2's HF ``tokenizer.json``: normalizer ``Prepend("▁") + Replace(" ", "▁")``, no
pre-tokenizer, ``BPE(byte_fallback=True, fuse_unk=True)``, post-processor ``"<s> $A"``, decoder
``Replace("▁", " ") + ByteFallback + Fuse + Strip(left=1)``.

Round trip of OpenVLA's action ids: every filler character is a vocabulary entry that takes part in no
merge, so the BPE emits its id whenever it sees the character, and ``decode([i])`` is that one
character. Hence for ``vocab_size=32000`` the action ids 31744..31999 round-trip through
``decode`` -> tokenize exactly, and ``"...Out: " + decode(actions) + "</s>"`` tokenizes to
``prompt ids + actions + [2]`` with the trailing space as its own token 29871 -- the property that
OpenVLA's training relies on with the real Llama-2 tokenizer (``tests/transforms/test_prompt.py``).

``build_gpt2_like_tokenizer`` is a byte-level BPE with a different layout (256 byte symbols first, EOS
``<|endoftext|>`` = 256, no BOS, default vocab 33000). Its filler ids (which include the action ids
``vocab_size - 256 .. vocab_size - 1``) are unreachable vocabulary entries that decode to ASCII text
(``"<|f32744|>"``); re-tokenizing that text gives other ids, so prompts built with it take the
"build ids directly" path (``round_trips=False``).

Both are deterministic (same files byte for byte on every build) and build in well under a second.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
GPT2_EOS = "<|endoftext|>"
SPIECE_SPACE = "\u2581"  # "▁"
LLAMA2_SPACE_ID = 29871  # the lone "▁" in Llama-2's vocabulary
MODEL_MAX_LENGTH = 2048

# Robot instructions in the style of Bridge / RT-1 / LIBERO, and the OpenVLA prompt text.
_INSTRUCTIONS = (
    "put the eggplant in the pot",
    "put the carrot on the plate",
    "put the spoon on the towel",
    "put the red block in the bowl",
    "pick up the red block",
    "pick up the blue cup",
    "pick up the green sponge and put it in the sink",
    "pick coke can",
    "pick up the apple from the counter",
    "place the yellow banana on the cutting board",
    "move the pot to the left burner",
    "move the knife to the right side of the table",
    "open the top drawer",
    "close the middle drawer",
    "open the microwave door",
    "close the fridge",
    "turn on the faucet",
    "turn off the stove",
    "push the button",
    "stack the green block on the red block",
    "wipe the table with the cloth",
    "fold the cloth in half",
    "sweep the beans into the dustpan",
    "flip the pot upright",
    "knock over the bottle",
    "put the black bowl on the plate",
    "put both the alphabet soup and the tomato sauce in the basket",
    "put the cream cheese in the bowl",
    "turn on the stove and put the moka pot on it",
    "put the white mug on the left plate and put the yellow and white mug on the right plate",
    "pick up the book and place it in the back compartment of the caddy",
    "put the wine bottle on top of the cabinet",
    "move the near can to the far corner of the table",
    "place the orange into the drawer",
    "take the lid off the pot",
    "lift the bread from the toaster",
    "slide the block 2 cm to the left",
    "rotate the handle 90 degrees",
    "go to the door, then stop.",
)
_PROMPT_LINES = (
    "In: What action should the robot take to {}?",
    "Out: ",
)


def training_corpus() -> Iterator[str]:
    """The built-in corpus, one line at a time (no newlines: Llama has no "\\n" piece, only <0x0A>)."""
    for instruction in _INSTRUCTIONS:
        yield instruction
        yield _PROMPT_LINES[0].format(instruction)
        yield _PROMPT_LINES[1]


def _filler_characters() -> Iterator[str]:
    """Distinct single characters no English corpus contains, in a fixed order."""
    for lo, hi in ((0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x3400, 0x4DBF), (0xA000, 0xA48C)):
        for cp in range(lo, hi + 1):
            yield chr(cp)


def _train_bpe(pre_tokenizer, vocab_size: int, special_tokens: list[str], initial_alphabet: list[str]):
    """Trains a throwaway BPE on the built-in corpus; returns (vocab sorted by id, merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=initial_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(training_corpus()), trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return [piece for piece, _ in vocab], merges


def _wrap_and_save(tok: Tokenizer, out_dir: str | os.PathLike, **special):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        **special,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(os.fspath(out_dir))
    # transformers 5.x writes "TokenizersBackend", a name 4.x does not know; "PreTrainedTokenizerFast"
    # loads the same tokenizer.json unchanged in both (5.x keeps it as an alias).
    config_path = os.path.join(os.fspath(out_dir), "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return fast


def build_llama_like_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 32000):
    """Builds, saves (``save_pretrained(out_dir)``) and returns a Llama-2-structured fast tokenizer.

    ``vocab_size`` is the base vocabulary (``tokenizer.vocab_size``), 32000 like Llama-2 by default, so
    OpenVLA's action ids 31744..31999 exist and round-trip. Other sizes work from 621 (specials, bytes,
    the trained pieces) to about 40000 (distinct filler characters); the last 256 ids are filler
    characters, hence round-trip, from about 880 up. "▁" is id 29871 only for 32000. Reload with
    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` (offline).
    """
    n_fixed = 3 + 256
    pieces, merges = _train_bpe(
        pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="always", split=True),
        vocab_size=1000,
        special_tokens=[],
        initial_alphabet=[SPIECE_SPACE],
    )
    learned = [p for p in pieces if p != SPIECE_SPACE]
    space_at = LLAMA2_SPACE_ID if vocab_size == 32000 else n_fixed + len(learned)
    n_filler = vocab_size - n_fixed - len(learned) - 1
    if n_filler < 0:
        raise ValueError(
            f"expected vocab_size >= {n_fixed + len(learned) + 1} (specials, bytes and the "
            f"{len(learned) + 1} trained pieces), got {vocab_size}"
        )
    filler = []
    for ch in _filler_characters():
        if len(filler) == n_filler:
            break
        filler.append(ch)
    if len(filler) < n_filler:
        raise ValueError(
            f"expected vocab_size <= {vocab_size - n_filler + len(filler)} (not enough distinct filler "
            f"characters), got {vocab_size}"
        )

    ordered = [UNK, BOS, EOS] + [f"<0x{b:02X}>" for b in range(256)] + learned + filler
    ordered.insert(space_at, SPIECE_SPACE)
    if len(ordered) != vocab_size or len(set(ordered)) != vocab_size:  # internal invariant
        raise RuntimeError(f"built {len(ordered)} pieces ({len(set(ordered))} distinct), expected {vocab_size}")
    vocab = {piece: i for i, piece in enumerate(ordered)}

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens([UNK, BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return _wrap_and_save(tok, out_dir, unk_token=UNK, bos_token=BOS, eos_token=EOS)


def build_gpt2_like_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 33000):
    """Builds, saves and returns a byte-level BPE fast tokenizer: EOS only (id 256), no BOS.

    Layout: the 256 byte-level symbols (ids 0..255), ``<|endoftext|>`` (256), trained merges, then
    unreachable filler entries ``"<|f{id}|>"`` up to ``vocab_size - 1``. Action ids
    (``vocab_size - 256 ..``) therefore exist but do not round-trip through decode -> tokenize.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    pieces, merges = _train_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        vocab_size=1000,
        special_tokens=[],
        initial_alphabet=alphabet,
    )
    byte_symbols = sorted(alphabet)
    learned = [p for p in pieces if p not in set(byte_symbols)]
    head = byte_symbols + [GPT2_EOS] + learned
    if vocab_size < len(head):
        raise ValueError(f"expected vocab_size >= {len(head)}, got {vocab_size}")
    ordered = head + [f"<|f{i}|>" for i in range(len(head), vocab_size)]
    vocab = {piece: i for i, piece in enumerate(ordered)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([GPT2_EOS])
    return _wrap_and_save(tok, out_dir, eos_token=GPT2_EOS)
