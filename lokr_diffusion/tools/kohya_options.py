"""The one table of kohya sd-scripts and LyCORIS options and where each lands in this project.

`import-kohya` (lokr_diffusion.tools.kohya) reads every option of a kohya setup through this table,
and docs/coming-from-kohya.md is generated from it, so the importer and the page cannot disagree.

Each `Rule` names a kohya option, where kohya reads it (`ARGS`: the training script's arguments or
`--config_file` TOML; `DATASET`: a dataset option, accepted both there and in `dataset_config.toml`;
`NETWORK`: one `key=value` of `network_args`), the key it becomes here (`section.key`; `data.*` keys go
into each `[[data.datasets]]` entry) and its status:

* MAPPED: same meaning;
* CHANGED: imported, but the meaning differs (the note says how);
* DROPPED: not imported (the note says why).

A converter turns kohya's value into this project's; it may return an `Outcome` to set several keys,
set none, or change the status for one particular value (an optimizer without a counterpart, say).
The importer writes a target only when the running config schema has it (`target_exists`), and
otherwise reports the option as dropped, naming the key it needs.
"""
from __future__ import annotations

import ast
import math
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigError

if TYPE_CHECKING:
    from .kohya import Importer

MAPPED, CHANGED, DROPPED = "mapped", "changed", "dropped"
ARGS, DATASET, NETWORK = "args", "dataset", "network_args"



@dataclass
class Outcome:
    """What one kohya value becomes: `values` maps `section.key` to a value (may be empty);
    `status` / `note` replace the rule's for this value."""

    values: dict[str, Any] = field(default_factory=dict)
    status: str | None = None
    note: str | None = None


Convert = Callable[[Any, "Importer"], Any]


@dataclass(frozen=True)
class Rule:
    option: str
    source: str
    target: str | None
    status: str
    note: str = ""
    convert: Convert | None = None


# -- value conversions: kohya values arrive as TOML values or as command-line strings -------------

def _fail(ctx: "Importer", value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{ctx.current}: expected {expected}, got {value!r}")


def as_bool(value: Any, ctx: "Importer") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off", ""):
        return False
    if isinstance(value, int):
        return bool(value)
    raise _fail(ctx, value, "true or false")


def as_int(value: Any, ctx: "Importer") -> int:
    if isinstance(value, bool):
        raise _fail(ctx, value, "an integer")
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(ctx, value, "an integer") from None
    if not math.isfinite(number) or number != int(number):
        raise _fail(ctx, value, "an integer")
    return int(number)


def as_float(value: Any, ctx: "Importer") -> float:
    if isinstance(value, bool):
        raise _fail(ctx, value, "a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(ctx, value, "a number") from None
    if not math.isfinite(number):
        raise _fail(ctx, value, "a finite number")
    return number


def as_str(value: Any, ctx: "Importer") -> str:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or isinstance(value, (list, tuple, dict)):
        raise _fail(ctx, value, "a string")
    return str(value)


def as_list(value: Any) -> list[Any]:
    """kohya's nargs="*" options: a TOML list, several command-line words, or one string."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return shlex.split(value)
    return [value]


def literal(text: str) -> Any:
    """A `key=value` value as kohya reads it (a Python literal where it parses: `0.9,0.99` is a
    pair), made TOML-writable (tuples become lists)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.strip().lower()
        return {"true": True, "false": False}.get(lowered, text)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, (bool, int, float, str)) or (
            isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)):
        return value
    return text


def parse_key_values(value: Any, ctx: "Importer") -> dict[str, str]:
    """`["algo=lokr", "factor=8"]` (or one string of them) -> {"algo": "lokr", "factor": "8"}."""
    out: dict[str, str] = {}
    for item in as_list(value):
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{ctx.current}: expected key=value items, got {item!r}")
        out[key.strip()] = text.strip()
    return out


def _const(value: Any) -> Convert:
    """A flag that sets a fixed value when true (and nothing when false)."""
    def convert(flag: Any, ctx: "Importer") -> Any:
        return value if as_bool(flag, ctx) else Outcome(note="false: nothing to set")
    return convert


def _positive_or_off(kind: Callable[[Any, "Importer"], Any]) -> Convert:
    """kohya's "None or 0 turns it off" options."""
    def convert(value: Any, ctx: "Importer") -> Any:
        number = kind(value, ctx)
        return number if number else Outcome(note="0: off, as by default")
    return convert


# -- converters with more to say ------------------------------------------------------------------

def _path(value: Any, ctx: "Importer") -> Any:
    return ctx.path(as_str(value, ctx))


def _model(value: Any, ctx: "Importer") -> Any:
    return ctx.model_path(as_str(value, ctx))


def _resolution(value: Any, ctx: "Importer") -> Any:
    """kohya: 512, "512", "512,768" (width,height) or [512, 768]."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        value = parts if len(parts) == 2 else (parts[0] if parts else value)
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise _fail(ctx, value, "a size or width,height")
        return [as_int(v, ctx) for v in value]
    return as_int(value, ctx)


def _v2(value: Any, ctx: "Importer") -> Any:
    if not as_bool(value, ctx):
        return Outcome(note="false: nothing to set")
    return Outcome(note=f"picks the family: `model.family = \"{ctx.family}\"`")


def _v_parameterization(value: Any, ctx: "Importer") -> Any:
    if not as_bool(value, ctx):
        return Outcome(note="false: `prediction_type` stays `auto` (read from the model's scheduler)")
    return "v_prediction"


def _fp8(value: Any, ctx: "Importer") -> Any:
    return "fp8" if as_bool(value, ctx) else Outcome(note="false: nothing to set")


def _train_unet_only(value: Any, ctx: "Importer") -> Any:
    return Outcome({"network.train_text_encoder": not as_bool(value, ctx)})


def _train_te_only(value: Any, ctx: "Importer") -> Any:
    if not as_bool(value, ctx):
        return Outcome(note="false: nothing to set")
    return Outcome({"network.train_unet": False, "network.train_text_encoder": True})


def _max_train_steps(value: Any, ctx: "Importer") -> Any:
    if "max_train_epochs" in ctx.args:
        return Outcome(status=DROPPED, note="kohya's max_train_epochs overrides it; `train.epochs` is set instead "
                                            "(here, with both set, whichever ends first would stop the run)")
    return as_int(value, ctx)


def _unet_lr(value: Any, ctx: "Importer") -> Any:
    lr = as_float(value, ctx)
    if lr == 0:
        return Outcome({"network.train_unet": False}, CHANGED, "0: the UNet gets no adapters (`train_unet = false`)")
    return lr


def _text_encoder_lr(value: Any, ctx: "Importer") -> Any:
    rates = [as_float(v, ctx) for v in as_list(value)]
    if not rates:
        return Outcome(note="empty: `learning_rate` applies, as in kohya")
    if all(r == 0 for r in rates):
        return Outcome({"network.train_text_encoder": False}, CHANGED,
                       "0: the text encoders get no adapters (`train_text_encoder = false`)")
    if len(set(rates)) > 1:
        return Outcome({"train.text_encoder_lr": rates[0]}, CHANGED,
                       f"one rate per text encoder ({rates}) is one rate here: the first, {rates[0]}")
    return rates[0]


# kohya optimizer_type (lower case) -> (optimizer here, status, note)
_OPTIMIZERS = {
    "adamw": ("adamw", MAPPED, ""),
    "adamw8bit": ("adamw8bit", MAPPED, ""),
    "pagedadamw8bit": ("adamw8bit", CHANGED, "the paged variant is not used: plain 8-bit AdamW"),
    "pagedadamw": ("adamw", CHANGED, "the paged variant is not used: AdamW"),
    "pagedadamw32bit": ("adamw", CHANGED, "the paged variant is not used: AdamW"),
    "prodigy": ("prodigy", MAPPED, ""),
    "adafactor": ("adafactor", MAPPED, ""),
    "transformers.optimization.adafactor": ("adafactor", MAPPED, ""),
    "sgdnesterov": ("sgd", CHANGED, "plain SGD: no Nesterov momentum"),
    "sgdnesterov8bit": ("sgd", CHANGED, "plain fp32 SGD: no Nesterov momentum, no 8-bit state"),
}
for _name in ("dadaptation", "dadaptadam", "dadaptadampreprint", "dadaptadagrad", "dadaptadan", "dadaptadanip",
              "dadaptlion", "dadaptsgd"):
    _OPTIMIZERS[_name] = ("prodigy", CHANGED, "D-Adaptation is not available; Prodigy, its successor by the same "
                                              "authors, also finds the step size itself (keep learning_rate = 1.0)")


def _optimizer(value: Any, ctx: "Importer") -> Any:
    name = as_str(value, ctx)
    if not name:
        return Outcome(note="empty: AdamW, kohya's default and this project's")
    known = _OPTIMIZERS.get(name.lower())
    if known is None:
        return Outcome(status=DROPPED, note=f"{name!r} has no counterpart here (adamw, adamw8bit, prodigy, "
                                            "adafactor, sgd); the run uses AdamW: check learning_rate and "
                                            "optimizer_args for it")
    optimizer, status, note = known
    return Outcome({"train.optimizer": optimizer}, status, note or None)


def _use_8bit_adam(value: Any, ctx: "Importer") -> Any:
    if "optimizer_type" in ctx.args:
        return Outcome(status=DROPPED, note="optimizer_type is set and wins, as in kohya")
    return "adamw8bit" if as_bool(value, ctx) else Outcome(note="false: nothing to set")


def _optimizer_args(value: Any, ctx: "Importer") -> Any:
    """weight_decay becomes `train.weight_decay`; the rest go to `train.optimizer_args`."""
    items = {k: literal(v) for k, v in parse_key_values(value, ctx).items()}
    values: dict[str, Any] = {}
    if "weight_decay" in items:
        values["train.weight_decay"] = as_float(items.pop("weight_decay"), ctx)
    if items:
        values["train.optimizer_args"] = items
    return Outcome(values)


_SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant_with_warmup", "linear": "linear",
               "cosine": "cosine", "cosine_with_restarts": "cosine_with_restarts", "polynomial": "polynomial"}


def _lr_scheduler(value: Any, ctx: "Importer") -> Any:
    name = as_str(value, ctx).lower()
    if name in _SCHEDULERS:
        return _SCHEDULERS[name]
    if name == "cosine_with_min_lr":
        return Outcome({"train.lr_scheduler": "cosine"}, CHANGED, "cosine down to 0 (no minimum learning rate)")
    if name == "adafactor":
        return Outcome(status=DROPPED, note="Adafactor's own schedule is not used; the run uses a constant rate")
    return Outcome(status=DROPPED, note=f"{name!r} is not available (constant, constant_with_warmup, linear, "
                                        "cosine, cosine_with_restarts, polynomial); the run uses a constant rate")


def _lr_warmup_steps(value: Any, ctx: "Importer") -> Any:
    """kohya: an int is steps, a float below 1 a share of the training steps."""
    number = as_float(value, ctx)
    if number >= 1 or number == 0:
        return int(number)
    steps = ctx.args.get("max_train_steps")
    if steps is None or "max_train_epochs" in ctx.args:
        return Outcome(status=DROPPED, note=f"{number} is a share of the training steps, which are not known here "
                                            "(epochs); set `train.lr_warmup_steps` yourself")
    warmup = round(number * as_int(steps, ctx))
    return Outcome({"train.lr_warmup_steps": warmup}, CHANGED,
                   f"a share of max_train_steps ({number}) written as steps: {warmup}")


def _dynamo_backend(value: Any, ctx: "Importer") -> Any:
    name = as_str(value, ctx).lower()
    if name in ("inductor", "aot_eager", "eager"):
        return name
    return Outcome(status=DROPPED, note=f"{name!r}: only inductor, aot_eager and eager are available")


def _save_precision(value: Any, ctx: "Importer") -> Any:
    name = as_str(value, ctx).lower()
    dtype = {"float": "fp32", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(name)
    if dtype is None:
        raise _fail(ctx, value, "float, fp16 or bf16")
    return dtype


def _save_model_as(value: Any, ctx: "Importer") -> Any:
    if as_str(value, ctx).lower() == "safetensors":
        return Outcome(note="adapters are always .safetensors files here")
    return Outcome(status=DROPPED, note="adapters are always written as .safetensors (LyCORIS layout)")


def _save_last_n_steps(value: Any, ctx: "Importer") -> Any:
    window = as_int(value, ctx)
    every = ctx.args.get("save_every_n_steps")
    if every is None:
        return Outcome(status=DROPPED, note="a number of steps, meaningful with save_every_n_steps, which is not set")
    keep = max(1, math.ceil(window / as_int(every, ctx)))
    return Outcome({"output.keep_last": keep}, CHANGED,
                   f"kohya keeps the saves of the last {window} steps; here a count of saves: {keep}")


def _sample_prompts(value: Any, ctx: "Importer") -> Any:
    return ctx.sample_prompts(as_str(value, ctx))


def _sample_every(value: Any, ctx: "Importer") -> Any:
    if "sample_prompts" not in ctx.args:
        return Outcome(status=DROPPED, note="no sample_prompts: nothing to sample")
    return as_int(value, ctx)


def _log_with(value: Any, ctx: "Importer") -> Any:
    name = as_str(value, ctx).lower()
    if name in ("tensorboard", "all"):
        note = None if name == "tensorboard" else "wandb is not imported: TensorBoard only"
        return Outcome({"logging.tensorboard": True}, CHANGED if note else None, note)
    return Outcome(status=DROPPED, note=f"{name!r}: only TensorBoard logging is imported")


def _cache_latents(mode: str) -> Convert:
    def convert(value: Any, ctx: "Importer") -> Any:
        if not as_bool(value, ctx):
            return Outcome(note="false: nothing to set")
        if mode == "memory" and as_bool(ctx.args.get("cache_latents_to_disk", False), ctx):
            return Outcome(note="cache_latents_to_disk wins: `cache_latents = \"disk\"`")
        return mode
    return convert


def _flow(value: Any, ctx: "Importer") -> Any:
    """The flow-matching timestep options are read together (see Importer.flow_options)."""
    return ctx.flow_option()


def _train_data_dir(value: Any, ctx: "Importer") -> Any:
    return ctx.add_folder_dataset(as_str(value, ctx), is_reg=False)


def _reg_data_dir(value: Any, ctx: "Importer") -> Any:
    return ctx.add_folder_dataset(as_str(value, ctx), is_reg=True)


def _dataset_config(value: Any, ctx: "Importer") -> Any:
    return ctx.dataset_config_option(as_str(value, ctx))


def _network_module(value: Any, ctx: "Importer") -> Any:
    return ctx.network_module_option(as_str(value, ctx))


def _network_args(value: Any, ctx: "Importer") -> Any:
    return ctx.network_args_option(value)


def _algo(value: Any, ctx: "Importer") -> Any:
    name = as_str(value, ctx).lower()
    if name in ("lora", "locon"):
        return "lora"
    if name in ("lokr", "loha"):
        return name
    raise ConfigError(f"{ctx.current}: algo={name!r} cannot be imported: this project trains lokr, loha and lora "
                      "(locon) only")


_PRESETS = {
    "full": ({"network.preset": "full"}, MAPPED, "k x k convs train with conv_dim (LyCORIS: = network_dim unless given)"),
    "full-lin": ({"network.preset": "full"}, MAPPED, "`full` without conv_dim: k x k convs are left out"),
    "attn-mlp": ({"network.preset": "attn-mlp"}, MAPPED, None),
    "attn-only": ({"network.preset": "attn-only"}, MAPPED, None),
    "unet-transformer-only": ({"network.preset": "attn-mlp", "network.train_text_encoder": False}, MAPPED,
                              "`attn-mlp` with `train_text_encoder = false`"),
}


def _preset(value: Any, ctx: "Importer") -> Any:
    name = as_str(value, ctx)
    if name in _PRESETS:
        values, status, note = _PRESETS[name]
        return Outcome(dict(values), status, note)
    return Outcome({"network.preset": "full"}, CHANGED,
                   f"{name!r}: LyCORIS preset files and this preset choose modules by class name; the run uses "
                   "`full` (narrow it with `network.include` / `network.exclude` globs)")


def _tucker(value: Any, ctx: "Importer") -> Any:
    enabled = as_bool(value, ctx)
    if ctx.current_option == "disable_conv_cp":
        enabled = not enabled
    return Outcome({"network.use_tucker": enabled})


def _train_t5xxl(value: Any, ctx: "Importer") -> Any:
    if not as_bool(value, ctx):
        return Outcome(note="false: nothing to set")
    return Outcome({"network.text_encoders": ["te1", "te2"]}, note="Flux: CLIP-L and T5-XXL get adapters")


def _dataset_batch_size(value: Any, ctx: "Importer") -> Any:
    return ctx.dataset_batch_size(as_int(value, ctx))


def _image_dir(value: Any, ctx: "Importer") -> Any:
    return ctx.path(as_str(value, ctx))


def _caption_extension(value: Any, ctx: "Importer") -> Any:
    ext = as_str(value, ctx)
    return ext if not ext or ext.startswith(".") else "." + ext


def _keep_tokens(value: Any, ctx: "Importer") -> Any:
    count = as_int(value, ctx)
    if count and ctx.uses("caption_prefix"):
        return Outcome({"data.keep_tokens": count}, CHANGED,
                       "counts the caption's own tags: caption_prefix is added after shuffling here (kohya "
                       "shuffles it with the caption, so its tags count)")
    return count


# -- the table ------------------------------------------------------------------------------------

_B, _I, _F, _S = as_bool, as_int, as_float, as_str
_FLOW = ("Flux.1 / SD3: read together with the other timestep options (see \"Flow matching\" in "
         "docs/coming-from-kohya.md)")


def _drop(option: str, note: str, source: str = ARGS) -> Rule:
    return Rule(option, source, None, DROPPED, note)


def _map(option: str, target: str, convert: Convert, source: str = ARGS, note: str = "") -> Rule:
    return Rule(option, source, target, MAPPED, note, convert)


def _changed(option: str, target: str, convert: Convert, note: str, source: str = ARGS) -> Rule:
    return Rule(option, source, target, CHANGED, note, convert)


_NOT_HERE = "not a setting here"
_ACCELERATE = "set it with `accelerate config` / `accelerate launch` options"
_MODEL_PARTS = ("the model's parts come from `model.pretrained_model` (a Diffusers folder or single-file "
                "checkpoint); put a different one into the Diffusers folder")
_HUB = "uploading to the Hugging Face Hub is not part of training here"
_NO_STATE = "every save writes the resumable state too (`checkpoints/step-N/`), kept by `output.keep_last`"

RULES: tuple[Rule, ...] = (
    # the model
    _map("pretrained_model_name_or_path", "model.pretrained_model", _model,
         note="a relative path is made absolute (kohya reads it from the folder it runs in)"),
    _map("v2", "model.family", _v2),
    _map("v_parameterization", "model.prediction_type", _v_parameterization),
    _drop("vae", _MODEL_PARTS),
    _drop("clip_l", _MODEL_PARTS), _drop("clip_g", _MODEL_PARTS), _drop("t5xxl", _MODEL_PARTS), _drop("ae", _MODEL_PARTS),
    _drop("model_type", "Flux.1 only (kohya also trains Chroma)"),
    _changed("fp8_base", "model.base_dtype", _fp8, "fp8 weights here carry a float32 scale per row"),
    _changed("fp8_base_unet", "model.base_dtype", _fp8, "fp8 weights here carry a float32 scale per row"),
    _drop("tokenizer_cache_dir", "tokenizers load from the model folder"),
    _drop("lowram", _NOT_HERE), _drop("highvram", _NOT_HERE), _drop("disable_mmap_load_safetensors", _NOT_HERE),
    _drop("no_half_vae", "the VAE runs in the training dtype"),
    _drop("mem_eff_attn", "PyTorch's memory-efficient attention is the default here"),
    _drop("sdpa", "PyTorch's scaled-dot-product attention is the default here"),
    _map("xformers", "train.xformers", _B),
    # the network
    _map("network_module", "network.algo", _network_module,
         note="lycoris.kohya: `algo` from network_args; networks.lora(_flux, _sd3): LoRA"),
    _map("network_dim", "network.dim", _I, note="kohya's default is 4"),
    _map("network_alpha", "network.alpha", _F, note="kohya's default is 1 (here alpha defaults to dim): written"),
    _map("network_args", "network", _network_args, note="each key=value is reported on its own"),
    _drop("network_dropout", "no neuron dropout here (`network.rank_dropout` and `module_dropout` are)"),
    _map("network_weights", "network.init_from", _path, note="start from these adapter weights"),
    _drop("dim_from_weights", "dim is taken from the config"),
    _map("network_train_unet_only", "network.train_text_encoder", _train_unet_only),
    _map("network_train_text_encoder_only", "network.train_unet", _train_te_only),
    _drop("scale_weight_norms", "max-norm regularisation is not implemented"),
    _drop("base_weights", "bake them into the base first: `lokr-diffusion merge`"),
    _drop("base_weights_multiplier", "bake them into the base first: `lokr-diffusion merge`"),
    _drop("training_comment", "not written into the file's metadata here"),
    _drop("no_metadata", "the training metadata is always written"),
    # how long, how fast
    _map("max_train_steps", "train.max_steps", _max_train_steps, note="kohya's default is 1600"),
    _map("max_train_epochs", "train.epochs", _I,
         note="overrides max_train_steps, which is then not written (here, with both, whichever ends first)"),
    _map("train_batch_size", "train.batch_size", _I),
    _map("gradient_accumulation_steps", "train.gradient_accumulation_steps", _I),
    _map("gradient_checkpointing", "train.gradient_checkpointing", _B),
    _map("max_grad_norm", "train.max_grad_norm", _F),
    _map("learning_rate", "train.learning_rate", _F, note="kohya's default is 2e-6"),
    _map("unet_lr", "train.unet_lr", _unet_lr),
    _map("text_encoder_lr", "train.text_encoder_lr", _text_encoder_lr),
    _map("optimizer_type", "train.optimizer", _optimizer),
    _map("use_8bit_adam", "train.optimizer", _use_8bit_adam),
    _drop("use_lion_optimizer", "Lion is not available"),
    _map("optimizer_args", "train.optimizer_args", _optimizer_args,
         note="`weight_decay` goes to `train.weight_decay`, the rest to the `optimizer_args` table"),
    _drop("optimizer_schedulefree_wrapper", "schedule-free optimizers are not available"),
    _drop("schedulefree_wrapper_args", "schedule-free optimizers are not available"),
    _drop("fused_backward_pass", "only the adapters train; their optimizer step is small"),
    _map("lr_scheduler", "train.lr_scheduler", _lr_scheduler),
    _drop("lr_scheduler_type", "custom scheduler classes are not loaded"),
    _drop("lr_scheduler_args", "custom scheduler arguments are not passed"),
    _map("lr_warmup_steps", "train.lr_warmup_steps", _lr_warmup_steps),
    _drop("lr_decay_steps", "the warmup-stable-decay schedule is not available"),
    _map("lr_scheduler_num_cycles", "train.lr_scheduler_num_cycles", _I),
    _map("lr_scheduler_power", "train.lr_scheduler_power", _F),
    _drop("lr_scheduler_timescale", "the inverse-sqrt schedule is not available"),
    _drop("lr_scheduler_min_lr_ratio", "no minimum learning rate"),
    _map("mixed_precision", "train.mixed_precision", _S),
    _drop("full_fp16", "adapter weights and gradients stay fp32 here"),
    _drop("full_bf16", "adapter weights and gradients stay fp32 here"),
    _map("seed", "train.seed", _I, note="kohya draws a random seed when none is given; here the default is 42"),
    _map("torch_compile", "train.compile", _B),
    _map("dynamo_backend", "train.compile_backend", _dynamo_backend),
    _map("max_data_loader_n_workers", "train.num_workers", _I),
    _drop("persistent_data_loader_workers", _NOT_HERE),
    _drop("ddp_timeout", _ACCELERATE), _drop("ddp_gradient_as_bucket_view", _ACCELERATE),
    _drop("ddp_static_graph", _ACCELERATE), _drop("deepspeed", _ACCELERATE), _drop("zero_stage", _ACCELERATE),
    _drop("blocks_to_swap", "block swapping is not implemented (see `model.base_dtype` for memory)"),
    _drop("cpu_offload_checkpointing", "not implemented (see `model.base_dtype` for memory)"),
    _drop("split_mode", "not implemented (see `model.base_dtype` for memory)"),
    # the loss
    _map("noise_offset", "train.noise_offset", _positive_or_off(_F)),
    _drop("noise_offset_random_strength", "the offset is fixed"),
    _drop("adaptive_noise_scale", "not implemented"),
    _map("multires_noise_iterations", "train.multires_noise_iterations", _I),
    _map("multires_noise_discount", "train.multires_noise_discount", _F),
    _map("ip_noise_gamma", "train.ip_noise_gamma", _positive_or_off(_F)),
    _drop("ip_noise_gamma_random_strength", "the strength is fixed"),
    _map("min_snr_gamma", "train.min_snr_gamma", _positive_or_off(_F)),
    _map("zero_terminal_snr", "train.zero_terminal_snr", _B),
    _map("min_timestep", "train.min_timestep", _I),
    _map("max_timestep", "train.max_timestep", _I),
    _map("loss_type", "train.loss_type", _S),
    _map("huber_c", "train.huber_c", _F),
    _map("huber_schedule", "train.huber_schedule", _S),
    _drop("huber_scale", "not implemented"),
    _drop("scale_v_pred_loss_like_noise_pred", "not implemented"),
    _drop("v_pred_like_loss", "not implemented"),
    _drop("debiased_estimation_loss", "not implemented"),
    _map("prior_loss_weight", "train.prior_loss_weight", _F),
    _map("masked_loss", "train.masked_loss", _B),
    _map("clip_skip", "train.clip_skip", _I),
    _drop("max_token_length", "prompts are read up to the text encoder's length (CLIP: 75 tokens)"),
    _drop("weighted_captions", "captions are read as written"),
    # flow matching (Flux.1, SD3)
    _map("guidance_scale", "train.guidance", _F),
    _changed("timestep_sampling", "train.timestep_sampling", _flow, _FLOW),
    _changed("sigmoid_scale", "train.logit_std", _flow, _FLOW),
    _changed("discrete_flow_shift", "train.shift", _flow, _FLOW),
    _changed("weighting_scheme", "train.timestep_sampling", _flow, _FLOW),
    _changed("training_shift", "train.shift", _flow, _FLOW),
    _map("logit_mean", "train.logit_mean", _F),
    _map("logit_std", "train.logit_std", _F),
    _map("mode_scale", "train.mode_scale", _F),
    _changed("model_prediction_type", "train.loss_weighting", _flow, _FLOW),
    _drop("t5xxl_max_token_length", "the family's T5 length is used (Flux.1: 512)"),
    _drop("apply_t5_attn_mask", "not implemented"), _drop("apply_lg_attn_mask", "not implemented"),
    _drop("t5xxl_device", _NOT_HERE), _drop("t5xxl_dtype", _NOT_HERE),
    _drop("save_clip", _NOT_HERE), _drop("save_t5xxl", _NOT_HERE),
    _drop("clip_l_dropout_rate", "not implemented"), _drop("clip_g_dropout_rate", "not implemented"),
    _drop("t5_dropout_rate", "not implemented"),
    _drop("pos_emb_random_crop_rate", "not implemented"), _drop("enable_scaled_pos_embed", "not implemented"),
    _drop("controlnet_model_name_or_path", "ControlNet training is not part of this project"),
    # caching
    _map("cache_latents", "data.cache_latents", _cache_latents("memory")),
    _map("cache_latents_to_disk", "data.cache_latents", _cache_latents("disk"),
         note="the cache goes to `<output>/cache` (`cache_dir`), not next to the images"),
    _drop("vae_batch_size", _NOT_HERE),
    _drop("cache_text_encoder_outputs", "prompt embeddings are cached automatically when the text side does not "
                                        "train"),
    _drop("cache_text_encoder_outputs_to_disk", "prompt embeddings are cached automatically when the text side "
                                                "does not train"),
    _drop("text_encoder_batch_size", _NOT_HERE), _drop("skip_cache_check", _NOT_HERE),
    # saving
    _map("output_dir", "output.dir", _path),
    _map("output_name", "output.name", _S),
    _map("save_precision", "output.save_dtype", _save_precision,
         note="kohya saves in the training dtype (fp32) when not given: written"),
    Rule("save_model_as", ARGS, None, MAPPED, "", _save_model_as),
    _drop("use_safetensors", "adapters are always .safetensors files here"),
    _map("save_every_n_steps", "output.save_every_steps", _I),
    _map("save_every_n_epochs", "output.save_every_epochs", _I),
    _map("save_last_n_epochs", "output.keep_last", _I),
    _map("save_last_n_steps", "output.keep_last", _save_last_n_steps),
    _drop("save_state", _NO_STATE), _drop("save_state_on_train_end", _NO_STATE),
    _drop("save_last_n_epochs_state", _NO_STATE), _drop("save_last_n_steps_state", _NO_STATE),
    _drop("save_n_epoch_ratio", "use `output.save_every_epochs`"),
    _drop("resume", "kohya state folders cannot be resumed here; to start from a kohya adapter use network_weights"),
    _drop("initial_epoch", _NOT_HERE), _drop("initial_step", _NOT_HERE),
    _drop("skip_until_initial_step", _NOT_HERE),
    _drop("huggingface_repo_id", _HUB), _drop("huggingface_repo_type", _HUB),
    _drop("huggingface_path_in_repo", _HUB), _drop("huggingface_token", _HUB),
    _drop("huggingface_repo_visibility", _HUB), _drop("save_state_to_huggingface", _HUB),
    _drop("resume_from_huggingface", _HUB), _drop("async_upload", _HUB),
    # samples, logs, validation
    _map("sample_prompts", "sample.prompt_file", _sample_prompts),
    _map("sample_every_n_steps", "sample.every_steps", _sample_every),
    _drop("sample_every_n_epochs", "samples are made every N steps (`sample.every_steps`)"),
    _drop("sample_at_first", "samples are made every N steps and at the end"),
    _drop("sample_sampler", "samples use the model's own scheduler"),
    _drop("sample_batch_size", _NOT_HERE),
    _drop("logging_dir", "logs go to `<output>/logs`"),
    _map("log_with", "logging.tensorboard", _log_with),
    _drop("log_prefix", _NOT_HERE), _drop("log_tracker_name", _NOT_HERE), _drop("wandb_run_name", _NOT_HERE),
    _drop("log_tracker_config", _NOT_HERE), _drop("log_config", "the resolved config is always saved as config.json"),
    _drop("wandb_api_key", "a secret: never copied into a config file"),
    _drop("console_log_level", _NOT_HERE), _drop("console_log_file", _NOT_HERE),
    _drop("console_log_simple", _NOT_HERE),
    _map("validation_split", "validation.split", _F, source=DATASET),
    _map("validation_seed", "validation.seed", _I, source=DATASET),
    _map("validate_every_n_steps", "validation.every_steps", _I),
    _drop("validate_every_n_epochs", "validation runs every N steps"),
    _drop("max_validation_steps", "the whole validation set is scored"),
    # where the data is (without dataset_config)
    _map("train_data_dir", "data.dir", _train_data_dir,
         note="one `[[data.datasets]]`; its `<N>_<name>` subfolders repeat N times with class token `name`, "
              "as in kohya"),
    _map("reg_data_dir", "data.dir", _reg_data_dir, note="one `[[data.datasets]]` with `is_reg = true`"),
    _map("dataset_config", "data", _dataset_config, note="each subset becomes one `[[data.datasets]]`"),
    _drop("in_json", "kohya's JSON metadata is not read: use caption files or a metadata.jsonl (`file_name`, "
                     "`text`)"),
    _drop("dataset_repeats", "kohya uses it with in_json only; use `repeats` or `<N>_<name>` folders"),
    _drop("dataset_class", "custom dataset classes are not loaded"),
    _drop("debug_dataset", _NOT_HERE),
    Rule("config_file", ARGS, None, MAPPED, "read: its options are reported one by one"),
    _drop("output_config", _NOT_HERE),
    # dataset options (dataset_config.toml; most are also command-line options)
    _map("batch_size", "train.batch_size", _dataset_batch_size, source=DATASET,
         note="one batch size for the run (kohya: per dataset)"),
    _map("image_dir", "data.dir", _image_dir, source=DATASET,
         note="`<N>_<name>` subfolders of it are read as repeat folders here; kohya reads only the images in it"),
    _drop("metadata_file", "kohya's JSON metadata is not read: use caption files or a metadata.jsonl "
                           "(`file_name`, `text`)", source=DATASET),
    _map("class_tokens", "data.class_token", _S, source=DATASET),
    _map("is_reg", "data.is_reg", _B, source=DATASET),
    _map("num_repeats", "data.repeats", _I, source=DATASET),
    _map("caption_extension", "data.caption_extension", _caption_extension, source=DATASET,
         note="kohya's default is .caption; here the other of .txt / .caption is read too when the first is missing"),
    _map("caption_extention", "data.caption_extension", _caption_extension, source=DATASET,
         note="kohya's old spelling"),
    _map("shuffle_caption", "data.shuffle_caption", _B, source=DATASET),
    _map("keep_tokens", "data.keep_tokens", _keep_tokens, source=DATASET,
         note="with caption_prefix: counts the caption's own tags only (kohya counts the prefix's tags too)"),
    _changed("caption_prefix", "data.caption_prefix", _S,
             "added verbatim after shuffling and tag dropout (kohya shuffles it with the caption)", source=DATASET),
    _changed("caption_suffix", "data.caption_suffix", _S,
             "added verbatim after shuffling and tag dropout (kohya shuffles it with the caption)", source=DATASET),
    _map("caption_dropout_rate", "data.caption_dropout", _F, source=DATASET),
    _map("caption_tag_dropout_rate", "data.tag_dropout", _F, source=DATASET),
    _drop("caption_dropout_every_n_epochs", "not implemented", source=DATASET),
    _drop("caption_separator", "tags are separated by commas", source=DATASET),
    _drop("keep_tokens_separator", "use keep_tokens", source=DATASET),
    _drop("secondary_separator", "not implemented", source=DATASET),
    _drop("enable_wildcard", "captions are read as written", source=DATASET),
    _drop("token_warmup_min", "not implemented", source=DATASET),
    _drop("token_warmup_step", "not implemented", source=DATASET),
    _map("flip_aug", "data.flip", _B, source=DATASET),
    _map("random_crop", "data.random_crop", _B, source=DATASET),
    _drop("color_aug", "not implemented", source=DATASET),
    _drop("face_crop_aug_range", "not implemented", source=DATASET),
    _drop("resize_interpolation", "images are resized with Lanczos", source=DATASET),
    _map("resolution", "data.resolution", _resolution, source=DATASET, note="\"W,H\" becomes [W, H]"),
    _map("enable_bucket", "data.enable_bucket", _B, source=DATASET,
         note="kohya's default is off (here on): written"),
    _map("min_bucket_reso", "data.min_bucket_reso", _I, source=DATASET),
    _map("max_bucket_reso", "data.max_bucket_reso", _I, source=DATASET),
    _map("bucket_reso_steps", "data.bucket_step", _I, source=DATASET),
    _map("bucket_no_upscale", "data.bucket_no_upscale", _B, source=DATASET),
    _drop("cache_info", "image sizes are read on every scan here (headers only)", source=DATASET),
    _map("alpha_mask", "train.masked_loss", _B, source=DATASET,
         note="the alpha channel as the loss mask"),
    _drop("conditioning_data_dir", "mask folders: see masked loss in the config reference", source=DATASET),
    _drop("network_multiplier", _NOT_HERE, source=DATASET),
    # LyCORIS and kohya network_args
    _map("algo", "network.algo", _algo, source=NETWORK, note="lora and locon are both `lora`"),
    _map("preset", "network.preset", _preset, source=NETWORK, note="LyCORIS's default is `full`"),
    _map("conv_dim", "network.conv_dim", _I, source=NETWORK),
    _map("conv_alpha", "network.conv_alpha", _F, source=NETWORK),
    _map("factor", "network.factor", _I, source=NETWORK),
    _map("decompose_both", "network.decompose_both", _B, source=NETWORK),
    _map("full_matrix", "network.full_matrix", _B, source=NETWORK),
    _map("rank_dropout", "network.rank_dropout", _F, source=NETWORK),
    _map("module_dropout", "network.module_dropout", _F, source=NETWORK),
    _map("rank_dropout_scale", "network.rank_dropout_scale", _B, source=NETWORK),
    _map("use_tucker", "network.use_tucker", _tucker, source=NETWORK),
    _map("use_cp", "network.use_tucker", _tucker, source=NETWORK, note="LyCORIS's old name of use_tucker"),
    _map("use_conv_cp", "network.use_tucker", _tucker, source=NETWORK, note="LyCORIS's old name of use_tucker"),
    _map("disable_conv_cp", "network.use_tucker", _tucker, source=NETWORK, note="the negation of use_tucker"),
    _map("use_scalar", "network.use_scalar", _B, source=NETWORK),
    _map("dora_wd", "network.weight_decompose", _B, source=NETWORK),
    _drop("wd_on_output", "DoRA's norm is taken the one way this project implements", source=NETWORK),
    _map("rs_lora", "network.rs_lora", _B, source=NETWORK),
    _map("unbalanced_factorization", "network.unbalanced_factorization", _B, source=NETWORK),
    _drop("bypass_mode", "each layer picks bypass (apply the factors) or a formed update by a cost model; the "
                         "result is the same", source=NETWORK),
    _drop("dropout", "no neuron dropout here (rank_dropout and module_dropout are)", source=NETWORK),
    _map("train_t5xxl", "network.text_encoders", _train_t5xxl, source=NETWORK),
    _drop("train_norm", "normalisation layers do not train here", source=NETWORK),
    _drop("block_size", "DyLoRA is not available", source=NETWORK),
    _drop("constraint", "OFT is not available", source=NETWORK),
    _drop("rescaled", "OFT is not available", source=NETWORK),
    _drop("loraplus_lr_ratio", "LoRA+ is not implemented", source=NETWORK),
    _drop("loraplus_unet_lr_ratio", "LoRA+ is not implemented", source=NETWORK),
    _drop("loraplus_text_encoder_lr_ratio", "LoRA+ is not implemented", source=NETWORK),
    _drop("down_lr_weight", "block-wise learning rates are not implemented", source=NETWORK),
    _drop("mid_lr_weight", "block-wise learning rates are not implemented", source=NETWORK),
    _drop("up_lr_weight", "block-wise learning rates are not implemented", source=NETWORK),
    _drop("block_lr_zero_threshold", "block-wise learning rates are not implemented", source=NETWORK),
    _drop("block_dims", "block-wise ranks are not imported (per-module settings are)", source=NETWORK),
    _drop("block_alphas", "block-wise ranks are not imported (per-module settings are)", source=NETWORK),
    _drop("conv_block_dims", "block-wise ranks are not imported (per-module settings are)", source=NETWORK),
    _drop("conv_block_alphas", "block-wise ranks are not imported (per-module settings are)", source=NETWORK),
    _drop("exclude_patterns", "regular expressions are not converted: write `network.exclude` globs", source=NETWORK),
    _drop("include_patterns", "regular expressions are not converted: write `network.include` globs", source=NETWORK),
    _drop("train_blocks", "write `network.include` / `network.exclude` globs", source=NETWORK),
    _drop("train_double_block_indices", "write `network.include` / `network.exclude` globs", source=NETWORK),
    _drop("train_single_block_indices", "write `network.include` / `network.exclude` globs", source=NETWORK),
    _drop("split_qkv", "Diffusers' Flux.1 has separate q, k and v layers already", source=NETWORK),
    _drop("verbose", _NOT_HERE, source=NETWORK),
)

# kohya's defaults that differ from this project's and change the training: written when the
# option is absent. option -> (target, value, why); the value may depend on the import (callable).
KOHYA_DEFAULTS: dict[str, tuple[str, Any, str]] = {
    "network_alpha": ("network.alpha", 1.0, "kohya's default alpha is 1 (here: = dim)"),
    "network_dim": ("network.dim", 4, "kohya's default rank is 4 (here: 16)"),
    "learning_rate": ("train.learning_rate", 2e-6, "kohya's default learning rate is 2e-6 (here: 1e-4)"),
    "max_train_steps": ("train.max_steps", 1600, "kohya trains 1600 steps unless told otherwise"),
    "save_precision": ("output.save_dtype", "fp32", "kohya saves in the training dtype, fp32 (here: fp16)"),
    "enable_bucket": ("data.enable_bucket", False, "kohya buckets only with enable_bucket (here: on)"),
    "min_bucket_reso": ("data.min_bucket_reso", 256, "kohya's default is 256 (here: half the resolution side)"),
    "max_bucket_reso": ("data.max_bucket_reso", 1024, "kohya's default is 1024 (here: twice the resolution side)"),
    "caption_extension": ("data.caption_extension", ".caption",
                          "kohya's default caption extension is .caption (here: .txt)"),
}


def rule_index() -> dict[tuple[str, str], Rule]:
    """(source, option) -> Rule; dataset options are also accepted as training arguments."""
    index = {}
    for rule in RULES:
        key = (rule.source, rule.option)
        if key in index:
            raise AssertionError(f"two rules for {rule.source} option {rule.option}")
        index[key] = rule
    return index


def target_exists(target: str) -> bool:
    """Whether `section.key` is a key of this version's config."""
    from ..data.config import DatasetConfig
    from ..schema import keys_of
    from ..training.config import SECTIONS

    section, _, key = target.partition(".")
    if section == "data":
        return key in keys_of(DatasetConfig)
    cls = SECTIONS.get(section)
    return cls is not None and key in keys_of(cls)
