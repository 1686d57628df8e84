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
}
# The architecture assumed when config.json names none.
_DEFAULT_ARCHITECTURE = {
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForMaskedLM",
    "distilbert": "DistilBertForMaskedLM",
    "mpnet": "MPNetForMaskedLM",
    "electra": "ElectraForPreTraining",
}
# Families whose positions are numbered from the ids, after the padding row (RoBERTa's way).
_OFFSET_POSITIONS = ("roberta", "mpnet")
# Families without token-type embeddings.
_NO_TOKEN_TYPES = ("distilbert", "mpnet")
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

    def __post_init__(self) -> None:
        if self.n_heads == -1 and isinstance(self.d_model, int) and isinstance(self.d_head, int):
            self.n_heads = self.d_model // self.d_head if self.d_head > 0 else 0
        if self.d_mlp is None and isinstance(self.d_model, int):
            self.d_mlp = 4 * self.d_model
        if self.model_type == "mpnet" and self.relative_attention_num_buckets is None:
            self.relative_attention_num_buckets = 32  # transformers' MPNetConfig default
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
        dtype = str(self.dtype).removeprefix("torch.")  # torch.float16 works too
        if dtype not in DTYPE_ALIASES:
            raise ValueError(
                f"dtype {self.dtype!r} is not supported; use float32, float16 or bfloat16"
            )
        # One spelling per dtype from here on (the Rust model and torch use these names).
        self.dtype = DTYPE_ALIASES[dtype]

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
        )

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict."""
        return dataclasses.asdict(self)

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
                "positions": (
                    {"kind": "from_ids", "padding_idx": self.padding_idx}
                    if self.family in _OFFSET_POSITIONS
                    else {"kind": "absolute"}
                ),
                "relative_attention_buckets": self.relative_attention_num_buckets,
                "d_embed": self.d_embed,
            }
        )
