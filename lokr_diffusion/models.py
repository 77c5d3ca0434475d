"""Base models: the real Stable Diffusion architectures, tiny look-alikes, and loading.

The adapter code is only correct if it sees the module names of the real models (the
LyCORIS keys and preset counts are defined on them, see the format spec section 3), but the
tests cannot download multi-gigabyte checkpoints. So this module keeps:

* the exact Diffusers configs of SD 1.5, SD 2.1 (768-v) and SDXL base 1.0, to build
  weightless "meta" models whose module names and counts are the real ones;
* tiny random pipelines with the *same* module tree (same block types, indices, attention
  placement, projection kind and conv_shortcut placement; only widths, transformer depth
  and text-encoder depth shrink), saved as ordinary Diffusers folders that every code path
  for real users (``from_pretrained``, training, export) can be run against on a CPU;
* ``load_pipeline``, the one entry point that turns what a user typed into a pipeline, and
  ``detect_family``, which decides SD1/SD2/SDXL naming from the loaded model.

Family names: builders take ``"sd15"``, ``"sd2"``, ``"sdxl"`` (aliases accepted, see
:func:`canonical_family`); detection answers ``"sd1"``, ``"sd2"``, ``"sd2-v"`` or ``"sdxl"``
because SD2 v-prediction changes how a model is trained, not how it is named.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelError

__all__ = [
    "FAMILIES",
    "build_meta_models",
    "build_tiny_pipeline",
    "canonical_family",
    "detect_family",
    "load_pipeline",
    "pipeline_family",
    "real_text_encoder_configs",
    "real_unet_config",
    "tiny_unet_config",
    "write_tiny_tokenizer",
]

FAMILIES = ("sd15", "sd2", "sdxl")

_ALIASES = {
    "sd15": "sd15", "sd1": "sd15", "sd1.5": "sd15", "sd-1.5": "sd15", "sd1x": "sd15",
    "sd2": "sd2", "sd21": "sd2", "sd2.1": "sd2", "sd2-v": "sd2", "sd2v": "sd2", "sd2x": "sd2",
    "sdxl": "sdxl", "sd-xl": "sdxl", "xl": "sdxl",
}


def canonical_family(family: str) -> str:
    """Map any accepted spelling to ``"sd15"``, ``"sd2"`` or ``"sdxl"``.

    Detection answers ``"sd1"``/``"sd2-v"`` while configs and the CLI say ``"sd15"``/``"sd2"``;
    funnelling every name through here lets the two vocabularies be compared directly.
    """
    key = str(family).strip().lower().replace("_", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    raise ConfigError(
        f"unknown model family {family!r}: expected one of sd15 (sd1), sd2 (sd21, sd2-v) or sdxl"
    )


# --------------------------------------------------------------------------------------
# Real architectures (Diffusers configs of the published checkpoints)
# --------------------------------------------------------------------------------------

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

_UNET_COMMON: dict[str, Any] = {
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

_REAL_UNET: dict[str, dict[str, Any]] = {
    # runwayml / stable-diffusion-v1-5, unet/config.json
    "sd15": {
        **_UNET_COMMON,
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "down_block_types": _SD_DOWN,
        "up_block_types": _SD_UP,
        "sample_size": 64,
    },
    # stabilityai / stable-diffusion-2-1 (768-v), unet/config.json
    "sd2": {
        **_UNET_COMMON,
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024,
        "down_block_types": _SD_DOWN,
        "up_block_types": _SD_UP,
        "dual_cross_attention": False,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "sample_size": 96,
        "upcast_attention": True,
        "use_linear_projection": True,
    },
    # stabilityai / stable-diffusion-xl-base-1.0, unet/config.json
    "sdxl": {
        **_UNET_COMMON,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "mid_block_only_cross_attention": None,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    },
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
_CLIP_L = {  # openai/clip-vit-large-patch14 text tower (SD1.5 text_encoder, SDXL text_encoder)
    **_CLIP_COMMON, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
    "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
}
_OPENCLIP_H = {  # SD2: OpenCLIP ViT-H/14 text tower with its last layer dropped (penultimate)
    **_CLIP_COMMON, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
}
_OPENCLIP_BIGG = {  # SDXL text_encoder_2: OpenCLIP ViT-bigG/14 text tower with projection
    **_CLIP_COMMON, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
    "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
}
_REAL_TEXT: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "sd15": [("CLIPTextModel", _CLIP_L)],
    "sd2": [("CLIPTextModel", _OPENCLIP_H)],
    "sdxl": [("CLIPTextModel", _CLIP_L), ("CLIPTextModelWithProjection", _OPENCLIP_BIGG)],
}


def real_unet_config(family: str) -> dict[str, Any]:
    """The published UNet config, so module names and preset counts can be checked offline."""
    return copy.deepcopy(_REAL_UNET[canonical_family(family)])


def real_text_encoder_configs(family: str) -> list[tuple[str, dict[str, Any]]]:
    """``(transformers class name, CLIPTextConfig kwargs)`` per text encoder, in pipeline order.

    The order matters: index 0 is ``lora_te``/``lora_te1``, index 1 is ``lora_te2``.
    """
    return [(cls, copy.deepcopy(cfg)) for cls, cfg in _REAL_TEXT[canonical_family(family)]]


def _text_encoder(class_name: str, config: Mapping[str, Any]) -> nn.Module:
    import transformers

    cls = getattr(transformers, class_name)
    return cls(transformers.CLIPTextConfig(**config))


def build_meta_models(family: str) -> tuple[Any, list[nn.Module]]:
    """The real UNet and text encoders with no storage, for naming and counting modules.

    Built on the meta device so that even SDXL (3.5 B parameters) takes well under a second
    and no memory; the models cannot run, only be inspected.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**real_unet_config(family))
        encoders = [_text_encoder(cls, cfg) for cls, cfg in real_text_encoder_configs(family)]
    return unet, encoders


# --------------------------------------------------------------------------------------
# Family detection
# --------------------------------------------------------------------------------------

def _config_of(model: Any) -> Mapping[str, Any]:
    if isinstance(model, Mapping):
        return model
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ModelError(f"cannot read a config from {type(model).__name__}: expected a Diffusers UNet")
    return cfg


def detect_family(
    unet: Any,
    text_encoders: Sequence[nn.Module] | None = None,
    prediction_type: str | None = None,
) -> str:
    """Decide which naming/conditioning rules apply: ``"sd1"``, ``"sd2"``, ``"sd2-v"`` or ``"sdxl"``.

    Rule, first match wins (``unet`` may be a model or its config dict):

    1. ``addition_embed_type == "text_time"`` or two text encoders -> ``"sdxl"``;
    2. ``cross_attention_dim`` 1024 -> SD2, 768 -> SD1 (the real widths);
    3. any other width (tiny test models, odd fine-tunes): ``use_linear_projection`` True
       -> SD2, else SD1. SD1 is the only family whose transformer proj_in/proj_out are
       1x1 convs, so this is structural, not a guess from sizes;
    4. SD2 becomes ``"sd2-v"`` when ``prediction_type`` (usually the scheduler's) is
       ``"v_prediction"``. SD1 stays ``"sd1"`` whatever the prediction type.
    """
    cfg = _config_of(unet)
    n_text = len(text_encoders) if text_encoders is not None else 0
    if cfg.get("addition_embed_type") == "text_time" or n_text >= 2:
        return "sdxl"
    width = cfg.get("cross_attention_dim")
    if isinstance(width, (list, tuple)):
        width = width[0]
    if width == 1024:
        sd2 = True
    elif width == 768:
        sd2 = False
    else:
        sd2 = bool(cfg.get("use_linear_projection", False))
    if not sd2:
        return "sd1"
    return "sd2-v" if prediction_type == "v_prediction" else "sd2"


def pipeline_family(pipe: Any) -> str:
    """:func:`detect_family` for a loaded pipeline, taking the prediction type from its scheduler."""
    encoders = [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
                if m is not None]
    scheduler = getattr(pipe, "scheduler", None)
    prediction = scheduler.config.get("prediction_type") if scheduler is not None else None
    return detect_family(pipe.unet, encoders, prediction_type=prediction)


# --------------------------------------------------------------------------------------
# Tiny pipelines
# --------------------------------------------------------------------------------------

# Widths keep the real 1:2:4(:4) ratio so that conv_shortcut appears in exactly the same
# resnets as in the real model (it exists where in_channels != out_channels).
_TINY_UNET_OVERRIDES: dict[str, dict[str, Any]] = {
    "sd15": {"block_out_channels": [16, 32, 64, 64], "attention_head_dim": 2,
             "cross_attention_dim": 32},
    "sd2": {"block_out_channels": [16, 32, 64, 64], "attention_head_dim": [2, 4, 8, 8],
            "cross_attention_dim": 32},
    "sdxl": {"block_out_channels": [16, 32, 64], "attention_head_dim": [2, 4, 8],
             "cross_attention_dim": 64, "transformer_layers_per_block": [1, 2, 2],
             "addition_time_embed_dim": 8, "addition_embed_type_num_heads": 8,
             # 6 micro-conditioning numbers * 8 + text_encoder_2 projection_dim 32
             "projection_class_embeddings_input_dim": 6 * 8 + 32},
}
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 2}
_TINY_SAMPLE_SIZE = 32  # latent; 256 px default, but any multiple of 8 (e.g. 64 px) works

_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    # The classes and settings the real families ship with.
    "sd15": ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}),
    "sd2": ("DDIMScheduler", {"prediction_type": "v_prediction", "clip_sample": False,
                              "set_alpha_to_one": False, "steps_offset": 1}),
    "sdxl": ("EulerDiscreteScheduler", {"steps_offset": 1, "timestep_spacing": "leading",
                                        "interpolation_type": "linear", "use_karras_sigmas": False}),
}


def tiny_unet_config(family: str) -> dict[str, Any]:
    """The real UNet config with small widths and shallow transformers, same module tree."""
    fam = canonical_family(family)
    cfg = real_unet_config(fam)
    cfg.update(copy.deepcopy(_TINY_UNET_OVERRIDES[fam]))
    cfg["norm_num_groups"] = 8
    cfg["sample_size"] = _TINY_SAMPLE_SIZE
    return cfg


def _tiny_text_configs(family: str, vocab_size: int, bos: int, eos: int) -> list[tuple[str, dict]]:
    out = []
    for cls, cfg in real_text_encoder_configs(family):
        cfg.update(_TINY_TEXT)
        cfg.update(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                   projection_dim=32)
        out.append((cls, cfg))
    return out


# Small English caption vocabulary the tiny BPE tokenizer learns its merges from, so common
# caption words become one or two tokens (as with the real CLIP vocabulary) and captions
# give short, realistic token sequences.
_WORDS = """
a an the and of in on with at to from by for is are this that it its as or over under near
photo photograph picture image painting drawing illustration portrait render art artwork style
sketch watercolor oil digital anime cartoon realistic detailed high quality best masterpiece
man woman person people girl boy child children baby face hair eyes smile hand hands body
dog dogs cat cats bird birds horse fish animal animals flower flowers tree trees grass forest
house building city street road car cars bike train boat ship water river lake sea ocean beach
mountain mountains sky cloud clouds sun moon star stars night day light dark shadow sunset
red green blue yellow white black orange purple pink brown gray grey gold silver color colors
small large big little tall old young new beautiful pretty cute happy sad standing sitting
walking running looking wearing holding playing background foreground close up view top side
front back left right center two three one many some table chair room window door wall floor
bed book books cup food plate bread fruit apple shirt dress hat glasses jacket shoes
field garden park snow rain winter summer spring autumn fire stone rock sand wood metal glass
toy robot castle bridge tower sign logo text letter word lokr adapter training sample
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (bytes that print map to themselves)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
            + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(words: Sequence[str], max_merges: int = 1000) -> list[tuple[str, str]]:
    """Greedy BPE on a word list: merge the most frequent adjacent pair until words are whole.

    Ties break on the pair itself, so the result (and thus token ids) is deterministic.
    """
    byte_char = _bytes_to_unicode()
    corpus = Counter()
    for w in words:
        chars = [byte_char[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        corpus[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for symbols, freq in corpus.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_corpus: Counter = Counter()
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_corpus[tuple(out)] += freq
        corpus = new_corpus
    return merges


@functools.cache
def _tokenizer_files(pad_token: str) -> dict[str, str]:
    base = list(_bytes_to_unicode().values())
    merges = _learn_merges(sorted(set(_WORDS)))
    tokens = base + [c + "</w>" for c in base]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
              "do_lower_case": True, "errors": "replace", "clean_up_tokenization_spaces": False,
              "add_prefix_space": False}
    return {
        "vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }


def write_tiny_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write a small CLIP BPE tokenizer (vocab.json, merges.txt, configs) into ``folder``.

    Same layout as the real CLIP files (256 byte characters, their ``</w>`` forms, merged
    symbols, then ``<|startoftext|>`` and ``<|endoftext|>`` as the two highest ids), so it
    loads with ``CLIPTokenizer.from_pretrained`` in both old (slow) and new transformers,
    and pooling at the highest id finds ``<|endoftext|>`` as with the real vocabulary.
    SDXL's second tokenizer pads with ``"!"``, hence ``pad_token``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for fname, text in _tokenizer_files(pad_token).items():
        (folder / fname).write_text(text, encoding="utf-8")
    return folder


def build_tiny_pipeline(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a small random Diffusers pipeline with the real family's module names.

    It exists so that training, export and loading can be exercised end to end on a CPU
    without any download. SD1.5 and SDXL use epsilon prediction; SD2 uses v-prediction
    (like the 768-v SD 2.1 it imitates). Weights depend only on ``seed``; the folder is a
    normal ``save_pretrained`` output (safetensors) that ``from_pretrained`` loads.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    fam = canonical_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dirs = {"tokenizer": "<|endoftext|>"}
    if fam == "sdxl":
        tok_dirs["tokenizer_2"] = "!"
    tokenizers = {}
    for name, pad in tok_dirs.items():
        write_tiny_tokenizer(out / name, pad_token=pad)
        tokenizers[name] = transformers.CLIPTokenizer.from_pretrained(str(out / name))
    tok = tokenizers["tokenizer"]
    bos, eos = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    vocab_size = len(tok.get_vocab())

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config(fam))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
            sample_size=8 * _TINY_SAMPLE_SIZE,
            scaling_factor=0.13025 if fam == "sdxl" else 0.18215,
            force_upcast=fam == "sdxl",
        )
        encoders = [_text_encoder(cls, cfg) for cls, cfg in _tiny_text_configs(fam, vocab_size, bos, eos)]
    sched_cls, sched_kwargs = _SCHEDULERS[fam]
    scheduler = getattr(diffusers, sched_cls)(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", **sched_kwargs)

    if fam == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
            tokenizer=tokenizers["tokenizer"], tokenizer_2=tokenizers["tokenizer_2"],
            unet=unet, scheduler=scheduler, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tok, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # save_pretrained of a fast tokenizer writes tokenizer.json only; put the vocab/merges
    # files back so older (slow) CLIPTokenizer versions load the folder too.
    for name, pad in tok_dirs.items():
        for fname in ("vocab.json", "merges.txt"):
            (out / name / fname).write_text(_tokenizer_files(pad)[fname], encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------
# Loading what the user names
# --------------------------------------------------------------------------------------

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value).lower() in _DTYPES:
        return _DTYPES[str(value).lower()]
    raise ConfigError(f"unknown torch_dtype {value!r}: expected one of {sorted(_DTYPES)} or a torch.dtype")


@contextlib.contextmanager
def _quiet_dtype_deprecation():
    """Recent diffusers renamed ``torch_dtype`` to ``dtype`` (with a warning); older ones only know the former."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def _single_file_family(path: str) -> str:
    """Family of an original (ldm/sgm) checkpoint from its key names, as the text towers differ."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    else:
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        keys = list(load_single_file_checkpoint(path).keys())
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    raise ModelError(
        f"cannot tell the model family of {path}: expected an SD1/SD2/SDXL checkpoint with "
        "cond_stage_model.* or conditioner.embedders.* keys; pass family= explicitly")


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if canonical_family(family) == "sdxl" else StableDiffusionPipeline


def load_pipeline(
    pretrained: str | os.PathLike,
    family: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    prediction_type: str = "auto",
):
    """Load a base model from a hub id, a Diffusers folder or a single ``.safetensors``/``.ckpt``.

    Every failure becomes a :class:`ModelError` naming the path and what was expected, so
    the CLI can print one line instead of a traceback from deep inside diffusers.
    ``family`` (``"auto"`` or an alias) picks SD vs SDXL pipeline classes and is checked
    against the loaded model; ``prediction_type`` other than ``"auto"`` overrides the
    scheduler's (e.g. v-prediction SD2 checkpoints whose files cannot say so).
    The SD1/2 safety checker is never loaded: a trainer has no use for it.
    """
    if family != "auto":
        family = canonical_family(family)
    if prediction_type != "auto" and prediction_type not in _PREDICTION_TYPES:
        raise ConfigError(f"unknown prediction_type {prediction_type!r}: expected auto or one of {_PREDICTION_TYPES}")
    dtype = _dtype(torch_dtype)
    name = os.fspath(pretrained)
    path = Path(name).expanduser()
    is_url = name.startswith(("http://", "https://"))

    if is_url or name.lower().endswith(_SINGLE_FILE_SUFFIXES):
        if not is_url and not path.is_file():
            raise ModelError(f"model file {name} does not exist (expected a .safetensors/.ckpt checkpoint)")
        pipe = _load_single_file(name if is_url else str(path), family, dtype, revision)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"{name} is not a Diffusers pipeline folder: expected a model_index.json in it "
                "(for a single checkpoint file pass the .safetensors/.ckpt path)")
        pipe = _load_diffusers(str(path), family, dtype, revision, variant)
    elif path.exists():
        raise ModelError(f"{name} is neither a folder nor a .safetensors/.ckpt file")
    elif _HUB_ID.match(name) and not name.startswith((".", "~")):
        pipe = _load_diffusers(name, family, dtype, revision, variant)
    else:
        raise ModelError(f"model path {name} does not exist (expected a Diffusers folder, a "
                         ".safetensors/.ckpt file or a Hugging Face hub id like owner/name)")

    if prediction_type != "auto" and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    found = pipeline_family(pipe)
    if family != "auto" and canonical_family(found) != family:
        raise ModelError(f"{name} is an {found} model, but family {family} was requested")
    return pipe


def _load_single_file(name: str, family: str, dtype: torch.dtype | None, revision: str | None):
    fam = family
    if fam == "auto":
        if name.startswith(("http://", "https://")):
            raise ModelError(f"cannot detect the family of remote file {name}; pass family=sd15|sd2|sdxl")
        try:
            fam = _single_file_family(name)
        except ModelError:
            raise
        except Exception as exc:  # unreadable header, truncated pickle, ...
            raise ModelError(f"cannot read checkpoint {name}: {exc}") from exc
    cls = _pipeline_class(fam)
    kwargs: dict[str, Any] = {}
    if fam != "sdxl":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    for key, value in (("revision", revision), ("torch_dtype", dtype)):
        if value is not None:
            kwargs[key] = value
    try:
        with _quiet_dtype_deprecation():
            return cls.from_single_file(name, **kwargs)
    except Exception as exc:
        raise ModelError(f"could not load {name} as a single-file {fam} checkpoint with "
                         f"{cls.__name__}.from_single_file (it needs the family's Diffusers configs "
                         f"from the hub or its cache): {exc}") from exc


def _load_diffusers(name: str, family: str, dtype: torch.dtype | None, revision: str | None,
                    variant: str | None):
    from diffusers import DiffusionPipeline

    where = "folder" if os.path.isdir(name) else "hub repository"
    try:
        index = DiffusionPipeline.load_config(name, revision=revision)
    except Exception as exc:
        raise ModelError(f"could not read model_index.json of {where} {name}: {exc}") from exc
    class_name = str(index.get("_class_name", ""))
    if family == "auto":
        if not class_name.startswith("StableDiffusion") or class_name.startswith("StableDiffusion3"):
            raise ModelError(f"{where} {name} holds a {class_name or 'unknown'} pipeline: expected a "
                             "Stable Diffusion 1.x/2.x/XL pipeline")
        family = "sdxl" if class_name.startswith("StableDiffusionXL") else "sd15"
    elif class_name.startswith("StableDiffusion") and class_name.startswith("StableDiffusionXL") != (family == "sdxl"):
        raise ModelError(f"{where} {name} holds a {class_name}, but family {family} was requested")
    cls = _pipeline_class(family)
    kwargs: dict[str, Any] = {}
    if family != "sdxl":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    for key, value in (("revision", revision), ("variant", variant), ("torch_dtype", dtype)):
        if value is not None:
            kwargs[key] = value
    try:
        with _quiet_dtype_deprecation():
            return cls.from_pretrained(name, **kwargs)
    except Exception as exc:
        raise ModelError(f"could not load {where} {name} with {cls.__name__}.from_pretrained: {exc}") from exc
