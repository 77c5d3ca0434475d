"""SD3 / SD3.5 adapter files in every layout ComfyUI reads for SD3 (DiT spec, section 2), loaded into
a tiny Diffusers SD3Transformer2DModel and checked against an independent restatement of the
format spec's math (tests/test_flux_layouts.py: kron, Hadamard and up @ down products, scale =
alpha / r) and of the name table (Diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`,
ComfyUI's `mmdit_to_diffusers`), restated below for a two-block model: files keyed by the original
names patch fused layers, whose update reaches the Diffusers layers as row slices (q/k/v of `qkv`,
the swapped halves of the final modulation and of the last block's text modulation).

The tiny model has SD3.5 Medium's tree (block 0 has `attn2`, block 1 is `context_pre_only`), so
every kind of layer is covered; a Large-shaped one (no `attn2`) loads every layout too. The
2x2 patch-embedding conv maps 1:1 by name and is left out of the files (Linear layers only).
"""
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import save_file

from lokr_diffusion import families
from lokr_diffusion.errors import AdapterFileError
from lokr_diffusion.families import SD35_LARGE, SD35_MEDIUM, sd3_names
from lokr_diffusion.layers import RowSliceAdapter
from lokr_diffusion.loading import load_network
from lokr_diffusion.tools.peft import is_peft_layout
from lokr_diffusion.pipelines import (fuse_adapter, list_adapters, load_adapter, set_adapter_scale, unfuse_adapter,
                                      unload_adapter)

from .test_flux_layouts import (ALGOS, _factors, _linears, _state, assert_patched, assert_restored, layout_units,
                                reference_delta, write_restated)

TINY = {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "caption_projection_dim": 32,
        "joint_attention_dim": 32, "pooled_projection_dim": 32, "in_channels": 16, "out_channels": 16,
        "patch_size": 2, "pos_embed_max_size": 16, "sample_size": 8, "qk_norm": "rms_norm",
        "dual_attention_layers": (0,)}
H = 32  # 2 heads x 16

# -- the name table, restated for the tiny model ----------------------------------------------------
# original layer -> the Diffusers layers stacked in its rows, in order (one layer: 1:1)
ORIGINAL = {
    "context_embedder": ["context_embedder"],
    "t_embedder.mlp.0": ["time_text_embed.timestep_embedder.linear_1"],
    "t_embedder.mlp.2": ["time_text_embed.timestep_embedder.linear_2"],
    "y_embedder.mlp.0": ["time_text_embed.text_embedder.linear_1"],
    "y_embedder.mlp.2": ["time_text_embed.text_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
}
for _i in (0, 1):
    _b, _j = f"transformer_blocks.{_i}", f"joint_blocks.{_i}"
    ORIGINAL.update({
        f"{_j}.x_block.attn.qkv": [f"{_b}.attn.to_{x}" for x in "qkv"],
        f"{_j}.context_block.attn.qkv": [f"{_b}.attn.add_{x}_proj" for x in "qkv"],
        f"{_j}.x_block.attn.proj": [f"{_b}.attn.to_out.0"],
        f"{_j}.x_block.mlp.fc1": [f"{_b}.ff.net.0.proj"],
        f"{_j}.x_block.mlp.fc2": [f"{_b}.ff.net.2"],
        f"{_j}.x_block.adaLN_modulation.1": [f"{_b}.norm1.linear"],
    })
ORIGINAL.update({  # block 0 only: a full text stream (block 1 is context_pre_only) and attn2
    "joint_blocks.0.context_block.attn.proj": ["transformer_blocks.0.attn.to_add_out"],
    "joint_blocks.0.context_block.mlp.fc1": ["transformer_blocks.0.ff_context.net.0.proj"],
    "joint_blocks.0.context_block.mlp.fc2": ["transformer_blocks.0.ff_context.net.2"],
    "joint_blocks.0.context_block.adaLN_modulation.1": ["transformer_blocks.0.norm1_context.linear"],
    "joint_blocks.0.x_block.attn2.qkv": [f"transformer_blocks.0.attn2.to_{x}" for x in "qkv"],
    "joint_blocks.0.x_block.attn2.proj": ["transformer_blocks.0.attn2.to_out.0"],
})
# stored as (shift, scale) in the original model, (scale, shift) in Diffusers: halves swapped
SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear",
           "joint_blocks.1.context_block.adaLN_modulation.1": "transformer_blocks.1.norm1_context.linear"}

LAYOUTS = {  # name -> (module key from a module path, whether the path is the original one)
    "lycoris": (lambda p: "lycoris_" + p.replace(".", "_"), False),
    "lora_transformer": (lambda p: "lora_transformer_" + p.replace(".", "_"), False),
    "transformer-dotted": (lambda p: "transformer." + p, False),
    "bare-dotted": (lambda p: p, False),
    "base_model-dotted": (lambda p: "base_model.model." + p, False),
    "kohya": (lambda p: "lora_unet_" + p.replace(".", "_"), True),
    "diffusion_model-dotted": (lambda p: "diffusion_model." + p, True),
}


def _tiny(**overrides):
    torch.manual_seed(0)
    return SD3Transformer2DModel(**{**TINY, **overrides}).eval().requires_grad_(False)


@pytest.fixture
def model():
    return _tiny()


@pytest.fixture
def large_model():
    """Large's tree: no attn2 anywhere."""
    return _tiny(dual_attention_layers=())


def make_file(model, layout, algo, path, seed=0, original_table=None):
    """Write one module per layer of `layout` (the original names: per original layer, fused or
    not); return {Diffusers path: expected scale * dW}."""
    key_of, original = LAYOUTS[layout]
    units = layout_units(model, original_table or ORIGINAL, SWAPPED) if original else layout_units(model)
    return write_restated(model, units, key_of, algo, path, seed)


def _without_attn2(table):
    return {k: v for k, v in table.items() if ".attn2." not in k}


# -- every layout x algorithm through load_adapter / fuse / unload --------------------------------

@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_loads_fuses_and_unloads(model, tmp_path, layout, algo):
    pipe = types.SimpleNamespace(transformer=model)
    original = _state(model)
    expected = make_file(model, layout, algo, tmp_path / "a.safetensors")
    assert set(expected) == set(_linears(model))  # every layer is reachable in every layout
    report = load_adapter(pipe, tmp_path / "a.safetensors", adapter_name="a", strict=True)
    n_file = len(ORIGINAL) + len(SWAPPED) if LAYOUTS[layout][1] else len(expected)
    assert report.patched == {"unet": n_file} and not report.unmatched
    if LAYOUTS[layout][1]:  # fused layers count once, with the number of layers they patched
        assert sorted(report.fused.values()) == [1, 1, 3, 3, 3, 3, 3]  # 2 modulations, qkv x 5
    assert_restored(model, original)  # unfused: hooks only
    fuse_adapter(pipe)
    assert_patched(model, original, expected)
    unload_adapter(pipe)
    assert_restored(model, original)
    assert list_adapters(pipe) == {}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_large_tree_loads_every_layout(large_model, tmp_path, layout):
    """Without attn2 (SD3.5 Large's tree), through the registered family the model is detected as."""
    assert families.family_of_models(large_model) is SD35_LARGE
    original = _state(large_model)
    expected = make_file(large_model, layout, "lokr-lowrank", tmp_path / "a.safetensors",
                         original_table=_without_attn2(ORIGINAL))
    network, report = load_network(tmp_path / "a.safetensors", unet=large_model, strict=True)
    assert not report.unmatched and network.family is SD35_LARGE
    network.merge()
    assert_patched(large_model, original, expected)
    network.remove()


@pytest.mark.parametrize("layout", ["kohya", "diffusion_model-dotted"])
def test_unfused_forward_matches_patched_weights(model, tmp_path, layout):
    """The hooks (inference rebuild and the per-call delta with grad on) give each layer W + dW."""
    pipe = types.SimpleNamespace(transformer=model)
    original = _state(model)
    expected = make_file(model, layout, "lokr-lowrank", tmp_path / "a.safetensors")
    load_adapter(pipe, tmp_path / "a.safetensors")
    layers = _linears(model)
    for name in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn2.to_v", "norm_out.linear",
                 "transformer_blocks.1.norm1_context.linear", "transformer_blocks.1.attn.add_q_proj"):
        layer = layers[name]
        x = torch.randn(3, layer.in_features)
        ref = F.linear(x, original[f"{name}.weight"] + expected[name], layer.bias)
        with torch.no_grad():
            assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5), name
        with torch.enable_grad():  # loaded factors require grad: the per-call delta path
            assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5), name
    unload_adapter(pipe)
    assert_restored(model, original)


def test_whole_model_forward_hooks_equal_fused(model, tmp_path):
    pipe = types.SimpleNamespace(transformer=model)
    make_file(model, "kohya", "loha", tmp_path / "a.safetensors")
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 16, 4, 4, generator=g),
              "encoder_hidden_states": torch.randn(1, 3, 32, generator=g),
              "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([500.0])}
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


def test_scale_stacking_and_unfuse_with_fused_slices(model, tmp_path):
    pipe = types.SimpleNamespace(transformer=model)
    original = _state(model)
    a = make_file(model, "kohya", "lokr", tmp_path / "a.safetensors", seed=1)
    b = make_file(model, "base_model-dotted", "lora", tmp_path / "b.safetensors", seed=2)
    load_adapter(pipe, tmp_path / "a.safetensors", adapter_name="a", scale=0.5)
    load_adapter(pipe, tmp_path / "b.safetensors", adapter_name="b", scale=0.25)
    set_adapter_scale(pipe, "a", -0.75)
    fuse_adapter(pipe)
    assert_patched(model, original, {n: -0.75 * a[n] + 0.25 * b[n] for n in a})
    unfuse_adapter(pipe)
    assert_restored(model, original)
    unload_adapter(pipe, "a")
    unload_adapter(pipe)
    assert_restored(model, original)


def test_network_merge_unmerge_remove(model, tmp_path):
    """Without pipelines: the network's own merge / unmerge / multiplier / remove act on every slice."""
    original = _state(model)
    expected = make_file(model, "diffusion_model-dotted", "lokr-both-lowrank", tmp_path / "a.safetensors")
    network, report = load_network(tmp_path / "a.safetensors", unet=model, family=SD35_MEDIUM, strict=True,
                                   multiplier=0.5)
    slices = [a for a in network.adapters() if isinstance(a, RowSliceAdapter)]
    assert len(slices) == sum(report.fused.values()) == 17
    qkv = [a for a in slices if network.paths[a.key].startswith("transformer_blocks.0.attn2.to_")]
    assert len(qkv) == 3 and qkv[0].lokr_w1_a is qkv[2].lokr_w1_a  # the slices of one file module share factors
    network.merge()
    assert_patched(model, original, expected, multiplier=0.5)
    network.unmerge()
    for name, layer in _linears(model).items():
        assert torch.allclose(layer.weight, original[f"{name}.weight"], atol=1e-6), name
    network.remove()
    assert all(not hasattr(m, "_lokr_dispatch") for m in _linears(model).values())


# -- PEFT's prefix: file-layout tensors, or a PEFT LoKr state dict ----------------------------------

def test_base_model_prefix_with_diffusers_lora_names_and_no_alpha(model, tmp_path):
    """`base_model.model.<path>.lora_A.weight` / `lora_B.weight` without alpha: scale 1, dW = B @ A,
    as ComfyUI applies it; read as the file layout, not as PEFT LoKr."""
    g = torch.Generator().manual_seed(3)
    linears = _linears(model)
    tensors, expected = {}, {}
    for p in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2", "context_embedder"):
        out_f, in_f = linears[p].weight.shape
        a, b = torch.randn(4, in_f, generator=g), torch.randn(out_f, 4, generator=g)
        tensors[f"base_model.model.{p}.lora_A.weight"], tensors[f"base_model.model.{p}.lora_B.weight"] = a, b
        expected[p] = b @ a
    assert not is_peft_layout(list(tensors))
    save_file(tensors, tmp_path / "a.safetensors")
    original = _state(model)
    network, report = load_network(tmp_path / "a.safetensors", unet=model, strict=True)
    assert report.patched == {"unet": 3} and len(report.without_alpha) == 3
    network.merge()
    assert_patched(model, original, expected)
    network.remove()


def test_peft_lokr_state_dict_still_reads_as_peft(model, tmp_path):
    """lokr_* tensors only under `base_model.model.`: PEFT's layout with its default config
    (r = alpha, scale 1), which is also how ComfyUI applies a LoKr module without alpha."""
    g = torch.Generator().manual_seed(4)
    linears = _linears(model)
    full = _factors("lokr", linears["transformer_blocks.0.attn.to_v"].out_features, H, g)
    low = _factors("lokr-lowrank", linears["proj_out"].out_features, H, g)
    tensors = {f"base_model.model.transformer_blocks.0.attn.to_v.{n}": v for n, v in full.items() if n != "alpha"}
    tensors.update({f"base_model.model.proj_out.{n}": v for n, v in low.items() if n != "alpha"})
    assert is_peft_layout(list(tensors))
    original = _state(model)
    network, report = load_network(tensors, unet=model, strict=True)
    assert report.patched == {"unet": 2}
    network.merge()
    unscaled = {"transformer_blocks.0.attn.to_v": torch.kron(full["lokr_w1"], full["lokr_w2"]),
                "proj_out": torch.kron(low["lokr_w1"], low["lokr_w2_a"] @ low["lokr_w2_b"])}
    assert_patched(model, original, unscaled)
    network.remove()


# -- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_fused_module_with_wrong_row_count_is_named(model, tmp_path, algo):
    key = "lora_unet_joint_blocks_0_x_block_attn2_qkv"
    t = _factors(algo, 80, H, torch.Generator().manual_seed(3))  # 80 rows where q, k, v need 3 x 32
    save_file({f"{key}.{n}": v for n, v in t.items()}, str(tmp_path / "bad.safetensors"))
    expected = rf"{key}.*fused weight of transformer_blocks\.0\.attn2\.to_q.*\(96, 32\)"
    with pytest.raises(AdapterFileError, match=expected):
        load_network(tmp_path / "bad.safetensors", unet=model, family=SD35_MEDIUM)
    assert all(not hasattr(m, "_lokr_dispatch") for m in _linears(model).values())  # nothing attached


def test_fused_and_split_keys_for_one_layer_are_refused(model):
    g = torch.Generator().manual_seed(4)
    tensors = {f"lora_unet_joint_blocks_1_x_block_attn_qkv.{n}": v for n, v in _factors("lora", 3 * H, H, g).items()}
    tensors.update({f"lycoris_transformer_blocks_1_attn_to_k.{n}": v for n, v in _factors("lora", H, H, g).items()})
    with pytest.raises(AdapterFileError, match="both patch unet module transformer_blocks.1.attn.to_k"):
        load_network(tensors, unet=model, family=SD35_MEDIUM)


def test_layers_a_context_pre_only_block_lacks_are_reported(model):
    """The last block has no text-stream output or MLP: such keys match nothing (strict: an error)."""
    g = torch.Generator().manual_seed(5)
    tensors = {f"lora_unet_joint_blocks_1_context_block_attn_proj.{n}": v
               for n, v in _factors("lora", H, H, g).items()}
    tensors.update({f"lycoris_proj_out.{n}": v for n, v in _factors("lora", 64, H, g).items()})
    with pytest.raises(AdapterFileError, match="joint_blocks_1_context_block_attn_proj"):
        load_network(tensors, unet=model, family=SD35_MEDIUM, strict=True)
    network, report = load_network(tensors, unet=model, family=SD35_MEDIUM)
    assert report.unmatched == ["lora_unet_joint_blocks_1_context_block_attn_proj"] and report.patched == {"unet": 1}
    network.remove()


# -- sd3_names on its own ------------------------------------------------------------------------------

def test_names_table_matches_the_restated_spec(model):
    layers = _linears(model)
    for original, paths in ORIGINAL.items():
        if len(paths) == 1:
            assert sd3_names.original_path(paths[0], model) == original
            assert sd3_names.diffusers_path(original, model) == paths[0]
    for path in layers:
        if not any(path in p for p in ORIGINAL.values() if len(p) == 1):
            assert sd3_names.original_path(path, model) is None, path  # row slices have no 1:1 original name
    groups = sd3_names.fused_groups(model)
    for original, paths in ORIGINAL.items():
        if len(paths) > 1:
            want = [(p, k * H, (k + 1) * H) for k, p in enumerate(paths)]
            assert groups["lora_unet_" + original.replace(".", "_")] == groups["diffusion_model." + original] == want
    for original, path in SWAPPED.items():
        assert groups["diffusion_model." + original] == [(path, H, 2 * H), (path, 0, H)]
    assert len(groups) == 2 * (len([p for p in ORIGINAL.values() if len(p) > 1]) + len(SWAPPED))


def test_aliases_are_unique_and_cover_every_layer(model):
    layers = _linears(model)
    owner = {}
    diffusers_named = [name for name, (_, orig) in LAYOUTS.items() if not orig]
    for path in layers:
        aliases = SD35_MEDIUM.denoiser_key_aliases(path, model)
        assert aliases[0] == "lycoris_" + path.replace(".", "_")
        assert {LAYOUTS[n][0](path) for n in diffusers_named} <= set(aliases)
        for alias in aliases:
            assert owner.setdefault(alias, path) == path, alias
    groups = sd3_names.fused_groups(model)
    assert not set(groups) & set(owner)
    split = {p for slices in groups.values() for p, _, _ in slices}
    one_to_one = {p for p in layers if sd3_names.original_path(p, model)}
    assert split | one_to_one == set(layers) and not split & one_to_one
    assert "lora_unet_x_embedder_proj" in SD35_MEDIUM.denoiser_key_aliases("pos_embed.proj", model)


@pytest.mark.parametrize("name,blocks,dual", [("sd35-large", 38, 0), ("sd35-medium", 24, 13)])
def test_real_names_on_the_meta_device(name, blocks, dual):
    """SD3.5 Large (H = 2432) and Medium (1536): every Linear is reached 1:1 or by rows; the row
    ranges of the fused layers are the spec's."""
    family = families.get_family(name)
    transformer, _ = family.build_meta()
    layers = _linears(transformer)
    h = family.attention_width
    groups = family.fused_groups(transformer)
    assert len(groups) == 2 * (2 * blocks + dual + 2)  # qkv per stream and attn2, two swapped modulations
    last = blocks - 1
    assert groups[f"lora_unet_joint_blocks_{last}_x_block_attn_qkv"][-1] == \
        (f"transformer_blocks.{last}.attn.to_v", 2 * h, 3 * h)
    assert groups[f"diffusion_model.joint_blocks.{last}.context_block.adaLN_modulation.1"] == \
        [(f"transformer_blocks.{last}.norm1_context.linear", h, 2 * h),
         (f"transformer_blocks.{last}.norm1_context.linear", 0, h)]
    for slices in groups.values():
        for path, start, stop in slices:
            if "norm" not in path:
                assert stop - start == layers[path].out_features, path
    covered = {p for slices in groups.values() for p, _, _ in slices}
    covered |= {p for p in layers if sd3_names.original_path(p, transformer)}
    assert covered == set(layers)


# -- text encoders on the tiny pipeline -----------------------------------------------------------------

def _clip(prefix):
    return lambda p: prefix + p.removeprefix("text_model.").replace(".", "_")


# layout -> (text encoder index, module key of a path, which modules): ComfyUI's names for SD3's
# three encoders, each on its own layers
TE_LAYOUTS = {
    "te1-sd-scripts": (0, _clip("lora_te1_text_model_"), lambda p: ".layers.0." in p),
    "te1-diffusers": (0, lambda p: "text_encoder.text_model." + p.removeprefix("text_model."), lambda p: ".layers.1." in p),
    "te2-sd-scripts": (1, _clip("lora_te2_text_model_"), lambda p: ".layers.0." in p and not p.endswith("fc1")),
    "te2-no-text-model": (1, _clip("lora_te2_"), lambda p: ".layers.0." in p and p.endswith("fc1")),
    "te2-diffusers": (1, lambda p: "text_encoder_2.text_model." + p.removeprefix("text_model."),
                      lambda p: ".layers.1." in p),
    "te3-t5": (2, lambda p: "lora_te3_" + p.replace(".", "_"), lambda p: ".block.0." in p),
}


@pytest.mark.parametrize("algo", ["lokr-lowrank", "loha", "lora"])
def test_text_encoder_layouts_on_the_pipeline(tiny_sd3_path, tmp_path, algo):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path))
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    before = [_state(te) for te in encoders]
    g = torch.Generator().manual_seed(6)
    tensors, expected = {}, [{}, {}, {}]
    for index, key_of, chosen in TE_LAYOUTS.values():
        layers = _linears(encoders[index])
        for p in filter(chosen, layers):
            t = _factors(algo, layers[p].out_features, layers[p].in_features, g)
            tensors.update({f"{key_of(p)}.{n}": v for n, v in t.items()})
            expected[index][p] = reference_delta(t)
    save_file(tensors, str(tmp_path / "te.safetensors"))
    report = load_adapter(pipe, tmp_path / "te.safetensors", strict=True)
    assert report.patched == {"te1": 12, "te2": 12, "te3": 7} and not report.unmatched  # CLIP 6 a layer, T5 7
    fuse_adapter(pipe)
    for te, original, want in zip(encoders, before, expected):
        assert_patched(te, original, want)
    unload_adapter(pipe)
    for te, original in zip(encoders, before):
        assert_restored(te, original)
