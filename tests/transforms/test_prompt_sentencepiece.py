"""A SentencePiece (Llama-2 style `tokenizer.model`) tokenizer works end to end for prompt ids."""

import random

import pytest

spm = pytest.importorskip("sentencepiece")

from transformers import AutoTokenizer  # noqa: E402

from vlaprep.transforms.action_tokenizer import ActionTokenizer  # noqa: E402
from vlaprep.transforms.prompt import build_training_ids  # noqa: E402


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = "put the carrot in pot pick up red block move left right open drawer robot take action what should".split()
    chars = [chr(0x4E00 + i) for i in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(2000)]
    lines += ["".join(chars[i : i + 50]) for i in range(0, len(chars), 50)] * 3
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(root / "m"), vocab_size=3400, model_type="bpe",
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.model").write_bytes((root / "m.model").read_bytes())
    return AutoTokenizer.from_pretrained(str(root / "tok"))


def test_training_ids_end_with_actions_and_eos(spm_tokenizer):
    tok = spm_tokenizer
    action_tokenizer = ActionTokenizer(vocab_size=tok.vocab_size)
    ids = [int(i) for i in action_tokenizer.encode([[-1.0, -0.5, 0.0, 0.25, 0.5, 0.99, 1.0]])[0]]
    assert all(action_tokenizer.min_token_id <= i <= action_tokenizer.max_token_id for i in ids)
    input_ids, labels, _round_trips = build_training_ids(tok, "Put the Carrot in the pot", ids)
    assert input_ids[-8:] == ids + [tok.eos_token_id]
    assert labels[-8:] == ids + [tok.eos_token_id]
    assert set(labels[:-8]) == {-100}
