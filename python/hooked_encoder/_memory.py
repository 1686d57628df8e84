"""Refusing, before any work, a forward pass whose results cannot fit in memory.

A cache of every hook on a large batch can need far more memory than the machine has (each
layer's attention patterns alone are ``batch * heads * pos²`` floats). Without this check the
process would allocate until the kernel's OOM killer ends it, with no message and no chance to
save anything; with it the caller gets an :class:`OutOfMemoryError` saying how much was needed.
The estimate counts what the call returns (recorded activations and the output) plus the
largest activations alive at once while a block runs; it is a lower bound, so it never refuses
a call that would have fitted.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ._core import HookedEncoderError
from .hook_points import describe_hook

# Below this, a call is assumed to fit without asking the kernel.
_ALWAYS_FITS = 256 << 20


class OutOfMemoryError(HookedEncoderError, MemoryError):
    """A call would need more memory than is available; nothing was computed."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def available_bytes() -> int | None:
    """Memory this process can still get: ``MemAvailable``, or less under a cgroup limit.
    ``None`` where it cannot be read (not Linux)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    if match is None:
        return None
    available = int(match.group(1)) * 1024
    try:  # cgroup v2: a container's limit may be far below the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return available


def _shape_dims(cfg, batch: int, pos: int) -> dict[str, int]:
    return {
        "batch": batch,
        "pos": pos,
        "query": pos,
        "key": pos,
        "head": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_embed": cfg.d_embed or cfg.d_model,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
    }


def activation_bytes(name: str, dims: dict[str, int], cfg=None) -> int:
    shape, _ = describe_hook(name, cfg)
    names = [d.strip() for d in shape.strip("[]").split(",") if d.strip()]
    return 4 * math.prod(int(d) if d.isdigit() else dims[d] for d in names)


def check_fits(cfg, batch: int, pos: int, recorded: Iterable[str], output: str) -> None:
    """Raises :class:`OutOfMemoryError` if a pass over ``[batch, pos]`` recording ``recorded``
    and returning ``output`` ("logits", "residual", "next_sentence") cannot fit."""
    if str(cfg.device) != "cpu" or os.environ.get("HOOKED_ENCODER_NO_MEMORY_CHECK"):
        return
    dims = _shape_dims(cfg, batch, pos)
    cached = sum(activation_bytes(name, dims, cfg) for name in recorded)
    rows = batch * pos
    # Alive at once inside a block: its input, q/k/v, the MLP's hidden layer, a few residuals.
    working = 4 * rows * (6 * cfg.d_model + 3 * cfg.n_heads * cfg.d_head + 2 * cfg.d_mlp)
    result = 4 * rows * (cfg.d_vocab if output == "logits" else cfg.d_model)
    needed = cached + working + result
    if needed < _ALWAYS_FITS:
        return  # not worth reading /proc on every small call
    available = available_bytes()
    if available is None or needed <= available:
        return
    detail = f"{_gib(cached)} of cached activations, " if cached else ""
    raise OutOfMemoryError(
        f"a forward pass over a [{batch}, {pos}] batch would need at least {_gib(needed)} "
        f"({detail}{_gib(result)} of output, {_gib(working)} working memory), and "
        f"{_gib(available)} is available. Use smaller batches (model.extract streams a corpus "
        "in batches) or cache fewer hooks (names_filter)."
    )
