"""Declarative interventions (hooked_encoder.interventions): each op against the same edit
written as a Python hook, applied with no Python call during the pass, selectors checked
before anything runs."""

from __future__ import annotations

import fnmatch
import functools

import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from hooked_encoder import HookedEncoder
from hooked_encoder import interventions as iv
from hooked_encoder.hooked_encoder import HookedEncoder as _Model


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("iv"), "wide", seed=3)


@pytest.fixture(scope="module")
def model(ck):
    return HookedEncoder.from_pretrained(ck.path)


@pytest.fixture(scope="module")
def batch(ck):
    return ck.batch(seed=1, batch=3, pos=9)


def run_both(model, batch, interventions):
    """Logits and a full cache with the interventions applied declaratively, and with the same
    edits as Python hooks."""
    tokens, types, mask = batch
    kwargs = {"token_type_ids": types, "one_zero_attention_mask": mask}
    declared = model.run_with_cache(tokens, interventions=interventions, **kwargs)
    hooks = [
        (
            functools.partial(fnmatch.fnmatchcase, pat=i.hook),
            i.as_hook(tokens=tokens, attention_mask=mask, model=model),
        )
        for i in interventions
    ]
    with model.hooks(fwd_hooks=hooks):
        hooked = model.run_with_cache(tokens, **kwargs)
    return declared, hooked


EDITS = {
    "zero one head's z at some positions": [
        iv.zero("blocks.1.attn.hook_z", heads=[1, 2], positions=slice(1, 4))
    ],
    "scale pattern entries by query and key": [
        iv.scale("blocks.0.attn.hook_pattern", 0.5, heads=0, query=[2, 5], key=[1, 3])
    ],
    "replace scores of one head": [iv.replace("blocks.2.attn.hook_attn_scores", 3.0, heads=3)],
    "steer the residual at one position per row": [
        iv.add(
            "blocks.2.hook_resid_pre", np.linspace(-1, 1, 48), scale=2.0, positions=[[1], [2], [0]]
        )
    ],
    "patch MLP outputs from another row": [
        iv.patch("blocks.1.hook_mlp_out", from_rows=[2, 2, 2], rows=[0, 1])
    ],
    "zero every layer's values by glob": [iv.zero("blocks.*.attn.hook_v", heads=0)],
    "two edits at one point, in order": [
        iv.add("blocks.0.hook_mlp_out", np.ones(48)),
        iv.scale("blocks.0.hook_mlp_out", -2.0, positions=[0, 4]),
    ],
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_each_op_equals_the_same_edit_as_a_python_hook(model, batch, name):
    (declared, cache), (hooked, hooked_cache) = run_both(model, batch, EDITS[name])
    np.testing.assert_allclose(declared, hooked, rtol=0, atol=1e-6)
    assert (
        np.abs(
            declared - model(batch[0], token_type_ids=batch[1], one_zero_attention_mask=batch[2])
        ).max()
        > 1e-4
    )
    for key in cache:  # the cache records the values after the edits, as the hooks' does
        np.testing.assert_allclose(cache[key], hooked_cache[key], rtol=0, atol=1e-5, err_msg=key)


def test_selected_entries_change_and_nothing_else_padding_included(model, batch):
    tokens, types, mask = batch
    kwargs = {"token_type_ids": types, "one_zero_attention_mask": mask}
    name = "blocks.1.attn.hook_z"
    _, plain = model.run_with_cache(tokens, names_filter=name, **kwargs)
    _, edited = model.run_with_cache(
        tokens, names_filter=name, interventions=[iv.zero(name, heads=2)], **kwargs
    )
    z, before = edited[name], plain[name]
    real = mask.astype(bool)
    assert np.all(z[:, :, 2][real] == 0)
    np.testing.assert_array_equal(z[:, :, 2][~real], before[:, :, 2][~real])  # padding kept
    np.testing.assert_array_equal(np.delete(z, 2, axis=2), np.delete(before, 2, axis=2))
    _, padded = model.run_with_cache(
        tokens,
        names_filter=name,
        interventions=[iv.zero(name, heads=2, include_padding=True)],
        **kwargs,
    )
    assert np.all(padded[name][:, :, 2] == 0)


def test_no_python_function_runs_during_a_declarative_pass(model, batch, monkeypatch):
    calls = []
    original = _Model._dispatch

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_Model, "_dispatch", counting)
    tokens, _, mask = batch
    model.run_with_interventions(
        tokens,
        [iv.zero("blocks.*.attn.hook_z", heads=0), iv.scale("blocks.1.hook_resid_mid", 2.0)],
        one_zero_attention_mask=mask,
    )
    assert calls == []
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x)])
    assert len(calls) == 1  # the counter counts


def test_interventions_run_before_python_hooks_at_one_point(model, batch):
    tokens = batch[0]
    seen = []
    name = "blocks.0.hook_resid_mid"
    model.run_with_hooks(
        tokens,
        fwd_hooks=[(name, lambda x, hook: seen.append(x.copy()))],
        interventions=[iv.replace(name, 7.0)],
    )
    assert np.all(seen[0] == 7.0)


def test_means_patches_from_caches_and_files(model, batch, tmp_path):
    tokens, types, mask = batch
    kwargs = {"token_type_ids": types, "one_zero_attention_mask": mask}
    name = "blocks.1.hook_resid_pre"
    means = iv.means_of(model, tokens, name, over="tokens", **kwargs)
    assert means.shape == (48,)
    _, cache = model.run_with_cache(tokens[::-1].copy(), names_filter=name)
    cache.save(tmp_path / "clean.safetensors")
    for intervention, expected in [
        (iv.mean(name, means, positions=2), means),
        (iv.patch(name, cache, positions=2), cache[name][:, 2]),
        (iv.patch(name, tmp_path / "clean.safetensors", positions=2), cache[name][:, 2]),
    ]:
        _, edited = model.run_with_cache(
            tokens, names_filter=name, interventions=[intervention], **kwargs
        )
        np.testing.assert_array_equal(edited[name][:, 2], np.broadcast_to(expected, (3, 48)))


def test_json_round_trip_gives_the_same_run(model, batch):
    tokens, _, mask = batch
    edits = [
        *EDITS["steer the residual at one position per row"],
        *EDITS["scale pattern entries by query and key"],
    ]
    _, cache = model.run_with_cache(tokens[::-1].copy(), names_filter="blocks.0.hook_attn_out")
    edits.append(iv.patch("blocks.0.hook_attn_out", cache, positions=slice(0, 2)))
    again = iv.loads(iv.dumps(edits))
    assert [e.op for e in again] == [e.op for e in edits]
    np.testing.assert_array_equal(
        model.run_with_interventions(tokens, again, one_zero_attention_mask=mask),
        model.run_with_interventions(tokens, edits, one_zero_attention_mask=mask),
    )


def test_a_token_string_selects_its_positions(text_checkpoint):
    model = HookedEncoder.from_pretrained(text_checkpoint.path)
    text = ["the [MASK] sat on the mat", "a [MASK] [MASK]"]
    name = "blocks.0.hook_resid_post"
    _, cache = model.run_with_cache(
        text, names_filter=name, interventions=[iv.zero(name, positions="[MASK]")]
    )
    tokens, _, _ = model.to_tokens(text)
    is_mask = tokens == model.tokenizer.mask_token_id
    assert np.all(cache[name][is_mask] == 0) and np.all(cache[name][~is_mask] != 0)


@pytest.mark.parametrize(
    "intervention, message",
    [
        (iv.zero("blocks.1.attn.hook_z", heads=9), "heads=9 is out of range"),
        (iv.zero("blocks.1.hook_resid_pre", heads=1), "heads= applies to per-head points"),
        (iv.zero("blocks.0.attn.hook_pattern", positions=1), "use query=/key="),
        (iv.zero("blocks.0.hook_resid_pre", positions=12), "out of range"),
        (iv.add("blocks.0.hook_resid_pre", np.ones(5)), "does not fit the activation"),
        (iv.zero("blocks.9.*"), "no hook point matches"),
        (iv.patch("blocks.0.hook_resid_pre", {"other": np.zeros(1)}), "does not hold this hook"),
        (iv.patch("blocks.0.hook_resid_pre", from_rows=[0, 5, 1]), "outside"),
        (
            iv.zero("blocks.0.hook_resid_pre", positions="[MASK]"),
            "needs token input and a tokenizer",
        ),
    ],
)
def test_bad_selectors_raise_naming_the_intervention_before_the_pass(
    model, batch, monkeypatch, intervention, message
):
    tokens = batch[0]

    def never(*args, **kwargs):
        raise AssertionError("the pass ran")

    monkeypatch.setattr(model, "_core_call", never)
    with pytest.raises(ValueError, match=message) as error:
        model.run_with_interventions(tokens, [intervention])
    assert intervention.op in str(error.value)


def test_gradients_go_through_interventions_as_through_the_same_torch_edits(model, batch):
    """The Rust backward takes each declarative edit's gradient (zero where set, times the
    factor where scaled, to the source row where patched from another row): the same gradients
    torch computes through the same edits written as torch hooks."""
    tokens = torch.tensor(batch[0])
    metric = lambda logits: (logits[:, 3, 5] - logits[:, 3, 7]).sum()  # noqa: E731
    declared = [
        iv.zero("blocks.1.attn.hook_z", heads=2),
        iv.scale("blocks.0.attn.hook_pattern", 0.5, heads=1, query=[2], key=[1, 4]),
        iv.patch("blocks.1.hook_mlp_out", from_rows=[2, 0, 0], positions=[3, 4]),
        iv.add("blocks.2.hook_resid_pre", torch.linspace(-1, 1, 48)),
    ]

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    def scale_entries(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 1, 2, [1, 4]] *= 0.5
        return pattern

    def from_rows(x, hook):
        where = torch.zeros(x.shape[1], dtype=torch.bool)
        where[[3, 4]] = True
        return torch.where(where[None, :, None], x[[2, 0, 0]], x)

    def steer(x, hook):
        return x + torch.linspace(-1, 1, 48)

    hooks = [
        ("blocks.1.attn.hook_z", zero_head),
        ("blocks.0.attn.hook_pattern", scale_entries),
        ("blocks.1.hook_mlp_out", from_rows),
        ("blocks.2.hook_resid_pre", steer),
    ]
    ours = model.grad(tokens, metric=metric, interventions=declared)
    with model.hooks(fwd_hooks=hooks):
        reference = model.grad(tokens, metric=metric)
    assert ours.keys() == reference.keys()
    for name in ours:
        np.testing.assert_allclose(
            ours[name].numpy(), reference[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name
        )
    plain = model.grad(tokens, metric=metric)
    z_grad = "blocks.1.attn.hook_z"
    assert not np.allclose(plain[z_grad].numpy(), ours[z_grad].numpy())


def test_torch_values_and_a_residual_start_work(model, batch):
    tokens, _, mask = batch
    name = "blocks.2.hook_resid_pre"
    _, cache = model.run_with_cache(tokens, names_filter=name, one_zero_attention_mask=mask)
    x = cache[name]
    steer = torch.linspace(0, 1, 48)
    out = model(
        x, start_at_layer=2, one_zero_attention_mask=mask, interventions=[iv.add(name, steer)]
    )
    expected = model(
        x + steer.numpy() * mask[:, :, None], start_at_layer=2, one_zero_attention_mask=mask
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
