"""One process of tests/test_fsdp.py (run by torchrun over gloo): adapters on a denoiser whose
frozen blocks are sharded with torch's FSDP2 `fully_shard`, the sharding Accelerate's FSDP2
plugin applies per block on GPUs. Rank 0 prints one JSON line per process and family with what the test checks."""
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lokr_diffusion.network import AdapterConfig, create_network
from tests.test_compile import _nonzero, tiny_denoiser


def _grads(network) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None}


def check(family_name: str) -> None:
    torch.manual_seed(0)  # the same model, adapter and input on every rank
    family, model, kwargs = tiny_denoiser(family_name)
    network = create_network(AdapterConfig(algo="lokr", preset="full", factor=4, dim=4, alpha=2.0),
                             unet=model, family=family)
    _nonzero(network)
    frozen = sum(p.numel() for p in model.parameters())

    model(**kwargs)[0].square().mean().backward()  # unsharded reference, on each rank
    reference = _grads(network)
    network.zero_grad(set_to_none=True)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    blocks = [b for name in ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
              for b in getattr(model, name, [])]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = sum(p.to_local().numel() for p in model.parameters())
    model(**kwargs)[0].square().mean().backward()
    sharded = _grads(network)
    worst = max(((sharded[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in reference.items())
    row = {"family": family_name, "rank": dist.get_rank(), "frozen": frozen, "local": local, "grads": len(sharded),
           "expected_grads": len(reference), "worst_rel": worst}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)  # one process prints: lines from two would interleave
    if dist.get_rank() == 0:
        for r in rows:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for name in sys.argv[1:]:
        check(name)
    # Teardown: both ranks past their last collective, the sharded models and their pending
    # work freed, the group destroyed while the interpreter is whole. Then leave without the
    # interpreter's finalisation, during which gloo's threads freeing tensors now and then
    # aborted the process (SIGABRT after all results were printed).
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
