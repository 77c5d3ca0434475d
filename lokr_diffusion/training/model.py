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
from ..network import AdapterNetwork
from ..text import tokenize  # noqa: F401  (moved; the dataset shares it)


class TrainingModel(nn.Module):
    def __init__(self, network: AdapterNetwork, unet: nn.Module, text_encoders: Sequence[nn.Module],
                 sdxl: bool, train_text_encoder: bool, embedding: TriggerEmbedding | None = None) -> None:
        super().__init__()
        self.network = network
        self.embedding = embedding  # trigger-word vectors, trained with the adapter (or None)
        self.frozen = {"unet": unet, "text_encoders": list(text_encoders)}  # plain dict: not registered
        self.sdxl = sdxl
        self.train_text_encoder = train_text_encoder or embedding is not None  # gradients through the encoder

    def encode_text(self, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Prompt embeddings the way the Diffusers pipelines make them (SDXL: penultimate hidden
        states of both encoders concatenated, pooled output of the second)."""
        tes = self.frozen["text_encoders"]
        device = next(self.network.parameters()).device
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            if not self.sdxl:
                return {"prompt_embeds": tes[0](input_ids[0].to(device))[0]}
            hidden, pooled = [], None
            for te, ids in zip(tes, input_ids):
                out = te(ids.to(device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]
            return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, batch: Mapping[str, Any],
                add_time_ids: torch.Tensor | None = None) -> torch.Tensor:
        unet = self.frozen["unet"]
        embeds = batch.get("text_embeds") or self.encode_text(batch["input_ids"])
        dtype = next(unet.parameters()).dtype
        kwargs = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": embeds["pooled_prompt_embeds"].to(noisy_latents.device),
                                           "time_ids": add_time_ids.to(noisy_latents.device)}
        return unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=embeds["prompt_embeds"].to(noisy_latents.device),
                    **kwargs).sample
