"""The model's weights under TransformerLens's names and layouts.

The Rust core holds weights as Hugging Face stores them (``Linear`` weights ``[out, in]``). This
module converts them as TransformerLens's BERT converter (``convert_bert_weights``) does, e.g.
``attention.self.query.weight`` ``[(n_heads d_head), d_model]`` becomes ``blocks.{l}.attn.W_Q``
``[n_heads, d_model, d_head]``.
"""

from __future__ import annotations

import numpy as np

from .config import HookedEncoderConfig


def tl_state_dict(hf: dict[str, np.ndarray], cfg: HookedEncoderConfig) -> dict[str, np.ndarray]:
    """TransformerLens state-dict keys and layouts from Hugging Face ``BertForPreTraining``
    names (the core's canonical names for every family). Parts the model lacks (token types,
    MLM head, pooler, NSP head) are left out."""
    h, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    e = "bert.embeddings"
    out = {
        "embed.embed.W_E": hf[f"{e}.word_embeddings.weight"],
        "embed.ln.w": hf[f"{e}.LayerNorm.weight"],
        "embed.ln.b": hf[f"{e}.LayerNorm.bias"],
    }
    if f"{e}.position_embeddings.weight" in hf:  # absent with rotary positions (ModernBERT)
        out["embed.pos_embed.W_pos"] = hf[f"{e}.position_embeddings.weight"]
    if f"{e}.token_type_embeddings.weight" in hf:  # absent without token types (DistilBERT)
        out["embed.token_type_embed.W_token_type"] = hf[f"{e}.token_type_embeddings.weight"]
    for layer in range(cfg.n_layers):
        p, b = f"bert.encoder.layer.{layer}", f"blocks.{layer}"
        if f"{p}.attention.self.qkv.weight" in hf:  # ModernBERT stores them stacked
            weights = np.split(hf[f"{p}.attention.self.qkv.weight"], 3)
            biases = np.split(hf[f"{p}.attention.self.qkv.bias"], 3)
        else:
            parts = ("query", "key", "value")
            weights = [hf[f"{p}.attention.self.{part}.weight"] for part in parts]
            biases = [hf[f"{p}.attention.self.{part}.bias"] for part in parts]
        for name, weight, bias in zip("QKV", weights, biases, strict=True):
            # "(i h) m -> i m h"
            out[f"{b}.attn.W_{name}"] = weight.reshape(h, dh, d).transpose(0, 2, 1)
            out[f"{b}.attn.b_{name}"] = bias.reshape(h, dh)
        # "m (i h) -> i h m"
        out[f"{b}.attn.W_O"] = (
            hf[f"{p}.attention.output.dense.weight"].reshape(d, h, dh).transpose(1, 2, 0)
        )
        out[f"{b}.attn.b_O"] = hf[f"{p}.attention.output.dense.bias"]
        if f"{p}.attention.output.LayerNorm.weight" in hf:  # not ModernBERT's layer 0
            out[f"{b}.ln1.w"] = hf[f"{p}.attention.output.LayerNorm.weight"]
            out[f"{b}.ln1.b"] = hf[f"{p}.attention.output.LayerNorm.bias"]
        w_in, b_in = hf[f"{p}.intermediate.dense.weight"].T, hf[f"{p}.intermediate.dense.bias"]
        if cfg.gated_mlp:
            # Stacked [activated half; linear half]: TransformerLens's W_gate is the activated
            # one (hook_pre), W_in the linear one (hook_pre_linear), which alone has a bias.
            out[f"{b}.mlp.W_gate"], w_in = np.split(w_in, 2, axis=1)
            b_in = np.split(b_in, 2)[1]
        out[f"{b}.mlp.W_in"] = w_in
        out[f"{b}.mlp.b_in"] = b_in
        out[f"{b}.mlp.W_out"] = hf[f"{p}.output.dense.weight"].T
        out[f"{b}.mlp.b_out"] = hf[f"{p}.output.dense.bias"]
        out[f"{b}.ln2.w"] = hf[f"{p}.output.LayerNorm.weight"]
        out[f"{b}.ln2.b"] = hf[f"{p}.output.LayerNorm.bias"]
    if "bert.final_norm.weight" in hf:  # pre-LN models' ln_final
        out["ln_final.w"] = hf["bert.final_norm.weight"]
        out["ln_final.b"] = hf["bert.final_norm.bias"]
    t = "cls.predictions.transform"
    if f"{t}.dense.weight" in hf:
        out["mlm_head.W"] = hf[f"{t}.dense.weight"].T
        out["mlm_head.b"] = hf[f"{t}.dense.bias"]
        out["mlm_head.ln.w"] = hf[f"{t}.LayerNorm.weight"]
        out["mlm_head.ln.b"] = hf[f"{t}.LayerNorm.bias"]
        out["unembed.W_U"] = hf["cls.predictions.decoder.weight"].T
        out["unembed.b_U"] = hf["cls.predictions.decoder.bias"]
    if "cls.seq_relationship.weight" in hf:
        out["nsp_head.W"] = hf["cls.seq_relationship.weight"].T
        out["nsp_head.b"] = hf["cls.seq_relationship.bias"]
    if "bert.embeddings_project.weight" in hf:  # ELECTRA: [d_embed, d_model], as TL's W
        out["embed.proj.W"] = hf["bert.embeddings_project.weight"].T
        out["embed.proj.b"] = hf["bert.embeddings_project.bias"]
    if "discriminator_predictions.dense.weight" in hf:  # ELECTRA's replaced-token head
        out["discriminator.W"] = hf["discriminator_predictions.dense.weight"].T
        out["discriminator.b"] = hf["discriminator_predictions.dense.bias"]
        out["discriminator.W_out"] = hf["discriminator_predictions.dense_prediction.weight"].T
        out["discriminator.b_out"] = hf["discriminator_predictions.dense_prediction.bias"]
    if "bert.encoder.relative_attention_bias.weight" in hf:  # MPNet: [buckets, n_heads]
        out["rel_pos_bias.W"] = hf["bert.encoder.relative_attention_bias.weight"]
    if "bert.pooler.dense.weight" in hf:
        out["pooler.W"] = hf["bert.pooler.dense.weight"].T
        out["pooler.b"] = hf["bert.pooler.dense.bias"]
    return out
