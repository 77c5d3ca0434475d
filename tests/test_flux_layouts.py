"""Flux.1 adapter files in every layout of the DiT spec (section 2), loaded into a tiny Diffusers
FluxTransformer2DModel and checked against an independent restatement of the format spec's math
(kron, Hadamard and up @ down products, scale = alpha / r) and of the name table of the DiT spec
(section 1): files keyed by the original names patch fused layers, whose update reaches the
Diffusers layers as row slices (q/k/v of `qkv`, q/k/v/MLP of `linear1`, the swapped halves of the
final modulation).

The Flux family itself (families/flux.py) is written elsewhere; these tests reach the loader through
`FluxNames`, the least a family needs (names from flux_names), registered for the test. The tests at
the end run only once families/flux.py exists and check that the real family loads the same way.
"""
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file
from torch import nn

from lokr_diffusion import families
from lokr_diffusion.errors import AdapterFileError
from lokr_diffusion.families import flux_names
from lokr_diffusion.families.flux import FLUX_DEV
from lokr_diffusion.layers import RowSliceAdapter
from lokr_diffusion.loading import load_network, split_key
from lokr_diffusion.pipelines import (fuse_adapter, list_adapters, load_adapter, set_adapter_scale, unfuse_adapter,
                                      unload_adapter)
from lokr_diffusion.tools.peft import is_peft_layout

TINY = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 32, "pooled_projection_dim": 32, "in_channels": 16, "axes_dims_rope": (4, 6, 6),
        "guidance_embeds": True}
H = 32  # 2 heads x 16

# -- the spec's name table, restated for the tiny model (one double and one single block) -------------
# original layer -> the Diffusers layers stacked in its rows, in order (one layer: 1:1)
ORIGINAL = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "double_blocks.0.img_attn.qkv": [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"],
    "double_blocks.0.txt_attn.qkv": [f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.txt_attn.proj": ["transformer_blocks.0.attn.to_add_out"],
    "double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.net.0.proj"],
    "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.net.2"],
    "double_blocks.0.txt_mlp.0": ["transformer_blocks.0.ff_context.net.0.proj"],
    "double_blocks.0.txt_mlp.2": ["transformer_blocks.0.ff_context.net.2"],
    "double_blocks.0.img_mod.lin": ["transformer_blocks.0.norm1.linear"],
    "double_blocks.0.txt_mod.lin": ["transformer_blocks.0.norm1_context.linear"],
    "single_blocks.0.linear1": [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    + ["single_transformer_blocks.0.proj_mlp"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.proj_out"],
    "single_blocks.0.modulation.lin": ["single_transformer_blocks.0.norm.linear"],
}
# stored as (shift, scale) in the original model, (scale, shift) in Diffusers: halves swapped
FINAL = "final_layer.adaLN_modulation.1"
SWAPPED = {FINAL: "norm_out.linear"}

LAYOUTS = {  # name -> (module key from a module path, whether the path is the original one)
    "lycoris": (lambda p: "lycoris_" + p.replace(".", "_"), False),
    "lora_transformer": (lambda p: "lora_transformer_" + p.replace(".", "_"), False),
    "transformer-dotted": (lambda p: "transformer." + p, False),
    "bare-dotted": (lambda p: p, False),
    "kohya": (lambda p: "lora_unet_" + p.replace(".", "_"), True),
    "diffusion_model-dotted": (lambda p: "diffusion_model." + p, True),
}
ALGOS = ("lokr", "lokr-lowrank", "lokr-both-lowrank", "loha", "lora")


FLUX_NAMES = FLUX_DEV  # the registered family; the layouts below are its aliases


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY).eval().requires_grad_(False)


@pytest.fixture
def registered():
    """The registry detects Flux from the model (kept as a fixture: the tests name what they need)."""
    assert families.family_of_models(FluxTransformer2DModel(**TINY)) is FLUX_DEV


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# -- the independent restatement of the math ------------------------------------------------------

def _factors(algo, out_dim, in_dim, g):
    """Random tensors of one module (file names), with an alpha other than the rank."""
    r = 2
    a, c = 4, 2  # w1 (a, c); every width of the tiny model divides by them
    b, d = out_dim // a, in_dim // c

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    if algo == "lokr":
        t = {"lokr_w1": rnd(a, c), "lokr_w2": rnd(b, d)}
    elif algo == "lokr-lowrank":
        t = {"lokr_w1": rnd(a, c), "lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d)}
    elif algo == "lokr-both-lowrank":
        t = {"lokr_w1_a": rnd(a, r), "lokr_w1_b": rnd(r, c), "lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d)}
    elif algo == "loha":
        t = {"hada_w1_a": rnd(out_dim, r), "hada_w1_b": rnd(r, in_dim), "hada_w2_a": rnd(out_dim, r),
             "hada_w2_b": rnd(r, in_dim)}
    else:
        t = {"lora_up.weight": rnd(out_dim, r), "lora_down.weight": rnd(r, in_dim)}
    t["alpha"] = torch.tensor(3.0)
    return t


def reference_delta(t):
    """scale * dW of one file module, by the format spec (sections 1 and 2)."""
    if any(k.startswith("lokr_") for k in t):
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        dw = torch.kron(w1, w2)
        # alpha / r with r of the decomposed factor (w2's first); both full: scale 1
        r = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else (t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None)
    elif "hada_w1_a" in t:
        dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        r = t["hada_w1_b"].shape[0]
    else:
        dw = t["lora_up.weight"] @ t["lora_down.weight"]
        r = t["lora_down.weight"].shape[0]
    return dw * (1.0 if r is None else float(t["alpha"]) / r)


def layout_units(model, original_table=None, swapped=None):
    """{file name: (Diffusers paths it covers, halves swapped)}: one per Diffusers layer, or with an
    original-name table one per original layer (fused or not) plus the swapped-halves layers."""
    if original_table is None:
        return {p: ([p], False) for p in _linears(model)}
    units = {name: (paths, False) for name, paths in original_table.items()}
    units.update({name: ([p], True) for name, p in (swapped or {}).items()})
    return units


def write_restated(model, units, key_of, algo, path, seed=0):
    """Write random factors for each unit under `key_of(name)`; return {Diffusers path: expected
    scale * dW}, the unit's update restated, its halves swapped if so, split by the layers' rows."""
    layers = _linears(model)
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for name, (paths, swapped) in units.items():
        out_dim = sum(layers[p].out_features for p in paths)
        t = _factors(algo, out_dim, layers[paths[0]].in_features, g)
        tensors.update({f"{key_of(name)}.{n}": v for n, v in t.items()})
        dw = reference_delta(t)
        if swapped:
            half = dw.shape[0] // 2
            dw = torch.cat([dw[half:], dw[:half]])
        for p, rows in zip(paths, dw.split([layers[p].out_features for p in paths])):
            expected[p] = rows
    save_file(tensors, str(path))
    return expected


def make_file(model, layout, algo, path, seed=0):
    """Write one module per layer of `layout` (the original names: per original layer, fused or
    not); return {Diffusers path: expected scale * dW}."""
    key_of, original = LAYOUTS[layout]
    units = layout_units(model, ORIGINAL, SWAPPED) if original else layout_units(model)
    return write_restated(model, units, key_of, algo, path, seed)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_patched(model, original, expected, multiplier=1.0):
    """Every layer in `expected` is W + multiplier * dW (fp32, relative error <= 1e-5); the rest untouched."""
    for name, layer in _linears(model).items():
        w0 = original[f"{name}.weight"]
        if name not in expected:
            assert torch.equal(layer.weight, w0), name
            continue
        ref = w0 + multiplier * expected[name]
        err = ((layer.weight - ref).norm() / ref.norm()).item()
        assert err <= 1e-5, (name, err)


def assert_restored(model, original):
    after = model.state_dict()
    assert all(torch.equal(after[k], original[k]) for k in original)


# -- every layout x algorithm through load_adapter / fuse / unload --------------------------------

@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_loads_fuses_and_unloads(model, registered, tmp_path, layout, algo):
    pipe = types.SimpleNamespace(transformer=model)
    original = _state(model)
    expected = make_file(model, layout, algo, tmp_path / "a.safetensors")
    assert set(expected) == set(_linears(model))  # every layer is reachable in every layout
    report = load_adapter(pipe, tmp_path / "a.safetensors", adapter_name="a", strict=True)
    n_file = len(ORIGINAL) + len(SWAPPED) if LAYOUTS[layout][1] else len(expected)
    assert report.patched == {"unet": n_file} and not report.unmatched
    if LAYOUTS[layout][1]:  # fused layers count once, with the number of layers they patched
        assert sorted(report.fused.values()) == [1, 3, 3, 4]  # final modulation, qkv x 2, linear1
    assert_restored(model, original)  # unfused: hooks only
    fuse_adapter(pipe)
    assert_patched(model, original, expected)
    unload_adapter(pipe)
    assert_restored(model, original)
    assert list_adapters(pipe) == {}


@pytest.mark.parametrize("layout", ["kohya", "diffusion_model-dotted"])
def test_unfused_forward_matches_patched_weights(model, registered, tmp_path, layout):
    """The hooks (inference rebuild and the per-call delta with grad on) give each layer W + dW."""
    pipe = types.SimpleNamespace(transformer=model)
    original = _state(model)
    expected = make_file(model, layout, "lokr-lowrank", tmp_path / "a.safetensors")
    load_adapter(pipe, tmp_path / "a.safetensors")
    layers = _linears(model)
    for name in ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp", "norm_out.linear"):
        layer = layers[name]
        x = torch.randn(3, layer.in_features)
        ref = F.linear(x, original[f"{name}.weight"] + expected[name], layer.bias)
        with torch.no_grad():
            assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5), name
        with torch.enable_grad():  # loaded factors require grad: the per-call delta path
            assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5), name
    unload_adapter(pipe)
    assert_restored(model, original)


def test_whole_model_forward_hooks_equal_fused(model, registered, tmp_path):
    pipe = types.SimpleNamespace(transformer=model)
    make_file(model, "kohya", "loha", tmp_path / "a.safetensors")
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 4, 16, generator=g),
              "encoder_hidden_states": torch.randn(1, 3, 32, generator=g),
              "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
              "guidance": torch.tensor([3.5]), "img_ids": torch.zeros(4, 3), "txt_ids": torch.zeros(3, 3)}
    with torch.no_grad():
        base = model(**inputs).sample
        load_adapter(pipe, tmp_path / "a.safetensors")
        hooked = model(**inputs).sample
        fuse_adapter(pipe)
        fused = model(**inputs).sample
        unload_adapter(pipe)
        after = model(**inputs).sample
    assert not torch.allclose(hooked, base)
    assert torch.allclose(hooked, fused, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, base)


def test_linear1_qkv_patches_only_q_k_v(model, registered, tmp_path):
    """ComfyUI's `linear1_qkv`: the first 3H rows of linear1; proj_mlp keeps its weight."""
    pipe = types.SimpleNamespace(transformer=model)
    original = _state(model)
    g = torch.Generator().manual_seed(2)
    t = _factors("lokr-lowrank", 3 * H, H, g)
    save_file({f"diffusion_model.single_blocks.0.linear1_qkv.{n}": v for n, v in t.items()},
              str(tmp_path / "q.safetensors"))
    report = load_adapter(pipe, tmp_path / "q.safetensors", strict=True)
    assert report.fused == {"diffusion_model.single_blocks.0.linear1_qkv": 3}
    fuse_adapter(pipe)
    q, k, v = reference_delta(t).split(H)
    prefix = "single_transformer_blocks.0.attn."
    assert_patched(model, original, {prefix + "to_q": q, prefix + "to_k": k, prefix + "to_v": v})
    unload_adapter(pipe)
    assert_restored(model, original)


def test_scale_stacking_and_unfuse_with_fused_slices(model, registered, tmp_path):
    pipe = types.SimpleNamespace(transformer=model)
    original = _state(model)
    a = make_file(model, "kohya", "lokr", tmp_path / "a.safetensors", seed=1)
    b = make_file(model, "transformer-dotted", "lora", tmp_path / "b.safetensors", seed=2)
    load_adapter(pipe, tmp_path / "a.safetensors", adapter_name="a", scale=0.5)
    load_adapter(pipe, tmp_path / "b.safetensors", adapter_name="b", scale=0.25)
    set_adapter_scale(pipe, "a", -0.75)
    fuse_adapter(pipe)
    both = {n: -0.75 * a[n] + 0.25 * b[n] for n in a}
    assert_patched(model, original, both)
    unfuse_adapter(pipe)
    assert_restored(model, original)
    set_adapter_scale(pipe, "b", 0.0)
    fuse_adapter(pipe, ["a", "b"])
    assert_patched(model, original, a, multiplier=-0.75)
    unload_adapter(pipe, "a")
    assert_restored(model, original)
    unload_adapter(pipe)
    assert_restored(model, original)


def test_network_merge_unmerge_remove(model, tmp_path):
    """Without pipelines: the network's own merge / unmerge / multiplier / remove act on every slice."""
    original = _state(model)
    expected = make_file(model, "diffusion_model-dotted", "lokr-both-lowrank", tmp_path / "a.safetensors")
    network, report = load_network(tmp_path / "a.safetensors", unet=model, family=FLUX_NAMES, strict=True,
                                   multiplier=0.5)
    slices = [a for a in network.adapters() if isinstance(a, RowSliceAdapter)]
    assert len(slices) == sum(report.fused.values()) == 11
    qkv = [a for a in slices if network.paths[a.key].startswith("transformer_blocks.0.attn.to_")]
    assert qkv[0].lokr_w1_a is qkv[1].lokr_w1_a  # the slices of one file module share its factors
    network.merge()
    assert_patched(model, original, expected, multiplier=0.5)
    network.unmerge()
    for name, layer in _linears(model).items():
        assert torch.allclose(layer.weight, original[f"{name}.weight"], atol=1e-6), name
    network.set_multiplier(0.0)
    network.set_enabled(False)
    network.remove()
    assert all(not hasattr(m, "_lokr_dispatch") for m in _linears(model).values())


# -- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_fused_module_with_wrong_row_count_is_named(model, tmp_path, algo):
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    g = torch.Generator().manual_seed(3)
    t = _factors(algo, 80, H, g)  # 80 rows where q, k, v need 3 x 32
    save_file({f"{key}.{n}": v for n, v in t.items()}, str(tmp_path / "bad.safetensors"))
    expected = rf"{key}.*fused weight of transformer_blocks\.0\.attn\.to_q.*\(96, 32\)"
    with pytest.raises(AdapterFileError, match=expected):
        load_network(tmp_path / "bad.safetensors", unet=model, family=FLUX_NAMES)
    assert all(not hasattr(m, "_lokr_dispatch") for m in _linears(model).values())  # nothing attached


def test_fused_and_split_keys_for_one_layer_are_refused(model, tmp_path):
    g = torch.Generator().manual_seed(4)
    tensors = {f"lora_unet_double_blocks_0_img_attn_qkv.{n}": v for n, v in _factors("lora", 3 * H, H, g).items()}
    tensors.update({f"transformer.transformer_blocks.0.attn.to_k.{n}": v for n, v in _factors("lora", H, H, g).items()})
    with pytest.raises(AdapterFileError, match="both patch unet module transformer_blocks.0.attn.to_k"):
        load_network(tensors, unet=model, family=FLUX_NAMES)


def test_unknown_modules_are_reported_with_the_closest_key(model, tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {f"lora_unet_double_blocks_0_img_attn_qkvv.{n}": v for n, v in _factors("lora", 3 * H, H, g).items()}
    tensors.update({f"transformer.proj_out.{n}": v for n, v in _factors("lora", 16, H, g).items()})
    with pytest.raises(AdapterFileError, match="closest: lora_unet_double_blocks_0_img_attn_qkv"):
        load_network(tensors, unet=model, family=FLUX_NAMES, strict=True)
    network, report = load_network(tensors, unet=model, family=FLUX_NAMES)
    assert report.unmatched == ["lora_unet_double_blocks_0_img_attn_qkvv"] and report.patched == {"unet": 1}
    network.remove()


# -- key splitting and layout detection ---------------------------------------------------------------

def test_split_key_handles_dotted_module_keys():
    known = {"transformer.transformer_blocks.0.attn.to_out.0", "lora_unet_x"}
    assert split_key("transformer.transformer_blocks.0.attn.to_q.lokr_w1") == \
        ("transformer.transformer_blocks.0.attn.to_q", "lokr_w1")
    assert split_key("diffusion_model.double_blocks.0.img_mlp.0.lora_down.weight") == \
        ("diffusion_model.double_blocks.0.img_mlp.0", "lora_down.weight")
    assert split_key("transformer.transformer_blocks.0.attn.to_out.0.alpha", known) == \
        ("transformer.transformer_blocks.0.attn.to_out.0", "alpha")
    assert split_key("lora_unet_x.lora_up.bias", known) == ("lora_unet_x", "lora_up.bias")  # an unknown tensor
    assert split_key("lora_unet_y.lokr_w9") == ("lora_unet_y", "lokr_w9")
    with pytest.raises(AdapterFileError, match="not of the form"):
        split_key("no_dot")


def test_dotted_file_layouts_are_not_peft():
    assert not is_peft_layout(["transformer.transformer_blocks.0.attn.to_q.lokr_w1",
                               "transformer.transformer_blocks.0.attn.to_q.alpha"])
    assert not is_peft_layout(["transformer_blocks.0.attn.to_q.hada_w1_a"])
    assert is_peft_layout(["base_model.model.transformer_blocks.0.attn.to_q.lokr_w1"])
    assert is_peft_layout(["transformer_blocks.0.attn.to_q.lokr_w1", "transformer_blocks.0.attn.to_q.lokr_w2"])


# -- flux_names on its own ------------------------------------------------------------------------------

def test_names_table_matches_the_restated_spec(model):
    layers = _linears(model)
    for original, paths in ORIGINAL.items():
        if len(paths) == 1:
            assert flux_names.original_path(paths[0]) == original
            assert flux_names.diffusers_path(original) == paths[0]
    for path in layers:
        if not any(path in p for p in ORIGINAL.values() if len(p) == 1):
            assert flux_names.original_path(path) is None, path  # row slices have no 1:1 original name
    groups = flux_names.fused_groups(model)
    for original, paths in ORIGINAL.items():
        if len(paths) > 1:
            stops = [sum(layers[p].out_features for p in paths[:i + 1]) for i in range(len(paths))]
            want = [(p, stop - layers[p].out_features, stop) for p, stop in zip(paths, stops)]
            assert groups["lora_unet_" + original.replace(".", "_")] == want
            assert groups["diffusion_model." + original] == want
    linear1 = groups["diffusion_model.single_blocks.0.linear1"]
    assert groups["diffusion_model.single_blocks.0.linear1_qkv"] == linear1[:3]
    swapped = [("norm_out.linear", H, 2 * H), ("norm_out.linear", 0, H)]
    assert groups["lora_unet_final_layer_adaLN_modulation_1"] == groups["diffusion_model." + FINAL] == swapped


def test_aliases_are_unique_and_cover_every_layer(model):
    layers = _linears(model)
    owner = {}
    for path in layers:
        aliases = flux_names.key_aliases(path, model)
        key_of = {name: f for name, (f, orig) in LAYOUTS.items() if not orig}
        diffusers_named = ("lycoris", "lora_transformer", "transformer-dotted", "bare-dotted")
        assert [key_of[n](path) for n in diffusers_named] == aliases[:4]
        for alias in aliases:
            assert owner.setdefault(alias, path) == path, alias
    groups = flux_names.fused_groups(model)
    assert not set(groups) & set(owner)
    split = {p for slices in groups.values() for p, _, _ in slices}
    one_to_one = {p for p in layers if flux_names.original_path(p)}
    assert split | one_to_one == set(layers) and not split & one_to_one


def test_real_flux_dev_names_on_the_meta_device():
    """Flux.1-dev (19 double, 38 single blocks, H = 3072): 504 layers, rows of linear1 as the spec says."""
    with torch.device("meta"):
        dev = FluxTransformer2DModel(guidance_embeds=True)
    layers = _linears(dev)
    assert len(layers) == 504
    groups = flux_names.fused_groups(dev)
    assert len(groups) == 2 * (19 * 2 + 38 * 2 + 1)
    assert groups["lora_unet_single_blocks_37_linear1"][-1] == ("single_transformer_blocks.37.proj_mlp", 9216, 21504)
    for slices in groups.values():
        for path, start, stop in slices:
            if path != "norm_out.linear":
                assert stop - start == layers[path].out_features, path
    covered = {p for slices in groups.values() for p, _, _ in slices}
    covered |= {p for p in layers if flux_names.original_path(p)}
    assert covered == set(layers)


# -- the registered family and the whole pipeline -------------------------------------



def test_real_family_uses_these_names(model):
    family = families.family_of_models(model)
    for path in _linears(model):
        assert set(flux_names.key_aliases(path, model)) <= set(family.denoiser_key_aliases(path, model)), path
    assert family.fused_groups(model) == flux_names.fused_groups(model)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_real_family_loads_every_layout(model, tmp_path, layout):
    original = _state(model)
    expected = make_file(model, layout, "lokr-lowrank", tmp_path / "a.safetensors")
    network, report = load_network(tmp_path / "a.safetensors", unet=model, strict=True)
    assert not report.unmatched
    network.merge()
    assert_patched(model, original, expected)
    network.remove()


def test_diffusers_peft_lora_names_without_alpha(model, tmp_path):
    """Diffusers' save_lora_weights / ai-toolkit layout: `transformer.<path>.lora_A.weight` and
    `lora_B.weight`, no alpha: scale 1, dW = B @ A, as Diffusers and ComfyUI apply it."""
    g = torch.Generator().manual_seed(3)
    paths = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"]
    tensors, expected = {}, {}
    linears = _linears(model)
    for p in paths:
        out_f, in_f = linears[p].weight.shape
        a, b = torch.randn(4, in_f, generator=g), torch.randn(out_f, 4, generator=g)
        tensors[f"transformer.{p}.lora_A.weight"], tensors[f"transformer.{p}.lora_B.weight"] = a, b
        expected[p] = linears[p].weight + b @ a
    save_file(tensors, tmp_path / "peft_lora.safetensors")
    network, report = load_network(tmp_path / "peft_lora.safetensors", unet=model, strict=True)
    assert report.patched == {"unet": 2} and sorted(report.without_alpha) == sorted(f"transformer.{p}" for p in paths)
    network.merge()
    for p in paths:
        torch.testing.assert_close(linears[p].weight, expected[p], rtol=1e-5, atol=1e-6)
    network.remove()
