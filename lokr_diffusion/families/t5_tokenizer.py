"""A small T5 (SentencePiece Unigram) tokenizer made locally, for tiny Flux test pipelines.

Flux's second tokenizer is T5's: a Unigram model with ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2,
``▁`` marking word starts, ``</s>`` appended to every sequence and 100 ``<extra_id_N>`` sentinels
at the end of the vocabulary. The real vocabulary cannot be downloaded in tests, so this one is
built here from the same caption words as the tiny CLIP tokenizer, with fixed scores (whole
words beat single characters, so common caption words are one token and anything else falls
back to characters), and saved in the layout ``T5TokenizerFast.from_pretrained`` reads.
"""
from __future__ import annotations

import string
from pathlib import Path

from .clip_tokenizer import _WORDS  # the caption vocabulary both tiny tokenizers share

__all__ = ["T5_MAX_LENGTH", "t5_vocabulary", "write_tiny_t5_tokenizer"]

T5_MAX_LENGTH = 512  # model_max_length of the real T5 v1.1 tokenizer (FLUX.1 tokenizer_2)
_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
_WORD_SCORE, _START_CHAR_SCORE, _CHAR_SCORE = -5.0, -9.0, -10.0


def t5_vocabulary() -> list[tuple[str, float]]:
    """``(piece, log-probability)`` in id order: specials, ``▁``, whole words, then characters.

    Deterministic: the words are sorted and the scores fixed, so token ids never change.
    """
    vocab = [(s, 0.0) for s in _SPECIAL] + [("\u2581", -2.0)]
    seen = {piece for piece, _ in vocab}
    pieces = [("\u2581" + w, _WORD_SCORE) for w in sorted(set(_WORDS))]
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces += [("\u2581" + c, _START_CHAR_SCORE), (c, _CHAR_SCORE)]
    for piece, score in pieces:
        if piece not in seen:
            vocab.append((piece, score))
            seen.add(piece)
    return vocab


def write_tiny_t5_tokenizer(folder: str | Path):
    """Write the tokenizer into ``folder`` and return it (a ``T5TokenizerFast``)."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.T5TokenizerFast(vocab=t5_vocabulary(), model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))
    return tokenizer
