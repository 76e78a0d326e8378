"""Iterative pruning (LoRAPrune's schedule): masks, LoRA fine-tuning, moving-average scores.

:func:`iterative_prune` works on a deep copy of the captured model and alternates, ``steps`` in all:

1. LoRA fine-tuning (peft adapters on the ``nn.Linear`` layers whose weight is a member of a
   targeted group, base weights frozen) for ``prune_every`` steps, one calibration batch per step;
   after every optimizer step the adapter slices that feed masked units are zeroed again
   (``B``'s rows for a masked output channel, ``A``'s columns for a masked input channel), so
   ``W + s·BA`` stays masked;
2. a mask update: the adapters are merged into the weights (so the importance pass sees
   LoRAPrune's ``W + s·BA`` as a plain weight) and fresh ones are started for the next interval;
   the importance pass (any name, default ``lora``) scores the units on the batches of the interval
   just trained on; the scores enter a moving average ``s <- ema * s + (1 - ema) * s_new`` (the
   first update takes ``s_new`` as is); :func:`~fxprune.passes.select.select` turns the average
   into a plan removing :func:`cubic_ratio` of the parameters; ``masked_copy`` zeroes the
   members' slices of the units it drops.

Masks only grow: a dropped unit's average is reset to 0 (its weights are zero from then on, so
any weight-based score of it is 0 as well) and ranks last at every later update. The last update
falls on step ``steps``, at exactly the target ratio; its plan goes to the ordinary rewrite, which
physically removes the units from the fine-tuned (merged, masked) copy. LoRAPrune itself stops at
the masks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..capture import Program
from ..depgraph import DependencyGraph, count_params
from ..errors import FxpruneError
from ..plan import Plan
from .importance import ImportanceRequest, get_importance
from .importance.taylor import ModelState
from .recovery import ADAPTER, LoraHandle, attach_lora, finetune, linear_modules, merge_lora
from .rewrite import KeepMasks, _param_indices, masked_copy
from .select import Selection, candidates, params_after, select

Scores = dict[str, np.ndarray]


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _positive_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# option -> (check, what a good value is); errors read "<option> must be <what>, got <value>"
OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (_int_at_least(1), "an integer >= 1"),
    "prune_every": (_int_at_least(1), "an integer >= 1"),
    "ema": (lambda v: isinstance(v, (int, float)) and 0.0 <= v < 1.0, "in [0, 1)"),
    "recover_steps": (_int_at_least(0), "an integer >= 0"),
    "lr": (_positive_finite, "a positive number (e.g. 2e-4)"),
    "lora_rank": (_int_at_least(1), "an integer >= 1"),
}


def check_options(**values: Any) -> None:
    """Raise one-line :class:`FxpruneError` for the first option outside its range (``OPTION_RULES``)."""
    for name, value in values.items():
        ok, what = OPTION_RULES[name]
        if not ok(value):
            raise FxpruneError(f"{name} must be {what}, got {value!r}")
    if "steps" in values and "prune_every" in values and values["prune_every"] > values["steps"]:
        raise FxpruneError(f"prune_every ({values['prune_every']}) must not exceed steps ({values['steps']}); "
                           "lower prune_every or raise steps")


@dataclass(frozen=True)
class Schedule:
    """How the iterative run proceeds (see the module docstring)."""

    steps: int = 20
    prune_every: int = 5
    ema: float = 0.9
    lr: float = 2e-4
    lora_rank: int = 8
    importance: str = "lora"


@dataclass
class IterativeResult:
    """The final plan, the fine-tuned masked copy it applies to, and one record per mask update."""

    plan: Plan
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)


def cubic_ratio(step: int, steps: int, target: float) -> float:
    """Zhu & Gupta's cubic schedule from 0 at step 0 to ``target`` at ``steps``: ``r(1 - (1 - t/T)^3)``."""
    t = min(max(step, 0), steps) / steps
    return target * (1.0 - (1.0 - t) ** 3)


def update_points(steps: int, prune_every: int) -> list[int]:
    """The steps after which masks are updated: every ``prune_every``, and always the last step."""
    points = list(range(prune_every, steps + 1, prune_every))
    if not points or points[-1] != steps:
        points.append(steps)
    return points


def ema_update(avg: Scores | None, new: Scores, ema: float) -> Scores:
    """``avg <- ema * avg + (1 - ema) * new`` per group; with no average yet, ``new`` itself."""
    if avg is None:
        return {k: np.asarray(v, dtype=np.float64).copy() for k, v in new.items()}
    return {k: ema * avg[k] + (1.0 - ema) * np.asarray(v, dtype=np.float64) for k, v in new.items()}


def _forget_pruned(avg: Scores, plan: Plan) -> Scores:
    """Reset the average of every unit ``plan`` drops to 0: masks only grow."""
    out = dict(avg)
    for gid, kept in plan.keep.items():
        if gid in out:
            s = out[gid].copy()
            drop = np.ones(len(s), dtype=bool)
            drop[np.asarray(kept, dtype=np.int64)] = False
            s[drop] = 0.0
            out[gid] = s
    return out


def _factor_masker(model: nn.Module, handle: LoraHandle, program: Program, dg: DependencyGraph,
                   plan: Plan) -> Callable[[], None] | None:
    """A function zeroing the adapter slices that feed units ``plan`` drops (None if it drops none)."""
    if not plan.keep:
        return None
    index = _param_indices(program, dg, KeepMasks(dg, plan))  # parameter -> {dim: kept indices}
    found = dict(model.named_modules())
    fills: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    for name in handle.modules:
        layer = found[name]
        for dim, kept in index.get(f"{name}.weight", {}).items():
            # W is out x in; B (out x r) carries the rows, A (r x in) the columns
            factor = layer.lora_B[ADAPTER].weight if dim == 0 else layer.lora_A[ADAPTER].weight
            drop = np.setdiff1d(np.arange(layer.weight.shape[dim]), kept)
            fills.append((factor, dim, torch.as_tensor(drop, dtype=torch.long)))

    def apply() -> None:
        with torch.no_grad():
            for t, dim, idx in fills:
                t.index_fill_(dim, idx, 0.0)

    apply()  # A starts random: its masked columns must be zero before the first step
    return apply


def _train_interval(model: nn.Module, modules: list[str], program: Program, dg: DependencyGraph,
                    plan: Plan, batches: list[Any], start: int, n: int, sched: Schedule,
                    seed: int) -> list[float]:
    """LoRA-fine-tune ``model`` for ``n`` steps under ``plan``'s masks, then merge the adapters."""
    state = ModelState(model)
    handle = attach_lora(model, modules, sched.lora_rank, seed)
    try:
        masker = _factor_masker(model, handle, program, dg, plan)
        return finetune(model, handle.params, batches, n, sched.lr, start=start, after_step=masker)
    finally:
        merge_lora(model, handle)
        state.restore()


def iterative_prune(program: Program, dg: DependencyGraph, sel: Selection, batches: list[Any],
                    sched: Schedule, *, aggregate: str = "sum", seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> IterativeResult:
    """Run the iterative schedule on a copy of ``program.model``; the plan reaches ``sel.ratio``.

    ``batches`` are calibration batches (token-id windows for causal LMs), used in turn, one per step.
    """
    if not batches:
        raise FxpruneError("iterative pruning fine-tunes on calibration text; pass calib= (--calib FILE)")
    say = progress or (lambda msg: None)
    score_fn = get_importance(sched.importance)
    groups = candidates(dg, sel)
    weights = {m.param for g in groups for m in g.members if not m.is_buffer}
    weights |= {a for m in list(weights) for a in program.aliases.get(m, [])}
    model = copy.deepcopy(program.model)  # the caller's model is never touched
    modules = linear_modules(model, weights)
    avg: Scores | None = None
    plan = Plan({})
    history: list[dict[str, Any]] = []
    step = 0
    total = count_params(program.model)
    for point in update_points(sched.steps, sched.prune_every):
        n = point - step
        say(f"iterative: LoRA steps {step + 1}-{point} of {sched.steps}")
        losses = _train_interval(model, modules, program, dg, plan, batches, step, n, sched, seed + point)
        interval = [batches[(step + i) % len(batches)] for i in range(n)]
        req = ImportanceRequest(model, dg, groups, interval, aggregate, seed, sched.lora_rank)
        avg = _forget_pruned(ema_update(avg, score_fn(req), sched.ema), plan)
        ratio = cubic_ratio(point, sched.steps, sel.ratio)
        plan = select(dg, avg, dataclasses.replace(sel, ratio=ratio))
        model = masked_copy(dataclasses.replace(program, model=model), dg, plan)
        history.append({"step": point, "target_ratio": ratio,
                        "removed_fraction": 1.0 - params_after(dg, plan) / total,
                        "train_loss": float(np.mean(losses))})
        step = point
    return IterativeResult(plan, model, history)
