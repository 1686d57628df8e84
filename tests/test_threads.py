"""The GIL is released while the Rust forward pass runs."""

from __future__ import annotations

import threading
import time

import numpy as np

from conftest import run_fresh_interpreter
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


# Run in a fresh interpreter: the global pool is set up at import, from the environment.
POOL_AFFINITY_SCRIPT = """
import json, os, sys
import numpy as np
import hooked_encoder
from hooked_encoder import HookedEncoder

model = HookedEncoder(
    {"d_model": 64, "d_head": 16, "n_layers": 1, "n_ctx": 32, "d_vocab": 50, "seed": 0}
)
if len(sys.argv) > 1:
    hooked_encoder.set_num_threads(int(sys.argv[1]))
model(np.random.default_rng(0).integers(0, 50, size=(8, 32)))
pool = []
for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/comm") as f:
        name = f.read().strip()
    if name.startswith("hooked-pool-"):
        pool.append(sorted(os.sched_getaffinity(int(task))))
print(json.dumps(pool))
"""


def pool_affinities(env_changes: dict[str, str], *args: str) -> list[list[int]]:
    """Each pool thread's allowed CPUs, in a fresh interpreter with `env_changes` applied."""
    return run_fresh_interpreter(
        POOL_AFFINITY_SCRIPT, env_changes, *args, clear=("RAYON_NUM_THREADS",)
    )


def test_a_pool_with_one_thread_per_allowed_cpu_pins_each_thread_to_its_own_cpu():
    import os
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("thread pinning is Linux-only")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs at least two CPUs to tell pinned threads from free ones")
    n = str(len(allowed))
    # The pool started at import, and one from set_num_threads, each of one thread per CPU (the
    # import pool, of one thread more, is gone by then).
    assert sorted(pool_affinities({"RAYON_NUM_THREADS": n})) == [[cpu] for cpu in allowed]
    more = str(len(allowed) + 1)
    assert sorted(pool_affinities({"RAYON_NUM_THREADS": more}, n)) == [[cpu] for cpu in allowed]
    # One thread more than CPUs: the threads stay free to run anywhere.
    unpinned = pool_affinities({"RAYON_NUM_THREADS": more})
    assert len(unpinned) == len(allowed) + 1 and all(cpus == allowed for cpus in unpinned)
    # Opted out: nothing is pinned.
    opted_out = pool_affinities({"RAYON_NUM_THREADS": n, "HOOKED_ENCODER_PIN_THREADS": "0"})
    assert len(opted_out) == len(allowed) and all(cpus == allowed for cpus in opted_out)


FORK_SCRIPT = """
import hashlib, json, multiprocessing, sys
import numpy as np
from hooked_encoder import HookedEncoder

CONFIG = {"d_model": 64, "d_head": 16, "n_layers": 2, "n_ctx": 32, "d_vocab": 50, "seed": 0}
# 32 x 32 x 64 = 65536 floats: as large as Candle's elementwise ops (the embeddings' sum) must be
# to run on Candle's own thread pool, which used to stay behind in the parent as well.
TOKENS = np.arange(32 * 32).reshape(32, 32) % 50

def digest(logits):
    return hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest()

def child(queue):
    # Built and run in the child: loading packs weights on the pool, as a forward does.
    queue.put(digest(HookedEncoder(CONFIG)(TOKENS)))

if __name__ == "__main__":
    parent = HookedEncoder(CONFIG)
    expected = digest(parent(TOKENS))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(60)
    if process.exitcode is None:
        process.kill()
    got = queue.get(timeout=5) if process.exitcode == 0 else None
    print(json.dumps({
        "exitcode": process.exitcode,
        "equal": got == expected,
        "parent_still_works": digest(parent(TOKENS)) == expected,
    }))
"""


def test_a_process_forked_after_import_gets_a_pool_of_its_own():
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("fork is the Linux start method")
    # Before the pool was restarted in the child, the child's first model waited forever for
    # threads that had stayed in the parent; then, at this size, for Candle's own pool's.
    report = run_fresh_interpreter(FORK_SCRIPT, {})
    assert report == {"exitcode": 0, "equal": True, "parent_still_works": True}
