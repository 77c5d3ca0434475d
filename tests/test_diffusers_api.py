"""Diffusers' adapter method names (pipe.load_lora_weights, set_adapters, fuse_lora...) on
lokr-diffusion adapters, checked layer by layer against the spec's formulas restated from the
file tensors (tests/test_pipelines.py's reference), on tiny SD1.5 and Flux.1 pipelines."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from torch import nn

from lokr_diffusion import list_adapters, load_adapter, set_adapter_scale
from lokr_diffusion.diffusers_api import use_diffusers_api

from .test_pipelines import CONFIGS, _make_file, _reference_dw, _reference_names, random_adapter_file


def _sd_pipe(path):
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def files(tiny_sd15_path, tmp_path_factory):
    """Two adapter files for the tiny SD1.5: a LoKr with convs, and a LoHa; both patch the UNet
    and the text encoder, many layers both."""
    pipe, folder = _sd_pipe(tiny_sd15_path), tmp_path_factory.mktemp("dapi")
    return {"a": _make_file(pipe, False, CONFIGS["lokr-lowrank-conv"], folder / "a.safetensors", seed=11),
            "b": _make_file(pipe, False, CONFIGS["loha"], folder / "b.safetensors", seed=12)}


@pytest.fixture
def pipe(tiny_sd15_path):
    return _sd_pipe(tiny_sd15_path)


def _weights(pipe):
    return {id(m): m.weight.detach().clone() for c in (pipe.unet, pipe.text_encoder) for m in c.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def _deltas(path, names):
    """layer -> its scaled dW restated from the file's tensors (no lokr-diffusion code)."""
    groups = {}
    for k, v in load_file(path).items():
        module, _, tensor = k.partition(".")
        groups.setdefault(module, {})[tensor] = v.float()
    return {names[m]: _reference_dw(t, tuple(names[m].weight.shape)) for m, t in groups.items()}


def _expected(base, layers, terms):
    """layer -> W0 + sum of weight x dW over the (deltas, weight) terms."""
    return {m: base[id(m)] + sum(w * d[m] for d, w in terms if m in d) for m in layers}


def _forward(m, x, weight):
    return F.linear(x, weight, m.bias) if isinstance(m, nn.Linear) else m._conv_forward(x, weight, m.bias)


@torch.no_grad()
def _assert_outputs(expected, atol=1e-5):
    """Every layer's forward (adapters unfused, hooked) computes with the expected weight."""
    g = torch.Generator().manual_seed(0)
    for m, w in expected.items():
        x = (torch.randn(3, m.in_features, generator=g) if isinstance(m, nn.Linear)
             else torch.randn(1, m.in_channels, 6, 6, generator=g))
        got, want = m(x), _forward(m, x, w)
        assert torch.allclose(got, want, atol=atol, rtol=1e-5), (m, (got - want).abs().max())


def _assert_bit_exact(pipe, base):
    now = _weights(pipe)
    assert all(torch.equal(now[k], base[k]) for k in base)


def test_load_adapter_gives_the_pipeline_diffusers_methods(pipe, files):
    """The reported bug: after load_adapter, get_active_adapters said [] and fuse_lora did nothing."""
    base = _weights(pipe)
    load_adapter(pipe, files["a"], adapter_name="style", scale=0.5)
    assert pipe.get_active_adapters() == ["style"]
    assert pipe.get_list_adapters() == {"unet": ["style"], "text_encoder": ["style"]}
    names = _reference_names(pipe, False)
    da = _deltas(files["a"], names)
    pipe.fuse_lora()  # Diffusers' default for this class: unet + text_encoder, at the adapter's scale
    assert pipe.fused_loras == {"style"} and pipe.num_fused_loras == 1 and list_adapters(pipe)["style"]["fused"]
    for m, w in _expected(base, da, [(da, 0.5)]).items():
        assert torch.allclose(m.weight, w, atol=1e-6), m
    pipe.unfuse_lora()
    _assert_bit_exact(pipe, base)
    assert pipe.fused_loras == set()
    pipe.set_adapters("style", 0.25)  # the same state as the project's own functions
    assert list_adapters(pipe)["style"]["scale"] == 0.25
    set_adapter_scale(pipe, "style", 0.75)
    _assert_outputs(_expected(base, da, [(da, 0.75)]))


def test_named_adapters_weights_fuse_unfuse(pipe, files):
    base = _weights(pipe)
    use_diffusers_api(pipe)
    pipe.load_lora_weights(str(files["a"]), adapter_name="a")
    pipe.load_lora_weights(files["b"].parent, weight_name=files["b"].name)  # folder + weight_name, default name
    assert pipe.get_list_adapters() == {"unet": ["a", "default_1"], "text_encoder": ["a", "default_1"]}
    assert pipe.get_active_adapters() == ["default_1"]  # as in Diffusers: the new one alone
    names = _reference_names(pipe, False)
    da, db = _deltas(files["a"], names), _deltas(files["b"], names)
    layers = set(da) | set(db)
    _assert_outputs(_expected(base, layers, [(db, 1.0)]))

    pipe.set_adapters(["a", "default_1"], adapter_weights=[0.7, -0.4])
    assert pipe.get_active_adapters() == ["a", "default_1"]
    _assert_outputs(_expected(base, layers, [(da, 0.7), (db, -0.4)]))

    pipe.fuse_lora(lora_scale=0.5)
    assert pipe.fused_loras == {"a", "default_1"}
    for m, w in _expected(base, layers, [(da, 0.35), (db, -0.2)]).items():
        assert torch.allclose(m.weight, w, atol=1e-6), m
    assert all("forward" not in m.__dict__ for m in layers)  # fused layers run their own code
    pipe.unfuse_lora()
    _assert_bit_exact(pipe, base)
    _assert_outputs(_expected(base, layers, [(da, 0.7), (db, -0.4)]))  # lora_scale did not stay applied

    pipe.fuse_lora(components="text_encoder", adapter_names="a")  # one adapter, one component
    te = [m for m in layers if any(m is t for t in pipe.text_encoder.modules())]
    for m, w in _expected(base, te, [(da, 0.7)]).items():
        assert torch.allclose(m.weight, w, atol=1e-6)
    assert all(torch.equal(m.weight, base[id(m)]) for m in pipe.unet.modules() if m in layers)
    _assert_outputs(_expected(base, layers, [(da, 0.7), (db, -0.4)]))  # same function, part of it baked
    pipe.unfuse_lora(components=["text_encoder"])
    _assert_bit_exact(pipe, base)


def test_component_weights_disable_enable_delete(pipe, files):
    base = _weights(pipe)
    use_diffusers_api(pipe)
    pipe.load_lora_weights(files["a"], adapter_name="a")
    pipe.load_lora_weights(files["b"], adapter_name="b")
    names = _reference_names(pipe, False)
    da, db = _deltas(files["a"], names), _deltas(files["b"], names)
    layers = set(da) | set(db)
    te = {m for m in layers if any(m is t for t in pipe.text_encoder.modules())}
    pipe.set_adapters(["a", "b"], [{"unet": 0.3, "text_encoder": 0.0}, {"text_encoder": 2.0}])  # b's unet: 1.0
    want = _expected(base, layers, [({m: d for m, d in da.items() if m not in te}, 0.3), (db, 1.0)])
    want.update(_expected(base, te, [(db, 2.0)]))
    _assert_outputs(want)

    pipe.disable_lora()
    assert pipe.get_active_adapters() == ["a", "b"]  # as in Diffusers: disabled, still the active set
    _assert_outputs({m: base[id(m)] for m in layers}, atol=0)
    assert all("forward" not in m.__dict__ for m in layers)
    pipe.enable_lora()
    _assert_outputs(want)

    pipe.set_adapters("b")  # weight None: 1.0 everywhere; a inactive but still loaded
    _assert_outputs(_expected(base, layers, [(db, 1.0)]))
    pipe.delete_adapters(["b"])
    assert pipe.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]} and pipe.get_active_adapters() == []
    _assert_outputs({m: base[id(m)] for m in layers}, atol=0)
    pipe.set_adapters(["a"], [0.3])
    _assert_outputs(_expected(base, layers, [(da, 0.3)]))
    pipe.delete_adapters("a")
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == [] and list_adapters(pipe) == {}
    _assert_bit_exact(pipe, base)


def test_unload_restores_unfused_and_keeps_fused(pipe, files):
    base = _weights(pipe)
    use_diffusers_api(pipe)
    pipe.load_lora_weights(files["a"], adapter_name="a")
    pipe.load_lora_weights(files["b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 0.5])
    pipe.unload_lora_weights()
    _assert_bit_exact(pipe, base)
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []
    layers = {m for m in _reference_names(pipe, False).values()}
    assert all("forward" not in m.__dict__ for m in layers)

    # fuse then unload, Diffusers' way to a merged model: the fused weights stay, nothing hooked
    pipe.load_lora_weights(files["a"], adapter_name="a")
    pipe.fuse_lora(lora_scale=0.8)
    fused = _weights(pipe)
    assert not all(torch.equal(fused[k], base[k]) for k in base)
    pipe.unload_lora_weights()
    _assert_bit_exact(pipe, fused)
    assert pipe.fused_loras == set() and all("forward" not in m.__dict__ for m in layers)


def test_errors_name_the_known_adapters(pipe, files):
    use_diffusers_api(pipe)
    pipe.load_lora_weights(files["a"], adapter_name="a")
    pipe.load_lora_weights(files["b"], adapter_name="b")
    for call in (lambda: pipe.set_adapters(["a", "nope"]), lambda: pipe.delete_adapters("nope"),
                 lambda: pipe.fuse_lora(adapter_names=["nope"]), lambda: pipe.set_lora_device(["nope"], "cpu")):
        with pytest.raises(ValueError, match="no adapter named 'nope'; loaded: 'a', 'b'"):
            call()
    with pytest.raises(ValueError, match="2 adapter name.* but 1 weight"):
        pipe.set_adapters(["a", "b"], [0.5])
    with pytest.raises(ValueError, match=r"'transformer' is no adapter component .*\['unet', 'text_encoder'\]"):
        pipe.fuse_lora(components=["transformer"])
    with pytest.raises(ValueError, match="'text_encoder_2', no adapter component"):
        pipe.set_adapters("a", {"text_encoder_2": 1.0})
    with pytest.raises(ValueError, match="per-block"):
        pipe.set_adapters("a", {"unet": {"down": 0.5}})
    with pytest.raises(ValueError, match="hotswap"):
        pipe.load_lora_weights(files["a"], adapter_name="a2", hotswap=True)
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(files["a"], adapter_name="a")
    with pytest.raises(FileNotFoundError, match="no_such.safetensors: no such adapter file"):
        pipe.load_lora_weights(files["a"].parent / "no_such.safetensors")
    base = _weights(pipe)
    pipe.set_adapters("b", 1e30)
    with pytest.raises(ValueError, match="non-finite .* nothing was fused"):
        pipe.fuse_lora(lora_scale=1e30, safe_fusing=True)  # beyond float32
    _assert_bit_exact(pipe, base)
    assert pipe.fused_loras == set()
    pipe.set_adapters("b")
    pipe.fuse_lora()
    for call in (lambda: pipe.set_adapters("a"), lambda: pipe.delete_adapters("b"),
                 lambda: pipe.load_lora_weights(files["a"], adapter_name="c")):
        with pytest.raises(RuntimeError, match="unfuse_lora"):
            call()
    pipe.unfuse_lora()
    pipe.disable_lora()
    with pytest.raises(RuntimeError, match="enable_lora"):
        pipe.fuse_lora()
    assert set(pipe.get_list_adapters()["unet"]) == {"a", "b"}


def test_diffusers_own_adapters_are_not_mixed(pipe, files, caplog):
    """A pipeline holding PEFT LoRAs from Diffusers' own loader keeps Diffusers' methods for them."""
    pytest.importorskip("peft")
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    pipe.load_lora_weights({f"unet.{path}.lora_A.weight": torch.zeros(2, layer.in_features),
                            f"unet.{path}.lora_B.weight": torch.zeros(layer.out_features, 2)}, adapter_name="peft")
    with pytest.raises(ValueError, match=r"Diffusers' own loader \(\{'unet': \['peft'\]\}\)"):
        use_diffusers_api(pipe)
    with caplog.at_level("WARNING", logger="lokr_diffusion.diffusers_api"):
        load_adapter(pipe, files["b"], adapter_name="ours")
    assert "keep driving those" in caplog.text
    assert pipe.get_active_adapters() == ["peft"]  # Diffusers' own method, on its own adapter
    assert list(list_adapters(pipe)) == ["ours"]


def test_readme_example_runs(tiny_sd15_path, files):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"<!-- example:diffusers-api -->\s*```python\n(.*?)```", readme, re.S).group(1)
    scope = {"MODEL": str(tiny_sd15_path), "ADAPTER": str(files["a"]), "ADAPTER_2": str(files["b"])}
    exec(compile(code, "README.md", "exec"), scope)
    pipe = scope["pipe"]
    assert scope["image"].size == (64, 64)
    assert pipe.get_list_adapters() == {} and list_adapters(pipe) == {} and pipe.fused_loras == set()


def test_sdxl_second_text_encoder(tiny_sdxl_path, tmp_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    path = _make_file(pipe, True, CONFIGS["lokr-full-f4"], tmp_path / "xl.safetensors", seed=13)
    layers = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    base = {id(m): m.weight.detach().clone() for c in layers for m in c.modules() if isinstance(m, nn.Linear)}
    use_diffusers_api(pipe).load_lora_weights(path)
    assert pipe.get_list_adapters() == {c: ["default_0"] for c in ("unet", "text_encoder", "text_encoder_2")}
    d = _deltas(path, _reference_names(pipe, True))
    te2 = {m for m in d if any(m is t for t in pipe.text_encoder_2.modules())}
    assert te2 and len(te2) < len(d)
    pipe.set_adapters("default_0", {"text_encoder_2": -1.0, "unet": 0.5})
    want = _expected(base, d, [({m: x for m, x in d.items() if m not in te2}, 1.0)])
    for m in d:
        if m in te2:
            want[m] = base[id(m)] - d[m]
        elif any(m is u for u in pipe.unet.modules()):
            want[m] = base[id(m)] + 0.5 * d[m]
    _assert_outputs(want)
    pipe.fuse_lora(components=["text_encoder_2"])
    assert all(torch.allclose(m.weight, want[m], atol=1e-6) for m in te2)
    pipe.unload_lora_weights()  # te2 stays fused (Diffusers' fuse-and-unload); the rest as loaded
    assert all(torch.allclose(m.weight, want[m], atol=1e-6) for m in te2)
    assert all(torch.equal(m.weight, base[id(m)]) for m in d if m not in te2)


def test_flux_transformer_weights_and_fuse(tiny_flux_path, tmp_path):
    """A DiT: adapters on the transformer, `transformer` as the component name, Flux's own fuse default."""
    pipe = use_diffusers_api(FluxPipeline.from_pretrained(str(tiny_flux_path)))
    names = {"lycoris_" + n.replace(".", "_"): m for n, m in pipe.transformer.named_modules()
             if isinstance(m, nn.Linear)}
    x = random_adapter_file(tmp_path / "x.safetensors", dict(algo="lokr", factor=4, dim=2, alpha=1.0), 21, pipe.transformer)
    y = random_adapter_file(tmp_path / "y.safetensors", dict(algo="loha", dim=2, alpha=1.0), 22, pipe.transformer)
    base = {id(m): m.weight.detach().clone() for m in names.values()}
    pipe.load_lora_weights(x, adapter_name="x")
    pipe.load_lora_weights(y, adapter_name="y")
    assert pipe.get_list_adapters() == {"transformer": ["x", "y"]} and pipe.get_active_adapters() == ["y"]
    dx, dy = _deltas(x, names), _deltas(y, names)
    layers = set(dx) | set(dy)
    pipe.set_adapters(["x", "y"], adapter_weights=[0.6, {"transformer": 1.5}])
    _assert_outputs(_expected(base, layers, [(dx, 0.6), (dy, 1.5)]))
    pipe.fuse_lora(lora_scale=2.0)  # FluxPipeline's default components: the transformer
    for m, w in _expected(base, layers, [(dx, 1.2), (dy, 3.0)]).items():
        assert torch.allclose(m.weight, w, atol=1e-6), m
    pipe.unfuse_lora()
    assert all(torch.equal(m.weight, base[id(m)]) for m in names.values())
    pipe.unload_lora_weights()
    assert all(torch.equal(m.weight, base[id(m)]) and "forward" not in m.__dict__ for m in names.values())
