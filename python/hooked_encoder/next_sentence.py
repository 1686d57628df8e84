"""``BertNextSentencePrediction``: TransformerLens's next-sentence prediction wrapper."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .activation_cache import ActivationCache
from .hook_points import NamesFilter, names_predicate
from .hooked_encoder import HookedEncoder

_PREDICTIONS = ("The sentences are sequential", "The sentences are NOT sequential")


class BertNextSentencePrediction:
    """Next-sentence prediction with a :class:`HookedEncoder` whose checkpoint has the pooler
    and NSP head (``BertForPreTraining``): the encoder, then ``pooler`` (``tanh`` of a dense
    layer on the first token, hooked as ``pooler.hook_pooler_out``), then ``nsp_head`` (logits
    ``[batch, 2]``, hooked as ``nsp_head.hook_nsp_out``). Index 0 means "B follows A"."""

    def __init__(self, model: HookedEncoder) -> None:
        if model.cfg.family != "bert":
            raise ValueError(
                f"this {model.cfg.model_type} model has no next-sentence head (only BERT "
                "checkpoints such as BertForPreTraining have one)"
            )
        self.model = model

    def to_tokens(
        self, input: list[str], move_to_device: bool = True, truncate: bool = True
    ) -> tuple[Any, Any, Any]:
        """Tokenizes a pair of sentences as ``[CLS] A [SEP] B [SEP]``, with token type 1 on B."""
        if not (
            isinstance(input, (list, tuple))
            and len(input) == 2
            and all(isinstance(s, str) for s in input)
        ):
            raise ValueError(
                "Next sentence prediction task requires exactly two sentences, please provide a "
                "list of strings with each sentence as an element."
            )
        tokenizer = self.model._require_tokenizer("next sentence prediction on text")
        encoded = tokenizer([(input[0], input[1])], self.model.cfg.n_ctx if truncate else None)
        convert = self.model._converter(self.model.output_format == "torch")
        return tuple(convert(a) for a in encoded)

    def forward(
        self,
        input: list[str] | Any,
        return_type: Literal["logits", "predictions"] | None = "logits",
        token_type_ids: Any = None,
        one_zero_attention_mask: Any = None,
    ) -> Any:
        """NSP logits ``[batch, 2]`` for two sentences (a list of two strings) or for token ids
        (which then need ``token_type_ids``). ``"predictions"`` gives TransformerLens's strings,
        one per row (a single string for one row)."""
        if return_type not in ("logits", "predictions", None):
            raise ValueError(
                f"return_type must be 'logits', 'predictions' or None, got {return_type!r}"
            )
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            tokens, types, mask = self.to_tokens(input)
            token_type_ids = types if token_type_ids is None else token_type_ids
            if one_zero_attention_mask is None:
                one_zero_attention_mask = mask
        else:
            if token_type_ids is None:
                raise ValueError(
                    "You are using the NSP task without specifying token_type_ids: pass them "
                    "(0 for the first sentence, 1 for the second)."
                )
            tokens = input
        prepared = self.model._prepare(tokens, token_type_ids, one_zero_attention_mask)
        logits = self.model._run(prepared, "next_sentence")
        if return_type == "predictions":
            best = np.asarray(logits).argmax(-1)
            words = [_PREDICTIONS[int(i)] for i in best]
            return words[0] if len(words) == 1 else words
        return logits if return_type == "logits" else None

    __call__ = forward

    def grad(
        self,
        input: list[str] | Any,
        metric: Any = None,
        grad_output: Any = None,
        names: NamesFilter = None,
        **forward_kwargs: Any,
    ) -> dict[str, Any]:
        """Gradients of a metric of the NSP logits ``[batch, 2]`` with respect to the hook
        points ``names`` selects, as ``HookedEncoder.grad`` (``metric`` or ``grad_output``)."""
        keep = names_predicate(names)
        wanted = [name for name in self.model.hook_dict if keep(name)]
        _, _, grads = self.model._with_backward(
            wanted, metric, grad_output, lambda: self.forward(input, **forward_kwargs)
        )
        return grads

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, Any]]:
        """``(output, cache)`` of :meth:`forward`, with the selected hook points recorded (the
        encoder's and ``pooler.hook_pooler_out``, ``nsp_head.hook_nsp_out``)."""
        forward_args = ("return_type", "token_type_ids", "one_zero_attention_mask")
        forward_kwargs = {k: kwargs.pop(k) for k in forward_args if k in kwargs}
        options = {
            "device": None,
            "incl_bwd": False,
            "reset_hooks_end": True,
            "clear_contexts": False,
            "pos_slice": None,
            "metric": None,
            "grad_output": None,
        }
        unexpected = sorted(set(kwargs) - set(options))
        if unexpected:
            raise TypeError(f"unexpected arguments {unexpected}")
        return self.model._cached_call(
            self.forward,
            model_args,
            forward_kwargs,
            names_filter=names_filter,
            remove_batch_dim=remove_batch_dim,
            return_cache_object=return_cache_object,
            **{**options, **kwargs},
        )
