"""Stable Diffusion 3.5 Large and Medium: a rectified-flow MMDiT (``SD3Transformer2DModel``)
conditioned on CLIP-L, OpenCLIP bigG (CLIP-G) and T5-XXL, with a 16-channel VAE.

Large and Medium share the text encoders, the VAE, the scheduler and the file-key rules, but not
their widths (H = 2432 and 1536) nor their block trees (Medium's first 13 blocks add a second
image attention, ``attn2``), so an adapter for one never fits the other: they are two families,
told apart by the model config, the checkpoint keys, the metadata and the tensor widths. SD3
Medium (3.0) has Medium's widths and depth without ``attn2``; it is detected as the Medium family.
The class docstring gives the presets and keys; :mod:`.sd3_names` the two layouts (Diffusers and
original MMDiT names) of every layer.
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
from . import sd3_names
from .base import Family
from .flux import T5_ATTENTION, T5_MLP, T5_XXL
from .stable_diffusion import CLIP_L, OPENCLIP_BIGG, text_encoder
from .tiny_parts import tiny_clip_config, tiny_latent16_vae

__all__ = ["SD35_LARGE", "SD35_MEDIUM", "SD3Family", "MAX_SEQUENCE_LENGTH"]

# stabilityai/stable-diffusion-3.5-large, transformer/config.json
SD35_LARGE_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "dual_attention_layers": [],
    "qk_norm": "rms_norm",
}
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: attn2 in blocks 0-12)
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    **SD35_LARGE_TRANSFORMER,
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
}
# text_encoder: CLIP-L with its projection (pooled output 768); text_encoder_2: bigG (1280)
CLIP_L_PROJECTION = {**CLIP_L, "projection_dim": 768}
REAL_TEXT = [("CLIPTextModelWithProjection", CLIP_L_PROJECTION), ("CLIPTextModelWithProjection", OPENCLIP_BIGG),
             ("T5EncoderModel", T5_XXL)]
# vae/config.json values the pipeline and the trainer read
VAE_SCALING_FACTOR = 1.5305
VAE_SHIFT_FACTOR = 0.0609
LATENT_CHANNELS = 16
VAE_SCALE = 8  # pixels per latent: four VAE levels
CLIP_TOKENS = 77  # the CLIP part of the joint text sequence
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}  # scheduler/scheduler_config.json
MAX_SEQUENCE_LENGTH = 256  # T5 tokens StableDiffusion3Pipeline.encode_prompt encodes by default

# Small widths, same module tree. The T5 width (joint_attention_dim) exceeds the two CLIP widths
# together (32 + 32), as 4096 > 768 + 1280, so the CLIP states are zero-padded as in the real model.
TINY_TRANSFORMER = {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "caption_projection_dim": 32,
                    "joint_attention_dim": 96, "pooled_projection_dim": 64, "pos_embed_max_size": 32,
                    "sample_size": 8}
TINY_T5 = {"d_model": 96, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}

# Module paths of SD3Transformer2DModel, per role (fullmatch on the path)
_BLOCK = r"transformer_blocks\.\d+\."
ATTENTION = re.compile(rf"{_BLOCK}(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|attn2\.(to_[qkv]|to_out\.0))")
MLP = re.compile(rf"{_BLOCK}ff(_context)?\.net\.(0\.proj|2)")
MODULATION = re.compile(rf"{_BLOCK}norm1(_context)?\.linear")
OUTSIDE_BLOCKS = re.compile(r"context_embedder|time_text_embed\.(timestep|text)_embedder\.linear_[12]|norm_out\.linear"
                            r"|proj_out")
_PRESET_PARTS = {"attn-only": (ATTENTION,), "attn-mlp": (ATTENTION, MLP),
                 "full": (ATTENTION, MLP, MODULATION, OUTSIDE_BLOCKS)}

# Adapter-file module keys that name an SD3 module, whole keys (Flux.1, Flux.2 and Qwen-Image share the
# block prefix and many inner names): the Diffusers names under lycoris_ / lora_transformer_ /
# transformer. / base_model.model. or bare, the original MMDiT names under kohya lora_unet_ and
# (model.)diffusion_model. (joint blocks bare too), lora_unet_ + Diffusers names (what the PEFT reader
# makes of base_model.model. LoKr keys), and T5 as te3 (Flux's te2 is T5).
_DIFFUSERS_NAME = "|".join(p.pattern for p in (ATTENTION, MLP, MODULATION, OUTSIDE_BLOCKS)) + r"|pos_embed\.proj"
_ORIGINAL_NAME = r"joint_blocks\.\d+\..+|final_layer\..+|context_embedder|[txy]_embedder\..+"
_DIFFUSERS_FLAT, _ORIGINAL_FLAT = (n.replace(r"\.", "_") for n in (_DIFFUSERS_NAME, _ORIGINAL_NAME))
_NAME_KEY = re.compile(
    rf"((lycoris|lora_transformer)_({_DIFFUSERS_FLAT})"
    rf"|(transformer\.|base_model\.model\.)?({_DIFFUSERS_NAME})"
    rf"|lora_unet_({_ORIGINAL_FLAT}|{_DIFFUSERS_FLAT})"
    rf"|((model\.)?diffusion_model\.)({_ORIGINAL_NAME})|((model\.)?diffusion_model\.)?joint_blocks\.\d+\..+)$"
    r"|lora_te3_encoder_block_\d+_layer_\d")
# CLIP-L and CLIP-G keys (te1, te2, ComfyUI's dotted text_encoder[_2].): SD3's too, but SD's and
# Flux's (CLIP-L) as well; counted with its names, on their own no sign of an SD3 file
_CLIP_KEY = re.compile(r"lora_te[12]_(text_model_)?encoder_layers_\d+_|text_encoder(_2)?\.")
_ATTN2_KEY = re.compile(r"attn2[._]")  # Medium's second image attention, in any layout
ORIGINAL_IMPLEMENTATION = "https://github.com/Stability-AI/sd3.5"  # the reference code: the original names
# What ComfyUI does with the layouts, read in comfy/lora.py (model_lora_keys_unet) and comfy/utils.py
# (mmdit_to_diffusers): the original names of every weight (lora_unet_, diffusion_model.), and for SD3
# the Diffusers names of mmdit_to_diffusers' table under transformer., base_model.model.,
# lora_transformer_ and lycoris_ (q/k/v as row offsets, the two modulations with halves swapped).
# That table has no bare Diffusers paths and no attn2 (Medium's second attention) entries.
_COMFY_DIFFUSERS = frozenset({"lycoris", "lora_transformer", "transformer", "base_model"})
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
_CLIP_DOTTED = ("text_encoder", "text_encoder_2")  # ComfyUI's Diffusers-LoRA keys of the two CLIP towers


def _strip_prefix(key: str) -> str:
    for prefix in _CHECKPOINT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_medium_config(config: Mapping[str, Any]) -> bool:
    """Medium's tree: dual-attention blocks (SD3.5 Medium), or Medium's depth of 24 without them
    (SD3 Medium 3.0). Large has 38 blocks and no attn2; tiny models say so by their attn2."""
    return bool(config.get("dual_attention_layers")) or int(config.get("num_layers", 0)) == 24


def metadata_variant(metadata: Mapping[str, str]) -> str | None:
    """``"large"`` or ``"medium"`` when a file's metadata names an SD3 variant, else None.

    sd-scripts writes ``modelspec.architecture`` ``stable-diffusion-3-5-large/lora``,
    ``stable-diffusion-3-5-medium/lora`` or ``stable-diffusion-3-m/lora`` (SD3 Medium), other
    tools ``stable-diffusion-v3...`` or an ``ss_base_model_version`` such as ``sd3_large``; a
    bare "SD3" names no variant (the widths decide).
    """
    arch = metadata.get("modelspec.architecture", "").lower().split("/")[0]
    version = metadata.get("ss_base_model_version", "").lower()
    if arch.startswith(("stable-diffusion-3", "stable-diffusion-v3")):
        text = arch
    elif version.startswith("sd3"):
        text = version
    else:
        return None
    if "large" in text:
        return "large"
    if "medium" in text or re.search(r"[-_]m$", text):
        return "medium"
    return None


class SD3Family(Family):
    """SD3.5: ``SD3Transformer2DModel`` + CLIP-L (``text_encoder``) + CLIP-G (``text_encoder_2``)
    + T5-XXL (``text_encoder_3``).

    **Presets** (module counts on the real architectures, meta device; Large: 38 joint blocks,
    the last ``context_pre_only``; Medium: 24 blocks, ``attn2`` in blocks 0-12):

    ========= ========================================================================= ===== ======
    preset    modules                                                                   Large Medium
    ========= ========================================================================= ===== ======
    attn-only attention projections: ``attn.to_q/k/v``, ``to_out.0``, ``add_q/k/v_proj``,  303   243
              ``to_add_out`` (8 a block, 7 in the last), Medium's ``attn2.to_q/k/v``,
              ``to_out.0`` (4 x 13)
    attn-mlp  + MLPs ``ff.net.0.proj``, ``ff.net.2``, ``ff_context.*`` (4 a block, 2 in the   453   337
              last)
    full      + AdaLN modulation ``norm1.linear``, ``norm1_context.linear`` (2 a block)    536   392
              and the 7 Linears outside the blocks (``context_embedder``, time and
              pooled-text embedders, ``norm_out.linear``, ``proj_out``): every Linear
    ========= ========================================================================= ===== ======

    Why: as for Flux, LyCORIS names SD3 only by the original block classes, and kohya's SD3
    trainer leaves the modulation Linears out by default; they steer every token at once. So
    attn-mlp is the blocks without modulation and full is every Linear. The 2x2 patch-embedding
    conv (``pos_embed.proj``) is in no preset: a k x k conv, trained nowhere by default.

    Text encoders: CLIP-L as for SD (48 / 72 / 72 modules), CLIP-G as SDXL's (128 / 192 / 192),
    their ``text_projection`` in none; T5 attn-only is each layer's ``SelfAttention.q/k/v/o``
    (96), attn-mlp and full add ``DenseReluDense.wi_0/wi_1/wo`` (168). T5 stays frozen unless a
    config names it (:attr:`default_trained_text_encoders`).

    **Keys**: the denoiser is written ``lycoris_<Diffusers path, . -> _>``
    (``lycoris_transformer_blocks_0_attn_to_q``, SimpleTuner's layout): LoKr on separate q/k/v
    is three Kronecker products and cannot be one on the fused ``qkv`` of the original names.
    Read too: ``lora_transformer_``, ``transformer.`` / bare / ``base_model.model.`` dotted
    Diffusers paths, and the original names (kohya ``lora_unet_joint_blocks_...``,
    ``diffusion_model.joint_blocks...``; fused ``qkv`` by row slices, see ``fused_groups``).
    Text encoders: ``lora_te1_text_model_<path>`` (CLIP-L), ``lora_te2_text_model_<path>``
    (CLIP-G; both also without ``text_model_`` and as ComfyUI's ``text_encoder[_2].text_model.``
    dotted keys), ``lora_te3_<path>`` (T5, no ``text_model_``), as ComfyUI counts them.
    """

    text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_attrs = ("tokenizer", "tokenizer_2", "tokenizer_3")
    denoiser_attr = "transformer"
    pipeline_class = "StableDiffusion3Pipeline"
    default_prediction = "flow"  # rectified flow: the target is noise - latents
    objective = "flow"
    shared_name = "sd3.x"  # Large and Medium files share every key name: what reports say when nothing
    shared_title = "SD3.5 Large or Medium"  # tells them apart (see adapter_evidence)
    layout_written = ("`lycoris_` + Diffusers names; CLIP-L `lora_te1_text_model_`, CLIP-G `lora_te2_text_model_`, "
                      "T5 `lora_te3_`")
    layouts_read = ("`lycoris_`, `lora_transformer_`, `transformer.`, bare and `base_model.model.` Diffusers paths, "
                    "kohya `lora_unet_` and `diffusion_model.` original names (fused `qkv` as row slices), "
                    "Diffusers/PEFT `lora_A`/`lora_B`; `lora_te1_`/`lora_te2_` (and `text_encoder[_2].`) CLIP, "
                    "`lora_te3_` T5")
    trigger_embeddings = False  # T5's SentencePiece vocabulary: not built yet
    text_cache_on_disk = True  # T5 embeddings: 256 x 4096 floats (4 MB) per caption
    default_trained_text_encoders = (0, 1)  # the CLIP towers; T5-XXL only when a config names it
    max_sequence_length = MAX_SEQUENCE_LENGTH
    implementation = "diffusers"  # modelspec.implementation: whose module names our files use
    resolution = "1024x1024"
    scheduler_config = SCHEDULER_CONFIG
    vae_scaling_factor = VAE_SCALING_FACTOR
    vae_shift_factor = VAE_SHIFT_FACTOR
    vae_scale_factor = VAE_SCALE
    real_text = REAL_TEXT
    medium: bool  # which of the two trees
    real_transformer: dict[str, Any]
    architecture: str  # modelspec.architecture of an adapter
    base_model_version: str  # ss_base_model_version

    # -- detection ----------------------------------------------------------------------------
    def matches_models(self, denoiser_config: Mapping[str, Any], text_encoders: Sequence[nn.Module]) -> bool:
        """An SD3Transformer2DModel config (caption projection, patch-position table; no other
        class name) with this family's tree (:func:`is_medium_config`)."""
        keys = ("caption_projection_dim", "pos_embed_max_size", "joint_attention_dim", "pooled_projection_dim")
        if not all(k in denoiser_config for k in keys):
            return False
        if denoiser_config.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
            return False
        return is_medium_config(denoiser_config) == self.medium

    def matches_pipeline_class(self, class_name: str) -> bool:
        """The pipelines that load exactly SD3's parts; ControlNet / PAG variants need more inputs."""
        return class_name in _PIPELINE_CLASSES

    def matches_checkpoint_keys(self, keys: Sequence[str]) -> bool:
        """Original single-file names (``joint_blocks.0.x_block.attn.qkv.weight``, maybe under
        ``model.diffusion_model.``); Medium by its ``attn2`` or its 24 blocks."""
        names = [_strip_prefix(k) for k in keys]
        blocks = {int(m[1]) for n in names for m in [re.match(r"joint_blocks\.(\d+)\.", n)] if m}
        if not blocks:
            return False
        medium = any(".x_block.attn2." in n for n in names) or max(blocks) + 1 == 24
        return medium == self.medium

    def matches_text_encoders(self, text_encoders: Sequence[nn.Module]) -> bool:
        kinds = [str(getattr(getattr(te, "config", None), "model_type", "")) for te in text_encoders]
        return len(kinds) == 3 and kinds[0].startswith("clip") and kinds[1].startswith("clip") and kinds[2] == "t5"

    def names_adapter_key(self, key: str) -> bool:
        """SD3 module names in any of the seven layouts (those Flux.1, Flux.2 and Qwen-Image share
        too) and its text encoders' keys: DiT block keys with CLIP-G keys outcount Flux's (whose te2
        is T5) and the DiT-only families'."""
        return bool(_NAME_KEY.match(key) or _CLIP_KEY.match(key))

    def matches_adapter_keys(self, module_keys: Sequence[str]) -> bool:
        """A denoiser name or T5 as te3: CLIP keys alone are SD's files (SDXL: te1 + te2)."""
        return any(_NAME_KEY.match(k) for k in module_keys)

    def matches_metadata(self, metadata: Mapping[str, str]) -> bool:
        return metadata_variant(metadata) == ("medium" if self.medium else "large")

    def adapter_evidence(self, module_keys: Sequence[str], metadata: Mapping[str, str]) -> str | None:
        """Why a file keyed by the SD3 names is for this model and not the other one: ``attn2``
        keys (only Medium has the second attention), else metadata naming the variant. Without
        either the widths may still tell (``family_of_adapter``), or the file is open to both."""
        if any(_ATTN2_KEY.search(k) for k in module_keys):
            return "keys (attn2, which only Medium has)" if self.medium else None
        if self.matches_metadata(metadata):
            return "keys (module names) and metadata (modelspec.architecture or ss_base_model_version)"
        return None

    # -- naming -------------------------------------------------------------------------------
    def text_encoder_prefixes(self) -> list[str]:
        return ["lora_te1", "lora_te2", "lora_te3"]

    def denoiser_key(self, path: str, denoiser: nn.Module) -> str:
        return naming.module_key(naming.LYCORIS_PREFIX, path)

    def denoiser_key_aliases(self, path: str, denoiser: nn.Module) -> list[str]:
        """Every 1:1 layout ComfyUI reads for SD3 (see :func:`sd3_names.key_aliases`), our key
        first, and ``lora_unet_<Diffusers path>``: the name the PEFT reader gives a module of a
        ``base_model.model.`` LoKr state dict (no kohya file uses it: kohya's are the original names)."""
        ours = self.denoiser_key(path, denoiser)
        peft = naming.module_key(naming.UNET_PREFIX, path)
        return [ours] + [k for k in sd3_names.key_aliases(path, denoiser) if k != ours] + [peft]

    def fused_groups(self, denoiser: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
        """kohya / ComfyUI files over the original fused ``qkv`` layers and the swapped modulations."""
        return sd3_names.fused_groups(denoiser)

    # -- the seven file layouts (sd3_names.LAYOUTS) -------------------------------------------
    file_layouts = sd3_names.LAYOUTS

    def denoiser_layout(self, key: str) -> str | None:
        return sd3_names.layout_of(key)

    def layout_key(self, layout: str, path: str) -> str | None:
        """On the real architecture (the toolbox works on it): its last block decides which
        text modulation is a swapped-halves slice."""
        self.require_layout(layout)
        return sd3_names.layout_key(layout, path, self.real_transformer)

    def layout_metadata(self, layout: str) -> dict[str, str]:
        """``modelspec.implementation``: ``diffusers`` or the reference code, whose names a file uses."""
        original = layout in sd3_names.ORIGINAL_NAMED
        return {"modelspec.implementation": ORIGINAL_IMPLEMENTATION if original else self.implementation}

    def ui_support(self, module_keys: Sequence[str]) -> list[tuple[str, str]]:
        """What ComfyUI does with these transformer keys (source: the comment above
        ``_COMFY_DIFFUSERS``); Forge and AUTOMATIC1111 were not checked for SD3."""
        layouts = [sd3_names.layout_of(k) for k in module_keys]
        n = sum(1 for layout in layouts if layout is not None)
        if not n:
            return []
        skipped = sum(1 for k, layout in zip(module_keys, layouts) if layout is not None and (
            layout == "bare" or (layout in _COMFY_DIFFUSERS and _ATTN2_KEY.search(k))))
        comfy = (f"skips {skipped} of {n} transformer modules: its SD3 key map has no bare Diffusers paths and no "
                 "Diffusers names for attn2; `lokr-diffusion convert --to lycoris` renames bare keys, and attn2 "
                 "is read under the original names (--to kohya; LoRA only, LoKr and LoHa cannot be stacked)"
                 if skipped else
                 f"applies all {n} transformer modules (lycoris_, lora_transformer_, transformer., "
                 "base_model.model. and original names; q/k/v as row slices of its fused weights)")
        return [("ComfyUI", comfy), ("Forge", "not checked for SD3"), ("AUTOMATIC1111", "not checked for SD3")]

    def text_encoder_key(self, index: int, path: str) -> str:
        if index == 2:  # T5: its own module names, no text_model level
            return naming.module_key("lora_te3", path)
        return super().text_encoder_key(index, path)

    def text_encoder_key_aliases(self, index: int, path: str) -> list[str]:
        if index == 2:
            return [naming.module_key("lora_te3", path)]
        dotted = f"{_CLIP_DOTTED[index]}.{naming.text_encoder_path(path)}"
        return super().text_encoder_key_aliases(index, path) + [dotted]

    # -- presets ------------------------------------------------------------------------------
    def preset_filter(self, denoiser: nn.Module, preset: str) -> Callable[[str], bool]:
        parts = _PRESET_PARTS[preset]
        return lambda path: any(p.fullmatch(path) for p in parts)

    def text_preset_filter(self, index: int, model: nn.Module, preset: str) -> Callable[[str], bool]:
        if index != 2:
            return super().text_preset_filter(index, model, preset)
        parts = (T5_ATTENTION,) if preset == "attn-only" else (T5_ATTENTION, T5_MLP)
        return lambda path: any(p.fullmatch(path) for p in parts)

    # -- conditioning -------------------------------------------------------------------------
    def t5_input_ids(self, ids: torch.Tensor, t5: nn.Module) -> torch.Tensor:
        """T5 ids cut to :attr:`max_sequence_length`, as the pipeline tokenizes them.

        The trainer tokenizes to the tokenizer's ``model_max_length`` (512 for SD3's T5), but
        StableDiffusion3Pipeline encodes 256 tokens, and the transformer attends to every token,
        padding included: training must see the sequence inference sees. A caption cut here
        ends in ``</s>`` as the tokenizer's own truncation would make it.
        """
        n = self.max_sequence_length
        if ids.shape[-1] <= n:
            return ids
        ids = ids[..., :n].clone()
        pad, eos = t5.config.pad_token_id, t5.config.eos_token_id
        last = ids[..., -1]
        ids[..., -1] = torch.where((last != pad) & (last != eos), torch.full_like(last, eos), last)
        return ids

    def encode_text(self, text_encoders: Sequence[nn.Module], input_ids: Sequence[torch.Tensor],
                    device: torch.device) -> dict[str, torch.Tensor]:
        """As ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L and CLIP-G penultimate hidden
        states side by side, zero-padded to T5's width, then T5's sequence after them; pooled =
        the two CLIP projections side by side."""
        if len(text_encoders) != 3:
            raise ValueError(f"{self.title} needs its three text encoders (CLIP-L, CLIP-G, T5); got "
                             f"{len(text_encoders)}: load the pipeline with text_encoder_3")
        hidden, pooled = [], []
        for te, ids in zip(text_encoders[:2], input_ids[:2]):
            out = te(ids.to(device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        t5 = text_encoders[2]
        t5_hidden = t5(self.t5_input_ids(input_ids[2], t5).to(device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5_hidden.to(clip.dtype)], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                embeds: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
        """The velocity prediction for noisy latents (B, 16, h, w), in the same shape.

        Timesteps are on the 0-1000 scale, which SD3Transformer2DModel takes as they are (the
        pipeline feeds the scheduler's ``sigma * 1000``); the transformer patches 2x2 itself.
        """
        b = noisy.shape[0]
        device = noisy.device
        dtype = next(denoiser.parameters()).dtype
        t = torch.as_tensor(timesteps, device=device).float().flatten()
        return denoiser(hidden_states=noisy.to(dtype), timestep=t.expand(b) if t.numel() == 1 else t,
                        encoder_hidden_states=embeds["prompt_embeds"].to(device=device, dtype=dtype),
                        pooled_projections=embeds["pooled_prompt_embeds"].to(device=device, dtype=dtype),
                        return_dict=False)[0]

    # -- metadata -----------------------------------------------------------------------------
    def file_metadata(self, prediction_type: str | None = None) -> dict[str, str]:
        """sd-scripts' architecture names; no ``modelspec.prediction_type`` (a flow model has
        none), and our module names are Diffusers'."""
        return {"ss_base_model_version": self.base_model_version, "ss_v2": "False",
                "modelspec.architecture": self.architecture, "modelspec.implementation": self.implementation,
                "modelspec.resolution": self.resolution}

    # -- architectures ------------------------------------------------------------------------
    def real_transformer_config(self) -> dict[str, Any]:
        return copy.deepcopy(self.real_transformer)

    def tiny_transformer_config(self) -> dict[str, Any]:
        """The real config with small widths and two blocks (the last ``context_pre_only``);
        Medium keeps ``attn2`` in its first block."""
        cfg = {**self.real_transformer_config(), **copy.deepcopy(TINY_TRANSFORMER)}
        cfg["dual_attention_layers"] = [0] if self.medium else []
        return cfg

    def real_text_encoder_configs(self) -> list[tuple[str, dict[str, Any]]]:
        """``(transformers class name, config kwargs)``: CLIP-L (``lora_te1``), CLIP-G
        (``lora_te2``), T5-XXL (``lora_te3``)."""
        return [(cls, copy.deepcopy(cfg)) for cls, cfg in self.real_text]

    def build_meta(self) -> tuple[nn.Module, list[nn.Module]]:
        """8.1 B (Large) or 2.2 B (Medium) + 5.6 B text parameters without storage, in a second."""
        from diffusers import SD3Transformer2DModel

        with torch.device("meta"):
            transformer = SD3Transformer2DModel(**self.real_transformer_config())
            encoders = [_text_model(cls, cfg) for cls, cfg in self.real_text_encoder_configs()]
        return transformer, encoders

    def build_tiny(self, out_dir: str | Path, seed: int = 0) -> Path:
        """A ``StableDiffusion3Pipeline`` folder (a few MB): tiny transformer, two CLIPs, T5 and a
        16-channel VAE with the real module names, locally made tokenizers, the real scheduler."""
        import transformers
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        from .clip_tokenizer import tokenizer_files, write_tiny_tokenizer
        from .t5_tokenizer import write_tiny_t5_tokenizer

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}  # SD3's second tokenizer pads with "!"
        tokenizers = {name: transformers.CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(out / name, pad)))
                      for name, pad in pads.items()}
        t5_tokenizer = write_tiny_t5_tokenizer(out / "tokenizer_3")
        clip_config = tiny_clip_config(tokenizers["tokenizer"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = SD3Transformer2DModel(**self.tiny_transformer_config())
            vae = tiny_latent16_vae(VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR)
            clip_l = _text_model("CLIPTextModelWithProjection", {**CLIP_L_PROJECTION, **clip_config})
            clip_g = _text_model("CLIPTextModelWithProjection", {**OPENCLIP_BIGG, **clip_config})
            t5 = _text_model("T5EncoderModel", {**T5_XXL, **TINY_T5, "vocab_size": len(t5_tokenizer)})
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler_config), vae=vae,
            text_encoder=clip_l, tokenizer=tokenizers["tokenizer"], text_encoder_2=clip_g,
            tokenizer_2=tokenizers["tokenizer_2"], text_encoder_3=t5, tokenizer_3=t5_tokenizer)
        pipe.save_pretrained(str(out), safe_serialization=True)
        for name, pad in pads.items():  # for slow CLIPTokenizer versions, as the SD builders do
            for fname in ("vocab.json", "merges.txt"):
                (out / name / fname).write_text(tokenizer_files(pad)[fname], encoding="utf-8")
        return out


def _text_model(class_name: str, config: Mapping[str, Any]) -> nn.Module:
    import transformers

    if class_name == "T5EncoderModel":
        return transformers.T5EncoderModel(transformers.T5Config(**config))
    return text_encoder(class_name, config)


class SD35Large(SD3Family):
    name = "sd35-large"
    title = "SD3.5 Large"
    aliases = ("sd3", "sd35", "sd3.5", "sd3.5-large", "sd3-large", "sd35l")
    medium = False
    real_transformer = SD35_LARGE_TRANSFORMER
    attention_width = 2432  # 38 heads x 64
    architecture = "stable-diffusion-3-5-large/lora"
    base_model_version = "sd3_large"


class SD35Medium(SD3Family):
    name = "sd35-medium"
    title = "SD3.5 Medium"
    aliases = ("sd3.5-medium", "sd3-medium", "sd35m")
    medium = True
    real_transformer = SD35_MEDIUM_TRANSFORMER
    attention_width = 1536  # 24 heads x 64
    architecture = "stable-diffusion-3-5-medium/lora"
    base_model_version = "sd3_medium"


SD35_LARGE = SD35Large()
SD35_MEDIUM = SD35Medium()
