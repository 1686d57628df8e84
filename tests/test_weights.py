"""Weight properties, state_dict and the QK/OV factored matrices, against the Hugging Face
parameters they come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_encoder import FactoredMatrix, HookedEncoder


def hf_param(module) -> np.ndarray:
    return module.detach().numpy()


def test_weight_properties_match_the_hf_parameters(checkpoint, model):
    hf = checkpoint.hf
    cfg = model.cfg
    h, dh = cfg.n_heads, cfg.d_head
    bert = hf.bert
    np.testing.assert_array_equal(model.W_E, hf_param(bert.embeddings.word_embeddings.weight))
    np.testing.assert_array_equal(model.W_pos, hf_param(bert.embeddings.position_embeddings.weight))
    assert model.W_E_pos.shape == (cfg.d_vocab + cfg.n_ctx, cfg.d_model)
    # The decoder is tied to the word embeddings in the checkpoint.
    np.testing.assert_array_equal(model.W_U, hf_param(bert.embeddings.word_embeddings.weight).T)
    np.testing.assert_array_equal(model.b_U, hf_param(hf.cls.predictions.bias))
    assert model.W_Q.shape == (cfg.n_layers, h, cfg.d_model, dh)
    assert model.W_O.shape == (cfg.n_layers, h, dh, cfg.d_model)
    for layer, block in enumerate(bert.encoder.layer):
        att = block.attention
        for head in range(h):
            rows = slice(head * dh, (head + 1) * dh)
            for ours, theirs in (
                (model.W_Q, att.self.query),
                (model.W_K, att.self.key),
                (model.W_V, att.self.value),
            ):
                np.testing.assert_array_equal(ours[layer, head], hf_param(theirs.weight)[rows].T)
            np.testing.assert_array_equal(model.b_K[layer, head], hf_param(att.self.key.bias)[rows])
            np.testing.assert_array_equal(
                model.W_O[layer, head], hf_param(att.output.dense.weight)[:, rows].T
            )
        np.testing.assert_array_equal(model.b_O[layer], hf_param(att.output.dense.bias))
        np.testing.assert_array_equal(
            model.W_in[layer], hf_param(block.intermediate.dense.weight).T
        )
        np.testing.assert_array_equal(model.b_in[layer], hf_param(block.intermediate.dense.bias))
        np.testing.assert_array_equal(model.W_out[layer], hf_param(block.output.dense.weight).T)
        np.testing.assert_array_equal(model.b_out[layer], hf_param(block.output.dense.bias))


def test_state_dict_has_the_reference_keys_and_heads(checkpoint, model):
    hf = checkpoint.hf
    sd = model.state_dict()
    layer_keys = [
        f"blocks.{i}.{k}"
        for i in range(model.cfg.n_layers)
        for k in (
            "attn.W_Q",
            "attn.W_K",
            "attn.W_V",
            "attn.W_O",
            "attn.b_Q",
            "attn.b_K",
            "attn.b_V",
            "attn.b_O",
            "ln1.w",
            "ln1.b",
            "mlp.W_in",
            "mlp.b_in",
            "mlp.W_out",
            "mlp.b_out",
            "ln2.w",
            "ln2.b",
        )
    ]
    expected = {
        "embed.embed.W_E",
        "embed.pos_embed.W_pos",
        "embed.token_type_embed.W_token_type",
        "embed.ln.w",
        "embed.ln.b",
        *layer_keys,
        "mlm_head.W",
        "mlm_head.b",
        "mlm_head.ln.w",
        "mlm_head.ln.b",
        "unembed.W_U",
        "unembed.b_U",
        "nsp_head.W",
        "nsp_head.b",
        "pooler.W",
        "pooler.b",
    }
    assert set(sd) == expected
    transform = hf.cls.predictions.transform
    np.testing.assert_array_equal(sd["mlm_head.W"], hf_param(transform.dense.weight).T)
    np.testing.assert_array_equal(sd["mlm_head.ln.w"], hf_param(transform.LayerNorm.weight))
    np.testing.assert_array_equal(
        sd["blocks.1.ln2.b"], hf_param(hf.bert.encoder.layer[1].output.LayerNorm.bias)
    )
    np.testing.assert_array_equal(sd["pooler.W"], hf_param(hf.bert.pooler.dense.weight).T)
    np.testing.assert_array_equal(sd["nsp_head.W"], hf_param(hf.cls.seq_relationship.weight).T)
    assert sd["nsp_head.W"].shape == (model.cfg.d_model, 2)
    with pytest.raises(ValueError, match="read-only"):
        sd["embed.ln.w"][0] = 0.0


def test_qk_and_ov_are_the_factored_circuits(model):
    qk, ov = model.QK, model.OV
    assert isinstance(qk, FactoredMatrix)
    assert qk.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
    np.testing.assert_allclose(
        qk.AB[1, 0], model.W_Q[1, 0] @ model.W_K[1, 0].T, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(ov[0, 1].AB, model.W_V[0, 1] @ model.W_O[0, 1], rtol=1e-5, atol=1e-6)
    assert model.all_head_labels()[: model.cfg.n_heads + 1] == [
        *(f"L0H{h}" for h in range(model.cfg.n_heads)),
        "L1H0",
    ]
    assert len(model.all_head_labels()) == model.cfg.n_layers * model.cfg.n_heads


def test_qk_reproduces_the_cached_attention_scores(model):
    """scores = (x W_Q + b_Q)(x W_K + b_K)ᵀ / sqrt(d_head): the QK circuit plus bias terms."""
    tokens = np.array([[1, 4, 9, 16]])
    _, cache = model.run_with_cache(tokens)
    x = cache["resid_pre", 0][0].astype(np.float64)
    q = x @ model.W_Q[0, 1] + model.b_Q[0, 1]
    k = x @ model.W_K[0, 1] + model.b_K[0, 1]
    np.testing.assert_allclose(
        cache["attn_scores", 0][0, 1], q @ k.T / np.sqrt(model.cfg.d_head), rtol=1e-4, atol=1e-5
    )


def test_torch_users_get_tensors_and_encoders_have_no_unembedding(checkpoint, tmp_path):
    from conftest import make_checkpoint

    model = HookedEncoder.from_pretrained(checkpoint.path, output_format="torch")
    assert isinstance(model.W_Q, torch.Tensor) and isinstance(
        model.state_dict()["unembed.b_U"], torch.Tensor
    )
    ck = make_checkpoint(tmp_path, arch="BertModel")
    encoder = HookedEncoder.from_pretrained(tmp_path)
    with pytest.raises(AttributeError, match="no MLM head"):
        _ = encoder.W_U
    sd = encoder.state_dict()
    assert "unembed.W_U" not in sd and "mlm_head.W" not in sd
    # A BertModel checkpoint keeps its pooler, without the "bert." prefix.
    np.testing.assert_array_equal(sd["pooler.W"], hf_param(ck.hf.pooler.dense.weight).T)
