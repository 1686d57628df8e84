"""The model's parts as objects: ``model.embed``, ``model.blocks[i]``, ``model.blocks[i].attn``,
``model.mlm_head``, ``model.unembed``, ``model.pooler``, ``model.nsp_head``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hooked_encoder import HookedEncoder


class Component:
    """One part of a :class:`HookedEncoder`, named as in TransformerLens (``blocks.3.attn``).

    Its weights are attributes under TransformerLens's state-dict names (``model.blocks[0].ln1.w``,
    ``model.embed.token_type_embed.W_token_type``, ``model.mlm_head.W``, ``model.pooler.W``).
    Calling a part that computes runs the same Rust code as the full forward pass, and the hooks
    inside it fire under their full names:

    * ``model.embed(tokens, token_type_ids=None)`` → ``hook_full_embed`` ``[batch, pos, d_model]``;
    * ``model.blocks[i](resid, one_zero_attention_mask=None)`` → the block's output;
    * ``model.blocks[i].attn(query_input, key_input, value_input, one_zero_attention_mask=None)``
      → the attention output (with ``b_O``), from three ``[batch, pos, d_model]`` inputs;
    * ``model.mlm_head(x)`` → the MLM head's LayerNorm output; ``model.unembed(x)`` → logits;
      ``model.pooler(x)`` → ``tanh(dense(x[:, 0]))``; ``model.nsp_head(pooled)`` → ``[batch, 2]``.

    TransformerLens's blocks take an additive mask; these take the one-zero mask that
    ``forward`` takes.
    """

    def __init__(
        self,
        model: HookedEncoder,
        name: str,
        call: Callable[..., Any] | None = None,
        **children: Component,
    ) -> None:
        self._model = model
        self._name = name
        self._call = call
        self._children = children

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        if attr in self._children:
            return self._children[attr]
        key = f"{self._name}.{attr}"
        weights = self._model._tl_weights
        if key in weights:
            return self._model._weight(weights[key])
        if any(name.startswith(key + ".") for name in weights):
            return Component(self._model, key)
        raise AttributeError(f"{key} is not a weight or a part of this model")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._call is None:
            raise TypeError(f"{self._name} holds weights only; it cannot be run on its own")
        return self._call(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Component({self._name!r})"
