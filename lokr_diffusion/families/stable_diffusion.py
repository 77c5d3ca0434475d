"""What the three UNet families (SD 1.x, SD 2.x, SDXL) share: real configs, detection rules,
naming, presets, conditioning and tiny builders. Each family module fills in its numbers.

The adapter code is only correct if it sees the module names of the real models (the LyCORIS
keys and preset counts are defined on them, see the format spec section 3), but the tests
cannot download multi-gigabyte checkpoints. So each family keeps the exact Diffusers config of
its published checkpoint, to build weightless "meta" models whose names and counts are the real
ones, and a tiny random pipeline with the *same* module tree (same block types, indices,
attention placement, projection kind and conv_shortcut placement; only widths and depths
shrink), saved as an ordinary Diffusers folder.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import naming
from .base import Family
from ..storage import model_dtype

SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

UNET_COMMON: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
}

_CLIP_COMMON: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    # The published configs carry these (historically wrong) ids; eos_token_id == 2 makes
    # transformers pool at the argmax token, which is <|endoftext|> for the CLIP vocabulary.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
CLIP_L = {  # openai/clip-vit-large-patch14 text tower (SD1.5 text_encoder, SDXL text_encoder)
    **_CLIP_COMMON, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
    "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
}
OPENCLIP_H = {  # SD2: OpenCLIP ViT-H/14 text tower with its last layer dropped (penultimate)
    **_CLIP_COMMON, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
}
OPENCLIP_BIGG = {  # SDXL text_encoder_2: OpenCLIP ViT-bigG/14 text tower with projection
    **_CLIP_COMMON, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
    "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
}

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
TINY_SAMPLE_SIZE = 32  # latent; 256 px default, but any multiple of 8 (e.g. 64 px) works

_ATTN_PROJ = (".to_q", ".to_k", ".to_v", ".to_out.0")
_RESNET_LAYERS = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
_TOP_LEVEL = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
_DIFFUSERS_UNET = re.compile(r"(down_blocks|up_blocks|mid_block)_")  # the ldm names are input_blocks...


def text_encoder(class_name: str, config: Mapping[str, Any]) -> nn.Module:
    import transformers

    return getattr(transformers, class_name)(transformers.CLIPTextConfig(**config))


def sd_kind(config: Mapping[str, Any], num_text_encoders: int) -> str:
    """Which UNet family a UNet config (and text-encoder count) is; the rule, first match wins:

    1. ``addition_embed_type == "text_time"`` or two text encoders -> ``"sdxl"``;
    2. ``cross_attention_dim`` 1024 -> SD2, 768 -> SD1 (the real widths);
    3. any other width (tiny test models, odd fine-tunes): ``use_linear_projection`` True
       -> SD2, else SD1. SD1 is the only family whose transformer proj_in/proj_out are
       1x1 convs, so this is structural, not a guess from sizes.
    """
    if config.get("addition_embed_type") == "text_time" or num_text_encoders >= 2:
        return "sdxl"
    width = config.get("cross_attention_dim")
    if isinstance(width, (list, tuple)):
        width = width[0]
    if width in (768, 1024):
        return "sd2" if width == 1024 else "sd1"
    return "sd2" if config.get("use_linear_projection", False) else "sd1"


class StableDiffusionFamily(Family):
    """A UNet2DConditionModel family with CLIP text encoders and an AutoencoderKL."""

    pipeline_class = "StableDiffusionPipeline"
    real_unet: dict[str, Any]
    real_text: list[tuple[str, dict[str, Any]]]  # (transformers class, config) in pipeline order
    tiny_unet: dict[str, Any]  # overrides of real_unet for the tiny pipeline
    tiny_scheduler: tuple[str, dict[str, Any]]  # the class and settings the real model ships with
    vae_scaling_factor = 0.18215
    ldm_unet_names = False  # SDXL files name UNet modules by the original (ldm/sgm) paths
    top_level_in_full = True  # conv_in, conv_out, time embedding in the "full" preset
    checkpoint_text_prefixes: tuple[tuple[str, str], ...]  # (original-file prefix, "clip" | "openclip")
    checkpoint_marker: str  # a key prefix only this family's single-file checkpoints have
    # adapter-file evidence: in-features of attn2.to_k; (te component, q_proj width) pairs
    cross_attention_width: int
    text_encoder_widths: tuple[tuple[str, int], ...]
    base_model_version = ""
    metadata_versions: tuple[str, ...] = ()  # ss_base_model_version values meaning this family
    architecture = ""
    resolution = "512x512"
    layout_written = "`lora_unet_` + Diffusers names, `lora_te_` + `text_model_` (sd-scripts)"
    layouts_read = ("`lora_unet_` (Diffusers or original names), `lycoris_`, `lora_te`/`te1` with or without "
                    "`text_model_`, PEFT LoKr")
    implementation = "diffusers"  # modelspec.implementation: whose module names the model uses
    checkpoint_architecture = ""  # modelspec.architecture of a merged single-file checkpoint
    shared_name = "sd"  # SD 1.x and 2.x files share their key names
    shared_title = "SD 1.x or 2.x"

    # -- detection ----------------------------------------------------------------------------
    def matches_models(self, denoiser_config: Mapping[str, Any], text_encoders: Sequence[nn.Module]) -> bool:
        """A UNet2DConditionModel config (it has down blocks; a DiT's has none) of this family."""
        return "down_block_types" in denoiser_config and sd_kind(denoiser_config, len(text_encoders)) == self.name

    def matches_text_encoders(self, text_encoders: Sequence[nn.Module]) -> bool:
        """CLIP towers only; then their count, and for a single one its width."""
        if not all(_is_clip(te) for te in text_encoders):
            return False
        widths = [w for _, w in self.text_encoder_widths]
        return len(widths) == len(text_encoders) and (
            len(widths) > 1 or getattr(text_encoders[0].config, "hidden_size", 768) == widths[0])

    def matches_pipeline_class(self, class_name: str) -> bool:
        """Any SD 1.x/2.x pipeline class (txt2img, img2img, inpaint...) loads with the same parts."""
        return (class_name.startswith("StableDiffusion")
                and not class_name.startswith(("StableDiffusionXL", "StableDiffusion3")))

    def matches_checkpoint_keys(self, keys: Sequence[str]) -> bool:
        return any(k.startswith(self.checkpoint_marker) for k in keys)

    def matches_metadata(self, metadata: Mapping[str, str]) -> bool:
        return metadata.get("ss_base_model_version", "") in self.metadata_versions

    def misread_denoiser_key(self, key: str) -> tuple[str, str] | None:
        """Where files use the ldm UNet names (SDXL), A1111 maps Diffusers-style keys (and
        LyCORIS's ``lycoris_`` ones) to the wrong layers."""
        rest = key.removeprefix(naming.UNET_PREFIX + "_")
        if not self.ldm_unet_names or not (key.startswith(naming.LYCORIS_PREFIX + "_") or _DIFFUSERS_UNET.match(rest)):
            return None
        return (f"{self.name}_diffusers_names", f"{self.title} UNet keys in Diffusers style: A1111 maps them to the "
                "wrong layers (it needs the ldm names sd-scripts writes); `convert` renames them")

    # -- naming -------------------------------------------------------------------------------
    def text_encoder_prefixes(self) -> list[str]:
        return naming.text_encoder_prefixes(len(self.real_text))

    def denoiser_key(self, path: str, denoiser: nn.Module) -> str:
        return naming.unet_key(path, self.ldm_unet_names, _layout(denoiser))

    def denoiser_key_aliases(self, path: str, denoiser: nn.Module) -> list[str]:
        return naming.unet_key_aliases(path, _layout(denoiser))

    # -- presets ------------------------------------------------------------------------------
    def preset_filter(self, denoiser: nn.Module, preset: str) -> Callable[[str], bool]:
        """``path -> bool`` for the LyCORIS preset: attention projections (attn-only), every
        Linear / 1x1 conv in transformer blocks (attn-mlp), plus ResNet and sampler convs and,
        outside SDXL, conv_in/conv_out/time embedding (full)."""
        prefixes = tuple(n + "." for n, m in denoiser.named_modules() if type(m).__name__ == "Transformer2DModel")

        def chosen(path: str) -> bool:
            if path.startswith(prefixes):
                if preset == "attn-only":
                    return (".attn1." in path or ".attn2." in path) and path.endswith(_ATTN_PROJ)
                return True
            if preset != "full":
                return False
            last = path.rsplit(".", 1)[-1]
            if ".resnets." in path and last in _RESNET_LAYERS:
                return True
            if (".downsamplers." in path or ".upsamplers." in path) and last == "conv":
                return True
            return self.top_level_in_full and path in _TOP_LEVEL

        return chosen

    # -- conditioning -------------------------------------------------------------------------
    clip_skip_refusal = None  # SD 1.x / 2.x: the prompt embedding is one CLIP layer, clip_skip chooses which

    def encode_text(self, text_encoders: Sequence[nn.Module], input_ids: Sequence[torch.Tensor],
                    device: torch.device, clip_skip: int = 1) -> dict[str, torch.Tensor]:
        """The last CLIP layer's hidden states; with ``clip_skip = n > 1`` the n-th from last
        layer's, passed through the tower's final layer norm (A1111's and sd-scripts' clip skip)."""
        te = text_encoders[0]
        if clip_skip == 1:
            return {"prompt_embeds": te(input_ids[0].to(device))[0]}
        layers = te.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip {clip_skip}: the text encoder has {layers} layers")
        hidden = te(input_ids[0].to(device), output_hidden_states=True).hidden_states[-clip_skip]
        # transformers 5 folds CLIPTextModel.text_model into the model itself; older versions nest it
        return {"prompt_embeds": getattr(te, "text_model", te).final_layer_norm(hidden)}

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                embeds: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
        dtype = model_dtype(denoiser)  # not an fp8-stored weight's
        return denoiser(noisy.to(dtype), timesteps, encoder_hidden_states=embeds["prompt_embeds"].to(noisy.device),
                        **self.added_conditions(embeds, batch, noisy.device)).sample

    def added_conditions(self, embeds: Mapping[str, torch.Tensor], batch: Mapping[str, Any],
                         device: torch.device) -> dict[str, Any]:
        return {}

    # -- metadata -----------------------------------------------------------------------------
    def file_metadata(self, prediction_type: str | None = None) -> dict[str, str]:
        return {"ss_base_model_version": self.base_model_version, "ss_v2": "False",
                "modelspec.architecture": self.architecture, "modelspec.resolution": self.resolution,
                "modelspec.prediction_type": "epsilon"}

    def checkpoint_metadata_architecture(self, prediction_type: str | None) -> str:
        return self.checkpoint_architecture

    # -- architectures ------------------------------------------------------------------------
    def real_unet_config(self) -> dict[str, Any]:
        return copy.deepcopy(self.real_unet)

    def real_text_encoder_configs(self) -> list[tuple[str, dict[str, Any]]]:
        """``(transformers class name, CLIPTextConfig kwargs)`` per text encoder, in pipeline order;
        index 0 is ``lora_te``/``lora_te1``, index 1 is ``lora_te2``."""
        return [(cls, copy.deepcopy(cfg)) for cls, cfg in self.real_text]

    def tiny_unet_config(self) -> dict[str, Any]:
        """The real UNet config with small widths and shallow transformers, same module tree."""
        cfg = self.real_unet_config()
        cfg.update(copy.deepcopy(self.tiny_unet))
        cfg["norm_num_groups"] = 8
        cfg["sample_size"] = TINY_SAMPLE_SIZE
        return cfg

    def build_meta(self) -> tuple[nn.Module, list[nn.Module]]:
        """Built on the meta device so that even SDXL (3.5 B parameters) takes well under a second."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel(**self.real_unet_config())
            encoders = [text_encoder(cls, cfg) for cls, cfg in self.real_text_encoder_configs()]
        return unet, encoders

    def tokenizer_pads(self) -> dict[str, str]:
        return {"tokenizer": "<|endoftext|>"}

    def build_tiny(self, out_dir: str | Path, seed: int = 0) -> Path:
        """Weights depend only on ``seed``; the folder is a normal ``save_pretrained`` output."""
        import diffusers
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from .clip_tokenizer import tokenizer_files, write_tiny_tokenizer

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tokenizers = {}
        for name, pad in self.tokenizer_pads().items():
            write_tiny_tokenizer(out / name, pad_token=pad)
            tokenizers[name] = transformers.CLIPTokenizer.from_pretrained(str(out / name))
        tok = tokenizers["tokenizer"]
        bos, eos = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
        vocab_size = len(tok.get_vocab())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**self.tiny_unet_config())
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
                sample_size=8 * TINY_SAMPLE_SIZE, scaling_factor=self.vae_scaling_factor,
                force_upcast=self.vae_scaling_factor != 0.18215,
            )
            encoders = []
            for cls, cfg in self.real_text_encoder_configs():
                cfg.update(TINY_TEXT)
                cfg.update(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                           projection_dim=32)
                encoders.append(text_encoder(cls, cfg))
        sched_cls, sched_kwargs = self.tiny_scheduler
        scheduler = getattr(diffusers, sched_cls)(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                  beta_schedule="scaled_linear", **sched_kwargs)
        pipe = self.assemble_pipeline(vae, encoders, tokenizers, unet, scheduler)
        pipe.save_pretrained(str(out), safe_serialization=True)
        # save_pretrained of a fast tokenizer writes tokenizer.json only; put the vocab/merges
        # files back so older (slow) CLIPTokenizer versions load the folder too.
        for name, pad in self.tokenizer_pads().items():
            for fname in ("vocab.json", "merges.txt"):
                (out / name / fname).write_text(tokenizer_files(pad)[fname], encoding="utf-8")
        return out

    def assemble_pipeline(self, vae, encoders, tokenizers, unet, scheduler):
        import diffusers

        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tokenizers["tokenizer"], unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def to_original(self, pipe: Any) -> dict[str, torch.Tensor]:
        from ..tools.checkpoint import clip_to_original, openclip_to_original, unet_to_original, vae_to_original

        out = unet_to_original(pipe.unet.state_dict(), pipe.unet)
        out.update(vae_to_original(pipe.vae.state_dict(), pipe.vae))
        convert = {"clip": clip_to_original, "openclip": openclip_to_original}
        for te, (prefix, kind) in zip(self.components(pipe).text_encoders, self.checkpoint_text_prefixes):
            out.update(convert[kind](te.state_dict(), prefix))
        return out


def _is_clip(model: nn.Module) -> bool:
    """A CLIP text tower (or something without a transformers config, taken to be one)."""
    return str(getattr(getattr(model, "config", None), "model_type", "clip")).startswith("clip")


def _layout(unet: nn.Module) -> tuple[int, frozenset[int]]:
    return naming.unet_layout(unet)

