"""Encoder families beyond BERT: RoBERTa, XLM-RoBERTa and CamemBERT (one family in the core)
and DistilBERT, each against Hugging Face ``transformers``' own class for it on the same tiny
random weights."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import numpy as np
import pytest
import torch

from conftest import (
    WORDS,
    assert_half_parity,
    make_distilbert_checkpoint,
    make_electra_checkpoint,
    make_mpnet_checkpoint,
    make_roberta_checkpoint,
    retaining,
)
from hooked_encoder import HookedEncoder, HookedEncoderConfig
from test_parity import check_every_hook, close, hf_modules, hf_run


def reference_positions(tokens: np.ndarray, pad: int) -> np.ndarray:
    """RoBERTa's position ids, re-derived from its definition: non-padding tokens numbered
    ``pad + 1, pad + 2, ...``, padding tokens ``pad``."""
    real = tokens != pad
    return np.cumsum(real, axis=1) * real + pad


@pytest.fixture(scope="module")
def family_model(family_checkpoint):
    return HookedEncoder.from_pretrained(family_checkpoint.path)


def test_logits_and_hidden_states_match_hugging_face(family_checkpoint, family_model):
    ck, model = family_checkpoint, family_model
    assert model.cfg.model_type == ck.config.model_type
    assert model.cfg.original_architecture == type(ck.hf).__name__
    if model.cfg.padding_idx is not None:  # RoBERTa and MPNet number positions after padding
        # The two rows before the first position (padding_idx + 1) are not context.
        assert model.cfg.n_ctx == ck.config.max_position_embeddings - 2
    else:
        assert model.cfg.n_ctx == ck.config.max_position_embeddings
    tokens, types, mask = ck.batch(seed=1, batch=4, pos=model.cfg.n_ctx)
    out, _ = hf_run(ck, tokens, types, mask)
    # Token types as the HF run got them (zeros for families with one type or none).
    logits, cache = model.run_with_cache(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    close(logits, out.logits)
    embedded = "hook_embed_proj" if "hook_embed_proj" in cache else "hook_full_embed"
    close(cache[embedded], out.hidden_states[0])
    for i in range(ck.config.num_hidden_layers):
        close(cache["normalized_resid_post", i], out.hidden_states[i + 1])
    close(model.encoder_output(tokens, types, mask), out.hidden_states[-1])


def test_every_hook_matches_hugging_face(family_checkpoint, family_model):
    check_every_hook(family_checkpoint, family_model)


def test_positions_are_numbered_from_the_ids_as_hugging_face_does(tmp_path):
    """Padding tokens use the padding row wherever they are, and the tokens after a padding
    token in the middle of a row keep counting from where the row left off."""
    ck = make_roberta_checkpoint(tmp_path, "roberta", seed=9)
    model = HookedEncoder.from_pretrained(tmp_path)
    pad = ck.config.pad_token_id
    tokens = np.array([[0, 7, 8, 9, 2, pad, pad], [0, 7, pad, 8, 9, 10, 2]])
    positions = reference_positions(tokens, pad)
    assert positions.tolist()[1] == [2, 3, 1, 4, 5, 6, 7]
    _, cache = model.run_with_cache(tokens, names_filter="embed.hook_pos_embed")
    close(cache["embed.hook_pos_embed"], model.W_pos[positions], atol=0, rtol=0)
    close(model(tokens), ck.hf_logits(tokens))


def test_a_zeroed_head_matches_the_same_edit_inside_hugging_face(family_checkpoint, family_model):
    ck, model = family_checkpoint, family_model
    layer, head = 1, 2
    d_head = ck.config.hidden_size // ck.config.num_attention_heads
    tokens, _, mask = ck.batch(seed=3)

    def zero_head(z, hook):
        z[:, :, head] = 0
        return z

    ours = model.run_with_hooks(
        tokens,
        one_zero_attention_mask=mask,
        fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)],
    )

    def zero_columns(module, args):  # the input of the output projection is z, heads side by side
        z = args[0].clone()
        z[..., head * d_head : (head + 1) * d_head] = 0
        return (z,)

    output_projection, _ = hf_modules(ck.hf)[f"{layer}.z"]  # its input is z
    handle = output_projection.register_forward_pre_hook(zero_columns)
    try:
        theirs = ck.hf_logits(tokens, mask=mask)
    finally:
        handle.remove()
    close(ours, theirs)
    assert np.abs(ours - model(tokens, one_zero_attention_mask=mask)).max() > 1e-3


def test_gradients_match_torch_autograd(family_checkpoint, family_model):
    """The backward through the family's MLM head (RoBERTa's: exact GELU whatever hidden_act
    says) and every block, against torch autograd on Hugging Face's model."""
    ck, model = family_checkpoint, family_model
    tokens, _, mask = ck.batch(seed=4)
    # A random projection of the logits (an ELECTRA discriminator's are [batch, pos]).
    shape = model(tokens, one_zero_attention_mask=mask).shape
    projection = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    names = ["embed.hook_embed", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_pattern"]
    grads = model.grad(tokens, grad_output=projection, names=names, one_zero_attention_mask=mask)

    kept = {}
    hf = ck.hf
    handle = hf.base_model.embeddings.word_embeddings.register_forward_hook(
        retaining(kept, "embed")
    )
    try:
        out = hf(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            output_hidden_states=True,
            output_attentions=True,
        )
    finally:
        handle.remove()
    out.hidden_states[1].retain_grad()
    out.attentions[0].retain_grad()
    (out.logits * torch.tensor(projection)).sum().backward()
    hf.zero_grad(set_to_none=True)
    tol = {"atol": 1e-5, "rtol": 1e-4}
    close(grads["embed.hook_embed"], kept["embed"].grad.numpy(), **tol)
    close(grads["blocks.1.hook_resid_pre"], out.hidden_states[1].grad.numpy(), **tol)
    close(grads["blocks.0.attn.hook_pattern"], out.attentions[0].grad.numpy(), **tol)


@pytest.mark.parametrize("model_type", ["xlm-roberta", "distilbert", "mpnet", "electra"])
def test_the_base_model_loads_with_its_pooler_and_without_a_head(tmp_path, model_type):
    make = {
        "distilbert": lambda **kw: make_distilbert_checkpoint(tmp_path, base=True, **kw),
        "mpnet": lambda **kw: make_mpnet_checkpoint(tmp_path, base=True, **kw),
        "electra": lambda **kw: make_electra_checkpoint(tmp_path, "base", **kw),
    }
    ck = (
        make[model_type](seed=5)
        if model_type in make
        else make_roberta_checkpoint(tmp_path, model_type, base=True, seed=5)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor, the pooler's too, is used
        model = HookedEncoder.from_pretrained(tmp_path)
    assert not model.has_mlm_head
    tokens, _, mask = ck.batch(seed=6)
    with torch.no_grad():
        out = ck.hf(torch.tensor(tokens), attention_mask=torch.tensor(mask))
    close(model.encoder_output(tokens, None, mask), out.last_hidden_state)
    with pytest.raises(ValueError, match="no MLM head .*(lm_head|vocab_projector|generator_)"):
        model(tokens)


def test_pickling_and_half_precision(family_checkpoint, family_model):
    ck, model = family_checkpoint, family_model
    tokens, _, mask = ck.batch(seed=7)
    again = pickle.loads(pickle.dumps(model))
    assert again.cfg == model.cfg
    np.testing.assert_array_equal(again(tokens), model(tokens))
    half = HookedEncoder.from_pretrained(ck.path, dtype="bfloat16")
    hf32 = ck.hf_logits(tokens, mask=mask)
    with torch.no_grad():
        # A copy: rounding the shared model's weights to bfloat16 and back would change them.
        hf_half_model = copy.deepcopy(ck.hf).to(torch.bfloat16)
        hf_half = (
            hf_half_model(torch.tensor(tokens), attention_mask=torch.tensor(mask))
            .logits.float()
            .numpy()
        )
    ours = half(tokens, one_zero_attention_mask=mask)
    assert_half_parity(np.asarray(ours, dtype=np.float32), hf_half, hf32, "bfloat16")


def write_roberta_tokenizer(directory, vocab_size: int) -> list[str]:
    """A word-level tokenizer with RoBERTa's special tokens (ids 0-4: ``<s> <pad> </s> <unk>
    <mask>``) and its ``<s> A </s>`` template; returns the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *WORDS]
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer.add_special_tokens(vocab[:5])
    tokenizer.save(str(directory / "tokenizer.json"))
    return vocab


def test_text_input_uses_the_family_s_special_tokens(tmp_path):
    ck = make_roberta_checkpoint(tmp_path, "roberta", seed=8)
    vocab = write_roberta_tokenizer(tmp_path, ck.config.vocab_size)
    model = HookedEncoder.from_pretrained(tmp_path)
    texts = ["the cat <mask> on the mat", "a dog"]
    tokens, types, mask = model.to_tokens(texts)
    ids = [vocab.index(w) for w in ["<s>", "the", "cat", "<mask>", "on", "the", "mat", "</s>"]]
    assert tokens[0].tolist() == ids
    # Padded with <pad> (id 1, the padding row of the position table), not [PAD]'s usual 0.
    assert tokens[1].tolist() == [0, vocab.index("a"), vocab.index("dog"), 2, 1, 1, 1, 1]
    assert model.tokenizer.mask_token_id == 4
    np.testing.assert_array_equal(mask, tokens != 1)
    np.testing.assert_array_equal(types, 0)  # one token type
    hf = ck.hf_logits(tokens, mask=mask)
    close(model(texts), hf)
    predicted = model(texts[:1], return_type="predictions")
    assert predicted == vocab[int(hf[0, 3].argmax())]


def test_a_config_built_by_hand_is_a_roberta_model_with_fresh_weights():
    cfg = HookedEncoderConfig(
        d_model=16,
        d_head=8,
        n_layers=1,
        n_ctx=6,
        d_vocab=20,
        n_token_types=1,
        model_type="xlm-roberta",
        padding_idx=1,
        seed=0,
    )
    model = HookedEncoder(cfg)
    assert model.W_pos.shape == (6 + 2, 16)  # n_ctx + padding_idx + 1 rows
    assert "nsp_head.W" not in model.state_dict()
    assert model(np.array([[0, 5, 6, 7, 8, 2]])).shape == (1, 6, 20)
    with pytest.raises(ValueError, match="sequence length 7 is longer"):
        model(np.array([[0, 5, 6, 7, 8, 9, 2]]))
    with pytest.raises(TypeError, match="needs padding_idx"):
        HookedEncoderConfig(
            d_model=16, d_head=8, n_layers=1, n_ctx=6, d_vocab=20, model_type="roberta"
        )


def test_unknown_model_types_are_refused_naming_the_supported_ones(tmp_path, checkpoint):
    config = json.loads((checkpoint.path / "config.json").read_text())
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((checkpoint.path / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "deberta-v2"}))
    with pytest.raises(ValueError, match=r"'deberta-v2' is not supported; supported: .*'roberta'"):
        HookedEncoder.from_pretrained(tmp_path)
    # BERT weights under a RoBERTa config are not silently loaded.
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(Exception, match="holds no RoBERTa weights"):
        HookedEncoder.from_pretrained(tmp_path)


def test_distilbert_has_no_token_types(tmp_path):
    ck = make_distilbert_checkpoint(tmp_path, seed=12)
    model = HookedEncoder.from_pretrained(tmp_path)
    assert model.cfg.n_token_types == 0
    assert "embed.hook_token_type_embed" not in model.hook_dict
    assert "embed.token_type_embed.W_token_type" not in model.state_dict()
    tokens, _, mask = ck.batch(seed=13)
    zeros = np.zeros_like(tokens)
    # All-zero type ids, as a tokenizer gives, change nothing; others are refused.
    np.testing.assert_array_equal(model(tokens, token_type_ids=zeros), model(tokens))
    with pytest.raises(ValueError, match="no token types"):
        model(tokens, token_type_ids=zeros + 1)
    _, cache = model.run_with_cache(tokens, one_zero_attention_mask=mask)
    stack, labels = cache.decompose_resid(layer=0, return_labels=True)
    assert labels == ["embed", "pos_embed"]
    close(stack.sum(0), cache["embed.hook_embed"] + cache["embed.hook_pos_embed"])
    with pytest.raises(ValueError, match="n_token_types must be 0"):
        HookedEncoder(dict(model.cfg.to_dict(), n_token_types=2))


def test_mpnet_relative_bias_matches_hugging_face_at_every_distance_up_to_512(tmp_path):
    """All bucket edges (exact below 8, logarithmic bins to 128, capped beyond), in float32 as
    torch computes them: a long context on a narrow model."""
    ck = make_mpnet_checkpoint(tmp_path, max_position_embeddings=514, seed=14)
    model = HookedEncoder.from_pretrained(tmp_path)
    assert model.cfg.n_ctx == 512
    tokens = np.random.default_rng(0).integers(2, ck.config.vocab_size, size=(1, 512))
    logits, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        bias = ck.hf.base_model.encoder.compute_position_bias(torch.zeros(1, 512, 1)).numpy()
    np.testing.assert_array_equal(cache["hook_rel_pos_bias"], bias)
    close(logits, ck.hf_logits(tokens))


def test_mpnet_relative_bias_hook_edits_and_gradient_match_hugging_face(tmp_path):
    ck = make_mpnet_checkpoint(tmp_path, seed=15)
    model = HookedEncoder.from_pretrained(tmp_path)
    tokens, _, mask = ck.batch(seed=16)
    table = ck.hf.base_model.encoder.relative_attention_bias

    # Zeroing the bias at its hook = an MPNet whose bias table is zero.
    def zero(bias, hook):
        return np.zeros_like(bias)

    ours = model.run_with_hooks(
        tokens, one_zero_attention_mask=mask, fwd_hooks=[("hook_rel_pos_bias", zero)]
    )
    saved = table.weight.detach().clone()
    with torch.no_grad():
        table.weight.zero_()
    theirs = ck.hf_logits(tokens, mask=mask)
    with torch.no_grad():
        table.weight.copy_(saved)
    close(ours, theirs)

    # Its gradient: every layer's score gradient, summed (the bias is shared).
    projection = np.random.default_rng(1).normal(size=(*tokens.shape, ck.config.vocab_size))
    projection = projection.astype(np.float32)
    grads = model.grad(
        tokens, grad_output=projection, names="hook_rel_pos_bias", one_zero_attention_mask=mask
    )
    kept = {}  # the bias as [query, key, head], before its expansion over the batch
    handle = table.register_forward_hook(retaining(kept, "bias"))
    try:
        out = ck.hf(torch.tensor(tokens), attention_mask=torch.tensor(mask))
    finally:
        handle.remove()
    (out.logits * torch.tensor(projection)).sum().backward()
    ck.hf.zero_grad(set_to_none=True)
    ours_grad = grads["hook_rel_pos_bias"].sum(0).transpose(1, 2, 0)
    close(ours_grad, kept["bias"].grad.numpy(), atol=1e-5, rtol=1e-4)


def test_mpnet_starts_at_a_layer_with_its_bias_and_exposes_the_bias_table(tmp_path):
    ck = make_mpnet_checkpoint(tmp_path, seed=17)
    model = HookedEncoder.from_pretrained(tmp_path)
    tokens, _, mask = ck.batch(seed=18)
    logits, cache = model.run_with_cache(tokens, one_zero_attention_mask=mask)
    resumed = model(cache["resid_pre", 1], start_at_layer=1, one_zero_attention_mask=mask)
    close(resumed, logits, atol=1e-5)
    table = ck.hf.base_model.encoder.relative_attention_bias.weight.detach().numpy()
    np.testing.assert_array_equal(model.state_dict()["rel_pos_bias.W"], table)


def test_families_without_next_sentence_prediction_refuse_it(family_model):
    from hooked_encoder import BertNextSentencePrediction

    assert "pooler.hook_pooler_out" not in family_model.hook_dict
    with pytest.raises(ValueError, match="no next-sentence head"):
        BertNextSentencePrediction(family_model)


def test_an_already_loaded_transformers_model_loads_too(family_checkpoint, family_model):
    ck = family_checkpoint
    model = HookedEncoder.from_pretrained("in-memory", hf_model=ck.hf)
    assert model.cfg.model_type == ck.config.model_type
    tokens, _, mask = ck.batch(seed=20)
    np.testing.assert_array_equal(
        model(tokens, one_zero_attention_mask=mask),
        family_model(tokens, one_zero_attention_mask=mask),
    )


def test_electra_discriminator_logits_are_one_per_token(tmp_path):
    """ElectraForPreTraining: the replaced-token head's logits, [batch, pos], through
    discriminator.hook_out; an edit there is what comes out; the head runs on its own input."""
    ck = make_electra_checkpoint(tmp_path, "discriminator", seed=21)
    model = HookedEncoder.from_pretrained(tmp_path)
    assert model.has_discriminator and not model.has_mlm_head
    assert model.cfg.d_embed == 8 and model.W_E.shape == (ck.config.vocab_size, 8)
    tokens, types, mask = ck.batch(seed=22)
    hf = ck.hf_logits(tokens, types, mask)
    logits, cache = model.run_with_cache(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    assert logits.shape == tokens.shape
    close(logits, hf)
    close(model.discriminator(cache["normalized_resid_post", 1]), hf)
    flipped = model.run_with_hooks(
        tokens,
        token_type_ids=types,
        one_zero_attention_mask=mask,
        fwd_hooks=[("discriminator.hook_out", lambda x, hook: -x)],
    )
    close(flipped, -hf)
    with pytest.raises(ValueError, match="needs an MLM head"):
        model(tokens, return_type="predictions")


def test_a_model_of_each_family_builds_from_a_config_with_fresh_weights():
    base = dict(d_model=16, d_head=8, n_layers=1, n_ctx=6, d_vocab=20, seed=0)
    configs = {
        "roberta": dict(n_token_types=1, padding_idx=1),
        "distilbert": dict(n_token_types=0),
        "mpnet": dict(n_token_types=0, padding_idx=1),
        "electra": dict(d_embed=8),
    }
    tokens = np.array([[0, 5, 6, 7, 8, 2]])
    for model_type, extra in configs.items():
        model = HookedEncoder(HookedEncoderConfig(**base, model_type=model_type, **extra))
        assert model(tokens).shape == (1, 6, 20), model_type


def test_info_names_the_family_its_head_and_the_embedding_width(tmp_path):
    import subprocess
    import sys

    make_electra_checkpoint(tmp_path, "discriminator", seed=23)
    info = subprocess.run(
        [sys.executable, "-m", "hooked_encoder.cli", "info", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert "  model_type: electra" in lines and "  d_embed: 8" in lines
    assert any(line.startswith("  head: ELECTRA discriminator") for line in lines)
    shape = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ")}
    assert shape["hook_full_embed"].startswith("[batch, pos, d_embed]")
    assert shape["hook_embed_proj"].startswith("[batch, pos, d_model]")
    assert shape["discriminator.hook_out"].startswith("[batch, pos]")


def test_an_electra_generator_with_embeddings_wider_than_the_residual_stream(tmp_path):
    """As in the released generators (e.g. hidden 256, embedding_size 768)."""
    ck = make_electra_checkpoint(tmp_path, "generator", embedding_size=24, seed=24)  # hidden 16
    model = HookedEncoder.from_pretrained(tmp_path)
    assert (model.cfg.d_embed, model.cfg.d_model) == (24, 16)
    tokens, types, mask = ck.batch(seed=25)
    hf = ck.hf_logits(tokens, types, mask)
    close(model(tokens, token_type_ids=types, one_zero_attention_mask=mask), hf)
    assert model.W_U.shape == (24, ck.config.vocab_size)
