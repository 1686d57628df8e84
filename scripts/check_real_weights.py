"""Checks a real checkpoint directory of any supported family against Hugging Face
``transformers`` (``AutoModel``, eager attention) and, when the directory is a
sentence-transformers model (``modules.json``), against ``SentenceTransformer.encode``.

    python scripts/check_real_weights.py DIR [--texts N]

Prints the largest absolute difference of the last hidden state (padding excluded) and the
worst per-row cosine similarity of the embeddings, and exits non-zero when either is outside
the tests' tolerances (4e-5 absolute scaled to the activations' size; cosine >= 0.99999).
Not a test: real weights are not downloaded in CI (see the README's "Encoder families").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

TEXTS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog, and then it runs far away into the woods.",
    "Interpretability of encoders: hooks on every activation.",
    "Short.",
    "Sentence embeddings map text to vectors whose cosine similarity reflects meaning.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--texts", type=int, default=len(TEXTS), help="how many texts to use")
    args = parser.parse_args()
    texts = (TEXTS * (args.texts // len(TEXTS) + 1))[: args.texts]

    import torch
    import transformers

    from hooked_encoder import HookedEncoder

    model = HookedEncoder.from_pretrained(args.directory)
    print(f"ours: {model!r}, model_type={model.cfg.model_type}")
    tokens, _, mask = model.to_tokens(texts)
    ours = np.asarray(model.encoder_output(tokens, None, mask))

    hf = transformers.AutoModel.from_pretrained(args.directory, attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        reference = hf(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    real = mask.astype(bool)
    diff = float(np.abs(ours[real] - reference[real]).max())
    scale = float(np.abs(reference[real]).max())
    ok = diff <= 4e-5 * max(1.0, scale)
    print(f"last hidden state: max |ours - HF| = {diff:.3g} (largest |HF| value {scale:.3g})")

    if (args.directory / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(args.directory), device="cpu")
        theirs = st.encode(texts, convert_to_numpy=True)
        mine = model.encode(texts)
        cosine = (mine * theirs).sum(1) / (
            np.linalg.norm(mine, axis=1) * np.linalg.norm(theirs, axis=1)
        )
        ok = ok and bool(cosine.min() >= 0.99999)
        print(
            f"encode: worst cosine {cosine.min():.7f}, "
            f"max |ours - sentence-transformers| {np.abs(mine - theirs).max():.3g}"
        )
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
