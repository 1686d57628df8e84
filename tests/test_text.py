"""Text in: tokenization helpers and MLM predictions, against the tokenizer and HF logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from hooked_encoder import HookedEncoder


@pytest.fixture(scope="module")
def text_model(text_checkpoint):
    return HookedEncoder.from_pretrained(text_checkpoint.path)


def test_to_tokens_pads_and_masks_like_the_tokenizer(text_model, text_checkpoint):
    raw = Tokenizer.from_file(str(text_checkpoint.path / "tokenizer.json"))
    tokens, types, mask = text_model.to_tokens(["the cat sat", "a big red dog ran ."])
    assert tokens.shape == (2, 8)
    assert list(tokens[0]) == [*raw.encode("the cat sat").ids, 0, 0, 0]
    assert list(mask[0]) == [1] * 5 + [0] * 3 and types.sum() == 0


def test_string_helpers(text_model):
    assert text_model.to_str_tokens("The cat sat.") == ["[CLS]", "the", "cat", "sat", ".", "[SEP]"]
    ids = text_model.to_tokens("the cat")[0]
    assert text_model.to_str_tokens(ids[0]) == ["[CLS]", "the", "cat", "[SEP]"]
    assert text_model.to_str_tokens(ids) == [["[CLS]", "the", "cat", "[SEP]"]]
    assert text_model.to_string(ids[0][1:3]) == "the cat"
    assert text_model.to_string(torch.tensor(ids)[:, 1:3]) == ["the cat"]
    cat = text_model.to_single_token("cat")
    assert text_model.to_str_tokens(np.array([cat])) == ["cat"]
    with pytest.raises(ValueError, match="2 tokens"):
        text_model.to_single_token("big dog")
    assert text_model.get_token_position("the", "the cat sat on the mat") == 1
    assert text_model.get_token_position("the", "the cat sat on the mat", mode="last") == 5
    with pytest.raises(ValueError, match="does not occur"):
        text_model.get_token_position("dog", "the cat")


def test_predictions_are_the_argmax_at_each_mask(text_model, text_checkpoint):
    text = "the [MASK] sat on the [MASK] ."
    tokens = text_model.to_tokens(text)[0]
    with torch.no_grad():
        logits = text_checkpoint.hf(torch.tensor(tokens)).prediction_logits[0].numpy()
    at_masks = logits[tokens[0] == 4].argmax(-1)
    raw = Tokenizer.from_file(str(text_checkpoint.path / "tokenizer.json"))
    words = [raw.id_to_token(int(i)) for i in at_masks]
    assert text_model(text, return_type="predictions") == [
        f"Prediction {i}: {w}" for i, w in enumerate(words)
    ]
    single = text_model("the [MASK] sat", return_type="predictions")
    t = text_model.to_tokens("the [MASK] sat")[0]
    with torch.no_grad():
        logits_single = text_checkpoint.hf(torch.tensor(t)).prediction_logits[0].numpy()
    assert single == raw.id_to_token(int(logits_single[2].argmax()))
    with pytest.raises(ValueError, match=r"needs at least one \[MASK\]"):
        text_model("the cat sat", return_type="predictions")
