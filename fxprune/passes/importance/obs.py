"""OBS selection (``obs``): remove the units whose loss the refit of their consumer absorbs best.

Taylor and magnitude rank units by what they contribute *as they are*. But fxprune refits the layer
that reads the pruned channels (:mod:`fxprune.passes.reconstruct`): a unit whose output the other
units can re-express is cheap to remove even when it is large. This pass ranks with that refit in
view, as the structured optimal-brain-surgeon methods do (ZipLM, SlimGPT): for a consumer
``y = W x`` (``down_proj`` for MLP channels, ``o_proj`` for heads) with calibration inputs ``X'`` of
the pruned-so-far model and dense target ``Y = X W^T``, the refit of the kept columns ``K`` is

    A_K = C_K G_KK^-1,   G = X'^T X' + lam I,   C = Y^T X' + lam W       (ridge towards W)

and removing the units ``R`` from ``K`` raises the damped error by
``tr(A_R Hinv_RR^-1 A_R^T) - lam ||W_R||^2`` with ``Hinv = G_KK^-1`` (the second term: a removed
column no longer pays the ridge). Units are removed greedily, a few at a time (lowest cost first), and after
each removal ``A`` and ``Hinv`` are downdated exactly (block Schur complement), so correlated units
are not all removed together. This is the same objective and damping the reconstruct pass solves
for the kept set, so ``obs`` always runs with ``reconstruct``; like it, a residual writer's target
also includes the residual stream's drift (``C += (h - h_p)^T X'``, :mod:`fxprune.passes.residual`).
The refit the greedy ends with is left in ``req.by_products["refit"]``, and :func:`fxprune.prune`
writes it instead of solving it again (:func:`fxprune.passes.reconstruct.apply_refits`; SmolLM2 at
20% on 10 windows: 66.6 s -> 40.8 s, held-out perplexity 65.99 -> 65.93).

Layers are taken in execution order on a working copy of the model: each consumer's removed columns
are zeroed and its kept ones refit before the next layer's inputs are measured, as SparseGPT does.
The greedy needs to know how many units each group keeps: :func:`fxprune.prune` passes the counts
of local ranking in ``req.keep`` (global ranking has no per-group count to aim at and is refused).

Scores: the ``i``-th unit removed scores ``i``; kept units score above every removed one, ranked by
their final removal cost, so the selection's lowest-scored units are exactly the greedy's choice.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...data import stack_windows
from ...depgraph import Group
from ...errors import FxpruneError
from .base import INPUT_DIM, ImportanceRequest

STEPS = 64  # greedy rounds per group: units removed per round = ceil(to_remove / STEPS)
LOOP_DTYPE = torch.float64  # of the greedy removal loop (float32: 5% faster, 98% of the same choices)


@dataclass
class _Consumer:
    group: Group
    path: str  # the Linear reading the group's channels
    unit_of: np.ndarray  # its input column -> unit (-1: not in the group)
    keep: int  # units the group keeps
    order: int  # graph position of its first use: consumers are chosen in execution order


def obs_importance(req: ImportanceRequest) -> dict[str, np.ndarray]:
    """Greedy OBS removal order per group, sequential over layers (see the module docstring)."""
    from ..reconstruct import (Refit, _collect, _dense_inputs, _flat_input, _Stop, _Target,  # no import cycle
                               moments, one_pass_rows, run_until_stopped)
    from ..lockstep import DenseStepper
    from ..residual import StreamRecorder, check_taps, drift_terms, find_taps

    if req.keep is None:
        raise FxpruneError("importance 'obs' ranks within each group: use local ranking (--mode local)")
    if not req.batches:
        raise FxpruneError("importance 'obs' needs calibration text (--calib FILE)")
    consumers = sorted((_consumer(req, g) for g in req.groups), key=lambda c: c.order)
    taps = find_taps(req.model, [c.path for c in consumers]) if req.residual_correction else {}
    widths = [(c.path, 1) for c in consumers] + [(c.path, 0) for c in consumers if c.path in taps]
    batches = stack_windows(req.batches, one_pass_rows(req.model, widths, req.batches))
    taps, tap_notes = check_taps(req.model, taps, batches[0])
    work = copy.deepcopy(req.model).eval()
    scores: dict[str, np.ndarray] = {}
    refits: dict[str, Refit] = {}
    req.by_products.update(refit=refits, refit_notes=tap_notes, residual_corrected=len(taps))

    def choose(c: _Consumer, stats: dict[str, torch.Tensor]) -> None:
        mod = work.get_submodule(c.path)
        scores[c.group.id], alive = _greedy(mod, req.model.get_submodule(c.path), c, stats, req.damp)
        bias = getattr(mod, "bias", None)
        kept_in = np.nonzero((c.unit_of < 0) | alive[np.maximum(c.unit_of, 0)])[0]  # columns outside the group stay
        refits[c.path] = Refit(mod.weight.detach(), None if bias is None else bias.detach(), kept_in)
        if req.progress is not None:
            req.progress("obs", len(scores))

    if len(batches) > 1:  # measure layer by layer: the work copy runs up to each consumer
        dense_in, dense_streams = _dense_inputs(req.model, consumers, batches, taps)
        for c in consumers:
            n_in = req.model.get_submodule(c.path).weight.shape[1]
            choose(c, _collect(work, _Target(c.path, 1, np.arange(n_in), None), dense_in.pop(c.path), batches,
                               dense_streams.pop(c.path, None), taps, need_dense=False))
        return scores

    streams = StreamRecorder(work, taps)
    dense = DenseStepper(req.model, [c.path for c in consumers], taps, batches[0])  # one layer's inputs at a time

    def hook_for(c: _Consumer):
        def hook(_mod: nn.Module, args: tuple) -> None:
            if c.group.id not in scores:  # a shared module is chosen on its first call
                xp = _flat_input(args[0])
                x, h = dense.inputs(c.path)
                stats = moments(x.to(xp.dtype), xp, dense=False)
                del x
                if h is not None:
                    stats.update(drift_terms(h, streams.take(c.path), xp))
                choose(c, stats)
                if len(scores) == len(consumers):
                    raise _Stop  # the rest of the forward (an LM head's logits) is not needed
        return hook

    handles = [work.get_submodule(c.path).register_forward_pre_hook(hook_for(c)) for c in consumers]
    try:
        with torch.no_grad():
            run_until_stopped(work, batches[0])
    finally:
        for h in handles:
            h.remove()
        streams.close()
        dense.close()
    missing = [c.path for c in consumers if c.group.id not in scores]
    if missing:
        raise FxpruneError(f"importance 'obs': {missing[0]} was not called by the model's forward")
    return scores


def _consumer(req: ImportanceRequest, g: Group) -> _Consumer:
    """The one Linear of ``g`` whose *input* dim holds the group's units."""
    found = []
    for m in g.members:
        if m.is_buffer or not m.param.endswith(".weight") or "." not in m.param:
            continue
        path = m.param[: -len(".weight")]
        mod = req.model.get_submodule(path)
        if INPUT_DIM.get(type(mod).__name__) == m.dim == 1 and mod.weight.dim() == 2:
            found.append(_Consumer(g, path, m.unit_of, req.keep.get(g.id, g.units), m.order))
    if len(found) != 1:
        raise FxpruneError(f"importance 'obs' needs exactly one Linear reading the channels of group {g.id} "
                           f"({g.kind}); it has {len(found)}. Use another importance for these targets")
    return found[0]


def _greedy(mod: nn.Module, dense_mod: nn.Module, c: _Consumer, stats: dict[str, torch.Tensor],
            damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``c``'s removed units from the input moments (dense ``x``, pruned-so-far ``x'``); write the
    refit into ``mod`` (removed columns zeroed) so later layers see the pruned model; return the scores
    and which units it kept (a bool per unit)."""
    g = c.group
    w = dense_mod.weight.detach().double()  # (out, in)
    n_in = w.shape[1]
    bias = getattr(mod, "bias", None)
    gram, cross = stats["gram"].clone(), stats["xx"]
    lam = damp * float(torch.diagonal(gram).mean()) or damp
    gram += lam * torch.eye(n_in, dtype=gram.dtype)
    c_mat = w @ cross + lam * w
    if "drift" in stats:  # aim at the dense residual stream (passes.residual)
        c_mat = c_mat + stats["drift"]
    if bias is not None:  # an undamped intercept column, never removed
        sxp, n = stats["sxp"][:, None], stats["n"].reshape(1, 1)
        gram = torch.cat([torch.cat([gram, sxp], 1), torch.cat([sxp.T, n], 1)], 0)
        intercept = w @ stats["sx"][:, None]
        if "drift_1" in stats:
            intercept = intercept + stats["drift_1"][:, None]
        c_mat = torch.cat([c_mat, intercept], 1)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    # the greedy's downdates run in LOOP_DTYPE; the refit it ends with is the one prune() writes
    a = (c_mat @ hinv).to(LOOP_DTYPE)
    hinv = hinv.to(LOOP_DTYPE)

    cols = [np.nonzero(c.unit_of == u)[0] for u in range(g.units)]
    width = {len(cs) for cs in cols}
    if len(width) != 1 or 0 in width:
        raise FxpruneError(f"importance 'obs': units of group {g.id} span unequal column counts in {c.path}")
    per_unit = torch.as_tensor(np.stack(cols))  # (units, columns per unit)
    blocks = g.units // g.block if g.block else 1
    size = g.units // blocks
    # ridge pulls the kept columns towards W; a removed column leaves that term, so its cost is the
    # augmented system's OBS cost less lam * ||W_u||^2 (else damping would rank by weight norm)
    prior = lam * (w[:, per_unit] ** 2).sum((0, 2)).to(LOOP_DTYPE)
    quota = [size - (c.keep // blocks)] * blocks  # units to remove from each (GQA) block
    alive = np.ones(g.units, dtype=bool)
    scores = np.zeros(g.units)
    order = 0
    chunk = max(1, math.ceil(sum(quota) / STEPS))
    while sum(quota) > 0:
        cost = _costs(a, hinv, per_unit) - prior.numpy()
        pick: list[int] = []
        for u in np.argsort(cost, kind="stable"):
            b = int(u) // size
            if alive[u] and quota[b] > 0 and len(pick) < chunk:
                pick.append(int(u))
                quota[b] -= 1
        r = per_unit[pick].reshape(-1)
        m = torch.linalg.solve(hinv[r][:, r], hinv[r, :])
        a.addmm_(a[:, r], m, alpha=-1.0)  # in place: the indexed factors are copies
        hinv.addmm_(hinv[:, r], m, alpha=-1.0)
        a[:, r] = 0.0
        hinv[r, :] = 0.0
        hinv[:, r] = 0.0
        for u in pick:
            alive[u] = False
            scores[u] = order
            order += 1
    final = _costs(a, hinv, per_unit) - prior.numpy()
    kept = np.nonzero(alive)[0]
    ranks = np.argsort(np.argsort(final[kept], kind="stable"), kind="stable")
    scores[kept] = order + 1 + ranks
    with torch.no_grad():
        mod.weight.copy_(a[:, :n_in].to(mod.weight.dtype))
        if bias is not None:
            bias.add_(a[:, n_in].to(bias.dtype))
    return scores, alive


def _costs(a: torch.Tensor, hinv: torch.Tensor, per_unit: torch.Tensor) -> np.ndarray:
    """Error increase of removing each unit alone: ``tr(A_u Hinv_uu^-1 A_u^T)`` (inf once removed)."""
    d = torch.diagonal(hinv)[per_unit]  # (units, cols)
    if per_unit.shape[1] == 1:
        cost = (a * a).sum(0)[per_unit[:, 0]] / d[:, 0]  # all columns, then pick: 3x faster than indexing first
    else:
        blocks = hinv[per_unit[:, :, None], per_unit[:, None, :]]  # (units, c, c)
        au = a[:, per_unit].permute(1, 0, 2)  # (units, out, c)
        dead = d.abs().sum(1) == 0
        blocks[dead] = torch.eye(per_unit.shape[1], dtype=hinv.dtype)
        sol = torch.linalg.solve(blocks, au.transpose(1, 2))  # (units, c, out)
        cost = (au.transpose(1, 2) * sol).sum((1, 2))
        cost[dead] = float("inf")
    cost = torch.where(d[:, 0] == 0, torch.full_like(cost, float("inf")), cost)
    return cost.numpy()
