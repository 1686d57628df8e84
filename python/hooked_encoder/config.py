"""Model configuration, with TransformerLens's field names."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

ActFn = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu"]

# Accepted spellings of each supported dtype (torch's names without the "torch." prefix, and
# TransformerLens's short ones), mapped to the one the package uses.
DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

# Hugging Face `hidden_act` / TransformerLens `act_fn` names -> the core's activation names.
_ACTIVATIONS = {
    "gelu": "gelu",  # exact, with erf: BERT's activation
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}

# Hugging Face `model_type` -> the core's family (rust/hooked_encoder_core/src/family.rs says
# what each family changes). RoBERTa, XLM-RoBERTa and CamemBERT differ only in tokenizer.
FAMILIES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "distilbert": "distilbert",
    "mpnet": "mpnet",
    "electra": "electra",
    "modernbert": "modern_bert",
}
# The architecture assumed when config.json names none.
_DEFAULT_ARCHITECTURE = {
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForMaskedLM",
    "distilbert": "DistilBertForMaskedLM",
    "mpnet": "MPNetForMaskedLM",
    "electra": "ElectraForPreTraining",
    "modern_bert": "ModernBertForMaskedLM",
}
# Families whose positions are numbered from the ids, after the padding row (RoBERTa's way).
_OFFSET_POSITIONS = ("roberta", "mpnet")
# Families without token-type embeddings.
_NO_TOKEN_TYPES = ("distilbert", "mpnet", "modern_bert")
# ModernBERT's options that no public checkpoint changes and the core does not implement, with
# the value every checkpoint has.
_MODERNBERT_FIXED = {
    "attention_bias": False,
    "mlp_bias": False,
    "norm_bias": False,
    "classifier_bias": False,
    "decoder_bias": True,
}
# ModernBERT's rope_theta defaults (transformers' ModernBertConfig): global and local layers.
_MODERNBERT_ROPE_BASES = (160_000.0, 10_000.0)
# DistilBERT's config.json keys -> BERT's. Its LayerNorms use eps 1e-12, not a config key.
_DISTILBERT_KEYS = {
    "dim": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_layers": "num_hidden_layers",
    "hidden_dim": "intermediate_size",
    "activation": "hidden_act",
}

# The Rust core's largest accepted size (MAX_DIM in rust/hooked_encoder_core/src/config.rs).
_MAX_DIM = 1 << 24


def _finite(value: int | float) -> bool:
    """``math.isfinite``, but False (not OverflowError) for an int too large for a float, such
    as ``layer_norm_eps: 1000...0`` (400 digits) in a config.json."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclasses.dataclass
class HookedEncoderConfig:
    """The architecture of a BERT-style encoder, in TransformerLens's terms.

    Required: ``d_model``, ``d_head``, ``n_layers``, ``n_ctx`` and ``d_vocab``. ``n_heads``
    defaults to ``d_model // d_head`` and ``d_mlp`` to ``4 * d_model``, as in TransformerLens.

    Unlike TransformerLens's ``HookedTransformerConfig`` (whose defaults are a causal ReLU model), a
    hand-built config here is what BERT is: bidirectional attention with exact GELU.
    """

    d_model: int
    d_head: int
    n_layers: int
    n_ctx: int
    d_vocab: int
    n_heads: int = -1
    d_mlp: int | None = None
    eps: float = 1e-5
    act_fn: ActFn = "gelu"
    attention_dir: Literal["bidirectional", "causal"] = "bidirectional"
    n_token_types: int = 2
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    seed: int | None = None
    model_name: str = "custom"
    tokenizer_name: str | None = None
    original_architecture: str = "BertForMaskedLM"
    # Hugging Face's model_type: which family of encoders (see FAMILIES).
    model_type: str = "bert"
    # The padding token's id, which RoBERTa-family models also use to number positions (their
    # position table has n_ctx + padding_idx + 1 rows). None for BERT.
    padding_idx: int | None = None
    # Rows of MPNet's relative position bias table (its config's relative_attention_num_buckets);
    # None for families without one.
    relative_attention_num_buckets: int | None = None
    # ELECTRA's embedding width (its config's embedding_size) when it differs from d_model: the
    # embeddings are projected into the residual stream (hook_embed_proj). None otherwise.
    d_embed: int | None = None
    # ModernBERT (rotary positions): the rotary frequency base (rope_theta) of global-attention
    # layers and of local ones. None for other families (their defaults are transformers').
    rotary_base: float | None = None
    rotary_base_local: float | None = None
    # Each layer's attention, "global" or "local" (TransformerLens's attn_types, as in Gemma 2),
    # and how far a local layer's queries see either side: query i attends to key j only if
    # |i - j| <= window_size (Hugging Face ModernBERT's local_attention // 2). None: all global.
    attn_types: list[str] | None = None
    window_size: int | None = None

    def __post_init__(self) -> None:
        if self.n_heads == -1 and isinstance(self.d_model, int) and isinstance(self.d_head, int):
            self.n_heads = self.d_model // self.d_head if self.d_head > 0 else 0
        if self.d_mlp is None and isinstance(self.d_model, int):
            self.d_mlp = 4 * self.d_model
        if self.model_type == "mpnet" and self.relative_attention_num_buckets is None:
            self.relative_attention_num_buckets = 32  # transformers' MPNetConfig default
        if self.model_type == "modernbert":
            if self.rotary_base is None:
                self.rotary_base = _MODERNBERT_ROPE_BASES[0]
            if self.rotary_base_local is None:
                self.rotary_base_local = _MODERNBERT_ROPE_BASES[1]
        self._validate()

    def _validate(self) -> None:
        for name in (
            "d_model",
            "d_head",
            "n_heads",
            "d_mlp",
            "n_layers",
            "n_ctx",
            "d_vocab",
            "n_token_types",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"config field {name} must be an int, got {value!r}")
            # n_token_types may be 0: no token-type embeddings (DistilBERT).
            if value < 0 or (value == 0 and name != "n_token_types"):
                raise ValueError(f"config field {name} must be positive, got {value}")
        for name in ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"config field {name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)):
            raise TypeError(f"config field eps must be a number, got {self.eps!r}")
        if not (_finite(self.eps) and self.eps > 0):
            raise ValueError(f"config field eps must be positive and finite, got {self.eps}")
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported act_fn {self.act_fn!r}; supported: {sorted(_ACTIVATIONS)}"
            )
        if self.attention_dir not in ("bidirectional", "causal"):
            raise ValueError(
                f"attention_dir must be 'bidirectional' or 'causal', got {self.attention_dir!r}"
            )
        if self.model_type not in FAMILIES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; supported: {sorted(FAMILIES)}"
            )
        if self.family in _OFFSET_POSITIONS:
            if isinstance(self.padding_idx, bool) or not isinstance(self.padding_idx, int):
                raise TypeError(
                    f"model_type {self.model_type!r} needs padding_idx (an int, the padding "
                    f"token's id), got {self.padding_idx!r}"
                )
            if not 0 <= self.padding_idx < self.d_vocab:
                raise ValueError(
                    f"padding_idx {self.padding_idx} is not a token id (d_vocab is {self.d_vocab})"
                )
        self._validate_modernbert()
        dtype = str(self.dtype).removeprefix("torch.")  # torch.float16 works too
        if dtype not in DTYPE_ALIASES:
            raise ValueError(
                f"dtype {self.dtype!r} is not supported; use float32, float16 or bfloat16"
            )
        # One spelling per dtype from here on (the Rust model and torch use these names).
        self.dtype = DTYPE_ALIASES[dtype]

    def _validate_modernbert(self) -> None:
        """Rotary bases, attention types and window: ModernBERT's, and only ModernBERT's."""
        modern = self.family == "modern_bert"
        for name in ("rotary_base", "rotary_base_local", "attn_types", "window_size"):
            if not modern and getattr(self, name) is not None:
                raise ValueError(
                    f"config field {name} is ModernBERT's; model_type {self.model_type!r} has none"
                )
        if not modern:
            return
        for name in ("rotary_base", "rotary_base_local"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"config field {name} must be a number, got {value!r}")
            if not (_finite(value) and value > 1):
                raise ValueError(f"config field {name} must be finite and above 1, got {value}")
        if self.d_head % 2:
            raise ValueError(f"rotary positions need an even d_head, got {self.d_head}")
        if self.use_split_qkv_input:
            raise ValueError("use_split_qkv_input is not supported for ModernBERT (pre-LN blocks)")
        if self.attn_types is not None:
            if not isinstance(self.attn_types, list) or any(
                t not in ("global", "local") for t in self.attn_types
            ):
                raise ValueError(
                    f"config field attn_types must be a list of 'global' / 'local', got "
                    f"{self.attn_types!r}"
                )
            if len(self.attn_types) != self.n_layers:
                raise ValueError(
                    f"config field attn_types has {len(self.attn_types)} entries for "
                    f"{self.n_layers} layers"
                )
        if self.window_size is not None and (
            isinstance(self.window_size, bool)
            or not isinstance(self.window_size, int)
            or self.window_size < 0
        ):
            raise ValueError(
                f"config field window_size must be a non-negative int, got {self.window_size!r}"
            )
        if "local" in (self.attn_types or []) and self.window_size is None:
            raise ValueError("local attention layers (attn_types) need a window_size")

    @property
    def positional_embedding_type(self) -> str:
        """TransformerLens's name for how positions enter: ``"standard"`` (a learned table,
        ``W_pos``) or ``"rotary"`` (ModernBERT)."""
        return "rotary" if self.family == "modern_bert" else "standard"

    @property
    def pre_layer_norm(self) -> bool:
        """Whether blocks normalise their inputs (``ln1`` before attention, ``ln2`` before the
        MLP, ``ln_final`` after the last block: ModernBERT) rather than their outputs (BERT's
        post-LN blocks)."""
        return self.family == "modern_bert"

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP is gated (``mlp.hook_pre_linear``; ``W_gate`` beside ``W_in``)."""
        return self.family == "modern_bert"

    @property
    def family(self) -> str:
        """The core's family for :attr:`model_type` (a value of :data:`FAMILIES`)."""
        return FAMILIES[self.model_type]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HookedEncoderConfig:
        """Builds a config from a dict of field values, naming any unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        ]
        if missing:
            raise ValueError(f"config is missing required fields {missing}")
        return cls(**values)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], model_name: str = "custom") -> HookedEncoderConfig:
        """Converts a Hugging Face ``config.json`` (as a dict) of a supported ``model_type``
        (BERT as TransformerLens does; every family of :data:`FAMILIES` alike)."""
        if hf.get("model_type") == "distilbert":
            renamed = {_DISTILBERT_KEYS.get(key, key): value for key, value in hf.items()}
            hf = {"layer_norm_eps": 1e-12, **renamed}
        modern = hf.get("model_type") == "modernbert"
        if modern:
            hf = _modernbert_as_bert_keys(hf)
        required = (
            "hidden_size",
            "num_attention_heads",
            "num_hidden_layers",
            "intermediate_size",
            "max_position_embeddings",
            "vocab_size",
        )
        missing = [key for key in required if key not in hf]
        if missing:
            raise ValueError(f"config.json is missing {missing}")
        model_type = hf.get("model_type", "bert")
        if model_type not in FAMILIES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}"
            )
        family = FAMILIES[model_type]
        position_type = hf.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"position_embedding_type {position_type!r} is not supported (only 'absolute')"
            )
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        # Sizes are checked here, under their config.json names, so that a damaged or hostile
        # config.json gets an error naming the file's field ("vocab_size") rather than the
        # TransformerLens field ("d_vocab") that _validate or the Rust core would name.
        for key in (
            *required,
            "type_vocab_size",
            "relative_attention_num_buckets",
            "embedding_size",
            "local_attention",
        ):
            if key not in hf:
                continue
            if isinstance(hf[key], bool) or not isinstance(hf[key], int):
                raise TypeError(f"config.json field {key} must be an int, got {hf[key]!r}")
            if hf[key] <= 0:
                raise ValueError(f"config.json field {key} must be positive, got {hf[key]}")
            if hf[key] > _MAX_DIM:
                raise ValueError(
                    f"config.json field {key} = {hf[key]} is too large (at most {_MAX_DIM})"
                )
        eps = hf.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"config.json field layer_norm_eps must be a number, got {eps!r}")
        if not (_finite(eps) and eps > 0):
            raise ValueError(
                f"config.json field layer_norm_eps must be positive and finite, got {eps!r}"
            )
        if heads <= 0 or hidden % heads:
            # Named as a config.json field, like the checks above.
            raise ValueError(
                f"config.json field hidden_size ({hidden}) must be a positive multiple of "
                f"num_attention_heads ({heads})"
            )
        act = hf.get("hidden_act", "gelu")
        if not isinstance(act, str) or act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
            )
        n_ctx, padding_idx = hf["max_position_embeddings"], None
        if family in _OFFSET_POSITIONS:
            # Positions start after the padding row: max_position_embeddings - padding_idx - 1
            # tokens fit (514 rows -> 512 tokens for roberta-base).
            padding_idx = hf.get("pad_token_id", 1)
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
                raise TypeError(
                    f"config.json field pad_token_id must be an int, got {padding_idx!r}"
                )
            if not 0 <= padding_idx < hf["vocab_size"]:
                raise ValueError(
                    f"config.json field pad_token_id ({padding_idx}) is not a token id "
                    f"(vocab_size is {hf['vocab_size']})"
                )
            n_ctx -= padding_idx + 1
            if n_ctx <= 0:
                raise ValueError(
                    f"config.json field max_position_embeddings ({hf['max_position_embeddings']}) "
                    f"leaves no positions after pad_token_id ({padding_idx}) + 1"
                )
        architectures = hf.get("architectures") or [_DEFAULT_ARCHITECTURE[family]]
        # A non-list here used to fail as "KeyError: 0" or "'int' object is not subscriptable".
        if not isinstance(architectures, list):
            raise TypeError(
                f"config.json field architectures must be a list of names, got {architectures!r}"
            )
        return cls(
            d_model=hidden,
            d_head=hidden // heads,
            n_heads=heads,
            d_mlp=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_ctx=n_ctx,
            d_vocab=hf["vocab_size"],
            eps=eps,
            act_fn=act,
            n_token_types=0 if family in _NO_TOKEN_TYPES else hf.get("type_vocab_size", 2),
            model_name=model_name,
            tokenizer_name=model_name,
            original_architecture=str(architectures[0]),
            model_type=model_type,
            padding_idx=padding_idx,
            # None takes the default in __post_init__.
            relative_attention_num_buckets=(
                hf.get("relative_attention_num_buckets") if family == "mpnet" else None
            ),
            d_embed=(
                hf["embedding_size"]
                if family == "electra" and hf.get("embedding_size", hidden) != hidden
                else None
            ),
            **(_modernbert_fields(hf) if modern else {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict."""
        return dataclasses.asdict(self)

    def _core_positions(self) -> dict[str, Any]:
        if self.family in _OFFSET_POSITIONS:
            return {"kind": "from_ids", "padding_idx": self.padding_idx}
        if self.positional_embedding_type == "rotary":
            return {
                "kind": "rotary",
                "base": float(self.rotary_base),
                "local_base": float(self.rotary_base_local),
            }
        return {"kind": "absolute"}

    def _core_json(self) -> str:
        """The subset the Rust core needs, as JSON."""
        return json.dumps(
            {
                "d_model": self.d_model,
                "d_head": self.d_head,
                "n_heads": self.n_heads,
                "d_mlp": self.d_mlp,
                "n_layers": self.n_layers,
                "n_ctx": self.n_ctx,
                "d_vocab": self.d_vocab,
                "n_token_types": self.n_token_types,
                "eps": float(self.eps),
                "act_fn": _ACTIVATIONS[self.act_fn],
                "attention_dir": self.attention_dir,
                "use_attn_result": self.use_attn_result,
                "use_split_qkv_input": self.use_split_qkv_input,
                "use_hook_mlp_in": self.use_hook_mlp_in,
                "family": self.family,
                "positions": self._core_positions(),
                "relative_attention_buckets": self.relative_attention_num_buckets,
                "d_embed": self.d_embed,
                "attn_types": self.attn_types,
                "window_size": self.window_size,
            }
        )


def _modernbert_as_bert_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """A ModernBERT ``config.json`` under BERT's key names (``norm_eps`` -> ``layer_norm_eps``,
    ``hidden_activation`` -> ``hidden_act``), after refusing what the core does not implement:
    biases where checkpoints have none, a head activation other than the MLP's, rope scaling."""
    for key, value in _MODERNBERT_FIXED.items():
        if hf.get(key, value) != value:
            raise ValueError(
                f"config.json field {key} = {hf[key]!r} is not supported for ModernBERT (every "
                f"public checkpoint has {value})"
            )
    act = hf.get("hidden_activation", "gelu")
    head_act = hf.get("classifier_activation", act)
    if head_act != act:
        raise ValueError(
            f"config.json field classifier_activation ({head_act!r}) must equal "
            f"hidden_activation ({act!r}) for ModernBERT"
        )
    for rope in (hf.get("rope_parameters") or {}).values():
        if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"rope_type {rope['rope_type']!r} is not supported for ModernBERT (only 'default')"
            )
    if hf.get("rope_scaling"):
        raise ValueError("config.json field rope_scaling is not supported for ModernBERT")
    return {
        **hf,
        "layer_norm_eps": hf.get("norm_eps", 1e-5),
        "hidden_act": act,
    }


def _modernbert_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """ModernBERT's attention types, window and rotary bases from its ``config.json``: as
    ``transformers`` 5 saves them (``layer_types``, ``rope_parameters``) or as the original
    checkpoints do (``global_attn_every_n_layers``, ``global_rope_theta``,
    ``local_rope_theta``)."""
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        every = hf.get("global_attn_every_n_layers", 3)
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(
                "config.json field global_attn_every_n_layers must be a positive int, got "
                f"{every!r}"
            )
        layer_types = [
            "full_attention" if i % every == 0 else "sliding_attention" for i in range(n_layers)
        ]
    names = {"full_attention": "global", "sliding_attention": "local"}
    if not isinstance(layer_types, list) or any(t not in names for t in layer_types):
        raise ValueError(
            f"config.json field layer_types must list 'full_attention' / 'sliding_attention', "
            f"got {layer_types!r}"
        )
    rope = hf.get("rope_parameters") or {}

    def base(layer_type: str, old_key: str, default: float) -> float:
        params = rope.get(layer_type) or {}
        return params.get("rope_theta", hf.get(old_key, default))

    return {
        "attn_types": [names[t] for t in layer_types],
        "window_size": hf.get("local_attention", 128) // 2,
        "rotary_base": base("full_attention", "global_rope_theta", _MODERNBERT_ROPE_BASES[0]),
        "rotary_base_local": base(
            "sliding_attention", "local_rope_theta", _MODERNBERT_ROPE_BASES[1]
        ),
    }
