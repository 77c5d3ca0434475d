"""`convert`: one adapter file into the safe profile (or PEFT), proven to keep its effect.

Every conversion here is exact: keys are renamed through the alias table of the real
architecture, a Tucker core is multiplied out into the plain w2 that ComfyUI and LyCORIS
load (its alpha / r folded so the effective weight stays put), PEFT's always-applied
alpha / r becomes the LyCORIS scale. Before anything is written, the effective update
scale * dW of every module of the output is compared with the input's; a mismatch beyond
the output dtype's rounding is an error, and the largest difference is reported. A DoRA
magnitude (`dora_scale`) is copied unchanged: with D = scale * dW kept, the decomposed weight
is kept too.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..algos import detect_algorithm, lokr
from ..errors import AdapterFileError, ConfigError
from ..families import FAMILIES, Family, FileFamily, get_family
from ..fileformat import (
    read_safetensors,
    require_regular_file,
    training_metadata,
    write_safetensors,
)
from ..naming import module_key
from . import keymap, layouts, peft
from .adapterfile import (
    NON_FINITE,
    FileModule,
    as_number,
    check_modules,
    detect_family,
    flat_shape,
    group_modules,
    lokr_factor_shapes,
    max_abs_and_relative,
    network_args,
)
from .outputs import atomic_folder, check_output

DORA = "dora_scale"
_DROPPED = ("scale", "bias", "on_input")  # only A1111 reads `scale`; nobody needs the others
_REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _given_family(family: str | Family | None) -> FileFamily | None:
    """The family the user named (any spelling), as sure as a file's own evidence would be."""
    return None if family is None else FileFamily((get_family(family),), "--family")


def _peft_prefixes(groups: Mapping[str, Mapping[str, torch.Tensor]], family: Family | None, component: str | None):
    """File-key prefix per PEFT module path: a PEFT folder holds one model, UNet or text encoder.

    Which text encoder of a family with several it is comes from `component`, else from its
    width (the family's `text_encoder_widths`, e.g. SDXL's CLIP-L 768 and OpenCLIP bigG 1280).
    """
    te = component if component and component.startswith("te") else None
    prefixes = family.text_encoder_prefixes() if family is not None else ["lora_te"]
    if te is None and len(prefixes) > 1:
        widths = [flat_shape("lokr", t)[0] for p, t in groups.items() if p.endswith("self_attn.q_proj")]
        te = {w: c for c, w in family.text_encoder_widths}.get(widths[0] if widths else 0)
    te_prefix = "lora_" + (te or "te")
    if te_prefix not in prefixes and len(prefixes) > 1 and any(p.startswith(peft.TE_PATHS) for p in groups):
        raise ConfigError(f"this PEFT folder holds an {family.title} text encoder; pass --component "
                          + " or ".join(p[len("lora_"):] for p in prefixes))
    return lambda path: te_prefix if path.startswith(peft.TE_PATHS) else "lora_unet"


def read_any(src: str | Path, family: str | Family | None = None, component: str | None = None):
    """(modules in file layout, reference effective updates per key, metadata, layout, notes, FileFamily).

    The reference updates follow the *input's* own rules (PEFT: alpha / r always), so the later
    comparison checks the conversion rather than restating it.
    """
    src = Path(src)
    given = _given_family(family)
    if peft.looks_like_peft(src):
        tensors, config, notes = peft.read_peft(src)
        weights = src / peft.WEIGHTS_NAME if src.is_dir() else src
        groups = peft.group_peft(tensors, str(weights))
        prefix_of = _peft_prefixes(groups, given and given.family, component)
        modules = group_modules(peft.to_lycoris(groups, config, prefix_of))
        check_modules(modules, str(weights))  # NaN/inf would be copied into the output
        found = given or detect_family(modules, {})
        if given is None and found.family is not None:  # the text-encoder prefix depends on the family
            prefix_of = _peft_prefixes(groups, found.family, component)
            modules = group_modules(peft.to_lycoris(groups, config, prefix_of))
        reference = {module_key(prefix_of(p), p): peft.peft_delta(t, config, p) for p, t in groups.items()}
        return modules, reference, _peft_metadata(config, found.family), "peft", notes, found
    require_regular_file(src, ".safetensors adapter or a PEFT folder")
    tensors, metadata = read_safetensors(src)
    modules = group_modules(tensors)
    check_modules(modules, str(src))  # structure first, and NaN/inf would be copied into the output
    for key, m in modules.items():
        if m.algo is None:
            names = sorted(f"{key}.{n}".rstrip(".") for n in m.extras)
            raise AdapterFileError(f"{src}: tensors {names} are no LoKr, LoHa or LoRA set (lokr_w1..., hada_w1_a..., "
                                   "lora_down.weight...); remove them or fix their names")
    reference = {k: m.delta() for k, m in modules.items()}
    return modules, reference, metadata, "lycoris", [], given or detect_family(modules, metadata)


def _untucker(m: FileModule) -> tuple[dict[str, torch.Tensor], float]:
    """(tensors with the Tucker core multiplied out into a full lokr_w2, the alpha keeping the effect).

    With w1 full as well the UIs apply scale 1, so the old alpha / r moves into w1 and alpha
    becomes the old rank (the spec's alpha = rank); with a low-rank w1, alpha is rescaled to its rank.
    """
    t = {n: v for n, v in m.tensors.items() if n.startswith("lokr_w1")}
    w1 = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
    _, (b, dk) = lokr_factor_shapes(m.tensors)
    kernel = tuple(int(k) for k in m.tensors["lokr_t2"].shape[2:])
    w2 = lokr.make_w2({n: v.float() for n, v in m.tensors.items()}, b, dk // math.prod(kernel), kernel)
    t["lokr_w2"] = w2.to(t[w1].dtype)
    new_rank = lokr.rank(t)
    if new_rank is not None:
        return t, m.scale * new_rank
    t[w1] = (t[w1].float() * m.scale).to(t[w1].dtype)
    return t, float(m.rank)


def plain_form(m: FileModule, default_alpha: float | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The module in the safe profile: no Tucker core, 2-D w2_b, a float32 alpha, no extras but a
    DoRA magnitude."""
    t = dict(m.tensors)
    changes = []
    alpha = None if m.alpha is None else float(m.alpha.float().reshape(-1)[0])
    if "lokr_t2" in t:
        t, alpha = _untucker(m)
        changes.append("tucker")
    if "lokr_w2_b" in t and t["lokr_w2_b"].dim() == 4:
        t["lokr_w2_b"] = t["lokr_w2_b"].flatten(1)
        changes.append("w2_b_4d")
    if alpha is None:
        r = m.rank
        alpha = float(r) if r is not None else (default_alpha or 1.0)  # scale 1, as the UIs read it
        changes.append("alpha_added")
    if DORA in m.extras:  # the magnitude is kept as it is: the update D it rescales is kept exactly
        t[DORA] = m.extras[DORA]
    dropped = [n for n in m.extras if n in _DROPPED]
    if dropped:
        changes.append("dropped:" + ",".join(sorted(dropped)))
    t["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return t, changes


def _check(reference: Mapping[str, torch.Tensor], produced: Mapping[str, torch.Tensor],
           tol: float) -> tuple[float, float]:
    """(max abs, max relative) difference of the effective updates; an error above `tol`."""
    worst_abs, worst_rel = 0.0, 0.0
    for key, want in reference.items():
        got = produced.get(key)
        if got is None:
            raise AdapterFileError(f"conversion lost module {key}")
        if got.shape != want.shape:
            raise AdapterFileError(f"module {key}: converted update has shape {tuple(got.shape)}, "
                                   f"expected {tuple(want.shape)}")
        if not torch.isfinite(got).all():
            raise AdapterFileError(f"module {key}: the converted update has {NON_FINITE} (the output dtype cannot "
                                   "hold its values); nothing was written")
        abs_err, rel_err = max_abs_and_relative(want, got)
        if not math.isfinite(rel_err):
            raise AdapterFileError(f"module {key}: the converted update cannot be compared with the input's "
                                   f"(difference {rel_err}); nothing was written")
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
        if rel_err > tol:
            raise AdapterFileError(f"module {key}: converted update differs by {rel_err:.2e} (relative), more than the "
                                   f"{tol:.0e} the output dtype allows; nothing was written")
    return worst_abs, worst_rel


def convert_adapter(src: str | Path, dst: str | Path, to: str | None = None, dtype: torch.dtype | None = None,
                    family: str | Family | None = None, component: str | None = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """Convert `src` (LyCORIS/kohya file or PEFT LoKr) into `dst`; returns what was done and the check.

    Nothing is written unless the input is a usable adapter (no NaN/inf either: a converter
    that copies them hides the damage) and the output's updates match it.
    """
    try:
        return _convert(src, dst, to, dtype, family, component, overwrite)
    except AdapterFileError as exc:
        if str(src) in str(exc):
            raise
        raise AdapterFileError(f"{src}: {exc}") from None  # every message names the input


def _convert(src: str | Path, dst: str | Path, to: str | None, dtype: torch.dtype | None, family: str | Family | None,
             component: str | None, overwrite: bool) -> dict[str, Any]:
    dst = Path(dst)
    to = to or ("lycoris" if dst.suffix == ".safetensors" else "peft")
    if to not in ("lycoris", "peft", *file_layouts()):
        raise ConfigError(f"--to must be lycoris, peft or a Flux.1 file layout ({', '.join(file_layouts())}), "
                          f"got {to!r}")
    if to != "peft" and dst.suffix != ".safetensors":
        raise ConfigError(f"{dst}: a LyCORIS adapter is one .safetensors file; end OUT with .safetensors")
    check_output(dst, overwrite)
    modules, reference, metadata, layout, notes, found = read_any(src, family, component)
    found = keymap.require_family(found, str(src))
    dora = next((k for k, m in modules.items() if DORA in m.extras), None)
    if dora is not None and (to != "lycoris" or found.naming_family.file_layouts):
        raise AdapterFileError(f"{src}: module {dora} uses DoRA (dora_scale); it converts only to the LyCORIS layout "
                               "of a family with one key layout (PEFT LoKr has no magnitude vector, and splitting "
                               "or stacking fused layers would change what the magnitude normalises)")
    if found.naming_family.file_layouts and to != "peft":
        return _convert_layout(src, dst, to, dtype, modules, reference, metadata, layout, notes, found)
    if to not in ("lycoris", "peft"):
        raise ConfigError(f"--to {to} is a file layout of {_layout_families(to)}; an {found.title} file converts to "
                          "lycoris or peft")
    report: dict[str, Any] = {"input": str(src), "output": str(dst), "from": layout, "to": to, "family": found.name,
                              "modules": len(modules), "renamed": 0, "unmatched": [], "changes": {}, "notes": notes}
    default_alpha = as_number(metadata.get("ss_network_dim"))
    out_key: dict[str, str] = {}
    plain: dict[str, FileModule] = {}
    for key, m in modules.items():
        canonical = keymap.canonical_key(found.naming_family, key)
        if canonical is None:
            report["unmatched"].append(key)
            canonical = key
        if canonical in plain:
            first = next(k for k, v in out_key.items() if v == canonical)
            raise AdapterFileError(f"{src}: modules {first} and {key} are the same module ({canonical})")
        report["renamed"] += canonical != key
        t, changes = plain_form(m, default_alpha)
        for c in changes:
            report["changes"][c] = report["changes"].get(c, 0) + 1
        if layout == "peft" and m.rank is None:  # from_peft folded alpha/r into w1; alpha = the network dim
            t["alpha"] = torch.tensor(default_alpha, dtype=torch.float32)
            report["changes"]["peft_scale_folded"] = report["changes"].get("peft_scale_folded", 0) + 1
        if dtype is not None:
            t = {n: (v if n == "alpha" else v.to(dtype)) for n, v in t.items()}
        out_key[key] = canonical
        plain[canonical] = group_modules({f"{canonical}.{n}": v for n, v in t.items()})[canonical]
    out_dtypes = {v.dtype for m in plain.values() for v in m.tensors.values()}
    tol = max(_REL_TOL.get(d, 1e-5) for d in out_dtypes)
    if to == "lycoris":
        tensors = {f"{k}.{n}": v for k, m in plain.items()
                   for n, v in {**m.tensors, **{n: e for n, e in m.extras.items() if n == DORA}, "alpha": m.alpha}.items()}
        produced = {k: plain[out_key[k]].delta() for k in reference}
        report["max_abs_diff"], report["max_rel_diff"] = _check(reference, produced, tol)
        write_safetensors(dst, tensors, _metadata(metadata, found.family, plain, dst, src))
    else:
        report.update(_write_peft(dst, plain, out_key, reference, found, component or "unet", metadata, tol, overwrite))
    return report


def file_layouts() -> list[str]:
    """The layout names of every family with several (Flux.1's six), for --to."""
    return list(dict.fromkeys(name for f in FAMILIES for name in f.file_layouts))


def _layout_families(layout: str) -> str:
    return " and ".join(dict.fromkeys(f.shared_title or f.title for f in FAMILIES if layout in f.file_layouts))


def _convert_layout(src: str | Path, dst: Path, to: str, dtype: torch.dtype | None, modules: Mapping[str, FileModule],
                    reference: Mapping[str, torch.Tensor], metadata: Mapping[str, str], layout: str, notes: list[str],
                    found: FileFamily) -> dict[str, Any]:
    """A file of a family with several key layouts (Flux.1) into layout `to`: each module in the
    safe profile first (plain_form), then renamed, split or stacked (tools.layouts); the check
    compares the update every Diffusers layer gets before and after."""
    family = found.naming_family
    if layout == "peft":  # its module paths would need the family's PEFT naming and alpha / r rules
        raise ConfigError(f"{src}: a PEFT folder of a {family.title} model cannot be converted yet: convert reads "
                          f"{family.title} adapter files in the key layouts of --to")
    report: dict[str, Any] = {"input": str(src), "output": str(dst), "from": layout, "to": to, "family": found.name,
                              "modules": len(modules), "layout": to, "changes": {}, "notes": notes}
    default_alpha = as_number(metadata.get("ss_network_dim"))
    plain: dict[str, FileModule] = {}
    for key, m in modules.items():
        t, changes = plain_form(m, default_alpha)
        for c in changes:
            report["changes"][c] = report["changes"].get(c, 0) + 1
        if dtype is not None:
            t = {n: (v if n == "alpha" else v.to(dtype)) for n, v in t.items()}
        plain[key] = _file_module(key, t)
    tensors, counts = layouts.relayout(plain, family, to, str(src))
    table, fused = keymap.alias_table(family), keymap.fused_table(family)
    report.update(renamed=counts["renamed"], split=counts["split"], stacked=counts["stacked"],
                  rescaled=counts["rescaled"], unmatched=[k for k in modules if k not in table and k not in fused])
    out = {k: _file_module(k, dict(t)) for k, t in tensors.items()}
    tol = max(_REL_TOL.get(v.dtype, 1e-5) for m in out.values() for v in m.tensors.values())
    report["max_abs_diff"], report["max_rel_diff"] = _check(
        layouts.per_layer(reference, family), layouts.per_layer({k: m.delta() for k, m in out.items()}, family), tol)
    meta = {**_metadata(metadata, found.family, out, dst, src), **family.layout_metadata(to)}
    write_safetensors(dst, {f"{k}.{n}": v for k, t in tensors.items() for n, v in t.items()}, meta)
    return report


def _file_module(key: str, tensors: dict[str, torch.Tensor]) -> FileModule:
    """A module from its tensors and alpha, whatever dots its key has."""
    t = dict(tensors)
    alpha = t.pop("alpha")
    return FileModule(key, t, alpha, {}, detect_algorithm(set(t)))


def _peft_metadata(config: Mapping, family: Family | None) -> dict[str, str]:
    """The sd-scripts metadata a PEFT adapter would have had: its global r and alpha, its factor."""
    args = {"algo": "lokr", "factor": config.get("decompose_factor", -1)}
    return training_metadata(family, args, int(config.get("r", 8)), float(config.get("alpha", 8)))


def _metadata(metadata: Mapping[str, str], fam: Family | None, plain: Mapping[str, FileModule], dst: Path,
              src: str | Path) -> dict[str, str]:
    """Keep the input's metadata, adding the base-model keys A1111 needs; bare files get the minimum.

    With no single family known (e.g. "SD 1.x or 2.x") no base-model version is guessed.
    """
    if metadata:
        meta = dict(metadata)
        if fam and "ss_base_model_version" not in meta:
            base = training_metadata(fam, {}, 0, 0)
            for k in ("ss_base_model_version", "ss_v2", "modelspec.architecture"):
                meta[k] = base[k]
    else:
        ranks = [m.rank for m in plain.values() if m.rank is not None]
        dim = max(ranks) if ranks else max(int(m.alpha) for m in plain.values())
        algos = sorted({m.algo.NAME for m in plain.values()})
        meta = training_metadata(fam, {"algo": ",".join(algos)}, dim, dim)
    meta["ss_output_name"] = meta["modelspec.title"] = dst.stem
    meta["lokr_diffusion_converted_from"] = Path(src).name
    return meta


def _write_peft(dst: Path, plain: Mapping[str, FileModule], out_key: Mapping[str, str], reference, family: FileFamily,
                component: str, metadata: Mapping[str, str], tol: float, overwrite: bool) -> dict[str, Any]:
    """One PEFT folder for one model (UNet or a text encoder), as PEFT's save_pretrained writes it."""
    chosen = {k: m for k, m in plain.items() if m.component == component}
    if not chosen:
        raise ConfigError(f"no {component} modules to convert; the file has "
                          f"{', '.join(sorted({m.component for m in plain.values()}))} (pick one with --component)")
    paths = {}
    for key in chosen:
        target = keymap.module_of(family.naming_family, key)
        if target is None:
            raise AdapterFileError(f"module {key} matches no module of an {family.name} model, so its PEFT path is "
                                   "unknown")
        kernel = tuple(int(k) for k in target.module.kernel_size) if hasattr(target.module, "kernel_size") else ()
        paths[key] = (target.path, kernel)
    hint = _factor_hint(metadata)
    tensors, config, expanded = peft.from_lycoris(chosen, paths, hint)
    groups = peft.group_peft(tensors)
    produced = {k: peft.peft_delta(groups[paths[c][0]], config, paths[c][0]) for k, c in out_key.items() if c in chosen}
    worst_abs, worst_rel = _check({k: reference[k] for k in produced}, produced, tol)
    with atomic_folder(dst, overwrite) as tmp:
        write_safetensors(tmp / peft.WEIGHTS_NAME, tensors, {"format": "pt"})
        (tmp / peft.CONFIG_NAME).write_text(json.dumps(config, indent=2))
    skipped: dict[str, int] = {}
    for m in plain.values():
        if m.component != component:
            skipped[m.component] = skipped.get(m.component, 0) + 1
    return {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "component": component, "skipped": skipped,
            "expanded_to_full": expanded, "decompose_factor": config["decompose_factor"]}


def _factor_hint(metadata: Mapping[str, str]) -> int | None:
    factor = as_number(network_args(metadata).get("factor"))
    return int(factor) if factor is not None else None


def format_convert(r: dict[str, Any]) -> str:
    lines = [(f"converted {r['input']} ({r['from']}) -> {r['output']} ({r['to']}), family {r['family']}, "
              f"{r['modules']} modules")]
    if r["renamed"]:
        names = f"the {r['layout']} layout" if r.get("layout") else "the sd-scripts names"
        lines.append(f"  renamed {r['renamed']} module keys to {names}")
    if r.get("split"):
        lines.append(f"  split {r['split']} modules over fused original layers into one module per Diffusers layer "
                     "(its rows of the update)")
    if r.get("stacked"):
        folded = f"; alpha / r folded into lora_up in {r['rescaled']} of them" if r.get("rescaled") else ""
        lines.append(f"  stacked the LoRA modules of {r['stacked']} fused layers into one module each (lora_down rows "
                     f"concatenated, lora_up block-diagonal{folded})")
    names = {"tucker": "Tucker layers rebuilt as plain w2", "w2_b_4d": "4-D w2_b flattened",
             "alpha_added": "alpha written where missing",
             "peft_scale_folded": "PEFT alpha/r folded into w1 (both factors full)"}
    for code, n in r["changes"].items():
        lines.append(f"  {names.get(code, code)}: {n}")
    if r.get("expanded_to_full"):
        lines.append("  low-rank factors stored full for PEFT (its rules would not build them low-rank): "
                     f"{r['expanded_to_full']}")
    if r.get("skipped"):
        lines.append("  not in this PEFT folder (one model per folder, see --component): "
                     + ", ".join(f"{c} {n}" for c, n in r["skipped"].items()))
    if r["unmatched"]:
        lines.append(f"  {len(r['unmatched'])} keys match no module of an {r['family']} model and were kept as they "
                     f"are, e.g. {r['unmatched'][0]}")
    lines += [f"  note: {n}" for n in r["notes"]]
    per = " per Diffusers layer" if r.get("layout") else ""
    lines.append(f"check: effective weights{per} equal, max abs diff {r['max_abs_diff']:.3g}, "
                 f"max relative diff {r['max_rel_diff']:.3g}")
    return "\n".join(lines)
