"""Shared fixtures: tiny seeded BERT checkpoints written by Hugging Face ``transformers``, and
the reference's tolerances."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# TransformerLens's own tolerance for HookedEncoder against Hugging Face BERT.
ATOL, RTOL = 4e-5, 1.3e-6
# Half precision: the machine epsilon of each dtype (see assert_half_parity).
EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7}

SHAPES = {
    # name: (hidden, heads, layers, intermediate, vocab, max_positions)
    "small": (16, 2, 2, 40, 50, 12),
    "wide": (48, 4, 3, 96, 61, 20),
}


@dataclass
class Checkpoint:
    """A checkpoint on disk and the Hugging Face model holding the same weights."""

    path: Path
    hf: object  # transformers model, eval mode, eager attention
    config: object

    def hf_logits(self, tokens, types=None, mask=None) -> np.ndarray:
        """The Hugging Face model's logits (MLM, or an ELECTRA discriminator's) for
        ``[batch, pos]`` arrays."""
        given = {"token_type_ids": types, "attention_mask": mask}
        # Only what is given: DistilBERT's and MPNet's forward take no token_type_ids.
        given = {name: torch.tensor(a) for name, a in given.items() if a is not None}
        with torch.no_grad():
            out = self.hf(torch.tensor(tokens), **given)
        return (out.prediction_logits if hasattr(out, "prediction_logits") else out.logits).numpy()

    def batch(self, seed: int = 0, batch: int = 3, pos: int = 7):
        """Token ids, two token types (zeros for a model with one), and a right-padding mask
        with rows of different lengths (the last row is full, the first has three tokens).
        RoBERTa-family rows hold their padding token where the mask is 0 (their positions are
        numbered around it)."""
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, self.config.vocab_size, size=(batch, pos))
        lengths = np.linspace(3, pos, batch).round().astype(int)
        mask = (np.arange(pos)[None, :] < lengths[:, None]).astype(np.int64)
        types = (np.arange(pos)[None, :] >= (lengths[:, None] // 2)).astype(np.int64) * mask
        if getattr(self.config, "type_vocab_size", 0) <= 1:  # DistilBERT has none
            types = np.zeros_like(types)
        if self.config.model_type != "bert":
            pad = self.config.pad_token_id
            tokens = np.where(tokens == pad, pad + 1, tokens)  # padding only where masked
            tokens[mask == 0] = pad
        return tokens, types, mask


def assert_half_parity(ours: np.ndarray, hf_half: np.ndarray, hf32: np.ndarray, dtype: str):
    """The documented half-precision tolerance (README, "Half precision"): within 8 epsilons of
    the dtype times the largest float32 logit of Hugging Face's logits in the same dtype, and no
    further from the float32 logits than twice Hugging Face's own half-precision error."""
    scale = np.abs(hf32).max()
    np.testing.assert_allclose(ours, hf_half, rtol=0, atol=8 * EPSILON[dtype] * scale)
    hf_error = np.abs(hf_half - hf32).max()
    assert np.abs(ours - hf32).max() <= 2 * hf_error + EPSILON[dtype] * scale


def run_fresh_interpreter(script: str, env_changes: dict[str, str], *args: str, clear=()):
    """Runs `script` in a fresh Python, in this environment less the variables whose names start
    with one of `clear` and with `env_changes` applied, and returns the JSON it printed last: for
    what the package reads from the environment at import."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(clear))}
    env.update(env_changes)
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def randomize(model):
    """Randomises every parameter of a freshly built HF BERT (from torch's current seed) and
    puts it in eval mode. Hugging Face initialises biases to 0 and LayerNorms to 1; random ones
    make a dropped bias or a swapped LayerNorm visible."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.rsplit(".", 2)[-2] if name.count(".") else ""
            # BERT's "LayerNorm", DistilBERT's "sa_layer_norm", ModernBERT's "attn_norm".
            norm = "layernorm" in name.lower() or "layer_norm" in name or module.endswith("norm")
            if norm and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias") or norm:
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param) / hidden**0.25)
    return model.eval()


def shape_settings(shape: str) -> dict[str, int]:
    """A model shape of :data:`SHAPES` as the config arguments every BERT-like family shares
    (BERT's names; positions are left to each family)."""
    hidden, heads, layers, inter, vocab, _ = SHAPES[shape]
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=inter,
    )


def retaining(kept: dict, name: str):
    """A torch forward hook keeping a module's output (the first of a tuple) as
    ``kept[name]``, with its gradient retained for autograd comparisons."""

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        kept[name] = out

    return hook


def save_random(directory: Path, cls, config, seed: int) -> Checkpoint:
    """Builds ``cls(config)`` with random weights from ``seed`` (see :func:`randomize`), saves
    it as safetensors in ``directory`` and returns the checkpoint."""
    torch.manual_seed(seed)
    model = randomize(cls(config))
    model.save_pretrained(directory, safe_serialization=True)
    return Checkpoint(directory, model, config)


def make_checkpoint(
    directory: Path,
    shape: str = "small",
    arch: str = "BertForPreTraining",
    seed: int = 0,
    **config_overrides,
) -> Checkpoint:
    positions = SHAPES[shape][-1]
    config = transformers.BertConfig(
        **shape_settings(shape),
        max_position_embeddings=positions,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        attn_implementation="eager",
        **config_overrides,
    )
    return save_random(directory, getattr(transformers, arch), config, seed)


# Hugging Face model_type -> (masked-LM class, base class) of the RoBERTa family.
ROBERTA_FAMILY = {
    "roberta": ("RobertaForMaskedLM", "RobertaModel"),
    "xlm-roberta": ("XLMRobertaForMaskedLM", "XLMRobertaModel"),
    "camembert": ("CamembertForMaskedLM", "CamembertModel"),
}


def make_roberta_checkpoint(
    directory: Path,
    model_type: str = "roberta",
    shape: str = "small",
    base: bool = False,
    seed: int = 0,
    **config_overrides,
) -> Checkpoint:
    """A tiny RoBERTa-family checkpoint (masked LM, or the base model with its pooler) with the
    family's usual one token type and padding id 1; its position table has two extra rows,
    as roberta-base's 514 for 512 tokens."""
    positions = SHAPES[shape][-1]
    config = transformers.AutoConfig.for_model(
        model_type,
        **shape_settings(shape),
        max_position_embeddings=positions + 2,
        type_vocab_size=1,
        pad_token_id=1,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        attn_implementation="eager",
        **config_overrides,
    )
    masked_lm, base_model = ROBERTA_FAMILY[model_type]
    return save_random(
        directory, getattr(transformers, base_model if base else masked_lm), config, seed
    )


def make_distilbert_checkpoint(
    directory: Path, shape: str = "small", base: bool = False, seed: int = 0, **overrides
) -> Checkpoint:
    """A tiny DistilBERT checkpoint (``DistilBertForMaskedLM``, or ``DistilBertModel``)."""
    hidden, heads, layers, inter, vocab, positions = SHAPES[shape]
    config = transformers.DistilBertConfig(
        vocab_size=vocab,
        dim=hidden,
        n_heads=heads,
        n_layers=layers,
        hidden_dim=inter,
        max_position_embeddings=positions,
        activation="gelu",
        attn_implementation="eager",
        **overrides,
    )
    cls = transformers.DistilBertModel if base else transformers.DistilBertForMaskedLM
    return save_random(directory, cls, config, seed)


def make_mpnet_checkpoint(
    directory: Path, shape: str = "small", base: bool = False, seed: int = 0, **overrides
) -> Checkpoint:
    """A tiny MPNet checkpoint (``MPNetForMaskedLM``, or ``MPNetModel`` with its pooler) with
    transformers' 32 relative-position buckets and padding id 1."""
    settings = {"max_position_embeddings": SHAPES[shape][-1] + 2, **overrides}
    config = transformers.MPNetConfig(
        **shape_settings(shape),
        relative_attention_num_buckets=32,
        pad_token_id=1,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        attn_implementation="eager",
        **settings,
    )
    cls = transformers.MPNetModel if base else transformers.MPNetForMaskedLM
    return save_random(directory, cls, config, seed)


def make_modernbert_checkpoint(
    directory: Path,
    shape: str = "wide",
    base: bool = False,
    seed: int = 0,
    local_attention: int = 6,
    **overrides,
) -> Checkpoint:
    """A tiny ModernBERT checkpoint (``ModernBertForMaskedLM``, or ``ModernBertModel``) of four
    layers (global, local, local, global, as every third layer is global), with a local window
    of ``local_attention // 2`` either side (3 by default), narrower than the sequences the
    tests run, and small rotary bases so that positions turn q and k visibly."""
    settings = {**shape_settings(shape), "num_hidden_layers": 4, **overrides}
    config = transformers.ModernBertConfig(
        **settings,
        max_position_embeddings=SHAPES[shape][-1],
        local_attention=local_attention,
        global_rope_theta=1000.0,
        local_rope_theta=100.0,
        pad_token_id=0,
        cls_token_id=1,
        sep_token_id=2,
        mask_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    cls = transformers.ModernBertModel if base else transformers.ModernBertForMaskedLM
    return save_random(directory, cls, config, seed)


ELECTRA_CLASSES = {
    "discriminator": "ElectraForPreTraining",
    "generator": "ElectraForMaskedLM",
    "base": "ElectraModel",
}


def make_electra_checkpoint(
    directory: Path,
    kind: str = "discriminator",
    shape: str = "small",
    embedding_size: int | None = 8,
    seed: int = 0,
) -> Checkpoint:
    """A tiny ELECTRA checkpoint: the discriminator (``ElectraForPreTraining``), the generator
    (``ElectraForMaskedLM``) or the base model; by default with embeddings narrower than the
    hidden size (so with ``embeddings_project``), as electra-small's discriminator (the generators'
    are wider, which the same code path handles)."""
    settings = shape_settings(shape)
    config = transformers.ElectraConfig(
        **settings,
        embedding_size=embedding_size or settings["hidden_size"],
        max_position_embeddings=SHAPES[shape][-1],
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    return save_random(directory, getattr(transformers, ELECTRA_CLASSES[kind]), config, seed)


FAMILY_PARAMS = [
    *sorted(ROBERTA_FAMILY),
    "distilbert",
    "mpnet",
    "electra-discriminator",
    "electra-generator",
]


@pytest.fixture(scope="session", params=FAMILY_PARAMS)
def family_checkpoint(request, tmp_path_factory) -> Checkpoint:
    """A tiny checkpoint with a head (the wide shape) of each model_type beyond BERT: masked LM,
    and for ELECTRA also the discriminator, both with a narrower embedding (d_embed 24)."""
    directory = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("electra-"):
        kind = request.param.removeprefix("electra-")
        return make_electra_checkpoint(directory, kind, "wide", embedding_size=24, seed=11)
    if request.param == "distilbert":
        return make_distilbert_checkpoint(directory, "wide", seed=11)
    if request.param == "mpnet":
        return make_mpnet_checkpoint(directory, "wide", seed=11)
    return make_roberta_checkpoint(directory, request.param, "wide", seed=11)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Checkpoint:
    """The default tiny BertForPreTraining checkpoint."""
    return make_checkpoint(tmp_path_factory.mktemp("bert_small"))


@pytest.fixture(scope="session", params=sorted(SHAPES))
def any_checkpoint(request, tmp_path_factory) -> Checkpoint:
    """A tiny BertForPreTraining checkpoint of each shape."""
    return make_checkpoint(
        tmp_path_factory.mktemp(f"bert_{request.param}"), request.param, seed=len(request.param)
    )


@pytest.fixture(scope="session")
def model(checkpoint):
    from hooked_encoder import HookedEncoder

    return HookedEncoder.from_pretrained(checkpoint.path)


WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "a",
    "big",
    "red",
    "and",
    "it",
    "was",
    "tired",
    ".",
]


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A small BERT WordPiece tokenizer (``tokenizer.json``) whose vocabulary has exactly
    ``vocab_size`` entries: the special tokens, some words, then ``w0``, ``w1``, ..."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    # As in real BERT tokenizers: never split or lowercase these.
    tokenizer.add_special_tokens(vocab[:5])
    tokenizer.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory) -> Checkpoint:
    """The tiny checkpoint with a tokenizer saved beside it."""
    directory = tmp_path_factory.mktemp("bert_text")
    ck = make_checkpoint(directory, seed=3)
    write_tokenizer(directory, ck.config.vocab_size)
    return ck
