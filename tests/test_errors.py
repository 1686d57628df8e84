"""Bad input gets a clear Python exception that names the problem, and the model stays usable."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hooked_encoder import CheckpointError, HookedEncoder, HookedEncoderConfig

TOKENS = np.array([[1, 2, 3]])


@pytest.mark.parametrize(
    "tokens, message",
    [
        (np.array([[1, 50, 2]]), r"tokens\[0, 1\] = 50 is out of range \[0, 50\)"),
        (np.array([[1, -3, 2]]), r"tokens\[0, 1\] = -3"),
        (np.ones((1, 13), dtype=np.int64), "longer than the model's n_ctx"),
        (np.zeros((1, 0), dtype=np.int64), "at least one row and one position"),
        (np.ones((2, 2, 2), dtype=np.int64), r"must be \[batch, pos\]"),
    ],
)
def test_bad_token_ids_raise_value_error(model, tokens, message):
    with pytest.raises(ValueError, match=message):
        model(tokens)


def test_non_integer_tokens_raise_type_error(model):
    with pytest.raises(TypeError, match="must hold integers"):
        model(np.array([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="must hold integers"):
        model([["a", 1]])


def test_mask_and_token_type_shapes_and_values_are_checked(model):
    with pytest.raises(ValueError, match=r"one_zero_attention_mask has shape \[1, 2\]"):
        model(TOKENS, one_zero_attention_mask=np.array([[1, 1]]))
    with pytest.raises(ValueError, match=r"token_type_ids has shape \[2, 3\]"):
        model(TOKENS, token_type_ids=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"token_type_ids\[0, 2\] = 2 is out of range"):
        model(TOKENS, token_type_ids=np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r"one_zero_attention_mask\[0, 0\] = 3"):
        model(TOKENS, one_zero_attention_mask=np.array([[3, 1, 1]]))


def test_unknown_hook_names_raise_key_error_with_suggestions(model):
    with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: x)])
    with pytest.raises(KeyError, match="unknown hook point 'blocks.9.hook_resid_pre'"):
        model.add_hook("blocks.9.hook_resid_pre", lambda x, hook: x)
    with pytest.raises(ValueError, match="dir must be"):
        model.add_hook("hook_full_embed", lambda x, hook: x, dir="sideways")
    assert all(not p.fwd_hooks for p in model.hook_dict.values())


@pytest.mark.parametrize(
    "replacement, error, message",
    [
        (
            lambda x: x[:, :1],
            ValueError,
            r"returned shape \[2, 1, 16\], but the activation has shape \[2, 3, 16\]",
        ),
        (lambda x: x.astype(np.float64), TypeError, "float64 array; it must be float32"),
        (lambda x: x.tolist(), TypeError, "returned list"),
        (lambda x: 3.0, TypeError, "returned float"),
    ],
)
def test_bad_hook_replacements_are_refused_with_the_hook_name(model, replacement, error, message):
    tokens = np.array([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(error, match=message) as info:
        model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_attn_out", lambda x, hook: replacement(x))]
        )
    assert "blocks.1.hook_attn_out" in str(info.value)
    assert not model.hook_dict["blocks.1.hook_attn_out"].fwd_hooks
    model(tokens)  # still usable


def test_an_exception_in_a_hook_reaches_the_caller_as_the_same_object(model):
    class Boom(Exception):
        pass

    raised = Boom("from inside a hook")

    def hook(x, hook):
        raise raised

    with pytest.raises(Boom) as info:
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.mlp.hook_post", hook)])
    assert info.value is raised
    assert not model.hook_dict["blocks.1.mlp.hook_post"].fwd_hooks
    _, cache = model.run_with_cache(TOKENS)
    assert len(cache) == 10 + 18 * model.cfg.n_layers


def test_strings_without_a_tokenizer(model):
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model("hello world")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model.to_tokens(["a", "b"])


def test_logits_from_an_encoder_only_checkpoint(tmp_path):
    from conftest import make_checkpoint

    make_checkpoint(tmp_path, arch="BertModel", add_pooling_layer=False)
    model = HookedEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no MLM head"):
        model(TOKENS)
    with pytest.raises(ValueError, match="no MLM head"):
        model.run_with_cache(TOKENS)


def copy_checkpoint(checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint.path, target)
    return target


def test_missing_truncated_and_corrupt_weights(checkpoint, tmp_path):
    target = copy_checkpoint(checkpoint, tmp_path)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file"):
        HookedEncoder.from_pretrained(target)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        HookedEncoder.from_pretrained(target)
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        HookedEncoder.from_pretrained(target)


def test_weights_that_do_not_fit_the_config(checkpoint, tmp_path):
    target = copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["intermediate_size"] += 1
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"intermediate.dense.weight.*has shape \[40, 16\].*\[41, 16\]"
    ):
        HookedEncoder.from_pretrained(target)


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda c: c.pop("hidden_size"), ValueError, r"missing \['hidden_size'\]"),
        (lambda c: c.update(num_attention_heads=3), ValueError, "multiple of num_attention_heads"),
        (lambda c: c.update(num_hidden_layers="2"), TypeError, "num_hidden_layers must be an int"),
        (lambda c: c.update(num_hidden_layers=-1), ValueError, "n_layers must be positive"),
        (lambda c: c.update(hidden_act="swish"), ValueError, "hidden_act 'swish' is not supported"),
        (lambda c: c.update(layer_norm_eps=float("nan")), ValueError, "eps must be positive"),
    ],
)
def test_bad_configs_name_the_field(checkpoint, tmp_path, edit, error, message):
    target = copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        HookedEncoder.from_pretrained(target)


def test_config_json_that_is_not_json(checkpoint, tmp_path):
    target = copy_checkpoint(checkpoint, tmp_path)
    (target / "config.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        HookedEncoder.from_pretrained(target)


def test_hand_built_configs_are_validated():
    with pytest.raises(ValueError, match="missing required fields"):
        HookedEncoder({"d_model": 8})
    with pytest.raises(ValueError, match="unknown config fields"):
        HookedEncoderConfig.from_dict(
            {"d_model": 8, "d_head": 4, "n_layers": 1, "n_ctx": 4, "d_vocab": 5, "d_modle": 3}
        )
    with pytest.raises(ValueError, match="from_pretrained"):
        HookedEncoder("bert-base-cased")
    with pytest.raises(ValueError, match="dtype 'float64' is not supported"):
        HookedEncoderConfig(d_model=8, d_head=4, n_layers=1, n_ctx=4, d_vocab=5, dtype="float64")


def test_cuda_on_a_cpu_build_says_how_to_get_one(checkpoint):
    import hooked_encoder

    if hooked_encoder.cuda_available():
        pytest.skip("this build has CUDA")
    with pytest.raises(ValueError, match="CPU-only.*--features cuda"):
        HookedEncoder.from_pretrained(checkpoint.path, device="cuda")


def test_apple_gpus_are_refused_with_what_is_missing(checkpoint):
    # No Metal build exists (Candle's Metal backend needs macOS; we have never built or tested
    # it), so every way of asking for one says so, and the model stays usable on the CPU.
    model = HookedEncoder.from_pretrained(checkpoint.path)
    tokens = np.array([[2, 5, 6, 3]])
    before = model(tokens)
    for move in (model.mps, lambda: model.to("mps"), lambda: model.to("mps:0")):
        with pytest.raises(ValueError, match=r"no Apple GPU \(Metal\) support.*macOS"):
            move()
    with pytest.raises(ValueError, match=r"no Apple GPU \(Metal\) support"):
        HookedEncoder.from_pretrained(checkpoint.path, device="mps")
    assert model.cfg.device == "cpu"
    np.testing.assert_array_equal(model(tokens), before)


def test_a_cpu_without_avx2_gets_an_import_error_not_a_crash(monkeypatch, tmp_path):
    import builtins
    import importlib

    import hooked_encoder._cpu as cpu_check

    real_open = builtins.open
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx\n")

    def fake_open(path, *args, **kwargs):
        return real_open(fake if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    with pytest.raises(ImportError, match=r"lacks \['avx2', 'fma'\].*target-cpu=native"):
        importlib.reload(cpu_check)
