"""Moving an adapter between the file layouts of a family whose Diffusers model splits layers the
original model fuses (Flux.1: ``Family.file_layouts``), and the per-layer check that proves it.

Three operations, each exact:

* **rename**: a module whose layer has a key in both layouts (every Diffusers-named layout; the
  original names of layers Diffusers does not split) gets the target layout's key;
* **split**: a module over a fused original layer (kohya's ``img_attn.qkv``, ``linear1``) becomes
  one module per Diffusers layer, holding that layer's rows of the update. LoRA keeps
  ``lora_down`` and takes rows of ``lora_up``; LoHa takes rows of both ``hada_w*_a``; LoKr takes
  rows of w1 when every boundary falls on a whole block of w2's rows (the rows of kron(w1, w2)
  come in blocks of w2's height), else it cannot be split;
* **stack**: LoRA modules over the Diffusers layers of one fused original layer become one module:
  ``lora_down`` rows concatenated, ``lora_up`` block-diagonal (a layer the file does not patch gets
  zero rows). Members whose alpha / r differ get it folded into their block and the stack gets
  alpha = its rank (scale 1); members that agree keep their factors bit for bit. LoKr and LoHa
  cannot be stacked: separate Kronecker (Hadamard) products over q, k and v are not one product
  over the fused rows. The one exception is a fused layer with a single Diffusers layer (Flux's
  final modulation, its halves swapped): any algorithm moves there by reordering rows.

Row counts come from the file: a fused layer's row ranges are those of the real architecture,
scaled to the width the file's tensors have (tiny test models keep the real proportions).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from fractions import Fraction

import torch

from ..errors import AdapterFileError
from ..families import Family
from . import keymap
from .adapterfile import FileModule, lokr_factor_shapes
from .keymap import FusedLayer

Ranges = tuple[tuple[int, int], ...]


def layer_rows(layer: FusedLayer, rows: int, key: str) -> list[tuple[str, int, int]]:
    """The layer's slices for a file module over it with `rows` output rows (the real widths scaled)."""
    scale = Fraction(rows, layer.rows)
    out = []
    for member, start, stop in layer.slices:
        lo, hi = start * scale, stop * scale
        if lo.denominator != 1 or hi.denominator != 1:
            raise AdapterFileError(f"module {key}: its update has {rows} rows, which do not divide among "
                                   f"{', '.join(layer.members)} as the real model's {layer.rows} rows do")
        out.append((member, int(lo), int(hi)))
    return out


def placement(family: Family, key: str, rows: int) -> list[tuple[str, Ranges | None]] | None:
    """Where a file module's update lands: [(key we write for the layer, its rows of the update or
    None for all)], one entry for a 1:1 module, one per Diffusers layer for a fused one; None for
    a key no module of the family has."""
    hit = keymap.alias_table(family).get(key)
    if hit is not None:
        return [(hit[1], None)]
    layer = keymap.fused_table(family).get(key)
    if layer is None:
        return None
    ranges: dict[str, list[tuple[int, int]]] = {}
    for member, start, stop in layer_rows(layer, rows, key):
        ranges.setdefault(member, []).append((start, stop))
    return [(member, tuple(r)) for member, r in ranges.items()]


def per_layer(updates: Mapping[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """File-module updates (key -> scale * dW) -> the update each Diffusers layer gets, keyed by the
    key we write for it; keys no module of the family has stay as they are. Two file modules
    patching one layer are refused, as the loader refuses them."""
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, delta in updates.items():
        for target, ranges in placement(family, key, delta.shape[0]) or [(key, None)]:
            if target in out:
                raise AdapterFileError(f"modules {source[target]} and {key} both patch {target}")
            out[target] = delta if ranges is None else torch.cat([delta[a:b] for a, b in ranges])
            source[target] = key
    return out


def take_rows(m: FileModule, ranges: Ranges, why: str) -> dict[str, torch.Tensor]:
    """Tensors (alpha included) of a module whose update is rows `ranges` of `m`'s, in that order.
    Shared factors are copied: a file stores each tensor once."""
    t = {n: v.clone() for n, v in m.tensors.items()}
    name = m.algo.NAME
    if name == "lora":
        if "lora_mid.weight" in t:
            raise AdapterFileError(f"module {m.key}: a LoRA with lora_mid (Tucker) cannot be {why}")
        t["lora_up.weight"] = t["lora_up.weight"][_index(ranges)].contiguous()
    elif name == "loha":
        if "hada_t1" in t:
            raise AdapterFileError(f"module {m.key}: a Tucker LoHa (hada_t1) cannot be {why}")
        for n in ("hada_w1_a", "hada_w2_a"):
            t[n] = t[n][_index(ranges)].contiguous()
    else:
        _, (b, _) = lokr_factor_shapes(t)
        if any(lo % b or hi % b for lo, hi in ranges):
            raise AdapterFileError(
                f"module {m.key}: LoKr rows {_show(ranges)} cannot be {why}: kron(w1, w2) has its rows in blocks of "
                f"w2's {b}, and these boundaries cut through blocks, so no Kronecker product gives exactly those "
                "rows; keep this module in the layout with original names (the loaders apply it by row slices)")
        w1 = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
        t[w1] = t[w1][_index(tuple((lo // b, hi // b) for lo, hi in ranges))].contiguous()
    t["alpha"] = m.alpha.clone()
    return t


def _index(ranges: Ranges) -> torch.Tensor:
    return torch.cat([torch.arange(lo, hi) for lo, hi in ranges])


def _show(ranges: Ranges) -> str:
    return ", ".join(f"[{lo}, {hi})" for lo, hi in ranges)


def relayout(modules: Mapping[str, FileModule], family: Family, layout: str,
             source: str) -> tuple[dict[str, dict[str, torch.Tensor]], Counter]:
    """(output key -> tensors with alpha, counts of what was done) for `modules` in `layout`.

    Text-encoder modules get the family's own keys; keys no module of the family has are kept
    as they are (counted as "unmatched").
    """
    table, fused = keymap.alias_table(family), keymap.fused_table(family)
    out: dict[str, dict[str, torch.Tensor]] = {}
    origin: dict[str, str] = {}
    counts: Counter = Counter()
    stacks: dict[FusedLayer, dict[str, FileModule]] = {}

    def put(new_key: str, tensors: dict[str, torch.Tensor], key: str) -> None:
        if new_key in out:
            raise AdapterFileError(f"{source}: modules {origin[new_key]} and {key} both become {new_key}")
        out[new_key], origin[new_key] = tensors, key

    for key, m in modules.items():
        if key in table:
            target, canonical = table[key]
            new_key = family.layout_key(layout, target.path) if target.component == "unet" else canonical
            if new_key is None:  # a slice of a fused layer in this layout: stacked below
                members = stacks.setdefault(_stack_layer(fused, family, layout, canonical), {})
                if canonical in members:
                    raise AdapterFileError(f"{source}: modules {members[canonical].key} and {key} both patch "
                                           f"{canonical}")
                members[canonical] = m
                continue
            counts["renamed"] += new_key != key
            put(new_key, _tensors(m), key)
        elif key in fused:
            layer = fused[key]
            same = [k for k in layer.keys if family.denoiser_layout(k) == layout]
            if same:
                counts["renamed"] += same[0] != key
                put(same[0], _tensors(m), key)
                continue
            for member, ranges in placement(family, key, m.flat_shape()[0]):
                new_key = family.layout_key(layout, table[member][0].path)
                put(new_key, take_rows(m, ranges, f"split into {new_key}"), key)
            counts["split"] += 1
        else:
            counts["unmatched"] += 1
            put(key, _tensors(m), key)
    for layer, members in stacks.items():
        new_key = next(k for k in layer.keys if family.denoiser_layout(k) == layout)
        tensors, rescaled = stack(layer, members, new_key, source)
        put(new_key, tensors, ", ".join(m.key for m in members.values()))
        counts["stacked"] += 1
        counts["rescaled"] += rescaled
    return out, counts


def _tensors(m: FileModule) -> dict[str, torch.Tensor]:
    return {**m.tensors, "alpha": m.alpha}


def _stack_layer(fused: Mapping[str, FusedLayer], family: Family, layout: str, member: str) -> FusedLayer:
    """The fused layer of `layout` that holds Diffusers layer `member`; the widest one when several
    do (``linear1`` over ComfyUI's ``linear1_qkv``)."""
    layers = {id(layer): layer for key, layer in fused.items()
              if family.denoiser_layout(key) == layout and member in layer.members}
    if not layers:
        raise AdapterFileError(f"module {member} has no key in the {layout} layout, and no fused layer of it holds it")
    return max(layers.values(), key=lambda layer: (len(layer.members), layer.rows))


def stack(layer: FusedLayer, members: Mapping[str, FileModule], new_key: str,
          source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors of one module over the fused layer whose rows hold each member's update and zeros for
    layers the file does not patch, whether alpha / r was folded into lora_up)."""
    rows = layer.rows * _member_scale(layer, members, source)
    if rows.denominator != 1:
        raise AdapterFileError(f"{source}: {', '.join(m.key for m in members.values())}: their widths give {new_key} "
                               f"{float(rows):g} rows, not a whole number")
    slices = layer_rows(layer, int(rows), new_key)
    if len(layer.members) == 1:  # one layer, rows reordered (Flux's final modulation): any algorithm
        (member, m), = members.items()
        local, ranges = _local_rows(slices), []
        for _, start, stop in sorted(slices, key=lambda s: s[1]):
            ranges.append(local[(start, stop)])
        return take_rows(m, tuple(ranges), f"moved to {new_key}"), False
    algos = sorted({m.algo.NAME for m in members.values()})
    if algos != ["lora"]:
        names = ", ".join(sorted(m.key for m in members.values()))
        raise AdapterFileError(
            f"{source}: {names} ({'/'.join(algos)}) cannot become the one module {new_key} over the fused rows of "
            f"{', '.join(layer.members)}: separate Kronecker (LoKr) or Hadamard (LoHa) products of these layers are "
            "not one such product of the fused layer; only LoRA stacks (lora_down rows concatenated, lora_up block-"
            "diagonal). Convert to a layout with Diffusers names (lycoris, lora_transformer, transformer, bare) "
            "instead")
    return _stack_lora(slices, members)


def _member_scale(layer: FusedLayer, members: Mapping[str, FileModule], source: str) -> Fraction:
    """File rows per real-model row, the same for every member (else the file is no one model's)."""
    real = Counter()
    for member, start, stop in layer.slices:
        real[member] += stop - start
    scales = {member: Fraction(m.flat_shape()[0], real[member]) for member, m in members.items()}
    if len(set(scales.values())) != 1:
        shown = ", ".join(f"{m.key} {m.flat_shape()[0]} rows" for m in members.values())
        raise AdapterFileError(f"{source}: {shown}: these layers of one fused layer must have the real model's "
                               "proportions of rows")
    return next(iter(scales.values()))


def _local_rows(slices: list[tuple[str, int, int]]) -> dict[tuple[int, int], tuple[int, int]]:
    """(fused start, stop) -> the member's own rows: its slices, in order, make up its update."""
    seen: Counter = Counter()
    out = {}
    for member, start, stop in slices:
        out[(start, stop)] = (seen[member], seen[member] + stop - start)
        seen[member] += stop - start
    return out


def _stack_lora(slices: list[tuple[str, int, int]],
                members: Mapping[str, FileModule]) -> tuple[dict[str, torch.Tensor], bool]:
    order = [member for member in dict.fromkeys(s[0] for s in slices) if member in members]
    ins = {members[c].flat_shape()[1] for c in order}
    if len(ins) != 1:
        raise AdapterFileError(f"{', '.join(members[c].key for c in order)}: the layers of one fused layer must "
                               f"share their input width, got {sorted(ins)}")
    for c in order:
        if "lora_mid.weight" in members[c].tensors:
            raise AdapterFileError(f"module {members[c].key}: a LoRA with lora_mid (Tucker) cannot be stacked")
    dtype = members[order[0]].tensors["lora_up.weight"].dtype
    for c in order:
        dtype = torch.promote_types(dtype, members[c].tensors["lora_up.weight"].dtype)
    scales = {c: members[c].scale for c in order}
    same = len(set(scales.values())) == 1
    ranks = {c: members[c].rank for c in order}
    total_rank = sum(ranks.values())
    down = torch.cat([members[c].tensors["lora_down.weight"].to(dtype) for c in order])
    up = torch.zeros(max(stop for _, _, stop in slices), total_rank, dtype=dtype)
    column, local = {}, _local_rows(slices)
    for c in order:
        column[c] = sum(ranks[o] for o in order[:order.index(c)])
    for member, start, stop in slices:
        if member not in members:
            continue  # a layer the file does not patch: zero rows
        lo, hi = local[(start, stop)]
        block = members[member].tensors["lora_up.weight"][lo:hi]
        block = block.to(dtype) if same else (block.float() * scales[member]).to(dtype)
        up[start:stop, column[member]:column[member] + ranks[member]] = block
    alpha = scales[order[0]] * total_rank if same else float(total_rank)
    return {"lora_up.weight": up, "lora_down.weight": down,
            "alpha": torch.tensor(alpha, dtype=torch.float32)}, not same
