"""FSDP2 face of sage_dist: shard a Hugging Face Llama the usual way, then build the optimizer.

    mesh = init_device_mesh("cpu", (world,))          # or ("cuda", (replicas, shards)) for HSDP
    model = sage_dist.fsdp.shard_llama(model, mesh, bf16=True)
    opt = sage_dist.build_optimizer(model, "sage-hybrid")   # reads each DTensor's placements

With tensor parallelism, a 2-D (dp, tp) mesh:

    mesh = init_device_mesh("cuda", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    model = sage_dist.fsdp.parallelize_llama(model, mesh)   # TP over "tp", FSDP2 over "dp"
    opt = sage_dist.build_optimizer(model, "sage-hybrid")
    ...
    sage_dist.fsdp.clip_grad_norm_(model.parameters(), 1.0)  # parameters on two meshes
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


def _tp_divides(model: nn.Module, tp: int) -> None:
    """Attention heads are split whole across TP ranks: refuse degrees that do not divide."""
    cfg = getattr(model, "config", None)
    for key in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(cfg, key, None)
        if n is not None and n % tp:
            raise ValueError(f"tp={tp} does not divide the model's {key}={n}: each TP rank "
                             f"computes whole heads; allowed are divisors of {n}")


def parallelize_llama(model: nn.Module, mesh, *, tp: str = "tp", dp: str = "dp",
                      bf16: bool = False, reshard_after_forward=True) -> nn.Module:
    """Tensor-parallel a Hugging Face Llama over mesh[tp], then FSDP2 over mesh[dp].

    The plan is Megatron's, as torchtitan applies it without sequence parallelism: in each
    decoder layer q/k/v/gate/up are colwise (weights Shard(0)), o/down rowwise (Shard(1)), so
    each layer all-reduces its activations twice; the embedding is vocabulary-parallel
    (Shard(0), its output all-reduced) and the head colwise with a replicated (gathered)
    output, so the loss sees full logits. Norm weights stay whole on every TP rank and FSDP2
    shards them over mesh[dp] alone; the optimizer handles both meshes (they share a root).
    `mesh` must name its dims. For TP alone give the dp dim size 1 (mesh (1, tp)): the norms
    then become DTensors of the same root mesh too, which one optimizer needs.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    names = tuple(mesh.mesh_dim_names or ())
    for key, dim in (("tp", tp), ("dp", dp)):
        if dim not in names:
            raise ValueError(f"{key}={dim!r} is not a dim of the mesh (dims {names}): name "
                             f"the mesh dims with init_device_mesh(..., mesh_dim_names=...)")
    tp_mesh = mesh[tp]
    _tp_divides(model, tp_mesh.size())
    base = getattr(model, "model", model)
    parallelize_module(base, tp_mesh, {"embed_tokens": RowwiseParallel(
        input_layouts=Replicate(), output_layouts=Replicate())})
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        if head.weight is getattr(base.embed_tokens, "weight", None):
            raise ValueError("tied input and output embeddings: the head would be cut twice; "
                             "allowed are models with tie_word_embeddings=false")
        name = next(n for n, m in model.named_modules() if m is head)
        parallelize_module(model, tp_mesh, {name: ColwiseParallel(
            output_layouts=Replicate())})
    plan = {f"self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")}
    plan["self_attn.o_proj"] = RowwiseParallel()
    plan.update({f"mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")})
    plan["mlp.down_proj"] = RowwiseParallel()
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, plan)
    dp_mesh = mesh[dp]
    return shard_llama(model, dp_mesh, bf16=bf16, reshard_after_forward=reshard_after_forward)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for parameters on several meshes (FSDP2 over TP puts
    norms on the dp sub-mesh): the norm of each mesh's gradients is reduced over its own mesh,
    the squares summed, every gradient scaled by clamp(max_norm / (norm + 1e-6), max=1) as
    torch does (a NaN norm makes every gradient NaN, as torch's does). Returns the global norm (a plain tensor, equal on every rank)."""
    from torch.distributed.tensor import DTensor

    by_mesh: dict = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            by_mesh.setdefault(key, []).append(p.grad)
    sq = torch.zeros((), dtype=torch.float64)
    for mesh, grads in by_mesh.items():
        n = torch.nn.utils.get_total_norm(grads, 2.0)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        sq += n.double().cpu() ** 2
    total = sq.sqrt().float()
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))   # NaN stays NaN, as in torch
    for grads in by_mesh.values():
        torch._foreach_mul_(grads, coef)
    return total
