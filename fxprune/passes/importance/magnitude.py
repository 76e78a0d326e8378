"""Data-free importance: ``l1`` (sum |W|), ``l2`` (sum W^2) and ``random`` (a seeded baseline)."""

from __future__ import annotations

import numpy as np

from .base import ImportanceRequest, score_elementwise


def l1(req: ImportanceRequest) -> dict[str, np.ndarray]:
    return score_elementwise(req, lambda m, w: w.detach().abs())


def l2(req: ImportanceRequest) -> dict[str, np.ndarray]:
    return score_elementwise(req, lambda m, w: w.detach().float() ** 2)


def random(req: ImportanceRequest) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(req.seed)
    return {g.id: rng.random(g.units) for g in req.groups}
