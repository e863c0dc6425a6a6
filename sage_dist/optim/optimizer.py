"""RoutedOptimizer: one torch.optim.Optimizer whose param groups name their rules."""
from __future__ import annotations

import zlib

import torch

from .. import ops
from ..shard.fragment import global_shape
from ..shard.layout import group_rule, make_layout
from .base import NONFINITE_MODES
from .batch import UpdateBatch
from .groups import check_group
from .registry import get_rule


class RoutedOptimizer(torch.optim.Optimizer):
    """Runs each param group's rule on fragments of its parameters.

    Every group carries 'rule' and that rule's hyperparameters (missing ones take the rule's
    defaults), so LR schedulers and per-group overrides work as with any torch optimizer.
    Optional group key 'param_names' names the parameters in errors and tables. A mixed group
    has 'rules' instead, one rule name per parameter, and the hyperparameters of all of them
    (each rule reads its own): recipes.merge_groups builds such groups for DeepSpeed ZeRO,
    which partitions each group's parameters on their own.

    nonfinite: 'skip' leaves a parameter whose gradient holds NaN/Inf (and its state)
    untouched for the step and counts it in `nonfinite_count`; 'raise' raises
    FloatingPointError before anything changes.

    Precision (both off by default): the math is always fp32. `state_dtype=torch.bfloat16`
    stores the elementwise state (momenta) in bf16, half the bytes; each step upcasts it,
    updates, and writes it back rounded. `stochastic_rounding=True` rounds every bf16 write
    (bf16 parameters, bf16 state) stochastically instead of to nearest, so updates smaller
    than half a bf16 step survive on average. Its random bits depend only on
    (`rounding_seed`, step, parameter name, flat index), not on the sharding, so sharded runs
    still match one process exactly.

    Layout (`sage_dist.shard`): how this rank holds the parameters. By default it is read from
    the parameters (plain tensors: local; DTensors: FSDP2/HSDP). An engine that re-partitions
    them after the optimizer exists (DeepSpeed ZeRO) passes `layout=shard.PendingLayout()` and
    later `use_layout(...)` its own; state is then created for the partitions only.
    """

    def __init__(self, params, defaults: dict | None = None, *, nonfinite: str = "skip",
                 layout=None, state_dtype=torch.float32, stochastic_rounding: bool = False,
                 rounding_seed: int = 0):
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite={nonfinite!r} is invalid: allowed are "
                             f"{', '.join(map(repr, NONFINITE_MODES))}")
        self.state_dtype = parse_state_dtype(state_dtype)
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"stochastic_rounding={stochastic_rounding!r} is invalid: allowed "
                             f"is True or False")
        if not isinstance(rounding_seed, int) or isinstance(rounding_seed, bool) \
                or not 0 <= rounding_seed < 2 ** 63:
            raise ValueError(f"rounding_seed={rounding_seed!r} is invalid: allowed is an "
                             f"integer in [0, 2**63)")
        self.stochastic_rounding = stochastic_rounding
        self.rounding_seed = rounding_seed
        self.nonfinite = nonfinite
        self.nonfinite_count = 0
        super().__init__(params, dict(defaults or {}))
        self.layout = layout if layout is not None else make_layout(self.named_parameters())
        self.layout.attach(self)
        self._init_state()

    # -- groups and state ---------------------------------------------------------------
    def add_param_group(self, group: dict) -> None:
        where = f"param_groups[{len(self.param_groups)}]."
        rules = check_group(group, self.defaults, where)
        seen = {id(q): k for k, g in enumerate(self.param_groups) for q in g["params"]}
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                raise ValueError(f"{where}params[{i}] ({self._name(group, i)}) is already in "
                                 f"param_groups[{seen[id(p)]}]: allowed is each parameter in "
                                 f"one group only")
        super().add_param_group(group)
        if "rules" in group:
            group.pop("rule", None)   # torch's add_param_group fills in defaults' 'rule'
        for i, p in enumerate(group["params"]):
            rule = rules[group_rule(group, i)]
            if rule.matrix_only and len(global_shape(p)) < 2:
                raise ValueError(f"{where}params[{i}] ({self._name(group, i)}) has shape "
                                 f"{tuple(global_shape(p))}: rule {rule.name!r} needs a >=2-D "
                                 f"parameter")
            if not p.is_contiguous():
                raise ValueError(f"{self._name(group, i)} is not contiguous: "
                                 f"the optimizer updates parameters through flat views")
        if hasattr(self, "layout"):
            self._init_state()

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) in the optimizer's global order."""
        return [(self._name(g, i), p) for g in self.param_groups
                for i, p in enumerate(g["params"])]

    @staticmethod
    def _name(group: dict, i: int) -> str:
        names = group.get("param_names")
        return names[i] if names else f"{group.get('name', 'group')}.params[{i}]"

    def _init_state(self) -> None:
        """Create every rule's state now, so state_dict keys exist before the first step."""
        entries = self.state_entries()
        for entry, rule in entries:
            if not self.state.get(entry):
                self.state[entry] = self.layout.new_state(entry, rule, self.state_dtype)
        self._built_for = [entry for entry, _ in entries]  # what _follow_params compares

    def use_layout(self, layout) -> None:
        """Switch to an engine's own view of the parameters (e.g. DeepSpeed's partitions once
        deepspeed.initialize has wrapped this optimizer); state is created anew for the new
        layout's entries. Call it before the first step."""
        self.layout = layout
        layout.attach(self)
        self.state.clear()
        self._init_state()

    def _follow_params(self) -> None:
        """Follow a one-to-one swap of the tensors in param_groups after the state was built,
        as Accelerate's FSDP2 preparation does (fsdp2_switch_optimizer_parameters puts the
        sharded DTensors in 'params' only; accelerate#3855). Before any step the layout and the
        (still zero) state are rebuilt for the new tensors; after steps, whole state is cut to
        the new tensors' local shards, which is exact. Anything else is refused."""
        if self.layout.name not in ("local", "dtensor"):
            return  # engine layouts keep their own entries (DeepSpeed narrows param_groups)
        now, old = [p for g in self.param_groups for p in g["params"]], self._built_for
        if len(now) == len(old) and all(a is b for a, b in zip(now, old)):
            return
        named = self.named_parameters()
        bad = next((i for i, (a, b) in enumerate(zip(old, now))
                    if global_shape(a) != global_shape(b)), None)
        if len(now) != len(old) or bad is not None:
            where = (f"{named[bad][0]} was {tuple(global_shape(old[bad]))}, is now "
                     f"{tuple(global_shape(now[bad]))}") if bad is not None else \
                f"{len(old)} tensors became {len(now)}"
            raise RuntimeError(
                f"the tensors in param_groups were replaced by others ({where}): the optimizer "
                f"follows only a one-to-one swap to tensors of the same global shapes (FSDP2). "
                f"For DeepSpeed ZeRO's flat partitions call sage_dist.deepspeed.register() "
                f"before deepspeed.initialize (or use sage_dist.deepspeed.initialize)")
        if not any(g.get("round_step", 0) for g in self.param_groups):
            self.use_layout(make_layout(named))
            return
        if self.layout.name != "local":
            raise RuntimeError(f"{named[0][0]}: the optimizer's parameters were swapped after "
                               f"it stepped on sharded ones; its state cannot be re-cut exactly "
                               f"(swap before the first step)")
        old_layout, layout, state = self.layout, make_layout(named), {}
        rules = [get_rule(group_rule(g, i)) for g in self.param_groups
                 for i in range(len(g["params"]))]
        for (name, p), o, rule in zip(named, old, rules):
            span = layout.fragments(p, name)[0].span
            elem = old_layout.elementwise_keys(o, rule)
            state[p] = {k: v for k, v in self.state[o].items()}
            for k in elem & set(state[p]):
                t = layout.new_elementwise(p, state[p][k].dtype)
                layout.local_flat(t).copy_(span.take(state[p][k]))
                state[p][k] = t
        self.layout = layout
        layout.attach(self)
        self.state.clear()
        self.state.update(state)
        self._built_for = now

    def state_dict(self) -> dict:
        self._follow_params()
        return super().state_dict()

    def state_entries(self):
        """(entry, [rule per member]) for every entry that holds state, as the layout lists
        them."""
        return [(e, [get_rule(r) for r in self.layout.member_rules(e, g)])
                for e, g in self.layout.entries(self.param_groups)]

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state keeps its saved dtype (fp32).

        torch casts floating state to the parameter's dtype, which would round the fp32
        momentum of a bf16 parameter; here each state tensor is only moved to its device.
        """
        self._follow_params()
        super().load_state_dict(state_dict)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if torch.is_tensor(value) and key != "step" and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, copy=True)

    # -- the step -----------------------------------------------------------------------
    def _jobs(self):
        """(fragment, rule, group, entry, [rule per member]) for every fragment with a
        gradient, in global order."""
        jobs = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                rules = [get_rule(r) for r in self.layout.member_rules(p, group, i)]
                for f in self.layout.fragments(p, self._name(group, i)):
                    if f.grad is None:
                        continue
                    if f.grad.is_sparse:
                        raise RuntimeError(f"{f.name}: sparse gradients are not supported; "
                                           f"use a dense embedding (sparse=False)")
                    jobs.append((f, rules[f.slot], group, p, rules))
        return jobs

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._follow_params()
        self.layout.reducer.reset_counters()
        runs, batch = [], UpdateBatch()
        for f, rule, group, entry, rules in self._jobs():
            g = f.grad.float()
            p = f.data if f.data.dtype == torch.float32 else f.data.float()
            st = self.layout.member_state(entry, f.slot, self.state[entry], rules)
            # Low-precision state: the rule works on fp32 copies, written back when it ends.
            low = {k: v for k, v in st.items() if v.dtype != torch.float32 and v.dim() > 0}
            if low:
                st = {**st, **{k: v.float() for k, v in low.items()}}
            runs.append([f, p, rule.run(f, p, g, st, group, batch), g, st, low, group])
        self._run_phases(runs, batch)
        for group in self.param_groups:  # (a checkpoint from before this key lacks it)
            group["round_step"] = group.get("round_step", 0) + 1
        return loss

    def _write_back(self, run) -> None:
        """Store a finished fragment's fp32 results into its low-precision storage."""
        f, p, _, _, st, low, group = run
        if p is not f.data:
            self._store(f.data, p, f, "param", group)
        for key, dst in low.items():
            self._store(dst, st[key], f, key, group)

    def _store(self, dst, src, f, what: str, group) -> None:
        if not (self.stochastic_rounding and dst.dtype == torch.bfloat16):
            dst.copy_(src)
            return
        # A seed per (run seed, step, parameter, tensor); the flat index does the rest.
        # Generated names ("group.params[0]") repeat across groups: add the group's index.
        name = f.name
        if not group.get("param_names") and name.startswith(f"{group.get('name', 'group')}."):
            name = f"{next(k for k, g in enumerate(self.param_groups) if g is group)}:{name}"
        key = zlib.crc32(f"{name}/{what}".encode())
        seed = hash_seed(self.rounding_seed, group.get("round_step", 0), key)
        if not f.span.is_block:
            ops.round_bf16_(dst, src, seed, f.span.start)
            return
        # A block (TP cuts columns) is a run of global flat indices per row: the same bits.
        d, s = dst.view(-1), src.reshape(-1)
        for off, start, n in f.span.row_starts():
            ops.round_bf16_(d[off:off + n], s[off:off + n], seed, start)

    # -- accounting -----------------------------------------------------------------------
    def comm_stats(self) -> dict:
        """Floats all-reduced and collectives issued by the last step() on this rank."""
        r = self.layout.reducer
        return {"floats": r.floats, "collectives": r.collectives}

    def state_bytes(self, by_rule: bool = False) -> dict:
        """This rank's exact bytes of optimizer state.

        'elementwise': state shaped like the parameter (this rank's slice only);
        'replicated': state every rank holds in full (SAGE's per-column S, step counts).
        With by_rule=True also 'by_rule' ({rule: {'elementwise', 'replicated'}}, rules holding
        nothing here left out) and 'by_device' ({device type: bytes}).
        """
        self._follow_params()
        out = {"elementwise": 0, "replicated": 0}
        rules_out: dict = {}
        devices: dict = {}
        for p, rules in self.state_entries():
            elementwise = self.layout.elementwise_keys(p, rules)
            owners = self.layout.state_owners(p, rules)
            for key, t in self.state[p].items():
                kind = "elementwise" if key in elementwise else "replicated"
                local = self.layout.local_flat(t) if kind == "elementwise" else t
                n = local.numel() * local.element_size()
                out[kind] += n
                split = {rules[0].name: local.numel()} if owners is None else owners[key]
                for name, floats in split.items():
                    r = rules_out.setdefault(name, {"elementwise": 0, "replicated": 0})
                    r[kind] += floats * local.element_size()
                devices[local.device.type] = devices.get(local.device.type, 0) + n
        out["total"] = out["elementwise"] + out["replicated"]
        if by_rule:
            out["by_rule"] = {k: v for k, v in sorted(rules_out.items())
                              if v["elementwise"] or v["replicated"]}
            out["by_device"] = dict(sorted(devices.items()))
        return out

    def _run_phases(self, runs, batch) -> None:
        """Drive every rule's generator phase by phase. Element-wise updates the rules issue
        in a phase are collected by `batch` and run as multi-tensor calls at its end, before
        the finished fragments are written back to their storage."""
        reducer = self.layout.reducer
        # Phase 0 carries one finiteness flag per parameter beside the rules' first statistics:
        # the rule's own ("nonfinite", flag) when its first pass over g checked it, else one
        # aminmax pass here. What the rules queued in phase 0 (whole matrices, optim/batch.py;
        # in skip mode with their updates) runs before the flags are read.
        # Only where a parameter's fate is its own gradient's: not when replicas (HSDP) must
        # agree on the flags first, since a replica may see a NaN that this one does not.
        batch.fuse_whole_updates = self.nonfinite == "skip" and self.layout.reducer.replicas is None
        requests = []
        for f, p, gen, g, *_ in runs:
            req = next(gen)
            if req and req[0][0] == "nonfinite":
                requests.append([("scalar", req[0][1])] + req[1:])
            else:
                requests.append([("scalar", _nonfinite_flag(g))] + req)
        batch.flush()
        first = True
        while runs:
            answers = self._reduce(runs, requests, reducer)
            if first:
                answers = self._drop_nonfinite(runs, answers)
                first = False
            next_runs, requests, finished = [], [], []
            for run, ans in zip(runs, answers):
                try:
                    requests.append(run[2].send(ans))
                    next_runs.append(run)
                except StopIteration:
                    finished.append(run)
            batch.flush()
            for run in finished:
                self._write_back(run)
            runs = next_runs

    def _drop_nonfinite(self, runs, answers):
        # All the flags at once: one device-to-host read per device, so one synchronisation
        # per step on a GPU rather than one per parameter (tests/test_gpu_ready.py counts).
        # Replicas (HSDP) first agree on them: every rank then skips the same parameters.
        flags = _read_flags(self.layout.reducer.agree([ans[0] for ans in answers]))
        bad = [i for i, flag in enumerate(flags) if flag > 0]
        if bad and self.nonfinite == "raise":
            names = ", ".join(runs[i][0].name for i in bad)
            raise FloatingPointError(f"non-finite gradient in {names}; nothing was updated "
                                     f"(pass nonfinite='skip' to skip such parameters instead)")
        self.nonfinite_count += len(bad)
        for i in reversed(bad):
            runs[i][2].close()
            del runs[i]
            del answers[i]
        return [ans[1:] for ans in answers]

    @staticmethod
    def _reduce(runs, requests, reducer):
        """Complete every statistic of one phase with at most one collective."""
        send = [t if f.contributes else torch.zeros_like(t)
                for (f, *_), req in zip(runs, requests) for kind, t in req
                if not f.is_local(kind)]
        summed = iter(reducer.all_reduce(send))
        return [[t if f.is_local(kind) else next(summed) for kind, t in req]
                for (f, *_), req in zip(runs, requests)]


def _nonfinite_flag(g: torch.Tensor) -> torch.Tensor:
    """[1.0] if g holds a NaN or an Inf, else [0.0], in one pass: min and max propagate NaN,
    and an Inf is itself the min or the max (no full-size boolean temporaries)."""
    if g.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=g.device)
    lo, hi = torch.aminmax(g)
    return (~torch.isfinite(torch.stack([lo, hi]))).any().float().reshape(1)


def _read_flags(flags: list[torch.Tensor]) -> list[float]:
    """The values of one-element flag tensors, read with ONE copy to the host per device (so
    a step synchronises with a GPU once, not once per parameter); in the order given."""
    out = [0.0] * len(flags)
    by_device: dict = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([flags[i].reshape(()) for i in idx]).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_state_dtype(value) -> torch.dtype:
    """torch.float32 / torch.bfloat16, or their names (as config files give them)."""
    if isinstance(value, str) and value in STATE_DTYPES:
        return STATE_DTYPES[value]
    if value in STATE_DTYPES.values():
        return value
    raise ValueError(f"state_dtype={value!r} is invalid: allowed are 'float32', 'bfloat16' "
                     f"(or torch.float32, torch.bfloat16)")


def hash_seed(*words: int) -> int:
    """Mix integers into one 63-bit seed (SplitMix64 steps, as the kernels' random_bits)."""
    z = 0
    for w in words:
        z = (z ^ (w & (2 ** 64 - 1))) + 0x9E3779B97F4A7C15 & (2 ** 64 - 1)
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & (2 ** 64 - 1)
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & (2 ** 64 - 1)
        z ^= z >> 31
    return z >> 1
