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

What a step of each recipe all-reduces under this plan, counted from a config's shapes:

    python -m sage_dist.fsdp --model llama_60m,llama_1b --dp 8 --tp 8
"""
from __future__ import annotations

import argparse

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


def check_tp_heads(config, tp: int) -> None:
    """Attention heads are split whole across TP ranks: refuse degrees that do not divide
    a (Llama) config's query or key/value heads."""
    for key in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(config, key, None)
        if n is not None and n % tp:
            raise ValueError(f"tp={tp} does not divide the model's {key}={n}: each TP rank "
                             f"computes whole heads; allowed are divisors of {n}")


COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


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
    check_tp_heads(getattr(model, "config", None), tp_mesh.size())
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
    block = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
             "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    plan = {f"{block[p]}.{p}": ColwiseParallel() for p in COLWISE}
    plan.update({f"{block[p]}.{p}": RowwiseParallel() for p in ROWWISE})
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, plan)
    dp_mesh = mesh[dp]
    return shard_llama(model, dp_mesh, bf16=bf16, reshard_after_forward=reshard_after_forward)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for parameters on several meshes (FSDP2 over TP puts
    norms on the dp sub-mesh): the norm of each mesh's gradients is reduced over its own mesh,
    the squares summed, every gradient scaled by clamp(max_norm / (norm + 1e-6), max=1) as
    torch does (a NaN norm makes every gradient NaN, as torch's does). Returns the global norm
    (a plain CPU tensor, equal on every rank). Unlike torch's, it reads the norm on the host
    (one device sync per call) to combine the meshes."""
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


def tp_plan_cuts(name: str, shape) -> frozenset:
    """Tensor dims of a Llama parameter cut under parallelize_llama on a (dp, tp) mesh: FSDP2
    cuts dim 0 of everything, TP additionally dim 1 of the rowwise weights."""
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    return frozenset({0, 1}) if leaf in ROWWISE and len(shape) >= 2 else frozenset({0})


def llama_step_floats(model, recipe: str = "sage-hybrid", dp: int = 1, tp: int = 1) -> dict:
    """{floats, params, fraction} for one step of `recipe` on a Llama config (a shipped name,
    path, dict or module) under parallelize_llama on a dp x tp mesh."""
    from . import models
    from .optim.recipes import param_groups
    from .shard.comm import param_floats
    from .shard.fragment import global_shape

    for key, v in (("dp", dp), ("tp", tp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}={v!r}: must be an integer >= 1")
    m = models.meta_model(model)
    params = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    floats = 0
    if dp * tp > 1:
        for g in param_groups(m, recipe):
            for name, p in zip(g["param_names"], g["params"]):
                shape = global_shape(p)
                floats += param_floats(g["rule"], shape, tp_plan_cuts(name, shape),
                                       g.get("sinkhorn_iters", 0))
    return {"floats": floats, "params": params, "fraction": floats / params}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sage_dist.fsdp", description=(
        "Floats one optimizer step all-reduces under FSDP2 x TP (sage_dist.fsdp."
        "parallelize_llama), counted from the shapes."))
    ap.add_argument("--model", default="llama_60m,llama_1b",
                    help="comma-separated model configs (shipped names or paths)")
    ap.add_argument("--recipe", default="sage-hybrid,sage,sinkgd-hybrid,scale,lion",
                    help="comma-separated recipes")
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--tp", type=int, default=8)
    a = ap.parse_args(argv)
    print(f"| model | recipe | mesh | floats per step | of parameters |")
    print(f"|---|---|---|---:|---:|")
    for model in a.model.split(","):
        for recipe in a.recipe.split(","):
            r = llama_step_floats(model, recipe, a.dp, a.tp)
            print(f"| {model} ({r['params'] / 1e6:.0f}M) | {recipe} | FSDP {a.dp} x TP {a.tp} "
                  f"| {r['floats']:,} | {100 * r['fraction']:.3f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
