"""Attention patterns as pictures (needs matplotlib: ``pip install 'hooked-encoder[plot]'``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .hooked_encoder import HookedEncoder


def plot_attention(
    model: HookedEncoder, text: str, layer: int, head: int | None, out: str | os.PathLike[str]
) -> None:
    """Draws ``blocks.{layer}.attn.hook_pattern`` for ``text`` (one head, or the mean over
    heads) as a heatmap with the token strings on both axes, and saves it to ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("drawing needs matplotlib: pip install 'hooked-encoder[plot]'") from None
    _, cache = model.run_with_cache(
        text, names_filter=f"blocks.{layer}.attn.hook_pattern", return_type=None
    )
    pattern = np.asarray(cache["pattern", layer])[0]
    pattern = pattern.mean(0) if head is None else pattern[head]
    tokens = model.to_str_tokens(text)
    size = max(4.0, 0.35 * len(tokens) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    image = ax.imshow(pattern, cmap="Blues", vmin=0.0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90)
    ax.set_yticks(range(len(tokens)), tokens)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    which = "mean over heads" if head is None else f"head {head}"
    ax.set_title(f"layer {layer}, {which}")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
