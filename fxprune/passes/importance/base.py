"""Shared pieces of the importance passes: per-unit reduction, group aggregation, normalisation.

An importance pass produces, for every group it is asked about, one score per unit
(``dict[group_id, np.ndarray]``). Most passes compute a per-element importance tensor for each
member parameter (``|W|``, ``|W * grad|``...) and hand it to :func:`unit_scores`, which sums it
into units through the member's index map, then :func:`aggregate` combines the members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ...depgraph import DependencyGraph, Group, Member
from ...errors import FxpruneError

AGGREGATES = ("sum", "mean", "max", "prod", "last")
# Linear-like module class name -> the weight dim that holds input features (the other holds outputs)
INPUT_DIM: dict[str, int] = {"Linear": 1, "Conv1D": 0}


@dataclass
class ImportanceRequest:
    """What an importance pass gets: the model, its groups, and (for gradient passes) data."""

    model: nn.Module
    dg: DependencyGraph
    groups: list[Group]
    batches: list[torch.Tensor] = field(default_factory=list)  # token ids, each (n, seqlen)
    aggregate: str = "sum"
    seed: int = 0
    lora_rank: int = 8
    progress: Callable[[str, int], None] | None = None
    keep: dict[str, int] | None = None  # units each group will keep (local ranking), for passes that select
    damp: float = 1.0  # reconstruct's relative ridge damping, for passes that rank with the refit in view
    precision: str = "float32"  # gradient passes' forward/backward: "float32" or "bfloat16" (bf16 weights + autocast)
    residual_correction: bool = True  # refit residual writers against the dense stream (passes.residual)
    # what a pass computed that a later stage can reuse, by name; obs leaves "refit" (a Refit per
    # consumer path) and "refit_notes" so the reconstruct pass need not solve the same refit again
    by_products: dict[str, Any] = field(default_factory=dict)


def param(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer of ``model`` by its full name."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def unit_scores(member: Member, element_scores: torch.Tensor, units: int) -> np.ndarray:
    """Sum a per-element score tensor (shaped like the member's parameter) into one value per unit."""
    t = element_scores.detach().float()
    other = [d for d in range(t.dim()) if d != member.dim]
    per_index = t.sum(dim=other) if other else t
    idx = torch.as_tensor(member.unit_of)
    inside = idx >= 0
    out = torch.zeros(units, dtype=torch.float64)
    out.index_add_(0, idx[inside], per_index[inside].double())
    return out.numpy()


def aggregate(group: Group, per_member: list[np.ndarray], how: str) -> np.ndarray:
    """Combine member scores: sum / mean / max / prod, or the last-executing member alone."""
    if how not in AGGREGATES:
        raise FxpruneError(f"unknown aggregate '{how}'; choose one of {', '.join(AGGREGATES)}")
    stack = np.stack(per_member)
    if how == "sum":
        return stack.sum(0)
    if how == "mean":
        return stack.mean(0)
    if how == "max":
        return stack.max(0)
    if how == "prod":
        return np.prod(stack, axis=0)
    last = max(range(len(group.members)), key=lambda i: group.members[i].order)
    return stack[last]


def normalize(scores: np.ndarray) -> np.ndarray:
    """Per-group normalisation (divide by the mean) so groups compare like with like."""
    mean = float(np.abs(scores).mean()) if scores.size else 0.0
    return scores / mean if mean > 0 else scores


def score_elementwise(req: ImportanceRequest, element_fn: Callable[[Member, torch.Tensor], torch.Tensor]) -> dict[str, np.ndarray]:
    """Score groups from a per-element function of each member's weight tensor."""
    out: dict[str, np.ndarray] = {}
    for g in req.groups:
        per_member = []
        for m in g.members:
            if m.is_buffer:
                continue
            w = param(req.model, m.param)
            per_member.append(unit_scores(m, element_fn(m, w), g.units))
        out[g.id] = aggregate(g, per_member, req.aggregate)
    return out
