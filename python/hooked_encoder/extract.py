"""Activation extraction at corpus scale: run many texts through the model and keep the
activations of chosen hooks, padding removed, in memory or streamed to disk.

Underneath is a plain function over one batch, :func:`extract_batch`, so that a distributed
engine can map it over shards of a corpus (each worker loads the model once, then calls
``extract_batch`` on its batches); :func:`extract` adds batching, ordering, and the on-disk format.

On disk an extraction is a directory of safetensors shards plus ``manifest.json``. Shard ``k``
holds the input rows listed in the manifest, in input order. For each hook there is the tensor
``{hook}`` and, without pooling, ``{hook}.offsets``: row ``i`` is
``values[offsets[i]:offsets[i+1]]``.
The manifest is rewritten (atomically) after every shard, so an interrupted run started again with
the same arguments resumes after the last complete shard.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from .hooked_encoder import HookedEncoder

Pooling = Literal["mean", "cls", "max"] | None
MANIFEST = "manifest.json"
FORMAT = "hooked-encoder-extraction/1"
# Hooks without a position dimension at axis 1 cannot be split per token.
_NOT_PER_TOKEN = (
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "pooler.hook_pooler_out",
    "nsp_head.hook_nsp_out",
)


def select_hooks(
    model: HookedEncoder, hooks: str | Iterable[str] | Callable[[str], bool]
) -> list[str]:
    """Hook names, in firing order, from names, glob patterns (``"blocks.*.hook_resid_post"``)
    or a predicate. A pattern that matches nothing is a ``KeyError``."""
    names = list(model.hook_dict)
    if callable(hooks):
        chosen = [n for n in names if hooks(n)]
    else:
        patterns = [hooks] if isinstance(hooks, str) else list(hooks)
        chosen_set: set[str] = set()
        for pattern in patterns:
            matched = fnmatch.filter(names, pattern)
            if not matched:
                raise KeyError(f"hook pattern {pattern!r} matches no hook point of this model")
            chosen_set.update(matched)
        chosen = [n for n in names if n in chosen_set]
    if not chosen:
        raise KeyError("no hook point selected")
    awkward = [n for n in chosen if n.endswith(_NOT_PER_TOKEN)]
    if awkward:
        raise ValueError(
            f"{awkward[0]} has no position axis to split by token; extract supports hooks shaped "
            "[batch, pos, ...] (use run_with_cache for attention patterns)"
        )
    return chosen


# Each maps one row's unpadded activations [tokens, ...] to one vector [...].
POOLINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda row: row.mean(0),
    "cls": lambda row: row[0],
    "max": lambda row: row.max(0),
}


@dataclass
class Batch:
    """Padded inputs for some input rows: ``rows`` are their indices in the corpus."""

    rows: np.ndarray
    tokens: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray


def _encode(
    model: HookedEncoder, items: list[Any], max_length: int | None
) -> tuple[np.ndarray, ...]:
    if all(isinstance(t, str) for t in items):
        return model._require_tokenizer("text input")(items, max_length or model.cfg.n_ctx)
    if all(isinstance(t, tuple) and len(t) == 2 for t in items):
        return model._require_tokenizer("sentence pairs")(items, max_length or model.cfg.n_ctx)
    rows = [np.asarray(t, dtype=np.int64).reshape(-1)[: max_length or None] for t in items]
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(tokens)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, 1
    return tokens, np.zeros_like(tokens), mask


def iter_batches(
    model: HookedEncoder, items: list[Any], first_row: int, batch_size: int, max_length: int | None
) -> Iterator[Batch]:
    """Batches of ``items`` (rows ``first_row...``), sorted by length and each padded only to
    its own longest row."""
    tokens, types, mask = _encode(model, items, max_length)
    lengths = mask.sum(1)
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = int(lengths[chosen].max())
        yield Batch(
            chosen + first_row, tokens[chosen, :width], types[chosen, :width], mask[chosen, :width]
        )


def extract_batch(
    model: HookedEncoder, batch: Batch, hooks: list[str], pooling: Pooling = None
) -> dict[str, list[np.ndarray]]:
    """Runs one batch and returns, per hook, one array per row: ``[tokens, ...]`` without
    padding, or ``[...]`` pooled over the row's tokens (mean, first token, or max)."""
    needs_head = any(h.startswith(("mlm_head.", "unembed.")) for h in hooks)
    _, cache = model.run_with_cache(
        batch.tokens,
        return_type="logits" if needs_head else None,
        token_type_ids=batch.token_type_ids,
        one_zero_attention_mask=batch.attention_mask,
        names_filter=hooks,
    )
    if pooling is not None and (not isinstance(pooling, str) or pooling not in POOLINGS):
        raise ValueError(f"pooling must be None, 'mean', 'cls' or 'max', got {pooling!r}")
    lengths = batch.attention_mask.sum(1)
    out: dict[str, list[np.ndarray]] = {}
    for name in hooks:
        value = np.asarray(cache[name])
        rows = [value[i, : lengths[i]] for i in range(len(lengths))]
        if pooling is not None:
            rows = [POOLINGS[pooling](r) for r in rows]
        out[name] = [np.ascontiguousarray(r) for r in rows]
    return out


def _pack(per_row: dict[str, list[np.ndarray]], pooled: bool) -> dict[str, np.ndarray]:
    tensors = {}
    for name, rows in per_row.items():
        if pooled:
            tensors[name] = np.stack(rows)
        else:
            tensors[name] = np.concatenate(rows)
            tensors[f"{name}.offsets"] = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return tensors


def _run_window(model, items, first_row, hooks, batch_size, max_length, pooling):
    """Extracts one window of rows; returns per-hook arrays in input order, and the number of
    tokens run."""
    per_row: dict[str, list[Any]] = {h: [None] * len(items) for h in hooks}
    tokens = 0
    for batch in iter_batches(model, items, first_row, batch_size, max_length):
        result = extract_batch(model, batch, hooks, pooling)
        tokens += int(batch.attention_mask.sum())
        for name, rows in result.items():
            for row, value in zip(batch.rows - first_row, rows, strict=True):
                per_row[name][row] = value
    return _pack(per_row, pooling is not None), tokens


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def check_arguments(
    model: HookedEncoder, hooks: Any, batch_size: int, shard_rows: int, pooling: Pooling
) -> list[str]:
    """The hook names to extract; a bad argument is a ``ValueError`` (``KeyError`` for a hook
    pattern matching nothing), raised before anything runs."""
    if batch_size < 1 or shard_rows < 1:
        raise ValueError("batch_size and shard_rows must be at least 1")
    names = select_hooks(model, hooks)
    if pooling is not None and (not isinstance(pooling, str) or pooling not in POOLINGS):
        raise ValueError(f"pooling must be None, 'mean', 'cls' or 'max', got {pooling!r}")
    return names


def extract(
    model: HookedEncoder,
    texts: Iterable[Any],
    hooks: Any,
    batch_size: int = 32,
    max_length: int | None = None,
    pooling: Pooling = None,
    out: str | os.PathLike | None = None,
    shard_rows: int = 1024,
    progress: bool | None = None,
) -> Extraction | Path:
    """See :meth:`HookedEncoder.extract`."""
    names = check_arguments(model, hooks, batch_size, shard_rows, pooling)
    items = iter(texts)
    if out is None:
        parts = []
        with _Progress(progress) as bar:
            for start, chunk in _windows(items, shard_rows):
                tensors, tokens = _run_window(
                    model, chunk, start, names, batch_size, max_length, pooling
                )
                parts.append(tensors)
                bar.update(len(chunk), tokens)
        return Extraction._from_parts(parts, names, pooling)
    directory = Path(out)
    manifest = open_output(directory, model, names, pooling, batch_size, max_length, shard_rows)
    with _Progress(progress) as bar:
        for shard, start, chunk in pending_windows(manifest, items):
            entry = compute_shard(
                model, directory, shard, start, chunk, names, batch_size, max_length, pooling
            )
            add_shard(directory, manifest, entry)
            bar.update(len(chunk), entry["tokens"])
    finish_output(directory, manifest)
    return directory


# ---------------------------------------------------------------- the output directory
#
# One writer for every engine: the single process above and hooked_encoder.ray. The corpus is
# cut into windows of ``shard_rows`` input rows; window ``k`` becomes ``shard-{k:05d}.safetensors``
# whoever computes it (compute_shard: same window, same length sort, same batches, same bytes),
# written atomically, so computing a window twice is harmless. The manifest lists complete
# shards in order, a contiguous prefix of the windows; only the driver writes it.


def open_output(
    directory: Path,
    model: HookedEncoder,
    names: list[str],
    pooling: Pooling,
    batch_size: int,
    max_length: int | None,
    shard_rows: int,
) -> dict[str, Any]:
    """The manifest to continue: the one in ``directory`` (checked to record the same
    extraction, else a ``ValueError``), or a new one (``directory`` is created)."""
    from . import __version__

    directory.mkdir(parents=True, exist_ok=True)
    arguments = {
        "model": model.cfg.model_name,
        "hooks": names,
        "pooling": pooling,
        "batch_size": batch_size,
        "max_length": max_length,
        "shard_rows": shard_rows,
    }
    fingerprint = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()
    manifest = _read_manifest(directory)
    if manifest is None:
        return {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "arguments": arguments,
            "dtype": "float32",
            "hooked_encoder": __version__,
            "tokenizer": None if model.tokenizer is None else model.cfg.tokenizer_name,
            "shards": [],
            "complete": False,
        }
    if manifest.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{directory} holds an extraction made with other arguments "
            f"({manifest.get('arguments')}); use another directory"
        )
    return manifest


def pending_windows(
    manifest: dict[str, Any], items: Iterator[Any]
) -> Iterator[tuple[int, int, list[Any]]]:
    """``(shard index, first row, rows)`` of each window the manifest does not list yet:
    ``items`` is the whole corpus; the rows of listed shards are skipped, not kept. (Bound now:
    the manifest grows while the windows are consumed.)"""
    done = sum(s["rows"][1] - s["rows"][0] for s in manifest["shards"])
    first_shard = len(manifest["shards"])
    windows = _windows(
        itertools.islice(items, done, None), manifest["arguments"]["shard_rows"], done
    )
    return ((first_shard + k, start, chunk) for k, (start, chunk) in enumerate(windows))


def compute_shard(
    model: HookedEncoder,
    directory: Path,
    shard: int,
    start: int,
    items: list[Any],
    names: list[str],
    batch_size: int,
    max_length: int | None,
    pooling: Pooling,
) -> dict[str, Any]:
    """Extracts one window and writes it as shard ``shard`` (atomically); returns its manifest
    entry."""
    from safetensors.numpy import save_file

    tensors, tokens = _run_window(model, items, start, names, batch_size, max_length, pooling)
    name = f"shard-{shard:05d}.safetensors"
    _atomic_write(directory / name, lambda path: save_file(tensors, path))
    return {
        "file": name,
        "rows": [start, start + len(items)],
        "tokens": tokens,
        "shapes": {n: list(tensors[n].shape) for n in names},
    }


def add_shard(directory: Path, manifest: dict[str, Any], entry: dict[str, Any]) -> None:
    """Lists the next shard in the manifest and rewrites it (atomically)."""
    expected = f"shard-{len(manifest['shards']):05d}.safetensors"
    if entry["file"] != expected:
        raise RuntimeError(f"shard {entry['file']} listed out of order (expected {expected})")
    manifest["shards"].append(entry)
    _write_manifest(directory, manifest)


def finish_output(directory: Path, manifest: dict[str, Any]) -> None:
    """Marks the extraction complete."""
    manifest["complete"] = True
    _write_manifest(directory, manifest)


class _Progress:
    """A tqdm bar with texts/s and tokens/s: on when asked, or by default when stderr is a
    terminal and tqdm is installed; otherwise nothing."""

    def __init__(self, enabled: bool | None, desc: str = "extracting") -> None:
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(unit=" texts", desc=desc, dynamic_ncols=True)
        self.tokens = 0

    def update(self, texts: int, tokens: int) -> None:
        if self.bar is not None:
            self.tokens += tokens
            self.bar.update(texts)
            elapsed = self.bar.format_dict.get("elapsed") or 1e-9
            self.bar.set_postfix_str(f"{self.tokens / elapsed:.0f} tokens/s")

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _windows(items: Iterator[Any], size: int, first_row: int = 0):
    start = first_row
    while chunk := list(itertools.islice(items, size)):
        yield start, chunk
        start += len(chunk)


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a hooked_encoder extraction manifest")
    return manifest


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    _atomic_write(
        directory / MANIFEST, lambda path: Path(path).write_text(json.dumps(manifest, indent=1))
    )


class Extraction:
    """Extracted activations: ``extraction[hook]`` is ``[rows, ...]`` when pooled, or all rows'
    tokens concatenated, ``[tokens, ...]``, with ``extraction.offsets(hook)`` (``[rows + 1]``)
    saying where each row starts; ``extraction.row(hook, i)`` is one row.

    One read from disk (:func:`load_extraction`) loads each hook only when it is first used.
    """

    def __init__(
        self,
        load: Callable[[str], dict[str, np.ndarray]],
        hooks: list[str],
        pooling: Pooling,
        framework: Literal["numpy", "torch"] = "numpy",
    ) -> None:
        if framework not in ("numpy", "torch"):
            raise ValueError(f"framework must be 'numpy' or 'torch', got {framework!r}")
        self._load, self.hooks, self.pooling, self.framework = load, hooks, pooling, framework
        self._loaded: dict[str, dict[str, Any]] = {}

    @classmethod
    def _from_parts(
        cls,
        parts: list[dict[str, np.ndarray]],
        hooks: list[str],
        pooling: Pooling,
        framework: Literal["numpy", "torch"] = "numpy",
    ) -> Extraction:
        return cls(lambda hook: _join(parts, hook, pooling), hooks, pooling, framework)

    def _hook(self, hook: str) -> dict[str, Any]:
        if hook not in self.hooks:
            raise KeyError(f"{hook!r} was not extracted; extracted: {self.hooks}")
        if hook not in self._loaded:
            arrays = self._load(hook)
            if self.framework == "torch":
                import torch

                arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}
            self._loaded[hook] = arrays
        return self._loaded[hook]

    def __getitem__(self, hook: str) -> Any:
        return self._hook(hook)[hook]

    def offsets(self, hook: str) -> Any:
        if self.pooling is not None:
            raise ValueError("a pooled extraction has one vector per row and no offsets")
        return self._hook(hook)[f"{hook}.offsets"]

    def row(self, hook: str, i: int) -> Any:
        if self.pooling is not None:
            return self[hook][i]
        offsets = self.offsets(hook)
        return self[hook][int(offsets[i]) : int(offsets[i + 1])]

    def __len__(self) -> int:
        hook = self.hooks[0]
        return len(self[hook]) if self.pooling is not None else len(self.offsets(hook)) - 1


def _join(parts: list[dict[str, np.ndarray]], hook: str, pooling: Pooling) -> dict[str, np.ndarray]:
    """One hook's arrays from consecutive shards, offsets renumbered."""
    arrays = {hook: np.concatenate([p[hook] for p in parts]) if parts else np.zeros((0,))}
    if pooling is None:
        offsets = [np.zeros(1, dtype=np.int64)]
        for p in parts:
            offsets.append(p[f"{hook}.offsets"][1:] + offsets[-1][-1])
        arrays[f"{hook}.offsets"] = np.concatenate(offsets)
    return arrays


def load_extraction(
    path: str | os.PathLike,
    hooks: Iterable[str] | None = None,
    framework: Literal["numpy", "torch"] = "numpy",
) -> Extraction:
    """Opens an extraction written by ``extract(..., out=path)``: every hook, or ``hooks``, as
    NumPy arrays or torch tensors. Nothing is read until a hook is used; then only that hook's
    tensors are read from each shard (safetensors maps the files)."""
    from safetensors import safe_open

    directory = Path(path)
    manifest = _read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"{directory} holds no {MANIFEST}")
    names = list(manifest["arguments"]["hooks"] if hooks is None else hooks)
    unknown = sorted(set(names) - set(manifest["arguments"]["hooks"]))
    if unknown:
        raise KeyError(f"{unknown} were not extracted into {directory}")
    pooling = manifest["arguments"]["pooling"]
    keys = (
        (lambda hook: [hook]) if pooling is not None else (lambda hook: [hook, f"{hook}.offsets"])
    )

    def load(hook: str) -> dict[str, np.ndarray]:
        parts = []
        for shard in manifest["shards"]:
            with safe_open(directory / shard["file"], framework="numpy") as f:
                parts.append({key: f.get_tensor(key) for key in keys(hook)})
        return _join(parts, hook, pooling)

    return Extraction(load, names, pooling, framework)
