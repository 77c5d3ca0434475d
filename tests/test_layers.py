"""AdapterModule behaviour: zero start, merge/unmerge, gradients, switches, the README example;
every registered algorithm provides the whole `Algorithm` protocol."""
import inspect
import re
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

from lokr_diffusion import AdapterModule, ModuleSettings
from lokr_diffusion.algos import ALGORITHMS, Algorithm, get_algorithm, lokr

BASES = [lambda: nn.Linear(64, 32), lambda: nn.Conv2d(16, 32, 3, padding=1), lambda: nn.Conv2d(16, 32, 1)]


def _x(base):
    return torch.randn(2, 5, 64) if isinstance(base, nn.Linear) else torch.randn(2, 16, 6, 6)


def _adapter(algo, base, dim=4, alpha=2.0, factor=-1, **kw):
    t = algo.init_tensors(tuple(base.weight.shape), ModuleSettings(dim, alpha, factor))
    a = AdapterModule("m", base, algo, t, alpha if algo.rank(t) is not None else dim, **kw)
    a.attach()
    return a


def _protocol_members() -> tuple[dict[str, object], dict[str, typing.Callable]]:
    """(constants with their types, methods) that `Algorithm` declares."""
    constants = typing.get_type_hints(Algorithm)
    methods = {n: f for n, f in vars(Algorithm).items() if not n.startswith("_") and inspect.isfunction(f)}
    return constants, methods


def test_protocol_lists_the_members_callers_use():
    constants, methods = _protocol_members()
    assert set(constants) == {"NAME", "TENSOR_NAMES"}
    assert set(methods) == {"detect", "init_tensors", "delta_weight", "rank", "forward"}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_algorithm_provides_the_whole_protocol(name):
    """Every member exists, constants have the declared types, and every function has the
    protocol's parameters (names, kinds, defaults, annotations) and return type."""
    algo = get_algorithm(name)
    assert isinstance(algo, Algorithm)  # names only; the signatures are checked below
    assert algo.NAME == name
    constants, methods = _protocol_members()
    assert isinstance(algo.NAME, str)
    assert isinstance(algo.TENSOR_NAMES, tuple) and all(isinstance(n, str) for n in algo.TENSOR_NAMES)
    assert set(constants) <= set(vars(algo))
    for member, proto_fn in methods.items():
        fn = vars(algo).get(member)  # defined by the module itself, not found by some other route
        assert inspect.isfunction(fn), f"{name}.{member} is missing or not a function"
        want = list(inspect.signature(proto_fn).parameters.values())[1:]  # drop self
        got = list(inspect.signature(fn).parameters.values())
        assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in want], \
            f"{name}.{member}{inspect.signature(fn)} differs from the protocol's {inspect.signature(proto_fn)}"
        want_hints = typing.get_type_hints(proto_fn)
        want_hints.pop("self", None)
        assert typing.get_type_hints(fn) == want_hints, f"{name}.{member}: annotations differ from the protocol's"


def test_every_algorithm_forward_applies_scale():
    """forward(..., scale=s) is s times the unscaled result, or None in both cases."""
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    x = torch.randn(3, 64)
    for algo in ALGORITHMS.values():
        t = {k: torch.randn_like(v) for k, v in algo.init_tensors((32, 64), ModuleSettings(4, 2.0)).items()}
        with lokr.force_path("in"):  # LoKr's factored path, not its rebuild fallback (None)
            plain, scaled = algo.forward(x, t, base), algo.forward(x, t, base, scale=0.25)
        assert (plain is None) == (scaled is None), algo.NAME
        if plain is not None:
            torch.testing.assert_close(scaled, plain * 0.25)


@pytest.mark.parametrize("algo", list(ALGORITHMS.values()), ids=list(ALGORITHMS))
@pytest.mark.parametrize("make_base", BASES, ids=["linear", "conv3x3", "conv1x1"])
def test_initial_update_is_exactly_zero(algo, make_base):
    base = make_base()
    x = _x(base)
    before = base(x)
    a = _adapter(algo, base)
    assert torch.equal(a.delta_weight(), torch.zeros_like(base.weight))
    assert torch.equal(base(x), before)


@pytest.mark.parametrize("algo", list(ALGORITHMS.values()), ids=list(ALGORITHMS))
@pytest.mark.parametrize("make_base", BASES, ids=["linear", "conv3x3", "conv1x1"])
def test_merge_unmerge_and_forward_agree(algo, make_base):
    base = make_base()
    x = _x(base)
    a = _adapter(algo, base, multiplier=0.7)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    original = base.weight.detach().clone()
    unmerged_out = base(x)
    a.merge()
    assert not torch.equal(base.weight, original)
    merged_out = base(x)  # the hook is inactive while merged
    assert torch.allclose(merged_out, unmerged_out, rtol=1e-4, atol=1e-3)
    a.unmerge()
    err = (base.weight - original).abs().max().item()
    assert err < 1e-4, err


def test_gradients_reach_only_adapter_parameters():
    base = nn.Linear(64, 32)
    base.requires_grad_(False)
    a = _adapter(ALGORITHMS["lokr"], base, dim=4)
    with torch.no_grad():
        a.get_parameter("lokr_w2_b" if "lokr_w2_b" in a.tensor_names else "lokr_w2").normal_()
    base(_x(base)).square().mean().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())


def test_multiplier_enable_and_detach():
    base = nn.Linear(64, 32)
    x = _x(base)
    ref = base(x)
    a = _adapter(ALGORITHMS["lora"], base)
    with torch.no_grad():
        a.get_parameter("lora_up.weight").normal_()
    full = base(x)
    a.multiplier = 0.5
    half = base(x)
    assert torch.allclose(half - ref, (full - ref) * 0.5, atol=1e-5)
    a.enabled = False
    assert torch.equal(base(x), ref)
    a.enabled = True
    a.detach()
    assert torch.equal(base(x), ref)


def test_layer_runs_its_own_forward_while_no_adapter_is_active():
    """Fused, disabled or zero-multiplier adapters leave nothing in the layer's call path."""
    base = nn.Linear(64, 32)
    x = _x(base)
    a = _adapter(ALGORITHMS["lokr"], base, dim=4)
    b = _adapter(ALGORITHMS["lora"], base, dim=4)
    with torch.no_grad():
        a.get_parameter("lokr_w2_b" if "lokr_w2_b" in a.tensor_names else "lokr_w2").normal_()
        b.get_parameter("lora_up.weight").normal_()
    dispatch = base.__dict__["_lokr_dispatch"]
    assert base.forward is dispatch
    with torch.no_grad():
        unfused = base(x)
    for adapter in (a, b):
        adapter.merge()
    assert "forward" not in base.__dict__ and dispatch._merged_weight is None
    with torch.no_grad():
        torch.testing.assert_close(base(x), unfused, rtol=1e-5, atol=1e-5)
    b.unmerge()
    assert base.forward is dispatch
    b.multiplier = 0.0
    assert "forward" not in base.__dict__
    b.multiplier = 1.0
    a.unmerge()
    a.enabled = False
    assert base.forward is dispatch
    a.enabled = True
    with torch.no_grad():
        torch.testing.assert_close(base(x), unfused, rtol=1e-6, atol=1e-6)
    a.detach()
    b.detach()
    assert "forward" not in base.__dict__ and "_lokr_dispatch" not in base.__dict__


def test_dropouts_only_in_training():
    base = nn.Linear(64, 32)
    x = _x(base)
    a = _adapter(ALGORITHMS["lora"], base, rank_dropout=0.5, module_dropout=0.0)
    with torch.no_grad():
        a.get_parameter("lora_up.weight").normal_()
    a.eval()
    assert torch.equal(base(x), base(x))
    a.train()
    torch.manual_seed(1)
    y1 = base(x)
    torch.manual_seed(2)
    assert not torch.equal(y1, base(x))


def test_state_dict_is_the_file_layout():
    a = _adapter(ALGORITHMS["lora"], nn.Conv2d(16, 32, 3))
    assert set(a.state_dict()) == {"lora_down.weight", "lora_up.weight", "alpha"}


def test_readme_minimal_example_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    m = re.search(r"<!-- example:minimal -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README lost its minimal example"
    scope: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), scope)
    assert scope["y"].shape == (2, 4)
