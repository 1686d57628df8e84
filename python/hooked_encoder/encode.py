"""Sentence embeddings with sentence-transformers' ``encode()``: the same arguments and meanings,
the checkpoint's own pooling and normalisation, on our forward pass.

A sentence-transformers checkpoint says how to turn token vectors into one vector per text in
``modules.json`` (a Transformer, then a Pooling module, often then a Normalize module), the
pooling mode(s) in ``<pooling module>/config.json`` and the truncation length in
``sentence_bert_config.json``. :func:`sentence_config` reads those; :func:`encode` runs the texts
in length-sorted, padded batches (the batching of :mod:`hooked_encoder.extract`) and pools each
row's last hidden state without its padding.

A checkpoint without ``modules.json`` (a plain BERT) gets what sentence-transformers gives one:
mean pooling, no normalisation, and truncation at the model's ``n_ctx``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .extract import POOLINGS, _Progress, iter_batches

if TYPE_CHECKING:
    from .hooked_encoder import HookedEncoder

OutputValue = Literal["sentence_embedding", "token_embeddings"]
Precision = Literal["float32", "binary", "ubinary"]
PRECISIONS = ("float32", "binary", "ubinary")

# sentence-transformers' legacy pooling keys, in the order it concatenates the modes.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# The files of a sentence-transformers checkpoint that encode() reads (also fetched from the hub).
SENTENCE_FILES = ["modules.json", "sentence_bert_config.json", "*/config.json"]


def _weighted_mean(row: np.ndarray) -> np.ndarray:
    # Position i (from 1) weighs i: later tokens count more (SGPT's weighted mean).
    weights = np.arange(1, len(row) + 1, dtype=np.float32)[:, None]
    return (row * weights).sum(0) / weights.sum()


# Each mode maps one row's unpadded token vectors [tokens, d] to one vector [d].
_MODES = {
    "cls": POOLINGS["cls"],
    "max": POOLINGS["max"],
    "mean": POOLINGS["mean"],
    "mean_sqrt_len_tokens": lambda row: row.sum(0) / np.float32(np.sqrt(len(row))),
    "weightedmean": _weighted_mean,
    "lasttoken": lambda row: row[-1],
}


@dataclass(frozen=True)
class SentenceConfig:
    """How a checkpoint turns token vectors into a sentence embedding: the pooling modes
    (concatenated in this order when there are several), whether a Normalize module follows, the
    truncation length (``max_seq_length`` of ``sentence_bert_config.json``, else
    ``model_max_length`` of ``tokenizer_config.json``; ``None``, and always at most: the model's
    ``n_ctx``) and whether texts are lower-cased first."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def read_sentence_config(directory: str | os.PathLike[str]) -> SentenceConfig:
    """The :class:`SentenceConfig` of a checkpoint directory (defaults when it has no
    ``modules.json``). A module encode() cannot run (Dense, Router, ...) is a ``ValueError``."""
    directory = Path(directory)
    bert_config = directory / "sentence_bert_config.json"
    settings = _read_json(bert_config) if bert_config.is_file() else {}
    if not isinstance(settings, dict):
        raise ValueError(f"{bert_config} does not hold a JSON object")
    max_seq_length = settings.get("max_seq_length") or _tokenizer_max_length(directory)
    do_lower_case = bool(settings.get("do_lower_case", False))
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return SentenceConfig(max_seq_length=max_seq_length, do_lower_case=do_lower_case)
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise ValueError(f"{modules_path} does not hold a list of modules")
    pooling: tuple[str, ...] | None = None
    normalize = False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling" and pooling is None and not normalize:
            pooling = _pooling_modes(directory / module.get("path", "") / "config.json")
        elif kind == "Normalize" and pooling is not None:
            normalize = True
        else:
            raise ValueError(
                f"{modules_path} has a {module.get('type')} module (in that place); encode() "
                "supports a Transformer, one Pooling module and an optional Normalize module"
            )
    if pooling is None:
        raise ValueError(f"{modules_path} has no Pooling module; encode() needs one")
    return SentenceConfig(pooling, normalize, max_seq_length, do_lower_case)


def _tokenizer_max_length(directory: Path) -> int | None:
    """``model_max_length`` of ``tokenizer_config.json``, where sentence-transformers >= 6
    keeps ``max_seq_length`` (absent, or transformers' "no limit" 1e30: ``None``)."""
    path = directory / "tokenizer_config.json"
    config = _read_json(path) if path.is_file() else {}
    value = config.get("model_max_length") if isinstance(config, dict) else None
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


def _pooling_modes(path: Path) -> tuple[str, ...]:
    config = _read_json(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    if "pooling_mode" in config:  # sentence-transformers >= 6
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key))
    modes = modes or ("mean",)
    unknown = [m for m in modes if m not in _MODES]
    if unknown:
        raise ValueError(f"{path}: pooling mode {unknown[0]!r} is not one of {sorted(_MODES)}")
    return modes


def sentence_config(model: HookedEncoder) -> SentenceConfig:
    """The :class:`SentenceConfig` of the checkpoint ``model`` was loaded from: a local
    directory, an embedded model, or a hub id already in the local Hugging Face cache. A model
    built from a config, or from an ``hf_model``, gets the defaults."""
    from .loading import EMBEDDED_MODELS, resolve_checkpoint

    name = model.cfg.model_name
    if Path(name).expanduser().is_dir() or name in EMBEDDED_MODELS:
        return read_sentence_config(resolve_checkpoint(name))
    try:
        import huggingface_hub

        cached = huggingface_hub.snapshot_download(
            name, allow_patterns=SENTENCE_FILES, local_files_only=True
        )
    except Exception:  # not a hub id, or not cached: nothing says otherwise, so the defaults
        return SentenceConfig()
    return read_sentence_config(cached)


def encode(
    model: HookedEncoder,
    sentences: str | Iterable[str],
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
    output_value: OutputValue = "sentence_embedding",
    precision: Precision = "float32",
    convert_to_numpy: bool = True,
    convert_to_tensor: bool = False,
    normalize_embeddings: bool = False,
) -> Any:
    """See :meth:`HookedEncoder.encode`."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if output_value not in ("sentence_embedding", "token_embeddings"):
        raise ValueError(
            f"output_value must be 'sentence_embedding' or 'token_embeddings', got {output_value!r}"
        )
    if precision not in PRECISIONS:
        hint = (
            " (int8/uint8 need calibration ranges: quantize float32 embeddings with "
            "sentence_transformers.util.quantize_embeddings)"
            if precision in ("int8", "uint8")
            else ""
        )
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}{hint}")
    if precision != "float32" and output_value != "sentence_embedding":
        raise ValueError("precision applies to sentence embeddings only")
    single = isinstance(sentences, str)
    texts = [sentences] if single else list(sentences)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"encode() takes strings; item {i} is a {type(text).__name__}")
    config = sentence_config(model)
    if config.do_lower_case:
        texts = [t.lower() for t in texts]
    if show_progress_bar is None:  # sentence-transformers' default: on when logging says INFO
        show_progress_bar = logging.getLogger("hooked_encoder").getEffectiveLevel() <= logging.INFO

    rows: list[Any] = [None] * len(texts)
    tokens_run = 0
    with _Progress(show_progress_bar, desc="encoding") as bar:
        if texts:
            limit = min(config.max_seq_length or model.cfg.n_ctx, model.cfg.n_ctx)
            batches = iter_batches(model, texts, 0, batch_size, limit)
        else:
            batches = iter(())
        for batch in batches:
            hidden = _as_numpy(
                model.encoder_output(batch.tokens, batch.token_type_ids, batch.attention_mask)
            )
            lengths = batch.attention_mask.sum(1)
            for i, row in enumerate(batch.rows):
                tokens = hidden[i, : lengths[i]]
                if output_value == "token_embeddings":
                    rows[row] = np.ascontiguousarray(tokens)
                else:
                    rows[row] = _pool(tokens, config.pooling)
            tokens_run += int(lengths.sum())
            bar.update(len(batch.rows), int(lengths.sum()))

    if output_value == "token_embeddings":
        result: Any = rows
        if convert_to_tensor or not convert_to_numpy:
            torch = _torch("convert_to_tensor / convert_to_numpy=False")
            result = [torch.from_numpy(r) for r in rows]
        return result[0] if single else result

    d = model.cfg.d_model * len(config.pooling)
    embeddings = np.stack(rows) if rows else np.zeros((0, d), dtype=np.float32)
    if config.normalize or normalize_embeddings:
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings = embeddings / np.maximum(norms, np.float32(1e-12))
    embeddings = _quantize(embeddings.astype(np.float32, copy=False), precision)
    if convert_to_tensor:
        result = _torch("convert_to_tensor=True").from_numpy(embeddings)
    elif convert_to_numpy:
        result = embeddings
    else:
        result = list(_torch("convert_to_numpy=False").from_numpy(embeddings))
    return result[0] if single else result


def _pool(tokens: np.ndarray, modes: tuple[str, ...]) -> np.ndarray:
    if len(modes) == 1:
        return _MODES[modes[0]](tokens)
    return np.concatenate([_MODES[m](tokens) for m in modes])


def _quantize(embeddings: np.ndarray, precision: str) -> np.ndarray:
    """sentence-transformers' deterministic precisions: one bit per dimension (``> 0``),
    packed into bytes, as uint8 (``ubinary``) or shifted by -128 into int8 (``binary``)."""
    if precision == "float32":
        return embeddings
    packed = np.packbits(embeddings > 0, axis=-1)
    return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor (output_format="torch", or a CUDA model)
        return value.detach().float().cpu().numpy()
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _torch(what: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{what} returns torch tensors and needs torch: pip install torch"
        ) from None
    return torch
