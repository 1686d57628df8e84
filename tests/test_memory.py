"""The extension's allocator keeps freed activations for reuse (see the binding's memory.rs)."""

from __future__ import annotations

import sys

import pytest

from conftest import run_fresh_interpreter

# Runs in a fresh interpreter: mimalloc reads its environment when the extension loads.
SCRIPT = r"""
import json, resource, sys
import numpy as np
from hooked_encoder import HookedEncoder, _core

report = {"purge_delay_ms": _core.allocator_purge_delay_ms()}
if "--faults" in sys.argv:
    model = HookedEncoder(
        {"d_model": 512, "d_head": 64, "n_layers": 2, "d_mlp": 2048, "n_ctx": 128,
         "d_vocab": 100, "seed": 0}
    )
    tokens = np.random.default_rng(0).integers(0, 100, size=(32, 128))
    model(tokens, return_type=None)  # the first call takes its memory from the kernel
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model(tokens, return_type=None)
    report["faults_per_call"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps(report))
"""


def run_fresh(env_changes: dict[str, str], *args: str) -> dict:
    return run_fresh_interpreter(SCRIPT, env_changes, *args, clear=("MIMALLOC_",))


def test_freed_memory_is_kept_ten_seconds_unless_the_user_set_mimallocs_delay():
    assert run_fresh({})["purge_delay_ms"] == 10_000
    # The user's MIMALLOC_PURGE_DELAY wins; reading it back also shows that the option we set
    # is the one mimalloc parses that variable into.
    assert run_fresh({"MIMALLOC_PURGE_DELAY": "123"})["purge_delay_ms"] == 123
    assert run_fresh({"MIMALLOC_PURGE_DELAY": "0"})["purge_delay_ms"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
def test_repeated_calls_reuse_their_activations_memory_instead_of_faulting_it_in_again():
    # Each call allocates well over 100 MiB of activations (the MLP's hidden layer alone is
    # 32 MiB a layer): thousands of page faults if it came from the kernel again (25 000+ pages
    # of 4 KiB; fewer faults where transparent huge pages back it).
    kept = run_fresh({}, "--faults")["faults_per_call"]
    assert kept < 2_000, kept
    # The same calls with memory given back at once do fault it in again: the measure can fail.
    returned = run_fresh({"MIMALLOC_PURGE_DELAY": "0"}, "--faults")["faults_per_call"]
    assert returned > 5 * max(kept, 100), (kept, returned)
