"""Importance passes: each maps an :class:`ImportanceRequest` to one score per group unit.

``IMPORTANCES`` is the table the CLI and :func:`fxprune.prune` look names up in; passes that need
calibration data are listed in ``NEEDS_DATA``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import FxpruneError
from .base import AGGREGATES, ImportanceRequest, aggregate, normalize, unit_scores
from .lora import lora_importance
from .magnitude import l1, l2, random
from .obs import obs_importance
from .taylor import taylor_element1, taylor_element2, taylor_mix, taylor_vector

ImportanceFn = Callable[[ImportanceRequest], "dict[str, np.ndarray]"]

IMPORTANCES: dict[str, ImportanceFn] = {
    "l1": l1, "l2": l2, "random": random,
    "taylor-vector": taylor_vector, "taylor-element1": taylor_element1,
    "taylor-element2": taylor_element2, "taylor-mix": taylor_mix, "lora": lora_importance,
    "obs": obs_importance,
}
NEEDS_DATA: set[str] = {"taylor-vector", "taylor-element1", "taylor-element2", "taylor-mix", "lora", "obs"}
# passes that choose the removed units themselves: they need the kept counts and the refit
SELECTS: set[str] = {"obs"}


def get_importance(name: str) -> ImportanceFn:
    """The importance pass called ``name``, or a clear error listing the known ones."""
    try:
        return IMPORTANCES[name]
    except KeyError:
        raise FxpruneError(
            f"unknown importance '{name}'; choose one of {', '.join(sorted(IMPORTANCES))}"
        ) from None


__all__ = ["AGGREGATES", "IMPORTANCES", "NEEDS_DATA", "SELECTS", "ImportanceRequest", "aggregate",
           "get_importance", "normalize", "unit_scores"]
