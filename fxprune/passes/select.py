"""Selection: per-unit scores -> a :class:`Plan` that removes a given fraction of the parameters.

``ratio`` is the fraction of *all* model parameters to remove. Local ranking removes the same
fraction of units from every targeted group, or, with ``depth_profile`` ``p``, a fraction shaped
over the layer range: a layer at position ``x`` in ``[-1, 1]`` (first to last pruned layer) removes
``frac * (1 + p * (1 - 2|x|))``, more in the middle of the range than at its ends for ``p > 0``.
Global ranking pools the (per-group normalised) scores and removes the lowest units anywhere.
Either way the knob (fraction or threshold) is found by bisection against the exact parameter
count of the resulting plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..depgraph import DependencyGraph, Group, count_params
from ..errors import PlanError
from ..plan import Plan
from .importance.base import normalize
from .rewrite import KeepMasks

MODES = ("local", "global")


@dataclass
class Selection:
    """What to prune: kinds, a layer range, ranking mode and hardware rounding."""

    ratio: float
    targets: tuple[str, ...] = ("heads", "mlp")
    layers: range | None = None
    mode: str = "local"
    round_to: int = 1
    max_group_ratio: float = 0.9  # global mode: never remove more than this fraction of a group
    depth_profile: float = 0.0  # local mode: middle layers of the range remove (1 + p) x, the ends (1 - p) x


def parse_layers(spec: str | None, num_layers: int | None = None) -> range | None:
    """``"3:29"`` -> range(3, 29); ``None`` -> all layers. Errors name the model's layer count."""
    if spec in (None, ""):
        return None
    try:
        lo_s, hi_s = spec.split(":")
        lo = int(lo_s) if lo_s else 0
        hi = int(hi_s) if hi_s else (num_layers if num_layers is not None else 10**9)
    except ValueError:
        raise PlanError(f"layer range '{spec}' is not START:END (e.g. 3:29)") from None
    if lo < 0 or hi <= lo or (num_layers is not None and hi > num_layers):
        top = f" (the model has layers 0..{num_layers - 1})" if num_layers is not None else ""
        raise PlanError(f"layer range '{spec}' is empty or outside the model{top}")
    return range(lo, hi)


def candidates(dg: DependencyGraph, sel: Selection) -> list[Group]:
    out = []
    for g in dg.prunable:
        if g.kind not in sel.targets:
            continue
        if sel.layers is not None and g.kind != "hidden" and (g.layer is None or g.layer not in sel.layers):
            continue
        out.append(g)
    return out


def params_after(dg: DependencyGraph, plan: Plan) -> int:
    """Exact parameter count of the model once ``plan`` is applied."""
    masks = KeepMasks(dg, plan)
    total = 0
    program = dg.program
    seen: set[str] = set()
    for ph, name in program.params.items():
        if name in seen:  # a tied parameter reached through a second placeholder
            continue
        seen.add(name)
        dims = dg.node_dims.get(ph) or []
        n = 1
        for var in dims:
            size = dg.solver.size_of(var)
            n *= int(masks.mask(var).sum()) if size is not None else 1
        total += n
    return total


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, int(math.ceil(n / multiple)) * multiple) if multiple > 1 else n


def _rounded(n: int, g: Group, sel: Selection) -> int:
    """``n`` kept units of ``g`` rounded up to ``round_to`` and the group's own ``align``; GQA query
    heads (counted per kv group) as they are."""
    return n if g.block else _round_up(n, math.lcm(sel.round_to, g.align), g.units)


def _best_first(g: Group, scores: np.ndarray) -> list[np.ndarray]:
    """``g``'s units best first: one order per kv group for GQA query heads, else one order. Sorted
    once per selection: the bisection over the removal fraction builds ~40 plans from them."""
    if g.block:
        return [b * g.block + np.argsort(-scores[b * g.block : (b + 1) * g.block], kind="stable")
                for b in range(g.units // g.block)]
    return [np.argsort(-scores, kind="stable")]


def _keep_top(g: Group, orders: list[np.ndarray], n_keep: int) -> list[int]:
    """The ``n_keep`` best units (``orders`` from :func:`_best_first`); for GQA query heads, the
    same number in every kv group."""
    if g.block:
        per = max(1, min(g.block, int(round(n_keep / len(orders)))))
        return sorted(int(i) for order in orders for i in order[:per])
    n_keep = max(1, min(g.units, n_keep))
    return np.sort(orders[0][:n_keep]).tolist()


def depth_weights(groups: list[Group], profile: float) -> dict[str, float]:
    """Each group's multiplier of the local removal fraction: ``1 + p * (1 - 2|x|)`` at its layer's
    position ``x`` in ``[-1, 1]`` across the groups' layers; 1 for groups outside the stack."""
    layers = [g.layer for g in groups if g.layer is not None]
    lo, hi = (min(layers), max(layers)) if layers else (0, 0)
    out = {}
    for g in groups:
        if g.layer is None or hi == lo or profile == 0.0:
            out[g.id] = 1.0
        else:
            x = 2.0 * (g.layer - lo) / (hi - lo) - 1.0
            out[g.id] = 1.0 + profile * (1.0 - 2.0 * abs(x))
    return out


def _plan_local(groups: list[Group], orders: dict[str, list[np.ndarray]], frac: float, sel: Selection,
                weights: dict[str, float]) -> Plan:
    keep = {}
    for g in groups:
        f = min(1.0, frac * weights[g.id])
        n = max(1, int(round(g.units * (1.0 - f))))
        n = _rounded(n, g, sel)
        keep[g.id] = _keep_top(g, orders[g.id], n)
    return Plan(keep)


def _plan_global(groups: list[Group], norm: dict[str, np.ndarray], orders: dict[str, list[np.ndarray]], t: float,
                 sel: Selection) -> Plan:
    keep = {}
    for g in groups:
        s = norm[g.id]
        n = int((s >= t).sum())
        floor = max(1, int(math.ceil(g.units * (1.0 - sel.max_group_ratio))))
        n = _rounded(max(n, floor), g, sel)
        keep[g.id] = _keep_top(g, orders[g.id], n)
    return Plan(keep)


def select(dg: DependencyGraph, scores: dict[str, np.ndarray], sel: Selection) -> Plan:
    """Turn per-unit scores into a plan removing ``sel.ratio`` of the model's parameters."""
    if not 0.0 < sel.ratio < 1.0:
        raise PlanError(f"ratio must be between 0 and 1 (exclusive), got {sel.ratio}")
    if sel.mode not in MODES:
        raise PlanError(f"unknown ranking mode '{sel.mode}'; choose local or global")
    if not -1.0 < sel.depth_profile < 1.0:
        raise PlanError(f"depth_profile must be between -1 and 1 (exclusive), got {sel.depth_profile:g}")
    if sel.depth_profile and sel.mode != "local":
        raise PlanError("depth_profile shapes local ranking; global ranking sets each layer's share from the scores")
    groups = candidates(dg, sel)
    if not groups:
        raise PlanError(
            f"nothing to prune: no prunable group of kind {', '.join(sel.targets)}"
            + (f" in layers {sel.layers.start}:{sel.layers.stop}" if sel.layers is not None else "")
        )
    total = count_params(dg.program.model)
    target = total * (1.0 - sel.ratio)

    if sel.mode == "local":
        weights = depth_weights(groups, sel.depth_profile)
        orders = {g.id: _best_first(g, np.asarray(scores[g.id])) for g in groups}
        build = lambda x: _plan_local(groups, orders, x, sel, weights)  # noqa: E731
        lo, hi = 0.0, 1.0 / min(weights.values())  # at hi every group is at its minimum
    else:
        norm = {g.id: normalize(np.asarray(scores[g.id], dtype=np.float64)) for g in groups}
        allv = np.concatenate([norm[g.id] for g in groups])
        orders = {g.id: _best_first(g, norm[g.id]) for g in groups}
        build = lambda x: _plan_global(groups, norm, orders, x, sel)  # noqa: E731
        lo, hi = float(allv.min()) - 1e-9, float(allv.max()) + 1e-9

    counted: dict[tuple[int, ...], int] = {}

    def count(plan: Plan) -> int:  # the count depends only on how many units each group keeps
        key = tuple(len(plan.keep[g.id]) for g in groups)
        if key not in counted:
            counted[key] = params_after(dg, plan)
        return counted[key]

    most = build(hi)
    if count(most) > target:
        reached = 1.0 - count(most) / total
        raise PlanError(
            f"ratio {sel.ratio:g} cannot be reached: pruning every targeted group "
            f"({', '.join(sel.targets)}) to its minimum removes {reached:.1%} of the parameters; "
            "add targets (e.g. hidden, kv_heads) or widen the layer range"
        )
    for _ in range(40):  # bisection on the monotone knob: more pruning as x grows
        mid = (lo + hi) / 2
        if count(build(mid)) > target:
            lo = mid
        else:
            hi = mid
    plan = build(hi)
    # groups that keep every unit are left out of the plan: it lists what changes
    plan.keep = {k: v for k, v in plan.keep.items() if len(v) < dg.group(k).units}
    return plan
