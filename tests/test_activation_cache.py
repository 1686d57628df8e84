"""ActivationCache analysis helpers, each checked against a hand computation from the cached
arrays and the model's weights, on a padded batch of the tiny post-LN checkpoint."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch

from hooked_encoder import ActivationCache, HookedEncoder
from hooked_encoder.activation_cache import NoMLMHeadError

TOL = {"atol": 2e-5, "rtol": 1e-5}
L, H, DH, D, M, V = 2, 2, 8, 16, 40, 50


@pytest.fixture(scope="module")
def batch(checkpoint):
    return checkpoint.batch()


@pytest.fixture(scope="module")
def weights(model):
    return {name: np.asarray(value) for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def run(model, batch):
    """The logits and the raw (never mutated) cache dict of one run."""
    tokens, types_, mask = batch
    logits, raw = model.run_with_cache(
        tokens, token_type_ids=types_, one_zero_attention_mask=mask, return_cache_object=False
    )
    return logits, raw


@pytest.fixture
def cache(model, run):
    """A fresh cache over copies of the run's arrays (some tests add entries)."""
    return ActivationCache({k: v.copy() for k, v in run[1].items()}, model)


@pytest.fixture
def raw(run):
    return run[1]


def layer_norm(x):
    """Centre and divide by the LayerNorm scale (eps as the checkpoint's, 1e-12)."""
    x = x.astype(np.float64)
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-12)


def gelu(x):
    return torch.nn.functional.gelu(torch.from_numpy(np.asarray(x, np.float32))).numpy()


# ---------------------------------------------------------------- batch, device, stacking


def test_apply_slice_to_batch_dim(cache, raw):
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and cache.has_batch_dim
    assert list(one.keys()) == list(raw)
    for name, value in raw.items():
        np.testing.assert_array_equal(one[name], value[1])
        assert cache[name].shape == value.shape  # the original is untouched
    last = cache.apply_slice_to_batch_dim(-1)
    np.testing.assert_array_equal(last["resid_pre", 0], raw["blocks.0.hook_resid_pre"][2])

    for batch_slice, rows in [(slice(0, 2), [0, 1]), ((1, 3), [1, 2]), ([2, 0], [2, 0])]:
        part = cache.apply_slice_to_batch_dim(batch_slice)
        assert part.has_batch_dim
        np.testing.assert_array_equal(part["pattern", 1], raw["blocks.1.attn.hook_pattern"][rows])

    with pytest.raises(IndexError, match="batch_slice 3 is out of range for a dimension of size 3"):
        cache.apply_slice_to_batch_dim(3)
    with pytest.raises(TypeError, match="batch_slice must be None, an int"):
        cache.apply_slice_to_batch_dim(0.5)
    with pytest.raises(TypeError, match="must be 1-D"):
        cache.apply_slice_to_batch_dim([[0, 1]])
    with pytest.raises(TypeError, match="not a bool"):
        cache.apply_slice_to_batch_dim(True)
    with pytest.raises(ValueError, match="no batch dimension"):
        one.apply_slice_to_batch_dim(0)


def test_to_device(cache):
    assert cache.to("cpu") is cache
    assert cache.to(torch.device("cpu")) is cache
    with pytest.raises(ValueError, match="cannot move them to 'cuda'"):
        cache.to("cuda")


def test_stack_activation(cache, raw):
    patterns = cache.stack_activation("pattern")
    assert patterns.shape == (L, 3, H, 7, 7)
    for layer in range(L):
        np.testing.assert_array_equal(patterns[layer], raw[f"blocks.{layer}.attn.hook_pattern"])
    first = cache.stack_activation("resid_post", layer=1)
    assert first.shape == (1, 3, 7, D)
    np.testing.assert_array_equal(first[0], raw["blocks.0.hook_resid_post"])
    scales = cache.stack_activation("scale", sublayer_type="ln2")
    np.testing.assert_array_equal(scales[1], raw["blocks.1.ln2.hook_scale"])
    with pytest.raises(ValueError, match="layer=0 stacks no blocks"):
        cache.stack_activation("pattern", layer=0)
    with pytest.raises(ValueError, match=r"layer must be in 0\.\.2"):
        cache.stack_activation("pattern", layer=3)


# ---------------------------------------------------------------- heads and neurons


def test_compute_head_results(cache, raw, weights):
    assert "blocks.0.attn.hook_result" not in cache
    cache.compute_head_results()
    keys = list(cache.keys())
    for layer in range(L):
        z = raw[f"blocks.{layer}.attn.hook_z"]
        w_o = weights[f"blocks.{layer}.attn.W_O"]
        expected = np.einsum("bphd,hdm->bphm", z.astype(np.float64), w_o)
        result = cache["result", layer]
        assert result.shape == (3, 7, H, D) and result.dtype == np.float32
        np.testing.assert_allclose(result, expected, **TOL)
        # Heads plus b_O are the attention output.
        np.testing.assert_allclose(
            result.sum(-2) + weights[f"blocks.{layer}.attn.b_O"],
            raw[f"blocks.{layer}.hook_attn_out"],
            **TOL,
        )
        # Stored where use_attn_result fires it: right after hook_z.
        z_at = keys.index(f"blocks.{layer}.attn.hook_z")
        assert keys[z_at + 1] == f"blocks.{layer}.attn.hook_result"
    assert len(keys) == len(raw) + L
    before = cache["result", 0]
    cache.compute_head_results()  # idempotent
    assert cache["result", 0] is before and len(cache) == len(raw) + L


def test_stack_head_results(cache, raw, weights, model):
    stack, labels = cache.stack_head_results(return_labels=True)
    assert stack.shape == (L * H, 3, 7, D)
    assert labels == ["L0H0", "L0H1", "L1H0", "L1H1"] == model.all_head_labels()
    for i, label in enumerate(labels):
        layer, head = int(label[1]), int(label[3])
        expected = np.einsum(
            "bpd,dm->bpm",
            raw[f"blocks.{layer}.attn.hook_z"][:, :, head].astype(np.float64),
            weights[f"blocks.{layer}.attn.W_O"][head],
        )
        np.testing.assert_allclose(stack[i], expected, **TOL)

    first, first_labels = cache.stack_head_results(layer=1, return_labels=True)
    assert first_labels == ["L0H0", "L0H1"]
    np.testing.assert_array_equal(first, stack[:2])

    at_pos = cache.stack_head_results(pos_slice=4)
    assert at_pos.shape == (L * H, 3, D)
    np.testing.assert_array_equal(at_pos, stack[:, :, 4])

    # The remainder makes the stack sum to the residual entering `layer`.
    with_rest, rest_labels = cache.stack_head_results(incl_remainder=True, return_labels=True)
    assert rest_labels == [*labels, "remainder"]
    final = raw["blocks.1.hook_normalized_resid_post"]
    np.testing.assert_allclose(with_rest.sum(0), final, **TOL)
    np.testing.assert_array_equal(with_rest[:-1], stack)
    np.testing.assert_allclose(
        cache.stack_head_results(layer=1, incl_remainder=True).sum(0),
        raw["blocks.1.hook_resid_pre"],
        **TOL,
    )
    empty, empty_labels = cache.stack_head_results(layer=0, return_labels=True)
    assert empty.shape == (0, 3, 7, D) and empty_labels == []
    only_rest = cache.stack_head_results(layer=0, incl_remainder=True)
    np.testing.assert_array_equal(only_rest[0], raw["blocks.0.hook_resid_pre"])

    # apply_ln is apply_ln_to_stack at the same layer.
    np.testing.assert_array_equal(
        cache.stack_head_results(layer=1, apply_ln=True),
        cache.apply_ln_to_stack(first, layer=1),
    )


def test_neuron_results(cache, raw, weights):
    for layer in range(L):
        post = raw[f"blocks.{layer}.mlp.hook_post"]
        w_out = weights[f"blocks.{layer}.mlp.W_out"]
        results = cache.get_neuron_results(layer)
        assert results.shape == (3, 7, M, D)
        np.testing.assert_allclose(results, post[..., :, None] * w_out, **TOL)
        np.testing.assert_allclose(
            results.sum(-2) + weights[f"blocks.{layer}.mlp.b_out"],
            raw[f"blocks.{layer}.hook_mlp_out"],
            **TOL,
        )
    part = cache.get_neuron_results(1, neuron_slice=slice(3, 7), pos_slice=2)
    assert part.shape == (3, 4, D)
    expected = raw["blocks.1.mlp.hook_post"][:, 2, 3:7, None] * weights["blocks.1.mlp.W_out"][3:7]
    np.testing.assert_allclose(part, expected, **TOL)
    np.testing.assert_array_equal(cache.get_neuron_results(-1), cache.get_neuron_results(1))
    with pytest.raises(ValueError, match=r"layer must be in -2\.\.1"):
        cache.get_neuron_results(2)
    with pytest.raises(IndexError, match="neuron_slice 40 is out of range"):
        cache.get_neuron_results(0, neuron_slice=40)


def test_stack_neuron_results(cache, raw, weights):
    stack, labels = cache.stack_neuron_results(None, return_labels=True)
    assert stack.shape == (L * M, 3, 7, D)
    assert labels[:2] == ["L0N0", "L0N1"] and labels[M] == "L1N0" and len(labels) == L * M
    for i in (0, 17, M + 5, 2 * M - 1):
        layer, neuron = divmod(i, M)
        post = raw[f"blocks.{layer}.mlp.hook_post"][..., neuron, None]
        np.testing.assert_allclose(
            stack[i], post * weights[f"blocks.{layer}.mlp.W_out"][neuron], **TOL
        )

    # TransformerLens semantics: neurons of the layers before `layer`.
    first, first_labels = cache.stack_neuron_results(1, return_labels=True)
    assert first.shape == (M, 3, 7, D) and first_labels[-1] == f"L0N{M - 1}"
    np.testing.assert_array_equal(first, stack[:M])

    one, one_labels = cache.stack_neuron_results(-1, neuron_slice=5, return_labels=True)
    assert one.shape == (L, 3, 7, D) and one_labels == ["L0N5", "L1N5"]
    np.testing.assert_array_equal(one, stack[[5, M + 5]])

    pos, _ = cache.stack_neuron_results(2, pos_slice=[0, 6], return_labels=True)
    np.testing.assert_array_equal(pos, stack[:, :, [0, 6]])

    rest, rest_labels = cache.stack_neuron_results(
        None, neuron_slice=(0, 10), incl_remainder=True, return_labels=True
    )
    assert rest_labels[-1] == "remainder" and rest.shape == (2 * 10 + 1, 3, 7, D)
    np.testing.assert_allclose(rest.sum(0), raw["blocks.1.hook_normalized_resid_post"], **TOL)


# ---------------------------------------------------------------- the residual stream


def test_accumulated_resid_ends_with_the_real_final_residual(cache, raw, model, checkpoint, batch):
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"] and stack.shape == (3, 3, 7, D)
    np.testing.assert_array_equal(stack[0], raw["blocks.0.hook_resid_pre"])
    np.testing.assert_array_equal(stack[1], raw["blocks.1.hook_resid_pre"])
    tokens, types_, mask = batch
    encoder_output = model.encoder_output(tokens, types_, mask)
    np.testing.assert_allclose(stack[2], encoder_output, **TOL)
    with torch.no_grad():
        hf = checkpoint.hf.bert(
            torch.tensor(tokens),
            token_type_ids=torch.tensor(types_),
            attention_mask=torch.tensor(mask),
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(stack[2], hf, atol=4e-5, rtol=1.3e-6)
    # Not TransformerLens's final_post, the last hook_resid_post (before ln2).
    assert not np.allclose(stack[2], raw["blocks.1.hook_resid_post"], atol=1e-2)


def test_accumulated_resid_labels_and_slices(cache, raw):
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    np.testing.assert_array_equal(stack[1], raw["blocks.0.hook_resid_mid"])
    np.testing.assert_array_equal(stack[3], raw["blocks.1.hook_resid_mid"])

    _, labels = cache.accumulated_resid(layer=1, return_labels=True)
    assert labels == ["0_pre", "1_pre"]
    _, labels = cache.accumulated_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid"]
    _, labels = cache.accumulated_resid(layer=1, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre"]
    _, labels = cache.accumulated_resid(layer=0, return_labels=True)
    assert labels == ["0_pre"]

    last = cache.accumulated_resid(pos_slice=-1)
    assert last.shape == (3, 3, D)
    np.testing.assert_array_equal(last, cache.accumulated_resid()[:, :, -1])

    with pytest.raises(ValueError, match="no MLP after the final residual"):
        cache.accumulated_resid(mlp_input=True)
    with pytest.raises(ValueError, match=r"layer must be in 0\.\.2"):
        cache.accumulated_resid(layer=3)
    with pytest.raises(IndexError, match="pos_slice 7 is out of range"):
        cache.accumulated_resid(pos_slice=7)
    with pytest.raises(TypeError, match="pos_slice must be None"):
        cache.accumulated_resid(pos_slice="last")


def test_accumulated_resid_apply_ln(cache, raw):
    plain = cache.accumulated_resid(incl_mid=True)
    normed, labels = cache.accumulated_resid(incl_mid=True, apply_ln=True, return_labels=True)
    for i, label in enumerate(labels):
        if label.endswith("_mid"):
            layer = int(label[0])
            # ln1 reads resid_mid: exactly its hook_normalized, and its own formula.
            np.testing.assert_allclose(normed[i], raw[f"blocks.{layer}.ln1.hook_normalized"], **TOL)
            mid = raw[f"blocks.{layer}.hook_resid_mid"]
            expected = (mid - mid.mean(-1, keepdims=True)) / raw[f"blocks.{layer}.ln1.hook_scale"]
            np.testing.assert_allclose(normed[i], expected, **TOL)
        else:  # pre and final_post are read by no LayerNorm: unchanged
            np.testing.assert_array_equal(normed[i], plain[i])
    sliced = cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True, pos_slice=slice(1, 4))
    np.testing.assert_allclose(sliced[2], raw["blocks.1.ln1.hook_normalized"][:, 1:4], **TOL)


def test_decompose_resid_labels_and_values(cache, raw):
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == [
        "embed",
        "pos_embed",
        "token_type_embed",
        "0_attn_out",
        "0_mlp_out",
        "1_attn_out",
        "1_mlp_out",
    ]
    sources = [
        "embed.hook_embed",
        "embed.hook_pos_embed",
        "embed.hook_token_type_embed",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_mlp_out",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
    ]
    for i, source in enumerate(sources):
        np.testing.assert_array_equal(stack[i], raw[source])
    # As documented: under post-LN the components do not sum to the final residual.
    assert not np.allclose(stack.sum(0), raw["blocks.1.hook_normalized_resid_post"], atol=0.1)

    _, labels = cache.decompose_resid(mode="attn", incl_embeds=False, return_labels=True)
    assert labels == ["0_attn_out", "1_attn_out"]
    _, labels = cache.decompose_resid(mode="mlp", return_labels=True)
    assert labels == ["embed", "pos_embed", "token_type_embed", "0_mlp_out", "1_mlp_out"]
    _, labels = cache.decompose_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels[-3:] == ["0_attn_out", "0_mlp_out", "1_attn_out"]
    empty = cache.decompose_resid(layer=0, incl_embeds=False)
    assert empty.shape == (0, 3, 7, D)
    at = cache.decompose_resid(pos_slice=(2, 5))
    np.testing.assert_array_equal(at, stack[:, :, 2:5])
    with pytest.raises(ValueError, match="mode must be"):
        cache.decompose_resid(mode="heads")
    with pytest.raises(ValueError, match="no MLP after the final residual"):
        cache.decompose_resid(mlp_input=True)


def test_decompose_resid_embeddings_sum_to_the_embedding_layer_norm_input(cache, raw, weights):
    stack = cache.decompose_resid(layer=0)
    total = stack.sum(0)
    centred = total - total.mean(-1, keepdims=True)
    np.testing.assert_allclose(
        centred / raw["embed.ln.hook_scale"], raw["embed.ln.hook_normalized"], **TOL
    )
    np.testing.assert_allclose(
        raw["embed.ln.hook_scale"], np.sqrt((centred**2).mean(-1))[..., None], **TOL
    )
    np.testing.assert_allclose(
        layer_norm(total) * weights["embed.ln.w"] + weights["embed.ln.b"],
        raw["hook_full_embed"],
        **TOL,
    )
    # apply_ln at layer 0 uses embed.ln: the normalised terms sum to its hook_normalized.
    normed = cache.decompose_resid(layer=0, apply_ln=True)
    np.testing.assert_allclose(normed.sum(0), raw["embed.ln.hook_normalized"], **TOL)
    # apply_ln elsewhere is apply_ln_to_stack at that layer.
    np.testing.assert_array_equal(
        cache.decompose_resid(layer=1, mlp_input=True, apply_ln=True),
        cache.apply_ln_to_stack(cache.decompose_resid(layer=1, mlp_input=True), 1, mlp_input=True),
    )


def test_post_ln_local_identities(raw, weights):
    """The exact identities decompose_resid's docstring states."""
    for layer in range(L):
        b = f"blocks.{layer}"
        np.testing.assert_allclose(
            raw[f"{b}.hook_resid_pre"] + raw[f"{b}.hook_attn_out"],
            raw[f"{b}.hook_resid_mid"],
            **TOL,
        )
        ln1_out = raw[f"{b}.ln1.hook_normalized"] * weights[f"{b}.ln1.w"] + weights[f"{b}.ln1.b"]
        np.testing.assert_allclose(
            ln1_out + raw[f"{b}.hook_mlp_out"], raw[f"{b}.hook_resid_post"], **TOL
        )


def test_apply_ln_to_stack_final_uses_the_mlm_head_layer_norm(cache, raw, weights):
    final = raw["blocks.1.hook_normalized_resid_post"]
    transform = gelu(final @ weights["mlm_head.W"] + weights["mlm_head.b"])
    normed = cache.apply_ln_to_stack(transform[None])[0]
    np.testing.assert_allclose(normed, raw["mlm_head.ln.hook_normalized"], **TOL)
    np.testing.assert_allclose(
        normed * weights["mlm_head.ln.w"] + weights["mlm_head.ln.b"], raw["unembed.hook_in"], **TOL
    )
    assert cache.apply_ln_to_stack(transform[None], layer=-1).tolist() == normed[None].tolist()
    # On any stack: centre, divide by the cached mlm_head.ln scale.
    stack = np.random.default_rng(1).normal(size=(4, 3, 7, D)).astype(np.float32)
    expected = (stack - stack.mean(-1, keepdims=True)) / raw["mlm_head.ln.hook_scale"]
    np.testing.assert_allclose(cache.apply_ln_to_stack(stack, layer=L), expected, **TOL)
    with pytest.raises(ValueError, match="no MLP after the final residual"):
        cache.apply_ln_to_stack(stack, mlp_input=True)


def test_apply_ln_to_stack_block_layer_norms(cache, raw, weights):
    for layer in range(L):
        b = f"blocks.{layer}"
        # mlp_input=True: ln1 of the block, which reads resid_pre + attn_out.
        parts = np.stack([raw[f"{b}.hook_resid_pre"], raw[f"{b}.hook_attn_out"]])
        normed = cache.apply_ln_to_stack(parts, layer, mlp_input=True)
        np.testing.assert_allclose(normed.sum(0), raw[f"{b}.ln1.hook_normalized"], **TOL)
        if layer + 1 == L:
            continue  # layer=n_layers is the MLM head's LayerNorm (tested above), not ln2
        # mlp_input=False at layer+1: ln2 of this block, whose output is block layer+1's input.
        ln1_out = raw[f"{b}.ln1.hook_normalized"] * weights[f"{b}.ln1.w"] + weights[f"{b}.ln1.b"]
        parts = np.stack([ln1_out, raw[f"{b}.hook_mlp_out"]])
        normed = cache.apply_ln_to_stack(parts, layer + 1)
        np.testing.assert_allclose(normed.sum(0), raw[f"{b}.ln2.hook_normalized"], **TOL)
        np.testing.assert_allclose(
            normed.sum(0) * weights[f"{b}.ln2.w"] + weights[f"{b}.ln2.b"],
            raw[f"{b}.hook_normalized_resid_post"],
            **TOL,
        )
    # layer=0: embed.ln.
    parts = np.stack(
        [
            raw[k]
            for k in ("embed.hook_embed", "embed.hook_pos_embed", "embed.hook_token_type_embed")
        ]
    )
    np.testing.assert_allclose(
        cache.apply_ln_to_stack(parts, 0).sum(0), raw["embed.ln.hook_normalized"], **TOL
    )


def test_apply_ln_to_stack_slices(cache, raw):
    stack = np.random.default_rng(2).normal(size=(5, 3, 7, D)).astype(np.float32)
    full = cache.apply_ln_to_stack(stack, 1, mlp_input=True)
    np.testing.assert_allclose(
        full,
        (stack - stack.mean(-1, keepdims=True)) / raw["blocks.1.ln1.hook_scale"],
        **TOL,
    )
    at_pos = cache.apply_ln_to_stack(stack[:, :, 3], 1, mlp_input=True, pos_slice=3)
    np.testing.assert_array_equal(at_pos, full[:, :, 3])
    # batch_slice is applied to the stack (axis 1) and to the scale.
    row = cache.apply_ln_to_stack(stack, 1, mlp_input=True, batch_slice=2)
    np.testing.assert_array_equal(row, full[:, 2])
    rows = cache.apply_ln_to_stack(
        stack[:, [0, 2]], 1, True, batch_slice=[0, 2], has_batch_dim=False
    )
    np.testing.assert_array_equal(rows, full[:, [0, 2]])
    with pytest.raises(ValueError, match="does not fit a stack"):
        cache.apply_ln_to_stack(stack[:, :, :4], 1, mlp_input=True)
    with pytest.raises(ValueError, match="does not fit a stack"):
        cache.apply_ln_to_stack(stack[:, 0], 1, mlp_input=True)
    with pytest.raises(IndexError, match="batch_slice 5 is out of range"):
        cache.apply_ln_to_stack(stack, 1, batch_slice=5)
    with pytest.raises(ValueError, match=r"layer must be in 0\.\.2"):
        cache.apply_ln_to_stack(stack, 4)


# ---------------------------------------------------------------- logit attributions


def test_logit_attrs_in_the_unembedding_input_space(cache, raw, weights, run, batch):
    logits = run[0]
    tokens = batch[0]
    w_u, b_u = weights["unembed.W_U"], weights["unembed.b_U"]
    attrs = cache.logit_attrs(raw["unembed.hook_in"][None], tokens)
    assert attrs.shape == (1, 3, 7)
    gathered = np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(attrs[0] + b_u[tokens], gathered, atol=1e-4, rtol=1e-5)

    stack = cache.decompose_resid()
    attrs = cache.logit_attrs(stack, tokens)
    expected = np.einsum("cbpd,dbp->cbp", stack.astype(np.float64), w_u[:, tokens])
    np.testing.assert_allclose(attrs, expected, **TOL)

    # One token for everything, one per row, and a logit difference.
    np.testing.assert_allclose(cache.logit_attrs(stack, 7), stack @ w_u[:, 7], **TOL)
    per_row = np.array([3, 9, 11])
    np.testing.assert_allclose(
        cache.logit_attrs(stack, per_row),
        np.einsum("cbpd,db->cbp", stack, w_u[:, per_row]),
        **TOL,
    )
    wrong = (tokens + 1) % V
    np.testing.assert_allclose(
        cache.logit_attrs(stack, tokens, incorrect_tokens=wrong),
        np.einsum("cbpd,dbp->cbp", stack, w_u[:, tokens] - w_u[:, wrong]),
        **TOL,
    )
    # batch_slice picks rows of the stack; tokens must already match.
    np.testing.assert_allclose(
        cache.logit_attrs(stack, tokens[1], batch_slice=1),
        np.einsum("cpd,dp->cp", stack[:, 1], w_u[:, tokens[1]]),
        **TOL,
    )
    torch_attrs = cache.logit_attrs(torch.from_numpy(stack), torch.from_numpy(tokens))
    assert isinstance(torch_attrs, torch.Tensor)
    np.testing.assert_allclose(torch_attrs.numpy(), expected, **TOL)

    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, tokens, incorrect_tokens=per_row)
    with pytest.raises(ValueError, match="do not fit a stack"):
        cache.logit_attrs(stack, tokens[:, :4])
    with pytest.raises(ValueError, match=r"token ids must be in 0\.\.49"):
        cache.logit_attrs(stack, V)
    with pytest.raises(TypeError, match="integer array"):
        cache.logit_attrs(stack, np.array([1.5]))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        cache.logit_attrs(stack, "hello")


def test_encoder_without_mlm_head(tmp_path, batch):
    from conftest import make_checkpoint

    make_checkpoint(tmp_path, arch="BertModel", add_pooling_layer=False)
    encoder = HookedEncoder.from_pretrained(tmp_path)
    tokens, types_, mask = batch
    _, cache = encoder.run_with_cache(
        tokens, token_type_ids=types_, one_zero_attention_mask=mask, return_type=None
    )
    stack = cache.decompose_resid()
    with pytest.raises(NoMLMHeadError, match="logit_attrs needs the MLM head") as info:
        cache.logit_attrs(stack, tokens)
    assert isinstance(info.value, AttributeError)
    with pytest.raises(NoMLMHeadError, match="no MLM head|has none"):
        cache.apply_ln_to_stack(stack)
    # The residual-stream helpers do not need the head.
    _, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]


# ---------------------------------------------------------------- conversion and files


def test_to_torch_and_back(cache, raw):
    as_torch = cache.to_torch()
    assert list(as_torch.keys()) == list(raw)
    assert all(isinstance(v, torch.Tensor) for v in as_torch.values())
    assert all(isinstance(v, np.ndarray) for v in cache.values())
    np.testing.assert_array_equal(as_torch["pattern", 0].numpy(), raw["blocks.0.attn.hook_pattern"])
    # The helpers return the cache's type, with the same values.
    stack = as_torch.stack_head_results()
    assert isinstance(stack, torch.Tensor)
    np.testing.assert_array_equal(stack.numpy(), cache.stack_head_results())
    assert isinstance(as_torch["result", 1], torch.Tensor)
    normed = as_torch.accumulated_resid(incl_mid=True, apply_ln=True)
    np.testing.assert_array_equal(
        normed.numpy(), cache.accumulated_resid(incl_mid=True, apply_ln=True)
    )
    back = as_torch.to_numpy()
    assert all(isinstance(v, np.ndarray) for v in back.values())
    np.testing.assert_array_equal(back["result", 1], cache["result", 1])


def test_save_and_load_round_trip(cache, model, tmp_path):
    cache.compute_head_results()  # entries added after the run keep their place
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    loaded = ActivationCache.load(path, model)
    assert list(loaded.keys()) == list(cache.keys())
    assert loaded.has_batch_dim and loaded.model is model
    for name, value in cache.items():
        assert isinstance(loaded[name], np.ndarray)
        np.testing.assert_array_equal(loaded[name], value)
    assert os.listdir(tmp_path) == ["cache.safetensors"]

    row = cache.apply_slice_to_batch_dim(0).to_torch()
    row.save(tmp_path / "row.safetensors")
    loaded = ActivationCache.load(str(tmp_path / "row.safetensors"), model)
    assert not loaded.has_batch_dim
    assert isinstance(loaded["resid_pre", 0], torch.Tensor)
    assert list(loaded.keys()) == list(row.keys())
    np.testing.assert_array_equal(loaded["resid_pre", 0].numpy(), cache["resid_pre", 0][0])


def test_interrupted_save_leaves_no_file(cache, tmp_path, monkeypatch):
    import safetensors.numpy

    real_save = safetensors.numpy.save_file

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    path = tmp_path / "cache.safetensors"
    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.save(path)
    assert os.listdir(tmp_path) == []

    # An existing file survives a failed overwrite untouched.
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    cache.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.apply_slice_to_batch_dim(0).save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["cache.safetensors"]


def test_load_refuses_other_files_and_models(cache, model, tmp_path):
    from safetensors.numpy import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(ValueError, match="is not a saved ActivationCache"):
        ActivationCache.load(other, model)
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    bigger = types.SimpleNamespace(
        cfg=types.SimpleNamespace(n_layers=3, n_heads=H, d_head=DH, d_model=D)
    )
    with pytest.raises(ValueError, match="comes from a model of shape"):
        ActivationCache.load(path, bigger)


def test_generic_names_resolve_to_encoder_hooks(cache, raw):
    assert cache["hook_embed"] is cache["embed.hook_embed"]
    assert cache["ln_final.hook_scale"] is cache["mlm_head.ln.hook_scale"]
    assert cache["hook_token_type_embed"] is cache["embed.hook_token_type_embed"]
