"""Pictures and files of the dependency graph: GraphML, DOT and a per-layer drawing of the groups.

* :func:`write_graphml` - the coupling graph (``dg.nx``: parameter and tensor dims joined by the
  ops that couple them) for Gephi, yEd, networkx.
* :func:`write_dot` - the groups as Graphviz clusters of parameter dims (text, no pygraphviz).
* :func:`draw_groups` - a PNG/SVG of one layer's groups with matplotlib: per group its kind, unit
  count and size, why it is pinned, and a bar per member showing which slice of the dim belongs
  to which unit (head, kv head, channel).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import networkx as nx
import numpy as np

from ..depgraph import DependencyGraph, Group, Member
from ..errors import FxpruneError

_LAYER_SEG = re.compile(r"(^|\.)(layers|layer|h|blocks|block|encoder_layers|decoder_layers)\.(\d+)(?=\.|$)")
KIND_COLORS = {
    "heads": "#1f77b4", "kv_heads": "#7b4fb0", "mlp": "#2ca02c", "rank": "#17becf", "hidden": "#e07b00", "other": "#7f7f7f",
}
PINNED_COLOR = "#c0392b"


# -- GraphML -------------------------------------------------------------------------------------------


def write_graphml(dg: DependencyGraph, path: str | os.PathLike) -> None:
    """Write the coupling graph ``dg.nx`` as GraphML.

    Nodes are tensor dims (``"model.layers.0.mlp.up_proj.weight:0"`` for a parameter,
    ``"linear_3:2"`` for an intermediate value) with ``kind``, ``groups`` (comma-separated group
    ids) and, for parameter dims, ``param``, ``dim``, ``layer`` (-1 if model-wide), ``group_kinds``
    and ``prunable``. Edges carry the coupling ``op`` and FX ``node``. GraphML only holds
    scalars, so every value is a str, int, float or bool.
    """
    groups = {g.id: g for g in dg.groups}
    out = nx.Graph(name="fxprune dependency graph")
    for node, data in dg.nx.nodes(data=True):
        attrs = {k: _scalar(v) for k, v in data.items()}
        attrs.setdefault("kind", "tensor")
        ids = [i for i in str(attrs.get("groups", "")).split(",") if i]
        attrs["groups"] = ",".join(ids)
        if attrs["kind"] == "param":
            param, _, dim = str(node).rpartition(":")
            attrs["param"] = param
            attrs["dim"] = int(dim) if dim.isdigit() else -1
            gs = [groups[i] for i in ids if i in groups]
            layers = {g.layer for g in gs if g.layer is not None}
            attrs["layer"] = layers.pop() if len(layers) == 1 else -1
            attrs["group_kinds"] = ",".join(dict.fromkeys(g.kind for g in gs))
            attrs["prunable"] = any(g.prunable for g in gs)
        out.add_node(str(node), **attrs)
    for a, b, data in dg.nx.edges(data=True):
        out.add_edge(str(a), str(b), **{k: _scalar(v) for k, v in data.items()})
    nx.write_graphml(out, str(path))


def _scalar(value: Any) -> str | int | float | bool:
    """A GraphML-compatible value: numpy scalars unwrapped, None empty, anything else as text."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return ""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set)):
        return ",".join(str(v) for v in value)
    return str(value)


# -- DOT -----------------------------------------------------------------------------------------------


def write_dot(dg: DependencyGraph, path: str | os.PathLike, layer: int | None = None) -> None:
    """Write the groups as Graphviz DOT text: one ``subgraph cluster_<n>`` per group.

    Nodes are parameter dims (label ``"module.param:dim"``). A dim that belongs to several
    groups (q_proj rows: heads, kv heads) appears once per cluster, and its copies are joined by
    dashed edges. With ``layer``, only the groups of that layer are written (model-wide groups
    such as ``hidden`` are left out). Render with ``dot -Tsvg groups.dot -o groups.svg``.
    """
    groups = _select(dg, layer) if layer is not None else list(dg.groups)
    title = f"fxprune groups, layer {layer}" if layer is not None else "fxprune groups"
    lines = [
        "graph fxprune_groups {",
        f"  label={_q(title)};",
        "  labelloc=t; rankdir=LR; compound=true; newrank=true;",
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=10];',
        '  graph [fontname="Helvetica", fontsize=11];',
    ]
    copies: dict[str, list[str]] = {}
    for n, g in enumerate(groups):
        color = KIND_COLORS.get(g.kind, "#7f7f7f")
        lines.append(f"  subgraph cluster_{n} {{")
        lines.append(f"    label={_q(_group_label(g))};")
        style = "rounded" if g.prunable else "rounded,dashed"
        font = "black" if g.prunable else PINNED_COLOR
        lines.append(f'    style="{style}"; color="{color}"; fontcolor="{font}";')
        for k, m in enumerate(g.members):
            node_id = f"g{n}_m{k}"
            label = f"{m.param}:{m.dim}"
            if m.aliases:
                label += f"\n(tied: {', '.join(m.aliases)})"
            if m.is_buffer:
                label += "\n[buffer]"
            lines.append(f"    {node_id} [label={_q(label)}, color=\"{color}\"];")
            copies.setdefault(f"{m.param}:{m.dim}", []).append(node_id)
        lines.append("  }")
    for ids in copies.values():
        for a, b in zip(ids, ids[1:]):
            lines.append(f"  {a} -- {b} [style=dashed, color=\"#999999\", constraint=false];")
    lines.append("}")
    Path(path).write_text("\n".join(lines) + "\n")


def _group_label(g: Group) -> str:
    where = f"layer {g.layer}" if g.layer is not None else "model-wide"
    status = "prunable" if g.prunable else f"pinned: {g.reason}"
    return f"{g.kind} · {where} · {g.units}×{g.unit_size} · {status}"


def _q(text: str) -> str:
    """A DOT double-quoted string; newlines become DOT's ``\\n`` line breaks."""
    s = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def _select(dg: DependencyGraph, layer: int) -> list[Group]:
    groups = [g for g in dg.groups if g.layer == layer]
    if not groups:
        layers = sorted({g.layer for g in dg.groups if g.layer is not None})
        have = f"layers {layers[0]}..{layers[-1]}" if layers else "no per-layer groups"
        raise FxpruneError(f"no groups in layer {layer} (the model has {have})")
    return groups


# -- picture -------------------------------------------------------------------------------------------


def draw_groups(dg: DependencyGraph, path: str | os.PathLike, layer: int = 0) -> None:
    """Draw one layer's groups (PNG, SVG or PDF by the file extension) with matplotlib.

    One box per group: kind, units × unit size, prunable or the reason it is pinned (red), and
    per member parameter its dim with a bar coloured by unit (grey: indices outside the group).
    Model-wide groups that reach into the layer (``hidden``, RoPE's head_dim) follow as summary
    boxes that list their members once per pattern (``layers.*.mlp.up_proj.weight:1 ×30``).
    A model without layers (a plain MLP) is drawn whole.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or open figures

    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in ("png", "svg", "pdf"):
        raise FxpruneError(f"draw_groups writes .png, .svg or .pdf files, not '{Path(path).name}'")
    has_layers = any(g.layer is not None for g in dg.groups)
    if has_layers:
        local = _select(dg, layer)
        prefix = _layer_prefix(local)
        wide = [g for g in dg.groups if g.layer is None and _touches(g, layer)]
        title = f"Dependency groups of layer {layer}" + (f"  ({prefix.rstrip('.')})" if prefix else "")
    else:
        local, prefix, wide = list(dg.groups), "", []
        title = "Dependency groups"
    model_name = type(dg.program.model).__name__

    rows = _layout(local, wide, prefix)
    if not has_layers:
        for row in rows:
            row.where = ""
    height = 1.1 + 0.24 * sum(r.height for r in rows)
    fig = Figure(figsize=(13, height))
    ax = fig.add_axes((0.01, 0.0, 0.98, 1.0 - 0.7 / height))
    ax.set_axis_off()
    total = sum(r.height for r in rows)
    fig.text(0.01, 1 - 0.25 / height, f"{title} — {model_name}", fontsize=13, weight="bold", va="top")
    fig.text(0.01, 1 - 0.52 / height,
             "Each row: parameter · dim · length of that dim · bar of its indices coloured by the unit "
             "(head, kv head, channel) they belong to; grey = outside the group. Dashed boxes are pinned.",
             fontsize=8.5, color="#555555", va="top")
    y = 0.0
    for row in rows:
        _draw_row(ax, row, y)
        y += row.height
    ax.set_xlim(0, 100)
    ax.set_ylim(total, 0)
    dpi = 150 if ext == "png" else 100
    fig.savefig(str(path), format=ext, dpi=dpi, facecolor="white")


_HEADER = 2.3  # lines taken by a box's header and status line
_GAP = 0.6  # lines between boxes


class _Row:
    """One box of the picture: a group's header plus its member lines."""

    def __init__(self, group: Group, lines: list[tuple[str, str, str, Member | None]], summary: bool) -> None:
        self.group = group
        self.lines = lines  # (name, dim text, extent text, member for the bar or None)
        self.summary = summary
        self.where = f"layer {group.layer}" if group.layer is not None else "model-wide"
        self.height = _HEADER + len(lines) + 0.2 + _GAP  # header + status, members, gap


def _layout(local: list[Group], wide: list[Group], prefix: str) -> list[_Row]:
    rows = []
    for g in local:
        lines = []
        for m in g.members:
            name = m.param[len(prefix):] if prefix and m.param.startswith(prefix) else m.param
            if m.aliases:
                name += f"  (tied: {', '.join(m.aliases)})"
            if m.is_buffer:
                name += "  [buffer]"
            inside = int((m.unit_of >= 0).sum())
            extent = f"{inside} of {len(m.unit_of)}" if inside != len(m.unit_of) else f"{inside}"
            lines.append((name, f"dim {m.dim}", extent, m))
        rows.append(_Row(g, lines, summary=False))
    for g in wide:
        counts = Counter((_pattern(m.param), m.dim, ", ".join(m.aliases), m.is_buffer) for m in g.members)
        lines = []
        for (pattern, dim, tied, buf), n in counts.items():
            name = pattern + (f"  (tied: {tied})" if tied else "") + ("  [buffer]" if buf else "")
            lines.append((name, f"dim {dim}", f"×{n}" if n > 1 else "", None))
        rows.append(_Row(g, lines, summary=True))
    return rows


def _draw_row(ax: Any, row: _Row, y: float) -> None:
    from matplotlib.patches import FancyBboxPatch

    g = row.group
    color = KIND_COLORS.get(g.kind, "#7f7f7f")
    box_h = row.height - _GAP
    ax.add_patch(FancyBboxPatch(
        (0.5, y + 0.1), 99, box_h - 0.2, boxstyle="round,pad=0,rounding_size=0.6", linewidth=1.6,
        edgecolor=color, facecolor="#ffffff" if g.prunable else "#f2f2f2",
        linestyle="-" if g.prunable else "--", mutation_aspect=0.25,
    ))
    ax.text(1.5, y + 0.8, g.kind, fontsize=11, weight="bold", color=color, va="center")
    detail = f"{row.where}  ·  " if row.where else ""
    detail += f"{g.units} units × {g.unit_size}"
    if g.block:
        detail += f"  ·  {g.block} query heads per kv head"
    if g.head_dim and g.kind in ("heads", "kv_heads"):
        detail += f"  ·  head_dim {g.head_dim}"
    if row.summary:
        detail += f"  ·  {len(g.members)} members"
    ax.text(12.5, y + 0.8, detail, fontsize=9.5, color="#222222", va="center")
    _unit_strip(ax, g, y + 0.8)
    if g.prunable:
        status = "prunable" + ("  (inexact: normalised over this dim, so removal ≠ zeroing)" if g.inexact else "")
        ax.text(12.5, y + 1.75, status, fontsize=9, va="center", color="#1a7f37")
    else:
        ax.text(12.5, y + 1.75, f"pinned: {g.reason}", fontsize=9, va="center", color=PINNED_COLOR,
                style="italic", weight="bold")
    for i, (name, dim, extent, member) in enumerate(row.lines):
        ly = y + _HEADER + i + 0.5
        ax.text(2.5, ly, name, fontsize=9, va="center", family="monospace", color="#111111")
        ax.text(44.0, ly, dim, fontsize=9, va="center", color="#333333")
        ax.text(53.5, ly, extent, fontsize=8.5, va="center", ha="right", color="#666666")
        if member is not None:
            _member_bar(ax, g, member, ly)


def _unit_colors(g: Group, n: int) -> Any:
    """Distinct colours for a few units (heads), a smooth ramp for many (channels)."""
    from matplotlib import colormaps

    if g.block and n <= 64:  # GQA: shades of one hue per kv head
        base = colormaps["tab10"]
        out = []
        for u in range(n):
            r, gg, b, _ = base((u // g.block) % 10)
            t = 0.55 + 0.45 * ((u % g.block) / max(1, g.block - 1)) if g.block > 1 else 1.0
            out.append((r * t + (1 - t), gg * t + (1 - t), b * t + (1 - t), 1.0))
        return out
    if n <= 20:
        base = colormaps["tab20" if n > 10 else "tab10"]
        return [base(u % base.N) for u in range(n)]
    ramp = colormaps["viridis"]
    return [ramp(u / max(1, n - 1)) for u in range(n)]


def _member_bar(ax: Any, g: Group, m: Member, y: float) -> None:
    """A bar over the member's dim: each index coloured by its unit, grey outside the group."""
    colors = np.array(_unit_colors(g, g.units))
    unit_of = m.unit_of
    n = len(unit_of)
    width = 1024  # pixels: enough to show 64-wide heads of a 4096 dim
    idx = np.minimum((np.arange(width) * n) // width, n - 1) if n > width else np.arange(n)
    units = unit_of[idx]
    img = np.ones((1, len(idx), 4))
    img[0, :] = (0.85, 0.85, 0.85, 1.0)
    mask = units >= 0
    img[0, mask] = colors[units[mask] % len(colors)]
    ax.imshow(img, extent=(55.0, 98.5, y + 0.38, y - 0.38), aspect="auto", interpolation="nearest", zorder=2)
    ax.add_patch(_rect(55.0, y - 0.38, 43.5, 0.76))
    _boundaries(ax, unit_of, y, 55.0, 98.5)


def _boundaries(ax: Any, unit_of: np.ndarray, y: float, x0: float, x1: float) -> None:
    """Thin white lines where the unit changes (heads), if few enough to see."""
    n = len(unit_of)
    change = np.nonzero(unit_of[1:] != unit_of[:-1])[0] + 1
    if 0 < len(change) <= 64:
        xs = x0 + (x1 - x0) * change / n
        ax.vlines(xs, y - 0.38, y + 0.38, colors="white", linewidth=0.8, zorder=3)


def _unit_strip(ax: Any, g: Group, y: float) -> None:
    """The group's units as cells (few) or a ramp (many), next to the header."""
    x0, x1 = 76.0, 93.0
    n = g.units
    colors = _unit_colors(g, n)
    if n <= 32:
        w = (x1 - x0) / n
        for u in range(n):
            ax.add_patch(_rect(x0 + u * w + 0.05, y - 0.3, max(w - 0.1, 0.05), 0.6, face=colors[u], edge="white"))
    else:
        img = np.array(colors)[None, :, :]
        ax.imshow(img, extent=(x0, x1, y + 0.3, y - 0.3), aspect="auto", interpolation="nearest", zorder=2)
        ax.add_patch(_rect(x0, y - 0.3, x1 - x0, 0.6))
    ax.text(x1 + 0.6, y, f"{n} units", fontsize=8, va="center", color="#555555")


def _rect(x: float, y: float, w: float, h: float, face: Any = "none", edge: Any = "#888888") -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, facecolor=face, edgecolor=edge, linewidth=0.6, zorder=3)


def _layer_prefix(groups: Iterable[Group]) -> str:
    """``model.layers.0.`` when every member of these groups lives under it, else ``""``."""
    names = [m.param for g in groups for m in g.members]
    common = os.path.commonprefix(names)
    match = None
    for match in _LAYER_SEG.finditer(common):
        pass
    if match is None or match.end() > len(common) or not common[match.end():].startswith("."):
        return ""
    return common[: match.end() + 1]


def _pattern(name: str) -> str:
    return _LAYER_SEG.sub(lambda m: f"{m.group(1)}{m.group(2)}.*", name)


def _touches(g: Group, layer: int) -> bool:
    from ..depgraph import layer_of

    return any(layer_of(m.module) == layer for m in g.members)
