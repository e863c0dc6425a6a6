"""FSDP2 face of sage_dist: shard a Hugging Face Llama the usual way, then build the optimizer.

    mesh = init_device_mesh("cpu", (world,))          # or ("cuda", (replicas, shards)) for HSDP
    model = sage_dist.fsdp.shard_llama(model, mesh, bf16=True)
    opt = sage_dist.build_optimizer(model, "sage-hybrid")   # reads each DTensor's placements
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (model.model.layers)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: pass the blocks to "
                         f"shard with `layers=`")
    return list(layers)


def shard_llama(model: nn.Module, mesh, *, bf16: bool = False, reshard_after_forward=True,
                layers: list[nn.Module] | None = None) -> nn.Module:
    """fully_shard each decoder layer, then the root (which takes embeddings, norm, head).

    `mesh` is 1-D for FSDP or 2-D (replicate, shard) for HSDP. With bf16=True, parameters are
    cast to bf16 for compute and gradients reduced in fp32; the sharded parameters the
    optimizer updates stay fp32.
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 else MixedPrecisionPolicy()
    for layer in (layers if layers is not None else decoder_layers(model)):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    return model
