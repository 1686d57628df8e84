"""ModernBERT, the pre-LN family: rotary attention, a gated MLP, alternating global and
windowed attention, no biases. Every result is checked against Hugging Face ``transformers``'
``ModernBertForMaskedLM`` / ``ModernBertModel`` (eager attention) on the same tiny random
weights, at sequences longer than the local window.

Positions of padding are left out of the comparisons of activations: a padding query whose
window holds only padding attends to nothing here (TransformerLens's convention: its pattern row
is 0), while Hugging Face spreads it uniformly over every key; real tokens never see padding, so
their values (and the logits there) agree."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from transformers.models.modernbert import modeling_modernbert

from conftest import (
    ATOL,
    RTOL,
    assert_half_parity,
    make_modernbert_checkpoint,
    retaining,
    write_tokenizer,
)
from hooked_encoder import HookedEncoder, HookedEncoderConfig
from test_parity import layer_norm_parts

N_LAYERS, WINDOW = 4, 3  # make_modernbert_checkpoint's defaults: layers g, l, l, g


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_modernbert_checkpoint(tmp_path_factory.mktemp("modernbert"), seed=21)


@pytest.fixture(scope="module")
def model(ck):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor is used
        return HookedEncoder.from_pretrained(ck.path)


@pytest.fixture(scope="module")
def batch(ck):
    """Four rows of 20 positions (wider than the window), three of them padded."""
    return ck.batch(seed=1, batch=4, pos=20)


def real(mask: np.ndarray, values, pos_axis: int = 1) -> np.ndarray:
    """``values`` at real (unpadded) positions only: ``[batch, pos, ...]`` -> ``[n_real, ...]``."""
    values = np.asarray(values)
    return np.moveaxis(values, pos_axis, 1)[mask.astype(bool)]


def close(ours, theirs, mask, pos_axis=1, atol=ATOL, rtol=RTOL):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(
        real(mask, ours, pos_axis), real(mask, theirs, pos_axis), atol=atol, rtol=rtol
    )


def hf_captures(ck, tokens, mask):
    """Hugging Face's forward with the inputs and outputs of every module we compare against."""
    hf, captured, handles = ck.hf, {}, []

    def keep(name, use_input=False):
        def fn(module, args, output):
            value = args[0] if use_input else output
            captured[name] = (value[0] if isinstance(value, tuple) else value).detach().clone()

        return fn

    modules = {
        "embed": (hf.model.embeddings.tok_embeddings, False),
        "embed_ln_in": (hf.model.embeddings.norm, True),
        "final_ln_in": (hf.model.final_norm, True),
        "mlm_ln_in": (hf.head.norm, True),
        "unembed_in": (hf.head, False),
    }
    for i, layer in enumerate(hf.model.layers):
        modules |= {
            f"{i}.attn_in": (layer.attn.Wqkv, True),
            f"{i}.qkv": (layer.attn.Wqkv, False),
            f"{i}.z": (layer.attn.Wo, True),
            f"{i}.attn_out": (layer.attn, False),
            f"{i}.resid_mid": (layer.mlp_norm, True),
            f"{i}.both": (layer.mlp.Wi, False),
            f"{i}.post": (layer.mlp.Wo, True),
            f"{i}.mlp_out": (layer.mlp, False),
            f"{i}.resid_post": (layer, False),
        }
    for name, (module, use_input) in modules.items():
        handles.append(module.register_forward_hook(keep(name, use_input)))
    try:
        with torch.no_grad():
            out = hf(
                torch.tensor(tokens),
                attention_mask=torch.tensor(mask),
                output_hidden_states=True,
                output_attentions=True,
            )
    finally:
        for handle in handles:
            handle.remove()
    return out, {k: v.numpy() for k, v in captured.items()}


def test_config_reads_every_modernbert_setting(ck, model):
    cfg = model.cfg
    assert (cfg.model_type, cfg.original_architecture) == ("modernbert", "ModernBertForMaskedLM")
    assert cfg.attn_types == ["global", "local", "local", "global"]
    assert cfg.window_size == ck.config.sliding_window == WINDOW
    assert (cfg.rotary_base, cfg.rotary_base_local) == (1000.0, 100.0)
    assert cfg.n_token_types == 0 and cfg.eps == ck.config.norm_eps
    assert cfg.positional_embedding_type == "rotary" and cfg.pre_layer_norm and cfg.gated_mlp


def test_logits_and_hidden_states_match_hugging_face(ck, model, batch):
    tokens, _, mask = batch
    out, _ = hf_captures(ck, tokens, mask)
    logits, cache = model.run_with_cache(tokens, one_zero_attention_mask=mask)
    close(logits, out.logits, mask)
    # Hugging Face's hidden states: each block's input, then the final norm's output.
    for layer in range(N_LAYERS):
        close(cache["resid_pre", layer], out.hidden_states[layer], mask)
    close(model.encoder_output(tokens, None, mask), out.hidden_states[-1], mask)
    for layer in range(N_LAYERS):  # the pattern, query rows of real tokens
        close(cache["pattern", layer], out.attentions[layer], mask, pos_axis=2)


def test_every_hook_matches_hugging_face_or_its_definition(ck, model, batch):
    tokens, _, mask = batch
    out, hf = hf_captures(ck, tokens, mask)
    _, cache = model.run_with_cache(tokens, one_zero_attention_mask=mask)
    h, dh = model.cfg.n_heads, model.cfg.d_head
    b, p = tokens.shape
    eps = model.cfg.eps
    checked = set()

    def check(name, theirs, pos_axis=1, **tol):
        close(cache[name], theirs, mask, pos_axis, **tol)
        checked.add(name)

    check("embed.hook_embed", hf["embed"])
    scale, normalized = layer_norm_parts(hf["embed_ln_in"], eps)
    check("embed.ln.hook_scale", scale)
    check("embed.ln.hook_normalized", normalized)
    check("hook_full_embed", out.hidden_states[0])
    position_ids = torch.arange(p)[None]
    for i in range(N_LAYERS):
        at = f"blocks.{i}."
        check(at + "hook_resid_pre", out.hidden_states[i])
        if i > 0:  # layer 0 has no attention norm
            scale, normalized = layer_norm_parts(cache[at + "hook_resid_pre"], eps)
            check(at + "ln1.hook_scale", scale)
            check(at + "ln1.hook_normalized", normalized)
        else:
            assert at + "ln1.hook_scale" not in cache
            close(cache[at + "hook_resid_pre"], hf[f"{i}.attn_in"], mask)
        q, k, v = (hf[f"{i}.qkv"].reshape(b, p, 3, h, dh)[:, :, j] for j in range(3))
        check(at + "attn.hook_q", q)
        check(at + "attn.hook_k", k)
        check(at + "attn.hook_v", v)
        # The rotation, by transformers' own function and tables, of our q and k.
        layer_type = ck.config.layer_types[i]
        cos, sin = ck.hf.model.rotary_emb(torch.zeros(1), position_ids, layer_type)
        rot_q, rot_k = modeling_modernbert.apply_rotary_pos_emb(
            torch.tensor(cache[at + "attn.hook_q"]).transpose(1, 2),
            torch.tensor(cache[at + "attn.hook_k"]).transpose(1, 2),
            cos,
            sin,
        )
        check(at + "attn.hook_rot_q", rot_q.transpose(1, 2).numpy())
        check(at + "attn.hook_rot_k", rot_k.transpose(1, 2).numpy())
        # Scores: the definition, with -inf at padding keys and outside a local window.
        scores = np.einsum(
            "bqhd,bkhd->bhqk", cache[at + "attn.hook_rot_q"], cache[at + "attn.hook_rot_k"]
        ) / np.sqrt(dh)
        distance = np.abs(np.arange(p)[:, None] - np.arange(p)[None, :])
        visible = (mask[:, None, None, :] == 1) & (
            (distance <= WINDOW) if layer_type == "sliding_attention" else True
        )
        check(at + "attn.hook_attn_scores", np.where(visible, scores, -np.inf), pos_axis=2)
        check(at + "attn.hook_pattern", out.attentions[i], pos_axis=2)
        check(at + "attn.hook_z", hf[f"{i}.z"].reshape(b, p, h, dh))
        check(at + "hook_attn_out", hf[f"{i}.attn_out"])
        check(at + "hook_resid_mid", hf[f"{i}.resid_mid"])
        scale, normalized = layer_norm_parts(hf[f"{i}.resid_mid"], eps)
        check(at + "ln2.hook_scale", scale)
        check(at + "ln2.hook_normalized", normalized)
        activated, linear = np.split(hf[f"{i}.both"], 2, axis=-1)
        check(at + "mlp.hook_pre", activated)
        check(at + "mlp.hook_pre_linear", linear)
        check(at + "mlp.hook_post", hf[f"{i}.post"])
        check(at + "hook_mlp_out", hf[f"{i}.mlp_out"])
        check(at + "hook_resid_post", hf[f"{i}.resid_post"])
    scale, normalized = layer_norm_parts(hf["final_ln_in"], eps)
    check("ln_final.hook_scale", scale)
    check("ln_final.hook_normalized", normalized)
    scale, normalized = layer_norm_parts(hf["mlm_ln_in"], eps)
    check("mlm_head.ln.hook_scale", scale)
    check("mlm_head.ln.hook_normalized", normalized)
    check("unembed.hook_in", hf["unembed_in"])
    check("unembed.hook_out", out.logits)
    assert checked == set(cache.keys()) == set(model.hook_dict)
    assert "embed.hook_pos_embed" not in model.hook_dict
    assert not any(n.endswith("hook_normalized_resid_post") for n in model.hook_dict)


def test_a_local_layer_ignores_keys_beyond_its_window(ck, model):
    """A local layer's output at a query does not change when a key beyond its window changes
    (in that layer alone: later global layers carry it further)."""
    tokens, _, _ = ck.batch(seed=2, batch=1, pos=20)
    changed = tokens.copy()
    changed[0, 15] = (changed[0, 15] % 50) + 4
    name = "blocks.1.hook_attn_out"  # local: sees keys within 3 positions
    resid = {}
    for key, t in (("a", tokens), ("b", changed)):
        _, cache = model.run_with_cache(t, names_filter=["blocks.1.hook_resid_pre", name])
        resid[key] = cache
    # Feed block 1 the same input except at position 15, as if only that key moved.
    x = resid["a"]["blocks.1.hook_resid_pre"].copy()
    x[0, 15] = resid["b"]["blocks.1.hook_resid_pre"][0, 15]
    _, moved = model.run_with_cache(x, start_at_layer=1, stop_at_layer=2, names_filter=name)
    diff = np.abs(moved[name] - resid["a"][name])[0].max(axis=-1)
    assert np.all(diff[:12] == 0) and np.all(diff[12:19] > 0)


def test_a_zeroed_head_matches_the_same_edit_inside_hugging_face(ck, model, batch):
    tokens, _, mask = batch
    h, dh = model.cfg.n_heads, model.cfg.d_head

    def ours(z, hook):
        z[:, :, 2] = 0
        return z

    def theirs(module, args):
        z = args[0].clone()
        z[..., 2 * dh : 3 * dh] = 0
        return (z,)

    handle = ck.hf.model.layers[1].attn.Wo.register_forward_pre_hook(theirs)
    try:
        expected = ck.hf_logits(tokens, mask=mask)
    finally:
        handle.remove()
    edited = model.run_with_hooks(
        tokens, one_zero_attention_mask=mask, fwd_hooks=[("blocks.1.attn.hook_z", ours)]
    )
    close(edited, expected, mask)
    assert (
        np.abs(real(mask, edited) - real(mask, model(tokens, one_zero_attention_mask=mask))).max()
        > 1e-3
    )
    assert h > 2


def test_gradients_match_torch_autograd(ck, model, batch, monkeypatch):
    tokens, _, mask = batch
    projection = np.random.default_rng(0).normal(size=(*tokens.shape, 61)).astype(np.float32)
    projection *= mask[:, :, None]  # a metric of real positions only
    names = [
        "embed.hook_embed",
        "blocks.2.hook_resid_pre",
        "blocks.1.attn.hook_pattern",
        "blocks.3.attn.hook_rot_q",
        "blocks.3.mlp.hook_pre_linear",
    ]
    grads = model.grad(tokens, grad_output=projection, names=names, one_zero_attention_mask=mask)
    kept: dict = {}
    hf = ck.hf
    rotated = []
    rotate = modeling_modernbert.apply_rotary_pos_emb

    def keeping_rotated_q(q, k, cos, sin, **kwargs):
        q, k = rotate(q, k, cos, sin, **kwargs)
        q.retain_grad()
        rotated.append(q)
        return q, k

    monkeypatch.setattr(modeling_modernbert, "apply_rotary_pos_emb", keeping_rotated_q)
    hooks = [
        hf.model.embeddings.tok_embeddings.register_forward_hook(retaining(kept, "embed")),
        hf.model.layers[3].mlp.Wi.register_forward_hook(retaining(kept, "both")),
    ]
    try:
        out = hf(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            output_hidden_states=True,
            output_attentions=True,
        )
        out.hidden_states[2].retain_grad()
        out.attentions[1].retain_grad()
        (out.logits * torch.tensor(projection)).sum().backward()
    finally:
        for handle in hooks:
            handle.remove()
        hf.zero_grad(set_to_none=True)

    def tol(reference) -> dict:
        # The 1e-5 / 1e-4, with the absolute part at least 1e-6 of the tensor's largest
        # value: float32 rounding in a backward pass grows with the scale of the sums, not of
        # each element. (Against a float64 reference, sdpa, the embedding gradient here, up to
        # ~40, is 9.5e-6 off in ours and 1.2e-5 in torch's float32 at an element of -0.069.)
        scale = np.abs(reference.detach().numpy() if torch.is_tensor(reference) else reference)
        return {"atol": max(1e-5, 1e-6 * float(scale.max())), "rtol": 1e-4}

    embed_grad, resid_grad, pattern_grad = (
        kept["embed"].grad,
        out.hidden_states[2].grad,
        out.attentions[1].grad,
    )
    close(grads["embed.hook_embed"], embed_grad, mask, **tol(embed_grad))
    close(grads["blocks.2.hook_resid_pre"], resid_grad, mask, **tol(resid_grad))
    close(grads["blocks.1.attn.hook_pattern"], pattern_grad, mask, pos_axis=2, **tol(pattern_grad))
    linear_grad = kept["both"].grad.numpy()[..., model.cfg.d_mlp :]
    close(grads["blocks.3.mlp.hook_pre_linear"], linear_grad, mask, **tol(linear_grad))
    rot_q_grad = rotated[3].grad.transpose(1, 2)  # [batch, head, pos, d_head] in transformers
    close(grads["blocks.3.attn.hook_rot_q"], rot_q_grad, mask, **tol(rot_q_grad))


def test_weights_have_transformer_lens_names_and_modernbert_shapes(ck, model):
    sd = {k: v.detach().numpy() for k, v in ck.hf.state_dict().items()}
    d, h, dh, m = model.cfg.d_model, model.cfg.n_heads, model.cfg.d_head, model.cfg.d_mlp
    q, _, v = np.split(sd["model.layers.2.attn.Wqkv.weight"], 3)
    np.testing.assert_array_equal(model.W_Q[2], q.reshape(h, dh, d).transpose(0, 2, 1))
    np.testing.assert_array_equal(model.W_V[2], v.reshape(h, dh, d).transpose(0, 2, 1))
    activated, linear = np.split(sd["model.layers.1.mlp.Wi.weight"], 2)
    np.testing.assert_array_equal(model.W_gate[1], activated.T)
    np.testing.assert_array_equal(model.W_in[1], linear.T)
    assert model.W_in.shape == model.W_gate.shape == (N_LAYERS, d, m)
    assert not model.b_Q.any() and not model.b_in.any()  # bias-free layers: zeros, as in TL
    sd_tl = model.state_dict()
    assert "blocks.0.ln1.w" not in sd_tl and "blocks.1.ln1.w" in sd_tl
    np.testing.assert_array_equal(sd_tl["ln_final.w"], sd["model.final_norm.weight"])
    with pytest.raises(AttributeError, match="rotary"):
        _ = model.W_pos
    assert model.QK.shape == (N_LAYERS, h, d, d)


def test_pickling_and_half_precision(ck, model, batch):
    tokens, _, mask = batch
    again = pickle.loads(pickle.dumps(model))
    assert again.cfg == model.cfg
    np.testing.assert_array_equal(
        again(tokens, one_zero_attention_mask=mask), model(tokens, one_zero_attention_mask=mask)
    )
    half = HookedEncoder.from_pretrained(ck.path, dtype="bfloat16")
    hf32 = ck.hf_logits(tokens, mask=mask)
    with torch.no_grad():
        # A copy: rounding the shared model's weights to bfloat16 and back would change them.
        hf_half_model = copy.deepcopy(ck.hf).to(torch.bfloat16)
        hf_half = hf_half_model(torch.tensor(tokens), attention_mask=torch.tensor(mask))
    ours = np.asarray(half(tokens, one_zero_attention_mask=mask), dtype=np.float32)
    assert_half_parity(
        real(mask, ours), real(mask, hf_half.logits.float().numpy()), real(mask, hf32), "bfloat16"
    )


def test_text_input_pads_and_masks_with_the_tokenizer_s_tokens(tmp_path, ck):
    """A ``[CLS] ... [SEP]`` tokenizer (ModernBERT's special tokens): padding uses ``[PAD]``
    (``pad_token_id`` 0 here), no token types reach the model, and ``predictions`` fill
    ``[MASK]`` from the same logits as Hugging Face's."""
    for file in ck.path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    write_tokenizer(tmp_path, ck.config.vocab_size)
    model = HookedEncoder.from_pretrained(tmp_path)
    texts = ["the cat sat on the mat", "[MASK] cat"]
    tokens, _, mask = model.to_tokens(texts)
    assert tokens[1, -1] == ck.config.pad_token_id and mask[1, -1] == 0
    close(model(texts), ck.hf_logits(tokens, mask=mask), mask)
    predicted = model(texts[1], return_type="predictions")
    single = model.to_tokens(texts[1])[0]
    assert single[0, 1] == model.tokenizer.mask_token_id
    expected = ck.hf_logits(single)[0, 1].argmax()
    assert predicted == model.tokenizer.decode([int(expected)])


def test_the_base_model_and_an_original_config_json_load(tmp_path, ck, model, batch):
    """``ModernBertModel`` loads as an encoder; and a config.json as the original checkpoints
    write it (``global_attn_every_n_layers``, ``global_rope_theta``, no ``layer_types``) gives
    the same model as transformers 5's own keys."""
    tokens, _, mask = batch
    base = make_modernbert_checkpoint(tmp_path / "base", base=True, seed=21)
    encoder = HookedEncoder.from_pretrained(base.path)
    assert not encoder.has_mlm_head
    with torch.no_grad():
        expected = base.hf(torch.tensor(tokens), attention_mask=torch.tensor(mask))
    close(encoder.encoder_output(tokens, None, mask), expected.last_hidden_state, mask)

    config = json.loads((ck.path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    del config["layer_types"]
    config |= {
        "global_attn_every_n_layers": 3,
        "global_rope_theta": rope["full_attention"]["rope_theta"],
        "local_rope_theta": rope["sliding_attention"]["rope_theta"],
    }
    old = HookedEncoderConfig.from_hf_config(config)
    assert (old.attn_types, old.rotary_base, old.rotary_base_local) == (
        model.cfg.attn_types,
        model.cfg.rotary_base,
        model.cfg.rotary_base_local,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"norm_bias": True}, "norm_bias"),
        ({"classifier_activation": "relu"}, "classifier_activation"),
        ({"layer_types": ["full_attention", "chunked"]}, "layer_types"),
    ],
)
def test_unsupported_modernbert_options_are_refused_by_name(ck, change, message):
    config = json.loads((ck.path / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        HookedEncoderConfig.from_hf_config(config)


def test_the_cache_decomposes_the_residual_stream_exactly(model, batch):
    """Pre-LN: the residual stream is the sum of the normalised embedding and every block's
    writes, and ``apply_ln`` at the final layer is ``ln_final``'s own normalisation."""
    tokens, _, mask = batch
    _, cache = model.run_with_cache(tokens, one_zero_attention_mask=mask)
    parts, labels = cache.decompose_resid(layer=2, return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    close(parts.sum(0), cache["resid_pre", 2], mask, atol=1e-4)
    everything = cache.decompose_resid(apply_ln=True)
    close(everything.sum(0), cache["ln_final.hook_normalized"], mask, atol=1e-4)
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels[-1] == "final_post"
    np.testing.assert_array_equal(stack[-1], cache["blocks.3.hook_resid_post"])


def test_info_shows_the_pre_ln_hook_table(ck):
    import subprocess
    import sys

    info = subprocess.run(
        [sys.executable, "-m", "hooked_encoder.cli", "info", "--model", str(ck.path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert "  model_type: modernbert" in lines and "  window_size: 3" in lines
    meaning = {line.split()[0]: line for line in lines if line.startswith("  blocks.1.")}
    assert "before attention" in meaning["blocks.1.ln1.hook_scale"]
    assert "after rotary" in meaning["blocks.1.attn.hook_rot_q"]
    assert "linear half" in meaning["blocks.1.mlp.hook_pre_linear"]
    assert any(line.startswith("  ln_final.hook_normalized") for line in lines)
