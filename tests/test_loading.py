"""Finding checkpoints: sharded files, old tensor names, unsafe indexes, the hub."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import ATOL, RTOL
from hooked_encoder import CheckpointError, HookedEncoder


def logits_of(model, checkpoint):
    tokens, types, mask = checkpoint.batch(seed=11)
    ours = model(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    return ours, checkpoint.hf_logits(tokens, types, mask)


def test_sharded_checkpoints_load(checkpoint, tmp_path):
    tensors = load_file(checkpoint.path / "model.safetensors")
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(checkpoint.path / "config.json", tmp_path)
    ours, hf = logits_of(HookedEncoder.from_pretrained(tmp_path), checkpoint)
    np.testing.assert_allclose(ours, hf, atol=ATOL, rtol=RTOL)

    index["weight_map"][names[0]] = "../model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="points outside the model directory"):
        HookedEncoder.from_pretrained(tmp_path)
    index["weight_map"][names[0]] = "model-00003-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00003-of-00002.safetensors.*missing"):
        HookedEncoder.from_pretrained(tmp_path)


def test_old_gamma_beta_names_and_explicit_decoder_weights(checkpoint, tmp_path):
    tensors = load_file(checkpoint.path / "model.safetensors")
    renamed = {
        n.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): t
        for n, t in tensors.items()
    }
    renamed["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    save_file(renamed, tmp_path / "model.safetensors")
    shutil.copy(checkpoint.path / "config.json", tmp_path)
    ours, hf = logits_of(HookedEncoder.from_pretrained(tmp_path), checkpoint)
    np.testing.assert_allclose(ours, hf, atol=ATOL, rtol=RTOL)


def test_unused_tensors_are_reported(checkpoint, tmp_path):
    tensors = load_file(checkpoint.path / "model.safetensors")
    tensors["classifier.weight"] = np.zeros((3, 16), dtype=np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(checkpoint.path / "config.json", tmp_path)
    with pytest.warns(UserWarning, match="1 tensors .* not used .*classifier.weight"):
        HookedEncoder.from_pretrained(tmp_path)


def test_integer_weights_are_refused(checkpoint, tmp_path):
    tensors = load_file(checkpoint.path / "model.safetensors")
    name = "bert.encoder.layer.0.output.dense.bias"
    tensors[name] = tensors[name].astype(np.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(checkpoint.path / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=f"{name}.*expected a floating-point type"):
        HookedEncoder.from_pretrained(tmp_path)


def test_pickle_checkpoints_are_not_loaded(checkpoint, tmp_path):
    shutil.copy(checkpoint.path / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        HookedEncoder.from_pretrained(tmp_path)


def test_an_uncached_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        CheckpointError, match="cannot load 'google-bert/bert-base-cased'.*local cache"
    ):
        HookedEncoder.from_pretrained("bert-base-cased")


def test_a_path_that_is_not_a_directory(tmp_path):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a directory"):
        HookedEncoder.from_pretrained(file)
