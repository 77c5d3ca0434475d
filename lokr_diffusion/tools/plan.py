"""`plan`: what a training configuration will build, before any training.

The numbers come from `create_network` itself, run on weightless (meta-device) models, so
they are by construction the ones the trainer gets: module list, trainable parameters, the
per-module factor shapes, and the exact `.safetensors` size per save dtype (tensor bytes plus
the header that `AdapterNetwork.save` writes, computed the way safetensors lays it out).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..algos import get_algorithm
from ..errors import ConfigError, ModelError
from ..dtypes import SAFETENSORS_NAMES, SHORT_NAMES
from ..families import Family, family_of_pipeline_class, get_family
from ..models import load_pipeline
from ..network import AdapterConfig, AdapterNetwork, chosen_text_encoders, create_network, family_of
from ..pipelines import _components as pipeline_components
from ..storage import storable
from .text import counts, human_bytes, shape

SAVE_DTYPES = {name: dtype for dtype, name in SHORT_NAMES.items()}
WEIGHT_BYTES = {"no": 4, "fp16": 2, "bf16": 2}  # frozen weights per train.mixed_precision, as the trainer casts them
# bytes per trainable parameter each optimizer keeps: AdamW two fp32 moments, 8-bit AdamW two bytes,
# Prodigy four fp32 tensors, Adafactor at most one (factored second moments), plain SGD none
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 4, "sgd": 0}
_COMPARE_FACTORS = (-1, 4, 8, 16)
FACTOR_NOTE = ("--factor sets the small Kronecker factor w1 (a x c) and --dim is a rank: a larger factor means a "
               "bigger w1, a smaller w2 and so fewer parameters while w2 is full; --dim only matters where w2 is "
               "stored low-rank (dim < max(b, d) / 2), and there a larger dim means more parameters.")


@dataclass(frozen=True)
class TrainingSetup:
    """What the memory estimate assumes about a run (from a config's [train] and [data], or flags)."""

    mixed_precision: str = "bf16"
    optimizer: str = "adamw"
    resolution: tuple[int, int] | None = None  # None: the family's (modelspec.resolution), else 512
    batch_size: int = 1
    gradient_checkpointing: bool = True
    ema: bool = False
    base_dtype: str = "auto"  # [model] base_dtype: how the frozen denoiser's weights are stored


def _folder_parts(folder: Path) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """(denoiser subfolder, text-encoder subfolders, model_index.json) of a Diffusers folder, as its
    pipeline class's family names them (SD's unet / text_encoder(_2) when the class is unknown)."""
    index = json.loads((folder / "model_index.json").read_text())
    family = family_of_pipeline_class(str(index.get("_class_name", "")))
    if family is None:
        return "unet", ("text_encoder", "text_encoder_2"), index
    return family.denoiser_attr, family.text_encoder_attrs, index


def _meta_from_folder(folder: Path) -> tuple[nn.Module, list[nn.Module]]:
    """The folder's denoiser and text encoders from their configs alone, on the meta device."""
    import diffusers
    import transformers

    denoiser_dir, encoder_dirs, index = _folder_parts(folder)
    cls_name = (index.get(denoiser_dir) or [None, "UNet2DConditionModel"])[1]
    denoiser_cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        denoiser = denoiser_cls.from_config(denoiser_cls.load_config(folder / denoiser_dir))
        encoders = []
        for sub in encoder_dirs:
            if (folder / sub / "config.json").is_file():
                cfg = transformers.AutoConfig.from_pretrained(folder / sub)
                cls = getattr(transformers, (index.get(sub) or [None, None])[1]
                              or (cfg.architectures or ["CLIPTextModel"])[0])
                encoders.append(cls(cfg))
    return denoiser, encoders


def _is_configs_folder(path: Path) -> bool:
    if not (path.is_dir() and (path / "model_index.json").is_file()):
        return False
    try:
        return (path / _folder_parts(path)[0] / "config.json").is_file()
    except (OSError, ValueError, AttributeError):
        return False


def models_for(model: str) -> tuple[nn.Module, list[nn.Module], str]:
    """(unet, text encoders, what they are) for a family name, a Diffusers folder or any model path."""
    path = Path(model).expanduser()
    if not path.exists():
        try:
            family = get_family(model)
        except ConfigError:
            family = None
        if family:
            unet, encoders = family.build_meta()
            return unet, encoders, f"the {family.name} architecture without weights"
    if _is_configs_folder(path):
        try:
            unet, encoders = _meta_from_folder(path)
        except Exception as exc:  # malformed configs: report the folder, not a traceback
            raise ModelError(f"{model}: cannot build the model from its configs: {exc}") from exc
        return unet, encoders, f"{model} (configs only)"
    unet, encoders = pipeline_components(load_pipeline(model))
    return unet, encoders, str(model)


def plan_config(config_path: str | Path, memory: bool = True) -> dict[str, Any]:
    """:func:`plan_network` for a training TOML: the network `train.py --config` builds.

    The model is the config's (a local path relative to the config file, as the trainer reads
    it); a hub id that is not on disk is planned on the family's real architecture when the
    config names the family, since planning must not download gigabytes.
    """
    from ..training.config import load_config

    cfg = load_config(config_path)
    model = cfg.model.pretrained_model
    if (cfg.base_dir / model).exists():
        model = str((cfg.base_dir / model).resolve())
    elif cfg.model.family != "auto" and not Path(model).expanduser().exists():
        model = get_family(cfg.model.family).name
    t = cfg.train
    from ..training.precision import resolve_mixed_precision

    setup = TrainingSetup(mixed_precision=resolve_mixed_precision(t.mixed_precision)[0], optimizer=t.optimizer, resolution=_largest_resolution(cfg),
                          batch_size=t.batch_size, gradient_checkpointing=t.gradient_checkpointing,
                          ema=t.ema_decay is not None, base_dtype=cfg.model.base_dtype)
    result = plan_network(model, cfg.network.adapter_config(), title=cfg.output.name,
                          train_unet=cfg.network.train_unet, train_text_encoder=cfg.network.train_text_encoder,
                          text_encoders=cfg.network.text_encoders, training=setup, memory=memory)
    result["config_file"] = str(config_path)
    result["save_dtype"] = cfg.output.save_dtype
    return result


def _largest_resolution(cfg: Any) -> tuple[int, int]:
    """The largest (width, height) of the config's datasets: the memory a step needs at most."""
    from ..data.config import dataset_configs_from_toml

    sizes = [tuple(c.resolution) for c in dataset_configs_from_toml(cfg.data, base_dir=cfg.base_dir)]
    return max(sizes, key=lambda wh: wh[0] * wh[1])


def safetensors_size(network: AdapterNetwork, dtype: torch.dtype, metadata: dict[str, str]) -> int:
    """Bytes of the file `network.save(dtype=dtype)` writes: 8 + header JSON (padded to 8) + data.

    safetensors puts `__metadata__` first and the tensors in order of decreasing element size,
    then by name; the offsets' digits are part of the header, so that order matters.
    """
    entries = []
    for key, t in network.file_tensors(dtype=None).items():
        dt = torch.float32 if key.endswith(".alpha") else dtype
        entries.append((key, dt, tuple(t.shape)))
    entries.sort(key=lambda e: (-e[1].itemsize, e[0]))
    header: dict[str, Any] = {"__metadata__": {**metadata, "sshs_model_hash": "0" * 64}}
    offset = 0
    for key, dt, dims in entries:
        size = math.prod(dims) * dt.itemsize
        header[key] = {"dtype": SAFETENSORS_NAMES[dt], "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(raw) + (-len(raw)) % 8 + offset


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"


def _factor_comparison(network: AdapterNetwork, config: AdapterConfig) -> dict[str, int]:
    """Total parameters at other [network] factors, same dims (overrides that set their own factor
    keep it): init_tensors is what create_network calls."""
    shapes = Counter((tuple(a.base.weight.shape), _kind(a.base) == "conv", network.override_of.get(a.key))
                     for a in network.adapters())
    out = {}
    for factor in sorted(set(_COMPARE_FACTORS) | {config.factor}):
        cfg = dataclasses.replace(config, factor=factor)
        total = 0
        for (weight_shape, kxk, index), n in shapes.items():
            plan = cfg.module_plan(kxk, None if index is None else cfg.overrides[index])
            with torch.device("meta"):
                tensors = get_algorithm(plan.algo).init_tensors(weight_shape, plan.settings)
            total += n * (sum(t.numel() for t in tensors.values()) + plan.settings.use_scalar)
        out[str(factor)] = total
    return out


def trained_text_encoders(family: Family, encoders: list[nn.Module], train_text_encoder: bool,
                          names: list[str] | None = None) -> list[nn.Module | None]:
    """The text encoders the trainer puts adapters on, None in place of the others: those
    `network.text_encoders` names (te1, te2...), else the family's default (Flux: CLIP-L only)."""
    chosen = chosen_text_encoders(family, encoders, SimpleNamespace(train_text_encoder=train_text_encoder,
                                                                    text_encoders=names))
    return chosen if any(te is not None for te in chosen) else []


def plan_network(model: str, config: AdapterConfig, title: str = "adapter", *, train_unet: bool = True,
                 train_text_encoder: bool = True, text_encoders: list[str] | None = None,
                 training: TrainingSetup | None = None, memory: bool = True) -> dict[str, Any]:
    """Everything the trainer will build for `config` on `model`, as plain data, and the training
    memory it needs under `training` (defaults: bf16, AdamW, batch 1, gradient checkpointing);
    `memory=False` leaves the estimate out (its counted forward takes seconds on a 12 B model)."""
    unet, encoders, source = models_for(model)
    family = family_of(unet, encoders)
    trained = trained_text_encoders(family, encoders, train_text_encoder, text_encoders)
    network = create_network(config, unet if train_unet else None, trained, family=family)
    per_module = network.num_parameters(per_module=True)
    modules, groups = [], {}
    for info in network.modules_info():
        base = network.adapter(info.key).base
        adapter = network.adapter(info.key)
        entry = {"key": info.key, "component": info.component, "kind": info.kind, "algo": adapter.algo.NAME,
                 "override": network.override_of.get(info.key), "scale": adapter.scale,
                 "weight_shape": list(base.weight.shape), "tensors": {n: list(s) for n, s in info.shapes.items()},
                 "parameters": per_module[info.key]}
        modules.append(entry)
        sig = json.dumps([info.component, info.kind, entry["algo"], entry["override"], entry["weight_shape"],
                          entry["tensors"]])
        groups.setdefault(sig, {**{k: v for k, v in entry.items() if k != "key"}, "count": 0})["count"] += 1
    metadata = network.metadata(title=title)
    result = {
        "model": str(model), "source": source, "family": network.family.name, "config": dataclasses.asdict(config),
        "modules": dict(Counter(m["component"] for m in modules)), "parameters": network.num_parameters(),
        "parameters_per_component": {c: sum(m["parameters"] for m in modules if m["component"] == c)
                                     for c in dict.fromkeys(m["component"] for m in modules)},
        "file_size": {name: safetensors_size(network, dt, metadata) for name, dt in SAVE_DTYPES.items()},
        "shape_groups": list(groups.values()), "module_list": modules, "notes": [],
        "overrides": [{"match": o.match, **o.given(),
                       "modules": sum(1 for m in modules if m["override"] == i)} for i, o in enumerate(config.overrides)],
    }
    if any(m["algo"] == "lokr" for m in modules):
        result["factor_comparison"] = _factor_comparison(network, config)
        low = sum(1 for m in modules if "lokr_w2_a" in m["tensors"])
        result["lokr_w2_low_rank"] = {"low_rank": low, "full": sum(1 for m in modules if "lokr_w2" in m["tensors"])}
        result["notes"].append(FACTOR_NOTE)
    if config.conv_dim is None and config.preset == "full":
        result["notes"].append("k x k convolutions of preset full are skipped: give --conv-dim to train them "
                               "(LyCORIS's full trains them at conv_dim = dim unless told otherwise)")
    if memory:
        result["memory"] = training_memory(family, unet, encoders, [te for te in trained if te is not None],
                                           network, training or TrainingSetup())
    network.remove()
    return result


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _stored_weight_bytes(denoiser: nn.Module, base_dtype: str, compute_bytes: int) -> tuple[int, int]:
    """(bytes of the frozen denoiser with its Linear (and for bf16/fp16 Conv2d) weights stored as
    `base_dtype`, bytes of the largest such layer widened for one call) -- as
    lokr_diffusion.storage stores them; (all at compute width, 0) for `auto` or the compute width."""
    stored = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}.get(base_dtype)
    if stored is None or stored >= compute_bytes:
        return _count(denoiser) * compute_bytes, 0
    total, widest = 0, 0
    for m in denoiser.modules():
        for name, p in m.named_parameters(recurse=False):
            narrow = name == "weight" and storable(m, base_dtype == "fp8")
            total += p.numel() * (stored if narrow else compute_bytes)
            if narrow:
                total += 4 * p.shape[0] if base_dtype == "fp8" else 0  # one float32 scale per output row
                widest = max(widest, p.numel())
    # the forward widens through float32 for fp8 (then to the compute dtype), else straight to it
    return total, widest * (compute_bytes + (4 if base_dtype == "fp8" and compute_bytes != 4 else 0))


def training_memory(family: Family, denoiser: nn.Module, encoders: list[nn.Module], trained: list[nn.Module],
                    network: AdapterNetwork, setup: TrainingSetup) -> dict[str, Any]:
    """Memory of one training step, in bytes, and what the estimate includes.

    The trainer stores the frozen denoiser (and trained text encoders) in the training dtype, or
    narrower with `base_dtype`, and keeps the adapters in fp32 with fp32 gradients and optimizer
    states. Text encoders without adapters are parked off the device once their outputs are
    cached, so they count only while caching. Activations are counted, not guessed: the
    denoiser's forward runs on fake tensors at the run's resolution and batch and every tensor
    autograd saves is added up (tools.activations).
    """
    from .activations import saved_activation_bytes

    if setup.optimizer not in OPTIMIZER_STATE_BYTES:
        raise ConfigError(f"unknown optimizer {setup.optimizer!r}: expected one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if setup.mixed_precision not in WEIGHT_BYTES:
        raise ConfigError(f"unknown mixed precision {setup.mixed_precision!r}: expected one of "
                          f"{', '.join(WEIGHT_BYTES)}")
    wb = WEIGHT_BYTES[setup.mixed_precision]
    compute = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[setup.mixed_precision]
    resolution = setup.resolution or _family_resolution(family)
    frozen_params = _count(denoiser) + sum(_count(te) for te in trained)
    denoiser_bytes, widening = _stored_weight_bytes(denoiser, setup.base_dtype, wb)
    trainable = network.num_parameters()
    per_param = 4 + 4 + OPTIMIZER_STATE_BYTES[setup.optimizer] + (4 if setup.ema else 0)
    counted = saved_activation_bytes(family, denoiser, encoders, list(network.adapters()), resolution,
                                     setup.batch_size, compute, setup.gradient_checkpointing)
    how = (f"counted: what autograd saves in one forward at batch {setup.batch_size}, {resolution[0]}x{resolution[1]}"
           f" ({gib(counted['saved'])}"
           + (", with each checkpointed block keeping its inputs and one recomputed at a time"
              if setup.gradient_checkpointing else "")
           + f"), plus {gib(counted['largest_region'])} for the gradients of the largest block's activations "
             "while its backward runs")
    parts = {"frozen_weights": denoiser_bytes + sum(_count(te) for te in trained) * wb,
             "adapter": trainable * per_param, "activations": counted["bytes"], "widening": widening}
    return {
        "assumes": {"mixed_precision": setup.mixed_precision, "weight_bytes": wb, "optimizer": setup.optimizer,
                    "resolution": list(resolution), "batch_size": setup.batch_size,
                    "gradient_checkpointing": setup.gradient_checkpointing, "ema": setup.ema,
                    "base_dtype": setup.base_dtype},
        **parts, "total": sum(parts.values()),
        "frozen_parameters": frozen_params, "adapter_bytes_per_parameter": per_param,
        "activations_how": how,
        "caching_text_encoders": sum(_count(te) for te in encoders if not any(te is t for t in trained)) * wb,
    }


def _family_resolution(family: Family) -> tuple[int, int]:
    """The resolution the family's files record (Flux, SDXL: 1024x1024), else 512."""
    width, _, height = str(getattr(family, "resolution", "512x512")).partition("x")
    return int(width), int(height or width)



def format_plan(r: dict[str, Any]) -> str:
    cfg = r["config"]
    alpha = cfg["alpha"] if cfg["alpha"] is not None else cfg["dim"]
    conv = f", conv_dim {cfg['conv_dim']}" if cfg["conv_dim"] else ""
    lines = [
        (f"plan:        {cfg['algo']} on {r['source']} ({r['family']}), preset {cfg['preset']}, "
         f"factor {cfg['factor']}, dim {cfg['dim']}, alpha {alpha:g}{conv}"),
        f"modules:     {sum(r['modules'].values())} ({counts(r['modules'])})",
        f"parameters:  {r['parameters']:,} trainable ({counts(r['parameters_per_component'])})",
        "file size:   " + ", ".join(f"{k} {human_bytes(v)} ({v:,} bytes)" for k, v in r["file_size"].items()),
    ]
    if "lokr_w2_low_rank" in r:
        lr = r["lokr_w2_low_rank"]
        lines.append(f"LoKr w2:     full in {lr['full']} modules, low-rank (rank {cfg['dim']}"
                     f"{'/' + str(cfg['conv_dim']) if cfg['conv_dim'] else ''}) in {lr['low_rank']}")
    for i, o in enumerate(r.get("overrides", [])):
        given = ", ".join(f"{k} {v}" for k, v in o.items() if k not in ("match", "modules"))
        lines.append(f"override {i + 1} {o['match']!r} -> {given}: {o['modules']} modules")
    lines.append("factor shapes (component, layer, algo, weight -> tensors: count x parameters each):")
    for g in sorted(r["shape_groups"], key=lambda g: (g["component"], -g["count"])):
        tensors = ", ".join(f"{n} {shape(s)}" for n, s in g["tensors"].items())
        rule = f" (override {g['override'] + 1})" if g.get("override") is not None else ""
        lines.append(f"  {g['component']:5s} {g['kind']:8s} {g.get('algo', cfg['algo'])} {shape(g['weight_shape']):>14s} "
                     f"-> {tensors}: {g['count']} x {g['parameters']:,}{rule}")
    if "factor_comparison" in r:
        by_factor = (f"{f}: {n:,}{' (this plan)' if int(f) == cfg['factor'] else ''}"
                     for f, n in r["factor_comparison"].items())
        lines.append("parameters by --factor at this dim: " + ", ".join(by_factor))
    if "memory" in r:
        lines += memory_lines(r["memory"])
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def memory_lines(m: dict[str, Any]) -> list[str]:
    """The memory estimate, with what it includes and what it leaves out."""
    a = m["assumes"]
    dtype = "fp32" if a["mixed_precision"] == "no" else a["mixed_precision"]
    checkpointing = "gradient checkpointing" if a["gradient_checkpointing"] else "no gradient checkpointing"
    lines = [
        (f"training memory (estimate, {dtype}, {a['optimizer']}, batch {a['batch_size']}, "
         f"{a['resolution'][0]}x{a['resolution'][1]}, {checkpointing}): {gib(m['total'])} "
         f"({m['total'] / 1e9:.1f} GB), of which"),
        (f"  frozen weights:  {gib(m['frozen_weights'])}: {m['frozen_parameters']:,} parameters (denoiser and "
         f"trained text encoders) x {a['weight_bytes']} B ({dtype})"
         + (f", the denoiser's Linear weights stored as {a['base_dtype']}" if m["widening"] else "")),
        (f"  adapter:         {gib(m['adapter'])}: {m['adapter_bytes_per_parameter']} B per trainable parameter (fp32 "
         f"weight 4 + gradient 4 + {a['optimizer']} states {OPTIMIZER_STATE_BYTES[a['optimizer']]}"
         + (" + EMA 4" if a["ema"] else "") + ")"),
        f"  activations:     {gib(m['activations'])}: {m['activations_how']}",
    ]
    if m["widening"]:
        lines.append(f"  widening:        {gib(m['widening'])}: the largest stored layer widened for its call")
    if m["caching_text_encoders"]:
        lines.append(f"  not included: text encoders without adapters ({gib(m['caching_text_encoders'])} in {dtype}), "
                     "on the device only while captions are cached and at sampling")
    lines.append("  not included: the CUDA context and allocator slack (about 1 GiB), the VAE while latents are cached")
    return lines
