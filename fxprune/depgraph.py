"""Dependency graph and groups: which parameter slices must be pruned together.

:func:`dependency_graph` runs the coupling rules (``rules.py``) over a captured :class:`Program`.
Every coupling is an edge between two tensor dims in a ``networkx`` graph (``DependencyGraph.nx``),
so a dim whose only producer or consumer is another dim depends on it, as in LLM-Pruner's
in/out-degree rule; the connected sets, refined by the dim algebra of ``dims.py`` (head splits,
fused-projection slices), are the groups. A group's *unit* is one index of an atom: one MLP
channel, one attention head (``head_dim`` rows), one kv head with its query heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import nn

from .capture import Program
from .dims import DimSolver
from .rules import Ctx, rule_for

KINDS = ("heads", "kv_heads", "mlp", "rank", "hidden", "other")
PRUNABLE_KINDS = tuple(k for k in KINDS if k != "other")  # what targets may name
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoder_layers|decoder_layers)\.(\d+)(?:\.|$)")


@dataclass
class Member:
    """One parameter (or buffer) dim in a group, and which unit each of its indices belongs to."""

    module: str
    param: str  # full name, e.g. model.layers.0.mlp.up_proj.weight
    dim: int
    unit_of: np.ndarray  # unit_of[i] = unit index of element i of this dim, or -1 if outside the group
    aliases: list[str] = field(default_factory=list)  # other names of a tied parameter
    is_buffer: bool = False
    order: int = 0  # position in the graph of the first op that reads it (for "last" aggregation)

    def indices(self, unit: int) -> np.ndarray:
        return np.nonzero(self.unit_of == unit)[0]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"module": self.module, "param": self.param, "dim": self.dim}
        if self.aliases:
            out["aliases"] = self.aliases
        return out


@dataclass
class Group:
    """Structures that are pruned together, unit by unit."""

    id: str
    kind: str
    layer: int | None
    units: int
    unit_size: int
    members: list[Member]
    atoms: tuple[int, ...]
    prunable: bool = True
    reason: str = ""
    block: int = 0  # GQA query-head groups: units per kv head (keep the same count in each)
    head_dim: int = 0  # heads / kv_heads: channels of one head in q (fused qkv holds 3 per unit)
    inexact: bool = False  # removal is not the same as zero-masking (normalisation over the dim)
    align: int = 1  # kept units a multiple of this (torch's grouped MoE matmul needs 16-byte rows)

    @property
    def params(self) -> int:
        """Parameter elements this group spans (shared dims counted once per member)."""
        return int(sum((m.unit_of >= 0).sum() for m in self.members))

    def to_json(self) -> dict[str, Any]:
        out = {
            "id": self.id, "kind": self.kind, "layer": self.layer, "units": self.units,
            "unit_size": self.unit_size, "prunable": self.prunable, "reason": self.reason or None,
            "members": [m.to_json() for m in self.members],
        }
        if self.block:
            out["units_per_kv_head"] = self.block
        return out


@dataclass
class DependencyGraph:
    """The coupling graph (``nx``) and the groups found in it."""

    program: Program
    solver: DimSolver
    groups: list[Group]
    nx: nx.Graph
    node_dims: dict[str, Any]  # FX node name -> dim variables of its value
    unknown_ops: list[str]

    def group(self, gid: str) -> Group:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)

    def by_kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def to_json(self, model_name: str = "") -> dict[str, Any]:
        return {
            "model": model_name,
            "params": count_params(self.program.model),
            "groups": [g.to_json() for g in self.groups],
            "unknown_ops": self.unknown_ops,
        }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_of(path: str) -> int | None:
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def stack_of(path: str) -> str | None:
    """The layer stack a module path is in: the last name before its layer index (``encoder`` for
    ``model.encoder.layers.3.fc1``, ``model`` for ``model.layers.3.mlp``), None outside any layer."""
    m = _LAYER_RE.search(path)
    if not m:
        return None
    return path[: m.start()].rsplit(".", 1)[-1]


def layer_sort_key(label: str) -> tuple[int, str, int]:
    """Report layer labels in order: "model" first, then by stack and index ("decoder.2", "11")."""
    if label == "model":
        return (0, "", -1)
    stack, _, index = label.rpartition(".")
    return (1, stack, int(index) if index.isdigit() else -1)


def _head_dim(members: list[Member], units: int) -> int:
    """Channels of one unit in its narrowest projection (q for GQA heads). A one-per-head member
    (MPNet's relative position bias, an embedding with a column per head) is not a projection."""
    widths = [int((m.unit_of >= 0).sum()) // units for m in members if not m.is_buffer]
    return min([w for w in widths if w > 1] or widths or [0])


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def dependency_graph(program: Program) -> DependencyGraph:
    """Run the coupling rules over ``program`` and form the pruning groups."""
    solver = DimSolver()
    ctx = Ctx(solver, prefix="m.")
    sig = program.exported.graph_signature
    constants = set(sig.inputs_to_lifted_tensor_constants)
    labels: dict[int, str] = {}
    param_dims: list[tuple[str, int, int, bool]] = []  # (name, dim, var, is_buffer)
    first_use: dict[str, int] = {}
    seen: dict[str, list[int]] = {}  # canonical parameter name -> its dim variables

    for node in program.graph.nodes:
        if node.op == "placeholder":
            dims = ctx.fresh(node)
            ctx.dims[node] = dims
            if node.name in program.params or node.name in program.buffers:
                is_buf = node.name in program.buffers
                name = program.buffers[node.name] if is_buf else program.params[node.name]
                if name in seen:  # a tied parameter under a second placeholder: same channels
                    for a, b in zip(seen[name], dims or []):
                        solver.unify(a, b)
                    continue
                seen[name] = dims or []
                for i, v in enumerate(dims or []):
                    param_dims.append((name, i, v, is_buf))
                    labels.setdefault(v, f"{name}:{i}")
                continue
            reason = "a lifted constant" if node.name in constants else f"model input '{node.name}'"
            for v in dims or []:
                solver.pin(v, reason)
        elif node.op == "call_function":
            rule_for(node)(ctx, node)
            val = node.meta.get("val")
            if not node.users and isinstance(val, torch.Tensor) and val.is_floating_point():
                # computed but not returned (BERT's pooler when last_hidden_state is the output);
                # unused indices (max along a dim) carry no channel values
                for v in _flat(ctx.dims.get(node)):
                    solver.pin(v, "result not part of the captured outputs")
            for a in node.all_input_nodes:
                name = program.params.get(a.name) or program.buffers.get(a.name)
                if name:
                    first_use.setdefault(name, len(first_use))
        elif node.op == "output":
            for out in node.all_input_nodes:
                for v in _flat(ctx.dims.get(out)):
                    solver.pin(v, "model output")
            continue
        else:
            ctx.dims[node] = ctx.fresh(node)
            ctx.pin_node(node, f"{node.op} node {node.name}")
        for i, v in enumerate(ctx.dims.get(node) or []):
            if isinstance(v, int):
                labels.setdefault(v, f"{node.name}:{i}")

    graph = nx.Graph()
    for v, label in labels.items():
        graph.add_node(label, kind="param" if ":" in label and "." in label.split(":")[0] else "tensor")
    for a, b, op, where in ctx.edges:
        la, lb = labels.get(a), labels.get(b)
        if la and lb and la != lb:
            graph.add_edge(la, lb, op=op, node=where)

    groups = _form_groups(program, solver, param_dims, ctx)
    for g in groups:
        for m in g.members:
            m.order = first_use.get(m.param, -1)
    for g in groups:
        for m in g.members:
            label = f"{m.param}:{m.dim}"
            if label in graph:
                prev = graph.nodes[label].get("groups", "")
                graph.nodes[label]["groups"] = f"{prev},{g.id}" if prev else g.id
    node_dims = {n.name: ctx.dims.get(n) for n in program.graph.nodes}
    # report unknown ops only where they pinned channels some parameter has (not mask building)
    param_atoms = {a for g in groups for a in g.atoms}
    for _, _, var, is_buf in param_dims:
        if not is_buf:
            param_atoms.update(solver.atoms_of(var))
    unknown = [where for where, dims in ctx.unknown
               if any(a in param_atoms for v in dims for a in solver.atoms_of(v))]
    return DependencyGraph(program, solver, groups, graph, node_dims, list(dict.fromkeys(unknown)))


def _flat(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [v for y in x for v in _flat(y)]


def _mark_ranks(groups: list[Group]) -> None:
    """A layer-local group that feeds a module holding attention heads is a low-rank bottleneck
    of the attention (DeepSeek's MLA: q_a_proj -> q_a_layernorm -> q_b_proj), not an MLP: kind
    ``rank``, pruned only when asked for by name."""
    head_modules = {m.module for g in groups if g.kind in ("heads", "kv_heads") for m in g.members}
    for g in groups:
        if g.kind == "mlp" and any(m.module in head_modules for m in g.members if not m.is_buffer):
            g.kind, g.id = "rank", "rank" + g.id[len("mlp"):]


def _form_groups(program: Program, solver: DimSolver, param_dims, ctx: Ctx) -> list[Group]:
    pinned = solver.pinned_atoms()
    inexact_atoms = set()
    for v in ctx.inexact:
        inexact_atoms.update(solver.atoms_of(int(v)))
    align_of: dict[int, int] = {}
    for v, n in ctx.align.items():
        for a in solver.atoms_of(int(v)):
            align_of[a] = max(align_of.get(a, 1), n)
    # atom -> [(name, dim, coords, order of atoms in that dim, is_buffer)]
    uses: dict[int, list[tuple[str, int, dict[int, np.ndarray], list[int], bool]]] = {}
    for name, dim, var, is_buf in param_dims:
        atoms = solver.atoms_of(var)
        coords = solver.coords(var)
        for a in dict.fromkeys(atoms):
            uses.setdefault(a, []).append((name, dim, coords, atoms, is_buf))

    def size(a: int) -> int:
        return solver.size_of(a) or 0

    # GQA: a broadcast atom (query heads per kv head) that follows a kv-head atom.
    kv_of: dict[int, int] = {}
    for a in uses:
        if solver.find(a) not in solver.broadcast:
            continue
        for _, _, _, atoms, _ in uses[a]:
            i = atoms.index(a)
            if i > 0:
                kv_of[a] = atoms[i - 1]
                break
    kv_atoms = set(kv_of.values())
    inner: set[int] = set()
    lead: set[int] = set()
    for _, _, var, _ in param_dims:
        inner |= solver.inner_atoms(var)
        lead |= solver.lead_atoms(var)
        # cat(x, x) on head_dim is RoPE's rotate-half (on gate_up it is just a fused projection)
        for a in solver.halves_atoms(var) & solver.inner_atoms(var):
            pinned.setdefault(a, "head_dim under RoPE (rotate-half pairs channel i with i + d/2)")

    groups: list[Group] = []
    for a, members in uses.items():
        if size(a) <= 1 or not any(not m[4] for m in members):
            continue
        if a in kv_of:  # query heads inside kv groups: one compound unit space
            kv = kv_of[a]
            spec = (kv, a)
            members = [m for m in members if kv in m[2]]
            units, block = size(kv) * size(a), size(a)
        else:
            spec, units, block = (a,), size(a), 0
        built = []
        for name, dim, coords, atoms, is_buf in members:
            if len(spec) == 2:
                ck, ce = coords[spec[0]], coords[spec[1]]
                unit_of = np.where((ck >= 0) & (ce >= 0), ck * block + ce, -1)
            else:
                unit_of = coords[a]
            aliases = [n for n in program.aliases.get(name, []) if n != name]
            built.append(Member(_owner(name), name, dim, unit_of.astype(np.int64), aliases, is_buf))
        built.sort(key=lambda m: (m.param, m.dim))
        unit_size = max(int((m.unit_of >= 0).sum()) // units for m in built)
        layers = {layer_of(m.module) for m in built}
        layer = layers.pop() if len(layers) == 1 else None
        if a in inner:
            kind = "other"
            # the module's code computes head shapes from head_dim, so heads are the unit instead
            pinned.setdefault(a, "head_dim (heads are pruned whole)")
        elif len(spec) == 2:
            kind = "heads"
        elif a in kv_atoms:
            kind = "kv_heads"
        elif a in lead:
            kind = "heads"
        elif len({layer_of(m.module) for m in built}) > 1 or _touches_embedding(program.model, built):
            kind = "hidden"
        elif sum(1 for m in built if not m.is_buffer) >= 2:
            kind = "mlp"
        else:
            kind = "other"
        reason = ""
        for s in spec:
            if s in pinned:
                reason = pinned[s]
                break
        first = built[0]
        gid = f"{kind}:{first.param}:{first.dim}"
        while any(g.id == gid for g in groups):
            gid += "'"
        groups.append(Group(
            gid, kind, layer, units, unit_size, built, spec, prunable=not reason, reason=reason,
            block=block, inexact=bool(inexact_atoms & set(spec)),
            align=max([align_of.get(a, 1) for a in spec] + [1]),
            head_dim=_head_dim(built, units),
        ))
    _mark_ranks(groups)
    order = {k: i for i, k in enumerate(KINDS)}
    groups.sort(key=lambda g: (g.layer if g.layer is not None else -1, order[g.kind], g.id))
    return groups


def _touches_embedding(model: nn.Module, members: list[Member]) -> bool:
    mods = dict(model.named_modules())
    return any(isinstance(mods.get(m.module), nn.Embedding) and m.dim == 1 for m in members)


def summarize(dg: DependencyGraph) -> dict[str, Any]:
    """Counts for the inspect summary: groups per kind and prunable parameters per kind."""
    kinds: dict[str, dict[str, int]] = {}
    for g in dg.groups:
        k = kinds.setdefault(g.kind, {"groups": 0, "prunable": 0, "params": 0})
        k["groups"] += 1
        if g.prunable:
            k["prunable"] += 1
            k["params"] += g.params
    return {"params": count_params(dg.program.model), "kinds": kinds, "unknown_ops": dg.unknown_ops}
