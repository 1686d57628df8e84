"""Parts of the model run on their own (the same Rust code as the full pass), against the
matching Hugging Face sub-modules; start_at_layer / stop_at_layer; devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ATOL, RTOL
from hooked_encoder import HookedEncoder, cuda_available
from test_parity import hf_run


def close(ours, theirs, atol=ATOL):
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=atol, rtol=RTOL)


@pytest.fixture(scope="module")
def run(checkpoint):
    tokens, types, mask = checkpoint.batch(seed=21)
    out, captured = hf_run(checkpoint, tokens, types, mask)
    return tokens, types, mask, out, captured


def test_embed_and_blocks_match_hf(model, checkpoint, run):
    tokens, types, mask, out, _ = run
    close(model.embed(tokens, types), out.hidden_states[0])
    hidden = [h.numpy() for h in out.hidden_states]
    for i in range(model.cfg.n_layers):
        close(model.blocks[i](hidden[i], mask), hidden[i + 1])


def test_attention_component_matches_hf_and_takes_separate_inputs(model, checkpoint, run):
    _tokens, _types, mask, out, captured = run
    x = out.hidden_states[1].numpy()
    close(model.blocks[1].attn(x, x, x, mask), captured["1.attn_out"])
    # Different query, key and value inputs, against a NumPy computation from the weights.
    rng = np.random.default_rng(0)
    q_in, k_in, v_in = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(3))
    layer = 0
    q = q_in @ model.W_Q[layer][0] + model.b_Q[layer][0]
    k = k_in @ model.W_K[layer][0] + model.b_K[layer][0]
    v = v_in @ model.W_V[layer][0] + model.b_V[layer][0]
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(model.cfg.d_head)
    pattern = np.exp(scores - scores.max(-1, keepdims=True))
    pattern /= pattern.sum(-1, keepdims=True)
    assert model.blocks[layer].attn(q_in, k_in, v_in).shape == x.shape
    seen = {}
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: seen.update(z=z))]):
        model.blocks[layer].attn(q_in, k_in, v_in)
    np.testing.assert_allclose(seen["z"][:, :, 0], pattern @ v, atol=1e-5)


def test_heads_match_hf(model, checkpoint, run):
    _, _, _, out, _ = run
    last = out.hidden_states[-1]
    with torch.no_grad():
        transformed = checkpoint.hf.cls.predictions.transform(last)
        logits = checkpoint.hf.cls.predictions.decoder(transformed)
        pooled = checkpoint.hf.bert.pooler(last)
        nsp = checkpoint.hf.cls.seq_relationship(pooled)
    close(model.mlm_head(last.numpy()), transformed)
    close(model.unembed(transformed.numpy()), logits)
    close(model.pooler(last.numpy()), pooled)
    close(model.nsp_head(pooled.numpy()), nsp)
    # torch in, torch out.
    assert isinstance(model.mlm_head(last), torch.Tensor)


def test_hooks_fire_inside_components_under_their_full_names(model, run):
    tokens, _types, _mask, out, _ = run
    names = []
    with model.hooks(fwd_hooks=[(lambda n: True, lambda x, hook: names.append(hook.name))]):
        model.embed(tokens)
        model.blocks[1](out.hidden_states[1].numpy())
        model.unembed(out.hidden_states[-1].numpy())
    assert (
        names[0] == "embed.hook_embed"
        and names[5] == "hook_full_embed"
        and len(names) == 6 + 18 + 2
    )
    assert names[6] == "blocks.1.hook_resid_pre" and names[-1] == "unembed.hook_out"


def test_start_and_stop_at_layer(model, checkpoint, run):
    tokens, types, mask, out, _ = run
    full = model(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    close(
        model(tokens, token_type_ids=types, one_zero_attention_mask=mask, stop_at_layer=1),
        out.hidden_states[1],
    )
    resid = model(tokens, token_type_ids=types, one_zero_attention_mask=mask, stop_at_layer=1)
    np.testing.assert_array_equal(
        model(resid, one_zero_attention_mask=mask, start_at_layer=1), full
    )
    # Patching the residual stream and resuming equals hooking the same edit in.
    patched = resid.copy()
    patched[:, 1] = 0
    resumed = model(patched, one_zero_attention_mask=mask, start_at_layer=1)

    def zero_position_1(x, hook):
        x[:, 1] = 0
        return x

    hooked = model.run_with_hooks(
        tokens,
        token_type_ids=types,
        one_zero_attention_mask=mask,
        fwd_hooks=[("blocks.1.hook_resid_pre", zero_position_1)],
    )
    np.testing.assert_allclose(resumed, hooked, atol=1e-6)
    assert model(resid, start_at_layer=1, return_type=None) is None
    with pytest.raises(ValueError, match="past the last block"):
        model(tokens, stop_at_layer=5)
    with pytest.raises(ValueError, match=r"must be \[batch, pos, 16\]"):
        model(np.zeros((2, 3, 7), dtype=np.float32), start_at_layer=1)
    with pytest.raises(TypeError, match="floating-point"):
        model(tokens, start_at_layer=1)


def test_component_weights_follow_the_state_dict_keys(model, checkpoint):
    hf = checkpoint.hf
    np.testing.assert_array_equal(
        model.blocks[0].ln1.w, hf.bert.encoder.layer[0].attention.output.LayerNorm.weight.detach()
    )
    np.testing.assert_array_equal(
        model.embed.token_type_embed.W_token_type,
        hf.bert.embeddings.token_type_embeddings.weight.detach(),
    )
    np.testing.assert_array_equal(model.blocks[1].attn.W_Q, model.W_Q[1])
    np.testing.assert_array_equal(
        model.mlm_head.W, hf.cls.predictions.transform.dense.weight.detach().T
    )
    np.testing.assert_array_equal(model.pooler.W, hf.bert.pooler.dense.weight.detach().T)
    with pytest.raises(AttributeError, match="blocks.0.nope"):
        _ = model.blocks[0].nope
    with pytest.raises(TypeError, match="weights only"):
        model.embed.ln(np.zeros(3))


def test_devices(checkpoint):
    model = HookedEncoder.from_pretrained(checkpoint.path)
    assert model.to("cpu") is model and model.cpu() is model and model.to(torch.float32) is model
    with pytest.raises(ValueError, match=r"use a device \(cpu, cuda, cuda:N\) or a dtype"):
        model.to("int8")
    if not cuda_available():
        with pytest.raises(ValueError, match="CPU-only"):
            model.cuda()
    np.testing.assert_array_equal(model(np.array([[1, 2]])), model.cpu()(np.array([[1, 2]])))
