"""Hugging Face face of sage_dist: the `Trainer` and Accelerate (docs/INTEGRATIONS.md).

    from transformers import Trainer
    import sage_dist.hf

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=sage_dist.hf.optimizer("sage-hybrid", lr=2e-3))

The factory routes by the recipe (module types, global shapes, `overrides`), as
`sage_dist.build_optimizer` does, under every engine the Trainer drives:

* one process and DDP: the optimizer steps the parameters themselves;
* `--deepspeed ds.json` with no `optimizer` section: the optimizer is built with its state
  deferred, and `deepspeed.initialize` (patched by `sage_dist.deepspeed.register()`, which the
  factory calls) attaches it to ZeRO-1/2/3's flat partitions;
* a DeepSpeed JSON whose `optimizer.type` names one of our recipes: the Trainer ignores any
  factory and lets DeepSpeed build the optimizer; only `register()` is needed;
* FSDP2 through Accelerate (`fsdp_config={"version": 2}`): Accelerate swaps the parameters in
  the optimizer's param groups for sharded DTensors after the optimizer exists; the optimizer
  follows that swap (RoutedOptimizer._follow_params), so its state is keyed by the DTensors.

transformers and accelerate are imported only when used.
"""
from __future__ import annotations

import functools
import os

from .deepspeed import _check_offload, merge_groups_for, register, registered, unregister
from .optim.optimizer import RoutedOptimizer
from .optim.recipes import build_optimizer, get_recipe
from .shard import zero
from .shard.layout import PendingLayout

__all__ = ["optimizer", "OptimizerFactory", "routed_optimizer", "accelerate_on_cpu",
           "register", "unregister", "registered"]


def optimizer(recipe: str = "sage-hybrid", lr: float | None = None, **options) -> tuple:
    """`(factory, kwargs)` for `Trainer(optimizer_cls_and_kwargs=...)`.

    `options` are build_optimizer's: hyperparameters of the recipe's rules, `overrides`,
    `head`, `nonfinite`, `state_dtype`, ... . lr=None takes the recipe's default (the Trainer's
    `learning_rate` is not read: name it here). The recipe name is checked now; the rest when
    the Trainer builds the optimizer, before the first step. Also calls
    `sage_dist.deepspeed.register()`, so that a `--deepspeed` run attaches the optimizer to
    ZeRO's partitions.
    """
    get_recipe(recipe)
    register()
    return OptimizerFactory, dict(options, recipe=recipe, lr=lr)


class OptimizerFactory:
    """What the Trainer instantiates with no argument and calls as `factory(model, **kwargs)`
    (transformers' `is_optimizer_factory`: anything that is not a torch optimizer class)."""

    def __call__(self, model, recipe: str = "sage-hybrid", lr: float | None = None,
                 **options) -> RoutedOptimizer:
        ds_config = _accelerate_deepspeed_config()
        if ds_config is not None:
            # DeepSpeed will partition the model when Accelerate prepares it: the state is
            # created for the partitions only, once deepspeed.initialize has run.
            register()
            _check_offload(dict(ds_config), named=False)
            options.setdefault("layout", PendingLayout())
            if "merge" not in options:
                options["merge"] = merge_groups_for(model, dict(ds_config), recipe,
                                                    dict(options, lr=lr))
        return build_optimizer(model, recipe, lr, **options)


def _accelerate_deepspeed_config() -> dict | None:
    """The DeepSpeed config of the running Accelerate state (the Trainer's), None without one.
    Never creates an Accelerate state."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover
        return None
    if not AcceleratorState._shared_state:
        return None
    plugin = AcceleratorState().deepspeed_plugin
    return None if plugin is None else plugin.deepspeed_config


def routed_optimizer(obj) -> RoutedOptimizer:
    """Our optimizer inside a Trainer, an Accelerate wrapper or a DeepSpeed engine (to read
    `comm_stats()`, `state_bytes()`, or to register step hooks)."""
    engine = getattr(obj, "model_wrapped", obj)
    if zero.is_engine(engine):
        return zero.client_optimizer(engine)
    opt = getattr(obj, "optimizer", obj) if not isinstance(obj, RoutedOptimizer) else obj
    for _ in range(4):  # AcceleratedOptimizer (and similar) keep the optimizer in .optimizer
        if isinstance(opt, RoutedOptimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
    raise ValueError(f"{type(obj).__name__} holds no sage_dist optimizer")


# -- Accelerate on a CPU machine ------------------------------------------------------------
CPU_MARK = "_sage_dist_cpu"


def accelerate_on_cpu() -> None:
    """Make Accelerate treat CPU processes (gloo) as it treats GPU ones. For CPU tests and
    demos; call it before TrainingArguments / Accelerator exist. Idempotent. Two gaps:

    * FSDP: AcceleratorState switches to FSDP only inside its MULTI_GPU/NPU/XPU/... branch, so
      on CPU `TrainingArguments(fsdp=...)` or an FSDP plugin quietly trains WITHOUT sharding.
      A MULTI_CPU state given an FSDP plugin is made FSDP, as that branch sets it.
    * DeepSpeed: PartialState finds no backend on CPU and records ONE process although
      DeepSpeed runs the whole gloo group, so the Trainer's batch arithmetic and Accelerate's
      data sharding are wrong (every rank would read the same batches). The state is given
      the process group's backend, world size and rank.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if hasattr(AcceleratorState.__init__, CPU_MARK):
        return
    state_init, partial_init = AcceleratorState.__init__, PartialState.__init__

    @functools.wraps(partial_init)
    def partial(self, *args, **kwargs):
        partial_init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.DEEPSPEED and self.backend is None \
                and dist.is_initialized() and dist.get_world_size() > 1:
            self.backend = dist.get_backend()
            self.num_processes, self.process_index = dist.get_world_size(), dist.get_rank()
            self.local_process_index = int(os.environ.get("LOCAL_RANK", self.process_index))

    @functools.wraps(state_init)
    def state(self, *args, fsdp_plugin=None, **kwargs):
        state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    setattr(state, CPU_MARK, state_init)
    setattr(partial, CPU_MARK, partial_init)
    PartialState.__init__, AcceleratorState.__init__ = partial, state
