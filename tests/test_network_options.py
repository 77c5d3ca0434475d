"""The LyCORIS network options (use_scalar, rs_lora, unbalanced_factorization, rank_dropout_scale),
per-module overrides and init_from, each checked against lycoris-lora 4.1.3 on the same weights.

Module tests run in float64 so that a relative error of the update (not of the output, which
the frozen weight dominates) is meaningful at 1e-5 and beyond.
"""
import copy
import json
import logging

import pytest
import torch
from torch import nn

lycoris_modules = pytest.importorskip("lycoris.modules")

from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

from lokr_diffusion import AdapterConfig, create_network, load_network  # noqa: E402
from lokr_diffusion.algos import ModuleSettings  # noqa: E402
from lokr_diffusion.errors import ConfigError  # noqa: E402
from lokr_diffusion.layers import rank_dropout_mask  # noqa: E402
from lokr_diffusion.loading import init_from_file  # noqa: E402
from lokr_diffusion.network import ModulePlan, new_adapter, stored_alpha  # noqa: E402
from lokr_diffusion.overrides import ModuleOverride, parse_overrides  # noqa: E402

from .helpers import load_components  # noqa: E402

LYCORIS = {"lokr": LokrModule, "loha": LohaModule, "lora": LoConModule}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _pair(algo, base, settings: ModuleSettings, rs_lora=False, rank_dropout=0.0, rank_dropout_scale=False, **kw):
    """(LyCORIS module, our adapter, their layer, our layer): the same random weights, float64."""
    base = copy.deepcopy(base)
    with torch.no_grad():  # a zero layer: outputs are the updates, compared without the frozen weight's rounding
        base.weight.zero_()
        base.bias.zero_()
    theirs_base, ours_base = copy.deepcopy(base).double(), copy.deepcopy(base).double()
    lyco = LYCORIS[algo]("m", theirs_base, 1.0, settings.dim, settings.alpha, rank_dropout=rank_dropout,
                         use_scalar=settings.use_scalar, rs_lora=rs_lora, rank_dropout_scale=rank_dropout_scale,
                         **kw).double()
    lyco.apply_to()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in lyco.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    ours = new_adapter("m", ours_base, ModulePlan(algo, settings, rs_lora, rank_dropout, 0.0), rank_dropout_scale)
    ours.double()
    with torch.no_grad():
        for name, p in ours.tensors().items():
            theirs = lyco.get_parameter(name)
            assert p.shape == theirs.shape, (name, tuple(p.shape), tuple(theirs.shape))
            p.copy_(theirs)
        if settings.use_scalar:
            ours.scalar.copy_(lyco.scalar)
    ours.attach()
    return lyco, ours, theirs_base, ours_base


def _input(base):
    g = torch.Generator().manual_seed(3)
    if isinstance(base, nn.Conv2d):
        return torch.randn(2, base.in_channels, 6, 6, generator=g, dtype=torch.float64)
    return torch.randn(3, base.in_features, generator=g, dtype=torch.float64)


def _lycoris_rebuild(file: dict[str, torch.Tensor], base: nn.Module) -> torch.Tensor:
    """The scaled dW LyCORIS's loader makes of one module's file tensors (its forward's scale:
    `get_weight`; `get_diff_weight`, which its merge uses, scales LoKr/LoHa twice)."""
    lyco_type, params = lycoris_modules.get_module({f"m.{n}": t for n, t in file.items()}, "m")
    module = lycoris_modules.make_module(lyco_type, params, "m", copy.deepcopy(base).double()).double()
    if isinstance(module, LoConModule):
        return module.get_diff_weight()[0].reshape(module.shape)
    return module.get_weight(module.shape)


CASES = {  # name: (algo, base layer, settings, extra LyCORIS arguments)
    "lokr-linear": ("lokr", nn.Linear(64, 48), dict(dim=2, factor=4), {"factor": 4}),
    "lokr-conv3x3": ("lokr", nn.Conv2d(32, 48, 3, padding=1), dict(dim=2, factor=4), {"factor": 4}),
    "lokr-unbalanced": ("lokr", nn.Linear(64, 48), dict(dim=2, factor=4, unbalanced=True),
                        {"factor": 4, "unbalanced_factorization": True}),
    "loha-linear": ("loha", nn.Linear(40, 24), dict(dim=4), {}),
    "lora-conv3x3": ("lora", nn.Conv2d(16, 24, 3, padding=1), dict(dim=4), {}),
}


@pytest.mark.parametrize("use_scalar", [False, True], ids=["", "use_scalar"])
@pytest.mark.parametrize("rs_lora", [False, True], ids=["", "rs_lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_module_options_equal_lycoris(case, rs_lora, use_scalar):
    """Forward (both our paths), the written tensors and alpha, and LyCORIS's loader's rebuild of
    our file all equal LyCORIS's module with the same options and weights."""
    algo, base, kw, extra = CASES[case]
    settings = ModuleSettings(alpha=3.0, use_scalar=use_scalar, **kw)
    lyco, ours, theirs_base, ours_base = _pair(algo, base, settings, rs_lora=rs_lora, **extra)
    # rs_lora: ours is the float32 alpha the file stores over r, LyCORIS's forward a float64 quotient
    assert ours.scale == pytest.approx(float(lyco.scale), rel=1e-7)
    x = _input(base)
    with torch.no_grad():
        plain = lyco.org_forward(x)
        expected = lyco(x) - plain
        rebuilt = ours_base(x) - plain  # inference: W + dW in one op
    assert _rel(rebuilt, expected) <= 1e-6
    factored = ours_base(x) - plain  # training: grad on, each algorithm's own path
    assert _rel(factored.detach(), expected) <= 1e-6
    file = {n: t.detach() for n, t in ours.file_tensors().items()} | {"alpha": ours.alpha.detach()}
    theirs_file = {n: t.detach() for n, t in lyco.custom_state_dict().items()}
    assert set(file) == set(theirs_file)
    for name, t in file.items():
        assert _rel(t.double(), theirs_file[name].double()) <= 1e-12, name
    dw = ours.delta_weight().detach()
    if case == "lokr-unbalanced":  # its loader rebuilds the balanced split from the shapes: cannot load its own files
        with pytest.raises(RuntimeError):
            _lycoris_rebuild(file, base)
        return
    assert _rel(_lycoris_rebuild(file, base), dw) <= 1e-6


def test_lycoris_merge_scales_lokr_twice():
    """Why the tests compare with LyCORIS's forward: its get_diff_weight (merge_to) applies
    alpha / r once more for LoKr and LoHa (here 3 / 2)."""
    lyco, ours, _, _ = _pair("lokr", nn.Linear(64, 48), ModuleSettings(2, 3.0, 4), factor=4)
    dw = ours.delta_weight().detach()
    assert _rel(lyco.get_diff_weight()[0], dw * 1.5) <= 1e-6


def test_use_scalar_starts_at_zero_with_both_factors_nonzero(tiny_sd15_path):
    unet, _ = load_components(tiny_sd15_path)
    net = create_network(AdapterConfig(preset="attn-only", algo="lokr", dim=2, use_scalar=True), unet=unet)
    for a in net.adapters():
        assert float(a.scalar) == 0.0 and a.scalar.requires_grad
        assert all(t.abs().sum() > 0 for t in a.tensors().values())
        assert a.delta_weight().abs().max() == 0
    assert not any(k.endswith(".scalar") for k in net.file_tensors())  # folded, never written
    assert sum(k.endswith(".scalar") for k in net.state_dict()) == len(net.module_keys())  # checkpoints keep it
    net.remove()


def test_rs_lora_stored_alpha():
    assert stored_alpha(2.0, 16, True) == pytest.approx(8.0)  # scale 2 / sqrt(16) = 0.5 = 8 / 16
    assert stored_alpha(2.0, 16, False) == 2.0


def test_rs_lora_with_both_lokr_factors_full_keeps_scale_1():
    """LyCORIS's forward then scales by sqrt(dim) while its file (alpha = dim) loads at scale 1
    everywhere; ours trains at the scale the file will have."""
    lyco, ours, _, _ = _pair("lokr", nn.Linear(16, 16), ModuleSettings(4, 4.0, 4, full_matrix=True),
                             rs_lora=True, factor=4, full_matrix=True)
    assert ours.scale == 1.0 and float(lyco.scale) == pytest.approx(2.0)
    file = {n: t.detach() for n, t in ours.file_tensors().items()} | {"alpha": ours.alpha.detach()}
    assert _rel(_lycoris_rebuild(file, nn.Linear(16, 16)), ours.delta_weight().detach()) <= 1e-6


@pytest.mark.parametrize("algo,base,kw", [("lokr", nn.Linear(64, 48), {"factor": 4}),
                                          ("loha", nn.Linear(40, 24), {}),
                                          ("lora", nn.Conv2d(16, 24, 3, padding=1), {})])
@pytest.mark.parametrize("by_kept_fraction", [False, True], ids=["default", "rank_dropout_scale"])
def test_rank_dropout_against_lycoris(algo, base, kw, by_kept_fraction):
    """Same draw, same channels dropped. rank_dropout_scale rescales by the fraction kept in the
    draw, as LyCORIS does; without it ours rescales by 1 / (1 - p) where LyCORIS does not rescale."""
    p = 0.5
    dim = 2 if algo == "lokr" else 4
    lyco, ours, _, ours_base = _pair(algo, base, ModuleSettings(dim, 3.0, kw.get("factor", -1)), rank_dropout=p,
                                     rank_dropout_scale=by_kept_fraction, **kw)
    lyco.train()
    ours.train()
    x = _input(base)
    with torch.no_grad():
        plain = lyco.org_forward(x)
    torch.manual_seed(11)
    expected = (lyco(x) - plain).detach()
    torch.manual_seed(11)
    got = (ours_base(x) - plain).detach()
    if not by_kept_fraction:
        got = got * (1 - p)
    assert _rel(got, expected) <= 1e-6


def test_rank_dropout_mask_never_divides_by_zero():
    torch.manual_seed(0)
    assert torch.equal(rank_dropout_mask(4, 0.999999, True), torch.zeros(4))
    m = rank_dropout_mask(1000, 0.25, True)
    assert m.sum().item() == pytest.approx(1000.0)


# -- per-module overrides ----------------------------------------------------------------------------

OVERRIDES = [
    {"match": "*attn2*", "algo": "loha", "dim": 2, "alpha": 1.0},
    {"match": "FeedForward", "algo": "lora", "dim": 8},
    {"match": "*attn*", "factor": 4, "dim": 1, "use_scalar": True},  # attn1 only: attn2 matched first
    {"match": "no_such_module_*", "dim": 3},
]


def test_overrides_first_match_wins_and_every_loader_applies_them(tiny_sd15_path, tmp_path, caplog):
    unet, tes = load_components(tiny_sd15_path)
    cfg = AdapterConfig(preset="attn-mlp", algo="lokr", dim=4, alpha=2.0, overrides=OVERRIDES)
    with caplog.at_level(logging.WARNING, logger="lokr_diffusion.network"):
        net = create_network(cfg, unet=unet)
    assert "'no_such_module_*' matches no module" in caplog.text
    algos = {}
    for info in net.modules_info():
        a = net.adapter(info.key)
        algos[info.key] = a.algo.NAME
        if ".attn2." in info.path:
            assert a.algo.NAME == "loha" and a.scale == 0.5
        elif ".ff." in info.path:
            assert a.algo.NAME == "lora" and a.tensors()["lora_down.weight"].shape[0] == 8
            assert a.scale == pytest.approx(2.0 / 8)  # LyCORIS: an override's dim keeps the network's alpha
        elif ".attn1." in info.path:
            assert a.algo.NAME == "lokr" and a.scalar is not None and net.override_of[info.key] == 2
        else:  # proj_in / proj_out: [network]
            assert a.algo.NAME == "lokr" and a.scalar is None and info.key not in net.override_of
    assert set(algos.values()) == {"lokr", "loha", "lora"}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = {a.key: (a.delta_weight() * a.multiplier).detach() for a in net.adapters()}
    file = tmp_path / "mixed.safetensors"
    net.save(file, dtype=torch.float32)
    net.remove()
    args = json.loads(__import__("safetensors").safe_open(file, "pt").metadata()["ss_network_args"])
    assert json.loads(args["overrides"])[0] == OVERRIDES[0]

    loaded, report = load_network(file, unet=unet, strict=True)
    assert report.algorithms == {n: list(algos.values()).count(n) for n in set(algos.values())}
    for a in loaded.adapters():
        assert _rel(a.delta_weight().detach(), ours[a.key]) <= 1e-6
    loaded.remove()

    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    from .test_oracle_lycoris import _kohya_views
    unet_view, te_views = _kohya_views(unet, tes, False)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, str(file), None, te_views[0], unet_view)
    assert len(lyco.unet_loras) == len(ours)
    for m in lyco.unet_loras:
        theirs = m.get_diff_weight()[0] if isinstance(m, LoConModule) else m.get_weight(m.shape)
        assert _rel(theirs.reshape(ours[m.lora_name].shape).detach(), ours[m.lora_name]) <= 1e-5, m.lora_name

    again = create_network(cfg, unet=unet)  # and the file starts the same config at the same update
    init_from_file(again, file, unet)
    for a in again.adapters():
        assert _rel(a.delta_weight().detach(), ours[a.key]) <= 1e-6
    again.remove()


def test_override_errors():
    with pytest.raises(ConfigError, match=r"overrides #1: unknown key 'factr'.*Did you mean 'factor'"):
        parse_overrides([{"match": "*", "factr": 4}])
    with pytest.raises(ConfigError, match=r"overrides #2: `match` is required"):
        parse_overrides([{"match": "*", "dim": 2}, {"dim": 2}])
    with pytest.raises(ConfigError, match=r"sets nothing"):
        parse_overrides([{"match": "*"}])
    with pytest.raises(ConfigError, match=r"overrides #1: algo"):
        parse_overrides([{"match": "*", "algo": "lokrr"}])
    with pytest.raises(ConfigError, match=r"expected an array of tables"):
        parse_overrides("*attn*")
    assert parse_overrides({"match": "a", "dim": 2}) == (ModuleOverride(match="a", dim=2),)


def test_overrides_from_toml(tmp_path):
    from lokr_diffusion.schema import Scope, build, parse_toml
    from lokr_diffusion.training.config import NetworkSection

    raw = parse_toml('[network]\nfactor = 8\n[[network.overrides]]\nmatch = "*attn*"\nfactor = 16\n'
                     '[[network.overrides]]\nmatch = "FeedForward"\nalgo = "loha"\n', "t.toml", ConfigError)
    section = build(NetworkSection, raw["network"], Scope("network", ConfigError))
    assert section.adapter_config().overrides == (ModuleOverride(match="*attn*", factor=16),
                                                  ModuleOverride(match="FeedForward", algo="loha"))
    raw = parse_toml('[network]\noverrides = [{ match = "*", dimm = 2 }]\n', "t.toml", ConfigError)
    with pytest.raises(ConfigError, match="Did you mean 'dim'"):
        build(NetworkSection, raw["network"], Scope("network", ConfigError))


def test_override_dim_trains_kxk_convs_without_conv_dim(tiny_sd15_path):
    """As in LyCORIS: a k x k conv of the preset trains when an override gives it a rank."""
    unet, _ = load_components(tiny_sd15_path)
    net = create_network(AdapterConfig(preset="full", overrides=[{"match": "conv_in", "dim": 2}]), unet=unet)
    convs = [i for i in net.modules_info() if i.kind == "conv"]
    assert [i.path for i in convs] == ["conv_in"]
    net.remove()


def test_plan_shows_overrides(tiny_sd15_path):
    from lokr_diffusion.tools.plan import format_plan, plan_network

    cfg = AdapterConfig(preset="attn-mlp", dim=4, overrides=OVERRIDES[:3])
    result = plan_network(str(tiny_sd15_path), cfg)
    by_key = {m["key"]: m for m in result["module_list"]}
    assert {m["algo"] for m in by_key.values()} == {"lokr", "loha", "lora"}
    assert all(m["override"] == 0 for k, m in by_key.items() if "attn2" in k)
    text = format_plan(result)
    assert "override 1 '*attn2*' -> algo loha, dim 2, alpha 1.0:" in text
    assert " loha " in text and " lora " in text


# -- LyCORIS's `full` preset -------------------------------------------------------------------------

def test_full_preset_picks_what_lycoris_full_picks(tiny_sd15_path):
    """Same modules, convs included (ResNet 3x3 and 1x1 shortcut, samplers, conv_in/out, the time
    embedding, SD1's 1x1 proj_in/out), once conv_dim is set: LyCORIS's kohya entry point trains
    k x k convs at conv_dim = dim by default, ours only when conv_dim is given. LyCORIS 4.1.3's
    own `full` also lists the TimestepEmbedding class, which wraps time_embedding a second time on
    Diffusers UNets (its 'duplicated lora name' assertion); the comparison leaves that entry out."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    from lycoris.config import PRESET

    unet, tes = load_components(tiny_sd15_path)
    cls = lycoris_kohya.LycorisNetworkKohya
    saved = {k: getattr(cls, k) for k in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                          "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")}
    full = dict(PRESET["full"])
    with pytest.raises(AssertionError, match="duplicated lora name"):
        cls.apply_preset(full)
        cls(copy.deepcopy(tes[0]), copy.deepcopy(unet), lora_dim=4, conv_lora_dim=4, alpha=4, network_module="lokr")
    full["unet_target_module"] = [m for m in full["unet_target_module"] if m != "TimestepEmbedding"]
    try:
        cls.apply_preset(full)
        lyco = cls(copy.deepcopy(tes[0]), copy.deepcopy(unet), lora_dim=4, conv_lora_dim=4, alpha=4,
                   network_module="lokr")
    finally:
        for k, v in saved.items():
            setattr(cls, k, v)
    theirs = {m.lora_name for m in lyco.unet_loras + lyco.text_encoder_loras}
    net = create_network(AdapterConfig(preset="full", conv_dim=4), unet=unet, text_encoders=tes)
    ours = set(net.module_keys())
    net.remove()
    theirs = {k.replace("lora_te_", "lora_te_text_model_") if "text_model" not in k else k for k in theirs}
    assert ours == theirs
    assert {"lora_unet_conv_in", "lora_unet_time_embedding_linear_1", "lora_unet_down_blocks_0_resnets_0_conv1",
            "lora_unet_down_blocks_0_attentions_0_proj_in"} <= ours


# -- init_from ---------------------------------------------------------------------------------------

def _lycoris_file(unet, te, tmp_path, algo="lokr", dim=4, **extra):
    """A file LyCORIS writes (attn-mlp on the UNet) and the UNet it patches, for the reference."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    lyco_unet = copy.deepcopy(unet)
    preset = tmp_path / "preset.toml"
    preset.write_text('enable_conv = false\nunet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n'
                      'text_encoder_target_module = []\ntext_encoder_target_name = []\n')
    network = lycoris_kohya.create_network(1.0, dim, 2.0, None, copy.deepcopy(te), lyco_unet, algo=algo,
                                           preset=str(preset), **extra)
    network.apply_to(None, lyco_unet, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    file = tmp_path / "lyco.safetensors"
    network.save_weights(str(file), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return file, lyco_unet


def _unet_out(unet):
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    enc = torch.randn(1, 12, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=enc).sample


def test_init_from_a_lycoris_file_starts_at_its_forward(tiny_sd15_path, tmp_path):
    """A LyCORIS LoKr file (use_scalar, some w2 low-rank, some full) starts a network of our
    config that gives LyCORIS's outputs; the config's alpha stays (the file's scale goes into w1).
    (rs_lora is left out here: where LoKr keeps both factors full, LyCORIS's rs_lora forward
    scales by sqrt(dim) while its own file means scale 1, see the test above.)"""
    unet, tes = load_components(tiny_sd15_path)
    file, lyco_unet = _lycoris_file(unet, tes[0], tmp_path, dim=2, factor=-1, use_scalar=True)
    net = create_network(AdapterConfig(preset="attn-mlp", dim=2, alpha=0.5, use_scalar=True), unet=unet)
    report = init_from_file(net, file, unet)
    assert len(report.loaded) == 192 and not report.fresh
    assert all(float(a.scalar) == 1.0 and float(a.alpha) == (0.5 if a._rank else 2.0) for a in net.adapters())
    assert {a._rank for a in net.adapters()} == {None, 2}
    ref = _unet_out(lyco_unet)
    out = _unet_out(unet)
    assert _rel(out, ref) <= 1e-5
    net.remove()


def test_init_from_mismatches_and_fresh_modules(tiny_sd15_path, tmp_path, caplog):
    unet, tes = load_components(tiny_sd15_path)
    file, _ = _lycoris_file(unet, tes[0], tmp_path, factor=-1)
    wrong = create_network(AdapterConfig(preset="attn-mlp", dim=4, factor=4), unet=unet)
    with pytest.raises(ConfigError, match=r"does not fit the config in \d+ module\(s\)[\s\S]*the config makes lokr "
                                          r"\{lokr_w1 "):
        init_from_file(wrong, file, unet)
    wrong.remove()
    fewer = create_network(AdapterConfig(preset="attn-only", dim=4), unet=unet)
    with pytest.raises(ConfigError, match="in the file, but the config trains no such module"):
        init_from_file(fewer, file, unet)
    fewer.remove()
    more = create_network(AdapterConfig(preset="full", dim=4), unet=unet)
    with caplog.at_level(logging.WARNING, logger="lokr_diffusion.loading"):
        report = init_from_file(more, file, unet)
    assert len(report.loaded) == 192 and len(report.fresh) == len(more.module_keys()) - 192
    assert "start fresh" in caplog.text and "start fresh" in str(report)
    assert all(more.adapter(k).delta_weight().abs().max() == 0 for k in report.fresh)
    more.remove()


@pytest.mark.slow
def test_training_with_overrides_starts_from_a_file(tiny_sd15_path, tmp_path, capsys):
    """The one end-to-end run: overrides (three algorithms, use_scalar), init_from a file of the
    same config, rank_dropout_scale; 2 steps move the update away from the file's, not far."""
    from .test_train import ok_here, write_config

    unet, _ = load_components(tiny_sd15_path)
    overrides = [{"match": "*attn2*", "algo": "loha", "dim": 2}, {"match": "FeedForward", "algo": "lora", "dim": 2},
                 {"match": "*attn1*", "use_scalar": True}]
    cfg = AdapterConfig(preset="attn-mlp", algo="lokr", factor=4, dim=4, alpha=2.0, overrides=overrides)
    net = create_network(cfg, unet=unet)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    start = {a.key: a.delta_weight().detach() for a in net.adapters()}
    net.save(tmp_path / "start.safetensors", dtype=torch.float32)
    net.remove()
    config = write_config(tmp_path, tiny_sd15_path, train={"max_steps": 2},
                          network={"overrides": overrides, "init_from": "start.safetensors", "rank_dropout": 0.1,
                                   "rank_dropout_scale": True})
    log = ok_here(capsys, config)
    assert "192 modules start from the file" in log
    trained, report = load_network(tmp_path / "out" / "t.safetensors", unet=unet, strict=True)
    assert set(report.algorithms) == {"lokr", "loha", "lora"}
    changes = [_rel(a.delta_weight().detach(), start[a.key]) for a in trained.adapters()]
    assert max(changes) > 0 and sorted(changes)[len(changes) // 2] < 0.5
    trained.remove()


def test_overrides_set_dora_and_tucker_per_module(tiny_sd15_path, tmp_path):
    """`weight_decompose` and `use_tucker` per override: only the matched modules get a DoRA
    magnitude or a Tucker core, and the file loads back to the same updates."""
    unet, _ = load_components(tiny_sd15_path)
    overrides = [{"match": "down_blocks.0.resnets.0.conv1", "use_tucker": True, "dim": 1},  # dim 1: w2 low-rank
                 {"match": "*.attn2.to_q", "weight_decompose": True}]
    cfg = AdapterConfig(algo="lokr", preset="full", factor=4, dim=2, conv_dim=2, alpha=1.0, overrides=overrides)
    net = create_network(cfg, unet=unet)
    by_path = {net.paths[a.key]: a for a in net.adapters()}
    tucker = {p for p, a in by_path.items() if "lokr_t2" in a.tensor_names}
    dora = {p for p, a in by_path.items() if a.dora}
    assert tucker == {"down_blocks.0.resnets.0.conv1"}
    assert dora and all(p.endswith(".attn2.to_q") for p in dora)
    assert len(dora) == sum(1 for p in by_path if p.endswith(".attn2.to_q"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.endswith("dora_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = {a.key: a.delta_weight().detach() for a in net.adapters()}
    file = tmp_path / "per_module.safetensors"
    net.save(file, dtype=torch.float32)
    net.remove()
    loaded, _ = load_network(file, unet=unet, strict=True)
    for a in loaded.adapters():
        assert _rel(a.delta_weight().detach(), ours[a.key]) <= 1e-6
    loaded.remove()
