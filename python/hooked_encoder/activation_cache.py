"""``ActivationCache``: the activations of one forward pass, by hook name."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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
        return name
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


class ActivationCache:
    """Activations by hook name, in firing order, as TransformerLens's ``ActivationCache``.

    Index with a full name (``cache["blocks.0.attn.hook_pattern"]``) or TransformerLens
    shorthand (``cache["pattern", 0]``, ``cache["resid_pre", -1]``, ``cache["scale", 0, "ln1"]``).
    Negative layers count from the end.
    """

    def __init__(
        self, cache_dict: dict[str, Any], model: HookedEncoder, has_batch_dim: bool = True
    ) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def _resolve(self, key: str | tuple) -> str:
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
        return isinstance(key, (str, tuple)) and self._resolve(key) in self.cache_dict

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
