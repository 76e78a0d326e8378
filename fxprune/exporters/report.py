"""The report of a prune run as files: ``report.md``, ``report.json`` and ``kept_width.png``.

:func:`write_report` takes ``PruneResult.report`` (see :func:`fxprune.api.build_report`, plus what
the CLI adds: ``ppl_before/after``, ``onnx``) and writes the three files. The markdown opens with
the picture (kept fraction of heads / kv groups / MLP channels per layer, hidden as a model-wide
line), then the numbers: parameters, MACs and perplexity before/after, the options used, time per
stage, the per-layer table, the ONNX file and its parity, pinned reasons, unknown ops and notes.
Keys other stages add to the report (``recovery``, ``iterative``...) are listed at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ..depgraph import PRUNABLE_KINDS as KINDS
from ..depgraph import layer_sort_key

KIND_LABELS = {"heads": "attention heads", "kv_heads": "kv groups", "mlp": "MLP channels",
               "rank": "attention ranks", "hidden": "hidden (model-wide)"}
PICTURE = "kept_width.png"
# marker, line style and a small x offset per kind, so series at the same value stay visible
# (hidden is drawn as one model-wide line)
_STYLE = {"heads": ("o", "-", -0.1), "kv_heads": ("s", "--", 0.1), "mlp": ("^", "-", 0.0),
          "rank": ("D", ":", 0.05)}
# keys the markdown shows in its own sections; any other key goes to "Other results"
_SHOWN = {"params_before", "params_after", "removed_fraction", "macs_before", "macs_after", "plan", "groups",
          "layers", "timings", "pinned_reasons", "unknown_ops", "notes", "ppl_before", "ppl_after",
          "eval_tokens", "onnx"}


def write_report(report: dict[str, Any], directory: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and (when there are layers) ``kept_width.png``.

    Returns the paths written, keyed ``md``, ``json`` and ``png``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    png = plot_kept_width(report, out / PICTURE)
    if png is not None:
        paths["png"] = png
    paths["md"].write_text(render_markdown(report, PICTURE if png is not None else None))
    return paths


# -- per-layer widths --------------------------------------------------------------------------------


def layer_widths(report: dict[str, Any]) -> tuple[list[int], dict[str, dict[int, tuple[int, int]]]]:
    """The numbered layers, and per kind ``{layer: (kept, units)}``; hidden is keyed ``-1``. Layers of
    several stacks ("encoder.3", "decoder.3") are numbered one stack after the other."""
    per_kind: dict[str, dict[int, tuple[int, int]]] = {k: {} for k in KINDS}
    labels = sorted((str(k) for k in report.get("layers", {}) if str(k) != "model"), key=layer_sort_key)
    position = {label: i for i, label in enumerate(labels)} if any("." in k for k in labels) else \
        {label: int(label) for label in labels if label.lstrip("-").isdigit()}
    for key, kinds in report.get("layers", {}).items():
        layer = position.get(str(key), -1)
        for kind, v in kinds.items():
            if kind in per_kind:
                per_kind[kind][layer] = (int(v["kept"]), int(v["units"]))
    return sorted(v for v in position.values() if v >= 0), per_kind


def plot_kept_width(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """A PNG of the kept fraction per layer for each kind; None when the model has no layers."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    from .graphs import KIND_COLORS

    layers, per_kind = layer_widths(report)
    if not layers:
        return None
    fig = Figure(figsize=(max(8.0, min(13.0, 0.25 * len(layers) + 5)), 4.6), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for kind in KINDS:
        data = per_kind[kind]
        color = KIND_COLORS.get(kind, "#555555")
        if kind == "hidden" and -1 in data:
            kept, units = data[-1]
            ax.axhline(kept / units, color=color, linestyle=":", linewidth=2.0,
                       label=f"{KIND_LABELS[kind]}\n  {kept}/{units} kept")
            continue
        xs = [layer for layer in layers if layer in data]
        if not xs:
            continue
        marker, style, dx = _STYLE[kind]
        ys = [data[x][0] / data[x][1] for x in xs]
        kept, units = sum(data[x][0] for x in xs), sum(data[x][1] for x in xs)
        ax.plot([x + dx for x in xs], ys, marker=marker, markersize=5, linewidth=1.6, linestyle=style,
                color=color, label=f"{KIND_LABELS[kind]}\n  {kept}/{units} kept")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction of the layer's units")
    ax.set_ylim(0, 1.08)
    ax.set_xlim(layers[0] - 0.6, layers[-1] + 0.6)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    removed = report.get("removed_fraction")
    title = "Kept width per layer" + (f" — {removed:.1%} of parameters removed" if removed is not None else "")
    fig.suptitle(title, fontsize=12, weight="bold", x=0.02, ha="left")
    ax.set_title(_options_line(report.get("plan", {})), fontsize=8.5, color="#555555", loc="left")
    path = Path(path)
    fig.savefig(str(path), format="png", facecolor="white")
    return path


def _options_line(plan: dict[str, Any]) -> str:
    keys = ("importance", "ratio", "targets", "layers", "mode", "round_to", "schedule")
    parts = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k in keys
             if (v := plan.get(k)) not in (None, "", [])]
    return "  ".join(parts)


# -- markdown -----------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any], picture: str | None = PICTURE) -> str:
    """The report as markdown; ``picture`` is the PNG's file name (None: no picture)."""
    parts = ["# fxprune report", ""]
    if picture:
        parts += [f"![kept width per layer]({picture})", ""]
    for title, section in SECTIONS:
        body = section(report)
        if body:
            parts += [f"## {title}", "", *body, ""]
    return "\n".join(parts).rstrip() + "\n"


def _summary(r: dict[str, Any]) -> list[str]:
    rows = [("parameters", r.get("params_before"), r.get("params_after"), "{:,}")]
    if r.get("macs_before") and r.get("macs_after"):
        rows.append(("MACs (example input)", r["macs_before"], r["macs_after"], "{:,}"))
    if "ppl_before" in r:
        rows.append((f"perplexity ({r.get('eval_tokens', 0):,} held-out tokens)", r["ppl_before"], r["ppl_after"],
                     "{:.3f}"))
    lines = ["| | before | after | after / before |", "|---|---:|---:|---:|"]
    for name, a, b, fmt in rows:
        if a is None or b is None:
            continue
        ratio = f"{b / a:.3f}" if a else "-"
        lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    if "removed_fraction" in r:
        lines += ["", f"{r['removed_fraction']:.2%} of the parameters removed."]
    return lines


def _options(r: dict[str, Any]) -> list[str]:
    plan = r.get("plan") or {}
    if not plan:
        return []
    lines = ["| option | value |", "|---|---|"]
    for k, v in plan.items():
        value = ", ".join(map(str, v)) if isinstance(v, list) else ("all" if v is None else v)
        lines.append(f"| {k} | `{value}` |")
    return lines


def _timings(r: dict[str, Any]) -> list[str]:
    t = r.get("timings") or {}
    total = t.get("total_s") or sum(v for k, v in t.items() if k != "total_s") or 1.0
    lines = ["| stage | seconds | share |", "|---|---:|---:|"]
    for k, v in sorted(t.items(), key=lambda kv: kv[0] == "total_s"):  # stable: stage order, total last
        name = k[:-2] if k.endswith("_s") else k
        share = "" if k == "total_s" else f"{v / total:.0%}"
        lines.append(f"| {'**total**' if k == 'total_s' else name} | {v:.2f} | {share} |")
    return lines if t else []


def _per_layer(r: dict[str, Any]) -> list[str]:
    layers = r.get("layers", {})
    labels = sorted(layers, key=layer_sort_key)
    present = {c for label in labels for c in layers[label]}
    # the four kinds, then any kind named by module (a decoder layer's "heads (encoder_attn)")
    columns = [k for k in KINDS if k in present] + sorted(present - set(KINDS))
    if not columns:
        return []
    lines = ["| layer | " + " | ".join(KIND_LABELS.get(c, c) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label in labels:
        cells = [_cell((layers[label][c]["kept"], layers[label][c]["units"]) if c in layers[label] else None)
                 for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return ["Kept / original units (a head is `head_dim` rows; a kv group carries its query heads)."] + [""] + lines


def _cell(v: tuple[int, int] | None) -> str:
    if v is None:
        return ""
    kept, units = v
    return f"{kept}/{units}" if kept == units else f"**{kept}/{units}**"


def _onnx(r: dict[str, Any]) -> list[str]:
    o = r.get("onnx")
    if not o:
        return []
    lines = [f"- file: `{Path(str(o.get('path', ''))).name}` (opset {o.get('opset', '?')})"]
    if o.get("max_abs_diff") is not None:
        lines.append(f"- onnxruntime parity: max |diff| vs torch = {o['max_abs_diff']:.3g}"
                     + (f" on shapes {o['verified_on']}" if o.get("verified_on") else ""))
    if o.get("external_data"):
        lines.append("- weights in an external data file beside it")
    return lines


def _bullets(key: str, fmt: str = "{}") -> Callable[[dict[str, Any]], list[str]]:
    return lambda r: [f"- {fmt.format(x)}" for x in r.get(key) or []]


def _others(r: dict[str, Any]) -> list[str]:
    rest = {k: v for k, v in r.items() if k not in _SHOWN}
    if not rest:
        return []
    return ["```json", json.dumps(rest, indent=1, default=str), "```"]


# (title, renderer): a section is left out when its renderer returns no lines
SECTIONS: tuple[tuple[str, Callable[[dict[str, Any]], list[str]]], ...] = (
    ("Summary", _summary),
    ("Options", _options),
    ("Time per stage", _timings),
    ("Kept units per layer", _per_layer),
    ("ONNX", _onnx),
    ("Pinned (never pruned) because", _bullets("pinned_reasons")),
    ("Ops the rules don't know (their dims are pinned)", _bullets("unknown_ops", "`{}`")),
    ("Notes", _bullets("notes")),
    ("Other results", _others),
)
