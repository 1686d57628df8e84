"""``HOOKED_ENCODER_MAX_SIMD`` caps the hand-written CPU kernels: every level this CPU has
matches Hugging Face, so the AVX2 kernels (and the portable ones non-x86 CPUs run) are checked
end to end on an AVX-512 machine too, and a value that names no level fails the import."""

from __future__ import annotations

import numpy as np
import pytest

import hooked_encoder
from conftest import ATOL, RTOL, make_checkpoint, run_fresh_interpreter

LEVELS = ["portable", "avx2", "avx512"]  # narrowest first

LOGITS_SCRIPT = """
import json, sys
import numpy as np
import hooked_encoder
from hooked_encoder import HookedEncoder

path, inputs, out = sys.argv[1:]
given = np.load(inputs)
model = HookedEncoder.from_pretrained(path)
logits = model(
    given["tokens"], token_type_ids=given["types"], one_zero_attention_mask=given["mask"]
)
np.save(out, np.asarray(logits))
print(json.dumps({"kernels": hooked_encoder.cpu_kernels()}))
"""


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bert_wide_simd"), "wide", seed=5)


@pytest.mark.parametrize("cap", LEVELS)
def test_each_kernel_level_matches_hugging_face(cap, wide_checkpoint, tmp_path):
    # 14 x 20 = 280 rows: above the 256 from which the AVX2 matmul copies its inputs in blocks.
    tokens, types, mask = wide_checkpoint.batch(seed=3, batch=14, pos=20)
    inputs, out = tmp_path / "inputs.npz", tmp_path / "logits.npy"
    np.savez(inputs, tokens=tokens, types=types, mask=mask)
    report = run_fresh_interpreter(
        LOGITS_SCRIPT,
        {"HOOKED_ENCODER_MAX_SIMD": cap},
        str(wide_checkpoint.path),
        str(inputs),
        str(out),
    )
    # The narrower of the cap and what this process (uncapped unless the caller capped it)
    # runs: the widest this CPU has.
    widest_here = hooked_encoder.cpu_kernels()
    assert report["kernels"] == min(cap, widest_here, key=LEVELS.index)
    np.testing.assert_allclose(
        np.load(out), wide_checkpoint.hf_logits(tokens, types, mask), atol=ATOL, rtol=RTOL
    )


UNKNOWN_LEVEL_SCRIPT = """
import json
try:
    import hooked_encoder
except ValueError as error:
    print(json.dumps({"error": str(error)}))
else:
    print(json.dumps({"kernels": hooked_encoder.cpu_kernels()}))
"""


def test_a_cap_that_names_no_level_fails_the_import_and_says_which_values_exist():
    report = run_fresh_interpreter(UNKNOWN_LEVEL_SCRIPT, {"HOOKED_ENCODER_MAX_SIMD": "avx3"})
    assert "HOOKED_ENCODER_MAX_SIMD" in report["error"] and "avx3" in report["error"]
    assert all(level in report["error"] for level in LEVELS)
    # Unset or empty: no cap, and spelling is forgiving.
    assert run_fresh_interpreter(UNKNOWN_LEVEL_SCRIPT, {"HOOKED_ENCODER_MAX_SIMD": ""}) == {
        "kernels": hooked_encoder.cpu_kernels()
    }
    assert run_fresh_interpreter(
        UNKNOWN_LEVEL_SCRIPT, {"HOOKED_ENCODER_MAX_SIMD": " Portable "}
    ) == {"kernels": "portable"}


def test_the_level_is_fixed_at_import():
    script = """
import json, os
import hooked_encoder
os.environ["HOOKED_ENCODER_MAX_SIMD"] = "portable"
print(json.dumps({"kernels": hooked_encoder.cpu_kernels()}))
"""
    # The forward has not run yet: the level was chosen at import, not at its first use.
    assert run_fresh_interpreter(script, {}, clear=("HOOKED_ENCODER_MAX_SIMD",)) == {
        "kernels": hooked_encoder.cpu_kernels()
    }
