"""Workers for the DeepSpeed ZeRO tests (run inside spawned gloo processes)."""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist

import sage_dist
import sage_dist.deepspeed as sdds
from sage_dist.optim import reference
from sage_dist.testing import compare
from fsdp_cases import ProbeLlama, VOCAB, SEQ

SIGN_RULES = {"sage", "lion"}


def ds_config(stage, recipe, micro=2, **extra):
    zero = {"stage": stage, **extra.pop("zero", {})}
    params = extra.pop("params", {})
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
           "zero_optimization": zero, "optimizer": {"type": recipe, "params": params},
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    cfg.update(extra)
    return cfg


def micro_batch(step, micro, rank, world, per_rank=2):
    g = torch.Generator().manual_seed(9000 + 97 * step + micro)
    x = torch.randint(0, VOCAB, (per_rank * world, SEQ), generator=g)
    return x[rank * per_rank:(rank + 1) * per_rank]


class Checker:
    """Per-step oracle check through the optimizer's step hooks: before each step() call,
    gather the full parameters and the full (averaged, clipped) gradients of the members in
    the call, step the oracle from them; after, compare the gathered result."""

    def __init__(self, opt, seed_state=False):
        self.opt, self.ref_state, self.pending = opt, {}, []
        if seed_state:
            self._seed()
        self.worst, self.flips, self.numel, self.calls = 0.0, 0, 0, 0
        self.most_collectives = 0  # all-reduces of the step() call that issued the most
        opt.register_step_pre_hook(self.pre)
        opt.register_step_post_hook(self.post)

    def _seed(self):
        """Start the oracle from the optimizer's current (e.g. just loaded) state."""
        from sage_dist.optim.registry import get_rule
        opt, layout = self.opt, self.opt.layout
        for e in layout.entries_by_id.values():
            g = opt.param_groups[e.group_index]
            rule = [get_rule(r) for r in layout.member_rules(e.flat, g)]
            st = opt.state[e.flat]
            elem = {k: layout.gather(e.flat, v, k, rule) for k, v in st.items()
                    if k in layout.elementwise_keys(e.flat, rule)}
            for i, m in enumerate(e.members):
                views = layout.member_state(e.flat, i, st, rule)
                self.ref_state[m.name] = {
                    k: (elem[k][i].clone() if k in elem else
                        int(v.item()) if k == "step" else v.clone()) for k, v in views.items()}

    def _flats(self):
        for g in self.opt.param_groups:
            for flat in g["params"]:
                yield g, flat

    def pre(self, opt, args, kwargs):
        self.pending = []
        for g, flat in self._flats():
            entry = opt.layout.entry(flat)
            params = opt.layout.gather(flat, flat.data)
            grads = opt.layout.gather(flat, flat.grad)
            rules = opt.layout.member_rules(flat, g)
            for m, p, gr, rule in zip(entry.members, params, grads, rules):
                st = self.ref_state.setdefault(m.name, reference.init_state(rule, p))
                reference.step(rule, p, gr, st, g)
                self.pending.append((g, flat, m.name, p, rule))

    def post(self, opt, args, kwargs):
        self.calls += 1
        self.most_collectives = max(self.most_collectives, opt.comm_stats()["collectives"])
        done = {}
        for g, flat, name, expected, rule in self.pending:
            if id(flat) not in done:
                entry = opt.layout.entry(flat)
                done[id(flat)] = dict(zip([m.name for m in entry.members],
                                          opt.layout.gather(flat, flat.data)))
            got = done[id(flat)][name]
            d = compare(got, expected, 1e-6, 2 * g["lr"] if rule in SIGN_RULES else None)
            self.worst = max(self.worst, d.rel)
            self.flips += d.flips
            self.numel += d.numel


def straddles_mid_row(opt) -> bool:
    """Some 2-D weight's held range starts or ends in the middle of a row, on some rank."""
    local = any(len(m.shape) >= 2 and m.a < m.b and (m.a % m.shape[-1] or m.b % m.shape[-1])
                for e in opt.layout.entries_by_id.values() for m in e.members)
    t = torch.tensor([float(local)])
    dist.all_reduce(t)
    return t.item() > 0


class ZeroProbeLlama(ProbeLlama):
    """ProbeLlama plus a 3 x 7 weight. With the optimizer's merged groups (one flat for all
    the matrices) every other parameter is a multiple of 32 elements and the flats' halves
    and thirds would cut only between rows; 21 more elements move every cut mid-row at world
    2 and 3, with and without the 1-D parameters in the flat."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.odd = torch.nn.Parameter(torch.randn(3, 7) * 0.1)

    def forward(self, x):
        out = self.lm(x, labels=x, output_hidden_states=True)
        h = out.hidden_states[-1]
        return (out.loss + self.probe(h).pow(2).mean()
                + (h[..., :7] @ self.odd.T).pow(2).mean())


def exactness(rank, world, stage, recipes, steps, extra):
    out = {}
    for recipe in recipes:
        model = ZeroProbeLlama(0)
        cfg = ds_config(stage, recipe, **dict(extra))
        engine, opt, _, _ = sdds.initialize(model=model, config=cfg)
        basic = engine.basic_optimizer
        chk = Checker(basic)
        accum = cfg.get("gradient_accumulation_steps", 1)
        for step in range(steps):
            for micro in range(accum):
                loss = engine(micro_batch(step, micro, rank, world))
                engine.backward(loss)
                engine.step()
        out[recipe] = dict(rel=chk.worst, flips=chk.flips, numel=chk.numel, calls=chk.calls,
                           straddle=straddles_mid_row(basic), wrapper=type(opt).__name__,
                           comm=basic.comm_stats(), most_collectives=chk.most_collectives,
                           state=basic.state_bytes(),
                           groups=len(basic.param_groups))
    return out


def variants(rank, world, cases, steps):
    """exactness() for several (label, stage, recipe, extra config) cases in one process group."""
    out = {}
    for label, stage, recipe, extra in cases:
        out[label] = exactness(rank, world, stage, [recipe], steps, extra)[recipe]
    return out


def _run(engine, rank, world, start, stop, accum=1, per_rank=2):
    losses = []
    for step in range(start, stop):
        for micro in range(accum):
            loss = engine(micro_batch(step, micro, rank, world, per_rank))
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    return losses


def _full_params(engine, stage):
    import deepspeed
    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def single_bf16_losses(steps, world=2):
    """One process, the same bf16 model with an fp32 master copy, the same global batches."""
    model = ProbeLlama(0).to(torch.bfloat16)
    master = ProbeLlama(0)
    with torch.no_grad():  # DeepSpeed's fp32 master starts from the bf16-rounded weights
        for p, m in zip(model.parameters(), master.parameters()):
            m.copy_(p)
    opt = sage_dist.build_optimizer(master, "sage-hybrid")
    losses = []
    for step in range(steps):
        x = torch.cat([micro_batch(step, 0, r, world) for r in range(world)])
        loss = model(x)
        loss.backward()
        for p, m in zip(model.parameters(), master.parameters()):
            m.grad = p.grad.float()
            p.grad = None
        opt.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), master.parameters()):
                p.copy_(m)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in master.parameters()]


def resume(rank, world, stage, recipe, path, mode):
    """mode 'straight': 10 steps; 'save': 5 steps then engine.save_checkpoint (and our
    universal file); 'load': load_checkpoint then steps 5..10."""
    model = ProbeLlama(0 if mode != "load" else 1)
    engine, *_ = sdds.initialize(model=model, config=ds_config(stage, recipe))
    if mode == "straight":
        _run(engine, rank, world, 0, 10)
    elif mode == "save":
        _run(engine, rank, world, 0, 5)
        engine.save_checkpoint(path, tag="step5")
        sdds.save_universal(engine, path)
        return None
    else:
        engine.load_checkpoint(path, tag="step5")
        _run(engine, rank, world, 5, 10)
    return _full_params(engine, stage)


RESHARD_BATCH = 6  # global batch that divides by 2 and 3: the same data at both sizes


def reshard(rank, world, stage, recipe, path, mode):
    """'save': 5 steps at this world size, save_universal; 'load': load_universal here, check
    the loaded state, then steps 5..10 with the per-step oracle check, and an uninterrupted run
    at this world size for the drift figure."""
    per = RESHARD_BATCH // world
    cfg = lambda: ds_config(stage, recipe, micro=per)
    if mode == "save":
        engine, *_ = sdds.initialize(model=ProbeLlama(0), config=cfg())
        _run(engine, rank, world, 0, 5, per_rank=per)
        sdds.save_universal(engine, path)
        return _full_params(engine, stage)
    engine, *_ = sdds.initialize(model=ProbeLlama(1), config=cfg())
    sdds.load_universal(engine, path)
    loaded = _full_params(engine, stage)
    chk = Checker(engine.basic_optimizer, seed_state=True)
    _run(engine, rank, world, 5, 10, per_rank=per)
    resumed = _full_params(engine, stage)
    straight, *_ = sdds.initialize(model=ProbeLlama(0), config=cfg())
    _run(straight, rank, world, 0, 10, per_rank=per)
    drift = max(compare(a, b, 0).rel for a, b in zip(resumed, _full_params(straight, stage)))
    return dict(loaded=loaded, exact=(chk.worst, chk.flips, chk.numel), drift=drift)


def bf16_losses(rank, world, stage, extra, steps):
    cfg = ds_config(stage, "sage-hybrid", bf16={"enabled": True}, gradient_clipping=0.0,
                    **dict(extra))
    engine, opt, *_ = sdds.initialize(model=ProbeLlama(0), config=cfg)
    chk = Checker(engine.basic_optimizer)
    losses = _run(engine, rank, world, 0, steps)
    t = torch.tensor(losses)
    dist.all_reduce(t)
    return dict(losses=(t / world).tolist(), wrapper=type(opt).__name__,
                exact=(chk.worst, chk.flips, chk.numel), params=_full_params(engine, stage))


def bad_config(rank, world, case):
    cfg = ds_config(2, "sage-hybrid")
    model = ProbeLlama(0)
    if case == "unknown_type":
        cfg["optimizer"]["type"] = "sgae"
    elif case == "bad_hparam":
        cfg["optimizer"]["params"] = {"betas": [0.9, 1.5]}
    elif case == "pipeline":
        cfg["pipeline"] = {"stages": 2}
    elif case == "moe":
        model.lm.model.layers[0].mlp.up_proj.weight.allreduce = False
    sdds.initialize(model=model, config=cfg)
    return "no error"
