"""Activation patching with TransformerLens's functions, names, arguments and output shapes
(``transformer_lens.patching``), run as batched forwards.

    >>> from hooked_encoder import patching
    >>> _, clean_cache = model.run_with_cache(clean_tokens)
    >>> results = patching.get_act_patch_resid_pre(
    ...     model, corrupted_tokens, clean_cache, patching_metric
    ... )  # [n_layers, pos]

TransformerLens runs one full forward per patch. Here the corrupted run's residual stream is
computed once; every patch of layer ``l`` then starts from it at ``start_at_layer=l``, so only
the blocks from ``l`` on are rerun, and many patched runs go through one batched forward: each
patched run is a group of the corrupted batch's rows carrying its own patch, applied by the Rust
pass as a declarative edit (:mod:`hooked_encoder.interventions`), with no Python call during the
pass. A patch at an activation computed after attention has mixed the positions (``z``,
``result``, ``attn_out``, ``resid_mid``, the MLP's ``pre``/``post``, ``mlp_out``) changes its
block's output only at the patched positions, so that block is rerun at those positions alone
and the batched pass starts at the next block. With the :func:`logit_diff` metric the last block
after its attention and the MLM head run only at its position, and the unembedding only for its
two tokens. :func:`attribution_patch` estimates a whole sweep from one backward pass instead.
``rows_per_chunk`` bounds the rows of one forward (by default, what 512 MiB holds).
``patching_metric(logits)`` is called once per patched run on that run's logits, as in
TransformerLens (torch tensors for torch input, NumPy arrays otherwise). With TransformerLens's
setters (``layer_pos_patch_setter``, ...) the patch is batched; any other ``patch_setter`` runs
one ``run_with_hooks`` per patch, as TransformerLens does.

Unlike TransformerLens's, every function takes ``one_zero_attention_mask`` and
``token_type_ids`` for the corrupted run (the clean cache must come from inputs of the same
shape). Patches apply to padding positions too, as TransformerLens's setters do.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import interventions as iv
from ._memory import available_bytes

__all__ = [
    "LogitDiff",
    "attribution_patch",
    "generic_activation_patch",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_out",
    "get_act_patch_block_every",
    "get_act_patch_mlp_out",
    "get_act_patch_resid_mid",
    "get_act_patch_resid_pre",
    "layer_head_dest_src_pos_pattern_patch_setter",
    "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter",
    "layer_head_vector_patch_setter",
    "layer_pos_head_vector_patch_setter",
    "layer_pos_patch_setter",
    "logit_diff",
]

# TransformerLens's short activation names -> the hook suffix inside block {layer}.
_ACTIVATIONS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "pattern": "attn.hook_pattern",
    "attn_scores": "attn.hook_attn_scores",
    "result": "attn.hook_result",
    "pre": "mlp.hook_pre",
    "post": "mlp.hook_post",
}

# Activations computed after attention has mixed the positions, from which everything else in
# their block works position by position: a patch of one at position p changes the block's
# output at p alone.
_POSITION_LOCAL = frozenset({"z", "result", "attn_out", "resid_mid", "pre", "post", "mlp_out"})

# ---------------------------------------------------------------------- TransformerLens's setters


def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """Patches ``[:, pos, ...]`` for ``index = [layer, pos]`` (``[batch, pos, ...]`` points)."""
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """Patches ``[:, pos, head]`` for ``index = [layer, pos, head]`` (per-head vectors)."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """Patches ``[:, :, head]`` for ``index = [layer, head]`` (per-head vectors)."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """Patches ``[:, head, :, :]`` for ``index = [layer, head]`` (scores and patterns)."""
    _, head = index
    corrupted_activation[:, head, :, :] = clean_activation[:, head, :, :]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """Patches ``[:, head, dest_pos, :]`` for ``index = [layer, head, dest_pos]``."""
    _, head, dest = index
    corrupted_activation[:, head, dest, :] = clean_activation[:, head, dest, :]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """Patches ``[:, head, dest_pos, src_pos]`` for ``index = [layer, head, dest, src]``."""
    _, head, dest, src = index
    corrupted_activation[:, head, dest, src] = clean_activation[:, head, dest, src]
    return corrupted_activation


def _selection(setter: Callable, index: Sequence[int], shape: tuple[int, ...]) -> np.ndarray | None:
    """Where ``setter`` writes for ``index`` in one row's activation of ``shape`` (without the
    batch axis), as booleans broadcast against it; None for a setter we do not know."""
    rest = tuple(int(i) for i in index[1:])
    if setter is layer_pos_patch_setter:
        mask = np.zeros((shape[0],) + (1,) * (len(shape) - 1), bool)
    elif setter is layer_pos_head_vector_patch_setter:
        mask = np.zeros((shape[0], shape[1]) + (1,) * (len(shape) - 2), bool)
    elif setter is layer_head_vector_patch_setter:
        mask = np.zeros((1, shape[1]) + (1,) * (len(shape) - 2), bool)
        rest = (0, *rest)
    elif setter is layer_head_pattern_patch_setter:
        mask = np.zeros((shape[0], 1, 1), bool)
    elif setter is layer_head_pos_pattern_patch_setter:
        mask = np.zeros((shape[0], shape[1], 1), bool)
    elif setter is layer_head_dest_src_pos_pattern_patch_setter:
        mask = np.zeros(shape, bool)
    else:
        return None
    mask[rest] = True
    return mask


# ---------------------------------------------------------------------- metrics


class LogitDiff:
    """A patching metric: the mean over the batch of ``logits[:, position, good] -
    logits[:, position, bad]`` (TransformerLens's usual logit difference). Called on full
    logits like any metric; a sweep given one computes the last block after its attention and
    the MLM head only at ``position``, and the unembedding only for ``good`` and ``bad``."""

    def __init__(self, position: int, good: int, bad: int) -> None:
        for what, value in (("position", position), ("good", good), ("bad", bad)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"logit_diff's {what} must be an int, got {value!r}")
        self.position, self.good, self.bad = int(position), int(good), int(bad)

    def __call__(self, logits: Any) -> Any:
        return (logits[:, self.position, self.good] - logits[:, self.position, self.bad]).mean()

    def __repr__(self) -> str:
        return f"logit_diff(position={self.position}, good={self.good}, bad={self.bad})"

    def _unembedding(self, model: Any) -> tuple[np.ndarray, np.ndarray]:
        """The unembedding's columns and biases for ``good`` and ``bad``, ``[d, 2]`` and
        ``[2]``: read once per sweep (``W_U`` is the whole vocabulary, and a torch-format model
        copies it on every read)."""
        tokens = [self.good, self.bad]
        w_u, b_u = np.asarray(iv._host(model.W_U)), np.asarray(iv._host(model.b_U))
        return w_u[:, tokens], b_u[tokens]

    def _on_final_residual(
        self, model: Any, residual: np.ndarray, unembedding: tuple[np.ndarray, np.ndarray]
    ) -> np.ndarray:
        """The metric of each row of ``residual`` (the stream the MLM head reads, at
        ``position`` only: ``[rows, 1, d_model]``), with ``unembedding`` from
        :meth:`_unembedding`: ``[rows]``."""
        hidden = np.asarray(iv._host(model.mlm_head(residual)), np.float64)
        w_u, b_u = unembedding
        logits = hidden[:, 0] @ w_u + b_u  # [rows, 2]
        return logits[:, 0] - logits[:, 1]


def logit_diff(position: int, good: int, bad: int) -> LogitDiff:
    """A :class:`LogitDiff` metric: ``mean(logits[:, position, good] - logits[:, position,
    bad])``, which sweeps compute without the full MLM head."""
    return LogitDiff(position, good, bad)


# ---------------------------------------------------------------------- the sweep


def generic_activation_patch(
    model: Any,
    corrupted_tokens: Any,
    clean_cache: Any,
    patching_metric: Callable[[Any], Any],
    patch_setter: Callable,
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: Any = None,
    return_index_df: bool = False,
    *,
    one_zero_attention_mask: Any = None,
    token_type_ids: Any = None,
    rows_per_chunk: int | None = None,
) -> Any:
    """TransformerLens's ``generic_activation_patch``: the metric of the corrupted run with the
    clean activation ``activation_name`` (``"resid_pre"``, ``"z"``, ``"pattern"``, ...) patched
    in by ``patch_setter`` at every index tuple (``index_axis_names`` such as ``("layer",
    "pos")``, or the rows of a pandas ``index_df``, whose first column is the layer). Returns one
    value per index, shaped by the axes' ranges (flat with ``index_df``), as a torch tensor for
    torch input and a NumPy array otherwise."""
    if activation_name not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation_name {activation_name!r}; known: {sorted(_ACTIVATIONS)}"
        )
    is_torch = type(corrupted_tokens).__module__.startswith("torch")
    tokens = np.asarray(iv._host(corrupted_tokens)).astype(np.int64)
    if tokens.ndim == 1:
        tokens = tokens[None]
    batch, pos = tokens.shape
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give index_axis_names or index_df")
        ranges = {
            "layer": model.cfg.n_layers,
            "pos": pos,
            "head_index": model.cfg.n_heads,
            "head": model.cfg.n_heads,
            "src_pos": pos,
            "dest_pos": pos,
        }
        unknown = [axis for axis in index_axis_names if axis not in ranges]
        if unknown:
            raise ValueError(f"unknown index axes {unknown}; known: {sorted(ranges)}")
        shape = tuple(ranges[axis] for axis in index_axis_names)
        indices = list(itertools.product(*(range(n) for n in shape)))
    else:
        if index_axis_names is not None:
            raise ValueError("give index_axis_names or index_df, not both")
        indices = [tuple(int(v) for v in row) for row in np.asarray(index_df)]
        shape = (len(indices),)
    results = np.zeros(len(indices), dtype=np.float32)
    mask = (
        None if one_zero_attention_mask is None else np.asarray(iv._host(one_zero_attention_mask))
    )
    types = None if token_type_ids is None else np.asarray(iv._host(token_type_ids))
    suffix = _ACTIVATIONS[activation_name]
    model_input = corrupted_tokens if is_torch else tokens
    fast = isinstance(patching_metric, LogitDiff) and model.has_mlm_head
    if fast and not 0 <= patching_metric.position < pos:
        raise ValueError(f"{patching_metric!r}: position is outside the {pos} positions")
    unembedding = patching_metric._unembedding(model) if fast else None

    def metric_of(logits: Any) -> float:
        value = patching_metric(logits)
        return float(value.item() if hasattr(value, "item") else value)

    local = activation_name in _POSITION_LOCAL
    n_layers = model.cfg.n_layers

    @functools.cache
    def corrupted() -> Any:
        """The corrupted run's residual stream entering every block (and its z, for patches at
        a position-local activation): computed once, when a batched sweep first needs it."""
        _, cache = model.run_with_cache(
            tokens,
            return_type=None,
            names_filter=lambda name: (
                name.endswith("hook_resid_pre") or (local and name.endswith("attn.hook_z"))
            ),
            one_zero_attention_mask=mask,
            token_type_ids=types,
        )
        return cache

    def entering(layer: int) -> np.ndarray:
        """The corrupted residual stream entering block ``layer`` (``n_layers``: leaving the
        last block, before any final norm)."""
        if layer < n_layers:
            return np.asarray(iv._host(corrupted()[f"blocks.{layer}.hook_resid_pre"]), np.float32)
        last = model.forward(
            tokens,
            return_type=None,
            stop_at_layer=n_layers,
            one_zero_attention_mask=mask,
            token_type_ids=types,
        )
        return np.asarray(iv._host(last), np.float32)

    per_chunk: int | None = None  # patched runs per forward, sized at the first batched layer
    by_layer: dict[int, list[int]] = {}
    for i, index in enumerate(indices):
        by_layer.setdefault(int(index[0]), []).append(i)
    for layer, members in by_layer.items():
        name = f"blocks.{layer}.{suffix}"
        if name not in model.hook_dict:
            raise ValueError(f"{name} is not a hook point of this model")
        clean = np.asarray(iv._host(clean_cache[name]), dtype=np.float32)
        if clean.shape[0] != batch:
            raise ValueError(
                f"the clean cache's {name} has {clean.shape[0]} rows, the corrupted input {batch}"
            )
        selections = [_selection(patch_setter, indices[i], clean.shape[1:]) for i in members]
        if any(selection is None for selection in selections):
            # A setter of the caller's own: one run per patch, as TransformerLens.
            for i in members:
                hook = functools.partial(_setter_hook, patch_setter, indices[i], clean)
                logits = model.run_with_hooks(
                    model_input,
                    fwd_hooks=[(name, hook)],
                    one_zero_attention_mask=mask,
                    token_type_ids=types,
                )
                results[i] = metric_of(logits)
            continue
        resid = entering(layer)
        if local:
            after = entering(layer + 1)
            z = np.asarray(iv._host(corrupted()[f"blocks.{layer}.attn.hook_z"]), np.float32)
        if per_chunk is None:
            rows = _rows_per_chunk(model, batch, pos, clean, rows_per_chunk, logits=not fast)
            per_chunk = max(1, rows // batch)
        for start in range(0, len(members), per_chunk):
            chunk = list(range(start, min(start + per_chunk, len(members))))
            n = len(chunk)
            picked = [selections[j] for j in chunk]
            if local:
                # Block `layer` reruns only at the patched positions; the pass starts after it.
                x = _block_outputs_patched_at(model, layer, name, picked, clean, resid, z, after)
                first, edits = layer + 1, None
            else:
                # [n * batch, ...]: each patched run's rows carry its own selection.
                patch = iv.replace(
                    name,
                    np.tile(clean, (n,) + (1,) * (clean.ndim - 1)),
                    where=np.repeat(np.stack(picked), batch, axis=0),
                    include_padding=True,
                )
                x = np.tile(resid, (n, 1, 1))
                first, edits = layer, [patch]
            chunk_mask = None if mask is None else np.tile(mask, (n, 1))
            if fast:
                # Only the metric's position and tokens: the head on one position per row.
                final = model._run_from_residual(
                    x, first, None, "residual", chunk_mask, edits, patching_metric.position
                )
                residual = np.asarray(iv._host(final), np.float32)
                values = patching_metric._on_final_residual(model, residual, unembedding)
                for k, j in enumerate(chunk):
                    results[members[j]] = values[k * batch : (k + 1) * batch].mean()
                continue
            logits = model.forward(
                _like(x, corrupted_tokens) if is_torch else x,
                start_at_layer=first,
                one_zero_attention_mask=chunk_mask,
                interventions=edits,
            )
            for k, j in enumerate(chunk):
                results[members[j]] = metric_of(logits[k * batch : (k + 1) * batch])
    out = results.reshape(shape)
    if is_torch:
        import torch

        out = torch.from_numpy(out)
    if return_index_df:
        return out, index_df if index_df is not None else _index_frame(indices, index_axis_names)
    return out


def _block_outputs_patched_at(
    model: Any,
    layer: int,
    name: str,
    selections: list[np.ndarray],
    clean: np.ndarray,
    resid: np.ndarray,
    z: np.ndarray,
    after: np.ndarray,
) -> np.ndarray:
    """The residual stream leaving block ``layer`` in each patched run (``[len(selections) *
    batch, pos, d_model]``) for patches of ``name``, a position-local activation (see
    ``_POSITION_LOCAL``): the corrupted run's stream ``after`` except at the positions a patch
    touches, where the block is rerun on each such position alone, as a sequence of one,
    starting from the corrupted ``resid`` there. Its attention (which would see only that
    position) is overridden by the corrupted run's ``z`` there, then ``name`` is patched from
    ``clean``: the block's output at that position is exactly the full patched run's."""
    batch = resid.shape[0]
    shape = clean.shape[1:]
    runs, rows, positions, wheres = [], [], [], []
    for k, selection in enumerate(selections):
        selected = np.broadcast_to(selection, shape)
        for p in np.flatnonzero(selected.reshape(shape[0], -1).any(axis=1)):
            for b in range(batch):
                runs.append(k * batch + b)
                rows.append(b)
                positions.append(p)
                wheres.append(selected[p])
    out = np.tile(after, (len(selections), 1, 1))
    if not runs:
        return out
    rows_, positions_ = np.array(rows), np.array(positions)
    fixed = iv.replace(f"blocks.{layer}.attn.hook_z", z[rows_, positions_][:, None])
    patch = iv.replace(
        name,
        clean[rows_, positions_][:, None],
        where=np.stack(wheres)[:, None],
        include_padding=True,
    )
    one_position = resid[rows_, positions_][:, None]
    block_out = model._run_from_residual(
        one_position, layer, layer + 1, "residual", None, [fixed, patch]
    )
    out[np.array(runs), positions_] = np.asarray(iv._host(block_out), np.float32)[:, 0]
    return out


def _setter_hook(setter: Callable, index: Sequence[int], clean: np.ndarray, activation, hook):
    return setter(activation, list(index), clean)


def _like(x: np.ndarray, example: Any) -> Any:
    import torch

    return torch.from_numpy(x).to(example.device) if hasattr(example, "device") else x


def _rows_per_chunk(
    model: Any, batch: int, pos: int, clean: np.ndarray, given: int | None, logits: bool = True
) -> int:
    """Rows per batched forward: ``given``, or what 512 MiB holds (a quarter of the available
    memory if that is less): the logits (unless the metric needs none: ``logit_diff``), the
    working set of a block, the patch values and mask; at least one patched run. Peak memory
    follows the chunk while time hardly does (``bench/patching_speed.py --only chunks``)."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"rows_per_chunk must be a positive int, got {given!r}")
        return max(given, batch)
    cfg = model.cfg
    per_position = 6 * cfg.d_model + 3 * cfg.n_heads * cfg.d_head + 2 * cfg.d_mlp
    per_row = 4 * pos * (per_position + (cfg.d_vocab if logits else 0))
    per_row += 5 * clean[0].size  # the patch value (float32) and its mask (uint8)
    budget = min(512 << 20, (available_bytes() or 4 << 30) // 4)
    return int(max(batch, budget // per_row))


def _index_frame(indices: list[tuple[int, ...]], names: Sequence[str]) -> Any:
    import pandas as pd

    return pd.DataFrame(indices, columns=list(names))


def _specialised(
    name: str, setter: Callable, activation: str, axes: tuple[str, ...], doc: str
) -> Callable:
    def patch(
        model: Any,
        corrupted_tokens: Any,
        clean_cache: Any,
        patching_metric: Callable[[Any], Any],
        **kwargs: Any,
    ) -> Any:
        return generic_activation_patch(
            model,
            corrupted_tokens,
            clean_cache,
            patching_metric,
            patch_setter=setter,
            activation_name=activation,
            index_axis_names=axes,
            **kwargs,
        )

    patch.__name__ = patch.__qualname__ = name
    patch.__doc__ = (
        f"{doc} (TransformerLens's; also takes ``one_zero_attention_mask``, "
        "``token_type_ids`` and ``rows_per_chunk``)."
    )
    return patch


get_act_patch_resid_pre = _specialised(
    "get_act_patch_resid_pre",
    layer_pos_patch_setter,
    "resid_pre",
    ("layer", "pos"),
    "``[n_layers, pos]``: resid_pre patches",
)
get_act_patch_resid_mid = _specialised(
    "get_act_patch_resid_mid",
    layer_pos_patch_setter,
    "resid_mid",
    ("layer", "pos"),
    "``[n_layers, pos]``: resid_mid patches",
)
get_act_patch_attn_out = _specialised(
    "get_act_patch_attn_out",
    layer_pos_patch_setter,
    "attn_out",
    ("layer", "pos"),
    "``[n_layers, pos]``: attn_out patches",
)
get_act_patch_mlp_out = _specialised(
    "get_act_patch_mlp_out",
    layer_pos_patch_setter,
    "mlp_out",
    ("layer", "pos"),
    "``[n_layers, pos]``: mlp_out patches",
)
get_act_patch_attn_head_out_by_pos = _specialised(
    "get_act_patch_attn_head_out_by_pos",
    layer_pos_head_vector_patch_setter,
    "z",
    ("layer", "pos", "head"),
    "``[n_layers, pos, n_heads]``: each head's z at each position",
)
get_act_patch_attn_head_q_by_pos = _specialised(
    "get_act_patch_attn_head_q_by_pos",
    layer_pos_head_vector_patch_setter,
    "q",
    ("layer", "pos", "head"),
    "``[n_layers, pos, n_heads]``: each head's queries at each position",
)
get_act_patch_attn_head_k_by_pos = _specialised(
    "get_act_patch_attn_head_k_by_pos",
    layer_pos_head_vector_patch_setter,
    "k",
    ("layer", "pos", "head"),
    "``[n_layers, pos, n_heads]``: each head's keys at each position",
)
get_act_patch_attn_head_v_by_pos = _specialised(
    "get_act_patch_attn_head_v_by_pos",
    layer_pos_head_vector_patch_setter,
    "v",
    ("layer", "pos", "head"),
    "``[n_layers, pos, n_heads]``: each head's values at each position",
)
get_act_patch_attn_head_pattern_by_pos = _specialised(
    "get_act_patch_attn_head_pattern_by_pos",
    layer_head_pos_pattern_patch_setter,
    "pattern",
    ("layer", "head_index", "dest_pos"),
    "``[n_layers, n_heads, dest_pos]``: each head's pattern row at each destination",
)
get_act_patch_attn_head_pattern_dest_src_pos = _specialised(
    "get_act_patch_attn_head_pattern_dest_src_pos",
    layer_head_dest_src_pos_pattern_patch_setter,
    "pattern",
    ("layer", "head_index", "dest_pos", "src_pos"),
    "``[n_layers, n_heads, dest_pos, src_pos]``: each pattern entry",
)
get_act_patch_attn_head_out_all_pos = _specialised(
    "get_act_patch_attn_head_out_all_pos",
    layer_head_vector_patch_setter,
    "z",
    ("layer", "head"),
    "``[n_layers, n_heads]``: each head's z at every position",
)
get_act_patch_attn_head_q_all_pos = _specialised(
    "get_act_patch_attn_head_q_all_pos",
    layer_head_vector_patch_setter,
    "q",
    ("layer", "head"),
    "``[n_layers, n_heads]``: each head's queries at every position",
)
get_act_patch_attn_head_k_all_pos = _specialised(
    "get_act_patch_attn_head_k_all_pos",
    layer_head_vector_patch_setter,
    "k",
    ("layer", "head"),
    "``[n_layers, n_heads]``: each head's keys at every position",
)
get_act_patch_attn_head_v_all_pos = _specialised(
    "get_act_patch_attn_head_v_all_pos",
    layer_head_vector_patch_setter,
    "v",
    ("layer", "head"),
    "``[n_layers, n_heads]``: each head's values at every position",
)
get_act_patch_attn_head_pattern_all_pos = _specialised(
    "get_act_patch_attn_head_pattern_all_pos",
    layer_head_pattern_patch_setter,
    "pattern",
    ("layer", "head_index"),
    "``[n_layers, n_heads]``: each head's whole pattern",
)


def _stack(results: list[Any]) -> Any:
    if type(results[0]).__module__.startswith("torch"):
        import torch

        return torch.stack(results)
    return np.stack(results)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Any:
    """``[3, n_layers, pos]``: resid_pre, attn_out and mlp_out patches (TransformerLens's)."""
    return _stack(
        [
            get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric, **kwargs),
            get_act_patch_attn_out(model, corrupted_tokens, clean_cache, metric, **kwargs),
            get_act_patch_mlp_out(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ]
    )


def get_act_patch_attn_head_all_pos_every(
    model, corrupted_tokens, clean_cache, metric, **kwargs
) -> Any:
    """``[5, n_layers, n_heads]``: every head's z, q, k, v and pattern, each at every position
    (TransformerLens's)."""
    return _stack(
        [
            get_act_patch_attn_head_out_all_pos(
                model, corrupted_tokens, clean_cache, metric, **kwargs
            ),
            get_act_patch_attn_head_q_all_pos(
                model, corrupted_tokens, clean_cache, metric, **kwargs
            ),
            get_act_patch_attn_head_k_all_pos(
                model, corrupted_tokens, clean_cache, metric, **kwargs
            ),
            get_act_patch_attn_head_v_all_pos(
                model, corrupted_tokens, clean_cache, metric, **kwargs
            ),
            get_act_patch_attn_head_pattern_all_pos(
                model, corrupted_tokens, clean_cache, metric, **kwargs
            ),
        ]
    )


def get_act_patch_attn_head_by_pos_every(
    model, corrupted_tokens, clean_cache, metric, **kwargs
) -> Any:
    """``[5, n_layers, pos, n_heads]``: every head's z, q, k, v at each position, and its
    pattern row at each destination (TransformerLens's)."""
    pattern = get_act_patch_attn_head_pattern_by_pos(
        model, corrupted_tokens, clean_cache, metric, **kwargs
    )
    return _stack(
        [
            get_act_patch_attn_head_out_by_pos(
                model, corrupted_tokens, clean_cache, metric, **kwargs
            ),
            get_act_patch_attn_head_q_by_pos(
                model, corrupted_tokens, clean_cache, metric, **kwargs
            ),
            get_act_patch_attn_head_k_by_pos(
                model, corrupted_tokens, clean_cache, metric, **kwargs
            ),
            get_act_patch_attn_head_v_by_pos(
                model, corrupted_tokens, clean_cache, metric, **kwargs
            ),
            pattern.permute(0, 2, 1) if hasattr(pattern, "permute") else pattern.transpose(0, 2, 1),
        ]
    )


# What each attribution sums over, by the axes of its result (after "layer"): the activation's
# axes, without batch, named as in the hook table.
_ATTRIBUTION_AXES = {
    ("pos",): ("pos", None),
    ("pos", "head"): ("pos", "head", None),
    ("head",): (None, "head", None),
    ("head_index", "dest_pos"): ("head", "dest", None),
    ("head_index",): ("head", None, None),
}


def attribution_patch(
    model: Any,
    corrupted_tokens: Any,
    clean_cache: Any,
    patching_metric: Callable[[Any], Any] | None,
    activation_name: str,
    index_axis_names: Sequence[str],
    *,
    grad_output: Any = None,
    one_zero_attention_mask: Any = None,
    token_type_ids: Any = None,
) -> Any:
    """Attribution patching: the first-order estimate of every patch of a sweep
    (``generic_activation_patch`` with the same ``activation_name`` and ``index_axis_names``,
    same output shape) from one forward and one backward pass of the corrupted run:
    ``Σ (clean - corrupted) · d metric / d activation`` over the batch and the axes the index
    leaves out. ``patching_metric`` is differentiated by torch on the corrupted logits
    (or give ``grad_output``, d metric / d logits, without torch).

    Axes: ``("layer", "pos")`` for ``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out``;
    ``("layer", "pos", "head")`` and ``("layer", "head")`` for ``z``, ``q``, ``k``, ``v``;
    ``("layer", "head_index", "dest_pos")`` and ``("layer", "head_index")`` for ``pattern``.
    """
    if activation_name not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation_name {activation_name!r}; known: {sorted(_ACTIVATIONS)}"
        )
    axes = tuple(index_axis_names)
    if not axes or axes[0] != "layer" or axes[1:] not in _ATTRIBUTION_AXES:
        raise ValueError(
            f"index_axis_names must be 'layer' then one of {sorted(_ATTRIBUTION_AXES)}, "
            f"got {axes!r}"
        )
    is_torch = type(corrupted_tokens).__module__.startswith("torch")
    names = [
        f"blocks.{layer}.{_ACTIVATIONS[activation_name]}" for layer in range(model.cfg.n_layers)
    ]
    _, cache = model.run_with_cache(
        corrupted_tokens,
        names_filter=names,
        incl_bwd=True,
        metric=patching_metric if grad_output is None else None,
        grad_output=grad_output,
        one_zero_attention_mask=one_zero_attention_mask,
        token_type_ids=token_type_ids,
    )
    keep = _ATTRIBUTION_AXES[axes[1:]]
    per_layer = []
    for name in names:
        corrupted = np.asarray(iv._host(cache[name]), np.float64)
        clean = np.asarray(iv._host(clean_cache[name]), np.float64)
        grad = np.asarray(iv._host(cache[f"{name}_grad"]), np.float64)
        if clean.shape != corrupted.shape:
            raise ValueError(
                f"the clean cache's {name} has shape {list(clean.shape)}, the corrupted run's "
                f"{list(corrupted.shape)}"
            )
        product = ((clean - corrupted) * grad).sum(axis=0)  # over the batch
        if len(keep) != product.ndim:
            raise ValueError(
                f"index axes {axes!r} do not fit {activation_name} (shape {list(clean.shape)})"
            )
        summed = tuple(i for i, axis in enumerate(keep) if axis is None)
        per_layer.append(product.sum(axis=summed))
    out = np.stack(per_layer).astype(np.float32)
    if is_torch:
        import torch

        return torch.from_numpy(out)
    return out
