"""Activation memory of one training step, counted rather than guessed.

The denoiser's forward runs once on fake tensors (shapes and dtypes, no storage, so the real
Flux.1-dev at 1024 px costs seconds and no memory), with autograd's saved-tensor hook counting
every tensor the backward pass will need, each storage once. That is exactly what stays alive
between forward and backward, whatever the architecture, attention kernel or adapter algorithm.

The forward goes through the model's own checkpointing hook (Diffusers'
`enable_gradient_checkpointing(gradient_checkpointing_func=...)`), so the regions are the blocks
the trainer checkpoints. With checkpointing a region keeps only its inputs and one region at a
time re-creates its saved tensors in the backward pass; without, every region's saved tensors
stay. Either way the backward pass of the largest region also holds the gradients of its
activations, counted as that region's saved bytes once more.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn

from ..families.base import Family


class _Counter:
    """Bytes of saved tensors by storage, split into outside any checkpointed region, and per region."""

    def __init__(self, weights: set[int]) -> None:
        self.weights = weights  # storages of parameters and buffers: counted as weights, not activations
        self.outside: dict[int, int] = {}
        self.region: dict[int, int] | None = None
        self.regions: dict[int, int] = {}  # every region's saved tensors, for a run without checkpointing
        self.region_peak = 0
        self.kept_inputs: dict[int, int] = {}
        self.held: list[torch.Tensor] = []  # fake, so free to hold: no storage key is reused while counting

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # views (a weight's transpose, saved by linear) share it
        if storage._cdata not in self.weights:
            (self.region if self.region is not None else self.outside)[storage._cdata] = storage.nbytes()
            self.held.append(t)
        return t

    def checkpoint(self, function, *args, **kwargs):
        """Stands in for torch.utils.checkpoint: runs the region once, counting its saved tensors
        apart and keeping its tensor inputs, as checkpointing keeps them."""
        if self.region is not None:  # a region inside a region: part of the outer one
            return function(*args, **kwargs)
        for a in (*args, *kwargs.values()):
            if torch.is_tensor(a):
                self.kept_inputs[a.untyped_storage()._cdata] = a.untyped_storage().nbytes()
                self.held.append(a)
        self.region = {}
        try:
            return function(*args, **kwargs)
        finally:
            self.region_peak = max(self.region_peak, sum(self.region.values()))
            self.regions.update(self.region)
            self.region = None


def _fake_parameters(modules: Sequence[nn.Module], dtype_of) -> None:
    """Replace meta-device parameters and buffers with fake CPU ones (inside a FakeTensorMode);
    a tensor shared by several modules (tied embeddings) stays shared."""
    done: dict[int, torch.Tensor] = {}
    for module in modules:
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is None or t.device.type != "meta":
                        continue
                    if id(t) not in done:
                        fake = torch.empty(t.shape, dtype=dtype_of(t), device="cpu")
                        done[id(t)] = (nn.Parameter(fake, requires_grad=t.requires_grad)
                                       if isinstance(t, nn.Parameter) else fake)
                    store[name] = done[id(t)]


def _token_lengths(family: Family, encoders: Sequence[nn.Module]) -> list[int]:
    lengths = []
    for te in encoders:
        if "T5" in type(te).__name__:
            lengths.append(int(getattr(family, "max_sequence_length", 512)))
        else:
            lengths.append(int(getattr(te.config, "max_position_embeddings", 77)))
    return lengths


def example_inputs(family: Family, denoiser: nn.Module, encoders: Sequence[nn.Module], resolution: tuple[int, int],
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """(latents, timesteps, prompt embeddings, batch) for one training step of `denoiser` on
    images of `resolution` (width, height): zeros of the shapes the trainer feeds it, prompts at
    the tokenizers' full length. Real tensors outside a FakeTensorMode, fake ones inside."""
    width, height = resolution
    scale = family.vae_scale_factor
    with torch.no_grad():  # prompt embeddings are cached (or computed outside the denoiser's graph)
        ids = [torch.zeros(batch_size, n, dtype=torch.long) for n in _token_lengths(family, encoders)]
        embeds = family.encode_text(encoders, ids, torch.device("cpu"))
    latents = torch.zeros(batch_size, family.latent_channels(denoiser), height // scale, width // scale)
    timesteps = torch.full((batch_size,), 500, dtype=torch.long)
    return latents, timesteps, embeds, family.example_batch(resolution, batch_size)


def saved_activation_bytes(family: Family, denoiser: nn.Module, encoders: Sequence[nn.Module],
                           adapters: Sequence[nn.Module], resolution: tuple[int, int], batch_size: int,
                           compute_dtype: torch.dtype, checkpointing: bool) -> dict[str, Any]:
    """What one training step of `denoiser` (adapters attached) keeps for the backward pass.

    Works on models on the meta device (their parameters become fake) and on real ones (read,
    not changed). Returns the bytes kept at the backward pass's peak and how they split."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    weights: set[int] = set()
    counter = _Counter(weights)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _fake_parameters([denoiser, *encoders], lambda t: compute_dtype if t.is_floating_point() else t.dtype)
        _fake_parameters(list(adapters), lambda t: torch.float32 if t.is_floating_point() else t.dtype)
        weights |= {t.untyped_storage()._cdata for m in (denoiser, *encoders, *adapters)
                    for t in (*m.parameters(), *m.buffers())}
        inputs = example_inputs(family, denoiser, encoders, resolution, batch_size)
        # the regions are found through the model's own checkpointing hook either way; without
        # checkpointing their saved tensors all stay
        restore = (_checkpointing(denoiser, counter) if hasattr(denoiser, "enable_gradient_checkpointing")
                   else contextlib.nullcontext())
        autocast = (torch.autocast("cpu", dtype=compute_dtype) if compute_dtype != torch.float32
                    else contextlib.nullcontext())
        with restore, autocast, torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            family.denoise(denoiser, *inputs)
    outside = sum(counter.outside.values())
    if checkpointing:
        kept = sum(b for k, b in counter.kept_inputs.items() if k not in counter.outside)
        saved = outside + kept + counter.region_peak  # one region recomputed at a time
    else:
        kept = sum(b for k, b in counter.regions.items() if k not in counter.outside)
        saved = outside + kept
    # while a region's backward runs, gradients of its activations live beside them: about as many
    # bytes again (measured against real CPU steps in tests/test_memory_estimate.py)
    return {"bytes": saved + counter.region_peak, "saved": saved, "outside_regions": outside, "in_regions": kept,
            "largest_region": counter.region_peak}


@contextlib.contextmanager
def _checkpointing(denoiser: nn.Module, counter: _Counter):
    """Route the denoiser's checkpointed blocks through the counter (which runs them plainly)."""
    was = bool(getattr(denoiser, "is_gradient_checkpointing", False))
    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=counter.checkpoint)
    try:
        yield
    finally:
        if not was:
            denoiser.disable_gradient_checkpointing()
