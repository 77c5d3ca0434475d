"""`inspect`: what an adapter file holds and where other tools will read it differently.

Works from the file alone. The compatibility checks are the traps of the format spec:
layers some loaders skip or misread, keys some UIs ignore, an alpha that means something
else to a PEFT-style trainer than to the UIs.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..algos import lokr
from ..families import FAMILIES, Family
from ..fileformat import read_header, read_safetensors
from . import peft
from .adapterfile import (
    NON_FINITE,
    FileModule,
    as_number,
    block_of,
    check_modules,
    detect_family,
    group_modules,
    lokr_factor_shapes,
    network_args,
)
from .text import counts, human_bytes, metadata_lines, shape

_SAFE_FACTORS = {-1, 4, 8, 16}
_TE_ATTN = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
_COMPONENT_NAMES = {"unet": "UNet", "te": "TE", "te1": "TE1", "te2": "TE2", "unknown": "unknown"}


def _module_info(m: FileModule) -> dict[str, Any]:
    info: dict[str, Any] = {
        "key": m.key, "component": m.component, "block": block_of(m.key),
        "algo": m.algo.NAME if m.algo else None,
        "tensors": {n: list(t.shape) for n, t in m.tensors.items()},
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in m.tensors.values()}),
        "extra_tensors": sorted(m.extras), "parameters": m.num_parameters,
        "alpha": float(m.alpha.float().reshape(-1)[0]) if m.alpha is not None and m.alpha.numel() else None,
    }
    if m.algo is None:
        return info
    kernel = m.kernel()
    info.update(rank=m.rank, scale=m.scale, weight_shape=list(m.flat_shape()),
                kernel=list(kernel) if kernel is not None else None)
    if m.algo is lokr:
        (a, c), (b, dk) = lokr_factor_shapes(m.tensors)
        info["factors"] = {"w1": [a, c], "w2": [b, dk], "w1_low_rank": "lokr_w1_a" in m.tensors,
                           "w2_low_rank": "lokr_w2_a" in m.tensors, "tucker": "lokr_t2" in m.tensors}
    return info


class _Warnings:
    """Collects warnings by code, one entry per code with the modules it concerns."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}

    def add(self, code: str, message: str, module: str | None = None) -> None:
        w = self.items.setdefault(code, {"code": code, "message": message, "count": 0, "modules": []})
        if module is not None:
            w["count"] += 1
            if len(w["modules"]) < 5:
                w["modules"].append(module)

    def list(self) -> list[dict[str, Any]]:
        return list(self.items.values())


def _check_module(m: FileModule, info: dict, family: Family | None, layout: str, dims: dict, w: _Warnings) -> None:
    """Warnings about one module; `family` only when the file is certainly one family's."""
    key = m.key
    if m.algo is None:
        w.add("unknown_module", "tensors are no LoKr, LoHa or LoRA set; every loader skips these modules", key)
        return
    if "lokr_t2" in m.tensors:
        w.add("tucker", "Tucker LoKr (lokr_t2): ComfyUI leaves every such layer unpatched (its issue #11245, "
              "\"view size is not compatible\" in the log) and LyCORIS's loader misreads their rank, while "
              "AUTOMATIC1111 and lokr-diffusion apply them; `lokr-diffusion convert` rebuilds the plain w2 exactly", key)
    if "lokr_w2_b" in m.tensors and m.tensors["lokr_w2_b"].dim() == 4 and "lokr_t2" not in m.tensors:
        w.add("w2_b_4d", "4-D lokr_w2_b: ComfyUI and A1111 cannot rebuild it; `convert` flattens it", key)
    if "dora_scale" in m.extras:
        w.add("dora_scale", "dora_scale (DoRA): lokr-diffusion and LyCORIS apply (W + D) * m / ||W + D||; for a "
              "magnitude per output row (LyCORIS's default) ComfyUI divides by the base weight's norm ||W|| and "
              "A1111 by the norm of each input column, so the same file gives other weights there (per input "
              "channel all three agree, and LyCORIS's loader refuses it); Diffusers drops it. See docs/toolbox.md",
              key)
    if set(m.extras) & {"scale", "bias", "on_input"}:
        w.add("extra_tensors", "scale/bias tensors: only A1111 reads `scale`, the other tools ignore them", key)
    if layout == "lycoris" and m.alpha is None:
        w.add("missing_alpha", "no alpha: LyCORIS's loader crashes, the UIs use scale 1; `convert` writes it", key)
    elif m.alpha is not None and (m.alpha.dtype != torch.float32 or m.alpha.dim() != 0):
        w.add("alpha_dtype", "alpha is not a float32 scalar (fp16 overflows for a huge dim); `convert` fixes it", key)
    if m.component.startswith("te") and "text_model_" not in key:
        w.add("te_without_text_model", "text-encoder keys without `text_model_`: the UIs silently ignore them; "
              "`convert` renames them", key)
    misread = family.misread_denoiser_key(key) if family is not None and m.component == "unet" else None
    if misread is not None:
        w.add(*misread, key)
    factors = info.get("factors")
    if factors and not factors["w1_low_rank"] and not factors["w2_low_rank"] and "lokr_t2" not in m.tensors:
        dim = dims["conv"] if info.get("kernel") and info["kernel"] != [1, 1] and dims["conv"] else dims["linear"]
        if layout == "lycoris" and info["alpha"] is not None and dim is not None and info["alpha"] != dim:
            w.add("alpha_not_rank", f"both LoKr factors are full, so every SD tool applies scale 1, but alpha differs "
                  f"from the network dim ({dim:g}): a trainer that applied alpha/dim (PEFT does) meant another "
                  "strength than the UIs will use", key)


def _check_file(modules: Mapping[str, FileModule], family: Family | None, metadata, args, layout, w: _Warnings) -> None:
    if layout == "peft":
        w.add("peft_layout", "PEFT layout (base_model.model.* keys): no SD UI loads it; `convert` writes the "
              "LyCORIS layout")
    if family is not None and family.needs_base_model_version and metadata and "ss_base_model_version" not in metadata:
        w.add("no_base_model_version", f"{family.title} file with metadata but no ss_base_model_version: A1111 hides "
              f"it when an {family.title} checkpoint is loaded")
    factor = as_number(args.get("factor"))
    if args.get("algo", "lokr") == "lokr" and factor is not None and factor not in _SAFE_FACTORS:
        w.add("factor", f"factor {factor:g} is outside the safe profile (-1, 4, 8, 16): LyCORIS's loader guesses the "
              "factor from shapes and may fail")
    layers: dict[str, set[str]] = {}
    for key, m in modules.items():
        if m.component.startswith("te"):
            for proj in _TE_ATTN:
                if key.endswith(proj):
                    layers.setdefault(key[: -len(proj)], set()).add(proj)
    for layer, found in sorted(layers.items()):
        if len(found) != len(_TE_ATTN):
            w.add("partial_te_attention", "text-encoder layer without all of q, k, v and out_proj: A1111 patches "
                  "OpenCLIP's fused in_proj and needs the four together", layer)


def read_adapter(path: str | Path, finite: bool = True) -> tuple[dict[str, FileModule], dict[str, str], str, dict, Path]:
    """(modules in the file layout, metadata, "lycoris" or "peft", PEFT config, weights file) of an
    adapter file or PEFT folder, every module checked to be usable (an AdapterFileError naming the
    file and module otherwise; see adapterfile.check_modules). NaN/inf pass only without `finite`."""
    path = Path(path)
    if peft.looks_like_peft(path):
        tensors, config, _ = peft.read_peft(path)
        weights = path / peft.WEIGHTS_NAME if path.is_dir() else path
        groups = peft.group_peft(tensors, str(weights))
        files = peft.to_lycoris(groups, config, lambda p: "lora_te" if p.startswith(peft.TE_PATHS) else "lora_unet")
        modules, metadata, layout, weights = group_modules(files), {}, "peft", weights
    else:
        tensors, metadata = read_safetensors(path)
        modules, layout, config, weights = group_modules(tensors), "lycoris", {}, path
    check_modules(modules, str(weights), finite=finite)
    return modules, metadata, layout, config, weights



def _embedding_facts(path: Path) -> dict[str, Any] | None:
    """A trigger / textual-inversion embedding file (what `embedding_trigger` writes), or None."""
    if path.is_dir() or peft.looks_like_peft(path):
        return None
    header, metadata = read_header(path)  # the header only: adapters are read once, by _read
    if set(header) not in ({"emb_params"}, {"clip_l", "clip_g"}):
        return None
    return {"file": str(path), "file_size": path.stat().st_size, "layout": "embedding",
            "trigger": metadata.get("trigger"), "vectors": {k: list(header[k]["shape"]) for k in sorted(header)},
            "metadata": metadata}


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """The facts of an adapter file (LyCORIS/kohya or PEFT), its compatibility warnings and its
    errors; for a trigger embedding file, its word and vector shapes.

    A file that cannot be described (not an adapter, a missing or mis-shaped factor, a dtype no
    loader applies) raises AdapterFileError. NaN/inf values are reported instead, under "errors"
    (every affected module), because the shapes are still worth seeing; the CLI then exits 1.
    """
    path = Path(path)
    embedding = _embedding_facts(path)
    if embedding is not None:
        return embedding
    modules, metadata, layout, peft_config, weights = read_adapter(path, finite=False)
    non_finite = check_modules(modules, str(weights), finite=False)
    errors = []
    if non_finite:
        key, names = next(iter(non_finite.items()))
        errors.append({"code": "non_finite", "count": len(non_finite), "modules": sorted(non_finite)[:5],
                       "message": f"{weights}: {len(non_finite)} module(s) have {NON_FINITE}, e.g. {key} "
                                  f"({', '.join(names)}); load_adapter, convert and merge refuse this file"})
    found = detect_family(modules, metadata)
    args = network_args(metadata)
    dims = {"linear": as_number(metadata.get("ss_network_dim")), "conv": as_number(args.get("conv_dim"))}
    w = _Warnings()
    infos = []
    for m in sorted(modules.values(), key=lambda m: (list(_COMPONENT_NAMES).index(m.component), m.key)):
        info = _module_info(m)
        _check_module(m, info, found.family, layout, dims, w)
        infos.append(info)
    _check_file(modules, found.family, metadata, args, layout, w)
    naming = found.naming_family
    denoiser_keys = [m.key for m in sorted(modules.values(), key=lambda m: m.key) if m.component == "unet"]
    key_layouts = _key_layouts(naming, denoiser_keys)
    blocks: dict[str, dict[str, int]] = {}
    for i in infos:
        comp = blocks.setdefault(i["component"], {})
        comp[i["block"]] = comp.get(i["block"], 0) + 1
    return {
        "file": str(path), "file_size": weights.stat().st_size, "layout": layout,
        "family": found.name, "family_source": found.how,
        "denoiser": naming.denoiser_attr if naming is not None else "unet",
        "key_layouts": key_layouts,
        "key_layout": (next(iter(key_layouts)) if len(key_layouts) == 1 else "mixed") if key_layouts else None,
        "ui_support": [{"ui": ui, "support": text} for ui, text in naming.ui_support(denoiser_keys)] if naming else [],
        "components": dict(Counter(i["component"] for i in infos)),
        "algorithms": dict(Counter(i["algo"] or "unknown" for i in infos)),
        "blocks": blocks,
        "parameters": sum(i["parameters"] for i in infos),
        "parameters_per_component": {c: sum(i["parameters"] for i in infos if i["component"] == c) for c in blocks},
        "dtypes": dict(Counter(d for m in modules.values() for d in
                               (str(t.dtype).replace("torch.", "") for t in m.tensors.values()))),
        "alpha_dtypes": dict(Counter(str(m.alpha.dtype).replace("torch.", "") for m in modules.values()
                                     if m.alpha is not None)),
        "ranks": dict(Counter("full" if i["rank"] is None else str(i["rank"]) for i in infos if i["algo"])),
        "network": {"dim": metadata.get("ss_network_dim"), "alpha": metadata.get("ss_network_alpha"), "args": args},
        "metadata": metadata, "peft_config": peft_config,
        "errors": errors, "warnings": w.list(), "modules": infos,
    }


def _key_layouts(family: Family | None, denoiser_keys: list[str]) -> dict[str, int]:
    """Denoiser modules per file layout of a family with several (Flux: the DiT spec's six), in the
    family's order; "unknown" for keys in none of them. {} for families with one layout."""
    if family is None or not family.file_layouts:
        return {}
    found = Counter(family.denoiser_layout(k) or "unknown" for k in denoiser_keys)
    return {name: found[name] for name in [*family.file_layouts, "unknown"] if found[name]}


_SHOWN_GROUPS = 10
_BLOCK_ORDER = ("down_blocks", "input_blocks", "mid_block", "middle_block", "up_blocks", "output_blocks",
                "transformer_blocks", "double_blocks", "single_transformer_blocks", "single_blocks", "encoder")


def _block_order(block: str) -> tuple[int, int]:
    """Blocks in the order the UNet runs them: down (input), mid, up (output), the rest last."""
    name, _, index = block.partition(".")
    rank = _BLOCK_ORDER.index(name) if name in _BLOCK_ORDER else len(_BLOCK_ORDER)
    return rank, int(index) if index.isdigit() else 0


def _family_title(name: str | None) -> str:
    """The people's name of the report's family (the JSON keeps `FileFamily.name`: ``sdxl``, ``sd``)."""
    for f in FAMILIES:
        if name == f.name:
            return f.title
        if name == f.shared_name:
            return f.shared_title
    return name or "unknown"


def _layout_lines(r: dict[str, Any]) -> list[str]:
    """The key layout of a family with several, and what each UI does with the file's keys."""
    found = r.get("key_layouts") or {}
    lines = []
    if len(found) == 1:
        name = next(iter(found))
        described = _layout_description(name)
        lines.append(f"key layout:  {name} ({found[name]} {r.get('denoiser', 'unet')} modules){described}")
    elif found:
        lines.append("key layout:  mixed: " + ", ".join(f"{name} {n}" for name, n in found.items()))
    if r.get("ui_support"):
        lines.append("in the UIs:")
        width = max(len(u["ui"]) for u in r["ui_support"])
        lines += [f"  {u['ui']:{width}s}  {u['support']}" for u in r["ui_support"]]
    return lines


def _layout_description(name: str) -> str:
    """`: <what its keys look like>, written by <who>` from the family that declares the layout."""
    for f in FAMILIES:
        if name in f.file_layouts:
            keys, writers = f.file_layouts[name]
            return f": {keys}; {writers}"
    return ""


def format_inspection(r: dict[str, Any], verbose: bool = False) -> str:
    if r["layout"] == "embedding":
        shapes = ", ".join(f"{k} {v[0]} x {v[1]}" for k, v in r["vectors"].items())
        return "\n".join([f"file:        {r['file']} ({human_bytes(r['file_size'])}, trigger embedding)",
                          f"trigger:     {r['trigger'] or '(not stored; the file name is the word in UIs)'}",
                          f"vectors:     {shapes}",
                          "load with:   lokr_diffusion.load_embedding(pipe, file) in Diffusers; "
                          "models/embeddings/ in ComfyUI, embeddings/ in AUTOMATIC1111"])
    names = {**_COMPONENT_NAMES, "unet": "UNet" if r.get("denoiser", "unet") == "unet" else r["denoiser"]}
    comps = ", ".join(f"{names.get(c, c)} {n}" for c, n in r["components"].items())
    params = ", ".join(f"{names.get(c, c)} {n:,}" for c, n in r["parameters_per_component"].items())
    layout = "PEFT" if r["layout"] == "peft" else "LyCORIS/kohya"
    lines = [
        f"file:        {r['file']} ({human_bytes(r['file_size'])}, {layout} layout)",
        f"family:      {_family_title(r['family'])} (from {r['family_source']})",
        *_layout_lines(r),
        f"modules:     {sum(r['components'].values())} ({comps}); {counts(r['algorithms'])}",
        f"parameters:  {r['parameters']:,} ({params})",
        f"dtypes:      {counts(r['dtypes'])} tensors; alpha {counts(r['alpha_dtypes']) or 'none'}",
        f"ranks:       {counts(r['ranks'])}" + ("  ('full': both LoKr factors full, scale 1)" if "full" in r["ranks"] else ""),
    ]
    net = r["network"]
    if net["dim"] is not None or net["args"]:
        lines.append(f"network:     dim {net['dim']}, alpha {net['alpha']}, args {json.dumps(net['args'])}")
    factor_groups = Counter()
    for m in r["modules"]:
        f = m.get("factors")
        if f:
            form = ("low-rank" if f["w2_low_rank"] else "full") + (", Tucker" if f["tucker"] else "")
            factor_groups[f"w1 {shape(f['w1'])} (x) w2 {shape(f['w2'])} [w2 {form}]"] += 1
    if factor_groups:
        lines.append("LoKr factors (w2 columns include the kernel):")
        shown = factor_groups.most_common(_SHOWN_GROUPS)
        lines += [f"  {n:4d} x {g}" for g, n in shown]
        if len(factor_groups) > len(shown):
            rest = sum(factor_groups.values()) - sum(n for _, n in shown)
            more = len(factor_groups) - len(shown)
            lines.append(f"  ... {more} more shapes ({rest} modules; --json or -v lists all)")
    lines.append("modules per block:")
    width = max([5, *(len(names.get(c, c)) for c in r["blocks"])])
    for comp, blocks in r["blocks"].items():
        ordered = sorted(blocks.items(), key=lambda kv: _block_order(kv[0]))
        lines.append(f"  {names.get(comp, comp):{width}s} " + ", ".join(f"{b} {n}" for b, n in ordered))
    if r.get("errors"):
        lines.append(f"ERRORS ({len(r['errors'])}): the file is not usable as it is (exit status 1):")
        lines += [f"  [{e['code']}] {e['message']}" for e in r["errors"]]
    if r["warnings"]:
        lines.append(f"compatibility warnings ({len(r['warnings'])}):")
        for w in r["warnings"]:
            where = f" ({w['count']} modules, e.g. {w['modules'][0]})" if w["count"] else ""
            lines.append(f"  [{w['code']}] {w['message']}{where}")
    elif not r.get("errors"):
        lines.append("compatibility: within the safe profile of the format spec (no warnings)")
    if r["metadata"]:
        lines.append("metadata:")
        lines += metadata_lines(r["metadata"])
    if r["peft_config"]:
        lines.append("PEFT config: " + json.dumps(r["peft_config"]))
    if verbose:
        lines.append("modules:")
        for m in r["modules"]:
            tensors = ", ".join(f"{n} {shape(s)}" for n, s in m["tensors"].items())
            lines.append(f"  {m['key']}: {m['algo']}, rank {m.get('rank') or 'full'}, alpha {m['alpha']}, "
                         f"scale {m.get('scale', 1):g}; {tensors}")
    return "\n".join(lines)
