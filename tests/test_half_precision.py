"""Half precision (``dtype="float16"`` / ``"bfloat16"``) against Hugging Face in the same dtype.

Half precision is meant for GPUs (tests/test_cuda.py runs the same checks there); on the CPU it
runs the same portable Candle ops a GPU does, so these tests check that code path on every
machine. The tolerance is the documented one (README, "Half precision"): within 8 epsilons of
the dtype (2**-10 for float16, 2**-7 for bfloat16) times the largest logit, of HF's logits in
that dtype, and no further from the float32 logits than twice HF's own half-precision error.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from conftest import EPSILON, assert_half_parity
from hooked_encoder import HookedEncoder

HALF = sorted(EPSILON)


def hf_logits_in(checkpoint, dtype: str, tokens, types, mask) -> np.ndarray:
    hf = copy.deepcopy(checkpoint.hf).to(getattr(torch, dtype))
    with torch.no_grad():
        logits = hf(
            torch.tensor(tokens),
            token_type_ids=torch.tensor(types),
            attention_mask=torch.tensor(mask),
        ).prediction_logits
    return logits.float().numpy()


@pytest.mark.parametrize("dtype", HALF)
def test_logits_match_hf_in_the_same_dtype(any_checkpoint, dtype):
    tokens, types, mask = any_checkpoint.batch(seed=3)
    model = HookedEncoder.from_pretrained(any_checkpoint.path, dtype=dtype)
    assert model.cfg.dtype == dtype
    logits = model(
        torch.tensor(tokens),
        token_type_ids=torch.tensor(types),
        one_zero_attention_mask=torch.tensor(mask),
    )
    assert logits.dtype == getattr(torch, dtype)
    hf32 = any_checkpoint.hf_logits(tokens, types, mask)
    hf_half = hf_logits_in(any_checkpoint, dtype, tokens, types, mask)
    assert_half_parity(logits.float().numpy(), hf_half, hf32, dtype)
    # NumPy has no bfloat16: NumPy results are the same values widened to float32.
    as_numpy = model(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    assert as_numpy.dtype == np.float32
    np.testing.assert_array_equal(as_numpy, logits.float().numpy())


@pytest.mark.parametrize("dtype", HALF)
def test_cache_and_hooks_in_half_precision(checkpoint, dtype):
    model = HookedEncoder.from_pretrained(checkpoint.path, dtype=dtype, output_format="torch")
    tokens, _, mask = checkpoint.batch(seed=4)
    _, cache = model.run_with_cache(tokens, one_zero_attention_mask=mask)
    assert {value.dtype for value in cache.values()} == {getattr(torch, dtype)}
    reference = HookedEncoder.from_pretrained(checkpoint.path, output_format="torch")
    _, reference_cache = reference.run_with_cache(tokens, one_zero_attention_mask=mask)
    for name in ("blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post", "hook_full_embed"):
        ours, exact = cache[name].float(), reference_cache[name]
        tolerance = 8 * EPSILON[dtype] * exact.abs().max()
        assert (ours - exact).abs().max() <= tolerance, name

    # A hook gets the activation in the model's dtype; what it returns continues in that dtype.
    seen = []

    def uniform(pattern, hook):
        seen.append(pattern.dtype)
        return torch.full_like(pattern, 1.0 / pattern.shape[-1])

    edited = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)]
    ).float()
    expected = reference.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)])
    assert seen == [getattr(torch, dtype), torch.float32]
    np.testing.assert_allclose(
        edited, expected, rtol=0, atol=8 * EPSILON[dtype] * expected.abs().max()
    )
    with pytest.raises(TypeError, match=f"torch.float64 tensor; it must be torch.{dtype}"):
        model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x.double())]
        )


def test_converting_rounds_the_weights_once(checkpoint):
    model = HookedEncoder.from_pretrained(checkpoint.path)
    exact = model.W_Q.copy()
    assert model.to(torch.bfloat16) is model and model.cfg.dtype == "bfloat16"
    rounded = torch.from_numpy(exact).to(torch.bfloat16).float().numpy()
    assert not np.array_equal(rounded, exact)
    # Weight properties are float32 NumPy arrays, holding the rounded values.
    np.testing.assert_array_equal(model.W_Q, rounded)
    # Back to float32: the computation widens, the rounding stays.
    model.to("float32")
    assert model.cfg.dtype == "float32"
    np.testing.assert_array_equal(model.W_Q, rounded)
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        HookedEncoder.from_pretrained(checkpoint.path, dtype="int8")


def test_a_pickled_half_model_stays_half(checkpoint):
    model = HookedEncoder.from_pretrained(checkpoint.path, dtype="float16")
    copied = pickle.loads(pickle.dumps(model))
    assert copied.cfg.dtype == "float16"
    tokens, _, _ = checkpoint.batch(seed=6)
    np.testing.assert_array_equal(copied(tokens), model(tokens))
