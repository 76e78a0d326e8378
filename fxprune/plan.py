"""The pruning plan: for each group, the unit indices kept. Serializable, validated, replayable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .depgraph import DependencyGraph, Group
from .errors import PlanError

PLAN_VERSION = 1


@dataclass
class Plan:
    """``keep[group_id]`` = sorted unit indices kept; groups not listed are kept whole."""

    keep: dict[str, list[int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # importance, ratio, targets... for the record

    @classmethod
    def keep_all(cls, dg: DependencyGraph) -> "Plan":
        return cls({g.id: list(range(g.units)) for g in dg.prunable})

    def pruned_groups(self, dg: DependencyGraph) -> list[tuple[Group, list[int]]]:
        """(group, kept units) for every group this plan shrinks."""
        out = []
        for gid, kept in self.keep.items():
            g = dg.group(gid)
            if len(kept) < g.units:
                out.append((g, kept))
        return out

    def validate(self, dg: DependencyGraph) -> None:
        """Raise :class:`PlanError` naming the first group the plan cannot apply to."""
        ids = {g.id for g in dg.groups}
        for gid, kept in self.keep.items():
            if gid not in ids:
                raise PlanError(f"plan names group '{gid}', which this model does not have")
            g = dg.group(gid)
            if not g.prunable and len(kept) != g.units:
                raise PlanError(f"plan prunes group '{gid}', which is pinned: {g.reason}")
            if not kept:
                raise PlanError(f"plan keeps no unit of group '{gid}'; keep at least one")
            if len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= g.units:
                raise PlanError(f"plan for group '{gid}' has duplicate or out-of-range units (0..{g.units - 1})")
            if g.block:
                counts = {}
                for u in kept:
                    counts[u // g.block] = counts.get(u // g.block, 0) + 1
                if len(set(counts.values())) > 1 or len(counts) != g.units // g.block:
                    raise PlanError(
                        f"plan for group '{gid}' keeps different numbers of query heads per kv head; "
                        "GQA needs the same count in every kv group"
                    )

    def to_json(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "meta": self.meta,
                "keep": {k: sorted(int(u) for u in v) for k, v in self.keep.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION or "keep" not in data:
            raise PlanError(f"not an fxprune plan (version {PLAN_VERSION} with a 'keep' table)")
        return cls({k: [int(u) for u in v] for k, v in data["keep"].items()}, dict(data.get("meta", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
