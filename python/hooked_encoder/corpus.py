"""Reading a corpus of texts from a line-oriented file (one text per line, or one JSON object per
line), the same way wherever it is read: whole by the command line, or window by window by Ray
actors (:class:`hooked_encoder.ray.LineRows`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO

# Suffixes of files with one JSON object per line; any other line file holds one text per line.
JSON_LINES = (".jsonl", ".ndjson")


class CorpusError(ValueError):
    """A line of a corpus file that cannot be read (not JSON, or without the text field)."""


def open_lines(path: str) -> IO[str]:
    """``path`` opened as the corpus readers read it: UTF-8, lines split on any newline and kept
    with their endings, so that ``tell()`` positions are exact."""
    return open(path, encoding="utf-8", newline="")


def records(
    handle: IO[str], suffix: str, field: str | None, path: str, limit: int | None = None
) -> Iterator[str]:
    """The texts of the lines read from ``handle``, skipping blank lines: the line without its
    ``\\n`` for a text file, ``str(record[field])`` for JSON lines; at most ``limit``."""
    taken = 0
    for number, line in enumerate(iter(handle.readline, ""), 1):
        if limit is not None and taken >= limit:
            return
        if not line.strip():
            continue
        taken += 1
        if suffix not in JSON_LINES:
            yield line.rstrip("\n")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise CorpusError(
                f"{path}, line {number}: no field {field!r} (choose one with --text-field)"
            )
        yield str(record[field])
