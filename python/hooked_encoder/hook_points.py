"""Hook points: the named places where a user's function sees (and may replace) an activation."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

_LAYER = re.compile(r"^blocks\.(\d+)\.")


class HookFunction(Protocol):
    """``fn(activation, hook) -> replacement or None``, TransformerLens's hook signature."""

    def __call__(self, activation: Any, *, hook: HookPoint) -> Any: ...


NamesFilter = str | Iterable[str] | Callable[[str], bool] | None


@dataclasses.dataclass
class _Registered:
    fn: Callable[..., Any]
    is_permanent: bool
    level: int | None


class HookPoint:
    """A named activation of the model, as TransformerLens's ``HookPoint``.

    ``name`` is the full dotted name (``blocks.0.attn.hook_pattern``); ``ctx`` is a dict a hook
    function may use to keep state between calls, emptied by ``clear_context``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ctx: dict[Any, Any] = {}
        self.fwd_hooks: list[_Registered] = []
        self.bwd_hooks: list[_Registered] = []

    def __repr__(self) -> str:
        return f"HookPoint(name={self.name!r})"

    def layer(self) -> int:
        """The block index of this hook point; a ``ValueError`` for points outside blocks."""
        match = _LAYER.match(self.name)
        if match is None:
            raise ValueError(f"{self.name} is not inside a block, so it has no layer")
        return int(match.group(1))

    def add_hook(
        self,
        hook: Callable[..., Any],
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Registers ``hook`` to run whenever this point fires (after earlier hooks, unless
        ``prepend``): in the forward pass (``dir="fwd"``, on the activation) or in a backward
        pass (``dir="bwd"``, on the gradient arriving at this point; a returned array replaces
        the gradient that flows on backwards)."""
        _check_direction(dir)
        if not callable(hook):
            raise TypeError(f"a hook must be callable, got {type(hook).__name__}")
        entry = _Registered(hook, is_permanent, level)
        hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        if prepend:
            hooks.insert(0, entry)
        else:
            hooks.append(entry)

    def remove_hooks(
        self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None
    ) -> None:
        """Removes hooks: all non-permanent ones, or only those added at ``level``."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")

        def kept(hooks: list[_Registered]) -> list[_Registered]:
            return [
                h
                for h in hooks
                if not (
                    (including_permanent or not h.is_permanent)
                    and (level is None or h.level == level)
                )
            ]

        if dir in ("fwd", "both"):
            self.fwd_hooks = kept(self.fwd_hooks)
        if dir in ("bwd", "both"):
            self.bwd_hooks = kept(self.bwd_hooks)

    def clear_context(self) -> None:
        """Empties ``ctx``."""
        self.ctx = {}


def _check_direction(dir: str) -> None:
    if dir not in ("fwd", "bwd"):
        raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")


def names_predicate(names_filter: NamesFilter) -> Callable[[str], bool]:
    """Turns TransformerLens's ``names_filter`` forms (None, a name, a list of names, a
    predicate) into a predicate."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    try:
        wanted = set(names_filter)
    except TypeError:
        raise TypeError(
            "names_filter must be None, a hook name, a list of hook names or a predicate, "
            f"got {type(names_filter).__name__}"
        ) from None
    if not all(isinstance(n, str) for n in wanted):
        raise TypeError("names_filter must hold hook names (strings)")
    return lambda name: name in wanted


# What each hook point holds: shape with symbolic dims, and meaning (reference section 2).
HOOK_DOCS = {
    "embed.hook_embed": ("[batch, pos, d_model]", "token embeddings W_E[tokens]"),
    "embed.hook_pos_embed": ("[batch, pos, d_model]", "position embeddings"),
    "embed.hook_token_type_embed": ("[batch, pos, d_model]", "token-type (segment) embeddings"),
    "ln.hook_scale": ("[batch, pos, 1]", "LayerNorm scale sqrt(var + eps)"),
    "ln.hook_normalized": ("[batch, pos, d_model]", "LayerNorm (x - mean) / scale"),
    "ln1.hook_scale": ("[batch, pos, 1]", "scale of the LayerNorm after attention"),
    "ln1.hook_normalized": ("[batch, pos, d_model]", "normalised input of ln1"),
    "ln2.hook_scale": ("[batch, pos, 1]", "scale of the LayerNorm after the MLP"),
    "ln2.hook_normalized": ("[batch, pos, d_model]", "normalised input of ln2"),
    "hook_full_embed": ("[batch, pos, d_model]", "embedding LayerNorm output, input of block 0"),
    "hook_embed_proj": (
        "[batch, pos, d_model]",
        "embeddings projected into the residual stream (ELECTRA with d_embed)",
    ),
    "discriminator.hook_out": ("[batch, pos]", "ELECTRA's replaced-token logits"),
    "hook_rel_pos_bias": (
        "[batch, head, query, key]",
        "relative position bias added to every block's scores (MPNet)",
    ),
    "hook_resid_pre": ("[batch, pos, d_model]", "block input"),
    "hook_q_input": ("[batch, pos, head, d_model]", "per-head query input"),
    "hook_k_input": ("[batch, pos, head, d_model]", "per-head key input"),
    "hook_v_input": ("[batch, pos, head, d_model]", "per-head value input"),
    "attn.hook_q": ("[batch, pos, head, d_head]", "queries"),
    "attn.hook_k": ("[batch, pos, head, d_head]", "keys"),
    "attn.hook_v": ("[batch, pos, head, d_head]", "values"),
    "attn.hook_rot_q": ("[batch, pos, head, d_head]", "queries after rotary (ModernBERT)"),
    "attn.hook_rot_k": ("[batch, pos, head, d_head]", "keys after rotary (ModernBERT)"),
    "attn.hook_attn_scores": (
        "[batch, head, query, key]",
        "q.k / sqrt(d_head) + mask (-inf: padding, and outside a local layer's window)",
    ),
    "attn.hook_pattern": ("[batch, head, query, key]", "attention probabilities"),
    "attn.hook_z": ("[batch, pos, head, d_head]", "pattern @ v"),
    "attn.hook_result": ("[batch, pos, head, d_model]", "per-head output, without b_O"),
    "hook_attn_out": ("[batch, pos, d_model]", "attention output (with b_O)"),
    "hook_resid_mid": ("[batch, pos, d_model]", "resid_pre + attn_out, before ln1"),
    "hook_mlp_in": ("[batch, pos, d_model]", "input of ln1 (= resid_mid unless edited)"),
    "mlp.hook_pre": ("[batch, pos, d_mlp]", "MLP pre-activation (gated: x W_gate)"),
    "mlp.hook_pre_linear": ("[batch, pos, d_mlp]", "gated MLP's linear half x W_in (ModernBERT)"),
    "mlp.hook_post": ("[batch, pos, d_mlp]", "MLP activation (gated: act(pre) * pre_linear)"),
    "hook_mlp_out": ("[batch, pos, d_model]", "MLP output"),
    "hook_resid_post": ("[batch, pos, d_model]", "ln1 output + mlp_out, before ln2 (post-LN)"),
    "hook_normalized_resid_post": ("[batch, pos, d_model]", "block output (after ln2)"),
    "ln_final.hook_scale": ("[batch, pos, 1]", "scale of the final LayerNorm (pre-LN)"),
    "ln_final.hook_normalized": ("[batch, pos, d_model]", "normalised input of ln_final"),
    "unembed.hook_in": ("[batch, pos, d_model]", "MLM head output"),
    "unembed.hook_out": ("[batch, pos, d_vocab]", "logits"),
    "pooler.hook_pooler_out": ("[batch, d_model]", "tanh(dense(first token)), NSP only"),
    "nsp_head.hook_nsp_out": ("[batch, 2]", "next-sentence logits, NSP only"),
}


# Longest suffix first, so "ln1.hook_scale" wins over "ln.hook_scale" (sorted once: the
# memory check looks up every recorded hook on every call).
_DOCS_BY_SUFFIX = sorted(HOOK_DOCS.items(), key=lambda kv: -len(kv[0]))


# Points as wide as the embeddings: d_embed, not d_model, in an ELECTRA model with its own
# embedding width.
_EMBEDDING_WIDE = (
    "embed.hook_embed",
    "embed.hook_pos_embed",
    "embed.hook_token_type_embed",
    "embed.ln.hook_normalized",
    "hook_full_embed",
    "mlm_head.ln.hook_normalized",
    "unembed.hook_in",
)


# Pre-LN blocks (ModernBERT) place their norms and residual sums as HookedTransformer does.
_PRE_LN_MEANINGS = {
    "ln1.hook_scale": "scale of the LayerNorm before attention",
    "ln2.hook_scale": "scale of the LayerNorm before the MLP",
    "hook_resid_mid": "resid_pre + attn_out",
    "hook_mlp_in": "input of ln2 (= resid_mid unless edited)",
    "hook_resid_post": "resid_mid + mlp_out, the block output (pre-LN)",
}


def describe_hook(name: str, cfg: Any = None) -> tuple[str, str]:
    """A hook point's shape, with symbolic dims (``[batch, pos, d_model]``), and meaning; with
    the model's ``cfg``, ``d_embed`` where the point is as wide as ELECTRA's embeddings, and
    the pre-LN meanings of a pre-LN model's norms and residual sums."""
    if getattr(cfg, "pre_layer_norm", False):
        for suffix, meaning in _PRE_LN_MEANINGS.items():
            if name.endswith(suffix):
                return HOOK_DOCS[suffix][0], meaning
    for suffix, (shape, meaning) in _DOCS_BY_SUFFIX:
        if name.endswith(suffix):
            if getattr(cfg, "d_embed", None) is not None and name in _EMBEDDING_WIDE:
                shape = shape.replace("d_model", "d_embed")
            return shape, meaning
    return ("", "")
