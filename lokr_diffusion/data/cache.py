"""On-disk and in-memory caches of VAE latents and text-encoder outputs.

Why cache: encoding every image through the VAE on every step costs more than the LoKr update
itself, and the VAE is frozen, so its output for a given crop never changes.

What makes two latents "the same" is the cache key: the image file's content hash (not its
name or mtime, so renaming or touching is free but any edit re-encodes), the bucket, the resize
and crop geometry, the flip, the alpha background, the VAE identity string and a format
version. Files are safetensors (never pickle: a cache folder shared between machines must not
be able to run code) written to a temporary file in the same folder and moved into place with
os.replace, so an interrupted run leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

logger = logging.getLogger("lokr_diffusion.data")

#: Bumped whenever pixels-to-cache changes (resize filter, crop rule, ...), invalidating old files.
CACHE_FORMAT = "lokr-diffusion-data-cache-1"

LatentEncodeFn = Callable[[torch.Tensor], torch.Tensor]
TextEncodeFn = Callable[[list[str]], Mapping[str, torch.Tensor]]


def _digest(parts: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def latent_cache_key(*, content_sha256: str, bucket: tuple[int, int], resized: tuple[int, int],
                     crop_top_left: tuple[int, int], flip: bool, background: tuple[int, int, int],
                     vae_id: str, mask: str | None = None) -> str:
    """The cache key of one encoded crop; any input that changes the pixels or the VAE is in it,
    and the loss mask stored with it (`masks.mask_identity`) when there is one."""
    parts = {"format": CACHE_FORMAT, "kind": "latents", "image": content_sha256,
             "bucket": list(bucket), "resized": list(resized), "crop": list(crop_top_left),
             "flip": flip, "background": list(background), "vae": vae_id}
    if mask is not None:  # only then: unmasked entries keep the keys they had before masks existed
        parts["mask"] = mask
    return _digest(parts)


def text_cache_key(*, caption: str, encoder_id: str) -> str:
    return _digest({"format": CACHE_FORMAT, "kind": "text", "caption": caption, "encoder": encoder_id})


def save_tensors_atomic(path: Path, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file so that readers never see a partial file."""
    from safetensors.torch import save as to_bytes

    from ..fileformat import atomic_write_bytes

    data = to_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    atomic_write_bytes(path, data)


def read_metadata(path: Path) -> dict[str, str] | None:
    """The file's safetensors metadata, or None when it is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        return None
    except Exception as exc:  # truncated or foreign file: treat as a miss and rewrite it
        logger.warning("cache file %s is unreadable (%s); it will be rewritten", path, exc)
        return None


class TensorStore:
    """Named groups of tensors under string keys, kept in memory or as one file per key.

    `directory=None` means memory only. Disk entries are checked against their key on lookup,
    so a file copied under the wrong name is a miss, not wrong data.
    """

    def __init__(self, directory: Path | None, kind: str) -> None:
        self.directory = directory / kind if directory is not None else None
        self.kind = kind
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def path_for(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        if self.directory is None:
            return key in self._memory
        meta = read_metadata(self.path_for(key))
        return meta is not None and meta.get("key") == key and meta.get("format") == CACHE_FORMAT

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], info: Mapping[str, str] | None = None) -> None:
        # clone: callers pass rows of a batch; a view would keep (and pickle) the whole batch
        tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}
        if self.directory is None:
            self._memory[key] = tensors
            return
        metadata = {**(info or {}), "key": key, "format": CACHE_FORMAT, "kind": self.kind}
        save_tensors_atomic(self.path_for(key), tensors, metadata)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if self.directory is None:
            return self._memory[key]
        return load_file(str(self.path_for(key)))


@dataclass(frozen=True)
class CacheStats:
    """What a cache pass did: `hits` were found, `encoded` went through the encoder."""

    hits: int
    encoded: int

    def __str__(self) -> str:
        return f"{self.hits} cached, {self.encoded} encoded"


# --------------------------------------------------------------------------------------------
# Helpers for the trainer: an encode function and identity string for a diffusers VAE


def module_identity(module: torch.nn.Module, extra: str = "") -> str:
    """A string that changes whenever the module's class, config or weights change.

    Hashing the weights (rather than trusting a model path) means a fine-tuned VAE saved over
    the old one still invalidates the cache. Costs one pass over the parameters.
    """
    h = hashlib.sha256()
    h.update(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:  # a diffusers FrozenDict or a transformers PretrainedConfig
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(extra.encode())
    return f"{type(module).__name__}-{h.hexdigest()[:32]}"


class VaeLatentEncoder:
    """`encode(pixel_values) -> latents` for a diffusers AutoencoderKL, ready for the UNet:
    the distribution's mode (deterministic, so cached and uncached runs agree), shifted and
    scaled by the VAE config. `identity` is the string to pass as `vae_id`."""

    def __init__(self, vae: torch.nn.Module, *, sample: bool = False,
                 generator: torch.Generator | None = None) -> None:
        self.vae = vae
        self.sample = sample
        self.generator = generator
        cfg = getattr(vae, "config", {})
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.identity = module_identity(vae, extra=f"|{'sample' if sample else 'mode'}|"
                                                   f"{self.scaling_factor}|{self.shift_factor}")

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        dist = self.vae.encode(pixel_values.to(param.device, param.dtype)).latent_dist
        z = dist.sample(self.generator) if self.sample else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor
