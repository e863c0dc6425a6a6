"""Workers for the tensor-parallel tests (run inside spawned gloo processes).

The probe model has a parameter of every kind a TP plan produces: colwise (Shard(0)) and
rowwise (Shard(1)) weights, a vocabulary-parallel embedding (Shard(0)) and one cut along its
features (Shard(1)), a colwise bias (a sharded vector), replicated norms, a 3-D weight cut
on dim 1, and dims that no TP degree here divides (13, 9, 37, 10). Under FSDP x TP it is then
`fully_shard`-ed, so the placements are FSDP2's own (_StridedShard over a TP Shard(0), norms
on the dp sub-mesh). Gradients are drawn whole on every rank and cut to each rank's block, so
every step has the same global gradients at any mesh.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

import sage_dist
from sage_dist.fsdp import llama_step_floats
from sage_dist.shard.comm import param_floats
from fsdp_cases import Oracle, dcp_load, dcp_save, full_state, oracle_steps

VOCAB, HIDDEN, FFN, ODD = 37, 12, 18, 13


class TPProbe(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Embedding(9, HIDDEN)
        self.q = nn.Linear(HIDDEN, 10)            # colwise, with a bias of 10
        self.o = nn.Linear(10, HIDDEN, bias=False)
        self.up = nn.Linear(HIDDEN, FFN, bias=False)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)
        self.odd = nn.Linear(ODD, 9, bias=False)  # rowwise over 13 columns
        self.conv = nn.Parameter(torch.randn(6, 4, 3) * 0.1)
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


MESHES = {"tp2": (2,), "tp4": (4,), "fsdp2xtp2": (2, 2), "hsdp2x1xtp2": (2, 1, 2)}


def tp_model(shape, seed=0):
    """The probe, TP-parallelised over the last mesh dim, FSDP2 over the others."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    names = {1: ("tp",), 2: ("dp", "tp"), 3: ("rep", "dp", "tp")}[len(shape)]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    tp = mesh["tp"]
    model = TPProbe(seed)
    parallelize_module(model, tp, {
        "embed": RowwiseParallel(), "pos": ColwiseParallel(), "q": ColwiseParallel(),
        "o": RowwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel(),
        "odd": RowwiseParallel(), "lm_head": ColwiseParallel()})
    model.conv = nn.Parameter(distribute_tensor(model.conv.data, tp, [Shard(1)]))
    if len(shape) == 1:   # TP alone: the norms are replicated DTensors (as under SP)
        for n in ("weight", "bias"):
            setattr(model.norm, n, nn.Parameter(distribute_tensor(
                getattr(model.norm, n).data, tp, [Replicate()])))
    else:
        fully_shard(model, mesh=mesh[names[:-1]] if len(shape) == 3 else mesh["dp"])
    return model, mesh


def set_grads(model, step):
    """The same global gradients on every rank, cut to each rank's block."""
    gen = torch.Generator().manual_seed(500 + step)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen).pow(3)
        size, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        local = full[tuple(slice(o, o + s) for o, s in zip(off, size))].contiguous()
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                    shape=p.shape, stride=p.stride())


def expected_comm_floats(opt) -> int:
    """Floats one step must all-reduce, from global shapes and placements alone
    (sage_dist.shard.comm.param_floats of the tensor dims the placements cut, for every
    parameter when the summed group has more than one rank), plus one flag per parameter
    where replicas agree."""
    layout = opt.layout
    total = 0
    if layout.reducer.replicas is not None:
        total += sum(len(g["params"]) for g in opt.param_groups)
    for g in opt.param_groups:
        for p in g["params"]:
            cuts = {pl.dim for pl in p.placements if isinstance(pl, (Shard, _StridedShard))}
            if layout.world > 1:
                total += param_floats(g["rule"], p.shape, cuts, g.get("sinkhorn_iters", 0))
    return total


def exactness(rank, world, shape, recipes, steps):
    """Per step, every recipe vs the one-process oracle on the same full params and grads;
    also checks each rank's local data is its block of the full tensor (the layout's view)."""
    out = {}
    for recipe in recipes:
        model, mesh = tp_model(shape)
        opt = sage_dist.build_optimizer(model, recipe)
        placements = sorted({f"{p.device_mesh.mesh_dim_names}{tuple(p.placements)}"
                             for p in model.parameters()})
        out[recipe] = oracle_steps(opt, steps, lambda step: set_grads(model, step),
                                   expected_comm_floats)
        out[recipe]["placements"] = placements
    return out


def bad_placements(rank, world, case):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    if case == "shard2":
        p = nn.Parameter(distribute_tensor(torch.zeros(4, 2, 6), mesh, [Shard(2)]))
        sage_dist.optim.SAGE([p])
    elif case == "strided_alone":
        p = nn.Parameter(DTensor.from_local(torch.zeros(2, 4), mesh, [_StridedShard(0, sf=2)],
                                            run_check=False, shape=(4, 4), stride=(4, 1)))
        sage_dist.optim.SAGE([p])
    elif case == "two_roots":
        other = init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b"))
        p = nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, [Shard(1)]))
        q = nn.Parameter(distribute_tensor(torch.zeros(6, 4), other, [Replicate(), Shard(0)]))
        sage_dist.optim.SAGE([p, q])
    return "no error"


def _steps(model, opt, start, stop):
    for step in range(start, stop):
        set_grads(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)


def checkpoint_save(rank, world, shape, recipe, path, steps):
    """`steps` steps at mesh `shape`, then torch.distributed.checkpoint of model + optimizer;
    returns every parameter and state tensor gathered whole."""
    model, _ = tp_model(shape)
    opt = sage_dist.build_optimizer(model, recipe)
    _steps(model, opt, 0, steps)
    dcp_save(model, opt, path)
    return full_state(model, opt)


def checkpoint_load(rank, world, shape, recipe, path, done, more):
    """Load at another mesh (a model of a different init: everything must come from the
    file); the state gathered whole, then `more` steps each against the oracle stepped from
    the same full state."""
    model, _ = tp_model(shape, seed=1)
    opt = sage_dist.build_optimizer(model, recipe)
    dcp_load(model, opt, path)
    loaded = full_state(model, opt)
    oracle = Oracle(opt, seed_state=True)
    for step in range(done, done + more):
        set_grads(model, step)
        oracle.step()
        opt.zero_grad(set_to_none=True)
    return dict(loaded=loaded, exact=oracle.result)


def llama_comm(rank, world, shape, recipes):
    """One real step of the tiny Llama under sage_dist.fsdp.parallelize_llama on a (dp, tp)
    mesh: what it all-reduced, and the count sage_dist.fsdp.llama_step_floats makes from the config.
    Before it, sage_dist.fsdp.clip_grad_norm_ against torch's on the unsharded model (every
    dp rank sees the same batch, so the averaged gradients equal the one-process ones)."""
    from sage_dist.fsdp import clip_grad_norm_, parallelize_llama
    from sage_dist.models import build_model, load_llama_config
    mc = load_llama_config("llama_tiny")
    x = torch.randint(0, mc.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = build_model(mc, 0)
    ref(input_ids=x, labels=x).loss.backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    out = {}
    for recipe in recipes:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        model = parallelize_llama(build_model(mc, 0), mesh)
        opt = sage_dist.build_optimizer(model, recipe)
        model(input_ids=x, labels=x).loss.backward()
        norm = float(clip_grad_norm_(model.parameters(), 0.5))
        grad_diff = max(float((p.grad.full_tensor() - ref_grads[n]).abs().max())
                        for n, p in model.named_parameters())
        opt.step()
        out[recipe] = (opt.comm_stats()["floats"], llama_step_floats(mc, recipe, *shape),
                       norm, ref_norm, grad_diff)
    return out
