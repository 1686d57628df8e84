"""Extraction and embedding on Ray Data (``pip install "hooked-encoder[ray]"``).

:func:`extract_ray` writes the same directory as ``model.extract(texts, ..., out=...)``, byte for
byte (shard files and manifest), with the windows of rows computed by a pool of Ray actors. Ray
decides neither the unit of work nor a file name: the driver cuts the corpus into the same
windows of ``shard_rows`` rows as the single-process run; each actor loads the model once, then
computes whole windows and writes ``shard-NNNNN.safetensors`` itself (atomically, through the
same writer as :func:`hooked_encoder.extract.extract`); only a small manifest entry travels back,
and the driver lists the shards in order. A window computed twice (an actor that died and was
restarted, a task retried) is written twice with the same bytes under the same name, so Ray's
at-least-once execution loses and duplicates nothing. A run stopped part-way resumes like the
single-process one: shards listed in the manifest are skipped.

:class:`Embedder` is the idiomatic form for Ray users who want a dataset back rather than files:
``ds.map_batches(Embedder, fn_constructor_kwargs={"model": ...}, concurrency=2, batch_size=64)``
adds an embedding column (or one pooled column per hook). Like every ``map_batches``, it does not
keep the dataset's row order unless ``DataContext.get_current().execution_options.preserve_order``
is set; the input columns travel with the new ones, so carry an id column when order matters.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .corpus import JSON_LINES, open_lines, records
from .extract import (
    Pooling,
    add_shard,
    check_arguments,
    compute_shard,
    finish_output,
    open_output,
    pending_windows,
)

if TYPE_CHECKING:
    from .hooked_encoder import HookedEncoder

__all__ = ["Embedder", "LineRows", "ParquetRows", "extract_ray"]


def require_ray() -> Any:
    """The ``ray`` module (with Ray Data), or an ``ImportError`` naming the extra."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(
            "hooked_encoder.ray needs Ray Data, which is not installed: "
            "pip install 'hooked-encoder[ray]'"
        ) from None
    return ray


class _DriverStopped(Exception):
    """Raised by the test-only ``_stop_after_shards`` switch: the driver stops as if killed."""


def _load_model(model: Any, device: str) -> HookedEncoder:
    from . import HookedEncoder

    if isinstance(model, HookedEncoder):
        return model
    if isinstance(model, str | os.PathLike):
        return HookedEncoder.from_pretrained(model, device=device)
    # An ObjectRef of a pickled in-memory model: one copy in the object store for all actors.
    ray = require_ray()
    return ray.get(model)


class _ShardWorker:
    """A Ray Data actor: loads the model once, then computes and writes whole windows."""

    def __init__(
        self,
        model: Any,
        directory: str,
        names: list[str],
        batch_size: int,
        max_length: int | None,
        pooling: Pooling,
        threads: int,
        device: str,
        die_once: str | None = None,
    ) -> None:
        from . import set_num_threads

        # One Rust thread per CPU Ray gave this actor: two actors on two cores must not each
        # start a thread per core.
        set_num_threads(threads)
        self.model = _load_model(model, device)
        self.directory = Path(directory)
        self.arguments = (names, batch_size, max_length, pooling)
        if die_once is not None:  # test-only: record each start; die once, mid-window
            with open(f"{die_once}.starts", "a") as starts:
                starts.write(f"{os.getpid()}\n")
            if not Path(die_once).exists():
                self.model.add_perma_hook(names[0], _DieOnce(die_once))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = []
        for shard, start, texts in zip(batch["shard"], batch["start"], batch["texts"], strict=True):
            entry = compute_shard(
                self.model,
                self.directory,
                int(shard),
                int(start),
                _read(pickle.loads(texts)),
                *self.arguments,
            )
            entries.append(json.dumps(entry))
        return {"shard": np.asarray(batch["shard"]), "entry": np.asarray(entries)}


class _DieOnce:
    """Test-only: the process exits at its second forward pass of a window, in the middle of
    the window, the first time only (a sentinel file, holding the process id, marks it done)."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel, self.calls = Path(sentinel), 0

    def __call__(self, activation: Any, hook: Any) -> None:
        self.calls += 1
        if self.calls == 2 and not self.sentinel.exists():
            self.sentinel.write_text(str(os.getpid()))
            os._exit(1)


def extract_ray(
    data: Any,
    model: str | os.PathLike[str] | HookedEncoder,
    hooks: Any,
    out: str | os.PathLike[str],
    *,
    pooling: Pooling = None,
    text_column: str = "text",
    batch_size: int = 32,
    max_length: int | None = None,
    shard_rows: int = 1024,
    concurrency: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
    progress: bool = False,
    _die_once: str | None = None,
    _stop_after_shards: int | None = None,
) -> Path:
    """Extracts the activations of ``hooks`` for every row of ``data`` into ``out`` on a Ray
    cluster; the directory is byte-identical to ``model.extract(texts, hooks, batch_size=...,
    max_length=..., pooling=..., out=out, shard_rows=...)`` and is read with
    :func:`hooked_encoder.load_extraction`.

    ``data`` is a ``ray.data.Dataset`` (its ``text_column``, in the dataset's order) or any
    iterable of what ``extract`` takes (strings, sentence pairs, token ids): its rows pass
    through the driver, which cuts them into windows of ``shard_rows``. Or ``data`` is a
    ``pathlib.Path`` of a Parquet file, or a list of them (one corpus, in that order): then the
    driver reads only their metadata and each window is described as (file, row range); the
    actors read their own rows of ``text_column``. Text files (one text per line) and JSON-lines
    files (``.jsonl``/``.ndjson``, ``text_column`` of each object) work the same way: the
    driver scans them once for where every window starts, and the actors read their windows'
    lines (blank lines skipped, as the command line reads them). ``model`` is a checkpoint
    name or directory (loaded by the driver, to check the arguments, and by every actor) or an
    in-memory :class:`HookedEncoder` (put in the object store once, shared by the actors).
    ``concurrency`` actors each hold ``num_cpus`` CPUs (and run that many threads) and
    ``num_gpus`` GPUs (then the model is loaded on ``"cuda"``). Connects to the running cluster
    (``RAY_ADDRESS``, or one already started with ``ray.init``) or starts a local one.

    Before any actor starts: an unknown hook pattern is a ``KeyError``; an ``out`` holding a
    different extraction a ``ValueError``; Ray missing an ``ImportError`` naming the extra.
    Rerunning with the same arguments resumes after the shards the manifest lists.
    """
    ray = require_ray()
    from . import HookedEncoder

    if concurrency < 1 or num_cpus <= 0 or num_gpus < 0:
        raise ValueError("concurrency and num_cpus must be positive, num_gpus at least 0")
    device = "cuda" if num_gpus > 0 else "cpu"
    local = model if isinstance(model, HookedEncoder) else _load_model(model, "cpu")
    names = check_arguments(local, hooks, batch_size, shard_rows, pooling)
    directory = Path(out)
    files = _input_files(data)
    parquet = bool(files) and files[0].suffix.lower() == ".parquet"
    items = None if files else _rows(ray, data, text_column)
    counts = _parquet_counts(files, text_column) if parquet else None
    lines = _line_index(files, text_column, shard_rows) if files and not parquet else None
    manifest = open_output(directory, local, names, pooling, batch_size, max_length, shard_rows)
    if counts:
        pending = _parquet_windows(counts, text_column, manifest)
    elif lines is not None:
        pending = _line_windows(lines, text_column, manifest)
    else:
        pending = pending_windows(manifest, items)
    windows = [
        {"shard": shard, "start": start, "texts": pickle.dumps(chunk)}
        for shard, start, chunk in pending
    ]
    if windows:
        if not ray.is_initialized():
            ray.init()
        if isinstance(model, HookedEncoder):
            model = ray.put(model)
        elif Path(model).expanduser().is_dir():  # actors need not share the driver's cwd
            model = str(Path(model).expanduser().resolve())
        results = ray.data.from_items(windows, override_num_blocks=len(windows)).map_batches(
            _ShardWorker,
            batch_size=1,
            batch_format="numpy",
            concurrency=min(concurrency, len(windows)),  # no idle actor for a short corpus
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            fn_constructor_kwargs={
                "model": model,
                "directory": str(directory.resolve()),
                "names": names,
                "batch_size": batch_size,
                "max_length": max_length,
                "pooling": pooling,
                "threads": max(1, int(num_cpus)),
                "device": device,
                "die_once": _die_once,
            },
        )
        context = ray.data.DataContext.get_current()
        shown = context.enable_progress_bars
        context.enable_progress_bars = progress
        try:
            _collect(results, directory, manifest, _stop_after_shards)
        finally:
            context.enable_progress_bars = shown
    finish_output(directory, manifest)
    return directory


@dataclass(frozen=True)
class ParquetRows:
    """A window of a corpus made of Parquet files read one after another, described rather than
    shipped: ``(file, first row, end row)`` in each file it spans. The actor reads the text
    column of only the row groups it needs."""

    segments: tuple[tuple[str, int, int], ...]
    column: str

    def read(self) -> list[str]:
        import pyarrow.parquet as pq

        texts: list[str] = []
        for path, start, stop in self.segments:
            parquet = pq.ParquetFile(path)
            groups, first, offset = [], 0, 0
            for i in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(i).num_rows
                if offset < stop and offset + rows > start:
                    first = first if groups else offset
                    groups.append(i)
                offset += rows
            table = parquet.read_row_groups(groups, columns=[self.column])
            values = table.column(self.column).slice(start - first, stop - start).to_pylist()
            texts.extend(str(v) for v in values)  # as the command line reads a Parquet file
        return texts


@dataclass(frozen=True)
class LineRows:
    """A window of a corpus made of text or JSON-lines files read one after another, described
    rather than shipped: ``(file, position, texts)`` in each file it spans, where ``position``
    is where its first text's line starts (a ``tell()`` of the file opened as
    :func:`hooked_encoder.corpus.open_lines` opens it)."""

    segments: tuple[tuple[str, int, int], ...]
    field: str

    def read(self) -> list[str]:
        texts: list[str] = []
        for path, position, count in self.segments:
            with open_lines(path) as handle:
                handle.seek(position)
                suffix = Path(path).suffix.lower()
                texts.extend(records(handle, suffix, self.field, path, limit=count))
        return texts


def _read(payload: Any) -> list[Any]:
    return payload.read() if isinstance(payload, ParquetRows | LineRows) else payload


def _input_files(data: Any) -> list[Path] | None:
    """``data`` as input files: a ``pathlib.Path`` or a list of them, all ``.parquet`` or all
    line files (text, ``.jsonl``, ``.ndjson``); CSV is read by the command line only."""
    paths = [data] if isinstance(data, Path) else data
    if not (isinstance(paths, list | tuple) and paths and all(isinstance(p, Path) for p in paths)):
        return None
    suffixes = {p.suffix.lower() for p in paths}
    if ".csv" in suffixes or (".parquet" in suffixes and len(suffixes) > 1):
        raise ValueError(
            "files given as input must be all .parquet, or all text / .jsonl / .ndjson files, "
            f"got {[str(p) for p in paths]}"
        )
    return list(paths)


def _line_index(
    files: list[Path], field: str, shard_rows: int
) -> list[tuple[str, int, dict[int, int]]]:
    """Each line file's absolute path, number of texts, and the position of every text whose
    index in the whole corpus is a multiple of ``shard_rows`` (where windows start). Reads the
    files once, without keeping or parsing the texts (a JSON-lines file's first record is
    checked for ``field``)."""
    index, total = [], 0
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        starts: dict[int, int] = {}
        count = 0
        with open_lines(str(path)) as handle:
            while True:
                position = handle.tell()
                line = handle.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                if count == 0 and path.suffix.lower() in JSON_LINES:
                    next(records(io.StringIO(line), path.suffix.lower(), field, str(path)))
                if (total + count) % shard_rows == 0:
                    starts[count] = position
                count += 1
        index.append((str(path.resolve()), count, starts))
        total += count
    return index


def _line_windows(
    index: list[tuple[str, int, dict[int, int]]], field: str, manifest: dict[str, Any]
):
    """The windows ``pending_windows`` would give for these files' texts, as LineRows."""
    for shard, start, spans in _file_windows([count for _, count, _ in index], manifest):
        segments = []
        for i, first, stop in spans:
            path, _, starts = index[i]
            # A window starts in a file at a multiple of shard_rows, or at the file's start.
            segments.append((path, starts[first] if first else 0, stop - first))
        yield shard, start, LineRows(tuple(segments), field)


def _file_windows(counts: list[int], manifest: dict[str, Any]):
    """The windows ``pending_windows`` would give for a corpus made of files of ``counts``
    rows each, read one after another: ``(shard, first row, spans)`` with one ``(file index,
    first row, end row)`` span, in that file's rows, for each file the window covers."""
    done = sum(s["rows"][1] - s["rows"][0] for s in manifest["shards"])
    shard_rows = manifest["arguments"]["shard_rows"]
    total = sum(counts)
    for k, start in enumerate(range(done, total, shard_rows)):
        stop = min(start + shard_rows, total)
        spans, offset = [], 0
        for i, rows in enumerate(counts):
            if offset < stop and offset + rows > start:
                spans.append((i, max(start - offset, 0), min(stop - offset, rows)))
            offset += rows
        yield len(manifest["shards"]) + k, start, spans


def _parquet_counts(files: list[Path], column: str) -> list[tuple[str, int]]:
    """Each file's absolute path and row count, from its metadata alone."""
    import pyarrow.parquet as pq

    counts = []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        parquet = pq.ParquetFile(path)
        if column not in parquet.schema_arrow.names:
            raise KeyError(
                f"text_column {column!r} is not a column of {path}: {parquet.schema_arrow.names}"
            )
        counts.append((str(path.resolve()), parquet.metadata.num_rows))
    return counts


def _parquet_windows(counts: list[tuple[str, int]], column: str, manifest: dict[str, Any]):
    """The windows ``pending_windows`` would give for these files' rows, as ParquetRows."""
    for shard, start, spans in _file_windows([rows for _, rows in counts], manifest):
        segments = tuple((counts[i][0], first, stop) for i, first, stop in spans)
        yield shard, start, ParquetRows(segments, column)


def _rows(ray: Any, data: Any, text_column: str) -> Iterable[Any]:
    """The inputs in order: a Dataset's ``text_column`` (checked now), or the iterable."""
    if not isinstance(data, ray.data.Dataset):
        return iter(data)
    columns = data.schema().names
    if text_column not in columns:
        raise KeyError(f"text_column {text_column!r} is not a column of the dataset: {columns}")
    return _dataset_rows(ray, data, text_column)


def _dataset_rows(ray: Any, data: Any, text_column: str) -> Iterable[Any]:
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # windows are rows in the dataset's order
    try:
        for batch in data.iter_batches(batch_format="numpy", batch_size=4096):
            for value in batch[text_column]:
                yield value.item() if isinstance(value, np.generic) else value
    finally:
        context.execution_options.preserve_order = ordered


def _collect(results: Any, directory: Path, manifest: dict[str, Any], stop_after: int | None):
    """Lists shards in the manifest in order as the actors finish them (in any order)."""
    finished: dict[int, dict[str, Any]] = {}
    listed = 0
    for row in results.iter_rows():
        finished[int(row["shard"])] = json.loads(str(row["entry"]))
        while len(manifest["shards"]) in finished:
            add_shard(directory, manifest, finished.pop(len(manifest["shards"])))
            listed += 1
            if stop_after is not None and listed >= stop_after:
                raise _DriverStopped(f"stopped after {listed} shards (test switch)")
    if finished:
        raise RuntimeError(f"shards {sorted(finished)} finished but an earlier one never did")


class Embedder:
    """A callable class for ``ds.map_batches``: each actor loads the model once; every batch
    gets the sentence embedding of its ``text_column`` (``model.encode``; column ``embedding``,
    ``[rows, d]``), or, with ``hooks``, one column per hook point of activations ``pooling``
    reduced over tokens (``"mean"``, ``"cls"`` or ``"max"``; ``[rows, ...]``).

        ds = ray.data.read_parquet("corpus/")
        ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model": DEFAULT_MODEL},
                            concurrency=2, num_cpus=1, batch_size=64)

    Rows come back in completion order, not the dataset's, unless ``preserve_order`` is set.
    ``threads`` is the actor's Rust thread count: give it the ``num_cpus`` of ``map_batches``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Any,
        hooks: Any = None,
        pooling: Pooling = "mean",
        text_column: str = "text",
        batch_size: int = 32,
        normalize_embeddings: bool = False,
        threads: int = 1,
        device: str = "cpu",
    ) -> None:
        from . import set_num_threads
        from .extract import select_hooks

        set_num_threads(threads)
        self.model = _load_model(model, device)
        self.hooks = None if hooks is None else select_hooks(self.model, hooks)
        if self.hooks is not None and pooling is None:
            raise ValueError("Embedder returns one vector per row: choose a pooling")
        self.pooling, self.text_column = pooling, text_column
        self.batch_size, self.normalize = batch_size, normalize_embeddings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.text_column not in batch:
            raise KeyError(f"text_column {self.text_column!r} is not a column: {list(batch)}")
        texts = [str(t) for t in batch[self.text_column]]
        if self.hooks is None:
            batch["embedding"] = self.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=self.normalize
            )
            return batch
        extraction = self.model.extract(
            texts, self.hooks, batch_size=self.batch_size, pooling=self.pooling, progress=False
        )
        for hook in self.hooks:
            batch[hook] = extraction[hook]
        return batch
