"""Where users already train: the Hugging Face Trainer, Accelerate and any caller of
deepspeed.initialize (sage_dist.hf, sage_dist.deepspeed.register).

The slow tests run real gloo processes: the Trainer under DDP, ZeRO-2 with a JSON naming our
recipe, ZeRO-3 with the factory and no optimizer section, and FSDP2 through Accelerate, each
checked per optimizer step against the single-process oracle on the same gathered gradients
and parameters; resume through Trainer(resume_from_checkpoint=...); plain deepspeed.initialize
after register() at world 2 and 3; accelerate#3855's parameter swap. On CPU, Accelerate needs
sage_dist.hf.accelerate_on_cpu() to run FSDP (and DeepSpeed with the group's world size) at all.
The fast tests check the patch, the refusals and the optimizer's parameter following in-process.
"""
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import sage_dist
import sage_dist.deepspeed as sdds
from sage_dist.optim.optimizer import RoutedOptimizer

RECIPES = ["sage-hybrid", "scale", "sinkgd-hybrid"]
MODES = ["ddp", "zero2-json", "zero3-factory", "fsdp2"]
LAYOUT = {"ddp": "local", "zero2-json": "zero", "zero3-factory": "zero", "fsdp2": "dtensor"}
MERGED_GROUPS = {"sage-hybrid": 2, "scale": 1, "sinkgd-hybrid": 1}   # under ZeRO-1/2
NO_FORCE = {"zero_force_ds_cpu_optimizer": False}
VARIANTS = [  # (label, mode, recipe, trainer_for options)
    ("zero2-json offload", "zero2-json", "sage-hybrid",
     {"ds_extra": {"offload_optimizer": {"device": "cpu"}}}),
    ("zero3-factory offload", "zero3-factory", "scale",
     {"ds_extra": {"offload_optimizer": {"device": "cpu"}}, "ds_top": NO_FORCE}),
]
RESUMES = [  # (label, mode, recipe, options)
    ("ddp", "ddp", "sage-hybrid", {}),
    ("zero2-json", "zero2-json", "sage-hybrid", {}),
    ("zero3-factory", "zero3-factory", "sinkgd-hybrid", {}),
    ("fsdp2 sharded", "fsdp2", "sage-hybrid", {}),
    ("fsdp2 full", "fsdp2", "scale", {"fsdp_state_dict": "FULL_STATE_DICT"}),
]
SWAPS = [("sage-hybrid", 0), ("sage-hybrid", 2), ("scale", 2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from dist_harness import run
    import hf_cases

    out = str(tmp_path_factory.mktemp("hf"))
    parts = [("exactness", "exactness", (MODES, RECIPES, 5, out, VARIANTS)),
             ("resumes", "resumes", (RESUMES, out)),
             ("swaps", "swaps", (SWAPS,)),
             ("refusals", "trainer_refusals", (out,)),
             ("plain", "plain_deepspeed", ((1, 2, 3), ("sage-hybrid",), 5))]
    return run(hf_cases.world2, 2, out, parts)


def _part(results, name):
    for r in results:
        assert "error" not in r[name], r[name].get("error")
    return [r[name]["ok"] for r in results]


def _exact(res, label, calls):
    print(f"{label}: max rel {res['rel']:.2e}, sign flips {res['flips']} of {res['numel']}, "
          f"{res['calls']} step() calls, layout {res['layout']}")
    assert res["rel"] <= 1e-6
    assert res["flips"] <= 1e-5 * res["numel"]
    assert res["numel"] > 0 and res["calls"] == calls


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_trainer_step_equals_oracle_every_step(two_ranks, mode, recipe):
    for rank_res in _part(two_ranks, "exactness"):
        res = rank_res[(mode, recipe)]
        # ZeRO calls step() once per param group, the others once per step. Under ZeRO-2 the
        # groups are merged (merge_pays for this model at world 2: sage-hybrid's matrices in
        # one group, its 1-D parameters in another; scale's and sinkgd-hybrid's all in one);
        # under ZeRO-3 they stay one per category.
        if res["layout"] == "zero":
            assert res["groups"] == (MERGED_GROUPS[recipe] if mode == "zero2-json" else 4)
        _exact(res, f"Trainer {mode} {recipe}", 5 * (res["groups"] if res["layout"] == "zero"
                                                     else 1))
        assert res["layout"] == LAYOUT[mode] and res["steps"] == 5
        assert max(res["grad_norms"]) > 0.5, "gradient clipping (max_grad_norm 0.5) never acted"


@pytest.mark.slow
@pytest.mark.parametrize("label", [v[0] for v in VARIANTS])
def test_trainer_variants_equal_oracle(two_ranks, label):
    for rank_res in _part(two_ranks, "exactness"):
        res = rank_res[label]
        _exact(res, label, res["calls"])
        assert res["layout"] == "zero" and res["steps"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("label", [r[0] for r in RESUMES])
def test_trainer_resume_is_bit_identical(two_ranks, label):
    for res in _part(two_ranks, "resumes"):
        res = res[label]
        print(f"{label}: resumed {res['ran']} steps, params bit-identical {res['params_equal']}, "
              f"optimizer state bit-identical {res['state_equal']} ({res['state_keys']} tensors)")
        assert res["ran"] == 5 and res["params_equal"] and res["state_equal"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,steps_before", SWAPS)
def test_state_follows_accelerates_fsdp2_parameter_swap(two_ranks, recipe, steps_before):
    """accelerate#3855: the optimizer's state was built (and, here, stepped) on the plain
    parameters; Accelerate's FSDP2 preparation swaps param_groups' tensors for DTensors."""
    for res in _part(two_ranks, "swaps"):
        res = res[(recipe, steps_before)]
        assert res["swapped"] and res["keyed"] and res["layout"] == "dtensor"
        assert res["complete"] and res["same_on_ranks"] and res["elementwise_dtensor"]
        _exact(res, f"after the swap ({recipe}, {steps_before} steps before)", 3)


@pytest.mark.slow
def test_trainer_refusals_name_the_problem(two_ranks):
    for res in _part(two_ranks, "refusals"):
        print(res)
        assert "zero_force_ds_cpu_optimizer" in res["offload+forced-cpu-adam"]
        assert "DeepSpeedCPUAdam" in res["offload+forced-cpu-adam"]
        assert "sgae-hybrid" in res["unknown-recipe"] and "sage-hybrid" in res["unknown-recipe"]
        # the Trainer's own "auto"/value check still runs on a JSON naming our recipe
        assert "mismatch" in res["json-lr-mismatch"] and "optimizer.params.lr" in \
            res["json-lr-mismatch"]


def _plain_check(results, world):
    for rank_res in results:
        for (stage, recipe, how), res in rank_res.items():
            # merged (merge_groups_for: at world 2 and 3 it pays for this model under ZeRO-1/2)
            assert res["groups"] == (2 if stage in (1, 2) else 4), (how, res["groups"])
            _exact(res, f"ZeRO-{stage} world {world} {how}", 5 * res["groups"])
            assert res["layout"] == "zero" and res["straddle"]
            assert res["bitwise_as_sage_dist"], f"{how} differs from sage_dist.deepspeed.initialize"


@pytest.mark.slow
def test_plain_deepspeed_initialize_after_register_world2(two_ranks):
    _plain_check(_part(two_ranks, "plain"), 2)


@pytest.mark.slow
def test_plain_deepspeed_initialize_after_register_world3():
    from dist_harness import run
    import hf_cases
    _plain_check(run(hf_cases.plain_deepspeed, 3, (1, 2, 3), ("sage-hybrid",), 5), 3)


# -- in-process: the patch, the refusals, the parameter following --------------------------
@pytest.fixture
def patched():
    sdds.register()
    yield
    sdds.unregister()


def _model():
    from conftest import tiny_llama
    return tiny_llama(vocab=64, hidden=16, inter=32, layers=1)


def test_register_is_idempotent_and_undone():
    import deepspeed
    sdds.unregister()
    bare = deepspeed.initialize
    sdds.register()
    patched = deepspeed.initialize
    sdds.register()                                  # a second call changes nothing
    assert deepspeed.initialize is patched and patched is not bare and sdds.registered()
    assert sdds._original() is bare                  # sage_dist's own initialize calls this
    assert sdds.unregister() and deepspeed.initialize is bare and not sdds.registered()
    assert not sdds.unregister()


def test_types_not_ours_pass_through_untouched():
    seen = {}
    fake = lambda **call: seen.update(call) or ("engine", None, None, None)
    cfg = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}
    model = _model()
    out = sdds._initialize(fake, dict(model=model, config_params=cfg, lr_scheduler=None))
    assert out[0] == "engine" and seen["config_params"] is cfg and seen["model"] is model
    assert cfg == {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                   "zero_optimization": {"stage": 2}}
    seen.clear()
    sdds._initialize(fake, dict(model=model, config={"zero_optimization": {"stage": 1}},
                                optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    assert isinstance(seen["optimizer"], torch.optim.SGD)


def test_refusals_before_deepspeed_does_any_work(patched):
    import deepspeed
    model = _model()
    with pytest.raises(ValueError) as e:
        deepspeed.initialize(model=model, config={"optimizer": {"type": "sage-hybird"}})
    print(e.value)
    assert "'sage-hybird' is not a known optimizer" in str(e.value)
    assert all(r in str(e.value) for r in ("sage-hybrid", "sinkgd-hybrid", "scale"))

    opt = sage_dist.build_optimizer(model, "sage-hybrid")
    with pytest.raises(ValueError) as e:
        deepspeed.initialize(model=model, optimizer=opt,
                             config={"optimizer": {"type": "sage-hybrid"},
                                     "zero_optimization": {"stage": 2}})
    print(e.value)
    assert "client optimizer (RoutedOptimizer) was passed too" in str(e.value)

    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError) as e:   # a client sage_dist optimizer, the default (true)
        deepspeed.initialize(model=model, optimizer=opt, config=dict(offload))
    print(e.value)
    assert "zero_force_ds_cpu_optimizer=true (the default)" in str(e.value)
    with pytest.raises(ValueError) as e:   # our recipe in the JSON, forced to CPU Adam
        deepspeed.initialize(model=model, config=dict(offload, optimizer={"type": "scale"},
                                                      zero_force_ds_cpu_optimizer=True))
    assert "zero_force_ds_cpu_optimizer=true:" in str(e.value)

    # What Accelerate's map_pytorch_optim_to_deepspeed does under offload: a CPU Adam built on
    # our param groups (torch's AdamW stands in for DeepSpeedCPUAdam, which needs a JIT build).
    swapped = torch.optim.AdamW(opt.param_groups, lr=1e-3)
    with pytest.raises(ValueError) as e:
        deepspeed.initialize(model=model, optimizer=swapped, config=dict(offload))
    print(e.value)
    assert "AdamW built on a sage_dist optimizer's param groups" in str(e.value)

    stepped = sage_dist.build_optimizer(model, "sage-hybrid")
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)
          ).loss.backward()
    stepped.step()
    with pytest.raises(ValueError, match="has already stepped"):
        deepspeed.initialize(model=model, optimizer=stepped, config={"zero_optimization": {"stage": 2}})


def test_factory_is_what_the_trainer_expects():
    from transformers.trainer_optimizer import is_optimizer_factory

    import sage_dist.hf as sdhf
    cls, kwargs = sdhf.optimizer("scale", lr=1e-3, overrides={r"lm_head": "adamw"})
    assert is_optimizer_factory(cls) and sdds.registered()
    opt = cls()(_model(), **kwargs)                       # what Trainer.create_optimizer does
    assert isinstance(opt, RoutedOptimizer) and opt.layout.name == "local"
    assert {g["rule"] for g in opt.param_groups} >= {"scale_dense", "adamw"}
    assert sdhf.routed_optimizer(opt) is opt
    with pytest.raises(ValueError, match="allowed are sage-hybrid"):
        sdhf.optimizer("sgae")
    sdds.unregister()


def _twins(recipe):
    torch.manual_seed(0)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    return a, sage_dist.build_optimizer(a, recipe), b, sage_dist.build_optimizer(b, recipe)


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 8), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def _swap_parameters(model, opt):
    """Replace every parameter by a new one holding the same values, in the model and in the
    optimizer's param_groups only (as Accelerate's fsdp2_switch_optimizer_parameters does)."""
    new = {}
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            q = new.setdefault(id(p), torch.nn.Parameter(p.detach().clone()))
            setattr(mod, name, q)
    for g in opt.param_groups:
        g["params"] = [new[id(p)] for p in g["params"]]


@pytest.mark.parametrize("steps_before", [0, 2])
def test_optimizer_follows_a_parameter_swap(steps_before):
    a, oa, b, ob = _twins("sage-hybrid")
    _train(a, oa, steps_before)
    _train(b, ob, steps_before)
    _swap_parameters(b, ob)
    sd = ob.state_dict()                # complete at once, keyed by the new tensors
    assert len(sd["state"]) == sum(len(g["params"]) for g in ob.param_groups)
    assert all(any(k is p for p in b.parameters()) for k in ob.state)
    _train(a, oa, 3, seed=1)
    _train(b, ob, 3, seed=1)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_a_swap_to_other_shapes_is_refused():
    """DeepSpeed's flat partitions without register(): refused, naming the fix."""
    a, oa, *_ = _twins("sage-hybrid")
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in a.parameters()]))
    for i, g in enumerate(oa.param_groups):
        g["params"] = [flat] if i == 0 else []
    with pytest.raises(RuntimeError, match=r"sage_dist.deepspeed.register\(\)"):
        oa.step()


@pytest.mark.slow
@pytest.mark.parametrize("flags,layout", [(["--deepspeed", "configs/deepspeed/zero2.json"], "zero"),
                                          (["--fsdp2"], "dtensor")])
def test_the_example_runs_under_torchrun(flags, layout, tmp_path):
    import subprocess
    import sys

    from dist_harness import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "examples/hf_trainer.py", "--steps", "3",
           "--output-dir", str(tmp_path), *flags]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"sage-hybrid on {layout} layout: train loss" in p.stdout, p.stdout[-3000:]


def test_configs_deepspeed_reads_are_read_too(tmp_path):
    """HJSON files (comments) and base64 strings, as DeepSpeed accepts them: a type that is
    not ours passes through, ours is routed."""
    import base64

    seen = {}
    fake = lambda **call: seen.update(call) or ("engine", None, None, None)
    path = tmp_path / "ds.json"
    path.write_text('{\n  // plain Adam\n  "optimizer": {"type": "Adam", "params": {"lr": 1e-3},},\n}\n')
    sdds._initialize(fake, dict(model=_model(), config=str(path)))
    assert seen["config"] == str(path)
    encoded = base64.urlsafe_b64encode(b'{"optimizer": {"type": "sgae"}}').decode()
    with pytest.raises(ValueError, match="'sgae' is not a known optimizer"):
        sdds._initialize(fake, dict(model=_model(), config=encoded))
    with pytest.raises(ValueError, match="allowed is a path to a DeepSpeed JSON file, a dict"):
        sdds.load_config("no-such-file.json")


def test_unregister_leaves_a_later_patch_alone():
    import functools

    import deepspeed
    sdds.unregister()
    bare = deepspeed.initialize
    sdds.register()
    ours = deepspeed.initialize

    @functools.wraps(ours)          # another library's patch above ours (copies our marker)
    def theirs(*args, **kwargs):
        return ours(*args, **kwargs)

    deepspeed.initialize = theirs
    try:
        assert not sdds.unregister() and deepspeed.initialize is theirs
    finally:
        deepspeed.initialize = ours
    assert sdds.unregister() and deepspeed.initialize is bare


def test_a_plain_patch_below_ours_still_gets_every_call(patched):
    import deepspeed
    sdds.unregister()
    bare, calls = deepspeed.initialize, []

    def plain(*args, **kwargs):     # no functools.wraps: its signature is (*args, **kwargs)
        calls.append((args, kwargs))
        return "engine", None, None, None

    deepspeed.initialize = plain
    try:
        sdds.register()
        deepspeed.initialize(model="m", config={"zero_optimization": {"stage": 1}})
        deepspeed.initialize(None, "m")
        assert calls == [((), {"model": "m", "config": {"zero_optimization": {"stage": 1}}}),
                         ((None, "m"), {})]
    finally:
        sdds.unregister()
        deepspeed.initialize = bare


@pytest.mark.parametrize("cfg,message", [
    ({"tensor_parallel": {"autotp_size": 2}}, "autotp_size=2"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
     "device='nvme': allowed with sage_dist optimizers are 'cpu' and 'none'"),
])
def test_refusals_of_what_the_layouts_cannot_do(patched, cfg, message):
    import deepspeed
    with pytest.raises((ValueError, NotImplementedError), match=message):
        deepspeed.initialize(model=_model(), config=dict(cfg, optimizer={"type": "sage-hybrid"}))
