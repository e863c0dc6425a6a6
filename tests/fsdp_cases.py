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
    one finiteness flag per parameter (twice under HSDP: the replicas agree on it too);
    column statistics per matrix (rows are local); two scalars per sharded vector under SAGE."""
    total = 0
    if opt.layout.mesh is not None and opt.layout.mesh.ndim > 1:
        total += sum(len(g["params"]) for g in opt.param_groups)
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


class Oracle:
    """The single-process oracle beside a sharded optimizer (docs/DISTRIBUTED.md,
    "Exactness"): each step starts the oracle from the same full parameters and full averaged
    gradients, steps both, and compares. The oracle keeps its own state (optionally seeded from the optimizer's)."""

    def __init__(self, opt, seed_state=False):
        self.opt = opt
        self.params = [[torch.empty(p.shape) for p in g["params"]] for g in opt.param_groups]
        self.ref = ReferenceOptimizer(opt.param_groups, self.params)
        if seed_state:
            for sts, g in zip(self.ref.state, opt.param_groups):
                for st, p in zip(sts, g["params"]):
                    for k, v in opt.state[p].items():
                        st[k] = int(v.item()) if k == "step" else _full(v)
        self.worst, self.flips, self.numel = 0.0, 0, 0

    def step(self, skip=()):
        """One step of both; the oracle treats the parameters in `skip` as having no gradient
        (what nonfinite='skip' must do with a NaN anywhere in their gradient)."""
        opt = self.opt
        for rg, g in zip(self.params, opt.param_groups):
            for rp, p in zip(rg, g["params"]):
                rp.copy_(p.full_tensor())
        self.ref.step([[None if any(p is s for s in skip) else p.grad.full_tensor()
                        for p in g["params"]] for g in opt.param_groups])
        opt.step()
        for rg, g in zip(self.params, opt.param_groups):
            flip = 2 * g["lr"] if g["rule"] in SIGN_RULES else None
            for rp, p in zip(rg, g["params"]):
                d = compare(p.full_tensor(), rp, 1e-6, flip)
                self.worst = max(self.worst, d.rel)
                self.flips, self.numel = self.flips + d.flips, self.numel + d.numel

    @property
    def result(self):
        return self.worst, self.flips, self.numel


def exactness(rank, world, mesh_shape, recipes, steps):
    """Per step: the sharded step vs the oracle stepped from the same full params and grads."""
    mesh = make_mesh(mesh_shape)
    dp = dist.get_world_size()
    out = {}
    for recipe in recipes:
        model = sharded_model(mesh)
        opt = sage_dist.build_optimizer(model, recipe)
        out[recipe] = oracle_steps(opt, steps,
                                   lambda step: model(local_batch(step, rank, dp)).backward(),
                                   expected_comm_floats)
        out[recipe]["state"] = opt.state_bytes()
    return out


def oracle_steps(opt, steps, make_grads, expected_floats) -> dict:
    """`steps` steps of `opt` beside the oracle (make_grads(step) fills the gradients); the
    worst difference, sign flips, and whether each step sent expected_floats(opt) floats."""
    oracle, comm_ok, comm = Oracle(opt), True, None
    for step in range(steps):
        make_grads(step)
        oracle.step()
        comm = opt.comm_stats()
        comm_ok &= comm["floats"] == expected_floats(opt)
        opt.zero_grad(set_to_none=True)
    worst, flips, numel = oracle.result
    return dict(rel=worst, flips=flips, numel=numel, comm_ok=comm_ok, comm=comm,
                expected=expected_floats(opt))


def side_by_side(model, opt, plain, popt, rank, world, steps):
    """Train a distributed model on this rank's slice and a one-process copy on the whole
    global batch, step for step."""
    for step in range(steps):
        model(local_batch(step, rank, world)).backward()
        opt.step()
        opt.zero_grad()
        plain(global_batch(step)).backward()
        popt.step()
        popt.zero_grad()


def trajectory(rank, world, mesh_shape, recipe, steps):
    """A sharded run vs a single-process run on the same global batches: max difference."""
    mesh = make_mesh(mesh_shape)
    dp = dist.get_world_size()
    model = sharded_model(mesh)
    plain = ProbeLlama(0)
    opt = sage_dist.build_optimizer(model, recipe)
    popt = sage_dist.build_optimizer(plain, recipe)
    side_by_side(model, opt, plain, popt, rank, dp, steps)
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
    if case == "two_meshes":
        other = init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b"))
        p = nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)]))
        from torch.distributed.tensor import Replicate
        q = nn.Parameter(distribute_tensor(torch.zeros(6, 4), other, [Replicate(), Shard(0)]))
        sage_dist.optim.SAGE([p, q])
    return "no error"


CKPT_BATCH = 6  # divides by 2 and 3: the same global batches at both world sizes


def _train(model, opt, rank, world, steps, start=0):
    for step in range(start, start + steps):
        model(local_batch(step, rank, world, CKPT_BATCH)).backward()
        opt.step()
        opt.zero_grad()


def _full(t):
    # full_tensor() of a Replicate() DTensor is its local tensor itself: copy, so that a later
    # in-place step does not change what was recorded
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def full_state(model, opt):
    """Every parameter and optimizer-state tensor, gathered whole (same order on all ranks)."""
    out = {f"param:{n}": _full(p.detach()) for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for name, p in zip(g["param_names"], g["params"]):
            for k, v in opt.state[p].items():
                out[f"state:{name}:{k}"] = _full(v)
    return out


def dcp_save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def checkpoint_save(rank, world, recipe, path, steps):
    model = sharded_model(make_mesh((world,)))
    opt = sage_dist.build_optimizer(model, recipe)
    _train(model, opt, rank, world, steps)
    dcp_save(model, opt, path)
    return full_state(model, opt)


def dcp_load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _exact_steps(model, opt, rank, world, start, steps):
    """Per-step exactness from a loaded state: the oracle starts from the same full state."""
    oracle = Oracle(opt, seed_state=True)
    for step in range(start, start + steps):
        model(local_batch(step, rank, world, CKPT_BATCH)).backward()
        oracle.step()
        opt.zero_grad()
    return oracle.result


def checkpoint_resume(rank, world, recipe, path, done, total):
    """Load at this world size: the state as saved, exact steps after it, and the whole run
    compared with an uninterrupted run at this world size."""
    mesh = make_mesh((world,))
    straight = sharded_model(mesh)
    sopt = sage_dist.build_optimizer(straight, recipe)
    _train(straight, sopt, rank, world, total)

    model = sharded_model(mesh, seed=1)   # different init: everything must come from the file
    opt = sage_dist.build_optimizer(model, recipe)
    dcp_load(model, opt, path)
    loaded = full_state(model, opt)
    exact = _exact_steps(model, opt, rank, world, done, total - done)
    a = dict((n, p.full_tensor()) for n, p in straight.named_parameters())
    drift = max(compare(p.full_tensor(), a[n], 0).rel for n, p in model.named_parameters())
    return dict(loaded=loaded, exact=exact, drift=drift)


def ddp_matches_single_process(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(ProbeLlama(0))
    opt = sage_dist.build_optimizer(model, "sage-hybrid")
    assert opt.layout.name == "local"
    plain = ProbeLlama(0)
    popt = sage_dist.build_optimizer(plain, "sage-hybrid")
    names = {r: [n for n in g["param_names"]] for r, g in
             zip(range(len(opt.param_groups)), opt.param_groups)}
    assert names == {r: g["param_names"] for r, g in enumerate(popt.param_groups)}
    side_by_side(model, opt, plain, popt, rank, world, 3)
    return max(compare(a, b, 0).rel for a, b in zip(model.module.parameters(),
                                                   plain.parameters()))


def comm_of_config(rank, world, config_path, recipe):
    """One real FSDP2 step of a model config: the floats it all-reduced, and the parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig.from_json_file(config_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    shard_llama(model, make_mesh((world,)))
    opt = sage_dist.build_optimizer(model, recipe)
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    return opt.comm_stats(), expected_comm_floats(opt), n


def nan_in_one_shard(rank, world, mesh_shape, recipe, steps, nan_step, nan_rank, name, mode):
    """A NaN written into `nan_rank`'s local shard of `name`'s gradient at `nan_step` (after
    the reduce-scatter: no other rank's gradient holds it). 'skip': per rank, the parameters
    that step left bit-identical (with their state), the optimizer's skip count after each
    step, and every step against the oracle (which gives `name` no gradient at `nan_step`).
    'raise': the error and when it came, per rank."""
    import time

    mesh = make_mesh(mesh_shape)
    model = sharded_model(mesh)
    opt = sage_dist.build_optimizer(model, recipe, nonfinite=mode)
    oracle, target = Oracle(opt), dict(model.named_parameters())[name]
    counts, unchanged, state_kept = [], None, None
    for step in range(steps):
        model(local_batch(step, rank, dist.get_world_size())).backward()
        skip = ()
        if step == nan_step:
            local = target.grad.to_local()
            if rank == nan_rank:
                assert local.numel() > 0, f"rank {rank} holds no rows of {name}"
                local.view(-1)[local.numel() // 2] = float("nan")
            if mode == "raise":
                t0 = time.time()
                try:
                    opt.step()
                    error = None
                except FloatingPointError as e:
                    error = str(e)
                return dict(error=error, at=time.time(), waited=time.time() - t0)
            skip = (target,)
            # clones: a DTensor on a shard dimension of size 1 gives its local tensor itself
            before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
            state_before = {k: _full(v).clone() for k, v in opt.state[target].items()}
        oracle.step(skip)
        if skip:
            unchanged = sorted(n for n, p in model.named_parameters()
                               if torch.equal(p.full_tensor(), before[n]))
            state_kept = all(torch.equal(_full(v), state_before[k])
                             for k, v in opt.state[target].items())
        counts.append(opt.nonfinite_count)
        opt.zero_grad(set_to_none=True)
    worst, flips, numel = oracle.result
    return dict(counts=counts, unchanged=unchanged, state_kept=state_kept, rel=worst,
                flips=flips, numel=numel)


def nan_cases(rank, world, mesh_shape, specs):
    """nan_in_one_shard for each (label, recipe, name, nan_rank, mode), in one process group."""
    return {label: nan_in_one_shard(rank, world, mesh_shape, recipe, 6, 2, nan_rank, name, mode)
            for label, recipe, name, nan_rank, mode in specs}
