"""TrainingModel: the frozen pipeline parts plus the trainable adapter network, as one module.

Only the adapter network is registered as a submodule, so Accelerate (DDP, save_state) sees
and synchronises just the trainable tensors, while the forward runs text encoder(s) and UNet
with the adapters' hooks in place.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..embeddings import TriggerEmbedding
from ..errors import ConfigError
from ..families import Family
from ..network import AdapterNetwork


def text_options(family: Family, clip_skip: int, text_encoders: Sequence[nn.Module]) -> dict[str, Any]:
    """The extra `encode_text` arguments `[train] clip_skip` asks of `family` ({} for the default),
    refused with the reason where the family has no such choice or the encoder too few layers.
    Training, the text cache and the samples all encode prompts with these."""
    if clip_skip == 1:
        return {}
    if family.clip_skip_refusal is not None:
        raise ConfigError(f"train.clip_skip: not available for {family.title}: {family.clip_skip_refusal}; "
                          "remove it (or set 1)")
    layers = min(int(te.config.num_hidden_layers) for te in text_encoders)
    if clip_skip > layers:
        raise ConfigError(f"train.clip_skip: {clip_skip} is more than the text encoder's {layers} layers")
    return {"clip_skip": clip_skip}


class TrainingModel(nn.Module):
    def __init__(self, network: AdapterNetwork, unet: nn.Module, text_encoders: Sequence[nn.Module],
                 family: Family, train_text_encoder: bool, embedding: TriggerEmbedding | None = None,
                 conditioning: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.network = network
        self.embedding = embedding  # trigger-word vectors, trained with the adapter (or None)
        self.frozen = {"unet": unet, "text_encoders": list(text_encoders)}  # plain dict: not registered
        self.family = family
        self.train_text_encoder = train_text_encoder or embedding is not None  # gradients through the encoder
        self.conditioning = dict(conditioning or {})  # per-run denoiser inputs, e.g. Flux.1-dev's guidance
        self.text = dict(text or {})  # per-run encode_text arguments (see text_options)

    def encode_text(self, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Prompt embeddings the way the family's Diffusers pipeline makes them, with gradients
        only when the text side trains."""
        device = next(self.network.parameters()).device
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.family.encode_text(self.frozen["text_encoders"], input_ids, device, **self.text)

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        embeds = batch.get("text_embeds") or self.encode_text(batch["input_ids"])
        if self.conditioning:
            batch = {**batch, **self.conditioning}
        return self.family.denoise(self.frozen["unet"], noisy_latents, timesteps, embeds, batch)
