"""AdapterNetwork: a set of AdapterModules injected into a UNet and its text encoder(s).

Its native state dict is exactly the file layout (`<module key>.<tensor>`), so saving,
loading and Accelerate's checkpointing all use one naming.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .algos import ALGORITHMS, ModuleSettings, get_algorithm
from .errors import ConfigError
from .families import Family, family_of_models, family_of_text_encoders, get_family
from .fileformat import training_metadata, write_safetensors
from .dora import init_magnitude
from .layers import DORA_TENSOR, AdapterModule
from .overrides import ModuleOverride, containing_classes, first_match, parse_overrides
from .storage import StoredLayer
from .schema import Scope, check_fields, setting
from .targets import PRESETS, Target, select_targets

logger = logging.getLogger(__name__)


@dataclass
class AdapterConfig:
    """What to train: the trainer's `[network]` keys.

    `dim`/`alpha` apply to Linear layers and 1x1 convs; k x k convs train only when
    `conv_dim` is given (the kohya convention). alpha defaults to the rank (scale 1). For LoKr
    a larger `factor` means a bigger w1 and a smaller w2, hence fewer parameters when w2 is full.
    Each field's rules live in its `setting(...)` (see lokr_diffusion.schema); Python callers
    get the same checks as the TOML config.
    """

    algo: str = setting("lokr", choices=tuple(ALGORITHMS), help="adapter algorithm")
    preset: str = setting("attn-mlp", choices=PRESETS,
                          help="which layers get adapters: `full` adds ResNet and down/upsampler convs (on "
                               "SD1/2 also conv_in/out and the time embedding)")
    factor: int = setting(-1, valid=lambda v: v == -1 or v >= 1,
                          problem="expected a non-zero integer: -1 (balanced) or a positive factor",
                          allowed_doc="-1 or >= 1",
                          help="LoKr split of each dimension: -1 balanced, or 4, 8, 16 ... (bigger: bigger w1, "
                               "smaller w2)")
    dim: int = setting(16, ge=1, problem="expected a positive integer",
                       help="rank of Linear layers and 1x1 convs")
    alpha: float | None = setting(None, gt=0, default_doc="= dim",
                                  help="alpha of Linear layers and 1x1 convs; scale = alpha / dim")
    conv_dim: int | None = setting(None, ge=1, problem="expected a positive integer",
                                   help="rank of k x k convs, which train only when this is set")
    conv_alpha: float | None = setting(None, gt=0, default_doc="= conv_dim", help="alpha of k x k convs")
    full_matrix: bool = setting(False, help="LoKr: never decompose w2")
    decompose_both: bool = setting(False, help="LoKr: also decompose w1 when the rank is small enough")
    weight_decompose: bool = setting(False, help="DoRA (LyCORIS `dora_wd`): also train a magnitude per output row, "
                                                 "saved as `dora_scale` (see docs/toolbox.md for how each UI "
                                                 "applies it); not with `use_scalar`")
    use_tucker: bool = setting(False, help="k x k convs with a low-rank factor store it as a Tucker core "
                                           "(`lokr_t2`, `hada_t1`/`hada_t2`, `lora_mid`), as LyCORIS `use_tucker`; "
                                           "ComfyUI skips Tucker LoKr layers")
    include: tuple[str, ...] = setting((), help="shell globs on module paths or file keys to adapt, e.g. "
                                                "`\"*attn2*\"`, `\"lora_unet_mid_block_*\"`")
    exclude: tuple[str, ...] = setting((), help="shell globs of modules to leave out (same forms as `include`)")
    rank_dropout: float = setting(0.0, ge=0, lt=1, problem="expected a probability in [0, 1)",
                                  help="training-time dropout of output channels")
    module_dropout: float = setting(0.0, ge=0, lt=1, problem="expected a probability in [0, 1)",
                                    help="training-time dropout of whole modules")
    rank_dropout_scale: bool = setting(False, help="LyCORIS `rank_dropout_scale`: rescale the kept channels by the "
                                                   "fraction kept in each draw instead of by 1 / (1 - rank_dropout) "
                                                   "(LyCORIS without it does not rescale at all)")
    use_scalar: bool = setting(False, help="LyCORIS `use_scalar`: a learnable scalar per module, 0 at first, so both "
                                           "factors start non-zero; files hold it folded into w1 / hada_w1_a / "
                                           "lora_up")
    rs_lora: bool = setting(False, help="LyCORIS `rs_lora`: rank-stabilised scale alpha / sqrt(dim); files store "
                                        "alpha * sqrt(dim) so that every loader's alpha / dim gives it (no effect "
                                        "where LoKr keeps both factors full: scale 1)")
    unbalanced_factorization: bool = setting(False, help="LyCORIS `unbalanced_factorization`, LoKr: the larger "
                                                         "factor of the output dimension goes to w1")
    overrides: tuple[ModuleOverride, ...] = setting(
        (), parse=lambda v, scope, key: parse_overrides(v, scope, key), expect="array of tables",
        help="per-module settings, first match wins: `{ match = \"<glob or class>\", algo, factor, dim, alpha, "
             "full_matrix, decompose_both, unbalanced_factorization, use_scalar, rs_lora, weight_decompose, use_tucker, rank_dropout, "
             "module_dropout }`; see [Per-module settings](#per-module-settings)")

    def __post_init__(self) -> None:
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        self.overrides = parse_overrides(self.overrides)
        check_fields(self, Scope("network", ConfigError))

    def settings(self, kxk_conv: bool, override: ModuleOverride | None = None) -> ModuleSettings:
        """One module's settings: `[network]`'s for its kind, then what `override` sets."""
        return self.module_plan(kxk_conv, override).settings

    def module_plan(self, kxk_conv: bool, override: ModuleOverride | None = None) -> "ModulePlan":
        o = override.given() if override is not None else {}
        dim = o.get("dim", self.conv_dim if kxk_conv else self.dim)
        alpha = o.get("alpha", self.conv_alpha if kxk_conv else self.alpha)  # LyCORIS: the network's alpha
        get = lambda name: o.get(name, getattr(self, name))  # noqa: E731
        settings = None if dim is None else ModuleSettings(
            dim, dim if alpha is None else alpha, get("factor"), get("full_matrix"), get("decompose_both"),
            use_scalar=get("use_scalar"), unbalanced=get("unbalanced_factorization"), use_tucker=get("use_tucker"))
        return ModulePlan(get("algo"), settings, get("rs_lora"), get("rank_dropout"), get("module_dropout"),
                          get("weight_decompose"))

    def network_args(self) -> dict[str, object]:
        """The `ss_network_args` sd-scripts users know (LyCORIS's names)."""
        args: dict[str, object] = {"algo": self.algo, "preset": self.preset, "factor": self.factor}
        if self.conv_dim:
            args.update(conv_dim=self.conv_dim, conv_alpha=self.conv_alpha if self.conv_alpha is not None else self.conv_dim)
        for name in ("full_matrix", "decompose_both", "use_scalar", "rs_lora", "unbalanced_factorization",
                     "rank_dropout_scale", "use_tucker"):
            if getattr(self, name):
                args[name] = True
        if self.weight_decompose:
            args["dora_wd"] = True  # LyCORIS's name for it
        for name in ("rank_dropout", "module_dropout"):
            if getattr(self, name):
                args[name] = getattr(self, name)
        if self.overrides:
            args["overrides"] = json.dumps([{"match": o.match, **o.given()} for o in self.overrides])
        return args


@dataclass(frozen=True)
class ModulePlan:
    """How one selected layer is trained; `settings` None: a k x k conv nobody gave a rank."""

    algo: str
    settings: ModuleSettings | None
    rs_lora: bool
    rank_dropout: float
    module_dropout: float
    weight_decompose: bool = False  # DoRA


def stored_alpha(alpha: float, dim: int, rs_lora: bool) -> float:
    """The alpha a file stores so that every loader's alpha / dim is the intended scale.

    rs_lora (LyCORIS `rs_lora`) means scale = alpha / sqrt(dim): stored as alpha * sqrt(dim),
    the value LyCORIS writes too."""
    return alpha * math.sqrt(dim) if rs_lora else alpha


@dataclass
class ModuleInfo:
    key: str
    component: str
    path: str
    kind: str  # "linear" | "conv1x1" | "conv"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class AdapterNetwork(nn.Module):
    """The adapters of one model, keyed by their file keys."""

    def __init__(self, family: Family, config: AdapterConfig | None = None,
                 prediction_type: str | None = None) -> None:
        super().__init__()
        self.family = family
        self.prediction_type = prediction_type  # what the file's metadata says about the base model
        self.config = config
        self.components: dict[str, str] = {}  # key -> component
        self.paths: dict[str, str] = {}  # key -> module path inside the component
        self.override_of: dict[str, int] = {}  # key -> index of the config override it follows

    # -- building ------------------------------------------------------------------------------
    def add_adapter(self, target: Target, key: str, adapter: AdapterModule) -> None:
        if key in self._modules:
            raise ValueError(f"two modules map to the same file key {key!r}")
        self.add_module(key, adapter)
        self.components[key] = target.component
        self.paths[key] = target.path
        adapter.attach()

    def adapters(self) -> Iterable[AdapterModule]:
        return (m for m in self.children() if isinstance(m, AdapterModule))

    def adapter(self, key: str) -> AdapterModule:
        return self._modules[key]  # type: ignore[return-value]

    def module_keys(self) -> list[str]:
        return [a.key for a in self.adapters()]

    def num_parameters(self, per_module: bool = False) -> int | dict[str, int]:
        counts = {a.key: sum(p.numel() for p in a.parameters()) for a in self.adapters()}
        return counts if per_module else sum(counts.values())

    def modules_info(self) -> list[ModuleInfo]:
        out = []
        for a in self.adapters():
            b = a.base
            kind = "linear" if isinstance(b, nn.Linear) else ("conv1x1" if tuple(b.kernel_size) == (1, 1) else "conv")
            out.append(ModuleInfo(a.key, self.components[a.key], self.paths[a.key], kind,
                                  {n: tuple(t.shape) for n, t in a.tensors().items()}))
        return out

    # -- switching -----------------------------------------------------------------------------
    def set_multiplier(self, multiplier: float, component: str | None = None) -> None:
        for a in self.adapters():
            if component is None or self.components[a.key].startswith(component):
                if a.merged:
                    raise RuntimeError("unmerge before changing the multiplier of a merged adapter")
                a.multiplier = float(multiplier)

    def set_enabled(self, enabled: bool) -> None:
        for a in self.adapters():
            a.enabled = enabled

    def merge(self, multiplier: float | None = None) -> None:
        """Bake every adapter into its base weight; forward then costs nothing extra."""
        for a in self.adapters():
            a.merge(multiplier)

    def unmerge(self) -> None:
        for a in self.adapters():
            a.unmerge()

    def remove(self) -> None:
        """Take the adapters out of the model (unmerging first), leaving it as it was."""
        for a in self.adapters():
            a.unmerge()
            a.detach()

    # -- saving --------------------------------------------------------------------------------
    def file_tensors(self, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
        """The file layout: factors in `dtype`, alpha as a float32 0-dim tensor."""
        out = {}
        for a in self.adapters():
            for name, t in a.file_tensors().items():
                out[f"{a.key}.{name}"] = t.detach().to(dtype) if dtype is not None else t.detach()
            out[f"{a.key}.alpha"] = a.alpha.detach().float().reshape(())
        return out

    def metadata(self, title: str = "adapter", extra: dict | None = None) -> dict[str, str]:
        cfg = self.config or AdapterConfig()
        alpha = cfg.alpha if cfg.alpha is not None else cfg.dim
        return training_metadata(self.family, cfg.network_args(), cfg.dim, alpha, title=title, extra=extra,
                                 prediction_type=self.prediction_type)

    def save(self, path: str | Path, dtype: torch.dtype | None = torch.float16,
             metadata: dict[str, str] | None = None) -> Path:
        """Write a `.safetensors` file in the LyCORIS layout, atomically."""
        tensors = self.file_tensors(dtype)
        for k, v in tensors.items():
            if not torch.isfinite(v).all():
                raise FloatingPointError(f"refusing to save {path}: tensor {k} has non-finite values "
                                         "(the training diverged; lower the learning rate)")
        meta = self.metadata(title=Path(path).stem)
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        return write_safetensors(path, tensors, meta)


def component_models(family: Family, unet: nn.Module | None, text_encoders: Sequence[nn.Module]):
    """(component name, model, key function, alias function) for each given model.

    Components are ``unet`` (the denoiser, a UNet or a transformer) and ``te`` (one text
    encoder) or ``te1``, ``te2``... named after the family's key prefixes; text encoder ``i``
    is the family's i-th (None in its place leaves it out). The key functions are the family's naming, so the writer and every
    reader share them.
    """
    out = []
    if unet is not None:
        out.append(("unet", unet, lambda p, u=unet: family.denoiser_key(p, u),
                    lambda p, u=unet: family.denoiser_key_aliases(p, u)))
    prefixes = family.text_encoder_prefixes() if text_encoders else []
    if len(text_encoders) > len(prefixes):
        raise ConfigError(f"{family.title} has {len(prefixes)} text encoder(s), got {len(text_encoders)}")
    for i, (te, prefix) in enumerate(zip(text_encoders, prefixes)):
        if te is None:  # a text encoder the caller leaves out (Flux's T5 unless asked); indices stay
            continue
        out.append((prefix[len("lora_"):], te, lambda p, i=i: family.text_encoder_key(i, p),
                    lambda p, i=i: family.text_encoder_key_aliases(i, p)))
    return out


def chosen_text_encoders(family: Family, text_encoders: Sequence[nn.Module], config) -> list[nn.Module | None]:
    """The text encoders a run puts adapters on (`train_text_encoder`, `text_encoders` of the
    trainer's `[network]`), each in its family position, None where left out: by default the
    family's choice (every CLIP tower; Flux leaves T5-XXL frozen)."""
    if not config.train_text_encoder:
        return []
    prefixes = [p[len("lora_"):] for p in family.text_encoder_prefixes()]
    if config.text_encoders is None:
        chosen = set(family.default_trained_text_encoders)
    else:
        unknown = [t for t in config.text_encoders if t not in prefixes]
        if unknown:
            raise ConfigError(f"network.text_encoders: {', '.join(map(repr, unknown))} is no text encoder of "
                              f"{family.title}; expected some of {', '.join(prefixes)}")
        chosen = {prefixes.index(t) for t in config.text_encoders}
    return [te if i in chosen else None for i, te in enumerate(text_encoders)]


def family_of(unet: nn.Module | None, text_encoders: Sequence[nn.Module]) -> Family:
    """The family of the models an adapter goes into; without a UNet, from the text encoders."""
    if unet is not None:
        return family_of_models(unet, text_encoders)
    return family_of_text_encoders(text_encoders)


def create_network(config: AdapterConfig, unet: nn.Module | None = None, text_encoders: Sequence[nn.Module] = (),
                   family: Family | str | None = None, prediction_type: str | None = None) -> AdapterNetwork:
    """Inject fresh adapters into `unet` and `text_encoders` (SDXL: both, in order).

    The update starts at exactly zero, so the model's outputs do not change until training.
    Works on meta-device models too (for counting parameters without weights).
    """
    if unet is None and not text_encoders:
        raise ConfigError("create_network: give a unet, text encoders, or both")
    text_encoders = tuple(text_encoders)
    family = get_family(family) if family is not None else family_of(unet, text_encoders)
    network = AdapterNetwork(family, config, prediction_type)
    skipped_convs = 0
    used = [0] * len(config.overrides)
    for component, model, key_of, _ in component_models(family, unet, text_encoders):
        targets = select_targets(component, model, config.preset, key_of,
                                 config.include, config.exclude, family=family)
        classes = containing_classes(model) if config.overrides else {}
        for target in targets:
            key = key_of(target.path)
            index = first_match(config.overrides, target.path, key, classes.get(target.path, ()))
            plan = config.module_plan(target.is_kxk_conv, None if index is None else config.overrides[index])
            if plan.settings is None:
                skipped_convs += 1
                continue
            if index is not None:
                used[index] += 1
                network.override_of[key] = index
            adapter = new_adapter(key, target.module, plan, config.rank_dropout_scale,
                                  weight_decompose=plan.weight_decompose)
            network.add_adapter(Target(component, target.path, target.module), adapter.key, adapter)
    if skipped_convs:
        logger.info("skipped %d k x k convolutions of preset %r: set conv_dim to train them", skipped_convs, config.preset)
    for o, n in zip(config.overrides, used):
        if not n:  # a config may serve several families: a warning, not an error
            logger.warning("network.overrides: %r matches no module that gets an adapter (check the glob against "
                           "`lokr-diffusion plan`; overrides never add modules: use include)", o.match)
    return network


def new_adapter(key: str, base: nn.Module, plan: ModulePlan, rank_dropout_scale: bool = False, *,
                weight_decompose: bool = False) -> AdapterModule:
    """A freshly initialised adapter for `base` as `plan` says (the update starts at exactly 0);
    with `weight_decompose` (DoRA) its magnitude starts as the base weight's row norms."""
    algo, settings = get_algorithm(plan.algo), plan.settings
    weight = base.weight
    with torch.device(weight.device):
        tensors = algo.init_tensors(tuple(weight.shape), settings)
        rank = algo.rank(tensors)
        if weight_decompose:
            if settings.use_scalar:
                raise ConfigError(f"{key}: use_scalar together with weight_decompose (DoRA) is not supported")
            dense = base.dense_weight(torch.float32) if isinstance(base, StoredLayer) else weight
            tensors[DORA_TENSOR] = init_magnitude(dense)
    # both LoKr factors full: scale is 1 in every tool, store alpha = rank to say so
    alpha = stored_alpha(settings.alpha, rank, plan.rs_lora) if rank is not None else settings.dim
    return AdapterModule(key, base, algo, tensors, alpha, rank_dropout=plan.rank_dropout,
                         module_dropout=plan.module_dropout, use_scalar=settings.use_scalar,
                         rank_dropout_scale=rank_dropout_scale)


__all__ = ["AdapterConfig", "AdapterNetwork", "ModuleInfo", "ModuleOverride", "ModulePlan", "chosen_text_encoders",
           "component_models", "create_network", "family_of", "new_adapter", "stored_alpha"]
