"""Next-sentence prediction against Hugging Face ``BertForPreTraining``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from hooked_encoder import BertNextSentencePrediction, HookedEncoder


@pytest.fixture(scope="module")
def nsp(text_checkpoint):
    return BertNextSentencePrediction(HookedEncoder.from_pretrained(text_checkpoint.path))


def hf_nsp(ck, tokens, types, mask):
    with torch.no_grad():
        out = ck.hf(
            torch.tensor(tokens),
            token_type_ids=torch.tensor(types),
            attention_mask=torch.tensor(mask),
            output_hidden_states=True,
        )
        pooled = ck.hf.bert.pooler(out.hidden_states[-1])
    return out.seq_relationship_logits.numpy(), pooled.numpy()


def test_sentence_pair_logits_and_pooler_match_hf(nsp, text_checkpoint):
    pair = ["the cat sat .", "it was tired ."]
    tokens, types, mask = nsp.to_tokens(pair)
    assert types[0].tolist() == [0] * 6 + [1] * 5
    expected_logits, expected_pooled = hf_nsp(text_checkpoint, tokens, types, mask)
    logits, cache = nsp.run_with_cache(pair)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    np.testing.assert_allclose(cache["pooler.hook_pooler_out"], expected_pooled, atol=1e-5)
    np.testing.assert_array_equal(cache["nsp_head.hook_nsp_out"], logits)
    assert list(cache)[-2:] == ["pooler.hook_pooler_out", "nsp_head.hook_nsp_out"]
    assert "unembed.hook_out" not in cache
    expected = (
        "The sentences are sequential"
        if expected_logits[0].argmax() == 0
        else "The sentences are NOT sequential"
    )
    assert nsp(pair, return_type="predictions") == expected


def test_token_input_needs_token_types_and_batches_work(nsp, text_checkpoint):
    tokens, types, mask = text_checkpoint.batch(seed=12)
    with pytest.raises(ValueError, match="without specifying token_type_ids"):
        nsp(tokens)
    expected, _ = hf_nsp(text_checkpoint, tokens, types, mask)
    np.testing.assert_allclose(
        nsp(tokens, token_type_ids=types, one_zero_attention_mask=mask), expected, atol=1e-5
    )
    predictions = nsp(
        tokens, return_type="predictions", token_type_ids=types, one_zero_attention_mask=mask
    )
    assert len(predictions) == 3 and all("sequential" in p for p in predictions)


def test_nsp_errors(nsp, tmp_path):
    with pytest.raises(ValueError, match="exactly two sentences"):
        nsp.to_tokens(["only one"])
    with pytest.raises(TypeError, match="unexpected arguments"):
        nsp.run_with_cache(["a", "b"], bogus=1)
    make_checkpoint(tmp_path, arch="BertForMaskedLM")
    no_pooler = BertNextSentencePrediction(HookedEncoder.from_pretrained(tmp_path))
    with pytest.raises(ValueError, match="no pooler and NSP head"):
        no_pooler(np.array([[1, 2, 3]]), token_type_ids=np.array([[0, 0, 1]]))
