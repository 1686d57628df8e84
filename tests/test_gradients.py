"""Gradients from the Rust backward pass against torch autograd on the Hugging Face model with
the same weights: every hook point with a Hugging Face counterpart, backward hooks, forward
edits inside the differentiated function, and attribution patching."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import retaining
from hooked_encoder import HookedEncoder, metrics

torch = pytest.importorskip("torch")

# The tolerance for gradients against autograd.
ATOL, RTOL = 1e-5, 1e-4


def close(ours, theirs, what):
    ours = ours.detach().numpy() if torch.is_tensor(ours) else np.asarray(ours)
    theirs = theirs.detach().numpy() if torch.is_tensor(theirs) else np.asarray(theirs)
    assert ours.shape == theirs.shape, what
    err = np.abs(ours - theirs) - RTOL * np.abs(theirs)
    assert err.max() <= ATOL, f"{what}: max abs error {np.abs(ours - theirs).max():.3g}"
    assert np.abs(theirs).max() > 1e-6, f"{what}: the reference gradient is zero"


def hf_gradients(ck, tokens, types, mask, metric, edit_z=None, grad_z=None):
    """Autograd gradients at every Hugging Face tensor that is one of our hook points, keyed by
    our names. ``edit_z(layer, z)`` edits z (the input of the attention output projection) in
    the forward pass; ``grad_z(layer, grad)`` replaces z's gradient in the backward pass."""
    hf, cfg = ck.hf, ck.config
    heads = cfg.num_attention_heads
    tensors: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, shape_heads=False):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            out.retain_grad()
            tensors[name] = (out, shape_heads)

        return hook

    handles.append(hf.bert.embeddings.register_forward_hook(keep("hook_full_embed")))
    for layer, block in enumerate(hf.bert.encoder.layer):
        p = f"blocks.{layer}."
        attn = block.attention
        for part, module in (("q", attn.self.query), ("k", attn.self.key), ("v", attn.self.value)):
            handles.append(module.register_forward_hook(keep(f"{p}attn.hook_{part}", True)))

        def z_pre_hook(module, args, layer=layer, p=p):
            z = args[0]
            if edit_z is not None:
                z = edit_z(layer, z.clone())
            if grad_z is not None:
                z.register_hook(lambda g: grad_z(layer, g))
            z.retain_grad()
            tensors[f"{p}attn.hook_z"] = (z, True)
            return (z,)

        handles.append(attn.output.dense.register_forward_pre_hook(z_pre_hook))
        handles.append(attn.output.dense.register_forward_hook(keep(f"{p}hook_attn_out")))
        handles.append(block.intermediate.dense.register_forward_hook(keep(f"{p}mlp.hook_pre")))
        handles.append(block.intermediate.register_forward_hook(keep(f"{p}mlp.hook_post")))
        handles.append(block.output.dense.register_forward_hook(keep(f"{p}hook_mlp_out")))
        handles.append(block.register_forward_hook(keep(f"{p}hook_normalized_resid_post")))
    handles.append(hf.cls.predictions.transform.register_forward_hook(keep("unembed.hook_in")))
    try:
        out = hf(
            torch.tensor(tokens),
            token_type_ids=torch.tensor(types),
            attention_mask=torch.tensor(mask),
            output_attentions=True,
        )
        logits = out.prediction_logits
        logits.retain_grad()
        for layer, pattern in enumerate(out.attentions):
            pattern.retain_grad()
            tensors[f"blocks.{layer}.attn.hook_pattern"] = (pattern, False)
        metric(logits).backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = {"unembed.hook_out": logits.grad}
    for name, (tensor, split_heads) in tensors.items():
        grad = tensor.grad
        if split_heads:
            grad = grad.reshape(*grad.shape[:2], heads, -1)
        grads[name] = grad
    # Our hook_resid_pre of block l + 1 is block l's output, and block 0's is the embeddings.
    for layer in range(cfg.num_hidden_layers):
        source = (
            "hook_full_embed" if layer == 0 else f"blocks.{layer - 1}.hook_normalized_resid_post"
        )
        grads[f"blocks.{layer}.hook_resid_pre"] = grads[source]
    return grads


def mask_logit_diff(ck, tokens):
    """A logit difference at position 1 of every row (the [MASK] position of the test)."""
    rng = np.random.default_rng(1)
    correct, incorrect = rng.integers(0, ck.config.vocab_size, size=(2, tokens.shape[0]))
    rows = torch.arange(tokens.shape[0])

    def metric(logits):
        return (logits[rows, 1, correct] - logits[rows, 1, incorrect]).sum()

    return metric, (1, correct, incorrect)


def random_projection(shape, seed=2):
    weights = torch.tensor(np.random.default_rng(seed).standard_normal(shape), dtype=torch.float32)
    return lambda logits: (logits * weights).sum()


@pytest.mark.parametrize("which", ["logit_diff", "projection"])
def test_gradients_match_torch_autograd_on_hugging_face(any_checkpoint, which):
    ck = any_checkpoint
    model = HookedEncoder.from_pretrained(ck.path)
    tokens, types, mask = ck.batch(seed=3)  # padding rows of three lengths, two token types
    if which == "logit_diff":
        metric, _ = mask_logit_diff(ck, tokens)
    else:
        metric = random_projection((*tokens.shape, ck.config.vocab_size))
    theirs = hf_gradients(ck, tokens, types, mask, metric)
    ours = model.grad(
        torch.tensor(tokens),
        metric=metric,
        token_type_ids=types,
        one_zero_attention_mask=mask,
    )
    assert list(ours) == list(model.hook_dict)[: len(ours)]  # firing order, every point
    assert set(theirs) <= set(ours)
    for name, grad in theirs.items():
        close(ours[name], grad, name)


def test_numpy_grad_output_equals_the_torch_metric(checkpoint, model):
    tokens, types, mask = checkpoint.batch(seed=4)
    metric, (position, correct, incorrect) = mask_logit_diff(checkpoint, tokens)
    logits = model(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    value, grad_output = metrics.logit_diff(logits, position, correct, incorrect)
    assert value == pytest.approx(float(metric(torch.tensor(logits))), rel=1e-5)
    numpy_grads = model.grad(
        tokens, grad_output=grad_output, token_type_ids=types, one_zero_attention_mask=mask
    )
    torch_grads = model.grad(
        torch.tensor(tokens), metric=metric, token_type_ids=types, one_zero_attention_mask=mask
    )
    assert isinstance(numpy_grads["hook_full_embed"], np.ndarray)
    for name, grad in numpy_grads.items():
        np.testing.assert_array_equal(grad, torch_grads[name].numpy(), err_msg=name)


def test_run_with_cache_incl_bwd_holds_gradients_under_tl_names(checkpoint, model):
    tokens, types, mask = checkpoint.batch(seed=5)
    metric, _ = mask_logit_diff(checkpoint, tokens)
    tokens_t = torch.tensor(tokens)
    logits, cache = model.run_with_cache(
        tokens_t,
        token_type_ids=types,
        one_zero_attention_mask=mask,
        incl_bwd=True,
        metric=metric,
        names_filter=lambda name: "attn" in name,
    )
    grads = model.grad(tokens_t, metric=metric, token_type_ids=types, one_zero_attention_mask=mask)
    assert "blocks.0.attn.hook_z" in cache and "blocks.0.attn.hook_z_grad" in cache
    assert "blocks.0.hook_resid_pre_grad" not in cache
    torch.testing.assert_close(cache["z_grad", 1], grads["blocks.1.attn.hook_z"], rtol=0, atol=0)
    torch.testing.assert_close(
        cache["blocks.0.attn.hook_pattern_grad"], grads["blocks.0.attn.hook_pattern"]
    )
    torch.testing.assert_close(
        logits, model(tokens_t, token_type_ids=types, one_zero_attention_mask=mask)
    )


def test_a_backward_hook_zeroing_one_heads_z_gradient_matches_torch(checkpoint, model):
    ck = checkpoint
    tokens, types, mask = ck.batch(seed=6)
    metric = random_projection((*tokens.shape, ck.config.vocab_size), seed=6)
    dh = ck.config.hidden_size // ck.config.num_attention_heads

    def ours(grad, hook):
        grad = grad.clone()
        grad[:, :, 1] = 0
        return grad

    def theirs(layer, grad):
        if layer != 1:
            return grad
        grad = grad.clone()
        grad[..., dh : 2 * dh] = 0
        return grad

    reference = hf_gradients(ck, tokens, types, mask, metric, grad_z=theirs)
    with model.hooks(bwd_hooks=[("blocks.1.attn.hook_z", ours)]):
        edited = model.grad(
            torch.tensor(tokens), metric=metric, token_type_ids=types, one_zero_attention_mask=mask
        )
    plain = model.grad(
        torch.tensor(tokens), metric=metric, token_type_ids=types, one_zero_attention_mask=mask
    )
    for name in (
        "blocks.1.attn.hook_v",
        "blocks.1.attn.hook_q",
        "blocks.0.hook_mlp_out",
        "hook_full_embed",
    ):
        close(edited[name], reference[name], name)
    # The gradient arriving at hook_z is the unhooked one (TransformerLens caches grad_output).
    torch.testing.assert_close(edited["blocks.1.attn.hook_z"], plain["blocks.1.attn.hook_z"])
    assert (edited["hook_full_embed"] - plain["hook_full_embed"]).abs().max() > 1e-4
    assert all(not p.bwd_hooks for p in model.hook_dict.values())


def test_a_pattern_ablation_is_part_of_the_differentiated_function(checkpoint, model):
    """Zeroing head 0's pattern in layer 1 makes its z zero: the same function as zeroing z's
    head-0 slice in Hugging Face, so every gradient upstream must agree, including q and k of
    the ablated head (zero), which only a backward through the edit gets right."""
    ck = checkpoint
    tokens, types, mask = ck.batch(seed=7)
    metric = random_projection((*tokens.shape, ck.config.vocab_size), seed=7)
    dh = ck.config.hidden_size // ck.config.num_attention_heads

    def ablate(pattern, hook):
        pattern[:, 0] = 0

    def edit_z(layer, z):
        if layer == 1:
            z[..., :dh] = 0
        return z

    reference = hf_gradients(ck, tokens, types, mask, metric, edit_z=edit_z)
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", ablate)]):
        grads = model.grad(
            torch.tensor(tokens), metric=metric, token_type_ids=types, one_zero_attention_mask=mask
        )
    for name in (
        "blocks.1.attn.hook_q",
        "blocks.1.attn.hook_k",
        "blocks.1.attn.hook_v",
        "blocks.0.attn.hook_pattern",
        "hook_full_embed",
    ):
        close(grads[name], reference[name], name)
    assert grads["blocks.1.attn.hook_q"][:, :, 0].abs().max() == 0


def test_attribution_patching_matches_torch_autograd(checkpoint, model):
    """grad x (clean - corrupt) of hook_z per layer, head and position, in one backward."""
    ck = checkpoint
    clean, types, mask = ck.batch(seed=8)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 1) % ck.config.vocab_size
    metric, _ = mask_logit_diff(ck, clean)
    names = lambda name: name.endswith("hook_z")  # noqa: E731
    _, clean_cache = model.run_with_cache(
        torch.tensor(clean),
        token_type_ids=types,
        one_zero_attention_mask=mask,
        names_filter=names,
        incl_bwd=True,
        metric=metric,
    )
    _, corrupt_cache = model.run_with_cache(
        torch.tensor(corrupt),
        token_type_ids=types,
        one_zero_attention_mask=mask,
        names_filter=names,
    )
    theirs_clean = hf_gradients(ck, clean, types, mask, metric)
    for layer in range(ck.config.num_hidden_layers):
        z = f"blocks.{layer}.attn.hook_z"
        ours = (clean_cache[z + "_grad"] * (clean_cache[z] - corrupt_cache[z])).sum(-1)
        reference = (theirs_clean[z] * (clean_cache[z] - corrupt_cache[z])).sum(-1)
        close(ours, reference, f"attribution {z}")
        assert ours.shape == (*clean.shape, ck.config.num_attention_heads)


def test_start_and_stop_at_layer_gradients(checkpoint, model):
    tokens, types, mask = checkpoint.batch(seed=9)
    tokens_t = torch.tensor(tokens)
    metric = random_projection((*tokens.shape, checkpoint.config.vocab_size), seed=9)
    full = model.grad(tokens_t, metric=metric, token_type_ids=types, one_zero_attention_mask=mask)
    _, cache = model.run_with_cache(tokens_t, token_type_ids=types, one_zero_attention_mask=mask)
    resid = cache["blocks.1.hook_resid_pre"]
    late = model.grad(resid, metric=metric, start_at_layer=1, one_zero_attention_mask=mask)
    assert "blocks.0.hook_resid_pre" not in late
    for name, grad in late.items():
        torch.testing.assert_close(grad, full[name], rtol=1e-5, atol=1e-6)
    # stop_at_layer: the output is the residual stream there; its gradient is grad_output.
    g = torch.ones(*tokens.shape, checkpoint.config.hidden_size)
    early = model.grad(tokens_t, grad_output=g, stop_at_layer=1, token_type_ids=types)
    torch.testing.assert_close(early["blocks.0.hook_normalized_resid_post"], g)
    assert "blocks.1.hook_resid_pre" not in early


def test_gradient_errors_name_the_problem(checkpoint, model, tmp_path):
    tokens, _, _ = checkpoint.batch(seed=10)
    with pytest.raises(ValueError, match="metric= .* or grad_output="):
        model.run_with_cache(tokens, incl_bwd=True)
    with pytest.raises(ValueError, match="need incl_bwd=True"):
        model.run_with_cache(tokens, metric=lambda x: x.sum())
    with pytest.raises(ValueError, match="metric= .* or grad_output="):
        model.run_with_hooks(tokens, bwd_hooks=[("hook_full_embed", lambda g, hook: None)])
    with pytest.raises(ValueError, match="grad_output"):
        model.grad(tokens, grad_output=np.ones((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="scalar"):
        model.grad(torch.tensor(tokens), metric=lambda logits: logits * 2)
    half = HookedEncoder.from_pretrained(checkpoint.path, dtype="float16")
    with pytest.raises(ValueError, match="float32 only"):
        half.grad(tokens, metric=lambda logits: logits.sum())
    bad_hook = [("blocks.0.attn.hook_z", lambda g, hook: g[:, :1])]
    with pytest.raises(ValueError, match="shape"), model.hooks(bwd_hooks=bad_hook):
        model.grad(torch.tensor(tokens), metric=lambda logits: logits.sum())
    assert all(not p.bwd_hooks for p in model.hook_dict.values())


def test_next_sentence_gradients_match_torch_autograd(checkpoint, model):
    """From the NSP logits through the NSP head, the pooler (first token only) and the blocks."""
    from hooked_encoder import BertNextSentencePrediction

    ck = checkpoint
    tokens, types, mask = ck.batch(seed=11)
    weights = torch.tensor([[1.0, -2.0]]).repeat(tokens.shape[0], 1)
    kept = {}
    handles = [
        ck.hf.bert.embeddings.register_forward_hook(retaining(kept, "hook_full_embed")),
        ck.hf.bert.pooler.register_forward_hook(retaining(kept, "pooler.hook_pooler_out")),
        ck.hf.bert.encoder.layer[0].register_forward_hook(
            retaining(kept, "blocks.0.hook_normalized_resid_post")
        ),
    ]
    try:
        out = ck.hf(
            torch.tensor(tokens),
            token_type_ids=torch.tensor(types),
            attention_mask=torch.tensor(mask),
        )
        (out.seq_relationship_logits * weights).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    nsp = BertNextSentencePrediction(model)
    grads = nsp.grad(
        torch.tensor(tokens),
        metric=lambda logits: (logits * weights).sum(),
        token_type_ids=types,
        one_zero_attention_mask=mask,
    )
    assert "unembed.hook_out" not in grads
    for name, tensor in kept.items():
        close(grads[name], tensor.grad, name)
    # Only the first token feeds the pooler: the last block's other positions get no gradient.
    last = grads[f"blocks.{ck.config.num_hidden_layers - 1}.hook_normalized_resid_post"]
    assert last[:, 1:].abs().max() == 0 and last[:, 0].abs().max() > 0
