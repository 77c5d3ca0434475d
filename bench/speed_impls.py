"""The models, adapter implementations and step functions that bench_speed.py compares.

Every implementation targets exactly the same layers: ours picks them with the preset, and
LyCORIS and PEFT are given that list of module paths verbatim (LyCORIS through a preset of
`target_name`s, PEFT through `target_modules`), and the bench checks the counts. The list
comes from the setup's model family (``Family.preset_filter``), so the same code serves a
UNet (SD 1.5, SDXL) and a Flux transformer.

Implementations:
  floor           the frozen denoiser alone, forward + backward to the input (what any adapter pays)
  ours            lokr_diffusion.create_network (forward hooks, factored/rebuild chosen per layer)
  lycoris         LyCORIS 4.x LokrModule, default (rebuild dW every step)
  lycoris-bypass  the same modules with bypass_mode on (its own bypass path)
  peft            peft.LoKrConfig + inject_adapter_in_model (rebuilds dW every step)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("floor", "ours", "lycoris", "lycoris-bypass", "peft")
PEERS = ("lycoris", "lycoris-bypass", "peft")

# The mid-size UNet of the issue: the real SD 1.5 config at reduced width.
MID_WIDTHS = (128, 256, 512, 512)


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    preset: str
    factor: int
    dim: int
    full_matrix: bool
    conv_dim: int | None = None


SCENARIOS = (
    Scenario("attn-mlp-f8-full", "attn-mlp, factor 8, full matrix", "attn-mlp", 8, 8, True),
    Scenario("attn-mlp-f-1-r4", "attn-mlp, factor -1, rank 4", "attn-mlp", -1, 4, False),
    Scenario("full-f8-full", "full preset + convs, factor 8, full matrix", "full", 8, 8, True, conv_dim=8),
)
# Flux.1-dev at its real width: 3072 wide (24 heads x 128), MLP 12288, single-block proj_out
# 15360 -> 3072. Factor 16 splits 3072 into 16 x 192, so w2 is 192 x 192 to 768 x 192.
FLUX_SCENARIOS = (
    Scenario("flux-attn-mlp-f16-full", "Flux attn-mlp, factor 16, full matrix", "attn-mlp", 16, 16, True),
    Scenario("flux-attn-mlp-f-1-r16", "Flux attn-mlp, factor -1, rank 16", "attn-mlp", -1, 16, False),
)
SCENARIO_BY_KEY = {s.key: s for s in SCENARIOS + FLUX_SCENARIOS}
# Flux-shaped size: real width, one block of each kind, 512 px (64x64 latent -> 1024 packed
# tokens) and dev's 512 T5 tokens; a training step is some 15-30 s on 2 cores.
FLUX_DEPTH = {"num_layers": 1, "num_single_layers": 1}
FLUX_LATENT = 64
FLUX_TEXT_TOKENS = 512


@dataclass
class Setup:
    """Where and at what size one suite runs. `name` is its key in SETUPS: a memory child
    process rebuilds the same setup from it."""

    name: str
    device: str
    dtype: torch.dtype  # base weights
    autocast: torch.dtype | None  # mixed precision on GPU
    model_config: dict  # the denoiser's Diffusers config
    batch: int
    latent: int  # latent height = width (VAE pixels; Flux packs 2x2 of them into a token)
    label: str
    family: str = "sd15"
    text_tokens: int = 77
    extra: dict = field(default_factory=dict)

    @property
    def is_flux(self) -> bool:
        return self.family.startswith("flux")


def cpu_setup(quick: bool = False) -> Setup:
    from lokr_diffusion.families import get_family

    cfg = get_family("sd15").real_unet_config()
    cfg["block_out_channels"] = list(MID_WIDTHS)
    return Setup("cpu", "cpu", torch.float32, None, cfg, batch=2, latent=32,
                 label="SD 1.5 config at widths 128/256/512/512, batch 2, 32x32 latents, fp32")


def gpu_setup() -> Setup:
    from lokr_diffusion.families import get_family

    cfg = get_family("sdxl").real_unet_config()
    return Setup("cuda", "cuda", torch.bfloat16, torch.bfloat16, cfg, batch=1, latent=128, family="sdxl",
                 label="SDXL base UNet at full width (2.6 B), batch 1, 128x128 latents (1024 px), "
                       "bf16 weights + bf16 autocast, fp32 adapter factors")


def dry_gpu_setup() -> Setup:
    """The GPU suite's code path (SDXL layout, bf16 weights, bf16 autocast) at toy size on CPU,
    to catch errors before spending accelerator time."""
    from lokr_diffusion.families import get_family

    cfg = get_family("sdxl").tiny_unet_config()
    return Setup("dry", "cpu", torch.bfloat16, torch.bfloat16, cfg, batch=1, latent=16, family="sdxl",
                 label="dry run: tiny SDXL-layout UNet on CPU, bf16")


def flux_setup() -> Setup:
    """Flux.1-dev's real width with one double and one single block: every adapted layer has a
    real Flux shape and sees a real token count, yet a step fits 2 CPU cores. Blocks of one kind
    are identical, so full depth multiplies the block time; what depth would change is the share
    of the unadapted layers outside the blocks (mostly context_embedder), about 2% of this
    floor's forward and far less at 19 + 38 blocks: there the ratios to the floor would be a
    little higher and the gaps between implementations a little wider."""
    from lokr_diffusion.families import FLUX_DEV

    cfg = {**FLUX_DEV.real_transformer_config(), **FLUX_DEPTH}
    tokens = (FLUX_LATENT // 2) ** 2
    return Setup("flux", "cpu", torch.float32, None, cfg, batch=1, latent=FLUX_LATENT, family="flux",
                 text_tokens=FLUX_TEXT_TOKENS,
                 label=f"Flux.1-dev transformer at its real width (hidden 3072, 24 heads x 128, MLP 12288) with "
                       f"{FLUX_DEPTH['num_layers']} of its 19 double and {FLUX_DEPTH['num_single_layers']} of its 38 "
                       f"single blocks, batch 1, {tokens} image tokens ({8 * FLUX_LATENT} px) + "
                       f"{FLUX_TEXT_TOKENS} T5 tokens, fp32")


def dry_flux_setup() -> Setup:
    """The Flux suite's code path on the family's tiny transformer (same module tree): for
    tests and for catching errors before a long run."""
    from lokr_diffusion.families import FLUX_DEV

    return Setup("dry-flux", "cpu", torch.float32, None, FLUX_DEV.tiny_transformer_config(), batch=1, latent=8,
                 family="flux", text_tokens=8, label="dry run: tiny Flux-layout transformer on CPU, fp32")


SETUPS = {"cpu": cpu_setup, "cuda": gpu_setup, "dry": dry_gpu_setup, "flux": flux_setup, "dry-flux": dry_flux_setup}


def build_model(setup: Setup, seed: int = 0) -> nn.Module:
    """The setup's denoiser with random weights, frozen, in train mode."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = FluxTransformer2DModel if setup.is_flux else UNet2DConditionModel
    torch.manual_seed(seed)
    with torch.device(setup.device):
        model = cls(**setup.model_config)
    if setup.dtype != torch.float32:
        model.to(setup.dtype)
    model.requires_grad_(False)
    model.train()
    return model


def _flux_inputs(setup: Setup, rnd) -> dict:
    """Packed latent tokens and what FluxPipeline feeds with them: T5 states, CLIP pooled,
    flow time in [0, 1], dev's guidance, rotary position ids."""
    from lokr_diffusion.families.flux import image_ids, text_ids

    cfg = setup.model_config
    b, s, n_txt = setup.batch, setup.latent, setup.text_tokens
    tokens = (s // 2) ** 2
    dev, dt = setup.device, setup.dtype
    inputs = {
        "sample": rnd(b, tokens, cfg["in_channels"]),
        "timestep": torch.tensor([0.1 + 0.8 * i / max(b - 1, 1) for i in range(b)], device=dev, dtype=dt),
        "encoder_hidden_states": rnd(b, n_txt, cfg["joint_attention_dim"]),
        "pooled_projections": rnd(b, cfg["pooled_projection_dim"]),
        "img_ids": image_ids(s, s, dev, dt),
        "txt_ids": text_ids(n_txt, dev, dt),
        "target": rnd(b, tokens, cfg["out_channels"] or cfg["in_channels"]).float(),
    }
    if cfg.get("guidance_embeds"):
        inputs["guidance"] = torch.ones(b, device=dev, dtype=dt)
    return inputs


def make_inputs(setup: Setup, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = setup.model_config
    b, s = setup.batch, setup.latent

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(setup.device, setup.dtype)

    if setup.is_flux:
        return _flux_inputs(setup, rnd)
    inputs = {
        "sample": rnd(b, cfg["in_channels"], s, s),
        "timestep": torch.tensor([10 + 97 * i for i in range(b)], device=setup.device),
        "encoder_hidden_states": rnd(b, setup.text_tokens, cfg["cross_attention_dim"]),
        "target": rnd(b, cfg["out_channels"], s, s).float(),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": rnd(b, pooled), "time_ids": rnd(b, 6)}
    return inputs


def target_paths(model: nn.Module, scen: Scenario, family: str) -> list[str]:
    """The module paths our preset trains in the family's denoiser (k x k convs only with a
    conv dim): the one list every implementation is given."""
    from lokr_diffusion.families import get_family
    from lokr_diffusion.targets import select_targets

    found = select_targets("unet", model, scen.preset, lambda p: p, family=get_family(family))
    return [t.path for t in found if scen.conv_dim is not None or not t.is_kxk_conv]


@dataclass
class Attached:
    impl: str
    model: nn.Module
    params: list
    count: int
    handle: object = None

    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


def _randomise(params, seed: int) -> None:
    """Small non-zero factors, so every path does real work (no zero short-cuts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
            p.requires_grad_(True)


def attach(impl: str, unet: nn.Module, scen: Scenario, paths: list[str], family: str = "sd15",
           seed: int = 2) -> Attached:
    """Put `impl`'s adapters on `unet` (the denoiser, in place) for the layers in `paths`."""
    if impl == "floor":
        return Attached(impl, unet, [], 0)
    if impl == "ours":
        from lokr_diffusion.network import AdapterConfig, create_network

        cfg = AdapterConfig(algo="lokr", preset=scen.preset, factor=scen.factor, dim=scen.dim, alpha=scen.dim,
                            conv_dim=scen.conv_dim, conv_alpha=scen.conv_dim, full_matrix=scen.full_matrix)
        net = create_network(cfg, unet=unet, family=family)
        got = sorted(net.paths.values())
        if got != sorted(paths):
            raise RuntimeError("ours: targeted modules differ from the reference list")
        params = list(net.parameters())
        _randomise(params, seed)
        return Attached(impl, unet, params, len(got), net)
    if impl in ("lycoris", "lycoris-bypass"):
        from lycoris import LycorisNetwork

        LycorisNetwork.apply_preset({
            "enable_conv": True, "target_module": [], "target_name": list(paths), "module_algo_map": {},
            "name_algo_map": {}, "use_fnmatch": False, "exclude_name": [], "lora_prefix": "lycoris",
        })
        net = LycorisNetwork(unet, multiplier=1.0, lora_dim=scen.dim, alpha=scen.dim,
                             conv_lora_dim=scen.conv_dim or 0, conv_alpha=scen.conv_dim or 1,
                             network_module="lokr", factor=scen.factor, full_matrix=scen.full_matrix,
                             bypass_mode=impl == "lycoris-bypass", warn_on_unmatched=False)
        net.apply_to()
        net.to(next(unet.parameters()).device)
        params = list(net.parameters())
        _randomise(params, seed)
        return Attached(impl, unet, params, len(net.loras), net)
    if impl == "peft":
        from peft import LoKrConfig, inject_adapter_in_model
        from peft.tuners.lokr.layer import LoKrLayer

        if scen.full_matrix:
            # PEFT has no full_matrix switch: w2 is whole once r >= max(b, d) / 2, and alpha = r
            # keeps its alpha / r scale at 1.
            r = max(max(unet.get_submodule(p).weight.shape[:2]) for p in paths)
        else:
            r = scen.dim
        inject_adapter_in_model(LoKrConfig(r=r, alpha=r, decompose_factor=scen.factor, target_modules=list(paths)),
                                unet)
        layers = [m for m in unet.modules() if isinstance(m, LoKrLayer)]
        params = [p for n, p in unet.named_parameters() if ".lokr_" in n]
        _randomise(params, seed)
        return Attached(impl, unet, params, len(layers))
    raise ValueError(f"unknown implementation {impl!r}")


def set_lycoris_bypass(att: Attached, bypass: bool) -> None:
    for lora in att.handle.loras:
        lora.bypass_mode = bypass


def build_all(setup: Setup, scen: Scenario, impls=IMPLS) -> dict[str, Attached]:
    """One denoiser per adapter library: floor and ours share one (ours switched off for the floor),
    LyCORIS default and bypass share one (its per-module switch), PEFT has its own."""
    fam = setup.family
    base = build_model(setup)
    paths = target_paths(base, scen, fam)
    out: dict[str, Attached] = {}
    want_lyco = any(i.startswith("lycoris") for i in impls)
    lyco_unet = copy.deepcopy(base) if want_lyco else None
    peft_unet = copy.deepcopy(base) if "peft" in impls else None
    if "floor" in impls:
        out["floor"] = attach("floor", base, scen, paths, fam)
    if "ours" in impls:
        out["ours"] = attach("ours", base, scen, paths, fam)
    if want_lyco:
        lyco = attach("lycoris", lyco_unet, scen, paths, fam)
        for name in ("lycoris", "lycoris-bypass"):
            if name in impls:
                out[name] = Attached(name, lyco_unet, lyco.params, lyco.count, lyco.handle)
    if peft_unet is not None:
        out["peft"] = attach("peft", peft_unet, scen, paths, fam)
    for name, att in out.items():
        if name != "floor" and att.count != len(paths):
            raise RuntimeError(f"{name}: {att.count} adapted modules, expected {len(paths)}")
    return out


def activate(att: Attached, all_atts: dict[str, Attached]) -> None:
    """Switch the shared models into `att`'s configuration."""
    ours = all_atts.get("ours")
    if att.impl in ("floor", "ours") and ours is not None:
        ours.handle.set_enabled(att.impl == "ours")
    if att.impl.startswith("lycoris"):
        set_lycoris_bypass(att, att.impl == "lycoris-bypass")


def _autocast(setup: Setup):
    if setup.autocast is None:
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(setup.device, dtype=setup.autocast)


FLUX_KWARGS = ("timestep", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids", "guidance")


def forward(model: nn.Module, inputs: dict, sample: torch.Tensor) -> torch.Tensor:
    """The denoiser's prediction for `sample` (UNet latents or Flux tokens) and the conditioning."""
    if "img_ids" in inputs:
        return model(hidden_states=sample, **{k: inputs[k] for k in FLUX_KWARGS if k in inputs}).sample
    kw = {"added_cond_kwargs": inputs["added_cond_kwargs"]} if "added_cond_kwargs" in inputs else {}
    return model(sample, inputs["timestep"], inputs["encoder_hidden_states"], **kw).sample


def train_step(setup: Setup, att: Attached, inputs: dict) -> None:
    """One training step without the optimizer: forward, MSE loss, backward.

    The input latents require grad in every configuration, so the floor runs the same full
    backward graph an adapter at the first block would need.
    """
    sample = inputs["sample"].detach().requires_grad_(True)
    with _autocast(setup):
        out = forward(att.model, inputs, sample)
    loss = F.mse_loss(out.float(), inputs["target"])
    loss.backward()
    for p in att.params:
        p.grad = None
    if setup.device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def infer_step(setup: Setup, att: Attached, inputs: dict) -> None:
    with _autocast(setup):
        forward(att.model, inputs, inputs["sample"])
    if setup.device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def copy_ours_into_lycoris(ours: Attached, lyco: Attached) -> int:
    """Give LyCORIS our factor values (same names and shapes): the outputs must then agree."""
    mods = {m.lora_name: m for m in lyco.handle.loras}
    copied = 0
    for a in ours.handle.adapters():
        path = ours.handle.paths[a.key]
        m = mods.get("lycoris_" + path.replace(".", "_"))
        if m is None:
            continue
        for name, t in a.tensors().items():
            p = getattr(m, name, None)
            if isinstance(p, torch.Tensor) and p.shape == t.shape:
                p.copy_(t)
                copied += 1
    return copied


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB (NaN where no source exists).

    lokr_diffusion.memory prefers Linux's VmHWM to getrusage's ru_maxrss: that high-water mark
    survives exec, so a child started from a large parent would report the parent's size.
    """
    from lokr_diffusion.memory import peak_rss_bytes

    value, _ = peak_rss_bytes()
    return math.nan if value is None else value / 2**20


def peak_memory_child(setup_name: str, scen_key: str, impl: str, threads: int) -> dict:
    """Measured in a fresh process: peak RSS (CPU) or peak allocated (CUDA) of training steps."""
    torch.set_num_threads(threads)
    setup = SETUPS[setup_name]()
    scen = SCENARIO_BY_KEY[scen_key]
    model = build_model(setup)
    paths = target_paths(model, scen, setup.family)
    att = attach(impl, model, scen, paths, setup.family)
    inputs = make_inputs(setup)
    if setup.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss_before = _peak_rss_mb()
    for _ in range(2):
        train_step(setup, att, inputs)
    res = {"impl": impl, "scenario": scen_key, "modules": att.count, "adapter_params": att.n_params(),
           "peak_rss_mb": _peak_rss_mb(), "rss_before_steps_mb": rss_before}
    if setup.device == "cuda":
        res["peak_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["resident_mb"] = before / 2**20
    return res


def human(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(int(n))


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return math.nan
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
