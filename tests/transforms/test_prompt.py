"""OpenVLA prompts and training ids on the offline tiny tokenizers (Llama-like and GPT-2-like)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlaprep.synthetic.tokenizer import build_gpt2_like_tokenizer, build_llama_like_tokenizer
from vlaprep.transforms.action_tokenizer import ActionTokenizer
from vlaprep.transforms.prompt import (
    IGNORE_INDEX,
    build_training_ids,
    build_training_ids_from_prefix,
    openvla_inference_prompt,
    openvla_prompt,
    prefix_path_matches,
    prompt_prefix_ids,
)

INSTRUCTION = "Put the Eggplant in the POT"
ACTIONS = [31872, 31808, 31999, 31745, 31744, 31900, 31744]  # 7 dims, gripper last


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_like")
    start = time.perf_counter()
    tok = build_llama_like_tokenizer(out)
    return out, tok, time.perf_counter() - start


@pytest.fixture(scope="module")
def llama(llama_dir):
    return llama_dir[1]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build_gpt2_like_tokenizer(tmp_path_factory.mktemp("gpt2_like"))


# --- prompt text ------------------------------------------------------------------------------------


def test_prompt_text():
    head = "In: What action should the robot take to "
    assert openvla_prompt(INSTRUCTION) == head + "put the eggplant in the pot?\nOut: "
    assert openvla_inference_prompt(INSTRUCTION) == head + "put the eggplant in the pot?\nOut:"
    assert openvla_prompt("Öffne die TÜR".encode()) == head + "öffne die tür?\nOut: "  # UTF-8 bytes
    assert openvla_prompt("  Keep  spaces. ") == head + "  keep  spaces. ?\nOut: "  # nothing stripped
    with pytest.raises(TypeError, match="expected instruction str"):
        openvla_prompt(3)


# --- the Llama-like tokenizer ------------------------------------------------------------------------


def test_llama_like_layout(llama_dir):
    _, tok, seconds = llama_dir
    assert seconds < 5.0
    assert tok.vocab_size == 32000 and len(tok) == 32000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert tok.model_max_length == 2048
    assert tok.convert_tokens_to_ids("\u2581") == 29871  # Llama-2's lone "▁"
    assert tok("a\nb", add_special_tokens=False).input_ids[1] == 13  # "\n" is byte fallback <0x0A>


def test_llama_like_action_characters_round_trip(llama):
    ids = list(range(31744, 32000))
    chars = [llama.decode([i]) for i in ids]
    assert all(len(c) == 1 for c in chars) and len(set(chars)) == 256
    # Tokenizing the decoded string gives the lone "▁" (prepended, as Llama does) then the same ids.
    assert llama("".join(chars), add_special_tokens=False).input_ids == [29871] + ids


def test_llama_like_training_ids(llama):
    input_ids, labels, round_trips = build_training_ids(llama, INSTRUCTION, ACTIONS)
    assert round_trips
    assert input_ids[0] == 1  # BOS
    assert input_ids[-8:] == ACTIONS + [2]
    assert input_ids[-9] == 29871  # the trailing space of "Out: ", as with Llama-2
    assert labels[-8:] == ACTIONS + [2]
    assert labels[:-8] == [IGNORE_INDEX] * (len(input_ids) - 8)
    assert len(labels) == len(input_ids)
    # Lower-casing happens before tokenization.
    assert input_ids == build_training_ids(llama, INSTRUCTION.lower(), ACTIONS)[0]
    assert llama.decode(input_ids[1:-8]) == openvla_prompt(INSTRUCTION)


def test_llama_like_prefix_path_identical_for_random_actions(llama):
    rng = np.random.default_rng(0)
    instructions = ["put the eggplant in the pot", "Pick up the RED block!", "open drawer #3, then stop", ""]
    for instruction in instructions:
        prefix = prompt_prefix_ids(llama, instruction)
        assert prefix[0] == 1 and prefix[-1] == 29871
        for _ in range(300):
            actions = rng.integers(31744, 32000, size=int(rng.integers(1, 15))).tolist()
            full, labels, round_trips = build_training_ids(llama, instruction, actions)
            assert round_trips
            assert (full, labels) == build_training_ids_from_prefix(prefix, actions, llama.eos_token_id)


_instruction_chars = st.sampled_from(
    list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'-/\n\tüé中") + ["  ", "</s>", "<s>"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    instruction=st.lists(_instruction_chars, max_size=40).map("".join),
    actions=st.lists(st.integers(31744, 31999), min_size=1, max_size=10),
)
def test_llama_like_prefix_path_identical_for_any_instruction(llama, instruction, actions):
    assert prefix_path_matches(llama, instruction, actions)


def test_action_tokenizer_ids_feed_the_prompt(llama):
    at = ActionTokenizer(vocab_size=llama.vocab_size)
    normalized = np.array([[-1.0, -0.3, 0.0, 0.2, 0.5, 0.999, 1.0]], np.float32)
    ids = at.encode(normalized)[0].tolist()
    input_ids, _, round_trips = build_training_ids(llama, "stack the cups", ids)
    assert round_trips and input_ids[-8:] == ids + [2]
    np.testing.assert_array_equal(at.decode(np.array(input_ids[-8:-1])), at.decode(at.encode(normalized[0])))


def test_reload_offline_with_auto_tokenizer(llama_dir, monkeypatch):
    out, tok, _ = llama_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants
    import transformers

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    reloaded = transformers.AutoTokenizer.from_pretrained(str(out))
    assert reloaded.vocab_size == 32000 and reloaded.model_max_length == 2048
    assert (reloaded.bos_token_id, reloaded.eos_token_id) == (1, 2)
    assert build_training_ids(reloaded, INSTRUCTION, ACTIONS) == build_training_ids(tok, INSTRUCTION, ACTIONS)
    with open(out / "tokenizer_config.json", encoding="utf-8") as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_llama_like_build_is_deterministic(llama_dir, tmp_path):
    out, _, _ = llama_dir
    build_llama_like_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


# --- the GPT-2-like tokenizer (no BOS, other vocab size, no round trip) -----------------------------


def test_gpt2_like_layout(gpt2):
    assert gpt2.vocab_size == 33000 and gpt2.bos_token_id is None and gpt2.eos_token_id == 256
    assert gpt2.eos_token == "<|endoftext|>"


def test_gpt2_like_training_ids_take_the_direct_path(gpt2):
    at = ActionTokenizer(vocab_size=gpt2.vocab_size)
    ids = at.encode(np.array([0.0, 0.5, -1.0, 0.999, 1.0, 0.1, 1.0]))
    assert ids.tolist() == [32872, 32808, 32999, 32745, 32744, 32859, 32744]
    input_ids, labels, round_trips = build_training_ids(gpt2, INSTRUCTION, ids)
    assert not round_trips
    prefix = gpt2(openvla_prompt(INSTRUCTION)).input_ids
    assert input_ids == prefix + ids.tolist() + [256]
    assert input_ids[0] != 256 and prefix[0] == gpt2("In").input_ids[0]  # no BOS
    assert labels == [IGNORE_INDEX] * len(prefix) + ids.tolist() + [256]
    assert prefix_path_matches(gpt2, INSTRUCTION, ids)


def test_from_prefix_validation():
    with pytest.raises(ValueError, match="expected at least one action token id"):
        build_training_ids_from_prefix([1, 5], [], 2)
    with pytest.raises(ValueError, match="expected action ids disjoint from EOS 2"):
        build_training_ids_from_prefix([1, 5], [31744, 2], 2)
    assert build_training_ids_from_prefix(np.array([1, 5]), np.array([31744]), 2) == (
        [1, 5, 31744, 2],
        [IGNORE_INDEX, IGNORE_INDEX, 31744, 2],
    )
