"""The CUDA build on an NVIDIA GPU, against Hugging Face on the same GPU and against our own CPU
path. These run only where the package was built with the ``cuda`` feature and torch sees a
GPU (``scripts/gpu_check.sh``); elsewhere they are skipped, and ``test_cuda_on_a_cpu_build``
checks the CPU build's side of the contract."""

from __future__ import annotations

import copy
import ctypes
import threading

import numpy as np
import pytest
import torch

import hooked_encoder
from conftest import ATOL, EPSILON, RTOL, assert_half_parity, make_modernbert_checkpoint
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


@pytest.fixture(scope="module")
def wide_gpu_model():
    """Two bert-base-wide blocks on the GPU: products large enough for cuBLASLt's workspace."""
    return HookedEncoder(
        {
            "d_model": 768,
            "d_head": 64,
            "n_layers": 2,
            "n_ctx": 512,
            "d_vocab": 1000,
            "seed": 0,
            "device": "cuda",
        }
    )


@on_gpu
def test_forwards_from_several_threads_at_once_match_one_thread(wide_gpu_model):
    """Candle runs each thread's kernels on that thread's own stream, so two threads' matmuls
    may overlap on the GPU: each thread must have its own cuBLASLt workspace."""
    inputs = [
        torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(i))
        for i in range(4)
    ]
    expected = [wide_gpu_model(tokens.cuda()) for tokens in inputs]
    results = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def work(i):
        start.wait()
        for _ in range(5):
            results[i] = wide_gpu_model(inputs[i].cuda())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.cuda.synchronize()
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def gpu_pool_bytes_in_use() -> int:
    """Bytes allocated from GPU 0's default memory pool, where Candle's stream-ordered
    allocations come from (torch's caching allocator does not use it), read from the driver."""
    driver = ctypes.CDLL("libcuda.so.1")
    device, pool, used = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    assert driver.cuDeviceGet(ctypes.byref(device), 0) == 0
    assert driver.cuDeviceGetDefaultMemPool(ctypes.byref(pool), device) == 0
    used_mem_current = 7  # CU_MEMPOOL_ATTR_USED_MEM_CURRENT
    assert driver.cuMemPoolGetAttribute(pool, used_mem_current, ctypes.byref(used)) == 0
    return used.value


@on_gpu
def test_a_threads_gpu_workspace_is_freed_when_the_thread_ends(wide_gpu_model):
    """Each thread that runs a GPU model gets a 4 MiB cuBLASLt workspace: eight threads that
    ran a forward and ended leave the memory in use where it was (kept, they would add 32 MiB)."""
    tokens = torch.randint(0, 1000, (8, 128), device="cuda")

    def forward():
        wide_gpu_model(tokens, return_type=None)
        torch.cuda.synchronize()

    forward()
    before = gpu_pool_bytes_in_use()
    for _ in range(8):
        thread = threading.Thread(target=forward)
        thread.start()
        thread.join()
    torch.cuda.synchronize()
    grown = (gpu_pool_bytes_in_use() - before) / 2**20
    assert grown < 16, f"eight ended threads kept {grown:.0f} MiB of GPU memory"


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


def assert_gpu_attention_matches_cpu(cpu_model, tokens, mask, fwd_hooks=()):
    """The GPU attention path (cuBLAS on q, k and v where they lie, one mask-and-softmax
    kernel) against the CPU kernels on the same weights: the unhooked forward, which reads the
    fused projection, and a cache of every hook, which hooks q, k, v, the scores and the
    pattern; at one batch row (one cuBLAS call per layer and matmul) and at more rows than heads
    (one call per head)."""
    gpu_model = copy.deepcopy(cpu_model).cuda()
    assert cpu_model.cfg.n_heads < len(tokens)
    for rows in (slice(0, 1), slice(None)):
        args = (tokens[rows],)
        kwargs = {"one_zero_attention_mask": mask[rows]} if mask is not None else {}
        with cpu_model.hooks(fwd_hooks=list(fwd_hooks)):
            expected, expected_cache = cpu_model.run_with_cache(*args, **kwargs)
        with gpu_model.hooks(fwd_hooks=list(fwd_hooks)):
            plain = gpu_model(*args, **kwargs)
            ours, cache = gpu_model.run_with_cache(*args, **kwargs)
        np.testing.assert_allclose(plain, expected, atol=ATOL, rtol=1e-5)
        np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=1e-5)
        assert sorted(cache.keys()) == sorted(expected_cache.keys())
        for name in expected_cache:
            np.testing.assert_allclose(
                np.asarray(cache[name]), expected_cache[name], atol=ATOL, rtol=1e-5, err_msg=name
            )


def padded_batch(checkpoint, rows: int = 9):
    tokens, _, mask = checkpoint.batch(seed=12, batch=rows, pos=9)
    return tokens, mask


@on_gpu
def test_gpu_attention_matches_the_cpu_in_every_family(family_checkpoint):
    """RoBERTa, XLM-R, DistilBERT, MPNet (a relative position bias added to the scores), and
    ELECTRA, with padding."""
    tokens, mask = padded_batch(family_checkpoint)
    model = HookedEncoder.from_pretrained(family_checkpoint.path, output_format="numpy")
    assert_gpu_attention_matches_cpu(model, tokens, mask)


@on_gpu
def test_gpu_attention_matches_the_cpu_with_rotary_positions_and_local_windows(tmp_path):
    """ModernBERT: q and k rotated (so hooked apart from the projection) and local layers whose
    window is narrower than the sequence."""
    checkpoint = make_modernbert_checkpoint(tmp_path, seed=21)
    tokens, mask = padded_batch(checkpoint)
    model = HookedEncoder.from_pretrained(checkpoint.path, output_format="numpy")
    assert_gpu_attention_matches_cpu(model, tokens, mask)


@on_gpu
def test_gpu_attention_with_a_causal_mask_and_edited_scores(checkpoint):
    """A hook on the scores makes the GPU mask them first and take the softmax of what the hook
    returns: here key 0 masked for every query, so the first query of a causal model sees no
    key at all (its pattern row becomes zeros, TransformerLens's convention) and a NaN score
    empties its row too."""

    def mask_key_0(scores, hook):
        scores = scores.copy()
        scores[..., 0] = -np.inf
        scores[0, 0, 2, 1] = np.nan
        return scores

    hooks = [(f"blocks.{layer}.attn.hook_attn_scores", mask_key_0) for layer in range(2)]
    causal = HookedEncoder(
        {
            "d_model": 16,
            "d_head": 4,
            "n_layers": 2,
            "n_ctx": 12,
            "d_vocab": 30,
            "seed": 0,
            "attention_dir": "causal",
        },
        output_format="numpy",
    )
    tokens = np.random.default_rng(3).integers(0, 30, size=(6, 8))
    assert_gpu_attention_matches_cpu(causal, tokens, None, fwd_hooks=hooks)
    with causal.hooks(fwd_hooks=hooks):
        _, cache = causal.run_with_cache(tokens)
    assert np.all(cache["pattern", 0][:, :, 0] == 0)  # the first query attends to nothing
    assert np.all(cache["pattern", 0][0, 0, 2] == 0)  # nor does the query with a NaN score
    bert = HookedEncoder.from_pretrained(checkpoint.path, output_format="numpy")
    tokens, mask = padded_batch(checkpoint)
    # Also a LayerNorm whose scale a hook replaces (the GPU then divides by the new one).
    double_scale = ("blocks.0.ln1.hook_scale", lambda scale, hook: scale * 2)
    assert_gpu_attention_matches_cpu(bert, tokens, mask, fwd_hooks=[*hooks, double_scale])


@on_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_hook_replacements_go_back_device_to_device(checkpoint, dtype):
    """A hook that returns a torch CUDA tensor hands it back through DLPack, device to device
    (in the model's dtype, or float32, contiguous or not); the result equals the same edit made
    through the host (NumPy hooks)."""
    tokens, _, mask = checkpoint.batch(seed=13)
    torch_model = HookedEncoder.from_pretrained(checkpoint.path, device="cuda", dtype=dtype)
    numpy_model = HookedEncoder.from_pretrained(
        checkpoint.path, device="cuda", dtype=dtype, output_format="numpy"
    )
    returned = []

    def halve_head_0(pattern, hook):
        edited = pattern.clone()
        edited[:, 0] *= 0.5
        if torch.is_tensor(edited):
            # A non-contiguous view, and float32 for a half-precision model: both accepted.
            edited = edited.float().transpose(-1, -2).contiguous().transpose(-1, -2)
            returned.append((edited.device.type, edited.is_contiguous()))
        return edited

    def numpy_halve_head_0(pattern, hook):
        pattern = pattern.copy()
        pattern[:, 0] *= 0.5
        return pattern

    hooks = [("blocks.0.attn.hook_pattern", halve_head_0)]
    gpu = torch_model.run_with_hooks(
        torch.tensor(tokens, device="cuda"),
        one_zero_attention_mask=torch.tensor(mask, device="cuda"),
        fwd_hooks=hooks,
    )
    assert returned == [("cuda", False)]
    host = numpy_model.run_with_hooks(
        tokens,
        one_zero_attention_mask=mask,
        fwd_hooks=[("blocks.0.attn.hook_pattern", numpy_halve_head_0)],
    )
    plain = numpy_model(tokens, one_zero_attention_mask=mask)
    assert not np.allclose(host, plain, atol=1e-3)  # the edit mattered
    np.testing.assert_array_equal(gpu.float().cpu().numpy(), host)
    with pytest.raises(ValueError, match="returned shape"):
        torch_model.run_with_hooks(
            torch.tensor(tokens, device="cuda"),
            fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p[:, :1])],
        )
