"""Workers for the FSDP2 tests (run inside spawned gloo processes)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import sage_dist
from sage_dist.fsdp import shard_llama
from sage_dist.optim.reference import ReferenceOptimizer
from sage_dist.testing import compare

VOCAB, HIDDEN, BATCH, SEQ = 1001, 32, 12, 10   # 1001 rows divide by none of 2, 3, 4
SIGN_RULES = {"sage", "lion"}


class ProbeLlama(nn.Module):
    """A tiny HF Llama plus a 2-row weight, so some rank holds none of its rows."""

    def __init__(self, seed=0, vocab=VOCAB, hidden=HIDDEN, inter=48, layers=2):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        torch.manual_seed(seed)
        self.lm = LlamaForCausalLM(cfg)
        self.probe = nn.Linear(hidden, 2, bias=False)

    def get_output_embeddings(self):
        return self.lm.lm_head

    def forward(self, x):
        out = self.lm(x, labels=x, output_hidden_states=True)
        return out.loss + self.probe(out.hidden_states[-1]).pow(2).mean()


def make_mesh(shape):
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def global_batch(step, batch=BATCH, vocab=VOCAB):
    g = torch.Generator().manual_seed(7000 + step)
    return torch.randint(0, vocab, (batch, SEQ), generator=g)


def local_batch(step, rank, world, batch=BATCH):
    """This rank's equal slice of the step's global batch (so the mean loss is global)."""
    x = global_batch(step, batch)
    n = batch // world
    return x[rank * n:(rank + 1) * n]


def sharded_model(mesh, seed=0, **kw):
    model = ProbeLlama(seed, **kw)
    return shard_llama(model, mesh, layers=list(model.lm.model.layers))


def expected_comm_floats(opt) -> int:
    """Floats one step must all-reduce under FSDP2, from global shapes alone:
    one finiteness flag per parameter; column statistics per matrix (rows are local);
    two scalars per sharded vector under SAGE."""
    total = 0
    for g in opt.param_groups:
        for p in g["params"]:
            shape = tuple(p.shape)
            C = shape[-1] if len(shape) >= 2 else None
            total += 1
            rule = g["rule"]
            if rule == "sage":
                total += C if C is not None else 2
            elif rule in ("sinkhorn", "sinkgd"):
                total += g["sinkhorn_iters"] * C
            elif rule == "scale_embedding":
                total += C
    return total


def exactness(rank, world, mesh_shape, recipes, steps):
    """Per step: the sharded step vs the oracle stepped from the same full params and grads."""
    mesh = make_mesh(mesh_shape)
    dp = dist.get_world_size()
    out = {}
    for recipe in recipes:
        model = sharded_model(mesh)
        opt = sage_dist.build_optimizer(model, recipe)
        ref_params = [[torch.empty(p.shape) for p in g["params"]] for g in opt.param_groups]
        ref = ReferenceOptimizer(opt.param_groups, ref_params)
        worst, flips, numel, comm_ok, comm = 0.0, 0, 0, True, None
        for step in range(steps):
            model(local_batch(step, rank, dp)).backward()
            for rg, g in zip(ref_params, opt.param_groups):
                for rp, p in zip(rg, g["params"]):
                    rp.copy_(p.full_tensor())
            ref.step([[p.grad.full_tensor() for p in g["params"]] for g in opt.param_groups])
            opt.step()
            comm = opt.comm_stats()
            comm_ok &= comm["floats"] == expected_comm_floats(opt)
            opt.zero_grad(set_to_none=True)
            for rg, g in zip(ref_params, opt.param_groups):
                flip = 2 * g["lr"] if g["rule"] in SIGN_RULES else None
                for rp, p in zip(rg, g["params"]):
                    d = compare(p.full_tensor(), rp, 1e-6, flip)
                    worst, flips, numel = max(worst, d.rel), flips + d.flips, numel + d.numel
        out[recipe] = dict(rel=worst, flips=flips, numel=numel, comm_ok=comm_ok, comm=comm,
                           expected=expected_comm_floats(opt), state=opt.state_bytes())
    return out


def trajectory(rank, world, mesh_shape, recipe, steps):
    """A sharded run vs a single-process run on the same global batches: max difference."""
    mesh = make_mesh(mesh_shape)
    dp = dist.get_world_size()
    model = sharded_model(mesh)
    plain = ProbeLlama(0)
    opt = sage_dist.build_optimizer(model, recipe)
    popt = sage_dist.build_optimizer(plain, recipe)
    for step in range(steps):
        model(local_batch(step, rank, dp)).backward()
        opt.step()
        opt.zero_grad()
        plain(global_batch(step)).backward()
        popt.step()
        popt.zero_grad()
    full = dict((n, p.full_tensor()) for n, p in model.named_parameters())
    worst = 0.0
    for n, p in plain.named_parameters():
        worst = max(worst, compare(full[n], p, 0).rel)
    return worst


def replicated_state_identical(rank, world, mesh_shape):
    """SAGE's S (replicated) must be bit-identical on every rank after steps."""
    mesh = make_mesh(mesh_shape)
    model = sharded_model(mesh)
    opt = sage_dist.build_optimizer(model, "sage-hybrid")
    for step in range(3):
        model(local_batch(step, rank, dist.get_world_size())).backward()
        opt.step()
        opt.zero_grad()
    S = torch.cat([st["S"].reshape(-1) for st in opt.state.values() if "S" in st
                   and not hasattr(st["S"], "to_local")])
    gathered = [torch.empty_like(S) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, S)
    m = opt.state[model.lm.model.embed_tokens.weight]["m"]
    return all(torch.equal(S, o) for o in gathered), type(m).__name__, tuple(m.shape), \
        tuple(m.to_local().shape)


def bad_placements(rank, world, case):
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    if case == "shard1":
        p = nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, [Shard(1)]))
        sage_dist.optim.SAGE([p])
    elif case == "tp":
        mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
        p = nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh2, [Shard(0), Shard(0)]))
        sage_dist.optim.SAGE([p])
    elif case == "two_meshes":
        other = init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b"))
        p = nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)]))
        from torch.distributed.tensor import Replicate
        q = nn.Parameter(distribute_tensor(torch.zeros(6, 4), other, [Replicate(), Shard(0)]))
        sage_dist.optim.SAGE([p, q])
    return "no error"
