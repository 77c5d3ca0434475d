"""Flux.1 [dev] and [schnell]: a rectified-flow DiT (``FluxTransformer2DModel``) conditioned on
CLIP-L's pooled output and T5-XXL's hidden states, with a 16-channel VAE whose latents are
packed 2x2 into tokens.

Both models have the same module tree except [dev]'s guidance embedder, so adapter files are
interchangeable; they are two families because files and detection say which one a model is.
The class docstring gives the presets and keys; the project's DiT spec (``dit-families.md``)
the two layouts (Diffusers and original BFL names) of every layer.
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
from . import flux_names
from .base import Family
from .stable_diffusion import CLIP_L, TINY_TEXT, text_encoder
from .tiny_parts import tiny_clip_config, tiny_latent16_vae
from ..storage import model_dtype

__all__ = ["FLUX_DEV", "FLUX_SCHNELL", "FluxFamily", "T5_XXL", "image_ids", "pack_latents", "unpack_latents"]

# black-forest-labs/FLUX.1-dev, transformer/config.json ([schnell]: guidance_embeds false)
FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# google/t5-v1_1-xxl encoder as FLUX.1 ships it (text_encoder_2/config.json)
T5_XXL: dict[str, Any] = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "vocab_size": 32128,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-06,
    "dropout_rate": 0.1,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
# FLUX.1 vae/config.json values the pipeline and the trainer read
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
VAE_SCALE = 8  # pixels per latent: four VAE levels
LATENT_CHANNELS = 16

# Small widths and depths, same module tree: head dim 16 = sum of the rope axes, as 128 = 16+56+56
TINY_TRANSFORMER = {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                    "joint_attention_dim": 32, "pooled_projection_dim": TINY_TEXT["hidden_size"],
                    "axes_dims_rope": [4, 6, 6]}
TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}

# Module paths of FluxTransformer2DModel, per role (fullmatch on the path)
_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
ATTENTION = re.compile(rf"{_DOUBLE}attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|{_SINGLE}attn\.to_[qkv]")
MLP = re.compile(rf"{_DOUBLE}ff(_context)?\.net\.(0\.proj|2)|{_SINGLE}(proj_mlp|proj_out)")
MODULATION = re.compile(rf"{_DOUBLE}norm1(_context)?\.linear|{_SINGLE}norm\.linear")
OUTSIDE_BLOCKS = re.compile(r"x_embedder|context_embedder|time_text_embed\.(timestep|guidance|text)_embedder\.linear_[12]"
                            r"|norm_out\.linear|proj_out")
_PRESET_PARTS = {"attn-only": (ATTENTION,), "attn-mlp": (ATTENTION, MLP),
                 "full": (ATTENTION, MLP, MODULATION, OUTSIDE_BLOCKS)}

# T5 encoder layers per preset (LyCORIS's attn-only T5 class is the self-attention layer)
T5_ATTENTION = re.compile(r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.[qkvo]")
T5_MLP = re.compile(r"encoder\.block\.\d+\.layer\.1\.DenseReluDense\.(wi_0|wi_1|wo|wi)")

# Adapter-file module keys that name a Flux.1 module (whole keys: SD3, Flux.2 and Qwen-Image share the
# block prefixes and many inner names, see families.sd3 / flux2 / qwen_image): the Diffusers names
# (lycoris_/lora_transformer_/dotted), the original BFL names (kohya lora_unet_, dotted
# diffusion_model.), and T5 as te2 (SD3's te2 is CLIP-G).
_DIFFUSERS_NAME = (rf"{_DOUBLE}(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)"
                   rf"|norm1(_context)?\.linear)|{_SINGLE}(attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)"
                   r"|x_embedder|context_embedder|time_text_embed\.(timestep|guidance|text)_embedder\.linear_[12]"
                   r"|norm_out\.linear|proj_out")
_ORIGINAL_BLOCK = (r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)"
                   r"|single_blocks\.\d+\.(linear1|linear1_qkv|linear2|modulation\.lin)")
_ORIGINAL_NAME = rf"{_ORIGINAL_BLOCK}|img_in|txt_in|(time|vector|guidance)_in\.(in|out)_layer|final_layer\.(linear|adaLN_modulation\.1)"


def _flat(names: str) -> str:
    return names.replace(r"\.", "_")


_ADAPTER_KEY = re.compile(
    rf"((lycoris|lora_transformer)_({_flat(_DIFFUSERS_NAME)})"
    rf"|(transformer\.)?({_DIFFUSERS_NAME})"
    rf"|lora_unet_({_flat(_ORIGINAL_NAME)})"
    rf"|((model\.)?diffusion_model\.)?({_ORIGINAL_BLOCK})"
    rf"|(model\.)?diffusion_model\.({_ORIGINAL_NAME}))$"
    r"|lora_te2_encoder_block_\d+_layer_\d")
# Text-encoder keys Flux.1 reads that are not its alone: CLIP-L (SD's and SD3's too) and T5 as te3
# (SD3's T5): counted with its names, but on their own no sign of a Flux file
_SHARED_TEXT_KEY = re.compile(r"lora_te1_(text_model_)?encoder_layers_\d+_|lora_te3_encoder_block_\d+_layer_\d")
_GUIDANCE_KEY = re.compile(r"guidance_in[._]|guidance_embedder[._]")  # only [dev] has this module
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
ORIGINAL_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"  # sd-scripts' IMPL_FLUX: original names

# What the UIs do with the file layouts, as read in their loaders:
# * ComfyUI (DiT spec, section 2): all six layouts, q/k/v as row slices, linear1_qkv too.
# * Forge (lllyasviel/stable-diffusion-webui-forge at dfdcbab, 2025-06-26): its model keeps the
#   original names; `model_lora_keys_unet` in packages_3rdparty/comfyui_lora_collection/lora.py maps
#   `lora_unet_` and `diffusion_model.` keys for every weight, and for Flux the `transformer.`,
#   `lycoris_` and `lora_transformer_` Diffusers keys (q/k/v and proj_mlp as row offsets, norm_out
#   with its halves swapped); no bare Diffusers paths, no `linear1_qkv`. It reads LoRA, LoHa and LoKr
#   per module; T5 keys as lora_te1_/te2_/te3_ (backend/patcher/lora.py).
# * AUTOMATIC1111: not checked; its Flux.1 request (issue #16311) is open.
_FORGE_LAYOUTS = frozenset({"lycoris", "lora_transformer", "transformer", "kohya", "diffusion_model"})
_FUSED_QKV_ONLY = "linear1_qkv"  # ComfyUI's key for the first 3H rows of linear1; Forge has none
_PIPELINE_CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
_METADATA_VERSIONS = ("flux", "flux1", "flux1dev")  # ss_base_model_version, lower case, [-_. ] dropped


# -- latents and positions: small pure functions the pipeline, the trainer and tests share ---------
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, H/2 * W/2, 4C) tokens, 2x2 patches as FluxPipeline packs them."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2x2 latent patches: latent height and width must be even, got {h}x{w}")
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``height`` x ``width`` (latent pixels)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, height, width, 1)  # scale 1: sizes are latent sizes


def image_ids(height: int, width: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) rotary position ids of the packed tokens of a ``height`` x ``width`` latent:
    (0, row, column) per token, in packing order."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


def text_ids(length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(length, 3) position ids of the T5 tokens: all zero, as FluxPipeline.encode_prompt makes them."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


class FluxFamily(Family):
    """Flux.1: ``FluxTransformer2DModel`` + CLIP-L (``text_encoder``) + T5-XXL (``text_encoder_2``).

    **Presets** (module counts on the real Flux.1-dev architecture; [schnell] has 2 fewer in
    ``full``, no guidance embedder):

    ========= ======================================================================== =====
    attn-only attention projections: double blocks ``attn.to_q/k/v``, ``to_out.0``,       266
              ``add_q/k/v_proj``, ``to_add_out`` (8 x 19); single blocks ``attn.to_q/k/v``
              (3 x 38)
    attn-mlp  + MLPs: ``ff.net.0.proj``, ``ff.net.2``, ``ff_context.*`` (4 x 19); single    418
              blocks ``proj_mlp`` and ``proj_out`` (2 x 38)
    full      + AdaLN modulation ``norm1.linear``, ``norm1_context.linear``, single        504
              ``norm.linear`` (2 x 19 + 38) and the 10 Linears outside the blocks
              (``x_embedder``, ``context_embedder``, time / guidance / text embedders,
              ``norm_out.linear``, ``proj_out``): every Linear of the model
    ========= ======================================================================== =====

    Why: LyCORIS's own presets name Flux only by the original BFL block classes
    (``DoubleStreamBlock``, ``SingleStreamBlock``), which match nothing in a Diffusers model,
    and on a BFL model they take *every* Linear of the blocks, modulation included (494 here).
    kohya's trainers leave the modulation Linears out by default (``exclude_patterns``
    ``.*(img_mod|txt_mod|modulation).*``; users report better results): they are large
    (3072 x 18432 each) and steer every token at once. So attn-mlp is the blocks without
    modulation, as kohya trains them, and full is everything. A single block's ``proj_out``
    (BFL ``linear2``) projects the attention output and the MLP together; it goes with the
    MLP, so attn-only trains only true attention projections.

    Text encoders: CLIP-L as for SD (48 / 72 / 72 modules); T5 attn-only is each layer's
    ``SelfAttention.q/k/v/o`` (96), attn-mlp and full add ``DenseReluDense.wi_0/wi_1/wo``
    (168). T5 stays frozen unless asked (:attr:`default_trained_text_encoders`).

    **Keys**: the denoiser is written ``lycoris_<Diffusers path, . -> _>``
    (``lycoris_transformer_blocks_0_attn_to_q``, SimpleTuner's layout): LoKr on separate
    q/k/v is three Kronecker products and cannot be one on the fused ``qkv`` of the original
    names. Read too: ``lora_transformer_<path>`` (OneTrainer). Fused BFL layouts (kohya) are
    mapped by row slices, see ``Family.fused_groups``. Text encoders: CLIP-L
    ``lora_te1_text_model_<path>``, T5 ``lora_te2_<path>`` (no ``text_model_``; also read as
    ``lora_te3_``, ComfyUI's count when a third encoder exists).
    """

    aliases: tuple[str, ...] = ()
    shared_name = "flux.1"  # dev and schnell files share every key: what reports say when nothing tells
    shared_title = "Flux.1"  # them apart (see adapter_evidence)
    pipeline_class = "FluxPipeline"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    tokenizer_attrs = ("tokenizer", "tokenizer_2")
    denoiser_attr = "transformer"
    default_prediction = "flow"  # rectified flow: the target is noise - latents
    objective = "flow"
    layout_written = "`lycoris_` + Diffusers names; CLIP-L `lora_te1_text_model_`, T5 `lora_te2_`"
    layouts_read = ("`lycoris_`, `lora_transformer_`, `transformer.` and bare Diffusers paths, kohya `lora_unet_` and "
                    "`diffusion_model.` original names (fused `qkv` / `linear1` as row slices), Diffusers/PEFT "
                    "`lora_A`/`lora_B`; `lora_te1_`, `lora_te2_`/`lora_te3_` (T5)")
    trigger_embeddings = False  # T5's SentencePiece vocabulary: not built yet
    text_cache_on_disk = True  # T5 embeddings: 512 x 4096 floats (8 MB) per caption
    default_trained_text_encoders = (0,)  # CLIP-L; T5-XXL only when a config names it
    guidance_embeds: bool  # [dev] is guidance-distilled: the guidance value is an input
    default_guidance: float | None  # the guidance a training step feeds [dev] (kohya's advice: 1.0)
    max_sequence_length: int  # T5 tokens the pipeline encodes by default
    architecture: str  # modelspec.architecture of an adapter
    implementation = "diffusers"  # modelspec.implementation: whose module names our files use
    base_model_version = "flux1"  # ss_base_model_version, as sd-scripts writes it for dev and schnell
    resolution = "1024x1024"
    scheduler_config: dict[str, Any]  # FlowMatchEulerDiscreteScheduler settings the model ships with
    vae_scaling_factor = VAE_SCALING_FACTOR
    vae_shift_factor = VAE_SHIFT_FACTOR
    vae_scale_factor = VAE_SCALE
    real_text = [("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)]
    attention_width = 3072  # 24 heads x 128: in-features of every attention projection

    # -- detection ----------------------------------------------------------------------------
    def matches_models(self, denoiser_config: Mapping[str, Any], text_encoders: Sequence[nn.Module]) -> bool:
        """A FluxTransformer2DModel config (joint text width, single-stream blocks, pooled
        projection, rope axes; no other class name) with this family's guidance embedder."""
        keys = ("joint_attention_dim", "num_single_layers", "pooled_projection_dim", "axes_dims_rope")
        if not all(k in denoiser_config for k in keys):
            return False
        if denoiser_config.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
            return False
        return bool(denoiser_config.get("guidance_embeds", False)) == self.guidance_embeds

    def matches_pipeline_class(self, class_name: str) -> bool:
        """Pipelines that load exactly FLUX.1's parts for the base model. Fill, Control,
        Kontext, ControlNet and Redux pipelines serve other checkpoints or need extra inputs,
        and Flux.2 is another architecture."""
        return class_name in _PIPELINE_CLASSES

    def matches_checkpoint_keys(self, keys: Sequence[str]) -> bool:
        """Original BFL single-file names (``double_blocks.0.img_attn.qkv.weight``, maybe under
        ``model.diffusion_model.``); [dev] has the guidance embedder ``guidance_in``."""
        names = [_strip_prefix(k) for k in keys]
        if not any(n.startswith("double_blocks.") for n in names) or not any(n.startswith("single_blocks.") for n in names):
            return False
        return any(n.startswith("guidance_in.") for n in names) == self.guidance_embeds

    def matches_text_encoders(self, text_encoders: Sequence[nn.Module]) -> bool:
        kinds = [str(getattr(getattr(te, "config", None), "model_type", "")) for te in text_encoders]
        return len(kinds) == 2 and kinds[0].startswith("clip") and kinds[1] == "t5"

    def names_adapter_key(self, key: str) -> bool:
        """Flux.1 module names in any of the six layouts (those SD3, Flux.2 and Qwen-Image share
        too) and its text encoders' keys."""
        return bool(_ADAPTER_KEY.match(key) or _SHARED_TEXT_KEY.match(key))

    def matches_adapter_keys(self, module_keys: Sequence[str]) -> bool:
        """A denoiser name or T5 as te2: CLIP-L and te3 T5 keys alone are SD's or SD3's files."""
        return any(_ADAPTER_KEY.match(k) for k in module_keys)

    def adapter_evidence(self, module_keys: Sequence[str], metadata: Mapping[str, str]) -> str | None:
        """Why a file keyed by the Flux.1 names is for this model and not the other one.

        Keys first: only [dev] has the guidance embedder (``guidance_in`` /
        ``time_text_embed.guidance_embedder``), so a file patching it is [dev]'s whatever its
        metadata says. Then ``modelspec.architecture`` ``flux-1-dev`` or ``flux-1-schnell``, which
        sd-scripts and this project write. ``ss_base_model_version`` ``flux1`` and the architecture
        ``flux-1`` are written for both models: no evidence, and the file is "Flux.1".
        """
        if any(_GUIDANCE_KEY.search(k) for k in module_keys):
            return "keys (the guidance embedder, which only [dev] has)" if self.guidance_embeds else None
        if metadata.get("modelspec.architecture", "").split("/")[0] == self.architecture.split("/")[0]:
            return "keys (module names) and metadata (modelspec.architecture)"
        return None

    def matches_metadata(self, metadata: Mapping[str, str]) -> bool:
        """sd-scripts writes ``modelspec.architecture`` ``flux-1-dev/lora`` or
        ``flux-1-schnell/lora`` and ``ss_base_model_version`` ``flux1`` for both; a file saying
        only the latter (or ``flux-1``) is taken to be for [dev], the model LoRAs are trained on."""
        arch = metadata.get("modelspec.architecture", "")
        if arch.startswith(("flux-1-dev", "flux-1-schnell")):
            return arch.startswith(self.architecture.split("/")[0])
        version = re.sub(r"[^a-z0-9]", "", metadata.get("ss_base_model_version", "").lower())
        claimed = arch.split("/")[0] == "flux-1" or version in _METADATA_VERSIONS
        return claimed and self.guidance_embeds

    # -- naming -------------------------------------------------------------------------------
    def text_encoder_prefixes(self) -> list[str]:
        return ["lora_te1", "lora_te2"]

    def denoiser_key(self, path: str, denoiser: nn.Module) -> str:
        return naming.module_key(naming.LYCORIS_PREFIX, path)

    def denoiser_key_aliases(self, path: str, denoiser: nn.Module) -> list[str]:
        """Every 1:1 layout of the spec (lycoris_, lora_transformer_, transformer. and bare dotted,
        and the original names of layers Diffusers does not split); our key first."""
        keys = flux_names.key_aliases(path, denoiser)
        ours = self.denoiser_key(path, denoiser)
        return [ours] + [k for k in keys if k != ours]

    def fused_groups(self, denoiser: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
        """kohya / ComfyUI files over the original fused layers (img_attn.qkv, txt_attn.qkv, linear1)."""
        return flux_names.fused_groups(denoiser)

    # -- the six file layouts (flux_names.LAYOUTS) ----------------------------------------------
    file_layouts = flux_names.LAYOUTS

    def denoiser_layout(self, key: str) -> str | None:
        return flux_names.layout_of(key)

    def layout_key(self, layout: str, path: str) -> str | None:
        self.require_layout(layout)
        return flux_names.layout_key(layout, path)

    def layout_metadata(self, layout: str) -> dict[str, str]:
        """``modelspec.implementation`` says whose module names the file uses, as sd-scripts writes
        it: ``diffusers`` or the original BFL repository."""
        original = layout in flux_names.ORIGINAL_NAMED
        return {"modelspec.implementation": ORIGINAL_IMPLEMENTATION if original else self.implementation}

    def ui_support(self, module_keys: Sequence[str]) -> list[tuple[str, str]]:
        """What ComfyUI, Forge and AUTOMATIC1111 do with these transformer keys (sources: the
        comment above ``_FORGE_LAYOUTS``)."""
        layouts = [flux_names.layout_of(k) for k in module_keys]
        n = sum(1 for layout in layouts if layout is not None)
        if not n:
            return []
        skipped = sum(1 for k, layout in zip(module_keys, layouts) if layout is not None
                      and (layout not in _FORGE_LAYOUTS or k.endswith(_FUSED_QKV_ONLY)))
        forge = (f"skips {skipped} of {n} transformer modules: its key map has no bare Diffusers paths (DiffSynth "
                 "layout) and no linear1_qkv; `lokr-diffusion convert --to transformer` (or lycoris) writes keys it "
                 "reads" if skipped else
                 f"applies all {n} transformer modules (it reads lycoris_, lora_transformer_, transformer., lora_unet_ "
                 "and diffusion_model. keys; q/k/v as row slices of its fused weights)")
        return [("ComfyUI", f"applies all {n} transformer modules: it reads all six layouts, fused qkv / linear1 as "
                            "row slices"),
                ("Forge", forge),
                ("AUTOMATIC1111", "not checked: its request for Flux.1 support (issue #16311) is open and no Flux "
                                  "LoRA loader of it was read")]

    def text_encoder_key(self, index: int, path: str) -> str:
        if index == 1:  # T5: its own module names, no text_model level
            return naming.module_key("lora_te2", path)
        return super().text_encoder_key(index, path)

    def text_encoder_key_aliases(self, index: int, path: str) -> list[str]:
        if index == 1:
            return [naming.module_key(p, path) for p in ("lora_te2", "lora_te3")]
        return super().text_encoder_key_aliases(index, path)

    # -- presets ------------------------------------------------------------------------------
    def preset_filter(self, denoiser: nn.Module, preset: str) -> Callable[[str], bool]:
        parts = _PRESET_PARTS[preset]
        return lambda path: any(p.fullmatch(path) for p in parts)

    def text_preset_filter(self, index: int, model: nn.Module, preset: str) -> Callable[[str], bool]:
        if index != 1:
            return super().text_preset_filter(index, model, preset)
        parts = (T5_ATTENTION,) if preset == "attn-only" else (T5_ATTENTION, T5_MLP)
        return lambda path: any(p.fullmatch(path) for p in parts)

    # -- conditioning -------------------------------------------------------------------------
    def encode_text(self, text_encoders: Sequence[nn.Module], input_ids: Sequence[torch.Tensor],
                    device: torch.device) -> dict[str, torch.Tensor]:
        """CLIP-L's pooled output and T5's last hidden state, as FluxPipeline's
        ``_get_clip_prompt_embeds`` / ``_get_t5_prompt_embeds`` compute them."""
        clip, t5 = text_encoders[0], text_encoders[1]
        pooled = clip(input_ids[0].to(device), output_hidden_states=False).pooler_output
        hidden = t5(input_ids[1].to(device), output_hidden_states=False)[0]
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}

    def guidance(self, denoiser: nn.Module, batch: Mapping[str, Any], batch_size: int,
                 device: torch.device) -> torch.Tensor | None:
        """(B,) float32 guidance for a model with a guidance embedder (``batch["guidance"]``, a
        number or per-item values, else :attr:`default_guidance`); None for one without."""
        if not getattr(denoiser.config, "guidance_embeds", False):
            return None
        value = batch.get("guidance")
        if value is None:
            value = self.default_guidance if self.default_guidance is not None else 1.0
        g = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
        return g.expand(batch_size) if g.numel() == 1 else g

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                embeds: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
        """The velocity prediction for noisy latents (B, 16, h, w), returned in the same shape.

        Every family's ``denoise`` takes latents as the VAE gives them and timesteps on the
        schedulers' 0-1000 scale; Flux packs 2x2 patches into tokens with their position ids and
        feeds ``timesteps / 1000`` (the flow time s), as FluxPipeline does.
        """
        b, _, h, w = noisy.shape
        device = noisy.device
        dtype = model_dtype(denoiser)  # not an fp8-stored weight's
        prompt = embeds["prompt_embeds"].to(device=device, dtype=dtype)
        t = (torch.as_tensor(timesteps, device=device).float().flatten() / 1000).to(dtype)
        out = denoiser(hidden_states=pack_latents(noisy.to(dtype)), timestep=t.expand(b) if t.numel() == 1 else t,
                       guidance=self.guidance(denoiser, batch, b, device),
                       pooled_projections=embeds["pooled_prompt_embeds"].to(device=device, dtype=dtype),
                       encoder_hidden_states=prompt, txt_ids=text_ids(prompt.shape[1], device, dtype),
                       img_ids=image_ids(h, w, device, dtype), return_dict=True)
        return unpack_latents(out.sample, h, w)

    def latent_channels(self, denoiser: nn.Module) -> int:
        return int(denoiser.config["in_channels"]) // 4  # the transformer sees 2x2 patches packed

    def image_tokens(self, latents: torch.Tensor) -> int:
        """Tokens per image after packing: what Flux's resolution-dependent shift reads."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    # -- metadata -----------------------------------------------------------------------------
    def file_metadata(self, prediction_type: str | None = None) -> dict[str, str]:
        """What sd-scripts writes for a Flux LoRA; no ``modelspec.prediction_type`` (a flow
        model has none), and our module names are Diffusers'."""
        return {"ss_base_model_version": self.base_model_version, "ss_v2": "False",
                "modelspec.architecture": self.architecture, "modelspec.implementation": self.implementation,
                "modelspec.resolution": self.resolution}

    # -- architectures ------------------------------------------------------------------------
    def real_transformer_config(self) -> dict[str, Any]:
        return {**copy.deepcopy(FLUX_TRANSFORMER), "guidance_embeds": self.guidance_embeds}

    def tiny_transformer_config(self) -> dict[str, Any]:
        """The real config with small widths and two blocks of each kind: same module tree."""
        return {**self.real_transformer_config(), **copy.deepcopy(TINY_TRANSFORMER)}

    def real_text_encoder_configs(self) -> list[tuple[str, dict[str, Any]]]:
        """``(transformers class name, config kwargs)``: CLIP-L (``lora_te1``), T5-XXL (``lora_te2``)."""
        return [(cls, copy.deepcopy(cfg)) for cls, cfg in self.real_text]

    def build_meta(self) -> tuple[nn.Module, list[nn.Module]]:
        """11.9 B + 4.9 B parameters without storage, in well under a second."""
        from diffusers import FluxTransformer2DModel

        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**self.real_transformer_config())
            encoders = [_text_model(cls, cfg) for cls, cfg in self.real_text_encoder_configs()]
        return transformer, encoders

    def build_tiny(self, out_dir: str | Path, seed: int = 0) -> Path:
        """A ``FluxPipeline`` folder (a few MB): tiny transformer, CLIP, T5 and 16-channel VAE
        with the real module names, locally made tokenizers, the real scheduler settings."""
        import transformers
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        from .clip_tokenizer import tokenizer_files, write_tiny_tokenizer
        from .t5_tokenizer import write_tiny_t5_tokenizer

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(out / "tokenizer")))
        t5_tokenizer = write_tiny_t5_tokenizer(out / "tokenizer_2")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = FluxTransformer2DModel(**self.tiny_transformer_config())
            vae = tiny_latent16_vae(VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR)
            clip = _text_model("CLIPTextModel", {**CLIP_L, **tiny_clip_config(clip_tokenizer)})
            t5 = _text_model("T5EncoderModel", {**T5_XXL, **TINY_T5, "vocab_size": len(t5_tokenizer)})
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler_config), vae=vae,
                            text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                            transformer=transformer)
        pipe.save_pretrained(str(out), safe_serialization=True)
        for fname in ("vocab.json", "merges.txt"):  # for slow CLIPTokenizer versions, as the SD builders do
            (out / "tokenizer" / fname).write_text(tokenizer_files("<|endoftext|>")[fname], encoding="utf-8")
        return out


def _strip_prefix(key: str) -> str:
    for prefix in _CHECKPOINT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _text_model(class_name: str, config: Mapping[str, Any]) -> nn.Module:
    import transformers

    if class_name == "T5EncoderModel":
        return transformers.T5EncoderModel(transformers.T5Config(**config))
    return text_encoder(class_name, config)


class FluxDev(FluxFamily):
    name = "flux"
    title = "Flux.1 [dev]"
    aliases = ("flux1", "flux-dev", "flux1-dev")
    guidance_embeds = True
    default_guidance = 1.0
    max_sequence_length = 512
    architecture = "flux-1-dev/lora"
    scheduler_config = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                        "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


class FluxSchnell(FluxFamily):
    name = "flux-schnell"
    title = "Flux.1 [schnell]"
    aliases = ("flux1-schnell", "schnell")
    guidance_embeds = False
    default_guidance = None
    max_sequence_length = 256
    architecture = "flux-1-schnell/lora"
    scheduler_config = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
                        "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


FLUX_DEV = FluxDev()
FLUX_SCHNELL = FluxSchnell()
