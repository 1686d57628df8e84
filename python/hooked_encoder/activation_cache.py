"""``ActivationCache``: the activations of one forward pass, by hook name."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from .hooked_encoder import HookedEncoder

_SHORT_NAME = re.compile(r"([a-z_]+)(\d+)([a-z_]*)$")

# TransformerLens's aliases (utils.get_act_name).
_ACT_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
}
_LAYER_TYPE_ALIASES = {
    "a": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
    "attention": "attn",
}
# Where TransformerLens's generic names live on an encoder. TransformerLens itself raised
# KeyError for these (``cache["embed"]`` looked up ``hook_embed``); we resolve them.
_ENCODER_NAMES = {
    "hook_embed": "embed.hook_embed",
    "hook_pos_embed": "embed.hook_pos_embed",
    "hook_token_type_embed": "embed.hook_token_type_embed",
    "ln_final.hook_scale": "mlm_head.ln.hook_scale",
    "ln_final.hook_normalized": "mlm_head.ln.hook_normalized",
}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The full hook name for TransformerLens shorthand: ``("pattern", 0)`` is
    ``blocks.0.attn.hook_pattern``, ``("scale", 1, "ln2")`` is ``blocks.1.ln2.hook_scale`` and
    ``"resid_pre3"`` is ``blocks.3.hook_resid_pre``. Full names come back unchanged."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return _ENCODER_NAMES.get(name, name)
    match = _SHORT_NAME.match(name)
    if match is not None and layer is None:
        name, layer_text, layer_type = match.group(1), match.group(2), match.group(3) or None
        layer = int(layer_text)
    name = _ACT_ALIASES.get(name, name)
    full = f"blocks.{layer}." if layer is not None else ""
    if name in ("k", "v", "q", "z", "result", "pattern", "attn_scores"):
        layer_type = "attn"
    elif name in ("pre", "post"):
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return _ENCODER_NAMES.get(full, full)


_FILE_FORMAT = "hooked_encoder.ActivationCache"
_FILE_VERSION = "1"

# What a slice argument (pos_slice, batch_slice, neuron_slice) may be; as TransformerLens's
# ``utils.Slice``: None keeps everything, an int picks one entry and drops the dimension, a
# ``(start, stop[, step])`` tuple is a slice, a 1-D list/array of ints picks those entries.
# Also a torch integer tensor. (int | slice | tuple | Sequence[int] | np.ndarray | None)
SliceInput = Any


class NoMLMHeadError(AttributeError):
    """The model has no MLM head (a ``BertModel`` checkpoint), so there is no unembedding and no
    LayerNorm after the final residual stream."""


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _to_numpy(value: Any) -> np.ndarray:
    """A cache value (NumPy array or torch tensor) as a NumPy array, without copying if possible."""
    if _is_torch(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _to_torch(array: np.ndarray) -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            "torch tensors need PyTorch: pip install torch (or use NumPy caches)"
        ) from None
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)  # torch.from_numpy wants writeable, non-negative strides
    return torch.from_numpy(array)


def _convert(array: np.ndarray, as_torch: bool) -> Any:
    return _to_torch(array) if as_torch else array


def _index(value: SliceInput, what: str) -> Any:
    """A slice argument as a NumPy index for one axis (see ``SliceInput``)."""
    if value is None:
        return slice(None)
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an int, a slice, a tuple or a list of ints, not a bool")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, slice):
        return value
    if isinstance(value, tuple):
        if not 1 <= len(value) <= 3 or not all(
            v is None or isinstance(v, (int, np.integer)) for v in value
        ):
            raise TypeError(
                f"a tuple {what} means slice(start, stop[, step]) and must hold 1 to 3 ints or "
                f"None, got {value!r}"
            )
        return slice(*value)
    if _is_torch(value):
        value = _to_numpy(value)
    if isinstance(value, (list, np.ndarray)):
        array = np.asarray(value)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iub"):
            raise TypeError(
                f"a list or array {what} must be 1-D and hold integers (or booleans), got "
                f"shape {list(array.shape)} and dtype {array.dtype}"
            )
        return array.astype(np.int64) if array.size == 0 else array
    raise TypeError(
        f"{what} must be None, an int, a slice, a (start, stop[, step]) tuple or a 1-D list of "
        f"ints, got {type(value).__name__}"
    )


def _take(array: np.ndarray, index: Any, axis: int, what: str) -> np.ndarray:
    """``array`` indexed with ``index`` (from :func:`_index`) along ``axis``."""
    if isinstance(index, slice) and index == slice(None):
        return array
    if not -array.ndim <= axis < array.ndim:
        raise ValueError(
            f"cannot apply {what} to axis {axis} of an array of shape {list(array.shape)}"
        )
    axis %= array.ndim
    try:
        return array[(slice(None),) * axis + (index,)]
    except IndexError as e:
        raise IndexError(
            f"{what} {index!r} is out of range for a dimension of size {array.shape[axis]}: {e}"
        ) from None


class ActivationCache:
    """Activations by hook name, in firing order, as TransformerLens's ``ActivationCache``.

    Index with a full name (``cache["blocks.0.attn.hook_pattern"]``) or TransformerLens
    shorthand (``cache["pattern", 0]``, ``cache["resid_pre", -1]``, ``cache["scale", 0, "ln1"]``).
    Negative layers count from the end.

    Values are NumPy arrays, or torch tensors when the model returned torch tensors; the
    helpers compute in NumPy and return the cache's type. The analysis helpers follow
    TransformerLens's signatures but the meaning of a post-LN encoder (BERT): each block is
    ``resid_mid = resid_pre + attn_out``, ``ln1``, ``resid_post = ln1_out + mlp_out``, ``ln2``,
    so ``hook_resid_post`` is the sum *before* ``ln2``, the block output is
    ``hook_normalized_resid_post``, and component outputs do not add up to the residual stream.
    Each method's docstring says what it computes under that structure.
    """

    def __init__(
        self, cache_dict: dict[str, Any], model: HookedEncoder, has_batch_dim: bool = True
    ) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def _resolve(self, key: str | tuple) -> str:
        # Gradients (run_with_cache(incl_bwd=True)) are cached as "{name}_grad": shorthand
        # such as ("z_grad", 3) resolves the name, then adds the suffix back.
        name = key if isinstance(key, str) else key[0] if isinstance(key, tuple) and key else None
        if isinstance(name, str) and name.endswith("_grad") and key not in self.cache_dict:
            base = name[: -len("_grad")]
            rest = key[1:] if isinstance(key, tuple) else ()
            return self._resolve((base, *rest) if rest else base) + "_grad"
        if isinstance(key, str):
            return key if key in self.cache_dict else get_act_name(key)
        if isinstance(key, tuple) and 1 <= len(key) <= 3 and isinstance(key[0], str):
            name, layer = key[0], key[1] if len(key) > 1 else None
            layer_type = key[2] if len(key) > 2 else None
            if isinstance(layer, int) and layer < 0:
                layer += self.model.cfg.n_layers
            return get_act_name(name, layer, layer_type)
        raise KeyError(f"cannot index an ActivationCache with {key!r}")

    def __getitem__(self, key: str | tuple) -> Any:
        name = self._resolve(key)
        try:
            return self.cache_dict[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not in this cache"
                + (
                    ""
                    if name in self.model.hook_dict
                    else " (and is not a hook point of the model)"
                )
            ) from None

    def __contains__(self, key: object) -> bool:
        try:
            return isinstance(key, (str, tuple)) and self._resolve(key) in self.cache_dict
        except KeyError:  # a tuple that is not TransformerLens shorthand
            return False

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def remove_batch_dim(self) -> ActivationCache:
        """Drops the batch dimension of every entry in place; the batch must be of size 1."""
        if self.has_batch_dim:
            for name, value in self.cache_dict.items():
                if value.shape[0] != 1:
                    raise ValueError(
                        f"remove_batch_dim needs a batch of one, but {name} has batch size "
                        f"{value.shape[0]}"
                    )
                self.cache_dict[name] = value[0]
            self.has_batch_dim = False
        return self

    # ------------------------------------------------------------------ internals

    @property
    def _holds_torch(self) -> bool:
        return any(_is_torch(value) for value in self.cache_dict.values())

    def _out(self, array: np.ndarray, *inputs: Any) -> Any:
        """A result in the cache's type: a torch tensor if the cache (or an input) holds torch
        tensors, else the NumPy array."""
        return _convert(array, self._holds_torch or any(_is_torch(i) for i in inputs))

    def _np(self, key: str | tuple) -> np.ndarray:
        return _to_numpy(self[key])

    def _weight(self, key: str) -> np.ndarray:
        weights = getattr(self.model, "_tl_weights", None)
        if weights is None:
            weights = self.model.state_dict()
        if key not in weights:
            raise KeyError(f"the model has no weight {key!r}")
        return _to_numpy(weights[key])

    @property
    def _n_layers(self) -> int:
        return self.model.cfg.n_layers

    def _stack_layer(self, layer: int | None, what: str = "layer") -> int:
        """TransformerLens's convention for the ``layer`` of stacking methods: None or -1 is
        ``n_layers`` (everything up to the final residual stream); otherwise 0..n_layers."""
        n = self._n_layers
        if layer is None or layer == -1:
            return n
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"{what} must be an int or None, got {type(layer).__name__}")
        if not 0 <= layer <= n:
            raise ValueError(f"{what} must be in 0..{n} (or -1/None for {n}), got {layer}")
        return int(layer)

    def _block_layer(self, layer: int) -> int:
        """One block's index; negative counts from the end."""
        n = self._n_layers
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not -n <= layer < n:
            raise ValueError(f"layer must be in {-n}..{n - 1}, got {layer}")
        return int(layer) % n

    @property
    def _pre_ln(self) -> bool:
        """Whether the model's blocks are pre-LN (ModernBERT), where the residual stream is a
        plain sum of the embedding and every block's writes, as in TransformerLens's
        ``HookedTransformer``."""
        return self.model.cfg.pre_layer_norm

    def _resid_entering(self, layer: int) -> np.ndarray:
        """The residual stream that enters block ``layer`` (``blocks.{layer}.hook_resid_pre``),
        or for ``layer == n_layers`` the final residual stream: the last block's
        ``hook_normalized_resid_post`` (post-LN: what the MLM head reads) or ``hook_resid_post``
        (pre-LN: what ``ln_final`` reads)."""
        if layer == self._n_layers:
            last = "hook_resid_post" if self._pre_ln else "hook_normalized_resid_post"
            return self._np(f"blocks.{layer - 1}.{last}")
        return self._np(f"blocks.{layer}.hook_resid_pre")

    def _require_mlm_head(self, what: str) -> None:
        if not getattr(self.model, "has_mlm_head", True):
            raise NoMLMHeadError(
                f"{what} needs the MLM head, and this model has none (it was loaded from an "
                "encoder-only checkpoint such as BertModel)"
            )

    def _ln_scale_key(self, layer: int, mlp_input: bool) -> str:
        """The ``hook_scale`` of the LayerNorm whose output feeds the component at
        ``(layer, mlp_input)``; see :meth:`apply_ln_to_stack`."""
        if layer == self._n_layers:
            if mlp_input:
                raise ValueError(
                    "mlp_input=True needs a block: there is no MLP after the final residual stream"
                )
            if self._pre_ln:
                return "ln_final.hook_scale"
            self._require_mlm_head("the LayerNorm in front of the unembedding")
            return "mlm_head.ln.hook_scale"
        if self._pre_ln:
            # TransformerLens's choice: the LayerNorm reading the residual in front of the
            # component. ModernBERT's block 0 has none: its input is embed.ln's output.
            if mlp_input:
                return f"blocks.{layer}.ln2.hook_scale"
            key = f"blocks.{layer}.ln1.hook_scale"
            return key if key in self.model.hook_dict else "embed.ln.hook_scale"
        if mlp_input:
            return f"blocks.{layer}.ln1.hook_scale"
        return "embed.ln.hook_scale" if layer == 0 else f"blocks.{layer - 1}.ln2.hook_scale"

    # ------------------------------------------------------------------ batch and device

    def apply_slice_to_batch_dim(self, batch_slice: SliceInput) -> ActivationCache:
        """A new cache with ``batch_slice`` applied to the batch dimension of every entry.

        An int picks one row and drops the batch dimension (the new cache has
        ``has_batch_dim=False``); a slice, ``(start, stop[, step])`` tuple or list of ints keeps
        it. The entries are NumPy views (or torch tensors sharing memory) where indexing allows,
        as in TransformerLens. This is the same for pre- and post-LN models: every cached
        activation of an encoder carries the batch first.
        """
        index = _index(batch_slice, "batch_slice")
        if not self.has_batch_dim:
            if batch_slice is None:
                return ActivationCache(dict(self.cache_dict), self.model, has_batch_dim=False)
            raise ValueError("this cache has no batch dimension to slice")
        new = {}
        for name, value in self.cache_dict.items():
            taken = _take(_to_numpy(value), index, 0, "batch_slice")
            new[name] = _convert(taken, _is_torch(value))
        return ActivationCache(new, self.model, has_batch_dim=not isinstance(index, int))

    def to(self, device: Any) -> ActivationCache:
        """Returns this cache for ``"cpu"`` (where the activations always are); any other
        device is a ValueError, because the model computes and returns activations on the CPU."""
        if str(device) != "cpu":
            raise ValueError(f"cached activations live on the CPU; cannot move them to {device!r}")
        return self

    # ------------------------------------------------------------------ stacking

    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
    ) -> Any:
        """``[layers, ...]``: the activation ``get_act_name(activation_name, l, sublayer_type)``
        of every block ``l < layer`` (``layer=-1`` or None: all blocks), stacked on a new first
        axis, e.g. ``stack_activation("pattern")`` is ``[n_layers, batch, head, query, key]``.

        Names mean what the hook points mean on a post-LN encoder: ``"resid_post"`` is the sum
        before ``ln2``, and the block outputs are ``"normalized_resid_post"``.
        """
        layer = self._stack_layer(layer)
        if layer == 0:
            raise ValueError("layer=0 stacks no blocks; use layer >= 1 (or -1 for all)")
        names = [get_act_name(activation_name, lay, sublayer_type) for lay in range(layer)]
        return self._out(np.stack([self._np(name) for name in names]))

    def compute_head_results(self) -> None:
        """Adds ``blocks.{l}.attn.hook_result`` ``[batch, pos, head, d_model]`` for every layer
        that lacks it: ``einsum("...hd,hdm->...hm", hook_z, W_O[l])``, each head's write into
        the attention output, without ``b_O``.

        Summed over heads and plus ``b_O`` this is ``hook_attn_out``. Under post-LN that is
        added to ``hook_resid_pre`` to give ``hook_resid_mid``, which ``ln1`` then normalises, so
        a head result is a term of the residual only up to ``ln1``. The new entries go right
        after each layer's ``hook_z``, where the model fires ``hook_result`` when
        ``use_attn_result`` is on, so the cache stays in firing order.
        """
        added: dict[str, np.ndarray] = {}
        for layer in range(self._n_layers):
            key = f"blocks.{layer}.attn.hook_result"
            if key in self.cache_dict:
                continue
            z = self._np(f"blocks.{layer}.attn.hook_z")
            w_o = self._weight(f"blocks.{layer}.attn.W_O")
            added[key] = np.einsum("...hd,hdm->...hm", z, w_o).astype(z.dtype, copy=False)
        if not added:
            return
        as_torch = self._holds_torch
        items = []
        for name, value in self.cache_dict.items():
            items.append((name, value))
            result = name.replace(".attn.hook_z", ".attn.hook_result")
            if name.endswith(".attn.hook_z") and result in added:
                items.append((result, _convert(added.pop(result), as_torch)))
        items.extend((name, _convert(value, as_torch)) for name, value in added.items())
        # In place, so that a caller holding cache_dict sees the new entries too.
        self.cache_dict.clear()
        self.cache_dict.update(items)

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceInput = None,
        apply_ln: bool = False,
    ) -> Any:
        """``[layer * n_heads, batch, pos, d_model]``: the result of every head of the blocks
        before ``layer`` (-1/None: all), labelled ``L{l}H{h}``; see :meth:`compute_head_results`,
        which this calls first.

        ``incl_remainder`` appends ``"remainder"`` = the residual stream entering ``layer``
        (``blocks.{layer}.hook_resid_pre``, or for the last layer the final residual, as in
        :meth:`accumulated_resid`) minus the sum of the stacked heads, so the stack sums to that
        residual. Under post-LN the remainder is not a small leftover: the LayerNorms rescale
        and recentre everything after each head writes, so it holds the embeddings, MLPs, biases
        and all of that rescaling, and a head's row is not its share of the residual.
        ``apply_ln`` applies :meth:`apply_ln_to_stack` with this ``layer`` (read its caveats).
        """
        layer = self._stack_layer(layer)
        index = _index(pos_slice, "pos_slice")
        self.compute_head_results()
        parts = [
            _take(self._np(f"blocks.{lay}.attn.hook_result"), index, -3, "pos_slice")
            for lay in range(layer)
        ]
        labels = [f"L{lay}H{h}" for lay in range(layer) for h in range(self.model.cfg.n_heads)]
        return self._finish_stack(
            parts, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels
        )

    def _finish_stack(
        self,
        parts: list[np.ndarray],
        labels: list[str],
        layer: int,
        pos_slice: SliceInput,
        incl_remainder: bool,
        apply_ln: bool,
        return_labels: bool,
    ) -> Any:
        """Stacks per-component contributions ``[..., component, d_model]`` into
        ``[component, ...]``, with the remainder and LayerNorm options of the stack_* methods."""
        resid = _take(self._resid_entering(layer), _index(pos_slice, "pos_slice"), -2, "pos_slice")
        if parts:
            stack = np.moveaxis(np.concatenate(parts, axis=-2), -2, 0)
        else:
            stack = np.zeros((0, *resid.shape), dtype=resid.dtype)
        if incl_remainder:
            stack = np.concatenate([stack, (resid - stack.sum(axis=0))[None]])
            labels = [*labels, "remainder"]
        out = self._out(stack)
        if apply_ln:
            out = self.apply_ln_to_stack(out, layer, pos_slice=pos_slice)
        return (out, labels) if return_labels else out

    def get_neuron_results(
        self, layer: int, neuron_slice: SliceInput = None, pos_slice: SliceInput = None
    ) -> Any:
        """``[batch, pos, neurons, d_model]``: what each neuron of block ``layer``'s MLP writes,
        ``mlp.hook_post[..., n, None] * W_out[layer][n]``, for the neurons ``neuron_slice``
        picks. Not cached (large and cheap to recompute).

        Summed over all neurons and plus ``b_out`` this is ``hook_mlp_out``, which under post-LN
        is added to ``ln1``'s output to give ``hook_resid_post`` (before ``ln2``).
        """
        layer = self._block_layer(layer)
        neurons = _index(neuron_slice, "neuron_slice")
        post = _take(
            self._np(f"blocks.{layer}.mlp.hook_post"),
            _index(pos_slice, "pos_slice"),
            -2,
            "pos_slice",
        )
        post = _take(post, neurons, -1, "neuron_slice")
        w_out = _take(self._weight(f"blocks.{layer}.mlp.W_out"), neurons, 0, "neuron_slice")
        return self._out((post[..., None] * w_out).astype(post.dtype, copy=False))

    def stack_neuron_results(
        self,
        layer: int,
        pos_slice: SliceInput = None,
        neuron_slice: SliceInput = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
    ) -> Any:
        """``[layer * neurons, batch, pos, d_model]``: :meth:`get_neuron_results` of every block
        before ``layer`` (-1/None: all), labelled ``L{l}N{n}``. An int ``neuron_slice`` keeps
        the neuron axis (one neuron per layer).

        ``incl_remainder`` and ``apply_ln`` are as in :meth:`stack_head_results`: the remainder
        makes the stack sum to the residual stream entering ``layer`` (under post-LN it carries
        all the LayerNorm rescaling), and ``apply_ln`` is :meth:`apply_ln_to_stack` at ``layer``.
        Memory: ``n_layers * d_mlp * batch * pos * d_model`` floats for all neurons.
        """
        layer = self._stack_layer(layer)
        neurons = _index(neuron_slice, "neuron_slice")
        if isinstance(neurons, int):
            neurons = np.array([neurons])
        ids = _take(np.arange(self.model.cfg.d_mlp), neurons, 0, "neuron_slice")
        labels = [f"L{lay}N{n}" for lay in range(layer) for n in ids]
        parts = [
            _to_numpy(self.get_neuron_results(lay, neurons, pos_slice)) for lay in range(layer)
        ]
        return self._finish_stack(
            parts, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels
        )

    # ------------------------------------------------------------------ residual stream

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Any:
        """``[entries, batch, pos, d_model]``: the residual stream at each block boundary up to
        ``layer``, as TransformerLens, fixed for post-LN BERT.

        Entries, in order: ``blocks.{l}.hook_resid_pre`` for ``l <= layer`` and
        ``l < n_layers`` (label ``{l}_pre``: the input of block ``l``, which under post-LN is
        already a LayerNorm output; as in TransformerLens, ``layer``'s own input is included);
        with ``incl_mid`` also ``blocks.{l}.hook_resid_mid`` for ``l < layer`` (``{l}_mid``:
        under post-LN this is ``resid_pre + attn_out``, the sum *before* ``ln1``), and with
        ``mlp_input`` ``blocks.{layer}.hook_resid_mid``. For ``layer`` None, -1 or ``n_layers``
        the last entry is the model's final residual stream, the last block's
        ``hook_normalized_resid_post`` (after its ``ln2``; ``encoder_output``, Hugging Face's
        ``last_hidden_state``), labelled ``final_post``; in a pre-LN model (ModernBERT) the
        last ``hook_resid_post``, as in TransformerLens. (TransformerLens used the last
        ``hook_resid_post``, which for BERT is the sum before ``ln2``.) ``mlp_input`` with the
        final layer is a ValueError.

        ``apply_ln=True`` normalises each entry with the LayerNorm that reads it directly on the
        residual path, using that LayerNorm's cached scale: centre over ``d_model`` and divide by
        its ``hook_scale`` (no weight or bias). Under post-LN only the ``{l}_mid`` entries are
        read by a LayerNorm (``blocks.{l}.ln1``), so they become exactly
        ``blocks.{l}.ln1.hook_normalized``. ``{l}_pre`` and ``final_post`` are LayerNorm
        outputs read by attention or by the MLM head's dense layer, not by a LayerNorm, so they
        come back unchanged. This is not a logit lens: for BERT that would need the MLM head's
        dense layer, GELU and LayerNorm, which are not linear.

        Pre-LN models (ModernBERT) follow TransformerLens's ``HookedTransformer``: ``apply_ln``
        passes every entry through the LayerNorm at ``layer`` (see :meth:`apply_ln_to_stack`).
        """
        layer = self._stack_layer(layer)
        n = self._n_layers
        if mlp_input and layer == n:
            raise ValueError(
                "mlp_input=True needs a block: there is no MLP after the final residual stream"
            )
        index = _index(pos_slice, "pos_slice")
        entries: list[tuple[str, np.ndarray]] = []
        for lay in range(layer + 1):
            if lay == n:
                entries.append(("final_post", self._resid_entering(n)))
                continue
            entries.append((f"{lay}_pre", self._np(f"blocks.{lay}.hook_resid_pre")))
            if (incl_mid and lay < layer) or (mlp_input and lay == layer):
                mid = self._np(f"blocks.{lay}.hook_resid_mid")
                if apply_ln and not self._pre_ln:  # post-LN: ln1 reads resid_mid
                    mid = _to_numpy(self.apply_ln_to_stack(mid[None], lay, mlp_input=True))[0]
                entries.append((f"{lay}_mid", mid))
        stack = np.stack([_take(value, index, -2, "pos_slice") for _, value in entries])
        out = self._out(stack)
        if apply_ln and self._pre_ln:
            # As TransformerLens: every entry through the LayerNorm at `layer`.
            out = self.apply_ln_to_stack(out, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        labels = [label for label, _ in entries]
        return (out, labels) if return_labels else out

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Any:
        """``[components, batch, pos, d_model]``: what each part of the model wrote before
        ``layer`` (-1/None: all blocks), as TransformerLens, with the encoder's embedding terms.

        Components, in order: with ``incl_embeds`` ``embed``, ``pos_embed`` and
        ``token_type_embed`` (``embed.hook_embed``, ``embed.hook_pos_embed``,
        ``embed.hook_token_type_embed``); then for each block ``l < layer`` ``{l}_attn_out``
        (``hook_attn_out``, unless ``mode="mlp"``) and ``{l}_mlp_out`` (``hook_mlp_out``,
        unless ``mode="attn"``); with ``mlp_input`` also ``{layer}_attn_out``.

        Under post-LN these components do NOT sum to any residual stream: every LayerNorm
        between them recentres and rescales what came before. The exact identities are local:
        the embedding terms sum to the input of ``embed.ln``;
        ``hook_resid_pre + hook_attn_out == hook_resid_mid`` (the input of ``ln1``); and
        ``ln1``'s output ``+ hook_mlp_out == hook_resid_post`` (the input of ``ln2``). So
        ``layer=0`` is an exact decomposition (of the embedding LayerNorm's input), and larger
        ``layer`` values are a list of writes, not a sum.

        Pre-LN models (ModernBERT) are what TransformerLens's decomposition assumes: the
        residual stream is the sum of its writes. Their embedding term is ``embed``, the
        normalised embedding ``hook_full_embed`` (= ``blocks.0.hook_resid_pre``; the raw token
        embedding passes a LayerNorm first), so the components sum exactly to
        ``blocks.{layer}.hook_resid_pre`` (with ``mlp_input``, ``hook_resid_mid``).

        ``apply_ln=True`` returns ``apply_ln_to_stack(stack, layer, mlp_input)``: every component
        centred and divided by the cached scale of the LayerNorm in front of ``layer`` (see
        there). That is exact for ``layer=0`` without ``mlp_input`` (the normalised embedding
        terms sum to ``embed.ln.hook_normalized``); for later layers it only linearises that
        last LayerNorm, not the ones between an earlier component and it.
        """
        layer = self._stack_layer(layer)
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        if mlp_input and layer == self._n_layers:
            raise ValueError(
                "mlp_input=True needs a block: there is no MLP after the final residual stream"
            )
        index = _index(pos_slice, "pos_slice")
        names: list[tuple[str, str]] = []
        if incl_embeds and self._pre_ln:
            # The residual stream starts from the normalised embedding (blocks.0.hook_resid_pre).
            names.append(("embed", "hook_full_embed"))
        elif incl_embeds:
            names += [("embed", "embed.hook_embed"), ("pos_embed", "embed.hook_pos_embed")]
            if "embed.hook_token_type_embed" in self.model.hook_dict:  # not in DistilBERT
                names.append(("token_type_embed", "embed.hook_token_type_embed"))
        for lay in range(layer):
            if mode != "mlp":
                names.append((f"{lay}_attn_out", f"blocks.{lay}.hook_attn_out"))
            if mode != "attn":
                names.append((f"{lay}_mlp_out", f"blocks.{lay}.hook_mlp_out"))
        if mlp_input and mode != "mlp":
            names.append((f"{layer}_attn_out", f"blocks.{layer}.hook_attn_out"))
        parts = [_take(self._np(name), index, -2, "pos_slice") for _, name in names]
        if parts:
            stack = np.stack(parts)
        else:  # nothing to stack: an empty stack of the residual's shape
            resid = _take(self._np("blocks.0.hook_resid_pre"), index, -2, "pos_slice")
            stack = np.zeros((0, *resid.shape), dtype=resid.dtype)
        out = self._out(stack)
        if apply_ln:
            out = self.apply_ln_to_stack(out, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        labels = [label for label, _ in names]
        return (out, labels) if return_labels else out

    def apply_ln_to_stack(
        self,
        residual_stack: Any,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        has_batch_dim: bool = True,
    ) -> Any:
        """``[components, batch, pos, d_model]``: every component centred over ``d_model`` and
        divided by the cached ``hook_scale`` of one LayerNorm: exactly what that LayerNorm does
        to its own input before its weight and bias. If the components sum to that LayerNorm's
        input, the results sum to its ``hook_normalized``.

        Which LayerNorm: the one whose output feeds the component at ``(layer, mlp_input)``,
        the post-LN counterpart of TransformerLens's choice (there the LN that reads the
        residual in front of that component):

        In a pre-LN model (ModernBERT) it is TransformerLens's choice: ``ln_final`` for
        ``layer`` None, -1 or ``n_layers`` (exact for residual-stream components),
        ``blocks.{l}.ln2`` with ``mlp_input``, else ``blocks.{l}.ln1`` (``embed.ln`` for block
        0, which has no ``ln1``). Post-LN models (every other family):

        - ``layer`` None, -1 or ``n_layers``: ``mlm_head.ln``, the LayerNorm in front of the
          unembedding. It normalises ``GELU(final_residual @ mlm_head.W + mlm_head.b)``, not
          the residual stream, so for residual-stream components (from
          :meth:`decompose_resid`, :meth:`accumulated_resid`, ...) this is only a
          first-order stand-in that ignores the MLM head's dense layer and GELU; it is exact
          for components of the MLM head's transform. Encoders without an MLM head raise
          :class:`NoMLMHeadError`.
        - ``layer=l``, ``mlp_input=True``: ``blocks.{l}.ln1``, in front of block ``l``'s MLP;
          its input is ``hook_resid_mid = hook_resid_pre + hook_attn_out``.
        - ``layer=l``, ``mlp_input=False``: the LayerNorm whose output is block ``l``'s input
          (``hook_resid_pre``): ``embed.ln`` for ``l=0`` (input: the three embedding terms),
          ``blocks.{l-1}.ln2`` otherwise (input: ``hook_resid_post`` of block ``l-1`` =
          ``ln1`` output + ``hook_mlp_out``). The last block's ``ln2``, which produces the
          final residual, has no address: ``layer=n_layers`` is the unembedding's LayerNorm.

        ``pos_slice`` and ``batch_slice`` are applied to the cached scale, and ``batch_slice``
        also to the stack's batch axis (axis 1) when ``has_batch_dim``; as in TransformerLens,
        the stack must already have ``pos_slice`` applied. A scale that does not fit the stack
        is a ValueError.
        """
        layer = self._stack_layer(layer)
        key = self._ln_scale_key(layer, mlp_input)
        stack = _to_numpy(residual_stack)
        if stack.ndim < 2:
            raise ValueError(
                f"residual_stack must be [components, ..., d_model], got shape {list(stack.shape)}"
            )
        batch_index = _index(batch_slice, "batch_slice")
        if batch_slice is not None and not self.has_batch_dim:
            raise ValueError("this cache has no batch dimension, so batch_slice must be None")
        if has_batch_dim and batch_slice is not None:
            stack = _take(stack, batch_index, 1, "batch_slice")
        if key not in self.cache_dict:
            raise KeyError(
                f"apply_ln needs the cached LayerNorm scale {key!r}; run run_with_cache with a "
                "names_filter that keeps it"
            )
        scale = _take(self._np(key), _index(pos_slice, "pos_slice"), -2, "pos_slice")
        if batch_slice is not None:
            scale = _take(scale, batch_index, 0, "batch_slice")
        target = (*stack.shape[1:-1], 1)
        try:
            fits = np.broadcast_shapes(target, scale.shape) == target
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"the cached scale {key!r} has shape {list(scale.shape)} (after pos_slice and "
                f"batch_slice), which does not fit a stack of shape {list(stack.shape)}: check "
                "pos_slice, batch_slice and has_batch_dim"
            )
        centred = stack - stack.mean(axis=-1, keepdims=True)
        return self._out((centred / scale).astype(stack.dtype, copy=False), residual_stack)

    def _token_directions(self, tokens: Any, w_u: np.ndarray) -> np.ndarray:
        return _to_numpy(self.model.tokens_to_residual_directions(tokens))

    def logit_attrs(
        self,
        residual_stack: Any,
        tokens: Any,
        incorrect_tokens: Any = None,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        has_batch_dim: bool = True,
    ) -> Any:
        """``[components, batch, pos]``: each component's dot product with the unembedding
        direction of ``tokens`` (``W_U[:, token]``), or with ``W_U[:, token] -
        W_U[:, incorrect_token]`` (same shape required).

        The directions live in the space the unembedding reads, ``unembed.hook_in``: the MLM
        head's output, after its dense layer, GELU and LayerNorm. No LayerNorm is applied
        here (TransformerLens applies the final LN's scale, which on BERT would be applied
        twice), so for components of ``unembed.hook_in`` the attributions are exact:
        ``logit_attrs(cache["unembed.hook_in"][None], t)[0] + b_U[t]`` is the logit of ``t``.
        Residual-stream components (from :meth:`decompose_resid` etc.) reach the unembedding
        only through the MLM head's dense layer, GELU and LayerNorm, which are not linear, so
        their dot product with ``W_U`` is not a logit attribution.

        ``tokens``: a token id, a string (one token), or ids ``[batch]`` (one per row, across
        positions) or ``[batch, pos]``. ``batch_slice`` is applied to the stack's batch axis
        when ``has_batch_dim``; ``pos_slice`` is accepted for TransformerLens compatibility and,
        as there, the stack must already be sliced (it only sliced the LayerNorm scale, which is
        not used here). Encoders without an MLM head raise :class:`NoMLMHeadError`.
        """
        self._require_mlm_head("logit_attrs")
        w_u = self._weight("unembed.W_U")
        directions = self._token_directions(tokens, w_u)
        if incorrect_tokens is not None:
            wrong = self._token_directions(incorrect_tokens, w_u)
            if wrong.shape != directions.shape:
                raise ValueError(
                    "tokens and incorrect_tokens must have the same shape, got "
                    f"{list(directions.shape[:-1])} and {list(wrong.shape[:-1])}"
                )
            directions = directions - wrong
        _index(pos_slice, "pos_slice")
        batch_index = _index(batch_slice, "batch_slice")
        stack = _to_numpy(residual_stack)
        if stack.ndim < 2 or stack.shape[-1] != w_u.shape[0]:
            raise ValueError(
                f"residual_stack must be [components, ..., d_model={w_u.shape[0]}], got shape "
                f"{list(stack.shape)}"
            )
        if has_batch_dim and batch_slice is not None:
            stack = _take(stack, batch_index, 1, "batch_slice")
        if (
            has_batch_dim
            and not isinstance(batch_index, int)
            and stack.ndim == 4
            and directions.ndim == 2
            and directions.shape[0] == stack.shape[1]
        ):
            directions = directions[:, None, :]  # one token per row, across positions
        try:
            fits = np.broadcast_shapes(directions.shape, stack.shape[1:]) == stack.shape[1:]
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"token directions of shape {list(directions.shape)} do not fit a stack of "
                f"shape {list(stack.shape)}: tokens must match the stack's batch and position "
                "axes (after batch_slice)"
            )
        attrs = np.einsum("c...d,...d->c...", stack, np.broadcast_to(directions, stack.shape[1:]))
        return self._out(attrs.astype(stack.dtype, copy=False), residual_stack, tokens)

    # ------------------------------------------------------------------ conversion and files

    def to_numpy(self) -> ActivationCache:
        """A new cache with every entry as a NumPy array (torch tensors are converted without a
        copy where possible, so the two caches may share memory)."""
        new = {name: _to_numpy(value) for name, value in self.cache_dict.items()}
        return ActivationCache(new, self.model, has_batch_dim=self.has_batch_dim)

    def to_torch(self) -> ActivationCache:
        """A new cache with every entry as a CPU torch tensor (NumPy arrays are wrapped without
        a copy where possible, so the two caches may share memory). Needs PyTorch."""
        new = {name: _to_torch(_to_numpy(value)) for name, value in self.cache_dict.items()}
        return ActivationCache(new, self.model, has_batch_dim=self.has_batch_dim)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the cache to one safetensors file at ``path``, atomically: the data goes to a
        temporary file in the same directory, which replaces ``path`` only once complete, so
        an interrupted save leaves ``path`` as it was. The metadata records the key order
        (firing order), ``has_batch_dim``, whether the entries were torch tensors, and the
        model's shape, for :meth:`load`. Needs the ``safetensors`` package."""
        try:
            from safetensors.numpy import save_file
        except ImportError:
            raise ImportError(
                "ActivationCache.save needs safetensors: pip install safetensors"
            ) from None
        path = Path(path)
        cfg = self.model.cfg
        metadata = {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "keys": json.dumps(list(self.cache_dict)),
            "has_batch_dim": json.dumps(bool(self.has_batch_dim)),
            "tensor_type": "torch" if self._holds_torch else "numpy",
            "model_shape": json.dumps(_model_shape(cfg)),
        }
        tensors = {
            name: np.ascontiguousarray(_to_numpy(value)) for name, value in self.cache_dict.items()
        }
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            save_file(tensors, str(temporary), metadata=metadata)
            with open(temporary, "rb") as file:
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: HookedEncoder) -> ActivationCache:
        """Reads a cache written by :meth:`save`, for ``model`` (which must have the shape of
        the model the cache came from), with its keys in the saved order, its
        ``has_batch_dim``, and torch tensors if it held torch tensors."""
        try:
            from safetensors import safe_open
        except ImportError:
            raise ImportError(
                "ActivationCache.load needs safetensors: pip install safetensors"
            ) from None
        with safe_open(str(path), framework="np") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != _FILE_FORMAT:
                raise ValueError(f"{os.fspath(path)} is not a saved ActivationCache")
            if metadata.get("version") != _FILE_VERSION:
                raise ValueError(
                    f"{os.fspath(path)} is an ActivationCache file of version "
                    f"{metadata.get('version')!r}; this version reads {_FILE_VERSION!r}"
                )
            keys = json.loads(metadata["keys"])
            if sorted(keys) != sorted(file.keys()):
                raise ValueError(f"{os.fspath(path)} is damaged: its keys do not match its index")
            saved_shape = json.loads(metadata["model_shape"])
            if saved_shape != _model_shape(model.cfg):
                raise ValueError(
                    f"the cache in {os.fspath(path)} comes from a model of shape {saved_shape}, "
                    f"but this model has shape {_model_shape(model.cfg)}"
                )
            as_torch = metadata["tensor_type"] == "torch"
            cache = {key: _convert(file.get_tensor(key), as_torch) for key in keys}
        return cls(cache, model, has_batch_dim=json.loads(metadata["has_batch_dim"]))


def _model_shape(cfg: Any) -> dict[str, int]:
    return {name: int(getattr(cfg, name)) for name in ("n_layers", "n_heads", "d_head", "d_model")}
