"""hooked_encoder.patching: TransformerLens's activation-patching functions, batched, against a
plain per-patch loop of our own ``run_with_hooks`` with TransformerLens's setters (what
``transformer_lens.patching`` itself runs)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_checkpoint, make_modernbert_checkpoint
from hooked_encoder import HookedEncoder, patching

POS = 6
CASES = {
    # function: (setter, activation, axes)
    "get_act_patch_resid_pre": (patching.layer_pos_patch_setter, "resid_pre", ("layer", "pos")),
    "get_act_patch_resid_mid": (patching.layer_pos_patch_setter, "resid_mid", ("layer", "pos")),
    "get_act_patch_attn_out": (patching.layer_pos_patch_setter, "attn_out", ("layer", "pos")),
    "get_act_patch_mlp_out": (patching.layer_pos_patch_setter, "mlp_out", ("layer", "pos")),
    "get_act_patch_attn_head_out_by_pos": (
        patching.layer_pos_head_vector_patch_setter,
        "z",
        ("layer", "pos", "head"),
    ),
    "get_act_patch_attn_head_q_by_pos": (
        patching.layer_pos_head_vector_patch_setter,
        "q",
        ("layer", "pos", "head"),
    ),
    "get_act_patch_attn_head_k_by_pos": (
        patching.layer_pos_head_vector_patch_setter,
        "k",
        ("layer", "pos", "head"),
    ),
    "get_act_patch_attn_head_v_by_pos": (
        patching.layer_pos_head_vector_patch_setter,
        "v",
        ("layer", "pos", "head"),
    ),
    "get_act_patch_attn_head_pattern_by_pos": (
        patching.layer_head_pos_pattern_patch_setter,
        "pattern",
        ("layer", "head_index", "dest_pos"),
    ),
    "get_act_patch_attn_head_pattern_dest_src_pos": (
        patching.layer_head_dest_src_pos_pattern_patch_setter,
        "pattern",
        ("layer", "head_index", "dest_pos", "src_pos"),
    ),
    "get_act_patch_attn_head_out_all_pos": (
        patching.layer_head_vector_patch_setter,
        "z",
        ("layer", "head"),
    ),
    "get_act_patch_attn_head_q_all_pos": (
        patching.layer_head_vector_patch_setter,
        "q",
        ("layer", "head"),
    ),
    "get_act_patch_attn_head_k_all_pos": (
        patching.layer_head_vector_patch_setter,
        "k",
        ("layer", "head"),
    ),
    "get_act_patch_attn_head_v_all_pos": (
        patching.layer_head_vector_patch_setter,
        "v",
        ("layer", "head"),
    ),
    "get_act_patch_attn_head_pattern_all_pos": (
        patching.layer_head_pattern_patch_setter,
        "pattern",
        ("layer", "head_index"),
    ),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ck = make_checkpoint(tmp_path_factory.mktemp("patching"), "wide", seed=5)
    model = HookedEncoder.from_pretrained(ck.path)
    clean, types, mask = ck.batch(seed=1, batch=2, pos=POS)
    corrupted, _, _ = ck.batch(seed=2, batch=2, pos=POS)
    return model, clean, corrupted, types, mask


def metric(logits):
    """A logit difference at the last position, TransformerLens style."""
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean()


def loop(model, corrupted, cache, setter, activation, axes, **kwargs):
    """TransformerLens's algorithm: one run_with_hooks per index with the setter as the hook."""
    ranges = {
        "layer": model.cfg.n_layers,
        "pos": POS,
        "head": model.cfg.n_heads,
        "head_index": model.cfg.n_heads,
        "dest_pos": POS,
        "src_pos": POS,
    }
    shape = tuple(ranges[axis] for axis in axes)
    out = np.zeros(shape, np.float32)
    for index in itertools.product(*(range(n) for n in shape)):
        name = f"blocks.{index[0]}.{patching._ACTIVATIONS[activation]}"
        clean = np.asarray(cache[name])

        def hook(activation, hook, index=index, clean=clean):
            return setter(activation, list(index), clean)

        out[index] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)], **kwargs))
    return out


def close(ours, theirs):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_function_equals_a_per_patch_loop(setup, name):
    model, clean, corrupted, _, _ = setup
    _, cache = model.run_with_cache(clean)
    setter, activation, axes = CASES[name]
    ours = getattr(patching, name)(model, corrupted, cache, metric)
    expected = loop(model, corrupted, cache, setter, activation, axes)
    assert ours.shape == expected.shape
    close(ours, expected)
    assert np.abs(expected).max() > 0


def test_padding_masks_and_token_types_reach_every_patched_run(setup):
    model, clean, corrupted, types, mask = setup
    kwargs = {"one_zero_attention_mask": mask, "token_type_ids": types}
    _, cache = model.run_with_cache(clean, **kwargs)
    for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos"):
        setter, activation, axes = CASES[name]
        ours = getattr(patching, name)(model, corrupted, cache, metric, **kwargs)
        close(ours, loop(model, corrupted, cache, setter, activation, axes, **kwargs))


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_patches_after_attention_equal_the_loop_on_post_and_pre_ln_blocks(tmp_path_factory, family):
    """A patch at an activation computed after attention (z, result, attn_out, resid_mid, the
    MLP's pre/post, mlp_out) reruns its block at the patched positions alone; with padding, on
    BERT's post-LN blocks (hook_result on) and ModernBERT's pre-LN ones (windowed attention,
    gated MLP), every sweep still equals the per-patch loop, also with the logit_diff metric."""
    directory = tmp_path_factory.mktemp(f"local-{family}")
    if family == "bert":
        ck = make_checkpoint(directory, seed=8)
        model = HookedEncoder.from_pretrained(ck.path, use_attn_result=True)
    else:
        ck = make_modernbert_checkpoint(directory, seed=8)
        model = HookedEncoder.from_pretrained(ck.path)
    clean, _, mask = ck.batch(seed=3, batch=2, pos=POS)
    corrupted, _, _ = ck.batch(seed=4, batch=2, pos=POS)
    assert not mask.all()
    _, cache = model.run_with_cache(clean, one_zero_attention_mask=mask)
    by_pos = (patching.layer_pos_head_vector_patch_setter, ("layer", "pos", "head"))
    at_pos = (patching.layer_pos_patch_setter, ("layer", "pos"))
    cases = {"z": by_pos, "attn_out": at_pos, "resid_mid": at_pos, "pre": at_pos}
    cases |= {"post": at_pos, "mlp_out": at_pos}
    if family == "bert":
        cases["result"] = by_pos
    for activation, (setter, axes) in cases.items():
        ours = patching.generic_activation_patch(
            model,
            corrupted,
            cache,
            metric,
            setter,
            activation,
            axes,
            one_zero_attention_mask=mask,
        )
        expected = loop(
            model, corrupted, cache, setter, activation, axes, one_zero_attention_mask=mask
        )
        assert np.abs(expected).max() > 0
        close(ours, expected)
    fast = patching.get_act_patch_attn_head_out_by_pos(
        model, corrupted, cache, patching.logit_diff(POS - 1, 5, 7), one_zero_attention_mask=mask
    )
    expected = loop(
        model, corrupted, cache, *by_pos[:1], "z", by_pos[1], one_zero_attention_mask=mask
    )
    close(fast, expected)


def test_the_every_helpers_stack_their_parts(setup):
    model, clean, corrupted, _, _ = setup
    _, cache = model.run_with_cache(clean)
    block = patching.get_act_patch_block_every(model, corrupted, cache, metric)
    assert block.shape == (3, model.cfg.n_layers, POS)
    close(block[2], patching.get_act_patch_mlp_out(model, corrupted, cache, metric))
    heads = patching.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, metric)
    assert heads.shape == (5, model.cfg.n_layers, model.cfg.n_heads)
    by_pos = patching.get_act_patch_attn_head_by_pos_every(model, corrupted, cache, metric)
    assert by_pos.shape == (5, model.cfg.n_layers, POS, model.cfg.n_heads)
    pattern = patching.get_act_patch_attn_head_pattern_by_pos(model, corrupted, cache, metric)
    close(by_pos[4], pattern.transpose(0, 2, 1))


def test_the_metric_sees_each_patched_run_alone_and_chunks_do_not_matter(setup):
    model, clean, corrupted, _, _ = setup
    _, cache = model.run_with_cache(clean)
    shapes = []

    def counting(logits):
        shapes.append(logits.shape)
        return metric(logits)

    default = patching.get_act_patch_resid_pre(model, corrupted, cache, counting)
    assert shapes == [(2, POS, model.cfg.d_vocab)] * (model.cfg.n_layers * POS)
    one_run_each = patching.get_act_patch_resid_pre(
        model, corrupted, cache, metric, rows_per_chunk=2
    )
    close(one_run_each, default)


def test_torch_in_torch_out_and_torch_metrics(setup):
    model, clean, corrupted, _, _ = setup
    _, cache = model.run_with_cache(torch.tensor(clean))
    ours = patching.get_act_patch_attn_out(model, torch.tensor(corrupted), cache, metric)
    assert isinstance(ours, torch.Tensor)
    close(ours.numpy(), patching.get_act_patch_attn_out(model, corrupted, cache, metric))


def test_an_index_df_and_a_setter_of_ones_own(setup):
    model, clean, corrupted, _, _ = setup
    _, cache = model.run_with_cache(clean)
    index_df = pd.DataFrame({"layer": [2, 0, 1], "pos": [5, 1, 3]})
    flat, returned = patching.generic_activation_patch(
        model,
        corrupted,
        cache,
        metric,
        patching.layer_pos_patch_setter,
        "resid_pre",
        index_df=index_df,
        return_index_df=True,
    )
    full = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    close(flat, full[index_df["layer"], index_df["pos"]])
    assert returned is index_df

    def own_setter(corrupted_activation, index, clean_activation):
        return patching.layer_pos_patch_setter(corrupted_activation, index, clean_activation)

    looped = patching.generic_activation_patch(
        model, corrupted, cache, metric, own_setter, "resid_pre", index_axis_names=("layer", "pos")
    )
    close(looped, full)


def test_bad_arguments_are_named(setup):
    model, clean, corrupted, _, _ = setup
    _, cache = model.run_with_cache(clean)
    with pytest.raises(ValueError, match="unknown activation_name"):
        patching.generic_activation_patch(
            model, corrupted, cache, metric, patching.layer_pos_patch_setter, "nope", ("layer",)
        )
    with pytest.raises(ValueError, match="rows"):
        patching.get_act_patch_resid_pre(model, corrupted[:1], cache, metric)
    with pytest.raises(ValueError, match="rows_per_chunk"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, metric, rows_per_chunk=0)
    partial = functools.partial(patching.get_act_patch_resid_pre, model, corrupted)
    assert partial(cache, metric).shape == (model.cfg.n_layers, POS)


@pytest.mark.parametrize(
    "activation, axes",
    [
        ("resid_pre", ("layer", "pos")),
        ("z", ("layer", "pos", "head")),
        ("v", ("layer", "head")),
        ("pattern", ("layer", "head_index", "dest_pos")),
    ],
)
def test_attribution_patching_is_the_first_order_change_of_each_patch(setup, activation, axes):
    """Each entry equals the derivative of the metric along the straight line from the
    corrupted activation towards the clean one at that index (central differences of patched
    runs, with the patch applied by interventions), and the result has the shape of the
    matching sweep."""
    from hooked_encoder import interventions as iv

    model, clean, corrupted, types, mask = setup
    kwargs = {"one_zero_attention_mask": mask, "token_type_ids": types}
    _, clean_cache = model.run_with_cache(clean, **kwargs)
    _, corrupted_cache = model.run_with_cache(corrupted, **kwargs)
    attribution = patching.attribution_patch(
        model, corrupted, clean_cache, metric, activation, axes, **kwargs
    )
    setter = {
        ("layer", "pos"): patching.layer_pos_patch_setter,
        ("layer", "pos", "head"): patching.layer_pos_head_vector_patch_setter,
        ("layer", "head"): patching.layer_head_vector_patch_setter,
        ("layer", "head_index", "dest_pos"): patching.layer_head_pos_pattern_patch_setter,
    }[axes]
    sweep = patching.generic_activation_patch(
        model, corrupted, clean_cache, metric, setter, activation, axes, **kwargs
    )
    assert attribution.shape == sweep.shape
    rng = np.random.default_rng(0)
    for _ in range(3):
        index = tuple(int(rng.integers(n)) for n in attribution.shape)
        name = f"blocks.{index[0]}.{patching._ACTIVATIONS[activation]}"
        base = np.asarray(corrupted_cache[name])
        delta = np.asarray(clean_cache[name]) - base
        where = patching._selection(setter, index, base.shape[1:])[None]

        def along(step, name=name, base=base, delta=delta, where=where):
            edit = iv.replace(name, base + step * delta, where=where, include_padding=True)
            return float(metric(model(corrupted, interventions=[edit], **kwargs)))

        h = 1e-2
        numeric = (along(h) - along(-h)) / (2 * h)
        assert abs(attribution[index] - numeric) <= 2e-3 * (1 + abs(numeric)), index


def test_logit_diff_runs_no_full_head_and_gives_the_same_sweep(setup, monkeypatch):
    model, clean, corrupted, types, mask = setup
    kwargs = {"one_zero_attention_mask": mask, "token_type_ids": types}
    _, cache = model.run_with_cache(clean, **kwargs)
    metric_object = patching.logit_diff(position=4, good=5, bad=7)
    slow = patching.get_act_patch_attn_head_out_by_pos(
        model, corrupted, cache, lambda logits: metric_object(logits), **kwargs
    )
    heads = []

    class Recording:
        """The Rust model, noting which head each pass ran."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def forward(self, *args, **kw):
            heads.append(args[6])  # "logits" or "residual"
            return self.inner.forward(*args, **kw)

    monkeypatch.setattr(model, "_model", Recording(model._model))
    fast = patching.get_act_patch_attn_head_out_by_pos(
        model, corrupted, cache, metric_object, **kwargs
    )
    close(fast, slow)
    assert heads and "logits" not in heads  # no patched run computed the full MLM head
    with pytest.raises(ValueError, match="position is outside"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, patching.logit_diff(99, 1, 2))
