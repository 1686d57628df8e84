"""The GIL is released while the Rust forward pass runs."""

from __future__ import annotations

import threading
import time

import numpy as np

from hooked_encoder import HookedEncoder


def test_other_python_threads_run_during_a_forward_pass():
    model = HookedEncoder(
        {"d_model": 256, "d_head": 64, "n_layers": 4, "n_ctx": 128, "d_vocab": 100, "seed": 0}
    )
    tokens = np.random.default_rng(0).integers(0, 100, size=(16, 128))
    started = time.perf_counter()
    model(tokens)
    single = time.perf_counter() - started

    ticks = 0
    done = threading.Event()

    def run():
        for _ in range(3):
            model(tokens)
        done.set()

    worker = threading.Thread(target=run)
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    # Holding the GIL for the whole pass would allow at most a few ticks between passes.
    assert ticks > 0.5 * (3 * single / 0.001) / 10, (ticks, single)


def test_the_thread_count_can_be_set_and_does_not_change_results():
    import pytest

    import hooked_encoder

    model = HookedEncoder(
        {"d_model": 64, "d_head": 16, "n_layers": 2, "n_ctx": 32, "d_vocab": 50, "seed": 0}
    )
    tokens = np.random.default_rng(1).integers(0, 50, size=(4, 32))
    before = hooked_encoder.get_num_threads()
    try:
        hooked_encoder.set_num_threads(1)
        assert hooked_encoder.get_num_threads() == 1
        one = model(tokens)
        hooked_encoder.set_num_threads(3)
        assert hooked_encoder.get_num_threads() == 3
        np.testing.assert_allclose(model(tokens), one, atol=1e-6)
        with pytest.raises(ValueError, match="at least 1"):
            hooked_encoder.set_num_threads(0)
    finally:
        hooked_encoder.set_num_threads(before)
