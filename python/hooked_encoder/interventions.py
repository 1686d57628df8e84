"""Declarative interventions: the common edits of interpretability work (zero- and mean-ablation,
patching, steering, scaling, replacing) as plain data that the Rust forward pass applies at
their hook points itself, with no Python call during the pass.

    >>> from hooked_encoder import interventions as iv
    >>> model.run_with_interventions(tokens, [
    ...     iv.zero("blocks.3.attn.hook_z", heads=[0, 7]),
    ...     iv.add("blocks.5.hook_resid_post", steering_vector, scale=4.0, positions="[MASK]"),
    ...     iv.patch("blocks.*.hook_resid_pre", clean_cache, positions=2),
    ... ])

Every intervention names a hook point (or a glob of them) and selects entries of its
activation with ``rows=`` (batch rows), ``positions=`` (token positions of ``[batch, pos, ...]``
points: ints, slices, lists, a per-row list of lists, or a token string such as ``"[MASK]"``),
``heads=`` (per-head points ``[batch, pos, head, d_head]`` and the ``[batch, head, query, key]``
scores and pattern), ``query=`` / ``key=`` (positions on the scores and pattern) and ``where=``
(booleans broadcast against the activation, for any other selection). Padding is never edited
unless ``include_padding=True``. At one point, interventions apply in list order,
then Python hooks; a cache records the values after them.

Selectors are checked and resolved into a mask before anything runs; a selector out of range or a
value of the wrong shape raises a ``ValueError`` naming the intervention. ``dumps`` / ``loads``
write and read a list of interventions as JSON (arrays as nested lists; a patch from an in-memory
cache is stored with the cache's values). ``intervention.as_hook()`` is the same edit as a
TransformerLens hook function, for ``fwd_hooks=[(name, hook)]``. Gradient calls
(``model.grad``, ``run_with_cache(incl_bwd=True)``) differentiate through interventions: the Rust
backward takes each edit's own gradient.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .hook_points import describe_hook

__all__ = [
    "Intervention",
    "add",
    "dumps",
    "loads",
    "mean",
    "means_of",
    "patch",
    "replace",
    "scale",
    "zero",
]

# Axes of an activation that selectors address, by their names in the hook table's shapes.
_SELECTABLE = ("batch", "pos", "head", "query", "key")
_OPS = ("zero", "mean", "patch", "add", "scale", "replace")


@dataclasses.dataclass(frozen=True)
class Intervention:
    """One declarative edit (build it with :func:`zero`, :func:`mean`, :func:`patch`,
    :func:`add`, :func:`scale` or :func:`replace`)."""

    op: str
    hook: str
    value: Any = None
    rows: Any = None
    positions: Any = None
    heads: Any = None
    query: Any = None
    key: Any = None
    include_padding: bool = False
    from_rows: Any = None
    where: Any = None

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"unknown intervention op {self.op!r}; known: {list(_OPS)}")
        if not isinstance(self.hook, str) or not self.hook:
            raise TypeError(
                f"an intervention's hook must be a hook name or glob, got {self.hook!r}"
            )

    def __repr__(self) -> str:
        parts = [repr(self.hook)]
        if self.value is not None and not isinstance(self.value, Mapping):
            value = np.asarray(self.value) if not isinstance(self.value, (str, Path)) else None
            parts.append(
                f"value={self.value!r}"
                if value is None or value.ndim == 0
                else f"value=<array {list(value.shape)}>"
            )
        elif isinstance(self.value, Mapping) or hasattr(self.value, "cache_dict"):
            parts.append("source=<cache>")
        for name in ("rows", "positions", "heads", "query", "key", "from_rows", "where"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={_short(value)}")
        if self.include_padding:
            parts.append("include_padding=True")
        return f"{self.op}({', '.join(parts)})"

    def as_hook(
        self, tokens: Any = None, attention_mask: Any = None, model: Any = None
    ) -> Callable[[Any, Any], Any]:
        """The same edit as a TransformerLens hook function ``fn(activation, hook)``.
        ``attention_mask`` keeps padding unedited (as the declarative form does) and ``tokens``
        with ``model`` resolve a token-string ``positions``."""

        def hook(activation: Any, hook: Any) -> Any:
            is_torch = type(activation).__module__.startswith("torch")
            array = activation.detach().float().cpu().numpy() if is_torch else activation
            array = np.asarray(array, dtype=np.float32)
            mask, op, value = _resolve_one(
                self, hook.name, array.shape, tokens, attention_mask, _token_id_of(model)
            )
            edited = _apply(array, mask, op, value)
            if is_torch:
                import torch

                return torch.as_tensor(edited, dtype=activation.dtype, device=activation.device)
            return edited

        return hook

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (arrays as nested lists, a cache as its values for this hook)."""
        out: dict[str, Any] = {"op": self.op, "hook": self.hook}
        for field in dataclasses.fields(self)[2:]:
            value = getattr(self, field.name)
            if value is None or value is False:
                continue
            if field.name == "value" and (
                isinstance(value, Mapping) or hasattr(value, "cache_dict")
            ):
                entries = value.cache_dict if hasattr(value, "cache_dict") else value
                value = {
                    "cache": {
                        name: np.asarray(_host(v)).tolist()
                        for name, v in entries.items()
                        if fnmatch.fnmatchcase(name, self.hook)
                    }
                }
            elif isinstance(value, Path):
                value = str(value)
            elif not isinstance(value, (str, int, float, bool, slice)):
                value = np.asarray(_host(value)).tolist()
            out[field.name] = _slice_to_json(value)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Intervention:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown intervention fields {unknown}; known: {sorted(known)}")
        values = {name: _slice_from_json(value) for name, value in values.items()}
        value = values.get("value")
        if isinstance(value, Mapping) and set(value) == {"cache"}:
            values["value"] = {
                name: np.asarray(v, np.float32) for name, v in value["cache"].items()
            }
        return cls(**values)


def zero(hook: str, **select: Any) -> Intervention:
    """Zero-ablation: the selected entries become 0."""
    return Intervention("zero", hook, **select)


def mean(hook: str, means: Any, **select: Any) -> Intervention:
    """Mean-ablation: the selected entries become ``means`` (broadcast against the activation,
    e.g. ``[d_model]``, ``[pos, d_model]`` or ``[head, d_head]``; see :func:`means_of`)."""
    return Intervention("mean", hook, value=means, **select)


def patch(hook: str, source: Any = None, *, from_rows: Any = None, **select: Any) -> Intervention:
    """Activation patching: the selected entries take the values of another run, from an
    :class:`ActivationCache` (or dict) holding this hook point, an array, or a saved cache file
    (``ActivationCache.save``); or, with ``from_rows``, from other rows of the same batch (row
    ``i`` takes row ``from_rows[i]``'s activation in the same pass)."""
    if (source is None) == (from_rows is None):
        raise ValueError("patch needs exactly one of source= and from_rows=")
    return Intervention("patch", hook, value=source, from_rows=from_rows, **select)


def add(hook: str, vector: Any, scale: float = 1.0, **select: Any) -> Intervention:
    """Steering: ``vector * scale`` is added to the selected entries."""
    return Intervention("add", hook, value=np.asarray(_host(vector), np.float32) * scale, **select)


def scale(hook: str, factor: Any, **select: Any) -> Intervention:
    """The selected entries times ``factor`` (a number, or an array broadcast against the
    activation)."""
    return Intervention("scale", hook, value=factor, **select)


def replace(hook: str, value: Any, **select: Any) -> Intervention:
    """The selected entries become ``value`` (broadcast against the activation)."""
    return Intervention("replace", hook, value=value, **select)


def means_of(model: Any, input: Any, hook: str, over: str = "batch", **forward_kwargs: Any) -> Any:
    """The mean activation at ``hook`` over a batch (``over="batch"``: per position, ``[pos,
    ...]``) or over the batch and its real (unpadded) positions (``over="tokens"``: ``[...]``),
    for :func:`mean`."""
    if over not in ("batch", "tokens"):
        raise ValueError(f"over must be 'batch' or 'tokens', got {over!r}")
    _, cache = model.run_with_cache(input, names_filter=hook, **forward_kwargs)
    values = np.asarray(_host(cache[hook]), np.float32)
    if over == "batch":
        return values.mean(axis=0)
    mask = forward_kwargs.get("one_zero_attention_mask")
    if isinstance(input, (str, list)) and mask is None and model.tokenizer is not None:
        try:
            mask = model.to_tokens(input)[2]
        except TypeError:
            mask = None
    if mask is None:
        return values.reshape(-1, *values.shape[2:]).mean(axis=0)
    keep = np.asarray(_host(mask)).astype(bool)
    return values[keep].mean(axis=0)


def dumps(interventions: Iterable[Intervention]) -> str:
    """A list of interventions as JSON."""
    return json.dumps([intervention.to_dict() for intervention in interventions])


def loads(text: str) -> list[Intervention]:
    """The interventions :func:`dumps` wrote."""
    return [Intervention.from_dict(entry) for entry in json.loads(text)]


# ---------------------------------------------------------------------- resolution


def resolve(
    interventions: Sequence[Intervention],
    model: Any,
    batch: int,
    pos: int,
    tokens: np.ndarray | None,
    attention_mask: np.ndarray | None,
) -> list[tuple[str, np.ndarray, str, np.ndarray]]:
    """The core's edits for a pass over ``[batch, pos]``: ``(hook name, uint8 mask, op,
    float32 value)``, in list order (a glob expands in firing order). Raises a ``ValueError``
    naming the intervention for anything that does not fit, before the pass runs."""
    from ._memory import _shape_dims

    if isinstance(interventions, Intervention):
        interventions = [interventions]
    dims = _shape_dims(model.cfg, batch, pos)
    edits = []
    for intervention in interventions:
        if not isinstance(intervention, Intervention):
            raise TypeError(
                "interventions must be hooked_encoder.interventions objects (iv.zero(...), ...), "
                f"got {type(intervention).__name__}"
            )
        names = [name for name in model.hook_dict if fnmatch.fnmatchcase(name, intervention.hook)]
        if not names:
            raise ValueError(f"{intervention!r}: no hook point matches {intervention.hook!r}")
        for name in names:
            _, axes = _axes(name, model.cfg)
            shape = tuple(int(d) if d.isdigit() else dims[d] for d in axes)
            mask, op, value = _resolve_one(
                intervention,
                name,
                shape,
                tokens,
                attention_mask,
                _token_id_of(model),
                model=model,
            )
            edits.append((name, mask, op, value))
    return edits


def _axes(name: str, cfg: Any) -> tuple[str, list[str]]:
    """The shape of hook point ``name`` as documented (``"[batch, pos, head, d_head]"``) and
    its axis names."""
    symbolic, _ = describe_hook(name, cfg)
    return symbolic, [part.strip() for part in symbolic.strip("[]").split(",")]


def _resolve_one(
    intervention: Intervention,
    name: str,
    shape: tuple[int, ...],
    tokens: Any,
    attention_mask: Any,
    token_id_of: Callable[[str], int] | None,
    model: Any = None,
) -> tuple[np.ndarray, str, np.ndarray]:
    """The mask, core op and value of ``intervention`` at the point ``name`` whose activation
    has ``shape``."""

    def fail(message: str) -> ValueError:
        return ValueError(f"{intervention!r} at {name}: {message}")

    symbolic, axes = _axes(name, getattr(model, "cfg", None))
    if len(axes) != len(shape):
        raise fail(f"the activation has shape {list(shape)}, expected {symbolic}")
    mask_shape = [n if axis in _SELECTABLE else 1 for axis, n in zip(axes, shape, strict=True)]
    mask = np.ones(mask_shape, dtype=bool)
    where = {axis: i for i, axis in enumerate(axes)}
    mask_array = None if attention_mask is None else np.asarray(_host(attention_mask)).astype(bool)
    token_array = None if tokens is None else np.asarray(_host(tokens))

    def restrict(axis: str, selector: Any, what: str) -> None:
        nonlocal mask
        if selector is None:
            return
        if axis not in where:
            hint = {
                "head": "per-head points ([batch, pos, head, d_head]) and scores/pattern",
                "pos": "[batch, pos, ...] points; on scores and pattern use query=/key=",
                "query": "the attention scores and pattern",
                "key": "the attention scores and pattern",
            }.get(axis, axis)
            raise fail(f"{what}= applies to {hint}, and this point is {symbolic}")
        i = where[axis]
        n = shape[i]
        keep = _axis_selection(selector, n, what, fail, token_array, token_id_of, shape[0])
        if keep.ndim == 2:  # per row: [batch, n]
            index = [1] * len(mask_shape)
            index[0], index[i] = keep.shape
            mask = mask & keep.reshape(index)
        else:
            index = [1] * len(mask_shape)
            index[i] = n
            mask = mask & keep.reshape(index)

    restrict("batch", intervention.rows, "rows")
    restrict("pos", intervention.positions, "positions")
    restrict("head", intervention.heads, "heads")
    restrict("query", intervention.query, "query")
    restrict("key", intervention.key, "key")
    if intervention.where is not None:
        where_mask = np.asarray(_host(intervention.where)).astype(bool)
        try:
            fits = np.broadcast_shapes(where_mask.shape, shape) == tuple(shape)
        except ValueError:
            fits = False
        if not fits:
            raise fail(f"where= of shape {list(where_mask.shape)} does not fit {list(shape)}")
        mask = mask & where_mask
    if mask_array is not None and not intervention.include_padding:
        for axis in ("pos", "query", "key"):
            if axis in where:
                if mask_array.shape != (shape[0], shape[where[axis]]):
                    raise fail(
                        f"the attention mask {list(mask_array.shape)} does not fit {list(shape)}"
                    )
                index = [1] * len(mask_shape)
                index[0], index[where[axis]] = mask_array.shape
                mask = mask & mask_array.reshape(index)
    op, value = _core_op(intervention, name, shape, fail)
    return np.ascontiguousarray(mask, dtype=np.uint8), op, value


def _axis_selection(
    selector: Any,
    n: int,
    what: str,
    fail: Callable[[str], ValueError],
    tokens: np.ndarray | None,
    token_id_of: Callable[[str], int] | None,
    batch: int,
) -> np.ndarray:
    """``[n]`` (or per row ``[batch, n]``) booleans for ``selector`` on an axis of ``n``."""
    if isinstance(selector, str):
        if tokens is None or token_id_of is None:
            raise fail(f"{what}={selector!r} (a token) needs token input and a tokenizer")
        try:
            token = token_id_of(selector)
        except Exception as error:
            raise fail(f"{what}={selector!r} is not one token: {error}") from None
        if tokens.shape[0] != batch or tokens.shape[1] != n:
            raise fail(f"tokens of shape {list(tokens.shape)} do not fit this point")
        found = tokens == token
        if not found.any():
            raise fail(f"{what}={selector!r}: the input holds no {selector!r} token")
        return found
    if isinstance(selector, slice):
        keep = np.zeros(n, dtype=bool)
        keep[selector] = True
        return keep
    values = np.asarray(_host(selector))
    if values.dtype == bool:
        if values.shape != (n,):
            raise fail(f"{what}= as booleans must have {n} entries, got {list(values.shape)}")
        return values
    if not np.issubdtype(values.dtype, np.integer):
        raise fail(f"{what}= must be ints, a slice, booleans or a token string, got {selector!r}")
    if np.any(values >= n) or np.any(values < -n):
        raise fail(f"{what}={_short(selector)} is out of range for an axis of {n}")
    if values.ndim <= 1:
        keep = np.zeros(n, dtype=bool)
        keep[values.reshape(-1)] = True
        return keep
    if values.ndim == 2 and what == "positions":  # per row
        if values.shape[0] != batch:
            raise fail(
                f"per-row {what}= needs one row per batch row ({batch}), got {values.shape[0]}"
            )
        keep = np.zeros((batch, n), dtype=bool)
        for row, positions in enumerate(values):
            keep[row, positions] = True
        return keep
    raise fail(f"{what}= must be an int, a list, a slice or (positions) one list per row")


def _core_op(
    intervention: Intervention, name: str, shape: tuple[int, ...], fail: Callable[[str], ValueError]
) -> tuple[str, np.ndarray]:
    op = intervention.op
    if op == "zero":
        return "set", np.zeros((), np.float32)
    if op == "patch" and intervention.from_rows is not None:
        rows = np.asarray(_host(intervention.from_rows))
        if rows.shape != (shape[0],) or not np.issubdtype(rows.dtype, np.integer):
            raise fail(f"from_rows must give one source row per batch row ({shape[0]})")
        if np.any(rows < 0) or np.any(rows >= shape[0]):
            raise fail(f"from_rows={rows.tolist()} names rows outside 0..{shape[0] - 1}")
        return "from_rows", rows.astype(np.float32)
    value = intervention.value
    if op == "patch":
        value = _patch_source(value, name, fail)
    try:
        array = np.asarray(_host(value), dtype=np.float32)
    except (TypeError, ValueError):
        raise fail(f"its value must be numbers, got {type(value).__name__}") from None
    try:
        fits = np.broadcast_shapes(array.shape, shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise fail(
            f"its value of shape {list(array.shape)} does not fit the activation {list(shape)}"
        )
    core = {"mean": "set", "patch": "set", "replace": "set", "add": "add", "scale": "scale"}[op]
    return core, np.ascontiguousarray(array)


def _patch_source(source: Any, name: str, fail: Callable[[str], ValueError]) -> Any:
    if isinstance(source, (str, Path)):
        from safetensors.numpy import load_file

        try:
            source = load_file(str(source))
        except Exception as error:
            raise fail(f"cannot read the saved cache {str(source)!r}: {error}") from None
    if hasattr(source, "cache_dict"):
        source = source.cache_dict
    if isinstance(source, Mapping):
        if name not in source:
            raise fail("the source cache does not hold this hook point")
        return source[name]
    return source


def _apply(array: np.ndarray, mask: np.ndarray, op: str, value: np.ndarray) -> np.ndarray:
    """NumPy's version of the core's edit (for :meth:`Intervention.as_hook`)."""
    if op == "set":
        edited = np.broadcast_to(value, array.shape)
    elif op == "scale":
        edited = array * value
    elif op == "add":
        edited = array + value
    else:
        edited = array[value.astype(np.int64)]
    return np.where(np.broadcast_to(mask.astype(bool), array.shape), edited, array).astype(
        np.float32
    )


def _token_id_of(model: Any) -> Callable[[str], int] | None:
    if model is None or getattr(model, "tokenizer", None) is None:
        return None
    return model.to_single_token


def _host(value: Any) -> Any:
    """A torch tensor as NumPy; anything else as it is."""
    if type(value).__module__.startswith("torch"):
        return value.detach().float().cpu().numpy()
    return value


def _short(value: Any) -> str:
    array = value if isinstance(value, (slice, str)) else np.asarray(_host(value))
    if isinstance(array, np.ndarray) and array.size > 8:
        return f"<array {list(array.shape)}>"
    return repr(array.tolist() if isinstance(array, np.ndarray) else array)


def _slice_to_json(value: Any) -> Any:
    if isinstance(value, slice):
        return {"slice": [value.start, value.stop, value.step]}
    return value


def _slice_from_json(value: Any) -> Any:
    if isinstance(value, Mapping) and set(value) == {"slice"}:
        return slice(*value["slice"])
    return value
