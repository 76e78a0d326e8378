"""Rewrite pass: apply a :class:`Plan` to a copy of the model and to its FX graph.

One mechanism serves parameters and graph constants alike: :class:`KeepMasks` answers, for any
dim variable of the dependency graph, which of its indices survive the plan. Parameters are
sliced with it; ``view``/``reshape``/``expand`` sizes, ``split`` sizes and ``slice`` bounds in
the graph are recomputed from it; module attributes and HF config values (head counts, kv groups,
intermediate and hidden sizes) are updated from the resulting shapes. The caller's model is never
touched: everything happens on a deep copy, and nothing is returned unless every step succeeded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..capture import WRAP, Program
from ..depgraph import DependencyGraph, Group, layer_of
from ..errors import PlanError
from ..plan import Plan
from ..rules import CONV_GROUPS_ARG, FILLED_SIZE_ARG, op_name


class KeepMasks:
    """Which indices of each dim variable a plan keeps."""

    def __init__(self, dg: DependencyGraph, plan: Plan) -> None:
        self.dg = dg
        self.solver = dg.solver
        self.pruned: list[tuple[Group, np.ndarray]] = []
        for g, kept in plan.pruned_groups(dg):
            keep = np.zeros(g.units, dtype=bool)
            keep[np.asarray(kept, dtype=np.int64)] = True
            self.pruned.append((g, keep))
        self._cache: dict[int, np.ndarray] = {}

    def mask(self, var: int) -> np.ndarray:
        """Boolean keep-mask over the elements of ``var`` (a concrete-size dim)."""
        root = self.solver.find(var)
        if root in self._cache:
            return self._cache[root]
        coords = self.solver.coords(root)
        n = self.solver.size_of(root) or 0
        keep = np.ones(n, dtype=bool)
        for g, gkeep in self.pruned:
            if not all(a in coords for a in g.atoms):
                continue
            if len(g.atoms) == 2:
                ck, ce = coords[g.atoms[0]], coords[g.atoms[1]]
                unit = np.where((ck >= 0) & (ce >= 0), ck * g.block + ce, -1)
            else:
                unit = coords[g.atoms[0]]
            inside = unit >= 0
            keep[inside] &= gkeep[unit[inside]]
        self._cache[root] = keep
        return keep

    def new_size(self, var: int) -> int | None:
        """Size of ``var`` after pruning (None for symbolic dims)."""
        if self.solver.size_of(var) is None:
            return None
        size = int(self.mask(var).sum())
        coords = self.solver.coords(var)
        for g, gkeep in self.pruned:
            # GQA's per-kv-head query dim seen without its kv head (the expand's size): a count
            if len(g.atoms) == 2 and g.atoms[1] in coords and g.atoms[0] not in coords:
                per_block = int(gkeep.reshape(-1, g.block).sum(1).max())
                size = size * per_block // g.block
        return size


@dataclass
class RewriteResult:
    model: nn.Module
    graph_module: fx.GraphModule
    shapes: dict[str, list[int]] = field(default_factory=dict)  # parameter -> new shape
    notes: list[str] = field(default_factory=list)


def apply_plan(program: Program, dg: DependencyGraph, plan: Plan) -> RewriteResult:
    """Physically prune a copy of ``program.model`` and of its graph according to ``plan``."""
    plan.validate(dg)
    masks = KeepMasks(dg, plan)
    index = _param_indices(program, dg, masks)
    sliced = _sliced_tensors(program.model, index)
    # the copy takes the sliced tensors in place of the originals (tied ones are one object, so one
    # entry serves every alias): pruned weights are never copied whole first
    model = copy.deepcopy(program.model, memo={id(old): new for old, new in sliced.values()})
    shapes = {name: list(new.shape) for name, (_, new) in sliced.items()}
    notes = _update_attributes(model, program, dg, masks)
    gm = _rewrite_graph(program, dg, masks, model)
    return RewriteResult(model, gm, shapes, notes)


# -- parameters ------------------------------------------------------------------------------------


def _param_indices(program: Program, dg: DependencyGraph, masks: KeepMasks) -> dict[str, dict[int, np.ndarray]]:
    """parameter name -> {dim: kept indices} for every parameter dim that shrinks."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for ph, name in list(program.params.items()) + list(program.buffers.items()):
        dims = dg.node_dims.get(ph) or []
        for d, var in enumerate(dims):
            if dg.solver.size_of(var) is None:
                continue
            keep = masks.mask(var)
            if not keep.all():
                out.setdefault(name, {})[d] = np.nonzero(keep)[0]
    return out


def _sliced_tensors(model: nn.Module, index: dict[str, dict[int, np.ndarray]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """parameter or buffer name -> (the tensor in ``model``, its kept slice as a new tensor of the
    same kind: a Parameter keeps ``requires_grad``)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, dims in index.items():
        owner_path, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        old = getattr(model.get_submodule(owner_path), leaf)
        new = old.detach()
        for d, idx in sorted(dims.items()):
            new = new.index_select(d, torch.as_tensor(idx, device=new.device))
        new = new.contiguous()
        out[name] = (old, nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new)
    return out


# -- module attributes and HF config ---------------------------------------------------------------

# attribute name -> which count it holds. Only attributes whose current value equals the old count
# are rewritten, so an unrelated attribute with the same name is left alone.
ATTRIBUTES: dict[str, str] = {
    "num_heads": "q_heads", "num_attention_heads": "q_heads", "n_head": "q_heads", "n_heads": "q_heads",
    "num_key_value_heads": "kv_heads", "num_kv_heads": "kv_heads",
    "num_key_value_groups": "kv_groups",
    "all_head_size": "q_width", "split_size": "q_width", "inner_dim": "q_width",
    "intermediate_size": "mlp", "ffn_dim": "mlp",
    "hidden_size": "hidden", "embed_dim": "hidden", "n_embd": "hidden", "d_model": "hidden", "dim": "hidden",
}
# where a class gives one of those names another meaning, or holds a count under its own name:
# GPT-BigCode's multi-query attention splits its fused projection at ``embed_dim``, the query width
# (not the residual width); Mamba splits ``x_proj``'s output at ``time_step_rank``, the width of the
# two-Linear group ``x_proj`` rows -> ``dt_proj`` columns
CLASS_ATTRIBUTES: dict[str, dict[str, str]] = {
    "GPTBigCodeAttention": {"embed_dim": "q_width"},
    "MambaMixer": {"time_step_rank": "mlp"},
    "FalconMambaMixer": {"time_step_rank": "mlp"},
}
# attributes that hold the width of one parameter dim of their module (the kept units of the group
# that dim is in): the low-rank bottlenecks of multi-head latent attention (DeepSeek V2/V3,
# MiniCPM3, Kimi...), pruned as kind ``rank``; the model config's key of the same name follows
# where every layer keeps the same width
WIDTH_ATTRIBUTES: dict[str, tuple[str, int]] = {
    "q_lora_rank": ("q_a_layernorm.weight", 0),
    "kv_lora_rank": ("kv_a_layernorm.weight", 0),
}
CONFIG_KEYS = {"num_attention_heads": "q_heads", "num_key_value_heads": "kv_heads",
               "intermediate_size": "mlp", "hidden_size": "hidden", "n_head": "q_heads",
               "n_embd": "hidden", "n_inner": "mlp", "dim": "hidden", "hidden_dim": "mlp"}


def set_count_attributes(mod: nn.Module, counts: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Rewrite ``mod``'s count attributes (:data:`ATTRIBUTES`, with its class's overrides) that
    hold an old count of ``counts`` (key -> (old, new)) to the new count; returns what changed."""
    changed = {}
    for attr, key in {**ATTRIBUTES, **CLASS_ATTRIBUTES.get(type(mod).__name__, {})}.items():
        val = getattr(mod, attr, None)
        if key in counts and isinstance(val, int) and not isinstance(val, bool) and val == counts[key][0]:
            if counts[key][1] != val:
                setattr(mod, attr, counts[key][1])
                changed[attr] = counts[key][1]
    return changed


def pin_head_dim(cfg: Any, counts: dict[str, tuple[int, int]], head_dim: int | None) -> None:
    """Write ``head_dim`` into ``cfg`` when its head count changes (see :func:`write_head_dim`)."""
    q = counts.get("q_heads")
    if q is not None and q[0] != q[1]:
        write_head_dim(cfg, head_dim)


def write_head_dim(cfg: Any, head_dim: int | None) -> None:
    """``cfg.head_dim = head_dim`` where the config does not say it: code that derives
    ``hidden_size // num_attention_heads`` (Phi-3's rotary embedding, at every forward) would
    otherwise get a wider head from a pruned head count."""
    if not head_dim or getattr(cfg, "head_dim", None):
        return
    try:
        cfg.head_dim = head_dim
    except AttributeError:  # a config whose head_dim is a read-only property derives it itself
        pass


def layers_touched(g: Group) -> set[int | None]:
    """The layers whose modules read ``g``'s counts: its own, or for a heads / MLP group that spans
    layers (MPNet's relative position bias, shared by every layer, ties all heads) each member's."""
    if g.layer is not None or g.kind not in ("heads", "kv_heads", "mlp"):
        return {g.layer}
    return {layer_of(m.module) for m in g.members} - {None} or {None}


def _counts(masks: KeepMasks, groups: list[Group]) -> dict[str, tuple[int, int]]:
    """(old, new) counts for the groups of one layer (or the model-wide hidden group)."""
    out: dict[str, tuple[int, int]] = {}
    gqa: Group | None = None
    # where the rules could not tie a layer's heads into one group (BLOOM merges heads with the
    # batch), several pinned "heads" groups disagree on the count: a prunable group, else the first, speaks
    for g in sorted(groups, key=lambda g: not g.prunable):
        kept = _kept(masks, g)
        if g.kind == "heads" and g.block:
            gqa = gqa or g
            out.setdefault("kv_groups", (g.block, kept // (g.units // g.block)))
        elif g.kind in ("heads", "kv_heads", "mlp", "hidden"):
            key = "q_heads" if g.kind == "heads" else g.kind
            out.setdefault(key, (g.units, kept))
    if gqa is not None:  # query heads = kv heads kept x query heads kept per kv head
        blocks = gqa.units // gqa.block
        kv_new = out.get("kv_heads", (blocks, blocks))[1]
        out["q_heads"] = (gqa.units, kv_new * out["kv_groups"][1])
    elif "q_heads" in out and "kv_heads" not in out:
        # no kv groups in the graph: either kv heads = query heads (the module's num_key_value_groups
        # is 1 and stays) or one shared kv head (multi-query: it equals the query head count)
        out["kv_groups"] = out["q_heads"]
    return out


def _kept(masks: KeepMasks, g: Group) -> int:
    for pg, keep in masks.pruned:
        if pg.id == g.id:
            return int(keep.sum())
    return g.units


def _update_attributes(model: nn.Module, program: Program, dg: DependencyGraph, masks: KeepMasks) -> list[str]:
    """Count attributes and configs in step with the sliced weights. Each module takes the counts of
    the groups with a member inside it (a decoder layer's self- and cross-attention keep their own
    head counts), else of every group of its layer. What changed is left in
    ``model.fxprune_attributes`` (path -> {"attributes": {...}, "config": {...}}) for the checkpoint
    to replay on reload."""
    notes: list[str] = []
    by_layer: dict[int | None, list[Group]] = {}
    for g in dg.groups:
        for layer in layers_touched(g):
            by_layer.setdefault(layer, []).append(g)
    hidden = _counts(masks, [g for g in dg.groups if g.kind == "hidden" and g.prunable])
    per_layer: dict[int, dict[str, int]] = {}
    changed: set[str] = set()  # the keys some layer's plan changes: only those reach the config
    for layer, groups in by_layer.items():
        if layer is None:
            continue
        entry = per_layer.setdefault(layer, {})
        for key, (old, new) in _counts(masks, groups).items():
            if key in ("q_heads", "kv_heads", "mlp"):
                entry[key] = new
                if old != new:
                    changed.add(key)
    record: dict[str, dict[str, dict[str, int]]] = {}
    private_configs: list[tuple[str, Any]] = []
    for path, mod in model.named_modules():
        _fix_standard_module(mod)
        layer = layer_of(path)
        counts = dict(hidden)
        head_dim = None
        if layer is not None:
            groups = by_layer.get(layer, [])
            inside = [g for g in groups if _holds(path, g)] or groups
            counts.update(_counts(masks, inside))
            head_dim = next((g.head_dim for g in inside if g.kind == "heads" and g.units), None)
        if "q_heads" in counts and head_dim:
            counts["q_width"] = (counts["q_heads"][0] * head_dim, counts["q_heads"][1] * head_dim)
        attrs = set_count_attributes(mod, counts)
        if attrs:
            record.setdefault(path, {})["attributes"] = attrs
        cfg = getattr(mod, "config", None)
        if cfg is not None and layer is not None and path.count(".") > 0:
            # modules that read shapes from the (shared) config get a private copy with their values
            private = copy.copy(cfg)
            _apply_config(private, counts)
            pin_head_dim(private, counts, head_dim)
            mod.config = private
            private_configs.append((path, private))
    cfg = getattr(model, "config", None)
    if cfg is not None:
        uniform = {}
        for key in ("q_heads", "kv_heads", "mlp"):
            if key not in changed:
                continue
            vals = {e[key] for e in per_layer.values() if key in e}
            if len(vals) == 1:
                uniform[key] = vals.pop()
            elif len(vals) > 1:
                notes.append(f"layers differ in {key}; the config keeps the largest value, per-layer shapes are in the manifest")
                uniform[key] = max(vals)
        counts = dict(hidden)
        for key, val in uniform.items():
            old = _config_old(cfg, key)
            if old is not None:
                counts[key] = (old, val)
        _apply_config(cfg, counts)
        pin_head_dim(cfg, counts, next((g.head_dim for g in dg.groups if g.kind == "heads" and g.units), None))
        for path, private in private_configs:  # where a private config differs from the model's
            diff = {k: getattr(private, k, None) for k in (*CONFIG_KEYS, "head_dim")
                    if getattr(private, k, None) != getattr(cfg, k, None)}
            if diff:
                record.setdefault(path, {})["config"] = diff
    notes += _update_width_attributes(model, dg, masks, record)
    model.fxprune_layers = per_layer  # read by the checkpoint exporter
    model.fxprune_attributes = record
    return notes


def _update_width_attributes(model: nn.Module, dg: DependencyGraph, masks: KeepMasks,
                             record: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    """:data:`WIDTH_ATTRIBUTES` of every module (and of the model config) set to their dim's kept width."""
    group_of = {(m.param, m.dim): g for g in dg.groups for m in g.members}
    widths: dict[str, set[tuple[int, int]]] = {}
    for path, mod in model.named_modules():
        for attr, (param, dim) in WIDTH_ATTRIBUTES.items():
            val, g = getattr(mod, attr, None), group_of.get((f"{path}.{param}" if path else param, dim))
            if g is None or not isinstance(val, int) or isinstance(val, bool) or val != g.units:
                continue
            new = _kept(masks, g)
            widths.setdefault(attr, set()).add((val, new))
            if new != val:
                setattr(mod, attr, new)
                record.setdefault(path, {}).setdefault("attributes", {})[attr] = new
    notes = []
    cfg = getattr(model, "config", None)
    for attr, pairs in widths.items():
        if len({new for _, new in pairs}) > 1:
            notes.append(f"layers differ in {attr}; the config keeps its value, per-layer shapes are in the manifest")
        elif cfg is not None and (old_new := pairs.pop()) and getattr(cfg, attr, None) == old_new[0]:
            setattr(cfg, attr, old_new[1])
    return notes


def _holds(path: str, g: Group) -> bool:
    """Whether a member of ``g`` lives in the module at ``path`` or below it."""
    return any(m.module == path or m.module.startswith(path + ".") for m in g.members)


def _config_old(cfg: Any, key: str) -> int | None:
    for ck, k in CONFIG_KEYS.items():
        if k == key and isinstance(getattr(cfg, ck, None), int):
            return getattr(cfg, ck)
    return None


def _apply_config(cfg: Any, counts: dict[str, tuple[int, int]]) -> None:
    for ck, key in CONFIG_KEYS.items():
        val = getattr(cfg, ck, None)
        if key in counts and isinstance(val, int) and val == counts[key][0]:
            setattr(cfg, ck, counts[key][1])


def _fix_standard_module(mod: nn.Module) -> None:
    """Keep torch's own layers' shape attributes in step with their sliced weights."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        return
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = w.shape
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = w.shape
    elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and w.dim() == 1:
        mod.normalized_shape = (w.shape[0],)
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and w.dim() == 1:
        mod.num_features = w.shape[0]
    elif isinstance(mod, nn.modules.conv._ConvNd):
        if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels and w.shape[1] == 1:
            mod.groups = w.shape[0]  # depthwise: one group per (kept) channel
        mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
    elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # GPT-2's transposed linear
        mod.nx, mod.nf = w.shape


# -- the graph -------------------------------------------------------------------------------------

# where an op takes the size list that spells its output's shape: view / reshape / expand sizes,
# and the zeros / ones / full / new_* creations the rules leave free (rules.FILLED_SIZE_ARG)
SIZE_ARG = {"view": 1, "reshape": 1, "_unsafe_view": 1, "expand": 1, **FILLED_SIZE_ARG}
# normalised_shape (arg 1) of these ops spans the input's trailing dims: it shrinks with them
NORM_SHAPE_OPS = {"layer_norm", "native_layer_norm", "rms_norm"}


def _rewrite_graph(program: Program, dg: DependencyGraph, masks: KeepMasks, model: nn.Module) -> fx.GraphModule:
    """Unlift the exported program, point it at the sliced parameters, fix its shape constants."""
    gm = program.exported.module()
    for name, p in model.named_parameters(remove_duplicate=False):
        _set_attr(gm, f"{WRAP}.{name}", p)
    for name, b in model.named_buffers(remove_duplicate=False):
        _set_attr(gm, f"{WRAP}.{name}", b)
    rewrite_shape_constants(gm.graph, dg, masks)
    gm.graph.lint()
    gm.recompile()
    return gm


def rewrite_shape_constants(graph: fx.Graph, dg: DependencyGraph, masks: KeepMasks) -> None:
    """Recompute, in place, the size literals of ``graph`` that pruned dims change: view/reshape/
    expand sizes, zeros/ones/full sizes, norm shapes, split sizes and slice bounds. ``graph`` is the graph ``dg`` was built
    from, lifted or unlifted (node names are what count)."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        dims = dg.node_dims.get(node.name)
        name = op_name(node)
        if name in SIZE_ARG and isinstance(dims, list) and len(node.args) > SIZE_ARG[name]:
            pos = SIZE_ARG[name]
            sizes = node.args[pos]
            if isinstance(sizes, (list, tuple)) and len(sizes) == len(dims):
                new = [_new_literal(masks, v, s) for v, s in zip(dims, sizes)]
                node.args = (*node.args[:pos], new, *node.args[pos + 1:])
        elif name in NORM_SHAPE_OPS and isinstance(node.args[1], (list, tuple)):
            src = dg.node_dims.get(node.args[0].name) or []
            sizes = list(node.args[1])
            new = [_new_literal(masks, v, s) for v, s in zip(src[len(src) - len(sizes):], sizes)]
            node.args = (node.args[0], new, *node.args[2:])
        elif name in ("split", "split_with_sizes") and isinstance(dims, list) and dims and dims[0]:
            # the pieces' dims (the input may be a parameter, named otherwise in an unlifted graph)
            d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            d = d + len(dims[0]) if d < 0 else d
            pieces = [masks.new_size(piece[d]) for piece in dims]
            if pieces != [dg.solver.size_of(piece[d]) for piece in dims]:
                node.target = torch.ops.aten.split_with_sizes.default
                node.args = (node.args[0], pieces, d)
                node.kwargs = {}
        elif name in CONV_GROUPS_ARG and len(node.args) > CONV_GROUPS_ARG[name] and isinstance(dims, list):
            # a depthwise convolution's groups is its channel count
            pos = CONV_GROUPS_ARG[name]
            groups, new = node.args[pos], masks.new_size(dims[1])
            if isinstance(groups, int) and groups > 1 and groups == dg.solver.size_of(dims[1]) and new != groups:
                node.args = (*node.args[:pos], new, *node.args[pos + 1:])
        elif name == "slice":
            src = dg.node_dims.get(node.args[0].name)
            d = node.args[1] if len(node.args) > 1 else 0
            if not src:
                continue
            d = d + len(src) if d < 0 else d
            if dg.solver.size_of(src[d]) is None:
                continue
            keep = masks.mask(src[d])
            if keep.all() or _int_arg(node, 4, 1) != 1:
                continue  # a strided slice the rules accepted takes one position of whole channels
            start, end = _int_arg(node, 2, 0), _int_arg(node, 3, None)
            size = len(keep)
            start = max(0, start + size if start < 0 else start)
            end = size if end is None else min(size, end + size if end < 0 else end)
            node.args = (node.args[0], d, int(keep[:start].sum()), int(keep[:end].sum()), *node.args[4:])


def rewrite_exported(program: Program, dg: DependencyGraph, plan: Plan, pruned: nn.Module) -> torch.export.ExportedProgram:
    """``program``'s ExportedProgram with ``plan`` applied and the tensors of ``pruned`` as its state.

    ``pruned`` is a model this plan already shrank (``PruneResult.model``, fine-tuned or not), so its
    tensors are the ones to ship; ``program``, built from the unpruned model, is edited in place
    (the caller's own copy): shape literals and every node's recorded shape follow the plan, so the
    program stays lifted (parameters as inputs) and consistent for tools that read node shapes
    (``torch.onnx``'s translation). Raises :class:`PlanError` when the plan does not fit ``dg`` or a
    tensor of ``pruned`` does not have the shape the plan gives its placeholder.
    """
    plan.validate(dg)
    masks = KeepMasks(dg, plan)
    graph = program.graph
    rewrite_shape_constants(graph, dg, masks)
    _rewrite_node_shapes(graph, dg, masks)
    ep = program.exported
    tensors = {f"{WRAP}.{n}": t for n, t in pruned.named_parameters(remove_duplicate=False)}
    tensors.update({f"{WRAP}.{n}": t for n, t in pruned.named_buffers(remove_duplicate=False)})
    vals = {n.name: n.meta.get("val") for n in graph.nodes if n.op == "placeholder"}
    state, constants = {}, dict(ep.constants)
    for spec in ep.graph_signature.input_specs:
        if spec.target is None or (spec.target not in ep.state_dict and spec.target not in tensors):
            continue  # user inputs; constants torch lifted out of the code keep their values
        new = tensors.get(spec.target)
        if new is None:
            raise PlanError(f"the pruned model has no tensor '{spec.target[len(WRAP) + 1:]}'")
        want = getattr(vals.get(spec.arg.name), "shape", None)
        if want is not None and tuple(new.shape) != tuple(want):
            raise PlanError(f"'{spec.target[len(WRAP) + 1:]}' has shape {tuple(new.shape)}; "
                            f"the plan gives {tuple(want)}")
        if spec.target in ep.state_dict:
            state[spec.target] = new
        else:
            constants[spec.target] = new
    graph.lint()
    program.graph_module.recompile()
    return torch.export.ExportedProgram(
        root=program.graph_module, graph=graph, graph_signature=ep.graph_signature, state_dict=state,
        range_constraints=dict(ep.range_constraints), module_call_graph=list(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=constants, verifiers=[ep.verifier])


def _rewrite_node_shapes(graph: fx.Graph, dg: DependencyGraph, masks: KeepMasks) -> None:
    """Give each node whose dims the plan shrinks a recorded shape (``meta["val"]``) of the new size."""
    for node in graph.nodes:
        val, dims = node.meta.get("val"), dg.node_dims.get(node.name)
        if not isinstance(dims, list):
            continue
        if isinstance(val, torch.Tensor):
            node.meta["val"] = _resized(val, dims, masks)
        elif isinstance(val, (list, tuple)) and len(val) == len(dims):  # split: one dims list per piece
            node.meta["val"] = type(val)(_resized(v, d, masks) if isinstance(v, torch.Tensor) and isinstance(d, list)
                                         else v for v, d in zip(val, dims))


def _resized(val: torch.Tensor, dims: list, masks: KeepMasks) -> torch.Tensor:
    if len(dims) != val.dim():
        return val
    shape = [_new_literal(masks, v, s) for v, s in zip(dims, val.shape)]
    return val if shape == list(val.shape) else val.new_empty(shape)  # a fake tensor stays fake


def _int_arg(node: fx.Node, pos: int, default: Any) -> Any:
    return node.args[pos] if len(node.args) > pos else default


def _new_literal(masks: KeepMasks, var: int, literal: Any) -> Any:
    if not isinstance(literal, int) or literal == -1:
        return literal  # symbolic sizes and -1 recompute themselves
    size = masks.new_size(var)
    return literal if size is None else size


def _set_attr(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    path, leaf = dotted.rsplit(".", 1)
    try:
        owner = root.get_submodule(path)
    except AttributeError:
        return
    if leaf in owner._parameters:
        owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value


def masked_copy(program: Program, dg: DependencyGraph, plan: Plan) -> nn.Module:
    """The reference for exactness checks: a copy of the model with pruned units zeroed, not removed.

    For MLP channels, whole heads and whole kv groups, removal equals this masking exactly.
    """
    plan.validate(dg)
    masks = KeepMasks(dg, plan)
    model = copy.deepcopy(program.model)
    with torch.no_grad():
        for name, dims in _param_indices(program, dg, masks).items():
            t = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
            for d, kept in dims.items():
                drop = np.setdiff1d(np.arange(t.shape[d]), kept)
                t.index_fill_(d, torch.as_tensor(drop), 0.0)
    return model
