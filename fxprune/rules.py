"""Coupling rules: the op -> rule table.

A rule looks at one FX node (ATen level, as ``torch.export`` produces it) and relates the dim
variables of its inputs and outputs through the :class:`~fxprune.dims.DimSolver`. Rules are data:
``RULES`` maps an op name to a function; :func:`rule_for` looks an op up. An op with no rule is
*unknown*: every dim it touches is pinned and the node is named in the report, so an op the rules
don't know can never lead to a wrong model.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from .dims import DimSolver

Size = Any  # an int, or a sympy expression for symbolic (batch / sequence) sizes


def op_name(node: fx.Node) -> str:
    """A short, stable name for the node's target: ``linear``, ``view``, ``getitem``..."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    return getattr(t, "__name__", str(t))


def module_path(node: fx.Node, prefix: str = "") -> str:
    """The innermost module that produced ``node`` (``model.layers.3.mlp``), or ''."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _clean_path(path)
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :]
    return path


def _clean_path(path: str) -> str:
    # torch.export spells module paths like L['self'].model.layers[0]; normalise to dotted names.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("[", ".").replace("]", "").split("."):
        if part.startswith("_modules"):
            continue
        out.append(part.strip("'\""))
    return ".".join(p for p in out if p)


@dataclass
class Ctx:
    """What a rule sees: the solver, the dims of every node computed so far, and a log of edges."""

    solver: DimSolver
    dims: dict[fx.Node, Any] = field(default_factory=dict)
    edges: list[tuple[int, int, str, str]] = field(default_factory=list)
    unknown: list[tuple[str, list[int]]] = field(default_factory=list)  # (where, dims it pinned)
    inexact: set[str] = field(default_factory=set)
    align: dict[str, int] = field(default_factory=dict)  # dim var -> kept units must be a multiple of this
    prefix: str = ""

    # -- shapes ----------------------------------------------------------------------------------
    @staticmethod
    def shape(x: Any) -> list[Size] | None:
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if isinstance(val, torch.Tensor):
            return [_size(s) for s in val.shape]
        return None

    def fresh(self, node: fx.Node, origin: str = "") -> Any:
        """New variables for every dim of ``node``'s value (nested for tuple outputs)."""
        val = node.meta.get("val")
        return self._fresh_val(val, origin or node.name)

    def _fresh_val(self, val: Any, origin: str) -> Any:
        if isinstance(val, torch.Tensor):
            return [self.solver.new(_int_or_none(s), origin) for s in val.shape]
        if isinstance(val, (list, tuple)):
            return [self._fresh_val(v, origin) for v in val]
        return None

    def d(self, x: Any) -> list[int] | None:
        """Dim variables of an argument (None for non-tensors)."""
        if isinstance(x, fx.Node):
            dims = self.dims.get(x)
            if dims is not None and (not dims or isinstance(dims[0], int)):
                return dims
        return None

    # -- relations -------------------------------------------------------------------------------
    def unify(self, a: int, b: int, node: fx.Node) -> None:
        self.edges.append((a, b, op_name(node), node.name))
        self.solver.unify(a, b)

    def pin_node(self, node: fx.Node, reason: str) -> None:
        """Pin every dim of every tensor input and output of ``node``."""
        for x in _tensor_args(node):
            for v in self.d(x) or []:
                self.solver.pin(v, reason)
        for v in _flatten(self.dims.get(node)):
            self.solver.pin(v, reason)

    def where(self, node: fx.Node) -> str:
        path = module_path(node, self.prefix)
        return f"node {node.name} (op {op_name(node)}" + (f", module {path})" if path else ")")


def _size(s: Any) -> Size:
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        known = s.node.maybe_as_int()  # int(s) would return the example's value: keep it symbolic
        return known if known is not None else s.node.expr  # a sympy expression: s0, s0*s1...
    return str(s)


def _int_or_none(s: Any) -> int | None:
    v = _size(s)
    return v if isinstance(v, int) else None


def _results(out: Any) -> list[list[int]]:
    """The dims of each result of a node: one list, or one per element of a tuple output
    (max.dim's values and indices, native_layer_norm's output and statistics)."""
    return out if out and isinstance(out[0], list) else [out]


def _flatten(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    out: list[int] = []
    for y in x:
        out.extend(_flatten(y))
    return out


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    for a in node.all_input_nodes:
        if isinstance(a.meta.get("val"), (torch.Tensor, list, tuple)):
            out.append(a)
    return out


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# ------------------------------------------------------------------------------------------------
# Rules. Each takes (ctx, node) and sets ctx.dims[node].
# ------------------------------------------------------------------------------------------------


def ignore(ctx: Ctx, node: fx.Node) -> None:
    """Ops that carry no channel data (shape queries, asserts)."""
    ctx.dims[node] = ctx.fresh(node)


def elementwise(ctx: Ctx, node: fx.Node) -> None:
    """Same-position dims of all tensor operands are the same channels (numpy broadcasting)."""
    out = ctx.fresh(node)
    ctx.dims[node] = out
    out_shape = ctx.shape(node)
    if out_shape is None:
        return
    args = list(node.args) + list(node.kwargs.values())
    for a in args:
        dims, shape = ctx.d(a), ctx.shape(a)
        if dims is None or shape is None:
            continue
        for k in range(1, len(shape) + 1):
            if k > len(out_shape):
                break
            if shape[-k] == 1 and out_shape[-k] != 1:
                continue  # broadcast
            ctx.unify(dims[-k], out[-k], node)


def inexact_elementwise(ctx: Ctx, node: fx.Node) -> None:
    elementwise(ctx, node)


def softmax(ctx: Ctx, node: fx.Node) -> None:
    """softmax / log_softmax(x, dim): elementwise in shape, but normalised over ``dim``, so
    removing channels there is not the same as zeroing them (the group is marked inexact)."""
    elementwise(ctx, node)
    xd = ctx.d(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if xd and isinstance(dim, int):
        ctx.inexact.add(f"{xd[_norm_dim(dim, len(xd))]}")


# (position of dim, position of keepdim) where it is not (1, 2): norms take the order p first
REDUCTION_ARGS = {"linalg_vector_norm": (2, 3), "norm": (2, 3)}


def reduction(ctx: Ctx, node: fx.Node) -> None:
    """mean/sum/amax over some dims: the kept dims pass through. Pruning a reduced dim is
    structurally fine but changes the value, so the group is marked inexact."""
    x = node.args[0]
    xd, xs = ctx.d(x), ctx.shape(x)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    if xd is None or xs is None:
        return
    rank = len(xs)
    dim_pos, keep_pos = REDUCTION_ARGS.get(op_name(node), (1, 2))
    dims_arg = node.args[dim_pos] if len(node.args) > dim_pos else node.kwargs.get("dim")
    if dims_arg is None or dims_arg == []:
        reduced = set(range(rank))
    elif isinstance(dims_arg, int):
        reduced = {_norm_dim(dims_arg, rank)}
    else:
        reduced = {_norm_dim(int(d), rank) for d in dims_arg}
    keepdim = bool(node.args[keep_pos]) if len(node.args) > keep_pos else bool(node.kwargs.get("keepdim", False))
    for i in reduced:
        ctx.inexact.add(f"{xd[i]}")
    # max.dim / var_mean give a tuple of same-shaped results (values and indices)
    for o in _results(out):
        j = 0
        for i in range(rank):
            if i not in reduced:
                ctx.unify(xd[i], o[j], node)
            j += i not in reduced or keepdim


def linear(ctx: Ctx, node: fx.Node) -> None:
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    out = ctx.fresh(node)
    ctx.dims[node] = out
    xd, wd = ctx.d(x), ctx.d(w)
    for i in range(len(out) - 1):
        ctx.unify(xd[i], out[i], node)
    ctx.unify(xd[-1], wd[1], node)
    ctx.unify(out[-1], wd[0], node)
    bd = ctx.d(b)
    if bd:
        ctx.unify(bd[0], out[-1], node)


def _matmul_dims(ctx: Ctx, node: fx.Node, a: Any, b: Any, out: list[int]) -> None:
    ad, bd = ctx.d(a), ctx.d(b)
    as_, bs = ctx.shape(a), ctx.shape(b)
    if len(ad) == 1 or len(bd) == 1:
        ctx.pin_node(node, f"matmul with a 1-D operand at {ctx.where(node)}")
        return
    ctx.unify(ad[-1], bd[-2], node)
    ctx.unify(ad[-2], out[-2], node)
    ctx.unify(bd[-1], out[-1], node)
    # batch dims broadcast
    for dims, shape in ((ad, as_), (bd, bs)):
        for k in range(3, len(shape) + 1):
            if k > len(out):
                break
            if shape[-k] == 1 and ctx.shape(node)[-k] != 1:
                continue
            ctx.unify(dims[-k], out[-k], node)


def matmul(ctx: Ctx, node: fx.Node) -> None:
    out = ctx.fresh(node)
    ctx.dims[node] = out
    _matmul_dims(ctx, node, node.args[0], node.args[1], out)


def grouped_mm(ctx: Ctx, node: fx.Node) -> None:
    """grouped_mm(x (S, in), w (experts, in, out), offs): each token's row times its expert's matrix,
    so ``in`` and ``out`` couple like a matmul's across every expert at once (a channel goes from all
    experts together); the rows pass through. Mixture-of-experts layers in transformers 5."""
    x, w = node.args[0], node.args[1]
    xd, wd = ctx.d(x), ctx.d(w)
    if xd is None or wd is None or len(xd) != 2 or len(wd) != 3:
        unknown(ctx, node)
        return
    out = ctx.fresh(node)
    ctx.dims[node] = out
    ctx.unify(xd[0], out[0], node)
    ctx.unify(xd[1], wd[1], node)
    ctx.unify(wd[2], out[1], node)
    ctx.solver.pin(wd[0], f"number of experts (the router chooses among them) at {ctx.where(node)}")
    val = w.meta.get("val") if isinstance(w, fx.Node) else None
    if isinstance(val, torch.Tensor):  # torch's grouped matmul needs rows of 16 bytes
        rows = max(1, 16 // val.element_size())
        for v in (wd[1], wd[2]):
            ctx.align[str(v)] = max(ctx.align.get(str(v), 1), rows)


def addmm(ctx: Ctx, node: fx.Node) -> None:
    """addmm(bias, x, w) / baddbmm(bias, x, w): a matmul plus a broadcast bias."""
    out = ctx.fresh(node)
    ctx.dims[node] = out
    _matmul_dims(ctx, node, node.args[1], node.args[2], out)
    bias, bs = ctx.d(node.args[0]), ctx.shape(node.args[0])
    if bias is not None:
        out_shape = ctx.shape(node)
        for k in range(1, len(bs) + 1):
            if bs[-k] == 1 and out_shape[-k] != 1:
                continue
            ctx.unify(bias[-k], out[-k], node)


def permute(ctx: Ctx, node: fx.Node) -> None:
    xd = ctx.d(node.args[0])
    rank = len(xd)
    name = op_name(node)
    if name in ("t", "numpy_T"):
        order = list(range(rank))[::-1]
    elif name in ("transpose", "swapaxes", "swapdims"):
        i, j = (_norm_dim(int(v), rank) for v in node.args[1:3])
        order = list(range(rank))
        order[i], order[j] = order[j], order[i]
    else:  # permute
        order = [_norm_dim(int(v), rank) for v in node.args[1]]
    out = ctx.fresh(node)
    ctx.dims[node] = out
    for o, i in enumerate(order):
        ctx.unify(xd[i], out[o], node)


def reshape(ctx: Ctx, node: fx.Node) -> None:
    """view / reshape / flatten / unflatten / squeeze / unsqueeze, from the two shapes alone.

    Contiguous runs of input and output dims with equal products are matched; a run of one input
    dim and several output dims is a split (the input dim is their product), the reverse is a merge.
    """
    x = node.args[0]
    xd, xs = ctx.d(x), ctx.shape(x)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    os_ = ctx.shape(node)
    i = j = 0
    solver = ctx.solver
    sizes = node.args[1] if len(node.args) > 1 and op_name(node) in ("view", "reshape", "_unsafe_view") else None
    if isinstance(sizes, (list, tuple)) and len(sizes) == len(os_):
        for k in range(len(sizes) - 1):
            # a head count written -1 that comes out as 1 (SegFormer's one-head stages): the module
            # computes the shape from head_dim, so these channels are one whole head
            if sizes[k] == -1 and os_[k] == 1 and isinstance(sizes[k + 1], int) and sizes[k + 1] > 1:
                solver.pin(out[k + 1], f"head_dim of a single head (head count -1 is 1) at {ctx.where(node)}")
    while i < len(xs) or j < len(os_):
        if i < len(xs) and xs[i] == 1:
            i += 1
            continue
        if j < len(os_) and os_[j] == 1:
            j += 1
            continue
        if i >= len(xs) or j >= len(os_):
            ctx.pin_node(node, f"reshape not understood at {ctx.where(node)}")
            return
        if xs[i] == os_[j]:
            ctx.unify(xd[i], out[j], node)
            i += 1
            j += 1
            continue
        # accumulate a run of dims on each side until the products agree
        i0, j0 = i, j
        pa, pb = xs[i], os_[j]
        i += 1
        j += 1
        while pa != pb and (i < len(xs) or j < len(os_)):
            grow_a = j >= len(os_) or (i < len(xs) and _smaller(pa, pb))
            if grow_a:
                pa = pa * xs[i]
                i += 1
            else:
                pb = pb * os_[j]
                j += 1
        run_in, run_out = list(range(i0, i)), list(range(j0, j))
        if pa != pb:
            for v in xd[i0:] + out[j0:]:
                solver.pin(v, f"reshape not understood at {ctx.where(node)}")
            return
        if not all(isinstance(xs[k], int) for k in run_in) or not all(isinstance(os_[k], int) for k in run_out):
            # batch x sequence merges (GPT-2's Conv1D view): channels never move inside such a run
            for k in run_in:
                if isinstance(xs[k], int) and xs[k] > 1:
                    solver.pin(xd[k], f"channel dim merged with batch/sequence at {ctx.where(node)}")
            for k in run_out:
                if isinstance(os_[k], int) and os_[k] > 1:
                    solver.pin(out[k], f"channel dim merged with batch/sequence at {ctx.where(node)}")
            continue
        ins = [xd[k] for k in run_in if xs[k] != 1]
        outs = [out[k] for k in run_out if os_[k] != 1]
        ctx.edges.append((ins[0], outs[0], "reshape", node.name))
        if len(ins) == 1:
            solver.define_prod(ins[0], outs)
        elif len(outs) == 1:
            solver.define_prod(outs[0], ins)
        else:  # many-to-many: go through one merged variable
            merged = solver.new(pa, node.name)
            solver.define_prod(merged, ins)
            solver.define_prod(merged, outs)


def _smaller(a: Size, b: Size) -> bool:
    """a < b for sizes that may be symbolic: a symbol counts as larger than any int."""
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    if isinstance(a, int):
        return True
    if isinstance(b, int):
        return False
    return len(str(a)) < len(str(b))


def expand(ctx: Ctx, node: fx.Node) -> None:
    """expand: size-1 dims become new *broadcast* variables (GQA's query heads per kv head,
    ``k[:, :, None].expand(b, kv, n, s, d)``). Only a non-trailing dim of ``expand`` is marked:
    a trailing one, or ``expand_as`` (F.normalize's ``norm.expand_as(x)``), is plain broadcasting
    against a tensor whose channels (head_dim) must not be mistaken for query heads."""
    x = node.args[0]
    xd, xs = ctx.d(x), ctx.shape(x)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    os_ = ctx.shape(node)
    lead = len(os_) - len(xs)
    gqa_like = op_name(node) == "expand"
    for k in range(len(xs)):
        if xs[k] == 1 and os_[lead + k] != 1:
            if gqa_like and lead + k < len(os_) - 1:
                ctx.solver.broadcast.add(ctx.solver.find(out[lead + k]))
            continue
        ctx.unify(xd[k], out[lead + k], node)


def cat(ctx: Ctx, node: fx.Node) -> None:
    tensors = [t for t in node.args[0] if ctx.d(t) is not None]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    rank = len(out)
    dim = _norm_dim(int(dim), rank)
    parts = []
    for t in tensors:
        td = ctx.d(t)
        if len(td) != rank:  # legacy empty-tensor cat
            continue
        for k in range(rank):
            if k != dim:
                ctx.unify(td[k], out[k], node)
        parts.append(td[dim])
        ctx.edges.append((td[dim], out[dim], "cat", node.name))
    ctx.solver.define_cat(out[dim], parts)


def stack(ctx: Ctx, node: fx.Node) -> None:
    """stack(tensors, dim): a new dim of len(tensors) at ``dim``; every other dim is shared."""
    tensors = [t for t in node.args[0] if ctx.d(t) is not None]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = ctx.fresh(node)
    rest = [out[k] for k in range(len(out)) if k != _norm_dim(int(dim), len(out))]
    if any(len(ctx.d(t)) != len(rest) for t in tensors):  # not what stack takes: leave nothing uncoupled
        unknown(ctx, node)
        return
    ctx.dims[node] = out
    for t in tensors:
        for a, b in zip(ctx.d(t), rest):
            ctx.unify(a, b, node)


def repeat_interleave(ctx: Ctx, node: fx.Node) -> None:
    """repeat_interleave(x, r, dim): each position of ``dim`` repeated r times; the other dims pass
    through. Removing a channel there would remove r of the output's, so that dim is pinned on both
    sides. Tensor repeats or no ``dim`` (a flattened output): not known, everything pinned."""
    x = node.args[0] if node.args else None
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    xd = ctx.d(x) if isinstance(x, fx.Node) else None
    if xd is None or not isinstance(repeats, int) or not isinstance(dim, int):
        unknown(ctx, node)
        return
    out = ctx.fresh(node)
    ctx.dims[node] = out
    dim = _norm_dim(dim, len(xd))
    for k in range(len(xd)):
        if k == dim:
            for v in (xd[k], out[k]):
                ctx.solver.pin(v, f"repeat_interleave over the dim at {ctx.where(node)}")
        else:
            ctx.unify(xd[k], out[k], node)


def split(ctx: Ctx, node: fx.Node) -> None:
    """split / split_with_sizes / chunk / unbind: the input dim is the concatenation of the pieces."""
    x = node.args[0]
    xd = ctx.d(x)
    rank = len(xd)
    name = op_name(node)
    dim_pos = 1 if name == "unbind" else 2
    dim = node.args[dim_pos] if len(node.args) > dim_pos else node.kwargs.get("dim", 0)
    dim = _norm_dim(int(dim), rank)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    pieces = []
    for piece in out:
        if name == "unbind":
            v = ctx.solver.new(1, node.name)
            pieces.append(v)
            others = piece
            src = [k for k in range(rank) if k != dim]
            for o, k in zip(others, src):
                ctx.unify(xd[k], o, node)
            continue
        for k in range(rank):
            if k != dim:
                ctx.unify(xd[k], piece[k], node)
        pieces.append(piece[dim])
        ctx.edges.append((xd[dim], piece[dim], name, node.name))
    if name == "unbind":
        ctx.solver.pin(xd[dim], f"unbind along a channel dim at {ctx.where(node)}")
    if ctx.shape(x)[dim] is not None and isinstance(ctx.shape(x)[dim], int):
        ctx.solver.define_cat(xd[dim], pieces)


def slice_(ctx: Ctx, node: fx.Node) -> None:
    x = node.args[0]
    xd, xs = ctx.d(x), ctx.shape(x)
    rank = len(xd)
    dim = _norm_dim(int(node.args[1]) if len(node.args) > 1 else 0, rank)
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    out = ctx.fresh(node)
    ctx.dims[node] = out
    os_ = ctx.shape(node)
    for k in range(rank):
        if k != dim:
            ctx.unify(xd[k], out[k], node)
    size = xs[dim]
    if os_[dim] == size:
        ctx.unify(xd[dim], out[dim], node)
        return
    if not isinstance(size, int):
        return  # slicing the sequence or batch: no channels involved
    if step != 1 and _interleaved(ctx, node, xd[dim], out[dim], size, start, end, step):
        return
    if not isinstance(start, int) or not (end is None or isinstance(end, int)) or step != 1:
        ctx.solver.pin(xd[dim], f"strided or symbolic slice at {ctx.where(node)}")
        return
    start = max(0, start + size if start < 0 else start)
    end = size if end is None else min(size, end + size if end < 0 else end)
    parts = []
    if start > 0:
        parts.append(ctx.solver.new(start, node.name))
    parts.append(out[dim])
    if end < size:
        parts.append(ctx.solver.new(size - end, node.name))
    ctx.edges.append((xd[dim], out[dim], "slice", node.name))
    ctx.solver.define_cat(xd[dim], parts)


def _interleaved(ctx: Ctx, node: fx.Node, src: int, dst: int, size: int, start: Any, end: Any, step: Any) -> bool:
    """``x[..., s::k]`` over a whole dim (s < k): the dim is (channel, k) row-major and the slice
    takes position s of each channel's k (GPT-OSS's interleaved gate / up), so channels prune
    with all k of their positions. The rewrite leaves such a slice as it is."""
    if not (isinstance(step, int) and isinstance(start, int) and 0 <= start < step and size % step == 0
            and (end is None or (isinstance(end, int) and end >= size))):
        return False
    inner = ctx.solver.new(step, node.name)
    ctx.solver.pin(inner, f"interleaved positions (strided slice) at {ctx.where(node)}")
    ctx.solver.strided.add(ctx.solver.find(dst))
    ctx.edges.append((src, dst, "slice", node.name))
    ctx.solver.define_prod(src, [dst, inner])
    return True


def index(ctx: Ctx, node: fx.Node) -> None:
    """``x[i]`` / ``x[i, j]`` with integer index tensors on the leading dims: those dims are gathered
    by data (an expert's bias by expert id, tokens by routing order) and pinned; the dims after them
    pass through. Boolean masks and indices after a skipped dim are left to ``unknown``."""
    x, idx = node.args[0], node.args[1] if len(node.args) > 1 else None
    xd, xs = ctx.d(x), ctx.shape(x)
    vals = [i.meta.get("val") if isinstance(i, fx.Node) else None for i in idx or []]
    if (xd is None or not idx or len(idx) > len(xd)
            or any(not isinstance(v, torch.Tensor) or v.dtype == torch.bool for v in vals)):
        unknown(ctx, node)
        return
    out = ctx.fresh(node)
    ctx.dims[node] = out
    lead = len(out) - (len(xd) - len(idx))
    reason = f"dim gathered by index at {ctx.where(node)}"
    for k in range(len(idx)):
        if isinstance(xs[k], int) and xs[k] > 1:
            ctx.solver.pin(xd[k], reason)
    for v in out[:lead]:  # one entry per index position: chosen by data, never channels
        ctx.solver.pin(v, reason)
    for k in range(len(idx), len(xd)):
        ctx.unify(xd[k], out[lead + k - len(idx)], node)


def sort_topk(ctx: Ctx, node: fx.Node) -> None:
    """sort / topk / argsort along a dim: positions along it are reordered (or chosen) by value,
    so it is pinned; the other dims pass through to the values and the indices."""
    x = node.args[0]
    xd, xs = ctx.d(x), ctx.shape(x)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    if xd is None:
        return
    pos = {"topk": 2}.get(op_name(node), 1)
    dim = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", -1)
    dim = _norm_dim(int(dim) if isinstance(dim, int) else -1, len(xd))
    reason = f"dim sorted by value at {ctx.where(node)}"
    if isinstance(xs[dim], int) and xs[dim] > 1:
        ctx.solver.pin(xd[dim], reason)
    for o in _results(out):
        for k in range(min(len(xd), len(o))):
            if k != dim:
                ctx.unify(xd[k], o[k], node)
            else:  # positions in value order: whatever reads them cannot prune them either
                ctx.solver.pin(o[k], reason)


def getitem(ctx: Ctx, node: fx.Node) -> None:
    src, idx = node.args
    dims = ctx.dims.get(src)
    if isinstance(dims, list) and isinstance(idx, int) and idx < len(dims) and dims[idx] is not None:
        ctx.dims[node] = dims[idx]
    else:
        ctx.dims[node] = ctx.fresh(node)
        ctx.pin_node(node, f"indexing not understood at {ctx.where(node)}")


def embedding(ctx: Ctx, node: fx.Node) -> None:
    w, ids = node.args[0], node.args[1]
    wd, idd = ctx.d(w), ctx.d(ids)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    for i in range(len(idd)):
        ctx.unify(idd[i], out[i], node)
    ctx.unify(wd[1], out[-1], node)
    ctx.solver.pin(wd[0], "vocabulary (embedding rows are looked up by token id)")


def layer_norm(ctx: Ctx, node: fx.Node) -> None:
    """layer_norm / rms_norm (x, normalized_shape, weight, bias, eps): normalises the last dims."""
    x = node.args[0]
    xd = ctx.d(x)
    nshape = node.args[1]
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    b = node.args[3] if len(node.args) > 3 and op_name(node) != "rms_norm" else node.kwargs.get("bias")
    out = ctx.fresh(node)
    ctx.dims[node] = out
    out_main = _results(out)[0]
    for k in range(len(xd)):
        ctx.unify(xd[k], out_main[k], node)
    n = len(nshape)
    for p in (w, b):
        pd = ctx.d(p)
        if pd:
            for k in range(1, n + 1):
                ctx.unify(pd[-k], xd[-k], node)
    for k in range(1, n + 1):
        ctx.inexact.add(f"{xd[-k]}")
    if n > 1:
        for k in range(2, n + 1):
            ctx.solver.pin(xd[-k], f"multi-dim normalisation at {ctx.where(node)}")


def batch_norm(ctx: Ctx, node: fx.Node) -> None:
    """batch_norm (x, weight, bias, running_mean, running_var, ...): per-channel statistics and
    affine over dim 1, so every per-channel tensor shares that dim and the rest pass through. Each
    channel is normalised on its own: removing one is the same as zeroing it."""
    x = node.args[0]
    xd = ctx.d(x)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    main = _results(out)[0]  # native variants return a tuple
    if xd is None or len(xd) < 2:
        return
    for k in range(len(xd)):
        ctx.unify(xd[k], main[k], node)
    for p in node.args[1:5]:
        pd = ctx.d(p) if isinstance(p, fx.Node) else None
        if pd:
            ctx.unify(pd[0], xd[1], node)


def pool(ctx: Ctx, node: fx.Node) -> None:
    """max / avg / adaptive pooling over the last 1-3 dims: the leading (batch, channel) dims pass
    through, the pooled ones get new sizes."""
    x = node.args[0]
    xd = ctx.d(x)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    if xd is None:
        return
    spatial = int(op_name(node).split("pool")[1][0])  # max_pool2d -> 2, adaptive_avg_pool1d -> 1
    for o in _results(out):  # with_indices: (values, indices)
        for k in range(len(xd) - spatial):
            ctx.unify(xd[k], o[k], node)
    for v in xd[len(xd) - spatial:]:  # a pooled dim's size decides the output's: never a channel to remove
        ctx.solver.pin(v, f"pooled dim at {ctx.where(node)}")


def pad(ctx: Ctx, node: fx.Node) -> None:
    """pad / constant_pad_nd (x, pad): the last len(pad) / 2 dims grow by their padding (pinned
    where it is not zero: their size is a literal); the other dims pass through."""
    x, amounts = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    xd = ctx.d(x)
    if xd is None or not isinstance(amounts, (list, tuple)) or len(amounts) % 2 or len(amounts) // 2 > len(xd):
        unknown(ctx, node)
        return
    out = ctx.fresh(node)
    ctx.dims[node] = out
    for i in range(len(xd)):
        j = len(xd) - 1 - i  # amounts come in (before, after) pairs from the last dim backwards
        if 2 * j + 1 < len(amounts) and (amounts[2 * j] != 0 or amounts[2 * j + 1] != 0):
            for v in (xd[i], out[i]):
                ctx.solver.pin(v, f"padded dim at {ctx.where(node)}")
        else:
            ctx.unify(xd[i], out[i], node)


def sdpa(ctx: Ctx, node: fx.Node) -> None:
    """scaled_dot_product_attention(q, k, v, mask): heads line up across q/k/v; q.k contract
    head_dim; the output's last dim is v's."""
    q, k, v = node.args[:3]
    qd, kd, vd = ctx.d(q), ctx.d(k), ctx.d(v)
    out = ctx.fresh(node)
    ctx.dims[node] = out
    if node.kwargs.get("enable_gqa"):
        ctx.pin_node(node, f"SDPA with enable_gqa at {ctx.where(node)}")
        return
    for i in range(len(qd) - 2):
        ctx.unify(qd[i], kd[i], node)
        ctx.unify(qd[i], vd[i], node)
        ctx.unify(qd[i], out[i], node)
    ctx.unify(qd[-1], kd[-1], node)
    if node.kwargs.get("scale") is None and (len(node.args) < 7 or node.args[6] is None):
        # the default scale is 1/sqrt(q.size(-1)): removing q/k channels would change it. Heads
        # are pruned whole anyway; this matters when one head leaves no heads x head_dim split
        ctx.solver.pin(qd[-1], f"head_dim sets SDPA's default scale at {ctx.where(node)}")
    ctx.unify(kd[-2], vd[-2], node)
    ctx.unify(qd[-2], out[-2], node)
    ctx.unify(vd[-1], out[-1], node)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    md, ms = ctx.d(mask), ctx.shape(mask)
    if md:
        qs = ctx.shape(q)
        target = qs[:-1] + [ctx.shape(k)[-2]]
        tdims = qd[:-1] + [kd[-2]]
        for j in range(1, len(ms) + 1):
            if ms[-j] == 1 and target[-j] != 1:
                continue
            ctx.unify(md[-j], tdims[-j], node)


# where each convolution op takes ``groups`` (after x, w, b, stride, padding, dilation[, transposed, output_padding])
CONV_GROUPS_ARG = {"conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8}


def conv(ctx: Ctx, node: fx.Node) -> None:
    """conv1d/2d/3d(x, w, b, stride, padding, dilation, groups): channels are dim 1."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    name = op_name(node)
    pos = CONV_GROUPS_ARG[name]
    groups = node.args[pos] if len(node.args) > pos else 1
    out = ctx.fresh(node)
    ctx.dims[node] = out
    if name == "convolution" and node.args[6]:
        ctx.pin_node(node, f"transposed convolution at {ctx.where(node)}")
        return
    xs, ws = ctx.shape(x), ctx.shape(w)
    # depthwise (MobileNet, EfficientNet, ConvNeXt): one group per channel, input channel c -> output c
    depthwise = groups != 1 and bool(xs and ws) and ws[1] == 1 and groups == xs[1] == ws[0]
    if groups != 1 and not depthwise:
        ctx.pin_node(node, f"grouped convolution at {ctx.where(node)}")
        return
    xd, wd = ctx.d(x), ctx.d(w)
    ctx.unify(xd[0], out[0], node)
    ctx.unify(out[1], wd[0], node)
    if depthwise:
        ctx.unify(xd[1], out[1], node)
        ctx.solver.pin(wd[1], f"one input channel per group of a depthwise convolution at {ctx.where(node)}")
    else:
        ctx.unify(xd[1], wd[1], node)
    for k in wd[2:]:  # the kernel's taps are not channels
        ctx.solver.pin(k, f"convolution kernel size at {ctx.where(node)}")
    bd = ctx.d(b)
    if bd:
        ctx.unify(bd[0], out[1], node)


# position of the size list of creation ops whose every element is the same value: pruning any
# positions of such a tensor is exact once the rewrite shrinks the size (T5's zero position bias,
# torch.zeros((1, n_heads, q, k)), for attention without a relative bias of its own)
FILLED_SIZE_ARG = {"zeros": 0, "ones": 0, "full": 0, "empty": 0,
                   "new_zeros": 1, "new_ones": 1, "new_full": 1, "new_empty": 1}


def creation(ctx: Ctx, node: fx.Node) -> None:
    """zeros / ones / full: dims with an int size literal stay free (the rewrite shrinks the
    literal); arange / randn / tensor...: values differ along each dim, so constant sizes pin."""
    out = ctx.fresh(node)
    ctx.dims[node] = out
    shape = ctx.shape(node) or []
    pos = FILLED_SIZE_ARG.get(op_name(node))
    sizes = node.args[pos] if pos is not None and len(node.args) > pos else None
    literal = isinstance(sizes, (list, tuple)) and len(sizes) == len(shape)
    for k, (v, s) in enumerate(zip(_flatten(out), shape)):
        if literal and isinstance(sizes[k], int) and sizes[k] == s:
            continue
        if isinstance(s, int) and s > 1:
            ctx.solver.pin(v, f"tensor created with a constant size at {ctx.where(node)}")


def unknown(ctx: Ctx, node: fx.Node) -> None:
    out = ctx.fresh(node)
    ctx.dims[node] = out
    if not _tensor_args(node) and not _flatten(out):
        return
    where = ctx.where(node)
    touched = [v for x in _tensor_args(node) for v in _flatten(ctx.d(x))] + _flatten(out)
    ctx.unknown.append((where, touched))
    ctx.pin_node(node, f"op the rules don't know: {where}")


def select(ctx: Ctx, node: fx.Node) -> None:
    """select(x, dim, i): picks one position, so a channel dim there can't change size."""
    x = node.args[0]
    xd, xs = ctx.d(x), ctx.shape(x)
    dim = _norm_dim(int(node.args[1]), len(xd))
    out = ctx.fresh(node)
    ctx.dims[node] = out
    rest = [k for k in range(len(xd)) if k != dim]
    for o, k in zip(out, rest):
        ctx.unify(xd[k], o, node)
    if isinstance(xs[dim], int) and xs[dim] > 1:
        ctx.solver.pin(xd[dim], f"select of a fixed channel at {ctx.where(node)}")


ELEMENTWISE = """
abs add sub rsub mul div true_divide floor_divide remainder pow neg exp exp2 log log2 log1p sqrt
rsqrt reciprocal sin cos tan tanh sigmoid silu gelu relu relu6 leaky_relu elu selu celu softplus mish
hardtanh hardswish hardsigmoid erf erfc sign clamp clamp_min clamp_max clip maximum minimum where
masked_fill eq ne lt le gt ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or
bitwise_not bitwise_xor __and__ __or__ __xor__ __invert__ to _to_copy type_as clone contiguous
detach alias lift_fresh_copy dropout native_dropout feature_dropout alpha_dropout
zeros_like ones_like full_like empty_like rand_like randn_like fill copy square
isnan isinf nan_to_num lerp addcmul addcdiv floor ceil round trunc frac triu tril
expm1 sinh cosh asinh acosh atanh asin acos atan atan2 arctan2 fmod fmax fmin hypot logaddexp xlogy
float_power logit erfinv sgn signbit log_sigmoid
""".split()


def min_max(ctx: Ctx, node: fx.Node) -> None:
    """``min`` / ``max`` of two tensors is elementwise (Apertus's xIELU clamps with it); over all
    elements or along a dim (values and indices: GPT-OSS's attention sinks) it is a reduction."""
    if getattr(node.target, "_overloadname", "") == "other" or (
            len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)):
        elementwise(ctx, node)
    else:
        reduction(ctx, node)

RULES: dict[str, Callable[[Ctx, fx.Node], None]] = {
    **{name: elementwise for name in ELEMENTWISE},
    **{name + "_": elementwise for name in ELEMENTWISE},
    **{name: softmax for name in ("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")},
    **{name: ignore for name in ("sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata",
                                 "_assert_scalar", "_assert_async", "sym_constrain_range",
                                 "sym_constrain_range_for_size", "scalar_tensor", "_local_scalar_dense",
                                 "sym_not", "sym_float", "sym_int", "sym_max", "sym_min", "sym_sum")},
    **{name: reduction for name in ("mean", "sum", "amax", "amin", "var", "std", "var_mean", "norm",
                                    "linalg_vector_norm", "prod", "logsumexp")},
    "min": min_max, "max": min_max,
    "linear": linear,
    "matmul": matmul, "mm": matmul, "bmm": matmul,
    "addmm": addmm, "baddbmm": addmm,
    "grouped_mm_fallback": grouped_mm, "_grouped_mm": grouped_mm,
    "t": permute, "numpy_T": permute, "transpose": permute, "swapaxes": permute, "swapdims": permute,
    "permute": permute,
    **{name: reshape for name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten",
                                  "squeeze", "unsqueeze")},
    "expand": expand, "expand_as": expand,
    "cat": cat, "concat": cat, "concatenate": cat,
    "stack": stack, "repeat_interleave": repeat_interleave,
    "split": split, "split_with_sizes": split, "chunk": split, "unbind": split,
    "tensor_split": split,
    "slice": slice_, "narrow": unknown, "select": select, "index": index,
    "sort": sort_topk, "topk": sort_topk, "argsort": sort_topk,
    "getitem": getitem,
    "embedding": embedding,
    "layer_norm": layer_norm, "native_layer_norm": layer_norm, "rms_norm": layer_norm,
    "scaled_dot_product_attention": sdpa,
    "conv1d": conv, "conv2d": conv, "conv3d": conv, "convolution": conv,
    **{name: batch_norm for name in ("batch_norm", "_native_batch_norm_legit_no_training",
                                     "_native_batch_norm_legit", "native_batch_norm")},
    **{f"{kind}_pool{n}d{suffix}": pool for kind in ("max", "avg", "adaptive_avg", "adaptive_max")
       for n in (1, 2, 3) for suffix in ("", "_with_indices")},
    "pad": pad, "constant_pad_nd": pad,
    **{name: creation for name in ("zeros", "ones", "full", "empty", "arange", "new_zeros", "new_ones",
                                   "new_full", "new_empty", "randn", "rand", "linspace", "tensor",
                                   "scalar_tensor")},
}

# Python-level operators on symbolic ints (batch and sequence arithmetic) carry no channels;
# names shared with ATen ops (add, mul...) keep the elementwise rule, which is a no-op on ints.
for _op in (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
            operator.mod, operator.neg, operator.pow, operator.eq, operator.ne, operator.lt,
            operator.le, operator.gt, operator.ge, math.floor, math.ceil):
    RULES.setdefault(_op.__name__, ignore)


def rule_for(node: fx.Node) -> Callable[[Ctx, fx.Node], None]:
    """The coupling rule for a call_function node (``unknown`` when none is known)."""
    return RULES.get(op_name(node), unknown)
