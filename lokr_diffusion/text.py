"""Caption text to token ids: the one tokenisation both the dataset and the trainer use.

Kept outside `data` and `training` so that neither imports the other for it: the dataset
tokenises per sample (in DataLoader workers), the trainer tokenises caption lists when it fills
the text-encoder cache, and the two must agree token for token or cached and live embeddings
would differ.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

#: Turns a caption into the text the tokenizers see (e.g. a trained trigger word into its
#: per-vector tokens, `TriggerEmbedding.expand`).
CaptionExpander = Callable[[str], str]


def tokenize(tokenizers: Sequence[Any], captions: Sequence[str]) -> list[torch.Tensor]:
    """Token ids per tokenizer, each long (len(captions), tokenizer.model_max_length), padded and
    truncated to the tokenizer's model_max_length the way the Diffusers pipelines do, so training
    sees prompts exactly as inference will."""
    return [tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in tokenizers]
