"""One interface over the tokenizers a user may bring: a Hugging Face ``tokenizers.Tokenizer``
(what a checkpoint's ``tokenizer.json`` loads into) or a ``transformers`` tokenizer object."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]


class Tokenizer:
    """Encodes text into ``(tokens, token_type_ids, attention_mask)``, each ``[batch, pos]``
    int64, right-padded to the longest row, with ``[CLS]``/``[SEP]`` added, as TransformerLens's
    ``to_tokens`` (which calls the HF tokenizer with ``padding=True``)."""

    def __init__(self, tokenizer: Any) -> None:
        import tokenizers

        self.raw = tokenizer
        # Whether token type ids are passed on; models with one token type (RoBERTa's family)
        # get zeros, as transformers' tokenizers for them return none.
        self.segments = True
        self._fast = isinstance(tokenizer, tokenizers.Tokenizer)
        if not self._fast and not callable(tokenizer):
            raise TypeError(
                "tokenizer must be a tokenizers.Tokenizer or a transformers tokenizer, "
                f"got {type(tokenizer).__name__}"
            )
        if self._fast:
            # A tokenizer.json may carry fixed padding/truncation (all-MiniLM-L6-v2's pads every
            # input to 128); transformers resets those per call, and so do we.
            padding = tokenizer.padding or {}
            pad = _first_known(tokenizer, _PAD_TOKENS) or "[PAD]"
            self._pad_id = padding.get("pad_id", tokenizer.token_to_id(pad) or 0)
            self._pad_token = padding.get("pad_token", pad)
            tokenizer.no_padding()
            tokenizer.no_truncation()

    def adapt_to(self, n_token_types: int, padding_idx: int | None) -> None:
        """Pads with the model's padding token (RoBERTa numbers positions around it) and drops
        token types a model with a single one cannot take."""
        self.segments = n_token_types > 1
        if padding_idx is not None and self._fast:
            token = self.raw.id_to_token(padding_idx)
            if token is not None:
                self._pad_id, self._pad_token = padding_idx, token

    @classmethod
    def from_directory(cls, directory: Path) -> Tokenizer | None:
        """The tokenizer saved in a checkpoint directory, if there is one."""
        import tokenizers

        path = directory / "tokenizer.json"
        if path.is_file():
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        vocab = directory / "vocab.txt"
        if vocab.is_file():
            lowercase = True
            config = directory / "tokenizer_config.json"
            if config.is_file():
                lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True))
            return cls(
                tokenizers.BertWordPieceTokenizer(str(vocab), lowercase=lowercase)._tokenizer
            )
        return None

    @property
    def mask_token_id(self) -> int | None:
        """The id of the mask token (BERT's ``[MASK]``, RoBERTa's ``<mask>``), if the vocabulary
        has one."""
        if self._fast:
            mask = _first_known(self.raw, _MASK_TOKENS)
            return None if mask is None else self.raw.token_to_id(mask)
        return getattr(self.raw, "mask_token_id", None)

    def ids_to_tokens(self, ids: list[int]) -> list[str]:
        """The token string of each id."""
        if self._fast:
            return [self.raw.id_to_token(int(i)) for i in ids]
        return list(self.raw.convert_ids_to_tokens([int(i) for i in ids]))

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``[CLS]``/``[SEP]``."""
        if self._fast:
            return list(self.raw.encode(text, add_special_tokens=False).ids)
        return list(self.raw(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.raw.decode(ids)

    def __call__(self, texts: list[str] | list[tuple[str, str]], max_length: int | None) -> Encoded:
        if not self._fast:
            out = self.raw(
                [t[0] for t in texts] if texts and isinstance(texts[0], tuple) else texts,
                *([[t[1] for t in texts]] if texts and isinstance(texts[0], tuple) else []),
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
                return_tensors="np",
            )
            ids = np.asarray(out["input_ids"], dtype=np.int64)
            types = out.get("token_type_ids") if self.segments else None
            mask = out.get("attention_mask")
            return (
                ids,
                np.zeros_like(ids) if types is None else np.asarray(types, dtype=np.int64),
                np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64),
            )
        tok = self.raw
        if max_length is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(max_length=max_length)
        tok.enable_padding(pad_id=self._pad_id, pad_token=self._pad_token, direction="right")
        try:
            encodings = tok.encode_batch(texts)
        finally:
            tok.no_padding()
            tok.no_truncation()
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        return (
            ids,
            types if self.segments else np.zeros_like(ids),
            np.array([e.attention_mask for e in encodings], dtype=np.int64),
        )


# Special tokens by role, BERT's spelling first, then RoBERTa's (a tokenizer.json names its
# special tokens but not their roles).
_PAD_TOKENS = ("[PAD]", "<pad>")
_MASK_TOKENS = ("[MASK]", "<mask>")


def _first_known(tokenizer: Any, candidates: tuple[str, ...]) -> str | None:
    """The first of ``candidates`` in the vocabulary of a ``tokenizers.Tokenizer``."""
    return next((t for t in candidates if tokenizer.token_to_id(t) is not None), None)
