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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algos import get_algorithm
from ..errors import ConfigError, ModelError
from ..dtypes import SAFETENSORS_NAMES, SHORT_NAMES
from ..families import get_family
from ..models import load_pipeline
from ..network import AdapterConfig, AdapterNetwork, create_network, family_of
from ..pipelines import _components as pipeline_components
from .text import counts, human_bytes, shape

SAVE_DTYPES = {name: dtype for dtype, name in SHORT_NAMES.items()}
_COMPARE_FACTORS = (-1, 4, 8, 16)
FACTOR_NOTE = ("--factor sets the small Kronecker factor w1 (a x c) and --dim is a rank: a larger factor means a "
               "bigger w1, a smaller w2 and so fewer parameters while w2 is full; --dim only matters where w2 is "
               "stored low-rank (dim < max(b, d) / 2), and there a larger dim means more parameters.")


def _meta_from_folder(folder: Path) -> tuple[nn.Module, list[nn.Module]]:
    """The folder's UNet and text encoders from their configs alone, on the meta device."""
    import transformers
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        encoders = []
        for sub in ("text_encoder", "text_encoder_2"):
            if (folder / sub / "config.json").is_file():
                cfg = transformers.AutoConfig.from_pretrained(folder / sub)
                cls = getattr(transformers, (cfg.architectures or ["CLIPTextModel"])[0])
                encoders.append(cls(cfg))
    return unet, encoders


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
    if path.is_dir() and (path / "model_index.json").is_file() and (path / "unet" / "config.json").is_file():
        try:
            unet, encoders = _meta_from_folder(path)
        except Exception as exc:  # malformed configs: report the folder, not a traceback
            raise ModelError(f"{model}: cannot build the model from its configs: {exc}") from exc
        return unet, encoders, f"{model} (configs only)"
    unet, encoders = pipeline_components(load_pipeline(model))
    return unet, encoders, str(model)


def plan_config(config_path: str | Path) -> dict[str, Any]:
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
    result = plan_network(model, cfg.network.adapter_config(), title=cfg.output.name,
                          train_unet=cfg.network.train_unet, train_text_encoder=cfg.network.train_text_encoder)
    result["config_file"] = str(config_path)
    result["save_dtype"] = cfg.output.save_dtype
    return result


def safetensors_size(network: AdapterNetwork, dtype: torch.dtype, metadata: dict[str, str]) -> int:
    """Bytes of the file `network.save(dtype=dtype)` writes: 8 + header JSON (padded to 8) + data.

    safetensors puts `__metadata__` first and the tensors in order of decreasing element size,
    then by name; the offsets' digits are part of the header, so that order matters.
    """
    entries = []
    for key, t in network.state_dict().items():
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
    """Total parameters at other factors, same dims: init_tensors is what create_network calls."""
    algo = get_algorithm(config.algo)
    shapes = Counter((tuple(a.base.weight.shape), _kind(a.base) == "conv") for a in network.adapters())
    out = {}
    for factor in sorted(set(_COMPARE_FACTORS) | {config.factor}):
        cfg = dataclasses.replace(config, factor=factor)
        total = 0
        for (weight_shape, kxk), n in shapes.items():
            with torch.device("meta"):
                total += n * sum(t.numel() for t in algo.init_tensors(weight_shape, cfg.settings(kxk)).values())
        out[str(factor)] = total
    return out


def plan_network(model: str, config: AdapterConfig, title: str = "adapter", *, train_unet: bool = True,
                 train_text_encoder: bool = True) -> dict[str, Any]:
    """Everything the trainer will build for `config` on `model`, as plain data."""
    unet, encoders, source = models_for(model)
    network = create_network(config, unet if train_unet else None, encoders if train_text_encoder else (),
                             family=family_of(unet, encoders))
    per_module = network.num_parameters(per_module=True)
    modules, groups = [], {}
    for info in network.modules_info():
        base = network.adapter(info.key).base
        entry = {"key": info.key, "component": info.component, "kind": info.kind,
                 "weight_shape": list(base.weight.shape), "tensors": {n: list(s) for n, s in info.shapes.items()},
                 "parameters": per_module[info.key]}
        modules.append(entry)
        sig = json.dumps([info.component, info.kind, entry["weight_shape"], entry["tensors"]])
        groups.setdefault(sig, {**{k: v for k, v in entry.items() if k != "key"}, "count": 0})["count"] += 1
    metadata = network.metadata(title=title)
    result = {
        "model": str(model), "source": source, "family": network.family.name, "config": dataclasses.asdict(config),
        "modules": dict(Counter(m["component"] for m in modules)), "parameters": network.num_parameters(),
        "parameters_per_component": {c: sum(m["parameters"] for m in modules if m["component"] == c)
                                     for c in dict.fromkeys(m["component"] for m in modules)},
        "file_size": {name: safetensors_size(network, dt, metadata) for name, dt in SAVE_DTYPES.items()},
        "shape_groups": list(groups.values()), "module_list": modules, "notes": [],
    }
    if config.algo == "lokr":
        result["factor_comparison"] = _factor_comparison(network, config)
        low = sum(1 for m in modules if "lokr_w2_a" in m["tensors"])
        result["lokr_w2_low_rank"] = {"low_rank": low, "full": len(modules) - low}
        result["notes"].append(FACTOR_NOTE)
    if config.conv_dim is None and config.preset == "full":
        result["notes"].append("k x k convolutions of preset full are skipped: give --conv-dim to train them")
    network.remove()
    return result



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
    lines.append("factor shapes (component, layer, weight -> tensors: count x parameters each):")
    for g in sorted(r["shape_groups"], key=lambda g: (g["component"], -g["count"])):
        tensors = ", ".join(f"{n} {shape(s)}" for n, s in g["tensors"].items())
        lines.append(f"  {g['component']:5s} {g['kind']:8s} {shape(g['weight_shape']):>14s} -> {tensors}: "
                     f"{g['count']} x {g['parameters']:,}")
    if "factor_comparison" in r:
        by_factor = (f"{f}: {n:,}{' (this plan)' if int(f) == cfg['factor'] else ''}"
                     for f, n in r["factor_comparison"].items())
        lines.append("parameters by --factor at this dim: " + ", ".join(by_factor))
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
