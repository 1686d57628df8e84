"""The CUDA build on an NVIDIA GPU, against Hugging Face on the same GPU and against our own CPU
path. These run only where the package was built with the ``cuda`` feature and torch sees a
GPU (``scripts/gpu_check.sh``); elsewhere they are skipped, and ``test_cuda_on_a_cpu_build``
checks the CPU build's side of the contract."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import hooked_encoder
from conftest import ATOL, EPSILON, RTOL, assert_half_parity
from hooked_encoder import HookedEncoder

on_gpu = pytest.mark.skipif(
    not (hooked_encoder.cuda_available() and torch.cuda.is_available()),
    reason="needs a CUDA build of hooked_encoder and an NVIDIA GPU",
)


@pytest.fixture(autouse=True)
def _no_tf32():
    # Parity with the CPU path and with HF in float32: TF32 matmuls would lose ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_cuda_on_a_cpu_build(checkpoint):
    if hooked_encoder.cuda_available():
        pytest.skip("this is a CUDA build")
    with pytest.raises(ValueError, match="CPU-only.*--features cuda"):
        HookedEncoder.from_pretrained(checkpoint.path, device="cuda")
    model = HookedEncoder.from_pretrained(checkpoint.path)
    with pytest.raises(ValueError, match="CPU-only"):
        model.cuda()
    assert model.cfg.device == "cpu"


@pytest.fixture(scope="module")
def gpu_model(checkpoint):
    return HookedEncoder.from_pretrained(checkpoint.path, device="cuda")


@on_gpu
def test_logits_match_hf_on_the_same_gpu(checkpoint, gpu_model):
    tokens, types, mask = checkpoint.batch(seed=5)
    hf = checkpoint.hf.to("cuda")
    try:
        with torch.no_grad():
            expected = hf(
                torch.tensor(tokens, device="cuda"),
                token_type_ids=torch.tensor(types, device="cuda"),
                attention_mask=torch.tensor(mask, device="cuda"),
            ).prediction_logits
    finally:
        checkpoint.hf.to("cpu")
    ours = gpu_model(
        torch.tensor(tokens, device="cuda"),
        token_type_ids=torch.tensor(types, device="cuda"),
        one_zero_attention_mask=torch.tensor(mask, device="cuda"),
    )
    assert ours.is_cuda and ours.dtype == torch.float32
    # Masked positions' logits are compared too: they are defined in both.
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


@on_gpu
def test_every_cached_activation_stays_on_the_gpu_and_matches_the_cpu(checkpoint, gpu_model):
    tokens, types, mask = checkpoint.batch(seed=6)
    cpu_model = HookedEncoder.from_pretrained(checkpoint.path)
    _, cpu_cache = cpu_model.run_with_cache(
        tokens, token_type_ids=types, one_zero_attention_mask=mask
    )
    gpu_tokens = torch.tensor(tokens, device="cuda")
    _, gpu_cache = gpu_model.run_with_cache(
        gpu_tokens,
        token_type_ids=torch.tensor(types, device="cuda"),
        one_zero_attention_mask=torch.tensor(mask, device="cuda"),
    )
    assert sorted(gpu_cache.keys()) == sorted(cpu_cache.keys())
    for name in cpu_cache:
        value = gpu_cache[name]
        assert value.is_cuda, name
        expected = torch.from_numpy(np.asarray(cpu_cache[name])).to("cuda")
        torch.testing.assert_close(value, expected, atol=ATOL, rtol=1e-5, msg=name)


@on_gpu
def test_numpy_results_from_a_gpu_model(checkpoint, gpu_model):
    tokens, types, mask = checkpoint.batch(seed=7)
    cpu_model = HookedEncoder.from_pretrained(checkpoint.path)
    ours = gpu_model(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    assert isinstance(ours, np.ndarray)
    expected = cpu_model(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=1e-5)


@on_gpu
def test_python_hooks_get_and_return_cuda_tensors(checkpoint, gpu_model):
    tokens, _, mask = checkpoint.batch(seed=8)
    seen = []

    def ablate_head_0(pattern, hook):
        seen.append((pattern.device.type, tuple(pattern.shape)))
        pattern = pattern.clone()
        pattern[:, 0] = 0.0
        return pattern

    hooks = [("blocks.0.attn.hook_pattern", ablate_head_0)]
    gpu = gpu_model.run_with_hooks(
        torch.tensor(tokens, device="cuda"),
        one_zero_attention_mask=torch.tensor(mask),
        fwd_hooks=hooks,
    )
    assert seen and seen[0][0] == "cuda"
    cpu_model = HookedEncoder.from_pretrained(checkpoint.path)
    cpu = cpu_model.run_with_hooks(
        torch.tensor(tokens), one_zero_attention_mask=torch.tensor(mask), fwd_hooks=hooks
    )
    plain = cpu_model(torch.tensor(tokens), one_zero_attention_mask=torch.tensor(mask))
    assert not torch.allclose(cpu, plain, atol=1e-3)  # the edit mattered
    torch.testing.assert_close(gpu.cpu(), cpu, atol=ATOL, rtol=1e-5)


@on_gpu
def test_moving_a_model_between_devices(checkpoint):
    tokens, _, mask = checkpoint.batch(seed=9)
    model = HookedEncoder.from_pretrained(checkpoint.path)
    on_cpu = model(tokens, one_zero_attention_mask=mask)
    model.cuda()
    assert model.cfg.device == "cuda:0"
    np.testing.assert_allclose(model(tokens, one_zero_attention_mask=mask), on_cpu, atol=ATOL)
    model.to("cpu")
    np.testing.assert_array_equal(model(tokens, one_zero_attention_mask=mask), on_cpu)


@on_gpu
@pytest.mark.parametrize("dtype", sorted(EPSILON))
def test_half_precision_matches_hf_in_the_same_dtype_on_the_gpu(checkpoint, dtype):
    tokens, types, mask = checkpoint.batch(seed=10)
    torch_dtype = getattr(torch, dtype)
    model = HookedEncoder.from_pretrained(checkpoint.path, device="cuda", dtype=dtype)
    as_cuda = lambda a: torch.tensor(a, device="cuda")  # noqa: E731
    ours = model(
        as_cuda(tokens), token_type_ids=as_cuda(types), one_zero_attention_mask=as_cuda(mask)
    )
    assert ours.is_cuda and ours.dtype == torch_dtype
    _, cache = model.run_with_cache(as_cuda(tokens), one_zero_attention_mask=as_cuda(mask))
    assert {(v.device.type, v.dtype) for v in cache.values()} == {("cuda", torch_dtype)}
    hf = copy.deepcopy(checkpoint.hf).to("cuda", torch_dtype)
    with torch.no_grad():
        hf_half = hf(
            as_cuda(tokens), token_type_ids=as_cuda(types), attention_mask=as_cuda(mask)
        ).prediction_logits
    hf32 = checkpoint.hf_logits(tokens, types, mask)
    assert_half_parity(ours.float().cpu().numpy(), hf_half.float().cpu().numpy(), hf32, dtype)


@on_gpu
def test_repeated_bert_sized_passes_finish():
    """A bert-sized vocabulary, unembedded and run to logits repeatedly: the pattern that hung
    on an H200 when every long pass ran on a fresh helper thread (see the CUDA notes). A hang
    here shows as the test never finishing."""
    model = HookedEncoder(
        {
            "d_model": 768,
            "d_head": 64,
            "n_layers": 2,
            "n_ctx": 512,
            "d_vocab": 28996,
            "seed": 0,
            "device": "cuda",
        }
    )
    x = torch.randn(1, 16, 768, device="cuda")
    tokens = torch.randint(0, 28996, (32, 128), device="cuda")
    for _ in range(3):
        assert model.unembed(x).shape == (1, 16, 28996)
        assert model(tokens).shape == (32, 128, 28996)
    torch.cuda.synchronize()


@on_gpu
def test_gradients_on_the_gpu_match_the_cpu(checkpoint, gpu_model):
    """The backward pass on a CUDA model (Candle's ops on the GPU): every hook point's gradient
    equals the CPU's, through a torch metric on the GPU logits, a backward hook, a forward edit
    that torch differentiates, and padding; also from a NumPy grad_output."""
    tokens, types, mask = checkpoint.batch(seed=11)
    cpu_model = HookedEncoder.from_pretrained(checkpoint.path)
    position, good, bad = 1, 5, 7

    def metric(logits):
        return (logits[:, position, good] - logits[:, position, bad]).sum()

    def ablate_head_0(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = 0.0
        return pattern

    def halve_head_1(grad, hook):
        grad = grad.clone()
        grad[:, :, 1] *= 0.5
        return grad

    def run(model, device):
        as_device = lambda a: torch.tensor(a, device=device)  # noqa: E731
        with model.hooks(
            fwd_hooks=[("blocks.0.attn.hook_pattern", ablate_head_0)],
            bwd_hooks=[("blocks.1.attn.hook_z", halve_head_1)],
        ):
            _, cache = model.run_with_cache(
                as_device(tokens),
                token_type_ids=as_device(types),
                one_zero_attention_mask=as_device(mask),
                incl_bwd=True,
                metric=metric,
            )
        return cache

    cpu, gpu = run(cpu_model, "cpu"), run(gpu_model, "cuda")
    grads = [name for name in cpu if name.endswith("_grad")]
    assert grads and sorted(gpu.keys()) == sorted(cpu.keys())
    for name in grads:
        assert gpu[name].is_cuda, name
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], atol=1e-5, rtol=1e-4, msg=name)
    grad_output = (
        np.random.default_rng(0)
        .standard_normal((*tokens.shape, checkpoint.config.vocab_size))
        .astype(np.float32)
    )
    from_numpy = gpu_model.grad(tokens, grad_output=grad_output, one_zero_attention_mask=mask)
    expected = cpu_model.grad(tokens, grad_output=grad_output, one_zero_attention_mask=mask)
    for name, value in expected.items():
        np.testing.assert_allclose(from_numpy[name], value, atol=1e-5, rtol=1e-4, err_msg=name)
