"""extract(): results equal run_with_cache on the same inputs with padding removed; pooling by
hand; shards on disk, atomic and resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hooked_encoder import HookedEncoder, load_extraction
from hooked_encoder.extract import select_hooks

TEXTS = [
    "the cat sat .",
    "a big red dog ran on the mat .",
    "it",
    "the mat was red and big .",
    "dog",
    "the cat and the dog ran .",
]


@pytest.fixture(scope="module")
def text_model(text_checkpoint):
    return HookedEncoder.from_pretrained(text_checkpoint.path)


def reference(model, text, hook):
    """The activation of one text alone (no padding at all)."""
    _, cache = model.run_with_cache(text, names_filter=hook)
    return cache[hook][0]


def test_per_token_results_equal_single_runs(text_model):
    hooks = "blocks.*.hook_resid_post"
    result = text_model.extract(TEXTS, hooks, batch_size=4, shard_rows=4)
    assert result.hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert len(result) == len(TEXTS)
    for i, text in enumerate(TEXTS):
        for hook in result.hooks:
            np.testing.assert_allclose(
                result.row(hook, i), reference(text_model, text, hook), atol=2e-5
            )
    lengths = np.diff(result.offsets("blocks.1.hook_resid_post"))
    assert lengths.tolist() == [len(text_model.to_str_tokens(t)) for t in TEXTS]


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_pooling_is_recomputed_by_hand(text_model, pooling):
    hook = "blocks.1.mlp.hook_post"
    pooled = text_model.extract(TEXTS, [hook], batch_size=3, pooling=pooling)
    assert pooled[hook].shape == (len(TEXTS), text_model.cfg.d_mlp)
    for i, text in enumerate(TEXTS):
        tokens = reference(text_model, text, hook)
        expected = {"mean": tokens.mean(0), "cls": tokens[0], "max": tokens.max(0)}[pooling]
        np.testing.assert_allclose(pooled.row(hook, i), expected, atol=2e-5)


def test_token_ids_and_pairs_are_inputs_too(text_model):
    ids = [[2, 5, 6, 3], [2, 7, 3]]
    result = text_model.extract(ids, "hook_full_embed")
    np.testing.assert_allclose(
        result.row("hook_full_embed", 1),
        reference(text_model, np.array([ids[1]]), "hook_full_embed"),
        atol=1e-6,
    )
    pairs = text_model.extract([("the cat", "it ran")], "embed.hook_token_type_embed")
    row = pairs.row("embed.hook_token_type_embed", 0)
    w = text_model.embed.token_type_embed.W_token_type
    np.testing.assert_array_equal(row[0], w[0])  # [CLS] of the first sentence
    np.testing.assert_array_equal(row[-1], w[1])  # [SEP] closing the second


def test_on_disk_shards_resume_and_read_back(text_model, tmp_path):
    hooks = ["blocks.0.hook_attn_out", "hook_full_embed"]
    whole = tmp_path / "whole"
    text_model.extract(TEXTS, hooks, batch_size=2, shard_rows=2, out=whole)
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [
        [0, 2],
        [2, 4],
        [4, 6],
    ]
    loaded = load_extraction(whole)
    in_memory = text_model.extract(TEXTS, hooks, batch_size=2, shard_rows=2)
    for hook in hooks:
        np.testing.assert_array_equal(loaded[hook], in_memory[hook])
        np.testing.assert_array_equal(loaded.offsets(hook), in_memory.offsets(hook))

    # Interrupt a run after its first shard, then run again: it resumes and the shards are
    # byte-identical to the uninterrupted run's.
    resumed = tmp_path / "resumed"

    def texts_then_crash():
        yield from TEXTS[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        text_model.extract(texts_then_crash(), hooks, batch_size=2, shard_rows=2, out=resumed)
    assert not json.loads((resumed / "manifest.json").read_text())["complete"]
    assert sorted(p.name for p in resumed.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    text_model.extract(TEXTS, hooks, batch_size=2, shard_rows=2, out=resumed)
    for shard in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (resumed / shard).read_bytes() == (whole / shard).read_bytes()
    with pytest.raises(ValueError, match="other arguments"):
        text_model.extract(TEXTS, hooks, batch_size=3, shard_rows=2, out=resumed)
    with pytest.raises(KeyError, match="were not extracted"):
        load_extraction(whole, ["blocks.1.hook_mlp_out"])


def test_hook_selection_errors(text_model):
    assert select_hooks(text_model, lambda n: n == "hook_full_embed") == ["hook_full_embed"]
    with pytest.raises(KeyError, match="matches no hook point"):
        text_model.extract(TEXTS, "blocks.*.hook_nope")
    with pytest.raises(ValueError, match="no position axis"):
        text_model.extract(TEXTS, "blocks.0.attn.hook_pattern")
    with pytest.raises(ValueError, match="pooling must be"):
        text_model.extract(TEXTS, "hook_full_embed", pooling="sum")


def test_progress_bar_reports_texts_and_tokens(text_model, capsys):
    text_model.extract(TEXTS, "hook_full_embed", progress=True)
    err = capsys.readouterr().err
    assert "6 texts" in err and "tokens/s" in err
    text_model.extract(TEXTS, "hook_full_embed", progress=False)
    assert capsys.readouterr().err == ""


MEMORY_SCRIPT = """
import sys
from hooked_encoder import HookedEncoder
model = HookedEncoder.from_pretrained(sys.argv[1])
n = int(sys.argv[2])
texts = ("the cat sat on the mat and it was tired ." for _ in range(n))
model.extract(texts, "blocks.*.mlp.hook_post", batch_size=64, shard_rows=512, out=sys.argv[3],
              progress=False)
# VmHWM, not ru_maxrss: on Linux the latter starts from the parent's peak at fork time.
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]) // 1024)
"""


def test_memory_is_bounded_by_the_batch_not_the_corpus(text_checkpoint, tmp_path):
    """Streaming 16x more texts to disk must not raise the peak RSS by anything like the 16x
    more data written (about 60 MB of activations at 16 000 texts)."""
    import subprocess
    import sys

    def peak_mib(n: int) -> int:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                MEMORY_SCRIPT,
                str(text_checkpoint.path),
                str(n),
                str(tmp_path / f"out{n}"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return int(result.stdout.strip())

    small, large = peak_mib(1000), peak_mib(16000)
    written = sum(p.stat().st_size for p in (tmp_path / "out16000").iterdir()) / 2**20
    assert written > 50
    assert large - small < 20, (small, large, written)


def test_reader_is_lazy_per_hook_and_gives_torch_too(text_model, tmp_path):
    import torch

    hooks = ["hook_full_embed", "blocks.1.hook_resid_post"]
    out = text_model.extract(TEXTS, hooks, shard_rows=4, out=tmp_path / "x")
    reads = []
    lazy = load_extraction(out)
    original = lazy._load
    lazy._load = lambda hook: reads.append(hook) or original(hook)
    first = lazy.row("blocks.1.hook_resid_post", 5)
    assert reads == ["blocks.1.hook_resid_post"]  # the other hook was never read
    np.testing.assert_allclose(
        first, reference(text_model, TEXTS[5], "blocks.1.hook_resid_post"), atol=2e-5
    )
    as_torch = load_extraction(out, ["hook_full_embed"], framework="torch")
    assert isinstance(as_torch["hook_full_embed"], torch.Tensor)
    assert as_torch.hooks == ["hook_full_embed"] and len(as_torch) == len(TEXTS)
