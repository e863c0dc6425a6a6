"""Workers for the Hugging Face Trainer / Accelerate tests (run inside spawned gloo processes).

Each case builds a Trainer for one engine — DDP, ZeRO-2 with a JSON naming our recipe (after
sage_dist.deepspeed.register()), ZeRO-3 with the factory and a JSON without an optimizer
section, FSDP2 through Accelerate — and checks every optimizer step against the oracle
through the optimizer's step hooks (full parameters and averaged, clipped gradients gathered
before the step; the result gathered after). Accelerate keeps process-wide state (a Borg
AcceleratorState, environment flags, the HF DeepSpeed config); `reset()` clears it between
cases so one process group runs them all.
"""
from __future__ import annotations

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist

import sage_dist.deepspeed as sdds
import sage_dist.hf as sdhf
from sage_dist.shard import zero
from sage_dist.optim import reference
from sage_dist.testing import compare
from conftest import tiny_llama
from ds_cases import Checker as ZeroChecker

SEQ, PER_RANK, SAMPLES = 16, 2, 48
SIGN_RULES = {"sage", "lion"}
MODES = ("ddp", "zero2-json", "zero3-factory", "fsdp2")
# Hyperparameters each recipe takes from the Trainer's "auto" values in a DeepSpeed JSON.
AUTO = {"sage-hybrid": ("lr", "betas", "eps", "weight_decay"),
        "sinkgd-hybrid": ("lr", "betas", "eps", "weight_decay"),
        "scale": ("lr", "weight_decay")}
LR = {"sage-hybrid": 2e-3, "scale": 1e-3, "sinkgd-hybrid": 2e-2}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab=1001, n=SAMPLES, seed=123):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def reset() -> None:
    """Forget the previous case's Accelerate / DeepSpeed-integration state (not the group)."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        os.environ.pop(key, None)


def ds_json(stage: int, recipe: str | None, **zero) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto",
           "zero_optimization": {"stage": stage, **zero}, "bf16": {"enabled": "auto"},
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if recipe is not None:
        cfg["optimizer"] = {"type": recipe, "params": dict.fromkeys(AUTO[recipe], "auto")}
    return cfg


def trainer_for(mode, recipe, out, steps, *, save_steps=None, resume=None, model_seed=0,
                ds_extra=None, factory_options=None, fsdp_state_dict="SHARDED_STATE_DICT",
                json_type=None, json_params=None, ds_top=None, **arg_overrides):
    """A Trainer for one engine; `mode` as in MODES."""
    from transformers import Trainer, TrainingArguments

    reset()
    sdhf.accelerate_on_cpu()
    kw = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=PER_RANK,
              learning_rate=LR[recipe], weight_decay=0.01, max_grad_norm=0.5,
              lr_scheduler_type="linear", warmup_steps=0, seed=0, report_to="none",
              disable_tqdm=True, logging_strategy="steps", logging_steps=1,
              save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
              dataloader_num_workers=0, save_only_model=False)
    factory = None
    # On CPU, Accelerate runs DDP (MULTI_CPU) only with use_cpu=True, and DeepSpeed only without.
    kw["use_cpu"] = mode in ("ddp", "fsdp2")
    if mode == "ddp":
        factory = sdhf.optimizer(recipe, lr=LR[recipe], weight_decay=0.01, **(factory_options or {}))
    elif mode == "zero2-json":
        sdds.register()
        kw["deepspeed"] = ds_json(2, recipe, **(ds_extra or {}))
        kw["deepspeed"]["optimizer"]["type"] = json_type or recipe
        kw["deepspeed"]["optimizer"]["params"].update(json_params or {})
    elif mode == "zero3-factory":
        kw["deepspeed"] = ds_json(3, None, **(ds_extra or {}))
        factory = sdhf.optimizer(recipe, lr=LR[recipe], weight_decay=0.01, **(factory_options or {}))
    elif mode == "fsdp2":
        kw.update(fsdp=True, fsdp_config={
            "version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "state_dict_type": fsdp_state_dict})
        factory = sdhf.optimizer(recipe, lr=LR[recipe], weight_decay=0.01, **(factory_options or {}))
    else:
        raise ValueError(mode)
    if "deepspeed" in kw:
        kw["deepspeed"].update(ds_top or {})
    kw.update(arg_overrides)
    args = TrainingArguments(**kw)
    model = tiny_llama(seed=model_seed)
    return Trainer(model=model, args=args, train_dataset=Tokens(),
                   optimizer_cls_and_kwargs=factory)


def _full(t):
    if t is None:
        return None
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


class FullChecker:
    """The oracle beside an optimizer whose entries are parameters (DDP, FSDP2)."""

    def __init__(self, opt):
        self.opt, self.ref_state, self.pending = opt, {}, []
        self.worst, self.flips, self.numel, self.calls = 0.0, 0, 0, 0
        opt.register_step_pre_hook(self.pre)
        opt.register_step_post_hook(self.post)

    def pre(self, opt, args, kwargs):
        self.pending = []
        for g in opt.param_groups:
            for name, p in zip(g["param_names"], g["params"]):
                if p.grad is None:
                    continue
                full = _full(p).float()
                st = self.ref_state.setdefault(name, reference.init_state(g["rule"], full))
                reference.step(g["rule"], full, _full(p.grad), st, g)
                self.pending.append((g, p, full))

    def post(self, opt, args, kwargs):
        self.calls += 1
        for g, p, expected in self.pending:
            d = compare(_full(p), expected, 1e-6, 2 * g["lr"] if g["rule"] in SIGN_RULES else None)
            self.worst = max(self.worst, d.rel)
            self.flips += d.flips
            self.numel += d.numel


def attach_checker(trainer):
    """Hook the oracle onto the Trainer's optimizer once it exists (at on_train_begin)."""
    from transformers import TrainerCallback

    holder = {}

    class Hook(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            opt = sdhf.routed_optimizer(trainer)
            holder["opt"] = opt
            holder["chk"] = ZeroChecker(opt) if opt.layout.name == "zero" else FullChecker(opt)

    trainer.add_callback(Hook())
    return holder


def _report(trainer, holder):
    chk, opt = holder["chk"], holder["opt"]
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return dict(rel=chk.worst, flips=chk.flips, numel=chk.numel, calls=chk.calls,
                layout=opt.layout.name, groups=len(opt.param_groups),
                steps=trainer.state.global_step,
                grad_norms=[float(n) for n in norms], state=opt.state_bytes()["total"])


def exactness(rank, world, modes, recipes, steps, out, variants=()):
    """Per step, each (mode, recipe), then each (label, mode, recipe, trainer_for options)
    variant: the Trainer's optimizer step vs the oracle."""
    cases = [((m, r), m, r, {}) for m in modes for r in recipes] + list(variants)
    res = {}
    for key, mode, recipe, options in cases:
        trainer = trainer_for(mode, recipe, os.path.join(out, str(len(res))), steps, **options)
        holder = attach_checker(trainer)
        trainer.train()
        res[key] = _report(trainer, holder)
        del trainer, holder
    reset()
    return res


def _StepCounter(ran):
    from transformers import TrainerCallback

    class Counter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ran.append(state.global_step)
    return Counter()


# -- checkpoints ----------------------------------------------------------------------------
def full_params(trainer):
    """Every parameter, whole and on CPU, in name order (the same on every rank)."""
    model = trainer.model_wrapped
    if zero.is_engine(model):
        import deepspeed
        params = sorted(model.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    model = getattr(model, "module", model)
    return {n: _full(p) for n, p in sorted(model.named_parameters())}


def optimizer_state(trainer):
    """This rank's optimizer state as flat tensors, by position (bitwise comparable)."""
    opt = sdhf.routed_optimizer(trainer)
    out = []
    for entry, _ in opt.state_entries():
        for k, v in sorted(opt.state[entry].items()):
            out.append((k, (v.to_local() if hasattr(v, "to_local") else v).detach().clone()))
    return out


def resume(rank, world, mode, recipe, out, total=10, at=5, **options):
    """Train `total` steps saving at `at`; then a fresh Trainer resumes from that checkpoint and
    trains to `total`. Returns whether the two end bit-identical (params and our state)."""
    straight = trainer_for(mode, recipe, out, total, save_steps=at, **options)
    straight.train()
    want, want_state = full_params(straight), optimizer_state(straight)
    del straight
    ckpt = os.path.join(out, f"checkpoint-{at}")
    resumed = trainer_for(mode, recipe, out + "-resumed", total, model_seed=1, **options)
    ran = []
    resumed.add_callback(_StepCounter(ran))
    resumed.train(resume_from_checkpoint=ckpt)
    got, got_state = full_params(resumed), optimizer_state(resumed)
    reset()
    params_equal = all(torch.equal(got[n], want[n]) for n in want)
    state_equal = len(got_state) == len(want_state) and all(
        k1 == k2 and torch.equal(a, b) for (k1, a), (k2, b) in zip(got_state, want_state))
    worst = max(compare(got[n], want[n], 0).rel for n in want)
    return dict(params_equal=params_equal, state_equal=state_equal, worst=worst, ran=len(ran),
                state_keys=len(want_state), layout=sdhf.routed_optimizer(resumed).layout.name)


# -- plain deepspeed.initialize after register() ---------------------------------------------
def plain_deepspeed(rank, world, stages, recipes, steps):
    """deepspeed.initialize itself (patched by register()), with a JSON naming our recipe and
    with a client sage_dist optimizer and no optimizer section, against the oracle per step,
    and bit for bit against sage_dist.deepspeed.initialize on the same config."""
    import deepspeed

    import sage_dist
    from ds_cases import ZeroProbeLlama, _full_params, _run, ds_config, straddles_mid_row

    sdds.register()
    out = {}
    for stage in stages:
        for recipe in recipes:
            finals = {}
            for how in ("sage_dist.deepspeed.initialize", "deepspeed.initialize+json",
                        "deepspeed.initialize+client"):
                model, cfg = ZeroProbeLlama(0), ds_config(stage, recipe)
                if how == "sage_dist.deepspeed.initialize":
                    engine, *_ = sdds.initialize(model=model, config=cfg)
                elif how == "deepspeed.initialize+json":
                    engine, *_ = deepspeed.initialize(model=model, config=cfg)
                else:
                    cfg.pop("optimizer")
                    # the grouping sage_dist.deepspeed chooses for a JSON naming the recipe:
                    # another grouping is as exact but cuts the statistics' sums elsewhere
                    merge = sdds.merge_groups_for(model, cfg, recipe, {})
                    opt = sage_dist.build_optimizer(model, recipe, merge=merge)
                    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
                basic = zero.client_optimizer(engine)
                chk = ZeroChecker(basic)
                _run(engine, rank, world, 0, steps)
                finals[how] = _full_params(engine, stage)
                out[(stage, recipe, how)] = dict(
                    rel=chk.worst, flips=chk.flips, numel=chk.numel, calls=chk.calls,
                    layout=basic.layout.name, straddle=straddles_mid_row(basic),
                    groups=len(basic.param_groups))
            base = finals["sage_dist.deepspeed.initialize"]
            for how, params in finals.items():
                out[(stage, recipe, how)]["bitwise_as_sage_dist"] = all(
                    torch.equal(a, b) for a, b in zip(params, base))
    sdds.unregister()
    return out


# -- accelerate#3855: state built at construction, then Accelerate's FSDP2 parameter swap -------
def fsdp2_swap(rank, world, recipe, steps_before):
    """Build the optimizer on the plain model (its state exists now), take `steps_before`
    steps on the whole batch (the same on every rank), then let Accelerate's FSDP2 preparation
    swap the parameters. After the swap: state_dict() is complete and the same on every rank,
    the state is keyed by the sharded DTensors, and each further step equals the oracle (seeded
    with the state from before the swap)."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.tensor import DTensor

    import sage_dist

    reset()
    sdhf.accelerate_on_cpu()
    model = tiny_llama(seed=0)
    opt = sage_dist.build_optimizer(model, recipe)
    data = Tokens().x
    for step in range(steps_before):
        x = data[4 * step:4 * step + 4]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in opt.named_parameters()}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            transformer_cls_names_to_wrap="LlamaDecoderLayer")
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    model, wrapped = accelerator.prepare(model, opt)
    inner = sdhf.routed_optimizer(wrapped)
    swapped = all(isinstance(p, DTensor) for g in inner.param_groups for p in g["params"])
    sd = wrapped.state_dict()                       # accelerate#3855: KeyError here before
    shape = {i: {k: (tuple(v.shape), type(v).__name__) for k, v in st.items()}
             for i, st in sd["state"].items()}
    shapes = [None] * world
    dist.all_gather_object(shapes, shape)
    n_params = sum(len(g["params"]) for g in inner.param_groups)
    keyed = all(isinstance(k, DTensor) for k in inner.state) and len(inner.state) == n_params
    chk = FullChecker(inner)
    chk.ref_state = {n: {k: (int(v.item()) if k == "step" else v.clone()) for k, v in st.items()}
                     for n, st in before.items()}
    for step in range(steps_before, steps_before + 3):
        x = data[4 * step + 2 * rank:4 * step + 2 * rank + 2]
        accelerator.backward(model(input_ids=x, labels=x).loss)
        wrapped.step()
        wrapped.zero_grad()
    reset()
    return dict(swapped=swapped, keyed=keyed, complete=len(sd["state"]) == n_params,
                same_on_ranks=all(s == shapes[0] for s in shapes), rel=chk.worst,
                flips=chk.flips, numel=chk.numel, calls=chk.calls, layout=inner.layout.name,
                elementwise_dtensor=any(type(v).__name__ == "DTensor"
                                        for st in inner.state.values() for v in st.values()))


# -- refusals inside the Trainer ------------------------------------------------------------
def trainer_refusals(rank, world, out):
    """What the Trainer paths refuse before training, with each message."""
    cases = {
        # a factory under ZeRO optimizer offload while zero_force_ds_cpu_optimizer is true
        "offload+forced-cpu-adam": dict(mode="zero3-factory", ds_extra={
            "offload_optimizer": {"device": "cpu"}}),
        # a JSON naming no known optimizer, after register()
        "unknown-recipe": dict(mode="zero2-json", json_type="sgae-hybrid"),
        # the Trainer's own check: a JSON value that disagrees with TrainingArguments
        "json-lr-mismatch": dict(mode="zero2-json", json_params={"lr": 0.5}),
    }
    res = {}
    for label, spec in cases.items():
        spec = dict(spec)
        trainer = None
        try:
            trainer = trainer_for(spec.pop("mode"), "sage-hybrid", os.path.join(out, label), 2,
                                  json_type=spec.pop("json_type", None),
                                  json_params=spec.pop("json_params", None), **spec)
            trainer.train()
            res[label] = "no error"
        except (ValueError, RuntimeError) as e:
            res[label] = f"{type(e).__name__}: {e}"
        del trainer
    reset()
    return res


# -- everything that runs on two ranks, in one process group ---------------------------------
def world2(rank, world, out, parts):
    """Run each part (name, function, args) here; a part that raises is reported as its
    error, so the others still report."""
    import time
    import traceback

    res = {}
    for name, fn, args in parts:
        t0 = time.perf_counter()
        try:
            res[name] = {"ok": globals()[fn](rank, world, *args)}
        except Exception as e:  # noqa: BLE001  (reported to the test, which fails on it)
            res[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
            reset()
        res[name]["seconds"] = time.perf_counter() - t0
    return res


def resumes(rank, world, specs, out):
    return {label: resume(rank, world, mode, recipe, os.path.join(out, label), **options)
            for label, mode, recipe, options in specs}


def swaps(rank, world, specs):
    return {(recipe, n): fsdp2_swap(rank, world, recipe, n) for recipe, n in specs}
