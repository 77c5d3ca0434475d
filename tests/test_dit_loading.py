"""Loading-only DiT families (Flux.2, Qwen-Image, Z-Image): adapter files in every key layout ComfyUI
accepts for the model, loaded into a tiny Diffusers transformer of the family.

Files are written by an independent restatement, here, of each family's name table (Diffusers path
<-> original name, fused layers as stacked rows, read from ComfyUI's ``comfy/utils.py`` converters and
Diffusers' single-file converters) and of the format spec's math (``test_flux_layouts``: kron, Hadamard,
up @ down, alpha / r). Every layer must become W + dW (fp32, relative error <= 1e-5), and unloading
must give the weights back bit for bit.
"""
import types

import pytest
import torch
from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel, ZImageTransformer2DModel
from safetensors.torch import load_file, save_file

from lokr_diffusion import families
from lokr_diffusion.errors import AdapterFileError
from lokr_diffusion.families import FLUX2, QWEN_IMAGE, Z_IMAGE
from lokr_diffusion.loading import load_network
from lokr_diffusion.pipelines import (fuse_adapter, list_adapters, load_adapter, set_adapter_scale, unfuse_adapter,
                                      unload_adapter)
from lokr_diffusion.tools.convert import convert_adapter

from . import test_flux_layouts as flux1
from .test_flux_layouts import (_factors, _linears, _state, assert_patched, assert_restored, layout_units,
                                reference_delta, write_restated)
from .test_tools_helpers import run_cli, run_json

# -- tiny models: the real module trees at small widths -------------------------------------------------
TINY = {
    "flux2": (Flux2Transformer2DModel, {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
                                        "num_attention_heads": 2, "joint_attention_dim": 32, "in_channels": 16,
                                        "axes_dims_rope": (4, 4, 4, 4), "guidance_embeds": False}),
    "qwen-image": (QwenImageTransformer2DModel, {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                                                 "joint_attention_dim": 32, "in_channels": 16, "out_channels": 4,
                                                 "axes_dims_rope": (4, 6, 6)}),
    "z-image": (ZImageTransformer2DModel, {"dim": 48, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2,
                                           "n_kv_heads": 2, "in_channels": 4, "cap_feat_dim": 16,
                                           "axes_dims": [8, 8, 8], "axes_lens": [64, 32, 32]}),
}


def tiny(name, **overrides):
    cls, config = TINY[name]
    torch.manual_seed(0)
    return cls(**{**config, **overrides}).eval().requires_grad_(False)


# -- the name tables, restated ---------------------------------------------------------------------------
def flux2_original(model):
    """Flux.2 original name -> the Diffusers layers stacked in its rows; the final modulation apart."""
    table = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"], "final_layer.linear": ["proj_out"],
             "time_in.in_layer": ["time_guidance_embed.timestep_embedder.linear_1"],
             "time_in.out_layer": ["time_guidance_embed.timestep_embedder.linear_2"],
             "double_stream_modulation_img.lin": ["double_stream_modulation_img.linear"],
             "double_stream_modulation_txt.lin": ["double_stream_modulation_txt.linear"],
             "single_stream_modulation.lin": ["single_stream_modulation.linear"]}
    if model.config.guidance_embeds:
        table["guidance_in.in_layer"] = ["time_guidance_embed.guidance_embedder.linear_1"]
        table["guidance_in.out_layer"] = ["time_guidance_embed.guidance_embedder.linear_2"]
    for i in range(model.config.num_layers):
        d, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        table[d + "img_attn.qkv"] = [b + f"attn.to_{x}" for x in "qkv"]
        table[d + "txt_attn.qkv"] = [b + f"attn.add_{x}_proj" for x in "qkv"]
        table[d + "img_attn.proj"] = [b + "attn.to_out.0"]
        table[d + "txt_attn.proj"] = [b + "attn.to_add_out"]
        for s, t in (("img", "ff"), ("txt", "ff_context")):
            table[d + f"{s}_mlp.0"] = [b + f"{t}.linear_in"]
            table[d + f"{s}_mlp.2"] = [b + f"{t}.linear_out"]
    for i in range(model.config.num_single_layers):
        table[f"single_blocks.{i}.linear1"] = [f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"]
        table[f"single_blocks.{i}.linear2"] = [f"single_transformer_blocks.{i}.attn.to_out"]
    return table, {"final_layer.adaLN_modulation.1": "norm_out.linear"}  # (shift, scale) vs (scale, shift)


def z_image_original(model):
    table = {"x_embedder": ["all_x_embedder.2-1"], "final_layer.linear": ["all_final_layer.2-1.linear"],
             "final_layer.adaLN_modulation.1": ["all_final_layer.2-1.adaLN_modulation.1"],
             "t_embedder.mlp.0": ["t_embedder.mlp.0"], "t_embedder.mlp.2": ["t_embedder.mlp.2"],
             "cap_embedder.1": ["cap_embedder.1"]}
    n, r = model.config.n_layers, model.config.n_refiner_layers
    for block in [f"layers.{i}" for i in range(n)] + [f"{k}.{i}" for k in ("noise_refiner", "context_refiner")
                                                       for i in range(r)]:
        table[f"{block}.attention.qkv"] = [f"{block}.attention.to_{x}" for x in "qkv"]
        table[f"{block}.attention.out"] = [f"{block}.attention.to_out.0"]
        for w in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            table[f"{block}.{w}"] = [f"{block}.{w}"]
        if not block.startswith("context_refiner"):
            table[f"{block}.adaLN_modulation.0"] = [f"{block}.adaLN_modulation.0"]
    return table, {}


def same_names(model):
    """Qwen-Image: ComfyUI's model keeps the Diffusers names."""
    return {p: [p] for p in _linears(model)}, {}


def flat(prefix):
    return lambda n: prefix + n.replace(".", "_")


def dotted(prefix):
    return lambda n: prefix + n


# family -> layout -> (module key from a name, whether the names are the original ones)
LAYOUTS = {
    "flux2": {"lycoris": (flat("lycoris_"), False), "lora_transformer": (flat("lora_transformer_"), False),
              "transformer": (dotted("transformer."), False), "bare": (dotted(""), False),
              "kohya": (flat("lora_unet_"), True), "diffusion_model": (dotted("diffusion_model."), True)},
    "qwen-image": {"lycoris": (flat("lycoris_"), False), "transformer": (dotted("transformer."), False),
                   "bare": (dotted(""), False), "kohya": (flat("lora_unet_"), True),
                   "diffusion_model": (dotted("diffusion_model."), True)},
    "z-image": {"lycoris": (flat("lycoris_"), False), "transformer": (dotted("transformer."), False),
                "bare": (dotted(""), False), "kohya": (flat("lora_unet_"), True),
                "diffusion_model": (dotted("diffusion_model."), True),
                "diffusion_model-diffusers": (dotted("diffusion_model."), False)},
}
ORIGINAL = {"flux2": flux2_original, "qwen-image": same_names, "z-image": z_image_original}
FAMILY = {"flux2": FLUX2, "qwen-image": QWEN_IMAGE, "z-image": Z_IMAGE}
REPORTED = {"diffusion_model-diffusers": "diffusion_model"}  # the package's name of a test layout
CASES = [(f, layout) for f in LAYOUTS for layout in LAYOUTS[f]]


def make_file(model, family, layout, algo, path, seed=0, skip=()):
    """One module per layer in `layout` (per original layer, fused or not, for original names);
    returns ({Diffusers path: expected scale * dW}, units in the layout). Layers whose name
    matches `skip` are left out."""
    key_of, original = LAYOUTS[family][layout]
    units = layout_units(model, *ORIGINAL[family](model)) if original else layout_units(model)
    kept = {n: u for n, u in units.items() if not any(s in n for s in skip)}
    return write_restated(model, kept, key_of, algo, path, seed), len(units)


# -- every layout x algorithm through the pipeline API ---------------------------------------------------

@pytest.mark.parametrize("algo", ["lokr", "loha", "lora"])
@pytest.mark.parametrize("family,layout", CASES)
def test_layout_loads_fuses_and_unloads(tmp_path, family, layout, algo):
    model = tiny(family)
    pipe = types.SimpleNamespace(transformer=model)
    original = _state(model)
    expected, n_file = make_file(model, family, layout, algo, tmp_path / "a.safetensors")
    assert set(expected) == set(_linears(model))  # every layer is reachable in every layout
    report = load_adapter(pipe, tmp_path / "a.safetensors", adapter_name="a", strict=True)
    assert report.patched == {"unet": n_file} and not report.unmatched
    assert report.family == FAMILY[family].title
    assert_restored(model, original)  # hooks only
    fuse_adapter(pipe)
    assert_patched(model, original, expected)
    unload_adapter(pipe)
    assert_restored(model, original)
    assert list_adapters(pipe) == {}


@pytest.mark.parametrize("algo", ["lokr-lowrank", "lokr-both-lowrank"])
@pytest.mark.parametrize("family,layout", [("flux2", "kohya"), ("qwen-image", "transformer"), ("z-image", "kohya")])
def test_low_rank_lokr(tmp_path, family, layout, algo):
    model = tiny(family)
    original = _state(model)
    expected, _ = make_file(model, family, layout, algo, tmp_path / "a.safetensors")
    network, report = load_network(tmp_path / "a.safetensors", unet=model, strict=True)
    network.merge()
    assert_patched(model, original, expected)
    network.unmerge()
    network.remove()
    for name, layer in _linears(model).items():
        assert torch.allclose(layer.weight, original[f"{name}.weight"], atol=1e-6), name


def test_flux2_dev_guidance_embedder_names(tmp_path):
    """Flux.2 [dev] has the guidance embedder ([klein] has none): `guidance_in` <-> `guidance_embedder`."""
    model = tiny("flux2", guidance_embeds=True)
    original = _state(model)
    for layout in ("kohya", "transformer"):
        expected, _ = make_file(model, "flux2", layout, "lora", tmp_path / f"{layout}.safetensors")
        assert "time_guidance_embed.guidance_embedder.linear_2" in expected
        network, report = load_network(tmp_path / f"{layout}.safetensors", unet=model, strict=True)
        network.merge()
        assert_patched(model, original, expected)
        network.unmerge()
        network.remove()
        model.load_state_dict(original)


@pytest.mark.parametrize("family,layout", [("flux2", "diffusion_model"), ("z-image", "kohya"),
                                           ("qwen-image", "bare")])
def test_hooks_scales_stacking_and_unfuse(tmp_path, family, layout):
    """Unfused hooks give W + dW per layer (fused slices too); scales, two adapters, unfuse bit-exact."""
    model = tiny(family)
    pipe = types.SimpleNamespace(transformer=model)
    original = _state(model)
    a, _ = make_file(model, family, layout, "lokr", tmp_path / "a.safetensors", seed=1)
    b, _ = make_file(model, family, "lycoris", "lora", tmp_path / "b.safetensors", seed=2)
    load_adapter(pipe, tmp_path / "a.safetensors", adapter_name="a", scale=0.5)
    layers = _linears(model)
    for name in list(layers)[:: max(1, len(layers) // 6)]:
        layer = layers[name]
        x = torch.randn(3, layer.in_features)
        ref = torch.nn.functional.linear(x, original[f"{name}.weight"] + 0.5 * a[name], layer.bias)
        with torch.no_grad():
            assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5), name
    load_adapter(pipe, tmp_path / "b.safetensors", adapter_name="b", scale=0.25)
    set_adapter_scale(pipe, "a", -0.75)
    fuse_adapter(pipe)
    assert_patched(model, original, {n: -0.75 * a[n] + 0.25 * b[n] for n in a})
    unfuse_adapter(pipe)
    assert_restored(model, original)
    unload_adapter(pipe, "a")
    fuse_adapter(pipe)
    assert_patched(model, original, b, multiplier=0.25)
    unload_adapter(pipe)
    assert_restored(model, original)


def test_whole_model_forward_hooks_equal_fused(tmp_path):
    """Z-Image end to end: the hooked forward equals the fused one and unloading restores the output."""
    model = tiny("z-image")
    pipe = types.SimpleNamespace(transformer=model)
    make_file(model, "z-image", "kohya", "loha", tmp_path / "a.safetensors")
    g = torch.Generator().manual_seed(1)
    inputs = {"x": [torch.randn(4, 1, 4, 4, generator=g)], "t": torch.tensor([0.5]),
              "cap_feats": [torch.randn(3, 16, generator=g)]}
    with torch.no_grad():
        base = model(**inputs, return_dict=False)[0][0]
        load_adapter(pipe, tmp_path / "a.safetensors")
        hooked = model(**inputs, return_dict=False)[0][0]
        fuse_adapter(pipe)
        fused = model(**inputs, return_dict=False)[0][0]
        unload_adapter(pipe)
        after = model(**inputs, return_dict=False)[0][0]
    assert not torch.allclose(hooked, base)
    assert torch.allclose(hooked, fused, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, base)


def test_peft_default_adapter_names(tmp_path):
    """`<path>.lora_A.default.weight` / `lora_B.default.weight` (ComfyUI reads them for Qwen-Image)."""
    model = tiny("qwen-image")
    linears = _linears(model)
    p = "transformer_blocks.1.img_mod.1"
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, linears[p].in_features, generator=g), torch.randn(linears[p].out_features, 4, generator=g)
    save_file({f"{p}.lora_A.default.weight": a, f"{p}.lora_B.default.weight": b}, str(tmp_path / "d.safetensors"))
    expected = linears[p].weight + b @ a
    network, report = load_network(tmp_path / "d.safetensors", unet=model, strict=True)
    network.merge()
    torch.testing.assert_close(linears[p].weight, expected, rtol=1e-5, atol=1e-6)
    network.remove()


# -- detection ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(TINY))
def test_detection_from_model_pipeline_and_checkpoint(family):
    model = tiny(family)
    fam = FAMILY[family]
    assert families.family_of_models(model) is fam
    assert families.family_of_pipeline(types.SimpleNamespace(transformer=model)) is fam
    assert families.get_family(family) is fam and not fam.trains and fam.layout_written == ""
    keys = {"flux2": ["double_stream_modulation_img.lin.weight", "double_blocks.0.img_attn.qkv.weight"],
            "qwen-image": ["transformer_blocks.0.img_mod.1.weight", "txt_in.weight"],
            "z-image": ["noise_refiner.0.attention.qkv.weight", "cap_pad_token", "x_pad_token"]}[family]
    assert families.family_of_checkpoint_keys(["model.diffusion_model." + k for k in keys]) is fam
    pipelines = {"flux2": ["Flux2KleinPipeline", "Flux2Pipeline"], "qwen-image": ["QwenImagePipeline"],
                 "z-image": ["ZImagePipeline"]}[family]
    assert all(families.family_of_pipeline_class(p) is fam for p in pipelines)
    assert families.family_of_pipeline_class("FluxPipeline") is families.FLUX_DEV


@pytest.mark.parametrize("family,layout", CASES)
def test_detection_from_files(tmp_path, family, layout):
    from lokr_diffusion.tools.adapterfile import detect_family, group_modules

    model = tiny(family)
    make_file(model, family, layout, "lora", tmp_path / "a.safetensors")
    modules = group_modules(load_file(str(tmp_path / "a.safetensors")))
    assert families.family_of_adapter_keys(list(modules)).family is FAMILY[family]
    assert detect_family(modules, {}).family is FAMILY[family]


def test_flux2_told_from_flux1_by_widths(tmp_path):
    """A kohya Flux.2 file without the modulation and embedder layers uses only names Flux.1 has too
    (double_blocks qkv / proj / mlp, single_blocks linear1 / linear2): the MLP widths decide."""
    from lokr_diffusion.tools.adapterfile import detect_family, group_modules

    model = tiny("flux2")
    make_file(model, "flux2", "kohya", "lora", tmp_path / "a.safetensors",
              skip=("modulation", "time_in", "img_in", "txt_in", "final_layer"))
    modules = group_modules(load_file(str(tmp_path / "a.safetensors")))
    assert set(families.family_of_adapter_keys(list(modules)).candidates) >= {FLUX2, families.FLUX_DEV}
    assert detect_family(modules, {}).family is FLUX2
    flux1_model = flux1.FluxTransformer2DModel(**flux1.TINY)
    flux1.make_file(flux1_model, "kohya", "lora", tmp_path / "f.safetensors")
    found = detect_family(group_modules(load_file(str(tmp_path / "f.safetensors"))), {})
    assert FLUX2 not in found.candidates and families.FLUX_DEV in found.candidates


@pytest.mark.parametrize("file_family,model_family", [("qwen-image", "flux2"), ("z-image", "qwen-image"),
                                                      ("flux2", "z-image"), ("flux2", "qwen-image")])
def test_file_of_another_family_is_refused(tmp_path, file_family, model_family):
    make_file(tiny(file_family), file_family, "transformer", "lora", tmp_path / "a.safetensors")
    model = tiny(model_family)
    original = _state(model)
    with pytest.raises(AdapterFileError, match=rf"for {FAMILY[file_family].title}, but the model is "
                                               rf"{FAMILY[model_family].title}"):
        load_adapter(types.SimpleNamespace(transformer=model), tmp_path / "a.safetensors")
    assert_restored(model, original)


def test_flux1_file_is_refused_by_qwen_image_and_flux2(tmp_path):
    flux1.make_file(flux1.FluxTransformer2DModel(**flux1.TINY), "transformer-dotted", "lora", tmp_path / "f.safetensors")
    for family in ("qwen-image", "flux2"):
        with pytest.raises(AdapterFileError, match=rf"for Flux.1 \[dev\] or Flux.1 \[schnell\], but the model is {FAMILY[family].title}"):
            load_adapter(types.SimpleNamespace(transformer=tiny(family)), tmp_path / "f.safetensors")
    make_file(tiny("qwen-image"), "qwen-image", "bare", "lora", tmp_path / "q.safetensors")
    with pytest.raises(AdapterFileError, match=r"for Qwen-Image, but the model is Flux.1 \[dev\]"):
        load_network(tmp_path / "q.safetensors", unet=flux1.FluxTransformer2DModel(**flux1.TINY))


def test_shared_names_only_stay_open_to_every_family(tmp_path):
    """Attention q/k/v of double block 0 are named alike in Flux.1, Flux.2 and Qwen-Image: the file loads
    into each of them."""
    g = torch.Generator().manual_seed(4)
    tensors = {f"transformer.transformer_blocks.0.attn.to_{x}.{n}": v for x in "qkv"
               for n, v in _factors("lora", 32, 32, g).items()}
    save_file(tensors, str(tmp_path / "qkv.safetensors"))
    found = families.family_of_adapter_keys([f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"])
    assert {FLUX2, QWEN_IMAGE, families.FLUX_DEV} <= set(found.candidates) and found.family is None
    for family in ("flux2", "qwen-image"):
        network, report = load_network(tmp_path / "qkv.safetensors", unet=tiny(family), strict=True)
        assert report.patched == {"unet": 3}
        network.remove()


def test_text_encoder_keys_are_reported_as_out_of_scope(tmp_path, caplog):
    model = tiny("qwen-image")
    g = torch.Generator().manual_seed(5)
    tensors = {f"transformer.img_in.{n}": v for n, v in _factors("lora", 32, 16, g).items()}
    tensors.update({f"lora_te1_model_layers_0_self_attn_q_proj.{n}": v for n, v in _factors("lora", 8, 8, g).items()})
    save_file(tensors, str(tmp_path / "te.safetensors"))
    with pytest.raises(AdapterFileError, match="a text-encoder key: lokr-diffusion loads Qwen-Image adapters into "
                                               "the transformer only"):
        load_network(tmp_path / "te.safetensors", unet=model, strict=True)
    network, report = load_network(tmp_path / "te.safetensors", unet=model)
    assert report.unmatched == ["lora_te1_model_layers_0_self_attn_q_proj"] and report.patched == {"unet": 1}
    assert "Qwen2.5-VL-7B" in caplog.text
    network.remove()


# -- the real architectures on the meta device ----------------------------------------------------------------

@pytest.mark.parametrize("family,linears,billions", [("flux2", 109, 3.88), ("qwen-image", 846, 20.43),
                                                     ("z-image", 276, 6.15)])
def test_real_architectures(family, linears, billions):
    """FLUX.2 [klein] 4B: 5 x 12 + 20 x 2 + 9 outside the blocks; Qwen-Image: 60 x 14 + 6; Z-Image:
    30 x 8 + 2 x 8 (noise refiner) + 2 x 7 (context refiner, no modulation) + 6."""
    fam = FAMILY[family]
    model, encoders = fam.build_meta()
    layers = _linears(model)
    assert len(layers) == linears and encoders == []
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    covered = {p for slices in fam.fused_groups(model).values() for p, _, _ in slices}
    covered |= {p for p in layers if fam.original_path(p)}
    assert covered == set(layers)  # every layer has an original name, 1:1 or as rows of a fused one
    assert all(fam.names_adapter_key(k) for p in layers for k in fam.denoiser_key_aliases(p, model))


# -- inspect and convert ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,layout", CASES)
def test_inspect_reports_family_and_layout(capsys, tmp_path, family, layout):
    model = tiny(family)
    _, n = make_file(model, family, layout, "lokr", tmp_path / "a.safetensors")
    r = run_json(capsys, "inspect", tmp_path / "a.safetensors")
    name = REPORTED.get(layout, layout)
    assert r["family"] == family and r["denoiser"] == "transformer"
    assert r["key_layouts"] == {name: n} and r["components"] == {"unet": n}
    ui = {u["ui"]: u["support"] for u in r["ui_support"]}
    skipped = 5 if family == "flux2" and not LAYOUTS[family][layout][1] else 0  # time embedder, 3 modulations
    assert ui["ComfyUI"].startswith(f"skips {skipped} of {n}" if skipped else f"applies all {n}")
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "a.safetensors")
    assert code == 0 and f"family:      {FAMILY[family].title} (from keys (module names))" in out


@pytest.mark.parametrize("family,src,dst,algo", [
    ("z-image", "kohya", "lycoris", "lora"),  # split the fused qkv
    ("z-image", "lycoris", "kohya", "lora"),  # stack it again
    ("z-image", "lycoris", "diffusion_model", "loha"),  # Diffusers names there: a rename, no stacking
    ("flux2", "kohya", "bare", "loha"),
    ("flux2", "lora_transformer", "diffusion_model", "lora"),
    ("qwen-image", "lycoris", "kohya", "lokr"),
    ("qwen-image", "diffusion_model", "transformer", "loha"),
])
def test_convert_between_layouts(tmp_path, family, src, dst, algo):
    model = tiny(family)
    expected, _ = make_file(model, family, src, algo, tmp_path / "in.safetensors")
    r = convert_adapter(tmp_path / "in.safetensors", tmp_path / "out.safetensors", to=dst)
    assert r["family"] == family
    keys = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in load_file(tmp_path / "out.safetensors")}
    assert all(FAMILY[family].denoiser_layout(k) == dst for k in keys), sorted(keys)[:3]
    original = _state(model)
    network, report = load_network(tmp_path / "out.safetensors", unet=model, strict=True)
    network.merge()
    assert_patched(model, original, expected)
    network.remove()


def test_convert_splits_lokr_on_whole_w2_blocks(tmp_path):
    """A LoKr over the fused qkv whose w1 has 3 rows: each of q, k, v is one row of w1 (exact split)."""
    model = tiny("z-image")
    g = torch.Generator().manual_seed(6)
    t = {"lokr_w1": torch.randn(3, 2, generator=g), "lokr_w2_a": torch.randn(48, 2, generator=g),
         "lokr_w2_b": torch.randn(2, 24, generator=g), "alpha": torch.tensor(1.0)}
    save_file({f"lora_unet_layers_0_attention_qkv.{n}": v for n, v in t.items()}, str(tmp_path / "in.safetensors"))
    r = convert_adapter(tmp_path / "in.safetensors", tmp_path / "out.safetensors", to="transformer")
    assert r["family"] == "z-image"
    assert {k.rsplit(".", 1)[0] for k in load_file(tmp_path / "out.safetensors")} == \
        {f"transformer.layers.0.attention.to_{x}" for x in "qkv"}
    q, k, v = reference_delta(t).split(48)
    original = _state(model)
    network, _ = load_network(tmp_path / "out.safetensors", unet=model, strict=True)
    network.merge()
    block = "layers.0.attention.to_"
    assert_patched(model, original, {block + "q": q, block + "k": k, block + "v": v})
    network.remove()


def test_convert_refuses_to_stack_lokr_into_a_fused_qkv(tmp_path):
    model = tiny("flux2")
    make_file(model, "flux2", "lycoris", "lokr", tmp_path / "in.safetensors")
    with pytest.raises(AdapterFileError, match="cannot become the one module"):
        convert_adapter(tmp_path / "in.safetensors", tmp_path / "out.safetensors", to="kohya")


def test_layouts_named_for_every_layer():
    """Each family's layout_key gives a key its own detection names, for every layer of the tiny model."""
    for family, fam in FAMILY.items():
        model = tiny(family)
        for path in _linears(model):
            for layout in fam.file_layouts:
                key = fam.layout_key(layout, path)
                if key is not None:
                    assert fam.denoiser_layout(key) == layout, (family, layout, key)
                    assert key in fam.denoiser_key_aliases(path, model)
                else:
                    assert fam.key_layouts[layout].original and fam.original_path(path) is None
    assert FLUX2.layout_key("kohya", "transformer_blocks.0.attn.to_q") is None  # a row slice of img_attn.qkv
