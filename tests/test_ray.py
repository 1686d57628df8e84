"""extract_ray(): the directory written by Ray actors is byte-identical to a single-process
``extract(out=...)`` (per token and pooled, with a last partial shard), resumes, survives a
worker that dies mid-window, and refuses bad arguments before any actor starts; Embedder in
``map_batches``; ``hooked-encoder extract --engine ray``.

One local Ray cluster for the module (a start costs seconds), sized for a 2-core machine."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import WORDS
from hooked_encoder import HookedEncoder, get_num_threads, load_extraction, set_num_threads

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'hooked-encoder[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'ray[data]'")

from hooked_encoder.ray import Embedder, _DriverStopped, extract_ray  # noqa: E402

HOOKS = ["blocks.*.hook_resid_post", "hook_full_embed"]
SHARD_ROWS, BATCH = 8, 3
# 29 texts of 1 to 9 words: 4 shards, the last one partial (5 rows).
_rng = np.random.default_rng(7)
TEXTS = [" ".join(_rng.choice(WORDS, size=_rng.integers(1, 10))) for _ in range(29)]


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=2,
        object_store_memory=80 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def text_model(text_checkpoint):
    return HookedEncoder.from_pretrained(text_checkpoint.path)


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file in the directory (temporary files would show up here too)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def references(text_model, tmp_path_factory):
    """Single-process extractions, with one thread like each one-CPU actor."""
    made = {}
    threads = get_num_threads()
    set_num_threads(1)
    try:
        for pooling in (None, "mean"):
            out = tmp_path_factory.mktemp(f"reference_{pooling}")
            text_model.extract(
                TEXTS, HOOKS, batch_size=BATCH, pooling=pooling, out=out, shard_rows=SHARD_ROWS
            )
            made[pooling] = out
    finally:
        set_num_threads(threads)
    return made


def run(model, out, pooling=None, data=TEXTS, **kwargs):
    return extract_ray(
        data,
        model=model,
        hooks=HOOKS,
        out=out,
        pooling=pooling,
        batch_size=BATCH,
        shard_rows=SHARD_ROWS,
        concurrency=2,
        num_cpus=1,
        **kwargs,
    )


def test_per_token_output_is_byte_identical(cluster, text_checkpoint, references, tmp_path):
    reference = references[None]
    assert sorted(digests(reference)) == [
        "manifest.json",
        *(f"shard-{k:05d}.safetensors" for k in range(4)),
    ]
    assert run(str(text_checkpoint.path), tmp_path) == tmp_path
    assert digests(tmp_path) == digests(reference)
    extraction = load_extraction(tmp_path)
    assert len(extraction) == len(TEXTS)


def test_pooled_output_from_an_in_memory_model_is_byte_identical(
    cluster, text_model, references, tmp_path
):
    run(text_model, tmp_path, pooling="mean")
    assert digests(tmp_path) == digests(references["mean"])


def test_a_dataset_is_read_in_its_order(cluster, text_checkpoint, references, tmp_path):
    data = ray.data.from_items([{"id": i, "body": t} for i, t in enumerate(TEXTS)])
    run(str(text_checkpoint.path), tmp_path, data=data, text_column="body")
    assert digests(tmp_path) == digests(references[None])


def test_parquet_files_are_read_by_the_actors(cluster, text_checkpoint, references, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hooked_encoder.ray import ParquetRows, _parquet_counts, _parquet_windows

    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(pa.table({"body": TEXTS[:13]}), files[0], row_group_size=5)
    pq.write_table(pa.table({"body": TEXTS[13:]}), files[1], row_group_size=5)
    # The driver describes windows (crossing row groups and files); it does not read texts.
    manifest = {"shards": [], "arguments": {"shard_rows": SHARD_ROWS}}
    windows = list(_parquet_windows(_parquet_counts(files, "body"), "body", manifest))
    assert [(k, start) for k, start, _ in windows] == [(0, 0), (1, 8), (2, 16), (3, 24)]
    assert windows[1][2].segments == ((str(files[0]), 8, 13), (str(files[1]), 0, 3))
    for _, start, rows in windows:
        assert isinstance(rows, ParquetRows)
        assert rows.read() == TEXTS[start : start + SHARD_ROWS]
    run(str(text_checkpoint.path), tmp_path / "out", data=files, text_column="body")
    assert digests(tmp_path / "out") == digests(references[None])
    with pytest.raises(KeyError, match="'text' is not a column"):
        run(str(text_checkpoint.path), tmp_path / "other", data=files)


def test_text_and_json_lines_files_are_read_by_the_actors(
    cluster, text_checkpoint, references, tmp_path
):
    from hooked_encoder.ray import LineRows, _line_index, _line_windows

    files = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    # Blank lines are skipped, as the command line reads such files; a blank line of non-ASCII
    # spaces checks that positions are exact (tell() positions count bytes, not characters).
    blank = "\n\n \u00a0\u2003\n"
    files[0].write_text(
        "\n".join(TEXTS[:5]) + blank + "\n".join(TEXTS[5:13]) + "\n", encoding="utf-8"
    )
    lines = [json.dumps({"id": i, "body": t}) for i, t in enumerate(TEXTS[13:])]
    files[1].write_text("\n".join([*lines[:4], "", *lines[4:]]) + "\n", encoding="utf-8")
    manifest = {"shards": [], "arguments": {"shard_rows": SHARD_ROWS}}
    index = _line_index(files, "body", SHARD_ROWS)
    assert [count for _, count, _ in index] == [13, len(TEXTS) - 13]
    windows = list(_line_windows(index, "body", manifest))
    assert [(k, start) for k, start, _ in windows] == [(0, 0), (1, 8), (2, 16), (3, 24)]
    assert [(Path(p).name, n) for p, _, n in windows[1][2].segments] == [
        ("a.txt", 5),
        ("b.jsonl", 3),
    ]
    for _, start, rows in windows:
        assert isinstance(rows, LineRows)
        assert rows.read() == TEXTS[start : start + SHARD_ROWS]
    run(str(text_checkpoint.path), tmp_path / "out", data=files, text_column="body")
    assert digests(tmp_path / "out") == digests(references[None])
    with pytest.raises(ValueError, match="no field 'text'"):
        run(str(text_checkpoint.path), tmp_path / "other", data=files)


def test_resume_computes_only_missing_shards(cluster, text_checkpoint, references, tmp_path):
    with pytest.raises(_DriverStopped):
        run(str(text_checkpoint.path), tmp_path, _stop_after_shards=2)
    listed = load_extraction(tmp_path)
    assert len(listed) == 2 * SHARD_ROWS
    kept = {k: (tmp_path / f"shard-{k:05d}.safetensors").stat().st_ino for k in (0, 1)}
    run(str(text_checkpoint.path), tmp_path)
    assert digests(tmp_path) == digests(references[None])
    # os.replace gives a rewritten shard a new inode: the listed ones were not computed again.
    assert {k: (tmp_path / f"shard-{k:05d}.safetensors").stat().st_ino for k in (0, 1)} == kept


def test_ray_resumes_a_single_process_run(
    cluster, text_model, text_checkpoint, references, tmp_path
):
    def stops_after(n):
        yield from TEXTS[:n]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        text_model.extract(
            stops_after(20), HOOKS, batch_size=BATCH, out=tmp_path, shard_rows=SHARD_ROWS
        )
    run(str(text_checkpoint.path), tmp_path)
    assert digests(tmp_path) == digests(references[None])


def test_a_worker_dying_mid_window_loses_and_duplicates_nothing(
    cluster, text_checkpoint, references, tmp_path
):
    sentinel = tmp_path / "died"
    out = tmp_path / "out"
    run(str(text_checkpoint.path), out, _die_once=str(sentinel))
    dead = int(sentinel.read_text())
    assert digests(out) == digests(references[None])
    starts = (tmp_path / "died.starts").read_text().split()
    # Ray restarted the actor whose process exited: its constructor ran in a new process.
    assert str(dead) in starts and len(starts) >= 3, starts
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)


def test_errors_come_before_any_actor_starts(cluster, text_checkpoint, tmp_path, monkeypatch):
    path = str(text_checkpoint.path)
    with pytest.raises(KeyError, match="matches no hook point"):
        extract_ray(TEXTS, model=path, hooks="blocks.*.nope", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    run(path, tmp_path / "b", data=TEXTS[:3])
    with pytest.raises(ValueError, match="holds an extraction made with other arguments"):
        run(path, tmp_path / "b", pooling="max", data=TEXTS[:3])
    data = ray.data.from_items([{"body": t} for t in TEXTS[:3]])
    with pytest.raises(KeyError, match="'text' is not a column"):
        run(path, tmp_path / "c", data=data)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'hooked-encoder\[ray\]'"):
        run(path, tmp_path / "d")


def test_embedder_adds_pooled_columns_in_map_batches(cluster, text_checkpoint, text_model):
    data = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    hook = "blocks.1.hook_resid_post"
    kwargs = {"model": str(text_checkpoint.path), "hooks": hook, "pooling": "max"}
    rows = data.map_batches(
        Embedder, fn_constructor_kwargs=kwargs, concurrency=2, num_cpus=1, batch_size=5
    ).take_all()
    assert sorted(r["id"] for r in rows) == list(range(len(TEXTS)))
    expected = text_model.extract(TEXTS, hook, pooling="max")[hook]
    for r in rows:
        np.testing.assert_allclose(r[hook], expected[r["id"]], atol=1e-5)
    embedded = data.map_batches(
        Embedder, fn_constructor_kwargs={"model": str(text_checkpoint.path)}, concurrency=1
    ).take_all()
    expected = text_model.encode(TEXTS)
    for r in embedded:
        np.testing.assert_allclose(r["embedding"], expected[r["id"]], atol=1e-5)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "csv"])
def test_command_line_engine_ray_uses_ray_address(
    cluster, text_checkpoint, references, tmp_path, fmt
):
    """Text, JSON-lines and Parquet files are read by the actors; CSV passes through the
    driver."""
    source = tmp_path / f"input.{fmt}"
    if fmt == "txt":
        source.write_text("\n".join(TEXTS) + "\n")
    elif fmt == "jsonl":
        source.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    elif fmt == "csv":
        with open(source, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text"])
            writer.writerows([t] for t in TEXTS)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": TEXTS}), source, row_group_size=10)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "hooked_encoder.cli", "extract", "--model", str(text_checkpoint.path),
        "--hooks", *HOOKS, "--input", str(source), "--out", str(out), "--batch-size", str(BATCH),
        "--engine", "ray", "--workers", "2", "--threads", "1", "--no-progress",
        "--shard-rows", str(SHARD_ROWS),
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert f"from {len(TEXTS)} texts" in result.stdout
    assert digests(out) == digests(references[None])
