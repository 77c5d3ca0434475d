"""Shared helpers for the toolbox tests (no tests here): adapter files and CLI runs."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lokr_diffusion import AdapterConfig, create_network
from lokr_diffusion.cli import main


def make_adapter(unet, tes, path, seed=0, dtype=torch.float32, **cfg):
    """A saved adapter with random (non-zero) factors; returns the network's module keys and parameter count."""
    net = create_network(AdapterConfig(**cfg), unet=unet, text_encoders=tes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net.save(path, dtype=dtype)
    info = (net.module_keys(), net.num_parameters())
    net.remove()
    return info


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `lokr-diffusion argv...`."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys, *argv):
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def rewrite(src, dst, edit):
    """Copy an adapter file with its tensors passed through `edit(dict) -> dict`, metadata kept."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    save_file({k: v.contiguous() for k, v in edit(load_file(src)).items()}, str(dst), meta)
    return dst


def module_groups(tensors):
    groups = {}
    for k, v in tensors.items():
        mod, _, name = k.partition(".")
        groups.setdefault(mod, {})[name] = v
    return groups


def deltas(path_or_tensors, unet, tes):
    """Per-module scaled dW as lokr_diffusion loads it onto the model (the independent check)."""
    from lokr_diffusion import load_network

    net, _ = load_network(path_or_tensors, unet=unet, text_encoders=tes)
    out = {a.key: a.delta_weight().detach().float().clone() for a in net.adapters()}
    net.remove()
    return out
