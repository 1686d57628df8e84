"""Parity with Hugging Face ``transformers`` (torch, eager attention) on the same weights, and
every hook point against a value computed independently of our code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ATOL, RTOL, make_checkpoint
from hooked_encoder import HookedEncoder

# Section 2.2 of the reference: cache order of TransformerLens's HookedEncoder.
EMBED_HOOKS = [
    "embed.hook_embed",
    "embed.hook_pos_embed",
    "embed.hook_token_type_embed",
    "embed.ln.hook_scale",
    "embed.ln.hook_normalized",
    "hook_full_embed",
]
BLOCK_HOOKS = [
    "hook_resid_pre",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "hook_normalized_resid_post",
]
HEAD_HOOKS = [
    "mlm_head.ln.hook_scale",
    "mlm_head.ln.hook_normalized",
    "unembed.hook_in",
    "unembed.hook_out",
]


def reference_names(n_layers: int) -> list[str]:
    blocks = [f"blocks.{i}.{h}" for i in range(n_layers) for h in BLOCK_HOOKS]
    return EMBED_HOOKS + blocks + HEAD_HOOKS


def close(ours, theirs, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=atol, rtol=rtol)


def has_token_types(hf_model) -> bool:
    return hasattr(hf_model.base_model.embeddings, "token_type_embeddings")


def hf_modules(model) -> dict[str, tuple[torch.nn.Module, bool]]:
    """The modules of a Hugging Face model whose output (or, with True, input) is each
    intermediate: BERT and RoBERTa share module names; DistilBERT and MPNet have their own."""
    base, out = model.base_model, {}
    emb = base.embeddings
    out["word"] = (emb.word_embeddings, False)
    out["pos"] = (emb.position_embeddings, False)
    if has_token_types(model):
        out["type"] = (emb.token_type_embeddings, False)
    out["embed_ln_in"] = (emb.LayerNorm, True)
    if hasattr(base.encoder if hasattr(base, "encoder") else base, "relative_attention_bias"):
        for i, layer in enumerate(base.encoder.layer):  # MPNet
            att = layer.attention
            out |= {
                f"{i}.q": (att.attn.q, False),
                f"{i}.k": (att.attn.k, False),
                f"{i}.v": (att.attn.v, False),
                f"{i}.attn_out": (att.attn.o, False),
                f"{i}.z": (att.attn.o, True),
                f"{i}.resid_mid": (att.LayerNorm, True),
                f"{i}.pre": (layer.intermediate.dense, False),
                f"{i}.post": (layer.intermediate, False),
                f"{i}.mlp_out": (layer.output.dense, False),
                f"{i}.resid_post": (layer.output.LayerNorm, True),
            }
    elif hasattr(base, "transformer"):  # DistilBERT
        for i, layer in enumerate(base.transformer.layer):
            att, ffn = layer.attention, layer.ffn
            out |= {
                f"{i}.q": (att.q_lin, False),
                f"{i}.k": (att.k_lin, False),
                f"{i}.v": (att.v_lin, False),
                f"{i}.attn_out": (att.out_lin, False),
                f"{i}.z": (att.out_lin, True),
                f"{i}.resid_mid": (layer.sa_layer_norm, True),
                f"{i}.pre": (ffn.lin1, False),
                f"{i}.post": (ffn.lin2, True),
                f"{i}.mlp_out": (ffn.lin2, False),
                f"{i}.resid_post": (layer.output_layer_norm, True),
            }
    else:
        for i, layer in enumerate(base.encoder.layer):
            att = layer.attention
            out |= {
                f"{i}.q": (att.self.query, False),
                f"{i}.k": (att.self.key, False),
                f"{i}.v": (att.self.value, False),
                f"{i}.attn_out": (att.output.dense, False),
                f"{i}.z": (att.output.dense, True),
                f"{i}.resid_mid": (att.output.LayerNorm, True),
                f"{i}.pre": (layer.intermediate.dense, False),
                f"{i}.post": (layer.intermediate, False),
                f"{i}.mlp_out": (layer.output.dense, False),
                f"{i}.resid_post": (layer.output.LayerNorm, True),
            }
    head_ln = (
        model.cls.predictions.transform.LayerNorm
        if hasattr(model, "cls")
        else model.lm_head.layer_norm
        if hasattr(model, "lm_head")
        else model.generator_predictions.LayerNorm
        if hasattr(model, "generator_predictions")
        else getattr(model, "vocab_layer_norm", None)
    )
    if head_ln is not None:
        out["mlm_ln_in"] = (head_ln, True)
        out["unembed_in"] = (head_ln, False)
    return out


def hf_run(ck, tokens, types, mask, model=None):
    """HF forward with every intermediate captured by torch forward hooks."""
    model = model or ck.hf
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, use_input=False):
        def fn(module, args, output):
            captured[name] = (args[0] if use_input else output).detach().clone()

        return fn

    for name, (module, use_input) in hf_modules(model).items():
        handles.append(module.register_forward_hook(keep(name, use_input)))
    try:
        with torch.no_grad():
            typed = {"token_type_ids": torch.tensor(types)} if has_token_types(model) else {}
            out = model(
                torch.tensor(tokens),
                attention_mask=torch.tensor(mask),
                output_hidden_states=True,
                output_attentions=True,
                **typed,
            )
    finally:
        for h in handles:
            h.remove()
    return out, {k: v.numpy() for k, v in captured.items()}


def layer_norm_parts(x, eps=1e-12):
    """TransformerLens's LayerNorm hooks, re-derived in float64."""
    x = x.astype(np.float64)
    centred = x - x.mean(-1, keepdims=True)
    scale = np.sqrt((centred**2).mean(-1, keepdims=True) + eps)
    return scale, centred / scale


def logits_of(out):
    """MLM logits of a Hugging Face output (``BertForPreTraining`` names them differently)."""
    return out.prediction_logits if hasattr(out, "prediction_logits") else out.logits


def test_logits_and_hidden_states_match_hugging_face(any_checkpoint):
    ck = any_checkpoint
    model = HookedEncoder.from_pretrained(ck.path)
    tokens, types, mask = ck.batch(seed=1, batch=4, pos=ck.config.max_position_embeddings - 2)
    out, _ = hf_run(ck, tokens, types, mask)
    logits, cache = model.run_with_cache(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    close(logits, out.prediction_logits)
    close(cache["hook_full_embed"], out.hidden_states[0])
    for i in range(ck.config.num_hidden_layers):
        close(cache["normalized_resid_post", i], out.hidden_states[i + 1])
    close(model.encoder_output(tokens, types, mask), out.hidden_states[-1])


def test_cache_keys_are_the_reference_names_in_firing_order(checkpoint, model):
    _, cache = model.run_with_cache(np.array([[1, 2, 3]]))
    assert list(cache.keys()) == reference_names(checkpoint.config.num_hidden_layers)
    # The hook dict also holds the two points only next-sentence prediction fires.
    assert list(model.hook_dict) == [
        *reference_names(checkpoint.config.num_hidden_layers),
        "pooler.hook_pooler_out",
        "nsp_head.hook_nsp_out",
    ]


def test_every_hook_matches_an_independent_computation(checkpoint, model):
    check_every_hook(checkpoint, model)


def check_every_hook(ck, model):
    """Every hook point of ``model`` against Hugging Face's model ``ck.hf`` (captured with torch
    hooks) or, where HF has no tensor, a float64 re-derivation from the ones it has."""
    eps = getattr(ck.config, "layer_norm_eps", 1e-12)  # DistilBERT: fixed 1e-12
    tokens, types, mask = ck.batch(seed=2)
    out, hf = hf_run(ck, tokens, types, mask)
    _, c = model.run_with_cache(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    b, p = tokens.shape
    h, dh = ck.config.num_attention_heads, ck.config.hidden_size // ck.config.num_attention_heads

    close(c["embed.hook_embed"], hf["word"])
    close(c["embed.hook_pos_embed"], np.broadcast_to(hf["pos"], c["embed.hook_pos_embed"].shape))
    if "type" in hf:
        close(c["embed.hook_token_type_embed"], hf["type"])
    else:
        assert "embed.hook_token_type_embed" not in model.hook_dict
    scale, normalized = layer_norm_parts(hf["embed_ln_in"], eps)
    close(c["embed.ln.hook_scale"], scale, rtol=1e-5)
    close(c["embed.ln.hook_normalized"], normalized, atol=1e-4)
    if "hook_embed_proj" in c:  # ELECTRA: the projected embeddings enter block 0
        close(c["hook_embed_proj"], out.hidden_states[0])

    heads = lambda x: x.reshape(b, p, h, dh)  # noqa: E731
    additive = np.where(mask[:, None, None, :] == 1, 0.0, -np.inf)
    if "hook_rel_pos_bias" in model.hook_dict:  # MPNet: the bias from HF's own function
        with torch.no_grad():
            bias = ck.hf.base_model.encoder.compute_position_bias(torch.zeros(b, p, 1)).numpy()
        close(c["hook_rel_pos_bias"], bias)
        additive = additive + bias
    for i in range(ck.config.num_hidden_layers):
        close(c["resid_pre", i], out.hidden_states[i])
        for name in ("q", "k", "v"):
            close(c[name, i], heads(hf[f"{i}.{name}"]))
        q = c["q", i].astype(np.float64).transpose(0, 2, 1, 3)
        k = c["k", i].astype(np.float64).transpose(0, 2, 1, 3)
        v = c["v", i].astype(np.float64).transpose(0, 2, 1, 3)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + additive
        np.testing.assert_array_equal(np.isneginf(c["attn_scores", i]), np.isneginf(scores))
        finite = np.isfinite(scores)
        close(c["attn_scores", i][finite], scores[finite], atol=1e-5)
        close(c["pattern", i], out.attentions[i])
        close(c["z", i], heads(hf[f"{i}.z"]))
        close(c["z", i], (c["pattern", i].astype(np.float64) @ v).transpose(0, 2, 1, 3), atol=1e-5)
        close(c["attn_out", i], hf[f"{i}.attn_out"])
        close(c["resid_mid", i], hf[f"{i}.resid_mid"])
        scale, normalized = layer_norm_parts(hf[f"{i}.resid_mid"], eps)
        close(c["scale", i, "ln1"], scale, rtol=1e-5)
        close(c["normalized", i, "ln1"], normalized, atol=1e-4)
        close(c["pre", i], hf[f"{i}.pre"])
        close(c["post", i], hf[f"{i}.post"])
        close(c["mlp_out", i], hf[f"{i}.mlp_out"])
        close(c["resid_post", i], hf[f"{i}.resid_post"])
        scale, normalized = layer_norm_parts(hf[f"{i}.resid_post"], eps)
        close(c["scale", i, "ln2"], scale, rtol=1e-5)
        close(c["normalized", i, "ln2"], normalized, atol=1e-4)
        close(c["normalized_resid_post", i], out.hidden_states[i + 1])
    if "mlm_ln_in" not in hf:  # an ELECTRA discriminator: one logit per token
        close(c["discriminator.hook_out"], logits_of(out))
        return
    scale, normalized = layer_norm_parts(hf["mlm_ln_in"], eps)
    close(c["mlm_head.ln.hook_scale"], scale, rtol=1e-5)
    close(c["mlm_head.ln.hook_normalized"], normalized, atol=1e-4)
    close(c["unembed.hook_in"], hf["unembed_in"])
    close(c["unembed.hook_out"], logits_of(out))


def test_without_a_mask_padding_is_attended_to(checkpoint, model):
    """TransformerLens's documented behaviour: the tensor path does not infer a mask."""
    tokens, types, mask = checkpoint.batch(seed=3)
    ones = np.ones_like(mask)
    out, _ = hf_run(checkpoint, tokens, types, ones)
    close(model(tokens, token_type_ids=types), out.prediction_logits)
    masked = model(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    assert np.abs(masked[0, :3] - out.prediction_logits.numpy()[0, :3]).max() > 1e-3


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "BertModel"])
def test_other_architectures_load(tmp_path, arch):
    ck = (
        make_checkpoint(tmp_path, arch=arch, add_pooling_layer=False)
        if arch == "BertModel"
        else make_checkpoint(tmp_path, arch=arch)
    )
    model = HookedEncoder.from_pretrained(tmp_path)
    tokens, types, mask = ck.batch(seed=4)
    out, _ = hf_run(ck, tokens, types, mask)
    close(model.encoder_output(tokens, types, mask), out.hidden_states[-1])
    if arch == "BertForMaskedLM":
        assert model.has_mlm_head
        close(model(tokens, token_type_ids=types, one_zero_attention_mask=mask), out.logits)
    else:
        assert not model.has_mlm_head
        assert model(tokens, return_type=None) is None
        _, cache = model.run_with_cache(tokens, return_type=None)
        assert "unembed.hook_out" not in cache and "blocks.1.hook_resid_post" in cache


def test_hf_model_argument_loads_the_same_weights(checkpoint):
    model = HookedEncoder.from_pretrained("in-memory", hf_model=checkpoint.hf)
    tokens, types, mask = checkpoint.batch(seed=5)
    out, _ = hf_run(checkpoint, tokens, types, mask)
    close(model(tokens, token_type_ids=types, one_zero_attention_mask=mask), out.prediction_logits)


# --- edits: a hook that changes an activation changes the output as the same edit in HF does


def hf_logits_with(ck, tokens, types, mask, module, pre_hook=None, hook=None):
    handle = (
        module.register_forward_pre_hook(pre_hook)
        if pre_hook
        else module.register_forward_hook(hook)
    )
    try:
        with torch.no_grad():
            return ck.hf(
                torch.tensor(tokens),
                token_type_ids=torch.tensor(types),
                attention_mask=torch.tensor(mask),
            ).prediction_logits.numpy()
    finally:
        handle.remove()


def test_zeroing_one_heads_z_matches_the_same_edit_in_hf(checkpoint, model):
    ck = checkpoint
    tokens, types, mask = ck.batch(seed=6)
    dh = ck.config.hidden_size // ck.config.num_attention_heads

    def ours(z, hook):
        z[:, :, 1] = 0
        return z

    def theirs(module, args):
        z = args[0].clone()
        z[..., dh : 2 * dh] = 0
        return (z,)

    edited = model.run_with_hooks(
        tokens,
        token_type_ids=types,
        one_zero_attention_mask=mask,
        fwd_hooks=[("blocks.0.attn.hook_z", ours)],
    )
    reference = hf_logits_with(
        ck, tokens, types, mask, ck.hf.bert.encoder.layer[0].attention.output.dense, pre_hook=theirs
    )
    close(edited, reference)
    assert (
        np.abs(edited - model(tokens, token_type_ids=types, one_zero_attention_mask=mask)).max()
        > 1e-3
    )


def test_scaling_the_pattern_and_v_match_the_same_edits_in_hf(checkpoint, model):
    ck = checkpoint
    tokens, types, mask = ck.batch(seed=7)
    layer = ck.hf.bert.encoder.layer[1].attention
    # z = pattern @ v is linear in the pattern, so scaling every pattern by 0.5 halves z.
    edited = model.run_with_hooks(
        tokens,
        token_type_ids=types,
        one_zero_attention_mask=mask,
        fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: x * 0.5)],
    )
    reference = hf_logits_with(
        ck, tokens, types, mask, layer.output.dense, pre_hook=lambda m, args: (args[0] * 0.5,)
    )
    close(edited, reference)

    dh = ck.config.hidden_size // ck.config.num_attention_heads

    def scale_head0(module, args, output):
        output = output.clone()
        output[..., :dh] *= 3
        return output

    def ours(v, hook):
        v[:, :, 0] *= 3  # in place, returning nothing

    edited = model.run_with_hooks(
        tokens,
        token_type_ids=types,
        one_zero_attention_mask=mask,
        fwd_hooks=[("blocks.1.attn.hook_v", ours)],
    )
    close(edited, hf_logits_with(ck, tokens, types, mask, layer.self.value, hook=scale_head0))


def test_torch_in_torch_out_and_torch_hooks(checkpoint, model):
    tokens, types, mask = checkpoint.batch(seed=8)
    seen = []

    def hook(x, hook):
        seen.append(type(x))
        return x * 2

    logits = model.run_with_hooks(
        torch.tensor(tokens),
        token_type_ids=torch.tensor(types),
        one_zero_attention_mask=torch.tensor(mask),
        fwd_hooks=[("blocks.0.hook_mlp_out", hook)],
    )
    assert isinstance(logits, torch.Tensor) and seen == [torch.Tensor]
    numpy_logits = model.run_with_hooks(
        tokens,
        token_type_ids=types,
        one_zero_attention_mask=mask,
        fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: x * 2)],
    )
    assert isinstance(numpy_logits, np.ndarray)
    np.testing.assert_array_equal(logits.numpy(), numpy_logits)
    _, cache = model.run_with_cache(torch.tensor(tokens))
    assert all(isinstance(v, torch.Tensor) for v in cache.values())


def test_output_format_torch_applies_to_numpy_input(checkpoint):
    model = HookedEncoder.from_pretrained(checkpoint.path, output_format="torch")
    out, cache = model.run_with_cache(np.array([[1, 2, 3]]), names_filter="hook_full_embed")
    assert isinstance(out, torch.Tensor) and isinstance(cache["hook_full_embed"], torch.Tensor)


def test_optional_hook_points_follow_the_config_flags(checkpoint, model):
    flagged = HookedEncoder.from_pretrained(
        checkpoint.path, use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True
    )
    cfg = flagged.cfg
    tokens, types, mask = checkpoint.batch(seed=9)
    logits, cache = flagged.run_with_cache(
        tokens, token_type_ids=types, one_zero_attention_mask=mask
    )
    close(logits, model(tokens, token_type_ids=types, one_zero_attention_mask=mask), atol=1e-5)
    assert cache["blocks.0.attn.hook_result"].shape == (*tokens.shape, cfg.n_heads, cfg.d_model)
    assert cache["blocks.0.hook_q_input"].shape == (*tokens.shape, cfg.n_heads, cfg.d_model)
    np.testing.assert_array_equal(cache["blocks.0.hook_mlp_in"], cache["blocks.0.hook_resid_mid"])
    # hook_result summed over heads, plus b_O, is the attention output.
    b_o = checkpoint.hf.bert.encoder.layer[0].attention.output.dense.bias.detach().numpy()
    close(
        cache["blocks.0.attn.hook_result"].sum(2) + b_o, cache["blocks.0.hook_attn_out"], atol=1e-5
    )
    names = list(cache.keys())
    assert names.index("blocks.0.hook_q_input") == names.index("blocks.0.hook_resid_pre") + 1
    assert names.index("blocks.0.attn.hook_result") == names.index("blocks.0.attn.hook_z") + 1
    assert names.index("blocks.0.hook_mlp_in") == names.index("blocks.0.hook_resid_mid") + 1
