"""A trigger word's own text-encoder input vectors, trained beside the adapter (pivotal tuning),
saved in the textual-inversion layout that every UI reads.

Why: a made-up trigger ("sks") reaches the text encoder as word pieces it has rarely or never
seen, so a trigger prompt reads almost like the same prompt with the noun left out. The adapter
then has to change how *everything* is drawn to tell the two apart, and ordinary prompts drift.
A few trainable input vectors for the word give the UNet a signal of its own; prompts without
the word reach the text encoder exactly as before.

The word becomes new tokens `word`, `word_1`, ... (the multi-vector naming of diffusers'
`load_textual_inversion`), initialised from the word's current pieces, so before training a
trigger prompt encodes exactly as it did in the base model. The embedding matrices are resized
for the new ids but stay frozen; a forward hook puts the trainable vectors in their rows.

File layout (`<adapter>_emb.safetensors`): SD 1.x / 2.x `{"emb_params": (n, dim)}`; SDXL
`{"clip_l": (n, 768), "clip_g": (n, 1280)}`, with the word in the metadata (`trigger`).
AUTOMATIC1111/Forge and ComfyUI load it as an embedding named after the file; Diffusers
pipelines through `load_embedding` here (or `load_textual_inversion(..., token=word)`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers.utils import logging as transformers_logging

from .errors import AdapterFileError, ConfigError
from .fileformat import read_safetensors, write_safetensors

__all__ = ["TriggerEmbedding", "embedding_path", "expand_trigger", "load_embedding", "token_names", "unload_embedding"]

SDXL_KEYS = ("clip_l", "clip_g")


def _file_keys(text_encoders: int) -> tuple[str, ...]:
    """The tensor names of the textual-inversion layout: one encoder (SD 1.x/2.x) or SDXL's two."""
    return SDXL_KEYS if text_encoders == 2 else ("emb_params",)


def _tokenizers_and_encoders(pipe: Any) -> list[tuple[Any, nn.Module]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def token_names(word: str, vectors: int) -> list[str]:
    return [word] + [f"{word}_{i}" for i in range(1, vectors)]


def expand_trigger(text: str, word: str, vectors: int) -> str:
    """"a sks dog" -> "a sks sks_1 dog": one token per vector, as the pipelines expand prompts."""
    if vectors == 1:
        return text
    return re.sub(rf"(?<![\w]){re.escape(word)}(?![\w])", " ".join(token_names(word, vectors)), text)


def embedding_path(adapter_path: str | os.PathLike) -> Path:
    """Where the trigger embedding of an adapter file lives: beside it, `<stem>_emb.safetensors`."""
    p = Path(adapter_path)
    return p.with_name(f"{p.stem}_emb.safetensors")


class TriggerEmbedding(nn.Module):
    """Trainable input vectors of one trigger word, one set per text encoder (two for SDXL)."""

    def __init__(self, word: str, tokenizers: Sequence[Any], text_encoders: Sequence[nn.Module],
                 vectors: int | None = None) -> None:
        super().__init__()
        if not word or any(c.isspace() for c in word):
            raise ConfigError(f"network.embedding_trigger: expected one word, got {word!r}")
        self.word = word
        self.vectors = nn.ParameterList()
        self._first_ids: list[int] = []
        pieces = tokenizers[0](word, add_special_tokens=False).input_ids
        self.num_vectors = vectors or len(pieces)
        names = token_names(word, self.num_vectors)
        for tok, te in zip(tokenizers, text_encoders):
            taken = [n for n in names if n in tok.get_vocab()]
            if taken:
                raise ConfigError(f"network.embedding_trigger: {taken[0]!r} is already a token of the tokenizer; "
                                  "choose a made-up word that is not")
            emb = te.get_input_embeddings()
            word_ids = tok(word, add_special_tokens=False).input_ids
            with torch.no_grad():
                start = emb.weight[word_ids].float()
                init = start if len(word_ids) == self.num_vectors else start.mean(0).expand(self.num_vectors, -1)
            tok.add_tokens(names)
            ids = tok.convert_tokens_to_ids(names)
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise RuntimeError(f"new tokens {names} did not get consecutive ids: {ids}")
            te.resize_token_embeddings(len(tok), mean_resizing=False)  # rows are set just below
            emb = te.get_input_embeddings()
            with torch.no_grad():
                emb.weight[ids] = init.to(emb.weight.dtype)
            emb.weight.requires_grad_(False)
            self.vectors.append(nn.Parameter(init.clone().contiguous()))
            self._first_ids.append(ids[0])
            emb.register_forward_hook(self._hook(len(self.vectors) - 1))

    def _hook(self, i: int):
        def put_vectors(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            ids = args[0]
            offset = ids - self._first_ids[i]
            mine = (offset >= 0) & (offset < self.num_vectors)
            # Always index, so the vectors are part of every graph (DDP needs each parameter used).
            picked = self.vectors[i][offset.clamp(0, self.num_vectors - 1)].to(out.dtype)
            return torch.where(mine.unsqueeze(-1), picked, out)
        return put_vectors

    def expand(self, text: str) -> str:
        return expand_trigger(text, self.word, self.num_vectors)

    def file_tensors(self, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        keys = _file_keys(len(self.vectors))
        return {k: (v.detach().to(dtype) if dtype else v.detach()).cpu().contiguous() for k, v in zip(keys, self.vectors)}

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> Path:
        tensors = self.file_tensors(dtype)
        if not all(torch.isfinite(v).all() for v in tensors.values()):
            raise FloatingPointError(f"refusing to save {path}: the trigger embedding has non-finite values")
        return write_safetensors(path, tensors, {"trigger": self.word, "vectors": str(self.num_vectors)})


def load_embedding(pipe: Any, path: str | os.PathLike, word: str | None = None) -> str:
    """Add a trigger embedding file to a Diffusers pipeline (one or both text encoders); returns
    the word to write in prompts. `word` defaults to the one stored in the file."""
    tensors, metadata = read_safetensors(path)
    word = word or metadata.get("trigger")
    if not word:
        raise AdapterFileError(f"{path}: no 'trigger' in the metadata; pass the word to use in prompts")
    pairs = _tokenizers_and_encoders(pipe)
    keys = _file_keys(len(pairs))
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise AdapterFileError(f"{path}: expected tensor(s) {list(keys)} for this pipeline's {len(pairs)} text "
                               f"encoder(s), found {sorted(tensors)}")
    for key, (tok, te) in zip(keys, pairs):
        vectors = tensors[key]
        width = te.get_input_embeddings().weight.shape[1]
        if vectors.ndim != 2 or vectors.shape[1] != width:
            raise AdapterFileError(f"{path}: tensor {key!r} has shape {tuple(vectors.shape)}, expected (n, {width})")
        # diffusers resizes the embedding matrix with transformers' default "mean resizing", which
        # announces a random initialisation of the new rows; they are overwritten with `vectors`.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            pipe.load_textual_inversion(vectors, token=word, tokenizer=tok, text_encoder=te)
        finally:
            transformers_logging.set_verbosity(verbosity)
    return word


def unload_embedding(pipe: Any, word: str) -> None:
    """Take a trigger word's tokens out again (tokenizer and embedding rows)."""
    for tok, te in _tokenizers_and_encoders(pipe):
        names = [t for t in tok.get_added_vocab() if t == word or re.fullmatch(rf"{re.escape(word)}_\d+", t)]
        pipe.unload_textual_inversion(names, tokenizer=tok, text_encoder=te)
