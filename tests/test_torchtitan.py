"""The torchtitan face (sage_dist.torchtitan): what torchtitan's optimizer container relies
on, checked on its own, then torchtitan's own container (PyPI torchtitan, pinned) around it."""
import importlib.util

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from sage_dist.torchtitan import build_part_optimizers, canonical_name


class Part(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([checkpoint_wrapper(nn.Linear(16, 16)) for _ in range(2)])
        self.norm = nn.LayerNorm(16)
        self.output = nn.Linear(16, 50, bias=False)

    def get_output_embeddings(self):
        return self.output

    def forward(self, x):
        h = self.tok_embeddings(x)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def init_optim_state_as_torchtitan_does(opt):
    """torchtitan.components.optimizer.utils.init_optim_state's contract: skip when state
    exists or a gradient is set, else a zero-gradient, lr-0 step."""
    if opt.state:
        return False
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
        g["lr"], g["_lr"] = 0.0, g["lr"]
    opt.step()
    for g in opt.param_groups:
        g["lr"] = g.pop("_lr")
    opt.zero_grad(set_to_none=True)
    return True


def test_canonical_names_drop_wrapper_segments():
    assert canonical_name("layers.0._checkpoint_wrapped_module.weight") == "layers.0.weight"
    assert canonical_name("_orig_mod.layers.1.bias") == "layers.1.bias"


@pytest.mark.parametrize("recipe", ["sage-hybrid", "sage", "sinkgd-hybrid", "scale", "lion"])
def test_every_group_has_canonical_param_names_and_state_exists(recipe):
    parts = [Part(), Part()]
    opts = build_part_optimizers(parts, recipe)
    assert len(opts) == 2
    for part, opt in zip(parts, opts):
        names = [n for g in opt.param_groups for n in g["param_names"]]
        expected = sorted(canonical_name(n) for n, _ in part.named_parameters())
        assert sorted(names) == expected and not any("wrapped" in n for n in names)
        for g in opt.param_groups:
            assert len(g["param_names"]) == len(g["params"])
        # state exists from construction, so torchtitan's state-init step never runs
        before = {(i, k): v.clone() for i, p in enumerate(part.parameters())
                  for k, v in opt.state[p].items()}
        params = [p.detach().clone() for p in part.parameters()]
        assert opt.state and init_optim_state_as_torchtitan_does(opt) is False
        assert all(torch.equal(a, b) for a, b in zip(params, part.parameters()))
        after = {(i, k): v for i, p in enumerate(part.parameters())
                 for k, v in opt.state[p].items()}
        assert before.keys() == after.keys() and before
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_no_parts_is_refused():
    with pytest.raises(ValueError, match=r"model_parts=\[\]"):
        build_part_optimizers([])


needs_torchtitan = pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None,
                                      reason="torchtitan is not installed")


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 50, (4, 6), generator=g)


def _container(seed, recipe="sage-hybrid"):
    from sage_dist.torchtitan import SageOptimizersContainer
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    torch.manual_seed(seed)
    part = Part()
    if seed:
        for p in part.parameters():
            p.data.normal_()
    opts = SageOptimizersContainer.Config(recipe=recipe).build(model_parts=[part])
    scheds = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=opts,
                                                                 training_steps=8)
    return part, opts, scheds


def _train(part, opts, scheds, start, stop, record=None):
    for step in range(start, stop):
        part(_batch(step)).square().mean().backward()
        if record is not None:
            record.append([g["lr"] for g in opts.optimizers[0].param_groups])
        opts.step()
        scheds.step()
        opts.zero_grad()


@needs_torchtitan
@pytest.mark.parametrize("recipe", ["sage-hybrid", "scale"])
def test_torchtitan_container_steps_like_our_optimizer_and_its_checkpoint_round_trips(recipe):
    """torchtitan 0.3's own OptimizersContainer machinery around our optimizer: its Config
    builds it, its LR schedulers drive it, and the parameters equal those of our optimizer
    stepped alone with the same learning rates, bit for bit; its flat FQN-keyed state dict
    loads into a container of another init, state identical, and the runs continue alike."""
    from sage_dist import build_optimizer
    part, opts, scheds = _container(0, recipe)
    lrs = []
    _train(part, opts, scheds, 0, 4, lrs)

    ref = Part()
    ropt = build_optimizer(ref, recipe)
    for step, lr in enumerate(lrs):
        ref(_batch(step)).square().mean().backward()
        for g, x in zip(ropt.param_groups, lr):
            g["lr"] = x
        ropt.step()
        ropt.zero_grad()
    for (n, a), b in zip(part.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n

    sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in opts.state_dict().items()}
    opt = opts.optimizers[0]
    state_keys = {f"state.{n}.{k}" for g in opt.param_groups
                  for n, p in zip(g["param_names"], g["params"]) for k in opt.state[p]}
    assert state_keys and state_keys <= sd.keys(), sorted(state_keys - sd.keys())[:5]
    assert "param_groups.layers.0.weight.lr" in sd        # canonical FQNs, no wrapper segment
    other, oopts, oscheds = _container(1, recipe)
    other.load_state_dict(part.state_dict())
    oopts.load_state_dict(sd)
    oscheds.load_state_dict(scheds.state_dict())
    loaded = oopts.state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v) if torch.is_tensor(v) else loaded[k] == v, k
    _train(part, opts, scheds, 4, 6)
    _train(other, oopts, oscheds, 4, 6)
    for (n, a), b in zip(part.named_parameters(), other.parameters()):
        assert torch.equal(a, b), n


@needs_torchtitan
def test_torchtitan_container_refuses_param_group_patterns():
    from sage_dist.torchtitan import SageOptimizersContainer
    from torchtitan.components.optimizer import ParamGroupConfig
    cfg = SageOptimizersContainer.Config(param_groups=[ParamGroupConfig(
        pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})])
    with pytest.raises(ValueError, match="param_groups is set"):
        cfg.build(model_parts=[Part()])
