"""One process of tests/test_memory_estimate.py: `plan`'s training-memory estimate for a
scaled-down denoiser beside the memory one real training step takes on the CPU.

Run with glibc's mmap threshold lowered (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the
resident set at once, as a GPU allocator would reuse them; prints one JSON line."""
import gc
import json
import sys
from pathlib import Path

import torch

from lokr_diffusion.families import get_family
from lokr_diffusion.network import AdapterConfig, create_network
from lokr_diffusion.tools.activations import example_inputs
from lokr_diffusion.tools.plan import TrainingSetup, training_memory

# wider than the tiny test models, so weights and activations are hundreds of MB, not a few
SCALED = {
    "sd15": ("unet", {"block_out_channels": [128, 256, 512, 512], "attention_head_dim": 8, "norm_num_groups": 32},
             256),
    "flux": ("transformer", {"attention_head_dim": 64, "num_attention_heads": 12, "axes_dims_rope": [16, 24, 24]},
             512),
}


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(family_name: str, tiny_folder: str) -> None:
    """Both rows (without and with gradient checkpointing) from one process: the estimates first,
    on the architecture without weights, then the baseline, the model and the measured steps."""
    import diffusers
    import transformers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    family = get_family(family_name)
    index = json.loads((Path(tiny_folder) / "model_index.json").read_text())
    encoders = [getattr(transformers, index[name][1]).from_pretrained(Path(tiny_folder) / name).requires_grad_(False)
                for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if name in index]
    sub, widen, side = SCALED[family_name]
    base = family.tiny_unet_config() if sub == "unet" else family.tiny_transformer_config()
    cls = diffusers.UNet2DConditionModel if sub == "unet" else diffusers.FluxTransformer2DModel
    config = AdapterConfig(algo="lokr", preset="attn-mlp", factor=4, dim=8, alpha=4.0)
    estimates = {}
    for checkpointing in (False, True):  # as `plan` makes it: on the architecture without weights
        with torch.device("meta"):
            meta = cls(**{**base, **widen}).requires_grad_(False).train()
        setup = TrainingSetup(mixed_precision="no", resolution=(side, side), batch_size=1,
                              gradient_checkpointing=checkpointing)
        estimates[checkpointing] = training_memory(family, meta, encoders, [], create_network(config, meta, family=family),
                                                   setup)
    gc.collect()
    baseline = _rss("VmRSS")  # Python, torch, the text encoders (frozen, not in the estimate)
    denoiser = cls(**{**base, **widen}).requires_grad_(False).train()
    network = create_network(config, denoiser, family=family)
    inputs = example_inputs(family, denoiser, encoders, (side, side), 1)
    inputs[0].normal_()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    for checkpointing in (False, True):
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")  # the peak from here on is this step's
        family.denoise(denoiser, *inputs).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, as between steps
        peak = _rss("VmHWM")
        e = estimates[checkpointing]
        print(json.dumps({"family": family_name, "checkpointing": checkpointing, "measured": peak - baseline,
                          "estimate": e["total"], **{k: e[k] for k in ("frozen_weights", "adapter", "activations")}}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
