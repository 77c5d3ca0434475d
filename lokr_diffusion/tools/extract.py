"""`extract`: an adapter from the difference between a fine-tuned model and its base.

LoKr: the nearest Kronecker product (Van Loan and Pitsianis). With out = a*b and in = c*d,
dW[i*b+j, p*d+q, k] = w1[i, p] * w2[j, q, k] says that dW, rearranged as R with rows (i, p)
and columns (j, q, k), is the outer product vec(w1) vec(w2)^T. The best Kronecker
approximation in Frobenius norm is therefore the top singular pair of R:
w1 = sqrt(s) u, w2 = sqrt(s) v (for convs w2 keeps the kernel). Where the trainer would store
w2 (or w1) low-rank, that factor is truncated once more by SVD. LoRA: truncated SVD of dW.

The modules, shapes and keys are those `create_network` builds for the same settings, so an
extracted file is laid out exactly like a trained one; alpha = rank everywhere (scale 1),
with the singular values folded into the factors. The error of every module is reported.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ModelError
from ..fileformat import training_metadata, write_safetensors
from ..families import family_of_pipeline, prediction_type_of
from ..models import load_pipeline
from ..network import AdapterConfig, create_network
from ..pipelines import _components as pipeline_components
from .adapterfile import max_abs_and_relative
from .outputs import check_output

_FULL_SVD_MAX = 512  # above this the top singular vectors come from a randomized SVD


def top_singular(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (rows, k), S (k,), Vh (k, cols)), zero-padded when the matrix has fewer than k."""
    n = min(m.shape)
    if n <= _FULL_SVD_MAX:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(m, q=min(n, k + 10), niter=6)
        vh = v.T
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if s.numel() < k:  # rank asked for exceeds the matrix size: the extra directions are zero
        pad = k - s.numel()
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], 1)
        s = torch.cat([s, s.new_zeros(pad)])
        vh = torch.cat([vh, vh.new_zeros(pad, vh.shape[1])], 0)
    return u, s, vh


def low_rank(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rows, r), B (r, cols)) with A @ B the best rank-r approximation, singular values split evenly."""
    u, s, vh = top_singular(m, r)
    root = s.sqrt()
    return u * root, root[:, None] * vh


def nearest_kronecker(dw: torch.Tensor, a: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1 (a, c), w2 (b, d, *kernel)) minimising ||dW - kron(w1, w2)||_F."""
    out_dim, in_dim, kernel = dw.shape[0], dw.shape[1], tuple(dw.shape[2:])
    b, d, k = out_dim // a, in_dim // c, math.prod(kernel)
    r = dw.reshape(a, b, c, d, k).permute(0, 2, 1, 3, 4).reshape(a * c, b * d * k)
    u, s, vh = top_singular(r, 1)
    root = s[0].sqrt()
    return (root * u[:, 0]).reshape(a, c), (root * vh[0]).reshape(b, d, *kernel)


def fit_lokr(dw: torch.Tensor, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill the tensors the trainer would create (names and shapes of `template`) from dW."""
    if "lokr_w1" in template:
        a, c = template["lokr_w1"].shape
    else:
        a, c = template["lokr_w1_a"].shape[0], template["lokr_w1_b"].shape[1]
    w1, w2 = nearest_kronecker(dw, int(a), int(c))
    out: dict[str, torch.Tensor] = {}
    if "lokr_w1" in template:
        out["lokr_w1"] = w1
    else:
        out["lokr_w1_a"], out["lokr_w1_b"] = low_rank(w1, template["lokr_w1_b"].shape[0])
    if "lokr_w2" in template:
        out["lokr_w2"] = w2
    else:
        out["lokr_w2_a"], out["lokr_w2_b"] = low_rank(w2.flatten(1), template["lokr_w2_b"].shape[0])
    return out


def fit_lora(dw: torch.Tensor, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    up_shape, down_shape = template["lora_up.weight"].shape, template["lora_down.weight"].shape
    up, down = low_rank(dw.flatten(1), down_shape[0])
    return {"lora_down.weight": down.reshape(down_shape), "lora_up.weight": up.reshape(up_shape)}


_FITS = {"lokr": fit_lokr, "lora": fit_lora}


def _parts(pipe) -> dict[str, torch.nn.Module]:
    """Component name (as AdapterNetwork.components says it) -> model."""
    unet, tes = pipeline_components(pipe)
    names = ["te"] if len(tes) == 1 else ["te1", "te2"]
    return {"unet": unet, **dict(zip(names, tes, strict=True))}


@torch.no_grad()
def extract_adapter(base: str, tuned: str, out: str | Path, config: AdapterConfig, dtype: torch.dtype = torch.float16,
                    device: str = "cpu", overwrite: bool = False) -> dict[str, Any]:
    """Write the adapter that best reproduces tuned - base; returns the per-module errors."""
    if config.algo not in _FITS:
        raise ConfigError(f"extract: algo {config.algo!r} is not supported; use lokr or lora")
    out = check_output(out, overwrite)
    base_pipe = load_pipeline(base, torch_dtype=torch.float32)
    tuned_pipe = load_pipeline(tuned, torch_dtype=torch.float32)
    family, tuned_family = family_of_pipeline(base_pipe), family_of_pipeline(tuned_pipe)
    prediction = prediction_type_of(base_pipe)
    if tuned_family is not family:
        raise ModelError(f"{tuned} is an {tuned_family.title} model but {base} is an {family.title} model")
    base_parts, tuned_parts = _parts(base_pipe), _parts(tuned_pipe)
    network = create_network(config, base_pipe.unet, [m for k, m in base_parts.items() if k != "unet"])
    network.remove()  # only its module list, keys and tensor shapes are needed
    tensors: dict[str, torch.Tensor] = {}
    modules, targeted = [], set()
    for adapter in network.adapters():
        component, path = network.components[adapter.key], network.paths[adapter.key]
        targeted.add((component, f"{path}.weight"))
        w_base = adapter.base.weight
        w_tuned = tuned_parts[component].get_submodule(path).weight
        if w_tuned.shape != w_base.shape:
            raise ModelError(f"{component} module {path}: weight is {tuple(w_tuned.shape)} in {tuned} but "
                             f"{tuple(w_base.shape)} in {base}")
        dw = (w_tuned - w_base).to(device)
        if not torch.any(dw):
            continue
        fitted = _FITS[config.algo](dw, adapter.tensors())
        fitted = {n: t.to(dtype).cpu() for n, t in fitted.items()}
        rank = adapter.algo.rank(fitted)
        alpha = float(rank) if rank is not None else float(adapter.alpha)  # create_network's dim: scale 1
        approx = adapter.algo.delta_weight({n: t.float() for n, t in fitted.items()}, tuple(w_base.shape))
        _, rel = max_abs_and_relative(dw.cpu(), approx)
        modules.append({"key": adapter.key, "relative_error": rel, "norm": float(dw.norm())})
        tensors.update({f"{adapter.key}.{n}": t for n, t in fitted.items()})
        tensors[f"{adapter.key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    untargeted = _untargeted_changes(base_parts, tuned_parts, targeted)
    if not modules:
        raise ModelError(f"{tuned} and {base} have identical weights in every targeted module (preset "
                         f"{config.preset}); nothing to extract")
    meta = training_metadata(family, config.network_args(), config.dim, config.dim, title=out.stem,
                             prediction_type=prediction,
                             extra={"lokr_diffusion_extracted_from": {"base": Path(base).name,
                                                                      "tuned": Path(tuned).name}})
    write_safetensors(out, tensors, meta)
    return _summary(out, family.variant(prediction), config, modules, network, untargeted)


def _untargeted_changes(base_parts, tuned_parts, targeted) -> list[str]:
    """Weights that differ but no adapter module covers: the extraction cannot carry them."""
    changed = []
    for component, model in base_parts.items():
        tuned_params = dict(tuned_parts[component].named_parameters())
        for name, p in model.named_parameters():
            if (component, name) not in targeted and not torch.equal(p, tuned_params[name]):
                changed.append(f"{component}:{name}")
    return changed


def _summary(out: Path, family: str, config: AdapterConfig, modules: list[dict], network, untargeted) -> dict[str, Any]:
    total = math.sqrt(sum((m["relative_error"] * m["norm"]) ** 2 for m in modules))
    norm = math.sqrt(sum(m["norm"] ** 2 for m in modules))
    return {
        "output": str(out), "family": family, "algo": config.algo, "factor": config.factor, "dim": config.dim,
        "conv_dim": config.conv_dim, "preset": config.preset,
        "modules_extracted": len(modules), "modules_unchanged": len(network.module_keys()) - len(modules),
        "max_relative_error": max(m["relative_error"] for m in modules),
        "overall_relative_error": total / norm if norm else 0.0,
        "untargeted_changed_weights": untargeted, "modules": modules,
    }


def format_extract(r: dict[str, Any]) -> str:
    conv = f", conv_dim {r['conv_dim']}" if r["conv_dim"] else ""
    lines = [
        (f"extracted {r['algo']} ({r['family']}, preset {r['preset']}, factor {r['factor']}, dim {r['dim']}{conv})"
         f" -> {r['output']}"),
        f"  modules: {r['modules_extracted']} extracted, {r['modules_unchanged']} unchanged (skipped)",
        (f"  relative error ||dW - approx|| / ||dW||: overall {r['overall_relative_error']:.3g}, "
         f"worst module {r['max_relative_error']:.3g}"),
    ]
    worst = sorted(r["modules"], key=lambda m: -m["relative_error"])[:5]
    lines += [f"    {m['relative_error']:.3g}  {m['key']}" for m in worst]
    if r["untargeted_changed_weights"]:
        ex = r["untargeted_changed_weights"]
        lines.append(f"  {len(ex)} changed weights are outside the adapter's modules and are NOT in the file "
                     f"(e.g. {', '.join(ex[:3])}); a wider --preset or --conv-dim may cover some")
    return "\n".join(lines)
