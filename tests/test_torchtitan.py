"""The torchtitan face (sage_dist.torchtitan): what torchtitan's optimizer container relies
on, checked without torchtitan (it is not on this machine's package index); the container
itself is tested only where torchtitan imports."""
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


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None,
                    reason="torchtitan is not installed (not on this machine's package index)")
def test_container_builds_from_its_config():
    from sage_dist.torchtitan import SageOptimizersContainer
    part = Part()
    opts = SageOptimizersContainer.Config(recipe="sage-hybrid").build(model_parts=[part])
    part(torch.zeros(2, 3, dtype=torch.long)).sum().backward()
    sd = opts.state_dict()
    assert any(k.startswith("state.layers.0.weight") for k in sd), list(sd)[:5]
    opts.step()
