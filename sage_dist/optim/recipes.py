"""Recipes: which rule each parameter of a model gets (docs/ALGORITHMS.md §6), and the defaults.

Routing looks at module types and GLOBAL shapes only, so it gives the same answer for a plain
model, a DDP model, an FSDP2 model (DTensor parameters) and a DeepSpeed ZeRO-3 model
(`ds_shape`). Tied tensors appear once in `named_parameters()` and are routed once.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..shard.fragment import global_shape, matrix_shape
from .groups import merge_groups
from .optimizer import RoutedOptimizer
from .registry import get_rule

CATEGORIES = ("embedding", "head", "matrix", "vector")
HEAD_CHOICES = ("sage", "auto", "sinkhorn")


@dataclass(frozen=True)
class Recipe:
    name: str
    routes: dict            # category -> rule name ("head" may be resolved by head=...)
    defaults: dict = field(default_factory=dict)
    lr_scale: dict = field(default_factory=dict)   # category -> multiplier of the peak lr
    by_category: dict = field(default_factory=dict)   # category -> defaults of its groups
    note: str = ""          # what a variant changes (VARIANTS)


_SAGE = dict(lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
RECIPES = {r.name: r for r in (
    Recipe("sage-hybrid", dict(embedding="sage", head="sage", matrix="sinkhorn", vector="sage"),
           dict(_SAGE, sinkhorn_iters=5, sinkhorn_scale=10.0)),
    Recipe("sage", dict.fromkeys(CATEGORIES, "sage"), dict(_SAGE)),
    Recipe("sinkgd-hybrid", dict(embedding="adamw", head="adamw", matrix="sinkgd",
                                 vector="adamw"),
           dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, sinkhorn_iters=5,
                linear_lr_scale=0.05)),
    Recipe("scale", dict(embedding="scale_embedding", head="scale_head", matrix="scale_dense",
                         vector="scale_adamw"),
           dict(lr=1e-3, adam_lr=None, adam_betas=(0.9, 0.999), adam_eps=1e-8,
                weight_decay=0.0, momentum=0.9)),
    Recipe("lion", dict.fromkeys(CATEGORIES, "lion"),
           dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01)),
    Recipe("adamw", dict.fromkeys(CATEGORIES, "adamw"),
           dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)),
)}




def _variant(suffix: str, note: str, *, routes=None, defaults=None, lr_scale=None,
             by_category=None) -> Recipe:
    base = RECIPES["sage-hybrid"]
    return Recipe(f"sage-hybrid.{suffix}", {**base.routes, **(routes or {})},
                  {**base.defaults, **(defaults or {})}, dict(lr_scale or {}),
                  dict(by_category or {}), note)


# AdamW where a variant puts it: sinkgd-hybrid's settings, not SAGE's betas and decay.
_ADAMW = dict(betas=(0.9, 0.999), weight_decay=0.0)


_SAGE_GROUPS = ("embedding", "head", "vector")
# One change each to sage-hybrid, to find what separates it from sinkgd-hybrid
# (docs/QUALITY.md, the ablations). sage-hybrid itself stays the paper's recipe.
VARIANTS = {r.name: r for r in (
    _variant("head-sinkhorn", "the untied head takes the dense Sinkhorn rule, not SAGE",
             routes=dict(head="sinkhorn")),
    _variant("sage-lr3", "the SAGE groups (embedding, head, 1-D) at 3x the peak lr",
             lr_scale=dict.fromkeys(_SAGE_GROUPS, 3.0)),
    _variant("sage-lr10", "the SAGE groups (embedding, head, 1-D) at 10x the peak lr",
             lr_scale=dict.fromkeys(_SAGE_GROUPS, 10.0)),
    _variant("sage-lr0.3", "the SAGE groups (embedding, head, 1-D) at 0.3x the peak lr",
             lr_scale=dict.fromkeys(_SAGE_GROUPS, 0.3)),
    _variant("dense-sinkgd", "the dense matrices take SinkGD (RMS-normalised, x alpha 0.05) "
             "instead of unit-norm Sinkhorn x kappa 10", routes=dict(matrix="sinkgd"),
             defaults=dict(linear_lr_scale=0.05)),
    _variant("vector-adamw", "the 1-D parameters take AdamW instead of SAGE",
             routes=dict(vector="adamw"), by_category=dict(vector=_ADAMW)),
    _variant("lion-order", "SAGE forms the sign from the old momentum, then updates it "
             "(momentum_first=False, Lion's order)", defaults=dict(momentum_first=False)),
    # the two factors that close most of the gap (docs/QUALITY.md), together: not one change
    _variant("sage-lr10-dense-sinkgd", "sage-lr10 and dense-sinkgd together: the SAGE groups "
             "at 10x the peak lr, the dense matrices on SinkGD (x alpha 0.05)",
             routes=dict(matrix="sinkgd"), defaults=dict(linear_lr_scale=0.05),
             lr_scale=dict.fromkeys(_SAGE_GROUPS, 10.0)),
    _variant("embed-head-adamw", "the embedding and the head take AdamW (our dense path "
             "and 1-D SAGE unchanged)", routes=dict(embedding="adamw", head="adamw"),
             by_category=dict(embedding=_ADAMW, head=_ADAMW)),
)}


def get_recipe(name) -> Recipe:
    """A recipe of RECIPES, or a variant of sage-hybrid from VARIANTS."""
    if isinstance(name, Recipe):
        return name
    key = str(name).strip().lower().replace("_", "-")
    found = RECIPES.get(key) or VARIANTS.get(key)
    if found is None:
        raise ValueError(f"recipe={name!r} is not a known recipe: allowed are "
                         f"{', '.join(RECIPES)}, or a variant of sage-hybrid: "
                         f"{', '.join(VARIANTS)}")
    return found


# -- classification -----------------------------------------------------------------------
def _output_head(model: nn.Module):
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP and similar wrappers
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:  # models without the Hugging Face method: the usual names
        for name in ("lm_head", "output"):
            m = getattr(model, name, None)
            if isinstance(m, nn.Linear):
                return m
    return head


def _refuse_flat_parameters(model: nn.Module) -> None:
    """FSDP1 (FullyShardedDataParallel) shows the optimizer flattened 1-D views: every matrix
    would be routed and normalised as a vector. Refuse it rather than compute the wrong math."""
    fsdp1 = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if fsdp1 is None:  # never imported: no module can be wrapped in it (and importing is slow)
        return
    if any(isinstance(m, fsdp1.FullyShardedDataParallel) for m in model.modules()):
        raise NotImplementedError(
            "the model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat 1-D "
            "parameters hide each weight's 2-D shape; use FSDP2 (torch.distributed.fsdp."
            "fully_shard, e.g. sage_dist.fsdp.shard_llama) or DeepSpeed ZeRO instead")


def classify(model: nn.Module) -> list[tuple[str, torch.Tensor, str]]:
    """(name, parameter, category) for every trainable parameter, tied ones once."""
    _refuse_flat_parameters(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = _output_head(model)
    head_w = getattr(head, "weight", None)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            cat = "embedding"          # includes a head tied to the embedding
        elif head_w is not None and p is head_w:
            cat = "head"
        elif len(global_shape(p)) >= 2:
            cat = "matrix"
        else:
            cat = "vector"
        out.append((_clean(name), p, cat))
    return out


def _clean(name: str) -> str:
    """Drop wrapper prefixes (DDP's 'module.', torch.compile's '_orig_mod.')."""
    return re.sub(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module)\.", r"\1", name)


# -- routing --------------------------------------------------------------------------------
def _head_rule(recipe: Recipe, head: str, shape) -> str:
    if recipe.name != "sage-hybrid":
        return recipe.routes["head"]
    if head == "auto":  # the authors' rule: SAGE only for a tall vocabulary head
        R, C = matrix_shape(shape)
        return "sage" if R > 50_000 and R > 10 * C else "sinkhorn"
    return head


def _normalise_overrides(overrides) -> list[tuple[str, dict]]:
    items = list((overrides or {}).items()) if isinstance(overrides, dict) else list(overrides or ())
    out = []
    for pattern, spec in items:
        spec = {"rule": spec} if isinstance(spec, str) else dict(spec)
        if "rule" not in spec:
            raise ValueError(f"overrides[{pattern!r}] has no 'rule': give a rule name or a "
                             f"dict with key 'rule'")
        get_rule(spec["rule"], f"overrides[{pattern!r}].rule")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"overrides pattern {pattern!r} is not a valid regex ({e}): "
                             f"allowed is a Python regular expression matched with re.search") from None
        out.append((pattern, spec))
    return out


def route(model: nn.Module, recipe="sage-hybrid", overrides=None, head: str = "sage"):
    """[(name, param, category, rule, group_key)] for every trainable parameter."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} is invalid: allowed is a torch.nn.Module "
                         f"(route parameter lists with the single-rule classes in "
                         f"sage_dist.optim instead)")
    if head not in HEAD_CHOICES:
        raise ValueError(f"head={head!r} is invalid: allowed are {', '.join(HEAD_CHOICES)}")
    rec = get_recipe(recipe)
    rules = _normalise_overrides(overrides)
    hits = {pattern: 0 for pattern, _ in rules}
    rows = []
    for name, p, cat in classify(model):
        rule = _head_rule(rec, head, global_shape(p)) if cat == "head" else rec.routes[cat]
        key = cat
        for pattern, spec in rules:
            if re.search(pattern, name):
                rule, key = spec["rule"], f"override:{pattern}"
                hits[pattern] += 1
                break
        rows.append((name, p, cat, rule, key))
    unused = [pat for pat, n in hits.items() if n == 0]
    if unused:
        raise ValueError(f"overrides pattern {unused[0]!r} matches no trainable parameter "
                         f"(names look like {rows[0][0]!r})" if rows else
                         f"overrides pattern {unused[0]!r} matches no trainable parameter")
    return rec, dict(rules), rows


def _group_hparams(rule_name: str, rec: Recipe, user: dict, extra: dict, cat: str) -> dict:
    rule = get_rule(rule_name)
    hp = dict(rule.defaults)
    for source in (rec.defaults, rec.by_category.get(cat, {}), user, extra):
        hp.update({k: v for k, v in source.items() if k in rule.defaults})
    scale = rec.lr_scale.get(cat)
    if scale is not None and isinstance(hp.get("lr"), (int, float)) \
            and not isinstance(hp["lr"], bool):   # anything else: the rule's check refuses it
        hp["lr"] = hp["lr"] * scale
    return hp


def _check_user_keys(rec: Recipe, rows, user: dict) -> None:
    used = set(rec.routes.values()) | {r for *_, r, _ in rows}
    if rec.name == "sage-hybrid":
        used |= {"sinkhorn", "sage"}
    allowed = set().union(*(get_rule(r).defaults for r in used))
    for key in user:
        if key not in allowed:
            raise ValueError(f"{key}={user[key]!r} is not a hyperparameter of recipe "
                             f"{rec.name!r}: allowed are {', '.join(sorted(allowed))}")


def param_groups(model: nn.Module, recipe="sage-hybrid", lr=None, overrides=None,
                 head: str = "sage", **hyperparameters) -> list[dict]:
    """The param groups build_optimizer uses: one per category or override pattern."""
    rec, specs, rows = route(model, recipe, overrides, head)
    user = dict(hyperparameters)
    if lr is not None:
        user["lr"] = lr
    _check_user_keys(rec, rows, user)
    groups: dict[str, dict] = {}
    for name, p, cat, rule, key in rows:
        if key not in groups:
            extra = {k: v for k, v in specs.get(key[len("override:"):], {}).items()
                     if k != "rule"} if key.startswith("override:") else {}
            # an override group's per-category settings would be ambiguous: none apply
            hp = _group_hparams(rule, rec, user, extra, cat if key == cat else None)
            bad = set(extra) - set(get_rule(rule).defaults)
            if bad:
                raise ValueError(f"overrides[{key[9:]!r}].{sorted(bad)[0]} is not a "
                                 f"hyperparameter of rule {rule!r}: allowed are "
                                 f"{', '.join(sorted(get_rule(rule).defaults))}")
            groups[key] = dict(name=key, rule=rule, params=[], param_names=[], **hp)
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, recipe: str = "sage-hybrid", lr: float | None = None, *,
                    overrides=None, head: str = "sage", nonfinite: str = "skip",
                    layout=None, state_dtype=torch.float32,
                    stochastic_rounding: bool = False, rounding_seed: int = 0,
                    merge: bool | None = None, **hyperparameters) -> RoutedOptimizer:
    """One torch.optim.Optimizer for the whole model, routed by `recipe`.

    lr=None takes the recipe's default. Other keywords are hyperparameters of the recipe's
    rules (each goes to the groups whose rule takes it). `overrides` maps regex patterns on
    parameter names to a rule name or to {'rule': ..., **hyperparameters}; the first pattern
    that matches wins. `head` ('sage', 'auto' or 'sinkhorn') routes an untied output head under
    sage-hybrid. `layout`: see RoutedOptimizer (engines that re-partition the parameters, as
    DeepSpeed does, pass shard.PendingLayout() and install theirs later).
    `state_dtype`, `stochastic_rounding` and `rounding_seed`: see RoutedOptimizer (precision).
    `merge=True` puts the groups into as few as the rules allow (groups.merge_groups; each
    parameter's rule and hyperparameters unchanged), which changes how DeepSpeed ZeRO-1/2
    partitions them (sage_dist.deepspeed decides it per setup; docs/MEMORY.md).
    """
    if merge not in (None, True, False):
        raise ValueError(f"merge={merge!r} is invalid: allowed are True, False (None: False)")
    groups = param_groups(model, recipe, lr, overrides, head, **hyperparameters)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if merge:
        groups = merge_groups(groups)
    opt = RoutedOptimizer(groups, nonfinite=nonfinite, layout=layout,
                          state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                          rounding_seed=rounding_seed)
    opt.recipe = get_recipe(recipe).name
    return opt


# -- describe -------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    shape: tuple
    category: str
    rule: str
    state_floats: int


class RoutingTable:
    """What describe() returns: rows plus totals; str() is a printable table."""

    def __init__(self, recipe: str, rows: list[Row]):
        self.recipe, self.rows = recipe, rows

    @property
    def total_state_floats(self) -> int:
        return sum(r.state_floats for r in self.rows)

    @property
    def total_params(self) -> int:
        return sum(_numel(r.shape) for r in self.rows)

    def __str__(self) -> str:
        head = ("parameter", "global shape", "rule", "state floats")
        body = [(r.name, "x".join(map(str, r.shape)) or "scalar", r.rule, f"{r.state_floats:,}")
                for r in self.rows]
        adam = 2 * self.total_params
        foot = ("total", f"{self.total_params:,} params", self.recipe,
                f"{self.total_state_floats:,}")
        w = [max(len(x[i]) for x in [head, *body, foot]) for i in range(4)]
        line = lambda x: "  ".join([x[0].ljust(w[0]), x[1].ljust(w[1]), x[2].ljust(w[2]),
                                    x[3].rjust(w[3])])
        sep = "-" * len(line(head))
        pct = 100.0 * self.total_state_floats / adam if adam else 0.0
        return "\n".join([line(head), sep, *map(line, body), sep, line(foot),
                          f"optimizer state: {pct:.1f}% of AdamW's ({adam:,} floats)"])

    __repr__ = __str__


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe(model: nn.Module, recipe: str = "sage-hybrid", *, overrides=None,
             head: str = "sage", print_table: bool = False) -> RoutingTable:
    """The routing table: parameter name, global shape, rule, optimizer-state floats."""
    rec, _, rows = route(model, recipe, overrides, head)
    table = []
    for name, p, cat, rule, _ in rows:
        shape = global_shape(p)
        spec = get_rule(rule).state_spec(shape, *matrix_shape(shape))
        el, rep = spec.floats(_numel(shape))
        table.append(Row(name, tuple(shape), cat, rule, el + rep))
    out = RoutingTable(rec.name, table)
    if print_table:
        print(out)
    return out
