"""Dimension algebra: which tensor dims must be pruned together, and how their indices line up.

Every dim of every tensor in the captured graph is a *dim variable*. Coupling rules (``rules.py``)
relate variables in three ways:

* ``unify(a, b)``: the two dims are the same channels, index for index (a residual add, the
  output dim of a Linear and the dim of its bias, ...);
* ``define_prod(v, [f1, f2, ...])``: ``v`` is the row-major product of the factors
  (a reshape that splits 576 channels into 9 heads x 64, or merges them back);
* ``define_cat(v, [p1, p2, ...])``: ``v`` is the concatenation of the parts
  (fused qkv split, ``cat``, ``chunk``, ``slice``).

Variables that are never defined in terms of others are *atoms*. A pruning unit is one index of an
atom; the index map of a parameter dim is derived by flattening its definition down to atoms.
Conflicting definitions (the same dim split as a product and as a concatenation, or an atom that
appears twice in one concatenation, as RoPE's rotate-half does with head_dim) pin the variables
involved: they are never pruned, and the reason is kept for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROD = "prod"
CAT = "cat"


@dataclass
class _Def:
    kind: str  # PROD or CAT
    parts: list[int]


@dataclass
class DimSolver:
    """Union-find over dim variables, with product / concatenation definitions."""

    parent: list[int] = field(default_factory=list)
    size: list[int | None] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)
    defs: dict[int, _Def] = field(default_factory=dict)
    pins: dict[int, str] = field(default_factory=dict)
    broadcast: set[int] = field(default_factory=set)
    # the channel factor of an interleaved dim (``x[..., ::2]``, GPT-OSS's gate / up): not heads
    strided: set[int] = field(default_factory=set)
    _coords: dict[int, dict[int, np.ndarray]] = field(default_factory=dict, repr=False)

    # -- variables -------------------------------------------------------------------------------
    def new(self, size: int | None, origin: str = "") -> int:
        """A fresh variable; ``size`` is None for symbolic (batch / sequence) dims."""
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.origin.append(origin)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:  # path compression
            self.parent[v], v = root, self.parent[v]
        return root

    def size_of(self, v: int) -> int | None:
        return self.size[self.find(v)]

    def definition(self, v: int) -> _Def | None:
        return self.defs.get(self.find(v))

    def pin(self, v: int, reason: str) -> None:
        root = self.find(v)
        self.pins.setdefault(root, reason)

    # -- relations -------------------------------------------------------------------------------
    def unify(self, a: int, b: int) -> None:
        self._coords.clear()
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.size[ra], self.size[rb]
        if sa is not None and sb is not None and sa != sb:
            reason = f"dims of different sizes coupled ({sa} vs {sb})"
            self.pin(ra, reason)
            self.pin(rb, reason)
            return
        self.parent[rb] = ra
        if sa is None:
            self.size[ra] = sb
        if rb in self.pins:
            self.pins.setdefault(ra, self.pins.pop(rb))
        if rb in self.broadcast:
            self.broadcast.add(ra)
        if rb in self.strided:
            self.strided.add(ra)
        da, db = self.defs.get(ra), self.defs.pop(rb, None)
        if db is None:
            return
        if da is None:
            self.defs[ra] = db
            return
        self._reconcile(ra, da, db)

    def define_prod(self, v: int, factors: list[int]) -> None:
        factors = [f for f in factors if self.size_of(f) != 1]
        if len(factors) == 1:
            self.unify(v, factors[0])
        elif factors:
            self._define(v, _Def(PROD, factors))

    def define_cat(self, v: int, parts: list[int]) -> None:
        parts = [p for p in parts if self.size_of(p) != 0]
        if len(parts) == 1:
            self.unify(v, parts[0])
        elif parts:
            self._define(v, _Def(CAT, parts))

    def _define(self, v: int, new: _Def) -> None:
        self._coords.clear()
        root = self.find(v)
        old = self.defs.get(root)
        if old is None:
            if self._occurs(root, new):
                self.pin(root, "dim defined in terms of itself")
                return
            self.defs[root] = new
        else:
            self._reconcile(root, old, new)

    def _occurs(self, root: int, d: _Def) -> bool:
        stack = list(d.parts)
        seen = set()
        while stack:
            r = self.find(stack.pop())
            if r == root:
                return True
            if r in seen:
                continue
            seen.add(r)
            sub = self.defs.get(r)
            if sub:
                stack.extend(sub.parts)
        return False

    def _reconcile(self, root: int, a: _Def, b: _Def) -> None:
        """Two definitions of one variable: line their pieces up, or pin on a conflict."""
        self.defs[root] = a
        if a.kind != b.kind:
            self._pin_def(root, a, "dim both split into heads and sliced/concatenated")
            self._pin_def(root, b, "dim both split into heads and sliced/concatenated")
            return
        la, lb = list(a.parts), list(b.parts)
        sizes_a = [self.size_of(p) for p in la]
        sizes_b = [self.size_of(p) for p in lb]
        if None in sizes_a or None in sizes_b:
            self._pin_def(root, a, "symbolic size inside a split")
            self._pin_def(root, b, "symbolic size inside a split")
            return
        if a.kind == PROD:
            self._align(la, lb, lambda big, small: self._split_prod(big, small), root)
        else:
            self._align(la, lb, lambda big, small: self._split_cat(big, small), root)

    def _align(self, la: list[int], lb: list[int], split, root: int) -> None:
        i = j = 0
        la, lb = list(la), list(lb)
        while i < len(la) and j < len(lb):
            sa, sb = self.size_of(la[i]), self.size_of(lb[j])
            if sa == sb:
                self.unify(la[i], lb[j])
                i += 1
                j += 1
                continue
            big_list, bi, small = (la, i, sb) if sa > sb else (lb, j, sa)
            pieces = split(big_list[bi], small)
            if pieces is None:
                self.pin(root, "incompatible splits of one dim")
                for v in la + lb:
                    self.pin(v, "incompatible splits of one dim")
                return
            big_list[bi : bi + 1] = pieces
        if i != len(la) or j != len(lb):
            self.pin(root, "incompatible splits of one dim")

    def _split_prod(self, v: int, leading: int) -> list[int] | None:
        """Express ``v`` as ``leading x rest`` (row-major), reusing its definition when it has one."""
        size = self.size_of(v)
        if size is None or size % leading:
            return None
        d = self.definition(v)
        if d is not None and d.kind == PROD:
            return list(d.parts)
        if d is not None:
            return None
        head, rest = self.new(leading, "split"), self.new(size // leading, "split")
        self.defs[self.find(v)] = _Def(PROD, [head, rest])
        return [head, rest]

    def _split_cat(self, v: int, first: int) -> list[int] | None:
        size = self.size_of(v)
        if size is None:
            return None
        d = self.definition(v)
        if d is not None and d.kind == CAT:
            return list(d.parts)
        if d is not None:
            return None
        a, b = self.new(first, "slice"), self.new(size - first, "slice")
        self.defs[self.find(v)] = _Def(CAT, [a, b])
        return [a, b]

    def _pin_def(self, root: int, d: _Def, reason: str) -> None:
        self.pin(root, reason)
        for p in d.parts:
            self.pin(p, reason)

    # -- results ---------------------------------------------------------------------------------
    def atoms_of(self, v: int) -> list[int]:
        """Atoms (roots without definition) under ``v``, in order, with repetition."""
        root = self.find(v)
        d = self.defs.get(root)
        if d is None:
            return [root]
        out: list[int] = []
        for p in d.parts:
            out.extend(self.atoms_of(p))
        return out

    def pinned_atoms(self) -> dict[int, str]:
        """Every atom that may not be pruned, with the first reason found."""
        pinned: dict[int, str] = {}
        for root, reason in self.pins.items():
            for atom in self.atoms_of(root):
                pinned.setdefault(atom, reason)
        return pinned

    def coords(self, v: int) -> dict[int, np.ndarray]:
        """For each atom under ``v``: the atom index of every element of ``v`` (-1 where absent).

        This is the index map: element ``e`` of the dim belongs to unit ``coords[atom][e]``.
        """
        root = self.find(v)
        if root in self._coords:
            return self._coords[root]
        self._coords[root] = out = self._compute_coords(root)
        return out

    def _compute_coords(self, root: int) -> dict[int, np.ndarray]:
        size = self.size[root]
        d = self.defs.get(root)
        if d is None:
            return {root: np.arange(size if size is not None else 0)}
        subs = [self.coords(p) for p in d.parts]
        sizes = [self.size_of(p) for p in d.parts]
        out: dict[int, np.ndarray] = {}
        if d.kind == PROD:
            total = int(np.prod(sizes))
            inner = total
            outer = 1
            for sub, s in zip(subs, sizes):
                inner //= s
                for atom, arr in sub.items():
                    tiled = np.tile(np.repeat(arr, inner), outer)
                    if atom in out:  # same atom twice in a product: keep the first use
                        continue
                    out[atom] = tiled
                outer *= s
        else:
            total = int(sum(sizes))
            offset = 0
            for sub, s in zip(subs, sizes):
                for atom, arr in sub.items():
                    full = out.setdefault(atom, np.full(total, -1, dtype=np.int64))
                    full[offset : offset + s] = arr
                offset += s
        return out

    def lead_atoms(self, v: int) -> set[int]:
        """Atoms in a non-trailing factor of a product under ``v`` (heads in heads x head_dim)."""
        root = self.find(v)
        d = self.defs.get(root)
        if d is None:
            return set()
        out: set[int] = set()
        if d.kind == PROD:
            for p in d.parts[:-1]:
                if self.find(p) not in self.strided:
                    out.update(self.atoms_of(p))
        for p in d.parts:
            out |= self.lead_atoms(p)
        return out

    def halves_atoms(self, v: int) -> set[int]:
        """Atoms concatenated with themselves, ``cat(x, x)``: RoPE's rotate-half on head_dim."""
        root = self.find(v)
        d = self.defs.get(root)
        if d is None:
            return set()
        out: set[int] = set()
        if d.kind == CAT:
            parts = [self.find(p) for p in d.parts]
            out.update(p for p in parts if parts.count(p) > 1 and p not in self.defs)
        for p in d.parts:
            out |= self.halves_atoms(p)
        return out

    def inner_atoms(self, v: int) -> set[int]:
        """Atoms that are the trailing factor of a product under ``v`` (head_dim in heads x head_dim)."""
        root = self.find(v)
        d = self.defs.get(root)
        if d is None:
            return set()
        out: set[int] = set()
        if d.kind == PROD:  # a broadcast factor (GQA's query heads per kv head) is not head_dim
            out.update(a for a in self.atoms_of(d.parts[-1]) if a not in self.broadcast)
        for p in d.parts:
            out |= self.inner_atoms(p)
        return out
