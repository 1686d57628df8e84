"""The hook API: registration, ordering, contexts, filters, and the cache object."""

from __future__ import annotations

import numpy as np
import pytest

from hooked_encoder import ActivationCache, HookPoint, get_act_name

TOKENS = np.array([[1, 2, 3, 4], [5, 6, 7, 0]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])


def test_hook_receives_its_hook_point_and_none_keeps_the_activation(model):
    seen = []

    def look(x, hook):
        seen.append((hook, x.shape))

    plain = model(TOKENS)
    out = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_pattern", look)])
    np.testing.assert_array_equal(out, plain)
    ((point, shape),) = seen
    assert isinstance(point, HookPoint) and point.name == "blocks.1.attn.hook_pattern"
    assert point.layer() == 1 and repr(point) == "HookPoint(name='blocks.1.attn.hook_pattern')"
    assert shape == (2, model.cfg.n_heads, 4, 4)
    with pytest.raises(ValueError, match="not inside a block"):
        model.hook_dict["hook_full_embed"].layer()


def test_hooks_on_one_point_chain_in_order_and_prepend_goes_first(model):
    calls = []
    model.add_hook("hook_full_embed", lambda x, hook: calls.append("a") or x + 1)
    model.add_hook("hook_full_embed", lambda x, hook: calls.append("b") or x * 2)
    model.add_hook("hook_full_embed", lambda x, hook: calls.append("c") or None, prepend=True)
    try:
        _, cache = model.run_with_cache(
            TOKENS, names_filter="hook_full_embed", reset_hooks_end=False
        )
    finally:
        model.reset_hooks()
    assert calls == ["c", "a", "b"]
    _, plain = model.run_with_cache(TOKENS, names_filter="hook_full_embed")
    # The cache records the value after the user's hooks, as TransformerLens's does.
    np.testing.assert_allclose(cache["hook_full_embed"], (plain["hook_full_embed"] + 1) * 2)


def test_a_predicate_adds_a_hook_to_every_matching_point(model):
    names = []
    model.run_with_hooks(
        TOKENS,
        fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda x, hook: names.append(hook.name))],
    )
    assert names == [f"blocks.{i}.attn.hook_z" for i in range(model.cfg.n_layers)]


def test_hooks_context_removes_only_its_own_hooks_and_permanent_hooks_stay(model):
    calls = []
    model.add_perma_hook("blocks.0.hook_resid_pre", lambda x, hook: calls.append("perma"))
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: calls.append("outer"))
    try:
        with model.hooks(
            fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: calls.append("ctx"))]
        ):
            model(TOKENS)
        assert calls == ["perma", "outer", "ctx"]
        calls.clear()
        model(TOKENS)
        assert calls == ["perma", "outer"]
        model.reset_hooks()
        calls.clear()
        model(TOKENS)
        assert calls == ["perma"]
    finally:
        model.reset_hooks(including_permanent=True)
    calls.clear()
    model(TOKENS)
    assert calls == []


def test_reset_hooks_end_false_keeps_hooks_and_ctx_persists_until_cleared(model):
    def count(x, hook):
        hook.ctx["n"] = hook.ctx.get("n", 0) + 1

    model.run_with_hooks(TOKENS, fwd_hooks=[("hook_full_embed", count)], reset_hooks_end=False)
    model(TOKENS)
    point = model.hook_dict["hook_full_embed"]
    assert point.ctx == {"n": 2}
    model.reset_hooks()
    assert point.ctx == {} and point.fwd_hooks == []


@pytest.mark.parametrize(
    "names_filter, expected",
    [
        ("blocks.0.hook_resid_pre", ["blocks.0.hook_resid_pre"]),
        (["blocks.1.attn.hook_q", "hook_full_embed"], ["hook_full_embed", "blocks.1.attn.hook_q"]),
        (lambda n: n.startswith("unembed"), ["unembed.hook_in", "unembed.hook_out"]),
    ],
)
def test_names_filter_forms_record_exactly_the_selected_points(model, names_filter, expected):
    _, cache = model.run_with_cache(TOKENS, names_filter=names_filter)
    assert list(cache.keys()) == expected
    _, full = model.run_with_cache(TOKENS)
    for name in expected:
        np.testing.assert_array_equal(cache[name], full[name])


def test_shorthand_keys_resolve_as_in_transformer_lens(model):
    _, cache = model.run_with_cache(TOKENS, one_zero_attention_mask=MASK)
    last = model.cfg.n_layers - 1
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["pattern", -1] is cache[f"blocks.{last}.attn.hook_pattern"]
    assert cache["resid_pre", 1] is cache["blocks.1.hook_resid_pre"]
    assert cache["scale", 0, "ln1"] is cache["blocks.0.ln1.hook_scale"]
    assert cache["pattern0"] is cache["blocks.0.attn.hook_pattern"]
    assert cache["post", 1] is cache["blocks.1.mlp.hook_post"]
    # TransformerLens raised KeyError for these on an encoder; we resolve them.
    assert cache["embed"] is cache["embed.hook_embed"]
    assert cache["scale"] is cache["mlm_head.ln.hook_scale"]
    assert ("pattern", 0) in cache and "nope" not in cache
    with pytest.raises(KeyError, match="not in this cache"):
        cache["blocks.0.hook_mlp_in"]
    assert get_act_name("k", 2) == "blocks.2.attn.hook_k"
    assert get_act_name("attn_logits", 0) == "blocks.0.attn.hook_attn_scores"


def test_cache_object_behaves_like_a_dict(model):
    _, cache = model.run_with_cache(TOKENS)
    _, raw = model.run_with_cache(TOKENS, return_cache_object=False)
    assert isinstance(cache, ActivationCache) and isinstance(raw, dict)
    assert len(cache) == len(raw) == 10 + 18 * model.cfg.n_layers
    assert list(cache) == list(raw) == list(cache.keys())
    assert [k for k, _ in cache.items()] == list(raw)
    assert "ActivationCache" in repr(cache)


def test_remove_batch_dim_and_pos_slice(model):
    _, cache = model.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    assert cache["resid_pre", 0].shape == (4, model.cfg.d_model)
    assert cache["pattern", 0].shape == (model.cfg.n_heads, 4, 4)
    assert not cache.has_batch_dim
    with pytest.raises(ValueError, match="batch of one"):
        model.run_with_cache(TOKENS, remove_batch_dim=True)
    _, full = model.run_with_cache(TOKENS)
    _, last = model.run_with_cache(TOKENS, pos_slice=-1)
    np.testing.assert_array_equal(last["q", 0], full["q", 0][:, -1:])
    np.testing.assert_array_equal(last["pattern", 0], full["pattern", 0][:, :, -1:])
    assert last["resid_post", 1].shape == (2, 1, model.cfg.d_model)


def test_return_type_none_skips_the_head_and_returns_none(model):
    out, cache = model.run_with_cache(TOKENS, return_type=None)
    assert out is None
    assert "unembed.hook_out" not in cache and "mlm_head.ln.hook_scale" not in cache
    assert f"blocks.{model.cfg.n_layers - 1}.hook_normalized_resid_post" in cache
    assert model(TOKENS, return_type=None) is None


def test_a_hand_built_model_is_bidirectional_gelu_and_initialised():
    from hooked_encoder import HookedEncoder

    model = HookedEncoder(
        {"d_model": 16, "d_head": 4, "n_layers": 2, "n_ctx": 8, "d_vocab": 30, "seed": 0}
    )
    assert (model.cfg.n_heads, model.cfg.d_mlp, model.cfg.act_fn) == (4, 64, "gelu")
    _, cache = model.run_with_cache(np.arange(6)[None])
    pattern = cache["pattern", 0]
    assert np.all(np.isfinite(pattern)) and np.triu(pattern[0, 0], 1).max() > 0
    again = HookedEncoder(
        {"d_model": 16, "d_head": 4, "n_layers": 2, "n_ctx": 8, "d_vocab": 30, "seed": 0}
    )
    np.testing.assert_array_equal(model(np.arange(6)[None]), again(np.arange(6)[None]))
    causal = HookedEncoder(
        {
            "d_model": 16,
            "d_head": 4,
            "n_layers": 1,
            "n_ctx": 8,
            "d_vocab": 30,
            "seed": 0,
            "attention_dir": "causal",
        }
    )
    _, cache = causal.run_with_cache(np.arange(6)[None])
    assert np.triu(cache["pattern", 0][0, 0], 1).max() == 0


def test_editing_a_layer_norm_scale_rescales_its_normalized_output(model):
    _, plain = model.run_with_cache(TOKENS, names_filter=lambda n: n.startswith("blocks.0.ln1"))
    with model.hooks(fwd_hooks=[("blocks.0.ln1.hook_scale", lambda s, hook: s * 2)]):
        _, edited = model.run_with_cache(
            TOKENS, names_filter=lambda n: n.startswith("blocks.0.ln1")
        )
    np.testing.assert_allclose(edited["scale", 0, "ln1"], plain["scale", 0, "ln1"] * 2)
    np.testing.assert_allclose(
        edited["normalized", 0, "ln1"], plain["normalized", 0, "ln1"] / 2, rtol=1e-5, atol=1e-6
    )


def test_cached_arrays_outlive_the_model_and_share_no_surprises():
    import gc

    from hooked_encoder import HookedEncoder

    model = HookedEncoder(
        {"d_model": 16, "d_head": 4, "n_layers": 2, "n_ctx": 8, "d_vocab": 30, "seed": 1}
    )
    logits, cache = model.run_with_cache(np.arange(5)[None])
    expected = {name: value.copy() for name, value in cache.items()}
    del model
    gc.collect()
    for name, value in cache.items():
        np.testing.assert_array_equal(value, expected[name])
    # Results are ordinary, writable float32 arrays.
    assert logits.dtype == np.float32 and logits.flags.writeable
