"""hooked_encoder.patching against TransformerLens 3.x itself: ``transformer_lens.patching``'s
functions run on TransformerLens's ``HookedEncoder`` holding the same tiny BERT weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from hooked_encoder import HookedEncoder, patching

tl_patching = pytest.importorskip("transformer_lens.patching")

# Loading TransformerLens's HookedEncoder offline from a checkpoint directory is the bench's
# job too (bench/compare.py's load_tl_model): one loader for both.
_spec = importlib.util.spec_from_file_location(
    "bench_compare", Path(__file__).resolve().parents[1] / "bench" / "compare.py"
)
bench_compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_compare)

SWEEPS = [
    "get_act_patch_resid_pre",
    "get_act_patch_resid_mid",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_block_every",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ck = make_checkpoint(tmp_path_factory.mktemp("tl_patching"), "small", seed=8)
    ours = HookedEncoder.from_pretrained(ck.path)
    theirs, _ = bench_compare.load_tl_model(ck.path)
    clean, _, _ = ck.batch(seed=1, batch=2, pos=5)
    corrupted, _, _ = ck.batch(seed=2, batch=2, pos=5)
    return ours, theirs, torch.tensor(clean), torch.tensor(corrupted)


def metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 9].mean()


@pytest.mark.parametrize("name", SWEEPS)
def test_each_sweep_equals_transformer_lens(models, name):
    ours_model, tl_model, clean, corrupted = models
    _, our_cache = ours_model.run_with_cache(clean)
    with torch.no_grad():
        _, tl_cache = tl_model.run_with_cache(clean)
        expected = getattr(tl_patching, name)(tl_model, corrupted, tl_cache, metric)
    ours = getattr(patching, name)(ours_model, corrupted, our_cache, metric)
    assert isinstance(ours, torch.Tensor) and ours.shape == expected.shape
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=0, atol=1e-5)
    assert expected.abs().max() > 1e-3  # the patches move the metric
