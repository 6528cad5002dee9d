"""OpenVLA's training / inference prompt and the token ids of one training sample (openvla.md §4-5).

OpenVLA (``RLDSBatchTransform`` + ``PurePromptBuilder``) tokenizes, with BOS,

    "In: What action should the robot take to {instruction.lower()}?\\nOut: " + decode(action_ids) + "</s>"

and supervises only the last ``D + 1`` positions (the action ids and EOS). vlaprep stores the ids, so
``build_training_ids`` checks that this text really tokenizes back to the action ids; when a tokenizer
does not round-trip (``round_trips=False``) it builds the ids directly as
``tokenizer(prompt).input_ids + action_ids + [eos_id]``, which is what the model must see anyway.

Prefix reuse: the prompt depends only on the instruction, so a pipeline tokenizes it once per episode
(``prompt_prefix_ids``) and builds each step with ``build_training_ids_from_prefix`` (a list
concatenation). The two are identical whenever the full text tokenizes as ``prefix + actions + EOS``,
i.e. when the tokenizer never merges the prompt's trailing space with the first action character and
never merges action characters with each other:

  * Llama-2 (openvla-7b): yes. The trailing space of ``"Out: "`` is its own token 29871 ("▁") in both
    the prompt alone and the full text, and the action characters (rare unicode pieces) take part in
    no merge, so the last 8 ids are the 7 action ids and EOS 2.
  * ``vlaprep.synthetic.tokenizer.build_llama_like_tokenizer``: yes, for the same reasons (its "▁" is
    also id 29871; tested for thousands of random action sequences in ``tests/transforms/test_prompt.py``).
  * Tokenizers whose action ids do not round-trip (e.g. the byte-level
    ``build_gpt2_like_tokenizer``): ``build_training_ids`` falls back to exactly the concatenation, so
    the two are identical by construction.

The one way they can differ is a round-tripping tokenizer that merges across the prompt/action
boundary (say a piece "▁X" for an action character X): then OpenVLA's text gives the action ids but a
different prefix, and ``build_training_ids`` (which keeps OpenVLA's ids) differs from the prefix path.
Pipelines that want OpenVLA's exact ids should check ``prefix_path_matches`` once per tokenizer.

Text details of OpenVLA kept as is: the instruction is only lower-cased (``str.lower``); the prompt is
the training one with a trailing space, and inference uses the same text without it (``predict_action``
then appends 29871 when the last id is not 29871). Not reproduced: ``PurePromptBuilder`` also deletes
the substring ``"<image>"`` from the instruction and ``.strip()``s the decoded action string; neither
happens with Llama-2 action characters or ordinary instructions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100  # labels at positions the loss ignores (PyTorch CrossEntropyLoss default)

_PROMPT = "In: What action should the robot take to {}?\nOut:"


def _instruction_text(instruction: str | bytes) -> str:
    if isinstance(instruction, bytes):
        instruction = instruction.decode("utf-8")
    if not isinstance(instruction, str):
        raise TypeError(
            f"expected instruction str (or UTF-8 bytes), got {type(instruction).__name__}: {instruction!r}"
        )
    return instruction.lower()


def openvla_prompt(instruction: str | bytes) -> str:
    """Training prompt: ``"In: What action should the robot take to {instruction.lower()}?\\nOut: "``."""
    return _PROMPT.format(_instruction_text(instruction)) + " "


def openvla_inference_prompt(instruction: str | bytes) -> str:
    """Inference prompt (``predict_action``): the training prompt without the trailing space."""
    return _PROMPT.format(_instruction_text(instruction))


def _eos(tokenizer: Any) -> tuple[str, int]:
    eos_token, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    if eos_token is None or eos_id is None:
        raise ValueError(
            f"expected a tokenizer with an EOS token, got eos_token={eos_token!r}, eos_token_id={eos_id!r}; "
            "hint: set tokenizer.eos_token"
        )
    return eos_token, int(eos_id)


def _as_id_list(ids: Sequence[int] | Any, name: str) -> list[int]:
    out = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    if not out:
        raise ValueError(f"expected at least one {name}, got none")
    return out


def prompt_prefix_ids(tokenizer: Any, instruction: str | bytes) -> list[int]:
    """``tokenizer(openvla_prompt(instruction), add_special_tokens=True).input_ids`` (BOS included)."""
    return list(tokenizer(openvla_prompt(instruction), add_special_tokens=True).input_ids)


def build_training_ids_from_prefix(
    prefix_ids: Sequence[int], action_token_ids: Sequence[int], eos_id: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` = ``prefix + actions + [eos]`` with labels -100 on the prefix.

    Identical to ``build_training_ids`` for Llama-2 and the tiny Llama-like tokenizer (module docstring).
    """
    actions = _as_id_list(action_token_ids, "action token id")
    if eos_id in actions:
        raise ValueError(f"expected action ids disjoint from EOS {eos_id}, got {actions!r}")
    prefix = [int(i) for i in prefix_ids]
    input_ids = prefix + actions + [int(eos_id)]
    labels = [IGNORE_INDEX] * len(prefix) + actions + [int(eos_id)]
    return input_ids, labels


def build_training_ids(
    tokenizer: Any, instruction: str | bytes, action_token_ids: Sequence[int]
) -> tuple[list[int], list[int], bool]:
    """One OpenVLA training sample: ``(input_ids, labels, round_trips)``.

    Tokenizes ``prompt + tokenizer.decode(actions) + eos_token`` with special tokens (BOS). If its last
    ``len(actions) + 1`` ids are exactly ``actions + [eos_id]`` those ids are used (``round_trips=True``,
    OpenVLA's sample bit for bit); otherwise ``prompt ids + actions + [eos_id]`` (``round_trips=False``).
    ``labels`` are ``input_ids`` with every position but the last ``len(actions) + 1`` set to -100.
    """
    eos_token, eos_id = _eos(tokenizer)
    actions = _as_id_list(action_token_ids, "action token id")
    prompt = openvla_prompt(instruction)
    text = prompt + tokenizer.decode(actions) + eos_token
    full = list(tokenizer(text, add_special_tokens=True).input_ids)
    n = len(actions) + 1
    if len(full) > n and full[-n:] == actions + [eos_id]:
        labels = [IGNORE_INDEX] * (len(full) - n) + full[-n:]
        return full, labels, True
    prefix = list(tokenizer(prompt, add_special_tokens=True).input_ids)
    input_ids, labels = build_training_ids_from_prefix(prefix, actions, eos_id)
    return input_ids, labels, False


def prefix_path_matches(tokenizer: Any, instruction: str | bytes, action_token_ids: Sequence[int]) -> bool:
    """Whether ``build_training_ids`` equals the prefix path for this sample (True for Llama-2)."""
    _, eos_id = _eos(tokenizer)
    input_ids, _, _ = build_training_ids(tokenizer, instruction, action_token_ids)
    prefix = prompt_prefix_ids(tokenizer, instruction)
    expected, _ = build_training_ids_from_prefix(prefix, action_token_ids, eos_id)
    return input_ids == expected
