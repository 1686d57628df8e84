"""Long runs and concurrency: Ctrl-C, threads, pickling, leaks, absurd memory requests."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import time
import weakref
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

from hooked_encoder import HookedEncoder, HookedEncoderError, OutOfMemoryError

SMALL = {"d_model": 32, "d_head": 8, "n_layers": 2, "n_ctx": 16, "d_vocab": 40, "seed": 7}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test's duration. A process
    started in the background by a non-interactive shell (``make test &``, some CI runners)
    inherits SIGINT as ignored, and Python then leaves it ignored: Ctrl-C cannot reach such a
    process at all, and a test of what Ctrl-C does would fail there for that reason alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_a_long_forward_between_blocks_and_the_model_still_works(
    python_sigint_handler,
):
    cfg = {"d_model": 256, "d_head": 64, "n_layers": 24, "n_ctx": 256, "d_vocab": 50, "seed": 3}
    model = HookedEncoder(cfg)
    tokens = np.random.default_rng(0).integers(0, 50, size=(48, 256))
    started_blocks = []
    interrupt_at = 3

    def count_blocks_and_interrupt(x, hook):
        # Ctrl-C arrives while block `interrupt_at` is starting, from inside a Python hook on
        # the pass's worker thread: at a known point of the pass rather than after a wall-clock
        # delay, whatever the machine's speed or load.
        started_blocks.append(hook.layer())
        if hook.layer() == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)

    model.add_hook(lambda name: name.endswith("hook_resid_pre"), count_blocks_and_interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(tokens)
    # It stopped at the next block boundary: the waiting thread sees the signal within ~20 ms,
    # while a block takes ~0.1-0.3 s (longer on a loaded machine, which is why this counts
    # blocks rather than seconds). One more block is allowed for a thread that was slow to wake.
    assert started_blocks[: interrupt_at + 1] == list(range(interrupt_at + 1))
    assert len(started_blocks) <= interrupt_at + 2, started_blocks
    model.reset_hooks()
    # Nothing was left half-done: the model gives the same results as a fresh copy.
    small = tokens[:2, :8]
    np.testing.assert_array_equal(model(small), HookedEncoder(cfg)(small))


def test_one_model_used_from_many_threads_matches_serial_use():
    model = HookedEncoder(SMALL)
    rng = np.random.default_rng(1)
    inputs = [rng.integers(0, 40, size=(3, 16)) for _ in range(12)]

    def run(tokens):
        logits, cache = model.run_with_cache(tokens)
        return logits, cache["blocks.1.attn.hook_pattern"]

    serial = [run(t) for t in inputs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        threaded = list(pool.map(run, inputs))
    for (logits, pattern), (t_logits, t_pattern) in zip(serial, threaded, strict=True):
        np.testing.assert_allclose(t_logits, logits, atol=1e-6, rtol=0)
        np.testing.assert_allclose(t_pattern, pattern, atol=1e-6, rtol=0)


def _logits_in_worker(model: HookedEncoder, tokens: np.ndarray) -> np.ndarray:
    return model(tokens)


def test_a_pickled_model_rebuilds_with_the_same_weights_and_tokenizer(text_checkpoint):
    model = HookedEncoder.from_pretrained(text_checkpoint.path)
    clone = pickle.loads(pickle.dumps(model))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(clone.state_dict()[name], value, err_msg=name)
    text = ["the cat sat on the mat .", "a big red dog"]
    np.testing.assert_array_equal(clone(text), model(text))
    # Hooks stay with the sender (they are usually closures over its state).
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: x * 0)
    assert all(not p.fwd_hooks for p in pickle.loads(pickle.dumps(model)).hook_dict.values())
    model.reset_hooks()


def test_a_model_can_be_sent_to_worker_processes():
    model = HookedEncoder(SMALL)
    tokens = np.random.default_rng(2).integers(0, 40, size=(2, 10))
    # "spawn": a fresh interpreter, as process pools and distributed engines use.
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_logits_in_worker, [model, model], [tokens, tokens[:1]]))
    np.testing.assert_array_equal(results[0], model(tokens))
    np.testing.assert_array_equal(results[1], model(tokens[:1]))


def test_two_thousand_cached_runs_do_not_grow_memory():
    model = HookedEncoder(SMALL)
    tokens = np.random.default_rng(3).integers(0, 40, size=(2, 16))

    def runs(n):
        for _ in range(n):
            model.run_with_cache(tokens, names_filter=lambda name: not name.endswith("hook_scale"))
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: x)])

    runs(200)  # warm-up: allocator pools, caches
    gc.collect()
    before = _rss_mib()
    runs(2000)
    gc.collect()
    grown = _rss_mib() - before
    # Every run allocates ~100 KiB of activations; a leak of one run's worth would be ~200 MiB.
    assert grown < 20, f"RSS grew by {grown:.1f} MiB over 2000 runs"


def test_hook_functions_are_released_after_reset_hooks():
    model = HookedEncoder(SMALL)
    tokens = np.zeros((1, 4), dtype=np.int64)

    class Hook:
        def __call__(self, x, hook):
            return x

    permanent, temporary = Hook(), Hook()
    refs = [weakref.ref(permanent), weakref.ref(temporary)]
    model.add_hook("blocks.0.hook_resid_post", permanent)
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", temporary)])
    model(tokens)
    del permanent, temporary
    gc.collect()
    assert refs[0]() is not None  # still registered
    assert refs[1]() is None  # run_with_hooks removed its hook
    model.reset_hooks()
    gc.collect()
    assert refs[0]() is None


def test_a_batch_too_large_for_memory_fails_fast_with_the_size_needed():
    # 64 heads over 512 positions: a cache of every hook of a [4096, 512] batch needs ~0.5 TiB
    # for the attention scores and patterns alone.
    model = HookedEncoder(
        {"d_model": 64, "d_head": 1, "n_heads": 64, "n_layers": 1, "n_ctx": 512, "d_vocab": 20}
    )
    tokens = np.zeros((4096, 512), dtype=np.int64)
    started = time.perf_counter()
    with pytest.raises(
        OutOfMemoryError, match=r"\[4096, 512\] batch would need at least [\d.]+ GiB"
    ):
        model.run_with_cache(tokens)
    assert time.perf_counter() - started < 1.0
    assert issubclass(OutOfMemoryError, MemoryError)
    assert issubclass(OutOfMemoryError, HookedEncoderError)
    # The same call with one small hook fits, and a small batch of everything too.
    _, cache = model.run_with_cache(tokens[:8], names_filter="blocks.0.hook_resid_post")
    assert cache["blocks.0.hook_resid_post"].shape == (8, 512, 64)
    _, cache = model.run_with_cache(tokens[:2, :16])
    assert len(cache) == len(model.hook_dict) - 2  # all but the pooler and NSP head
