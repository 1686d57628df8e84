"""``HookedEncoder``: TransformerLens's BERT ``HookedEncoder`` API over the Rust core."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from . import _core
from . import interventions as interventions_module
from ._memory import check_fits
from .activation_cache import ActivationCache
from .components import Component
from .config import DTYPE_ALIASES, HookedEncoderConfig
from .factored_matrix import FactoredMatrix
from .hook_points import HookPoint, NamesFilter, _check_direction, names_predicate
from .loading import read_config, resolve_checkpoint, weight_files
from .tokenizer import Tokenizer
from .weights import tl_state_dict

logger = logging.getLogger(__name__)

OutputFormat = Literal["auto", "numpy", "torch"]
ReturnType = Literal["logits", "predictions"] | None
# Config fields that from_pretrained accepts as keyword arguments.
_CONFIG_OVERRIDES = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "seed")
FwdHooks = Sequence[tuple[str | Callable[[str], bool], Callable[..., Any]]]


def _torch():
    import torch

    return torch


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _float_array(value: Any, what: str) -> np.ndarray:
    if _is_torch_tensor(value):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{what} must hold floating-point numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _optional_mask(mask: Any) -> np.ndarray | None:
    return None if mask is None else _int_array(mask, "one_zero_attention_mask")


def _ndim(value: Any) -> int:
    return value.dim() if _is_torch_tensor(value) else np.ndim(value)


class _Recording:
    """What ``run_with_cache`` asks a forward pass to record, and what it recorded."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.cache: dict[str, Any] = {}


# The recording of the ``run_with_cache`` call in progress in this thread (or task), if any.
_RECORDING: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar(
    "hooked_encoder_recording", default=None
)


class _Backward:
    """What a gradient-taking call (``run_with_cache(incl_bwd=True)``, ``run_with_hooks`` with
    backward hooks, ``grad``) asks of the forward pass it wraps, and what that pass left."""

    def __init__(self, names: list[str], metric: Any, grad_output: Any) -> None:
        self.names = names
        self.metric = metric
        self.grad_output = grad_output
        self.tape: Any = None
        self.output: Any = None
        self.as_torch = False
        # Forward hooks run on torch tensors that require grad: name -> (input, output), so the
        # backward pulls the gradient through each edit with torch.autograd.grad.
        self.edits: dict[str, tuple[Any, Any]] = {}
        # Declarative interventions the differentiated pass applied (resolved), whose
        # gradients the Rust backward takes.
        self.declared: list | None = None


# The gradient-taking call in progress in this thread (or task), if any.
_BACKWARD: contextvars.ContextVar[_Backward | None] = contextvars.ContextVar(
    "hooked_encoder_backward", default=None
)


def _one_gradient_source(metric: Any, grad_output: Any) -> None:
    if (metric is None) == (grad_output is None):
        raise ValueError(
            "a backward pass starts from the output: give either metric= (a function of the "
            "output returning a scalar; needs torch) or grad_output= (d metric / d output, "
            "an array of the output's shape)"
        )


class _Prepared:
    """Token ids, token types and mask as C-contiguous int64 ``[batch, pos]`` arrays, plus
    whether results should be torch tensors."""

    __slots__ = ("as_torch", "mask", "tokens", "types")

    def __init__(self, tokens, types, mask, as_torch: bool) -> None:
        self.tokens, self.types, self.mask, self.as_torch = tokens, types, mask, as_torch


def _int_array(value: Any, what: str) -> np.ndarray:
    if _is_torch_tensor(value):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{what} must be a rectangular [batch, pos] array: {e}") from None
    if array.dtype == object or array.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integers, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{what} must be [batch, pos], got shape {list(array.shape)}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what} holds values too large for int64")
    return np.ascontiguousarray(array, dtype=np.int64)


class HookedEncoder:
    """A BERT-style encoder with a hook point on every activation, API-compatible with
    TransformerLens's ``HookedEncoder`` (3.x), computed in Rust on Candle.

    Build one from a config (``HookedEncoder(cfg)``, with freshly initialised weights) or load a
    Hugging Face checkpoint with :meth:`from_pretrained`. Results are NumPy arrays, or torch
    tensors when the input is a torch tensor (``output_format="auto"``) or when
    ``output_format="torch"``.
    """

    def __init__(
        self,
        cfg: HookedEncoderConfig | dict[str, Any],
        tokenizer: Any = None,
        move_to_device: bool = True,
        *,
        output_format: OutputFormat = "auto",
        _core_model: Any = None,
    ) -> None:
        if isinstance(cfg, str):
            raise ValueError(
                "HookedEncoder(cfg) takes a config; to load a checkpoint by name use "
                "HookedEncoder.from_pretrained(name)"
            )
        if isinstance(cfg, dict):
            cfg = HookedEncoderConfig.from_dict(cfg)
        if not isinstance(cfg, HookedEncoderConfig):
            raise TypeError(
                f"cfg must be a HookedEncoderConfig or a dict, got {type(cfg).__name__}"
            )
        if output_format not in ("auto", "numpy", "torch"):
            raise ValueError(
                f"output_format must be 'auto', 'numpy' or 'torch', got {output_format!r}"
            )
        self.cfg = cfg
        self.output_format: OutputFormat = output_format
        self.tokenizer = (
            None
            if tokenizer is None
            else (tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer))
        )
        if self.tokenizer is not None:
            self.tokenizer.adapt_to(cfg.n_token_types, cfg.padding_idx)
        if _core_model is None:
            seed = cfg.seed if cfg.seed is not None else random.getrandbits(63)
            _core_model = _core.Model.random(cfg._core_json(), seed, cfg.device)
        if _core_model.dtype != cfg.dtype:
            # Weights load as float32; a half-precision model stores them rounded once.
            _core_model = _core_model.to(_core_model.device, cfg.dtype)
        self._model = _core_model
        self.hook_dict: dict[str, HookPoint] = {
            name: HookPoint(name) for name in self._model.hook_names()
        }
        # There are no torch modules here; the hook points are the addressable components.
        self.mod_dict: dict[str, HookPoint] = self.hook_dict
        self.context_level = 0
        self.embed = Component(self, "embed", self._embed)
        self.blocks = [
            Component(
                self,
                f"blocks.{i}",
                functools.partial(self._block, i),
                attn=Component(self, f"blocks.{i}.attn", functools.partial(self._attention, i)),
            )
            for i in range(cfg.n_layers)
        ]
        self.mlm_head = Component(self, "mlm_head", functools.partial(self._apply, "mlm_head"))
        self.unembed = Component(self, "unembed", functools.partial(self._apply, "unembed"))
        self.pooler = Component(self, "pooler", functools.partial(self._apply, "pooler"))
        self.nsp_head = Component(self, "nsp_head", functools.partial(self._apply, "nsp_head"))
        self.discriminator = Component(
            self, "discriminator", functools.partial(self._apply, "discriminator")
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model_name: str | os.PathLike[str],
        checkpoint_index: int | None = None,
        checkpoint_value: int | None = None,
        hf_model: Any = None,
        device: str | None = "cpu",
        tokenizer: Any = None,
        move_to_device: bool = True,
        dtype: Any = "float32",
        *,
        revision: str | None = None,
        output_format: OutputFormat = "auto",
        **from_pretrained_kwargs: Any,
    ) -> HookedEncoder:
        """Loads a Hugging Face checkpoint of a supported family (``model_type`` ``bert``,
        ``roberta``, ``xlm-roberta``, ``camembert``, ``distilbert``, ``mpnet``, ``electra`` or
        ``modernbert``; the README's "Encoder families" says what each changes).

        ``model_name`` is a local directory with ``config.json`` and ``model.safetensors`` (or
        sharded safetensors with ``model.safetensors.index.json``), an embedded model
        (``"sentence-transformers/all-MiniLM-L6-v2"``, from the ``minilm`` extra), or a hub id
        resolved through ``huggingface_hub``. Masked-LM and base-model checkpoints of each
        family load (and BERT's ``BertForPreTraining``); one without an MLM head loads as an
        encoder (``return_type=None``, caching and ``encoder_output`` work; logits do not).
        ``hf_model`` takes an already loaded ``transformers`` model instead of files.
        ``use_attn_result``, ``use_split_qkv_input`` and ``use_hook_mlp_in`` switch on the
        optional hook points.
        """
        if checkpoint_index is not None or checkpoint_value is not None:
            raise ValueError("training checkpoints (checkpoint_index/value) do not exist for BERT")
        for key in ("load_in_8bit", "load_in_4bit"):
            if from_pretrained_kwargs.pop(key, False):
                raise ValueError("quantization is not supported")
        dtype = from_pretrained_kwargs.pop("torch_dtype", dtype)
        overrides = {
            key: from_pretrained_kwargs.pop(key)
            for key in _CONFIG_OVERRIDES
            if key in from_pretrained_kwargs
        }
        if from_pretrained_kwargs:
            raise TypeError(f"unexpected arguments {sorted(from_pretrained_kwargs)}")
        dtype_name = str(dtype).removeprefix("torch.")
        device = device or "cpu"
        if hf_model is not None:
            hf_config = hf_model.config.to_dict()
            cfg = HookedEncoderConfig.from_hf_config(hf_config, model_name=str(model_name))
            cfg = dataclasses.replace(cfg, device=device, dtype=dtype_name, **overrides)
            arrays = {
                name: np.ascontiguousarray(t.detach().float().cpu().numpy())
                for name, t in hf_model.state_dict().items()
                if t.is_floating_point()
            }
            core, unused = _core.Model.from_arrays(cfg._core_json(), arrays, device)
            directory = None
        else:
            directory = resolve_checkpoint(model_name, revision)
            cfg = HookedEncoderConfig.from_hf_config(
                read_config(directory), model_name=str(model_name)
            )
            cfg = dataclasses.replace(cfg, device=device, dtype=dtype_name, **overrides)
            files = [str(p) for p in weight_files(directory)]
            core, unused = _core.Model.load(cfg._core_json(), files, device)
        if unused:
            shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
            warnings.warn(
                f"{len(unused)} tensors of the checkpoint are not used by HookedEncoder: {shown}",
                stacklevel=2,
            )
        if tokenizer is None and directory is not None:
            tokenizer = Tokenizer.from_directory(directory)
        model = cls(cfg, tokenizer, output_format=output_format, _core_model=core)
        logger.info("Loaded pretrained model %s into HookedEncoder", model_name)
        return model

    # ------------------------------------------------------------------ properties

    @property
    def has_mlm_head(self) -> bool:
        """Whether the model can produce vocabulary logits (its checkpoint had an MLM head)."""
        return self._model.has_mlm_head

    @property
    def has_discriminator(self) -> bool:
        """Whether the checkpoint is an ELECTRA discriminator (``ElectraForPreTraining``): its
        logits are then one replaced-token logit per token, ``[batch, pos]``."""
        return self._model.has_discriminator

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickling, for process pools and distributed engines: the config, the tokenizer and
        the weights as one safetensors blob (a single copy of the weights; the receiving process
        builds its model straight from it). Hooks are not carried: they are usually closures
        over the sender's state, and a worker adds its own."""
        from safetensors.numpy import save

        weights = save(dict(self._model.named_weights(checkpoint=True)))
        tokenizer = self.tokenizer.raw if self.tokenizer is not None else None
        return _unpickle, (self.cfg, tokenizer, self.output_format, weights)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"HookedEncoder({c.model_name!r}, {c.original_architecture}, "
            f"n_layers={c.n_layers}, d_model={c.d_model}, "
            f"n_heads={c.n_heads}, d_vocab={c.d_vocab}, device={self._model.device!r})"
        )

    # ------------------------------------------------------------------ extraction

    def extract(
        self,
        texts: Iterable[Any],
        hooks: Any,
        batch_size: int = 32,
        max_length: int | None = None,
        pooling: Literal["mean", "cls", "max"] | None = None,
        out: str | os.PathLike[str] | None = None,
        shard_rows: int = 1024,
        progress: bool | None = None,
    ) -> Any:
        """Runs many inputs and keeps the activations of ``hooks`` (names, glob patterns such as
        ``"blocks.*.hook_resid_post"``, or a predicate), with padding removed.

        ``texts`` is any iterable of strings, sentence pairs (2-tuples), or token-id sequences.
        Inputs are taken ``shard_rows`` at a time, sorted by length within that window and run in
        batches of ``batch_size``, each padded only to its own longest row, so memory is bounded
        by the window, not the corpus. ``pooling`` reduces each row over its tokens (``"mean"``,
        ``"cls"`` for the first token, ``"max"``). Returns an :class:`~hooked_encoder.extract.
        Extraction`, or, with ``out``, writes safetensors shards and a manifest there (atomically;
        rerunning with the same arguments resumes after the last complete shard) and returns the
        directory; read it back with :func:`hooked_encoder.load_extraction`. ``progress`` shows a
        tqdm bar (texts/s, tokens/s); by default only when stderr is a terminal.
        """
        from .extract import extract

        return extract(
            self,
            texts,
            hooks,
            batch_size=batch_size,
            max_length=max_length,
            pooling=pooling,
            out=out,
            shard_rows=shard_rows,
            progress=progress,
        )

    # ------------------------------------------------------------------ components

    def _embed(self, tokens: Any, token_type_ids: Any = None) -> Any:
        return self.forward(tokens, token_type_ids=token_type_ids, stop_at_layer=0)

    def _block(self, layer: int, resid: Any, one_zero_attention_mask: Any = None) -> Any:
        return self.forward(
            resid,
            one_zero_attention_mask=one_zero_attention_mask,
            start_at_layer=layer,
            stop_at_layer=layer + 1,
        )

    def _attention(
        self,
        layer: int,
        query_input: Any,
        key_input: Any,
        value_input: Any,
        one_zero_attention_mask: Any = None,
    ) -> Any:
        inputs = [
            _float_array(x, "an attention input") for x in (query_input, key_input, value_input)
        ]
        mask = _optional_mask(one_zero_attention_mask)
        as_torch = self._wants_torch(query_input)
        return self._core_call(
            as_torch, lambda *hooks: self._model.attention(layer, *inputs, mask, *hooks)
        )

    def _apply(self, part: str, x: Any) -> Any:
        array = _float_array(x, f"the input of {part}")
        as_torch = self._wants_torch(x)
        return self._core_call(as_torch, lambda *hooks: self._model.apply(part, array, *hooks))

    # ------------------------------------------------------------------ devices

    def to(self, device_or_dtype: Any, print_details: bool = True) -> HookedEncoder:
        """Moves the model to a device ("cpu", "cuda", "cuda:N") or converts it to a dtype
        ("float32", "float16", "bfloat16", or the torch dtypes), in place, and returns it. A
        CPU-only build refuses "cuda" with a message on how to get a CUDA one.

        Half precision is meant for GPUs (on the CPU it runs Candle's generic ops, slower than
        float32). Converting to a half dtype rounds the weights; converting back does not undo
        that."""
        value = str(device_or_dtype).removeprefix("torch.")
        if value in DTYPE_ALIASES:
            dtype = DTYPE_ALIASES[value]
            self._model = self._model.to(self._model.device, dtype)
            self.cfg = dataclasses.replace(self.cfg, dtype=dtype)
        elif value.split(":")[0] in ("cpu", "cuda", "mps"):  # the core says what it cannot do
            self._model = self._model.to(value, self._model.dtype)
            self.cfg = dataclasses.replace(self.cfg, device=value)
        else:
            raise ValueError(
                f"cannot move the model to {value!r}: use a device (cpu, cuda, cuda:N) or a "
                "dtype (float32, float16, bfloat16)"
            )
        self.__dict__.pop("_tl_weights", None)
        if print_details:
            logger.info("Moved model to %s", value)
        return self

    def cpu(self) -> HookedEncoder:
        """Moves the model to the CPU."""
        return self.to("cpu")

    def cuda(self, device: int | str | None = None) -> HookedEncoder:
        """Moves the model to an NVIDIA GPU (needs a build with the ``cuda`` feature)."""
        index = str(device).removeprefix("cuda:") if device is not None else "0"
        return self.to(f"cuda:{index}")

    def mps(self) -> HookedEncoder:
        """TransformerLens's move to an Apple GPU. Not available: Candle has a Metal backend,
        but this package has never been built or tested with it (that needs macOS), so this
        raises a ``ValueError`` saying so instead of claiming an unchecked device."""
        return self.to("mps")

    # ------------------------------------------------------------------ weights

    @functools.cached_property
    def _tl_weights(self) -> dict[str, np.ndarray]:
        hf = dict(self._model.named_weights())
        for array in hf.values():
            array.flags.writeable = False  # views of the model's own memory
        return tl_state_dict(hf, self.cfg)

    def _weight(self, value: np.ndarray) -> Any:
        # Weights come back read-only (they are the model's memory); torch gets its own copy.
        return _torch().tensor(value) if self.output_format == "torch" else value

    def state_dict(self) -> dict[str, Any]:
        """Every weight under TransformerLens's state-dict keys (``embed.embed.W_E``,
        ``blocks.0.attn.W_Q``, ``mlm_head.W``, ``unembed.W_U``, ...), read-only and in
        TransformerLens's layouts."""
        return {name: self._weight(value) for name, value in self._tl_weights.items()}

    def _stacked(self, name: str) -> Any:
        layers = [self._tl_weights[f"blocks.{i}.{name}"] for i in range(self.cfg.n_layers)]
        return self._weight(np.stack(layers))

    def _head_weight(self, key: str) -> Any:
        if key not in self._tl_weights:
            raise AttributeError(f"this model has no MLM head, so it has no {key}")
        return self._weight(self._tl_weights[key])

    @property
    def W_E(self) -> Any:
        """Token embeddings ``[d_vocab, d_model]``."""
        return self._weight(self._tl_weights["embed.embed.W_E"])

    def _position_table(self) -> np.ndarray:
        if self.cfg.positional_embedding_type == "rotary":
            raise AttributeError(
                f"this {self.cfg.model_type} model has rotary positions (attn.hook_rot_q / "
                "hook_rot_k), so it has no position embeddings W_pos"
            )
        return self._tl_weights["embed.pos_embed.W_pos"]

    @property
    def W_pos(self) -> Any:
        """Position embeddings ``[n_ctx, d_model]`` (none with rotary positions:
        ``AttributeError``)."""
        return self._weight(self._position_table())

    @property
    def W_E_pos(self) -> Any:
        """``W_E`` and ``W_pos`` stacked, ``[d_vocab + n_ctx, d_model]``: a full basis of the
        input space."""
        w = self._tl_weights
        return self._weight(np.concatenate([w["embed.embed.W_E"], self._position_table()]))

    @property
    def W_U(self) -> Any:
        """Unembedding ``[d_model, d_vocab]`` (the MLM decoder)."""
        return self._head_weight("unembed.W_U")

    @property
    def b_U(self) -> Any:
        """Unembedding bias ``[d_vocab]``."""
        return self._head_weight("unembed.b_U")

    @property
    def W_Q(self) -> Any:
        """Query weights ``[n_layers, n_heads, d_model, d_head]``."""
        return self._stacked("attn.W_Q")

    @property
    def W_K(self) -> Any:
        """Key weights ``[n_layers, n_heads, d_model, d_head]``."""
        return self._stacked("attn.W_K")

    @property
    def W_V(self) -> Any:
        """Value weights ``[n_layers, n_heads, d_model, d_head]``."""
        return self._stacked("attn.W_V")

    @property
    def W_O(self) -> Any:
        """Attention output weights ``[n_layers, n_heads, d_head, d_model]``."""
        return self._stacked("attn.W_O")

    @property
    def b_Q(self) -> Any:
        """Query biases ``[n_layers, n_heads, d_head]``."""
        return self._stacked("attn.b_Q")

    @property
    def b_K(self) -> Any:
        """Key biases ``[n_layers, n_heads, d_head]``."""
        return self._stacked("attn.b_K")

    @property
    def b_V(self) -> Any:
        """Value biases ``[n_layers, n_heads, d_head]``."""
        return self._stacked("attn.b_V")

    @property
    def b_O(self) -> Any:
        """Attention output biases ``[n_layers, d_model]``."""
        return self._stacked("attn.b_O")

    @property
    def W_in(self) -> Any:
        """MLP input weights ``[n_layers, d_model, d_mlp]`` (of a gated MLP, the linear half:
        ``mlp.hook_pre_linear``)."""
        return self._stacked("mlp.W_in")

    @property
    def W_gate(self) -> Any:
        """A gated MLP's activated weights ``[n_layers, d_model, d_mlp]`` (``mlp.hook_pre``;
        ModernBERT only)."""
        if not self.cfg.gated_mlp:
            raise AttributeError(f"this {self.cfg.model_type} model's MLP is not gated: no W_gate")
        return self._stacked("mlp.W_gate")

    @property
    def W_out(self) -> Any:
        """MLP output weights ``[n_layers, d_mlp, d_model]``."""
        return self._stacked("mlp.W_out")

    @property
    def b_in(self) -> Any:
        """MLP input biases ``[n_layers, d_mlp]``."""
        return self._stacked("mlp.b_in")

    @property
    def b_out(self) -> Any:
        """MLP output biases ``[n_layers, d_model]``."""
        return self._stacked("mlp.b_out")

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_Kᵀ`` per layer and head, factored: ``[n_layers, n_heads, d_model,
        d_model]`` without materialising it."""
        w = self._tl_weights
        w_q = np.stack([w[f"blocks.{i}.attn.W_Q"] for i in range(self.cfg.n_layers)])
        w_k = np.stack([w[f"blocks.{i}.attn.W_K"] for i in range(self.cfg.n_layers)])
        return FactoredMatrix(w_q, w_k.swapaxes(-1, -2))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per layer and head, factored: ``[n_layers, n_heads, d_model,
        d_model]`` without materialising it."""
        w = self._tl_weights
        w_v = np.stack([w[f"blocks.{i}.attn.W_V"] for i in range(self.cfg.n_layers)])
        w_o = np.stack([w[f"blocks.{i}.attn.W_O"] for i in range(self.cfg.n_layers)])
        return FactoredMatrix(w_v, w_o)

    def tokens_to_residual_directions(self, tokens: Any) -> Any:
        """The unembedding direction of each token, ``W_U[:, token]``: ``[d_model]`` for one
        token (an id or a one-token string), ``[..., d_model]`` for an array of ids.

        For BERT these directions live where the unembedding reads, ``unembed.hook_in`` (the MLM
        head's output), not in the residual stream: the MLM head (dense, GELU, LayerNorm) lies
        between the two, so a dot product with a residual-stream vector is only a first-order
        attribution.
        """
        if not self.has_mlm_head:
            raise AttributeError("this model has no MLM head, so it has no unembedding directions")
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        w_u = self._tl_weights["unembed.W_U"]
        ids = np.asarray(tokens.detach().cpu().numpy() if _is_torch_tensor(tokens) else tokens)
        if ids.dtype.kind not in "iu" or ids.ndim > 2:
            raise TypeError(
                "tokens must be a string, an int or an integer array of shape [], [batch] or "
                f"[batch, pos], got dtype {ids.dtype} and shape {list(ids.shape)}"
            )
        vocab = w_u.shape[1]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must be in 0..{vocab - 1}")
        return self._weight(np.moveaxis(w_u[:, ids], 0, -1))

    def all_head_labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]``, one per head, layer by layer."""
        return [
            f"L{layer}H{head}"
            for layer in range(self.cfg.n_layers)
            for head in range(self.cfg.n_heads)
        ]

    # ------------------------------------------------------------------ inputs

    def to_tokens(
        self, input: str | list[str], move_to_device: bool = True, truncate: bool = True
    ) -> tuple[Any, Any, Any]:
        """Tokenizes text into ``(tokens, token_type_ids, attention_mask)``, each
        ``[batch, pos]``, right-padded, truncated to ``n_ctx`` unless ``truncate=False``."""
        prepared = self._tokenize(input, truncate)
        convert = self._converter(self.output_format == "torch")
        return convert(prepared[0]), convert(prepared[1]), convert(prepared[2])

    def _tokenize(self, input: str | list[str], truncate: bool = True) -> tuple[np.ndarray, ...]:
        tokenizer = self._require_tokenizer("string input")
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text input must be a string or a non-empty list of strings")
        return tokenizer(texts, self.cfg.n_ctx if truncate else None)

    def _prepare(self, input: Any, token_type_ids: Any, one_zero_attention_mask: Any) -> _Prepared:
        if isinstance(input, str) or (
            isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input)
        ):
            tokens, types, mask = self._tokenize(input)
        else:
            tokens, types, mask = _int_array(input, "tokens"), None, None
        if token_type_ids is not None:
            types = _int_array(token_type_ids, "token_type_ids")
        if one_zero_attention_mask is not None:
            mask = _int_array(one_zero_attention_mask, "one_zero_attention_mask")
        if types is not None and self.cfg.n_token_types == 0:
            # A tokenizer's (or a pipeline's) all-zero type ids mean nothing here; others would.
            if token_type_ids is not None and np.any(types):
                raise ValueError(
                    f"this {self.cfg.model_type} model has no token types; leave token_type_ids out"
                )
            types = None
        for what, array in (("token_type_ids", types), ("one_zero_attention_mask", mask)):
            if array is not None and array.shape != tokens.shape:
                raise ValueError(
                    f"{what} has shape {list(array.shape)}, but tokens have shape "
                    f"{list(tokens.shape)}"
                )
        return _Prepared(tokens, types, mask, self._wants_torch(input))

    def _wants_torch(self, input: Any) -> bool:
        """Whether results of a call on ``input`` should be torch tensors."""
        return self.output_format == "torch" or (
            self.output_format == "auto" and _is_torch_tensor(input)
        )

    def _converter(self, as_torch: bool) -> Callable[[Any], Any]:
        """Turns what the Rust model returns (a NumPy array sharing the tensor's memory, or a
        ``_core.DeviceTensor`` for activations on a GPU) into the requested output type: torch
        without a copy (``from_numpy``, or DLPack for GPU tensors, which stay on the GPU), or
        NumPy (one device-to-host copy for GPU tensors). Torch results are in the model's dtype;
        NumPy results are float32 (NumPy has no bfloat16; both half formats widen exactly)."""
        if not as_torch:
            return _to_numpy
        dtype = self._model.dtype
        return _to_torch if dtype == "float32" else functools.partial(_to_torch, dtype=dtype)

    # ------------------------------------------------------------------ running

    def _core_call(self, as_torch: bool, call: Callable[..., tuple[Any, list]]) -> Any:
        """Runs ``call(record, dispatch, dispatcher)`` on the Rust model: ``record`` lists the
        points ``run_with_cache`` asked for (if one is in progress; they go into its cache),
        ``dispatch`` the points with Python hooks."""
        recording = _RECORDING.get()
        backward = _BACKWARD.get()
        if backward is not None and backward.tape is not None:
            backward = None  # a second pass inside one gradient call is not differentiated
        # A forward pass run from inside a hook records nothing into the outer cache.
        token = _RECORDING.set(None)
        backward_token = _BACKWARD.set(None)
        try:
            dispatch = [name for name, point in self.hook_dict.items() if point.fwd_hooks]
            dispatcher = functools.partial(self._dispatch, as_torch, backward) if dispatch else None
            record = recording.names if recording is not None else []
            if backward is None:
                result, records = call(record, dispatch, dispatcher)
            else:
                backward.tape, backward.as_torch = _core.GradTape(), as_torch
                result, records = call(record, dispatch, dispatcher, backward.tape)
        finally:
            _RECORDING.reset(token)
            _BACKWARD.reset(backward_token)
        convert = self._converter(as_torch)
        if recording is not None:
            recording.cache.update({name: convert(value) for name, value in records})
        output = convert(result)
        if backward is not None:
            backward.output = output
        return output

    def _run(
        self,
        prepared: _Prepared,
        output: str,
        stop_at_layer: int | None = None,
        edits: list | None = None,
    ) -> Any:
        """Runs from tokens: ``output`` is "logits", "residual" (no head) or "next_sentence";
        ``edits`` are resolved interventions (see ``_edits``)."""
        self._check_memory(prepared.tokens.shape, output if stop_at_layer is None else "residual")
        return self._core_call(
            prepared.as_torch,
            lambda *hooks: self._model.forward(
                prepared.tokens,
                None,
                prepared.types,
                prepared.mask,
                0,
                stop_at_layer,
                output,
                *hooks,
                edits=edits,
            ),
        )

    def _run_from_residual(
        self,
        input: Any,
        start_at_layer: int,
        stop_at_layer: int | None,
        head: str,
        one_zero_attention_mask: Any = None,
        interventions: Sequence[Any] | None = None,
        position: int | None = None,
    ) -> Any:
        """Runs from the residual stream ``input`` entering block ``start_at_layer``: up to
        block ``stop_at_layer``, or through the last block and ``head`` ("logits", or
        "residual": the stream the MLM head reads, after a pre-LN model's final norm). With
        ``position`` ("residual" only), the last block computes that position alone after its
        attention and the result is ``[batch, 1, d_model]``."""
        residual = _float_array(input, "a residual-stream input")
        mask = _optional_mask(one_zero_attention_mask)
        edits = self._edits(interventions, residual.shape[:2], None, mask)
        self._check_memory(residual.shape[:2], head if stop_at_layer is None else "residual")
        return self._core_call(
            self._wants_torch(input),
            lambda *hooks: self._model.forward(
                None,
                residual,
                None,
                mask,
                start_at_layer,
                stop_at_layer,
                head,
                *hooks,
                edits=edits,
                position=position,
            ),
        )

    def _edits(
        self,
        interventions: Sequence[Any] | None,
        batch_pos: tuple[int, ...],
        tokens: np.ndarray | None,
        mask: np.ndarray | None,
    ) -> list | None:
        """``interventions`` resolved for a pass over ``batch_pos`` (every selector checked,
        before anything runs), or None."""
        if not interventions:
            return None
        if len(batch_pos) != 2:
            raise ValueError(f"interventions need a [batch, pos] input, got {list(batch_pos)}")
        edits = interventions_module.resolve(
            interventions, self, batch_pos[0], batch_pos[1], tokens, mask
        )
        backward = _BACKWARD.get()
        if backward is not None and backward.tape is None and backward.declared is None:
            backward.declared = edits  # the pass a backward will follow
        return edits

    def _check_memory(self, batch_pos: tuple[int, ...], output: str) -> None:
        if len(batch_pos) < 2:
            return  # a malformed input; the Rust side names the problem
        recording = _RECORDING.get()
        names = recording.names if recording is not None else ()
        check_fits(self.cfg, batch_pos[0], batch_pos[1], names, output)

    def _dispatch(
        self, as_torch: bool, backward: _Backward | None, name: str, activation: np.ndarray
    ) -> Any:
        """Called from Rust at a hooked point: runs the point's hook functions in order, each on
        the previous one's result, and returns the activation the model continues with (a
        float32 array, or a torch tensor on the model's GPU).

        In a forward pass that a backward pass will follow, torch users' hooks run on a tensor
        that requires grad, and the graph of what they did is kept: the backward pulls the
        gradient through it (``_dispatch_grad``), so an edit is part of the differentiated
        function, as in TransformerLens."""
        point = self.hook_dict[name]
        shape = tuple(activation.shape)
        current: Any = self._converter(as_torch)(activation)
        tracked = backward is not None and as_torch
        if tracked:
            torch = _torch()
            leaf = current.detach().clone().requires_grad_(True)
            context: Any = torch.enable_grad()
            current = leaf.clone()  # hooks may edit in place; a leaf cannot be
        else:
            context = contextlib.nullcontext()
        with context:
            for registered in list(point.fwd_hooks):
                returned = registered.fn(current, hook=point)
                if returned is not None:
                    current = _check_replacement(name, returned, shape, self._model.dtype)
        if tracked and backward is not None:
            backward.edits[name] = (leaf, current)
        # In-place edits of the array (or of the torch tensor sharing its memory) count too.
        if _is_torch_tensor(current):
            current = current.detach()
            if current.is_cuda and str(current.device) == self._model.device:
                # Stays on the GPU: Rust copies it device to device (DLPack) on the model's own
                # stream, so torch's work on it must be finished first.
                current = current.contiguous()
                _torch().cuda.current_stream(current.device).synchronize()
                return current
            # Rust takes float32 back and rounds it to the model's dtype.
            current = current.float().cpu().numpy()
        return np.ascontiguousarray(current)

    def _dispatch_grad(self, backward: _Backward, name: str, grad: np.ndarray) -> np.ndarray:
        """Called from Rust in a backward pass at a point with backward hooks or a forward
        edit: runs the backward hooks, each on the gradient arriving at the point (torch's
        ``grad_output``; the last one that returns an array replaces the gradient that flows
        on), otherwise pulls the gradient through the forward hooks' edit."""
        point = self.hook_dict[name]
        shape = tuple(grad.shape)
        arriving = self._converter(backward.as_torch)(grad)
        replaced: Any = None
        for registered in list(point.bwd_hooks):
            returned = registered.fn(arriving, hook=point)
            if returned is not None:
                replaced = _check_replacement(name, returned, shape, "float32")
        if replaced is None and name in backward.edits:
            torch = _torch()
            leaf, edited = backward.edits.pop(name)
            if edited.requires_grad:
                (through,) = torch.autograd.grad(
                    edited, leaf, _to_torch(grad).to(edited.device), allow_unused=True
                )
            else:
                through = None  # the hook replaced the activation with a constant
            replaced = torch.zeros_like(leaf) if through is None else through
        if replaced is None:
            return _to_numpy(grad)  # on a GPU, Rust takes the gradient back as NumPy
        if _is_torch_tensor(replaced):
            replaced = replaced.detach().float().cpu().numpy()
        return np.ascontiguousarray(replaced, dtype=np.float32)

    def _backward(self, backward: _Backward) -> tuple[Any, dict[str, Any]]:
        """Runs the backward pass of the forward pass ``backward`` wrapped. Returns the
        gradient where the forward started and ``{name: gradient}`` for ``backward.names``."""
        if backward.tape is None:
            raise ValueError("no forward pass ran, so there is nothing to differentiate")
        output = backward.output
        if backward.grad_output is not None:
            grad = _float_array(backward.grad_output, "grad_output")
        else:
            try:
                torch = _torch()
            except ImportError as error:
                raise ImportError(
                    "metric= needs torch (torch differentiates the metric on the output); "
                    "without it pass grad_output=, e.g. from hooked_encoder.metrics"
                ) from error
            out = (
                torch.as_tensor(
                    np.asarray(_to_numpy(output)) if not _is_torch_tensor(output) else output
                )
                .detach()
                .float()
                .requires_grad_(True)
            )
            with torch.enable_grad():
                value = backward.metric(out)
            if not _is_torch_tensor(value) or value.numel() != 1:
                raise ValueError(
                    "metric must return a scalar torch tensor computed from the output "
                    f"(got {type(value).__name__})"
                )
            if not value.requires_grad:
                raise ValueError("metric's result does not depend on the output")
            (d_output,) = torch.autograd.grad(value.reshape(()), out, allow_unused=True)
            grad = np.ascontiguousarray(
                np.zeros(out.shape, np.float32) if d_output is None else d_output.cpu().numpy()
            )
        dispatch = [
            name
            for name, point in self.hook_dict.items()
            if point.bwd_hooks or name in backward.edits
        ]
        dispatcher = functools.partial(self._dispatch_grad, backward) if dispatch else None
        start, records = self._model.backward(
            backward.tape, grad, backward.names, dispatch, dispatcher, edits=backward.declared
        )
        convert = self._converter(backward.as_torch)
        # In firing order, as a TransformerLens cache lists them.
        order = {name: i for i, name in enumerate(self.hook_dict)}
        grads = {name: convert(value) for name, value in records}
        return convert(start), dict(sorted(grads.items(), key=lambda item: order[item[0]]))

    def _with_backward(
        self, names: list[str], metric: Any, grad_output: Any, run: Callable[[], Any]
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Runs ``run()`` (a forward pass) keeping what a backward pass needs, then the backward
        pass. Returns ``(run's result, the gradient where the forward started, the gradients at
        names)``."""
        _one_gradient_source(metric, grad_output)
        if self._model.dtype != "float32":
            raise ValueError(
                f"gradients are computed in float32 only; this model is {self._model.dtype}: "
                "use model.to('float32')"
            )
        backward = _Backward(names, metric, grad_output)
        token = _BACKWARD.set(backward)
        try:
            result = run()
        finally:
            _BACKWARD.reset(token)
        start, grads = self._backward(backward)
        return result, start, grads

    def grad(
        self,
        input: Any,
        metric: Callable[[Any], Any] | None = None,
        grad_output: Any = None,
        names: NamesFilter = None,
        **forward_kwargs: Any,
    ) -> dict[str, Any]:
        """Gradients of a metric of the output with respect to the activations at the hook
        points ``names`` selects (all by default), as ``{name: gradient}`` (each the shape of
        its activation), computed by the Rust backward pass.

        The gradient starts at the output of ``forward(input, **forward_kwargs)`` (the logits,
        or the last residual stream with ``return_type=None`` or ``stop_at_layer``): give
        ``metric`` (a function of the output tensor returning a scalar; torch differentiates
        it) or ``grad_output`` (d metric / d output, the output's shape; no torch needed, see
        ``hooked_encoder.metrics``). Active forward hooks are part of the differentiated
        function (exactly so for torch users; for NumPy users an edit counts as the identity),
        and active backward hooks (``add_hook(name, fn, dir="bwd")``) see and may replace the
        gradient at their point. Gradients are with respect to activations, never weights.
        """
        keep = names_predicate(names)
        wanted = [name for name in self.hook_dict if keep(name)]
        _, _, grads = self._with_backward(
            wanted, metric, grad_output, lambda: self.forward(input, **forward_kwargs)
        )
        return grads

    def forward(
        self,
        input: Any,
        return_type: ReturnType = "logits",
        token_type_ids: Any = None,
        one_zero_attention_mask: Any = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        interventions: Sequence[Any] | None = None,
    ) -> Any:
        """Runs the model.

        ``input`` is token ids (``[batch, pos]`` NumPy integer array, torch tensor or nested
        lists) or text (a string or list of strings) when the model has a tokenizer.
        ``one_zero_attention_mask`` marks real tokens with 1 and padding with 0; without it every
        position is attended to (TransformerLens's behaviour), except for text input, whose mask
        comes from the tokenizer. Returns logits ``[batch, pos, d_vocab]``; with
        ``return_type="predictions"``, the most likely token at every ``[MASK]`` (TransformerLens's
        format: one string, or ``"Prediction i: ..."`` strings when there are several); or
        ``None`` with ``return_type=None`` (which skips the MLM head entirely, unlike
        TransformerLens).

        ``start_at_layer=k`` makes ``input`` the residual stream entering block ``k``
        (``[batch, pos, d_model]``, e.g. a cached ``blocks.k.hook_resid_pre``, patched);
        ``stop_at_layer=k`` returns the residual stream entering block ``k`` (the output of block
        ``k - 1``; ``0`` gives ``hook_full_embed``) instead of running the rest. Together they
        make activation patching cheap: rerun only the blocks after the patch.

        ``interventions`` (from :mod:`hooked_encoder.interventions`) are applied by the Rust
        pass at their hook points, before any Python hook there (see
        :meth:`run_with_interventions`).
        """
        if return_type not in ("logits", "predictions", None):
            raise ValueError(
                f"return_type must be 'logits', 'predictions' or None, got {return_type!r}"
            )
        head = "residual" if return_type is None else "logits"
        if start_at_layer is not None:
            if token_type_ids is not None:
                raise ValueError(
                    "token_type_ids only enter the embeddings; with start_at_layer "
                    "the input is already a residual stream"
                )
            if return_type == "predictions":
                raise ValueError("return_type='predictions' needs token input, not start_at_layer")
            output = self._run_from_residual(
                input, start_at_layer, stop_at_layer, head, one_zero_attention_mask, interventions
            )
            return output if stop_at_layer is not None or return_type == "logits" else None
        prepared = self._prepare(input, token_type_ids, one_zero_attention_mask)
        edits = self._edits(interventions, prepared.tokens.shape, prepared.tokens, prepared.mask)
        output = self._run(prepared, head, stop_at_layer, edits)
        if stop_at_layer is not None:
            return output
        if return_type == "predictions":
            if not self.has_mlm_head:
                raise ValueError(
                    "return_type='predictions' needs an MLM head, and this checkpoint has none"
                )
            return self._predictions(prepared.tokens, np.asarray(output))
        return output if return_type == "logits" else None

    def _predictions(self, tokens: np.ndarray, logits: np.ndarray) -> str | list[str]:
        """TransformerLens's MLM predictions: the argmax at every ``[MASK]`` of the batch, in
        row-major order, decoded together."""
        tokenizer = self._require_tokenizer("return_type='predictions'")
        mask_id = tokenizer.mask_token_id
        if mask_id is None or not (tokens == mask_id).any():
            raise ValueError(
                "return_type='predictions' needs at least one [MASK] token in the input"
            )
        best = logits[tokens == mask_id].argmax(-1)
        predictions = tokenizer.decode([int(i) for i in best])
        if " " in predictions:
            return [f"Prediction {i}: {p}" for i, p in enumerate(predictions.split(" "))]
        return predictions

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer: load a checkpoint directory that has tokenizer.json, "
                "or pass tokenizer= (a tokenizers.Tokenizer or a transformers tokenizer)"
            )
        return self.tokenizer

    def to_str_tokens(self, input: Any) -> list[str] | list[list[str]]:
        """Token strings: of a text (tokenized with ``[CLS]``/``[SEP]``), or of token ids
        (``[pos]`` gives a list, ``[batch, pos]`` a list per row)."""
        tokenizer = self._require_tokenizer("to_str_tokens")
        if isinstance(input, str):
            return tokenizer.ids_to_tokens(list(self._tokenize(input)[0][0]))
        if isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
            tokens, _, mask = self._tokenize(input)
            return [
                tokenizer.ids_to_tokens(list(row[m == 1]))
                for row, m in zip(tokens, mask, strict=True)
            ]
        rows = [tokenizer.ids_to_tokens(list(row)) for row in _int_array(input, "tokens")]
        return rows[0] if _ndim(input) == 1 else rows

    def to_string(self, tokens: Any) -> str | list[str]:
        """Decodes token ids: ``[pos]`` to a string, ``[batch, pos]`` to a list of strings."""
        tokenizer = self._require_tokenizer("to_string")
        decoded = [tokenizer.decode([int(i) for i in row]) for row in _int_array(tokens, "tokens")]
        return decoded[0] if _ndim(tokens) == 1 else decoded

    def to_single_token(self, string: str) -> int:
        """The id of ``string``, which must be exactly one token."""
        ids = self._require_tokenizer("to_single_token").encode_plain(string)
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one")
        return ids[0]

    def get_token_position(
        self, single_token: str | int, input: Any, mode: Literal["first", "last"] = "first"
    ) -> int:
        """The position of ``single_token`` (a string or an id) in ``input`` (a text or one
        row of token ids), its first or last occurrence."""
        token = (
            self.to_single_token(single_token) if isinstance(single_token, str) else single_token
        )
        tokens = self._tokenize(input)[0] if isinstance(input, str) else _int_array(input, "tokens")
        if tokens.shape[0] != 1:
            raise ValueError("get_token_position needs a single sequence")
        positions = np.flatnonzero(tokens[0] == token)
        if positions.size == 0:
            raise ValueError(f"token {single_token!r} does not occur in the input")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        return int(positions[0] if mode == "first" else positions[-1])

    __call__ = forward

    def encoder_output(
        self, tokens: Any, token_type_ids: Any = None, one_zero_attention_mask: Any = None
    ) -> Any:
        """The last block's output ``[batch, pos, d_model]`` (Hugging Face's
        ``last_hidden_state``)."""
        prepared = self._prepare(tokens, token_type_ids, one_zero_attention_mask)
        return self._run(prepared, "residual")

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        device: str | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: int | slice | None = None,
        return_cache_object: bool = True,
        metric: Callable[[Any], Any] | None = None,
        grad_output: Any = None,
        **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, Any]]:
        """Runs the model and returns ``(output, cache)`` with the activation of every hook point
        that ``names_filter`` selects (all by default), in firing order.

        Recording happens in Rust: unselected points cost nothing, and selected ones cost one
        copy each. Hooks already added (e.g. by ``hooks()``) run first, so the cache holds what
        the rest of the model saw. ``pos_slice`` keeps only those positions (the query
        positions of attention patterns and scores).

        With ``incl_bwd=True`` the cache also holds ``{name}_grad``, the gradient of a metric
        with respect to each cached activation (``cache["z_grad", 3]`` works), from the Rust
        backward pass: give ``metric`` (a function of the output returning a scalar; torch
        differentiates it) or ``grad_output`` (d metric / d output). See ``grad``.
        """
        return self._cached_call(
            self.forward,
            model_args,
            model_kwargs,
            names_filter=names_filter,
            device=device,
            remove_batch_dim=remove_batch_dim,
            incl_bwd=incl_bwd,
            reset_hooks_end=reset_hooks_end,
            clear_contexts=clear_contexts,
            pos_slice=pos_slice,
            return_cache_object=return_cache_object,
            metric=metric,
            grad_output=grad_output,
        )

    def _cached_call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        names_filter: NamesFilter,
        device: str | None,
        remove_batch_dim: bool,
        incl_bwd: bool,
        reset_hooks_end: bool,
        clear_contexts: bool,
        pos_slice: int | slice | None,
        return_cache_object: bool,
        metric: Callable[[Any], Any] | None = None,
        grad_output: Any = None,
    ) -> tuple[Any, ActivationCache | dict[str, Any]]:
        """Calls ``fn(*args, **kwargs)`` (a forward pass) with the points ``names_filter`` selects
        recorded, and returns ``(its output, the cache)``; with ``incl_bwd``, then runs the
        backward pass and adds the gradients at those points as ``{name}_grad``."""
        if not incl_bwd and (metric is not None or grad_output is not None):
            raise ValueError("metric= and grad_output= need incl_bwd=True")
        if device not in (None, "cpu"):
            raise ValueError(f"cached activations are returned on the CPU, not {device!r}")
        keep = names_predicate(names_filter)
        recording = _Recording([name for name in self.hook_dict if keep(name)])
        token = _RECORDING.set(recording)
        grads: dict[str, Any] = {}
        try:
            if incl_bwd:
                output, _, grads = self._with_backward(
                    recording.names, metric, grad_output, lambda: fn(*args, **kwargs)
                )
            else:
                output = fn(*args, **kwargs)
        finally:
            _RECORDING.reset(token)
            if reset_hooks_end:
                self.reset_hooks(
                    clear_contexts, including_permanent=False, level=self.context_level
                )
        cache = recording.cache
        cache.update({f"{name}_grad": value for name, value in grads.items()})
        if pos_slice is not None:
            cache = {
                name: _slice_positions(name, value, pos_slice) for name, value in cache.items()
            }
        cache_object = ActivationCache(cache, self)
        if remove_batch_dim:
            cache_object.remove_batch_dim()
        return output, cache_object if return_cache_object else cache_object.cache_dict

    # ------------------------------------------------------------------ hooks

    def _matching(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        if isinstance(name, str):
            if name not in self.hook_dict:
                close = difflib.get_close_matches(name, self.hook_dict, n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise KeyError(f"unknown hook point {name!r}{hint}")
            return [self.hook_dict[name]]
        if callable(name):
            return [point for n, point in self.hook_dict.items() if name(n)]
        raise TypeError(f"a hook name must be a string or a predicate, got {type(name).__name__}")

    def add_hook(
        self,
        name: str | Callable[[str], bool],
        hook: Callable[..., Any],
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Adds ``hook`` (``fn(activation, hook) -> replacement or None``) to the point
        ``name``, or to every point for which the predicate ``name`` is true."""
        _check_direction(dir)
        for point in self._matching(name):
            point.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(
        self, name: str | Callable[[str], bool], hook: Callable[..., Any], dir: str = "fwd"
    ) -> None:
        """Adds a hook that ``reset_hooks()`` keeps (unless ``including_permanent=True``)."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(
        self, direction: str = "both", including_permanent: bool = False, level: int | None = None
    ) -> None:
        """Removes hook functions from every point."""
        for point in self.hook_dict.values():
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        """Empties every hook point's ``ctx``."""
        for point in self.hook_dict.values():
            point.clear_context()

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: str = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Removes hooks (non-permanent ones, unless told otherwise) and, by default, contexts."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: FwdHooks = (),
        bwd_hooks: FwdHooks = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedEncoder]:
        """A context in which ``fwd_hooks`` and ``bwd_hooks`` are active; on exit they are
        removed (only the ones this context added). Backward hooks run in the backward passes
        of ``grad``, ``run_with_cache(incl_bwd=True)`` and ``run_with_hooks(metric=...)``."""
        self.context_level += 1
        try:
            for name, fn in fwd_hooks:
                self.add_hook(name, fn, level=self.context_level)
            for name, fn in bwd_hooks:
                self.add_hook(name, fn, dir="bwd", level=self.context_level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(
                    clear_contexts, including_permanent=False, level=self.context_level
                )
            self.context_level -= 1

    def run_with_interventions(
        self, input: Any, interventions: Sequence[Any], *model_args: Any, **model_kwargs: Any
    ) -> Any:
        """Runs ``forward`` with declarative ``interventions``
        (:mod:`hooked_encoder.interventions`: ``zero``, ``mean``, ``patch``, ``add``, ``scale``,
        ``replace``) applied by the Rust pass at their hook points, with no Python call during
        the pass. Every selector is checked before the pass (a ``ValueError`` names the
        intervention). At one point, interventions apply in list order, then Python hooks; a
        cache (``run_with_cache(..., interventions=...)``) records the values after them."""
        return self.forward(input, *model_args, interventions=interventions, **model_kwargs)

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: FwdHooks = (),
        bwd_hooks: FwdHooks = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        metric: Callable[[Any], Any] | None = None,
        grad_output: Any = None,
        **model_kwargs: Any,
    ) -> Any:
        """Runs ``forward`` with ``fwd_hooks`` (a list of ``(name or predicate, fn)``) active.

        ``bwd_hooks`` run in a backward pass from ``metric`` or ``grad_output`` (see ``grad``)
        that follows the forward pass: each gets the gradient arriving at its point and may
        return a replacement that flows on backwards."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            if not bwd_hooks and metric is None and grad_output is None:
                return self.forward(*model_args, **model_kwargs)
            output, _, _ = self._with_backward(
                [], metric, grad_output, lambda: self.forward(*model_args, **model_kwargs)
            )
            return output

    # ------------------------------------------------------------------ embeddings

    def encode(
        self,
        sentences: str | Iterable[str],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: Literal["sentence_embedding", "token_embeddings"] = "sentence_embedding",
        precision: Literal["float32", "binary", "ubinary"] = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = False,
    ) -> Any:
        """Sentence embeddings, as ``SentenceTransformer.encode``: same arguments, same meanings,
        same results, using the checkpoint's own pooling, Normalize module and
        ``max_seq_length`` (``modules.json``, ``1_Pooling/config.json``,
        ``sentence_bert_config.json``; mean pooling, no normalisation and ``n_ctx`` without them).

        Returns a float32 array ``[n, d]`` (one vector for a single string), a torch tensor with
        ``convert_to_tensor``, or a list of torch tensors with ``convert_to_numpy=False``.
        ``output_value="token_embeddings"`` gives one ``[tokens, d_model]`` array per text (torch
        tensors with ``convert_to_tensor`` or ``convert_to_numpy=False``). ``precision``
        ``"binary"``/``"ubinary"`` packs the sign bits (int8/uint8); hooks added to the model run.
        See :mod:`hooked_encoder.encode`.
        """
        from .encode import encode

        return encode(
            self,
            sentences,
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            output_value=output_value,
            precision=precision,
            convert_to_numpy=convert_to_numpy,
            convert_to_tensor=convert_to_tensor,
            normalize_embeddings=normalize_embeddings,
        )


def _unpickle(
    cfg: HookedEncoderConfig, tokenizer: Any, output_format: OutputFormat, weights: bytes
) -> HookedEncoder:
    core, _ = _core.Model.from_safetensors_bytes(cfg._core_json(), weights, cfg.device)
    return HookedEncoder(cfg, tokenizer, output_format=output_format, _core_model=core)


def _to_torch(value: Any, dtype: str = "float32") -> Any:
    torch = _torch()
    if isinstance(value, _core.DeviceTensor):
        return torch.from_dlpack(value)  # already in the model's dtype
    tensor = torch.from_numpy(value)
    # A half-precision model on the CPU hands NumPy float32 over; narrowing it back is exact.
    return tensor if dtype == "float32" else tensor.to(getattr(torch, dtype))


def _to_numpy(value: Any) -> Any:
    return value.numpy() if isinstance(value, _core.DeviceTensor) else value


def _check_replacement(name: str, value: Any, shape: tuple[int, ...], dtype: str) -> Any:
    if _is_torch_tensor(value):
        torch = _torch()
        if value.dtype not in (torch.float32, getattr(torch, dtype)):
            raise TypeError(
                f"hook on {name!r} returned a {value.dtype} tensor; it must be torch.{dtype}"
                + (" or torch.float32" if dtype != "float32" else "")
            )
    elif isinstance(value, np.ndarray):
        if value.dtype != np.float32:
            raise TypeError(f"hook on {name!r} returned a {value.dtype} array; it must be float32")
    else:
        raise TypeError(
            f"hook on {name!r} returned {type(value).__name__}; return None or an array of the "
            "activation's shape and dtype"
        )
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"hook on {name!r} returned shape {list(value.shape)}, but the activation has shape "
            f"{list(shape)}"
        )
    return value


def _slice_positions(name: str, value: Any, pos_slice: int | slice) -> Any:
    index = (
        slice(pos_slice, None if pos_slice == -1 else pos_slice + 1)
        if isinstance(pos_slice, int)
        else pos_slice
    )
    axis = 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1
    return value[(slice(None),) * axis + (index,)]
