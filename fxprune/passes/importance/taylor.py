"""LLM-Pruner's Taylor importances, from weight gradients of the calibration loss.

Calibration loss
    ``req.batches`` holds token-id tensors ``(n, seqlen)`` for Hugging Face causal LMs (the loss is
    ``model(input_ids=b, labels=b, use_cache=False).loss``, the mean next-token cross-entropy of the
    batch). For a plain ``nn.Module`` a batch may instead be an ``(inputs, targets)`` pair, scored
    with the mean squared error of the model's main output; a dict batch is passed as keyword
    arguments (``labels`` defaults to ``input_ids``) and must produce ``.loss``.

    The loss whose gradient ``G`` we use is the **mean over samples**: with ``N`` rows in total,
    ``L = sum_b (n_b / N) * loss_b``, so ``G = (1/N) sum_s g_s`` (``g_s`` is the gradient of sample
    ``s``'s own loss; a sample is one row of one batch; exact because the rows of one batch share a
    length and token ids carry no padding). The second-order passes run one backward per sample and
    use the empirical diagonal Fisher ``F = (1/N) sum_s g_s**2`` (as LLM-Pruner's ``acc_grad``, which
    divides by ``num_examples``); ``taylor-mix`` takes ``G`` as the mean of those same ``g_s``.

Scores (one per unit; ``W`` a member parameter, the sum runs over the unit's slice of ``W``)
    ``taylor-vector``   ``| sum W*G |``                 (LLM-Pruner ``vectorize``: whole-structure Taylor)
    ``taylor-element1`` ``sum |W*G|``                   (``param_first``)
    ``taylor-element2`` ``sum 0.5 * W**2 * F``          (``param_second``, plus the Taylor 1/2 it omits)
    ``taylor-mix``      ``sum |W*G - 0.5 * W**2 * F|``  (``param_mix``: first-order minus half the
                                                         second-order term, per element, then abs)
    Per-member unit scores are combined with ``req.aggregate``; buffer members are skipped.

``taylor-vector`` needs only ``sum W*G`` over each unit's slice, which for a Linear weight is a sum of
activation x activation-gradient products (:class:`ActivationTaylor`): it stores no weight gradient
for those weights and skips their weight-gradient matmuls. The other passes need ``G`` per element.

Gradients are taken in eval mode (no dropout, deterministic) and only for parameters that are group
members (all others get ``requires_grad=False`` for the duration, so no gradient is stored for them).
Afterwards the model's ``requires_grad`` flags, train/eval modes and any ``.grad`` it had before are
put back, and no gradient tensor the pass made stays allocated.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ...capture import call_extras, main_outputs
from ...depgraph import Group, Member
from ...errors import FxpruneError
from ...lm_loss import lm_loss_fn
from .base import INPUT_DIM, ImportanceRequest, aggregate, param, unit_scores

# per-element scores of a parameter, or {dim: scores summed over the other dims (keepdim)}, or None
ElementFn = Callable[[str], "torch.Tensor | Mapping[int, torch.Tensor] | None"]


class ModelState:
    """A model's ``requires_grad`` flags, ``.grad`` references and train/eval modes, to restore later.

    Only references are kept (no tensor copies), so taking a snapshot costs no memory.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [(p, p.requires_grad, p.grad) for p in _unique_params(model)]
        self.modes = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        for p, flag, grad in self.params:
            p.requires_grad_(flag)
            p.grad = grad
        for m, training in self.modes:
            m.training = training


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():  # parameters() already de-duplicates tied ones; keep it explicit
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def freeze_all_but(model: nn.Module, trainable: list[torch.Tensor]) -> None:
    """Eval mode; only ``trainable`` requires grad and every ``.grad`` is cleared."""
    model.train(False)
    keep = {id(t) for t in trainable}
    for p in _unique_params(model):
        p.requires_grad_(id(p) in keep)
        p.grad = None


def _rows(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return int(next(iter(batch.values())).shape[0])
    return int(batch[1].shape[0])


def _split_samples(batch: Any) -> list[Any]:
    """One single-row batch per sample of ``batch``."""
    n = _rows(batch)
    if isinstance(batch, torch.Tensor):
        return [batch[i : i + 1] for i in range(n)]
    if isinstance(batch, Mapping):
        return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)]
    x, y = batch
    return [(x[i : i + 1], y[i : i + 1]) for i in range(n)]


def run_batch(model: nn.Module, batch: Any) -> Any:
    """The model's raw output on one calibration batch (token ids, a dict, or ``(inputs, targets)``)."""
    if isinstance(batch, torch.Tensor):
        if getattr(model, "config", None) is not None:
            return model(input_ids=batch, **call_extras(model))
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch, **call_extras(model))
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x = batch[0]
        return model(**x) if isinstance(x, Mapping) else model(x)
    raise FxpruneError(f"calibration batch must be token ids, a dict or (inputs, targets); "
                       f"got {type(batch).__name__}")


def calibration_output(model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
    """The model's raw output on one batch and its calibration loss, from one forward pass (see the
    module docstring for the accepted forms)."""
    if isinstance(batch, torch.Tensor):
        out = model(input_ids=batch, labels=batch, **call_extras(model))
        loss = getattr(out, "loss", None)
        if loss is None:
            raise FxpruneError("gradient importance on token ids needs a causal LM that returns .loss "
                               "when given labels; pass (inputs, targets) batches for other models")
        return out, loss
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if "input_ids" in kwargs:
            kwargs.setdefault("labels", kwargs["input_ids"])
        out = model(**kwargs, **call_extras(model))
        loss = getattr(out, "loss", None)
        if loss is None:
            raise FxpruneError("gradient importance: the model returned no .loss for a dict batch")
        return out, loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        out = model(**x) if isinstance(x, Mapping) else model(x)
        pred = main_outputs(out)[0][0]
        return out, F.mse_loss(pred.float(), y.float().reshape(pred.shape))
    raise FxpruneError(f"calibration batch must be token ids, a dict or (inputs, targets); "
                       f"got {type(batch).__name__}")


def calibration_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The calibration loss of one batch (see the module docstring for the accepted forms)."""
    return calibration_output(model, batch)[1]


def loss_function(model: nn.Module, batches: list[Any]) -> Callable[[Any], torch.Tensor]:
    """The calibration loss for ``batches``: on token-id tensors of a causal LM whose logits are its
    head over its decoder, the same loss with the head made in chunks (:mod:`fxprune.lm_loss`: no
    full logits tensor); otherwise :func:`calibration_loss`."""
    first = batches[0] if batches else None
    if isinstance(first, torch.Tensor) and getattr(model, "config", None) is not None:
        fast = lm_loss_fn(model, first)
        if fast is not None:
            return lambda b: fast(b) if isinstance(b, torch.Tensor) else calibration_loss(model, b)
    return lambda b: calibration_loss(model, b)


PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> None:
    """A clear error for a precision the gradient passes do not offer."""
    if precision not in PRECISIONS:
        raise FxpruneError(f"unknown precision '{precision}'; choose {' or '.join(PRECISIONS)}")


def _device(model: Any) -> str:
    """The device type of ``model``'s parameters ("cpu" when it has none or is not a module)."""
    params = model.parameters() if isinstance(model, nn.Module) else ()
    return next((p.device.type for p in params), "cpu")


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` runs bf16 matmuls natively. On a CPU without AVX512-BF16 or AMX, torch
    emulates them: SmolLM2's Taylor gradients took 258 s in bf16 against 15 s in fp32 on an AVX2
    EPYC. Other devices are left to torch."""
    if device != "cpu":
        return True
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def effective_precision(precision: str, model: Any) -> tuple[str, str | None]:
    """``(precision to run, note or None)``: ``bfloat16`` falls back to ``float32`` on a CPU
    that would emulate it, because it was asked for speed."""
    check_precision(precision)
    if precision == "bfloat16" and not native_bf16(_device(model)):
        return "float32", ("precision bfloat16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), "
                           "so the gradient passes ran in float32; emulated bf16 measured ~17x slower")
    return precision, None


def autocast(precision: str, model: nn.Module) -> Any:
    """A context running the forward in ``precision``: ``bfloat16`` is torch's autocast (matmuls in
    bf16 with fp32 accumulation; weights and their gradients stay fp32), ``float32`` does nothing."""
    check_precision(precision)
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(model), dtype=torch.bfloat16)


@contextlib.contextmanager
def bf16_weights(model: nn.Module, precision: str) -> Iterator[None]:
    """Under ``bfloat16``, the model's float32 parameters hold bf16 copies for the duration (the
    same ``Parameter`` objects; their float32 tensors are put back after, bit for bit).

    Autocast alone casts every weight again in every forward, and hands each weight gradient back
    to float32: SmolLM2's Taylor passes (2 x 5 x 128 tokens) spent ~20% of their time in those
    copies. Autocast stays on around the forward, so ops it keeps in float32 still run there; the
    weight gradients arrive in bf16 (the passes read them as float32)."""
    if precision != "bfloat16":
        yield
        return
    kept = [(p, p.data) for p in _unique_params(model) if p.dtype == torch.float32]
    try:
        for p, data in kept:
            p.data = data.to(torch.bfloat16)
        yield
    finally:
        for p, data in kept:
            p.data = data


EAGER_MAX_SEQ = 256  # longest calibration window for which gradient passes switch SDPA to eager attention


@contextlib.contextmanager
def gradient_attention(model: nn.Module, batches: list[Any], precision: str) -> Iterator[None]:
    """For bf16 gradients of short windows on CPU, a Hugging Face model's eager attention instead of
    SDPA for the duration (the config's choice is put back after).

    torch's CPU flash-attention backward is slow in bf16: SmolLM2, 5 x 128 tokens, 2-core AMX Xeon,
    decoder backward 0.56 s with SDPA against 0.34 s eager (the same in fp32, where nothing changes).
    Eager attention keeps the ``seq x seq`` probabilities for backward, so only windows of at most
    ``EAGER_MAX_SEQ`` tokens switch."""
    first = batches[0] if batches else None
    short = isinstance(first, torch.Tensor) and first.dim() == 2 and first.shape[1] <= EAGER_MAX_SEQ
    config = getattr(model, "config", None)
    was = getattr(config, "_attn_implementation", None)
    switch = (precision == "bfloat16" and _device(model) == "cpu" and short and was == "sdpa"
              and hasattr(model, "set_attn_implementation")
              and getattr(model, "_can_set_attn_implementation", lambda: False)())
    if not switch:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(was)


def require_batches(req: ImportanceRequest, tag: str) -> list[Any]:
    """``req.batches`` as a list, or an error naming the pass when there are none."""
    batches = list(req.batches)
    if not batches:
        raise FxpruneError(f"importance '{tag}' needs calibration batches")
    return batches


def backward_passes(req: ImportanceRequest, tag: str, per_sample: bool = False,
                    around_forward: Callable[[], Any] = contextlib.nullcontext) -> Iterator[int]:
    """Run backward over the calibration data; yield after each backward (gradients in ``.grad``).

    Batched (``per_sample=False``): each batch's loss is weighted ``n_b / N``, so the accumulated
    ``.grad`` ends as the gradient of the mean-over-samples loss. Per sample: each row's own loss,
    unweighted; the consumer reads ``.grad`` (``g_s``) at each yield and clears it.
    ``around_forward()`` is entered around each forward (a context manager).
    """
    batches = require_batches(req, tag)
    total = sum(_rows(b) for b in batches)
    loss_of = loss_function(req.model, batches)
    step = 0
    with gradient_attention(req.model, batches, req.precision), bf16_weights(req.model, req.precision):
        for batch in batches:
            parts = _split_samples(batch) if per_sample else [batch]
            for part in parts:
                with autocast(req.precision, req.model), around_forward():
                    loss = loss_of(part)
                weight = 1.0 if per_sample else _rows(part) / total
                if loss.requires_grad:  # False only when no scored tensor took part in this loss
                    (loss * weight).backward()
                del loss
                step += 1
                if req.progress is not None:
                    req.progress(tag, step)
                yield step


def member_uses(groups: list[Group]) -> dict[str, list[tuple[str, int, Member]]]:
    """Parameter name -> the (group id, member index, member) that read it; buffers left out."""
    uses: dict[str, list[tuple[str, int, Member]]] = {}
    for g in groups:
        for i, m in enumerate(g.members):
            if not m.is_buffer:
                uses.setdefault(m.param, []).append((g.id, i, m))
    return uses


def score_groups(req: ImportanceRequest, element: ElementFn, *, abs_of_sums: bool = False,
                 fallback: ElementFn | None = None) -> dict[str, np.ndarray]:
    """Per-unit scores from a per-element score of each member parameter.

    ``element(name)`` is called once per parameter, in first-use order; it returns a tensor shaped
    like the parameter, or a dict ``{dim: tensor summed over the other dims with keepdim}`` (the same
    to :func:`unit_scores`, which only sums, and far smaller), or ``None`` to leave the parameter's
    members out of the aggregate.
    ``abs_of_sums``: take ``abs`` of each member's unit sums (``taylor-vector``). A group with no scored
    member gets ``fallback`` scores for all its members when given, else zeros.
    """
    groups = {g.id: g for g in req.groups}
    got: dict[str, dict[int, np.ndarray]] = {g.id: {} for g in req.groups}
    for name, uses in member_uses(req.groups).items():
        e = element(name)
        if e is None:
            continue
        for gid, i, m in uses:
            s = unit_scores(m, e[m.dim] if isinstance(e, Mapping) else e, groups[gid].units)
            got[gid][i] = np.abs(s) if abs_of_sums else s
        del e
    out: dict[str, np.ndarray] = {}
    for gid, g in groups.items():
        if not got[gid] and fallback is not None:
            for name in {m.param for m in g.members if not m.is_buffer}:
                e = fallback(name)
                for i, m in enumerate(g.members):
                    if m.param == name and e is not None:
                        got[gid][i] = unit_scores(m, e, g.units)
        if not got[gid]:
            out[gid] = np.zeros(g.units)
            continue
        idx = sorted(got[gid])
        # the aggregate's "last" picks by member position: give it only the members scored
        sub = dataclasses.replace(g, members=[g.members[i] for i in idx])
        out[gid] = aggregate(sub, [got[gid][i] for i in idx], req.aggregate)
    return out


def _member_params(req: ImportanceRequest) -> dict[str, torch.Tensor]:
    out = {}
    for name in member_uses(req.groups):
        p = param(req.model, name)
        if isinstance(p, nn.Parameter) and p.is_floating_point():
            out[name] = p
    return out


class _ForeignReads(TorchFunctionMode):
    """Records the served weights an op reads outside their own module's call."""

    def __init__(self, acts: "ActivationTaylor") -> None:
        super().__init__()
        self.acts = acts
        self.watch = {id(mod.weight): (name, mod) for name, (mod, _) in acts.served.items()}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        active = self.acts._active
        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                hit = self.watch.get(id(t)) if isinstance(t, torch.Tensor) else None
                if hit is not None and (not active or active[-1] is not hit[1]):
                    self.acts.foreign.add(hit[0])
        return func(*args, **kwargs)


class ActivationTaylor:
    """``taylor-vector`` without weight gradients: ``sum W*G`` over a unit's slice from activations.

    For ``y = x W^T + b`` over tokens ``t``, ``dL/dW = sum_t dy_t x_t^T``, so a row's and a column's
    whole-structure Taylor sums are

        sum_j W_cj G_cj = sum_t (y_tc - b_c) dy_tc        (output channel c)
        sum_i W_ic G_ic = sum_t x_ti (dx_ti from this layer alone)   (input channel i)

    Both are per-channel sums of activation x gradient products, gathered by hooks during the
    ordinary backward, so these weights need no gradient: backward skips their weight-gradient
    matmuls (SmolLM2, MLP channels of layers 3-28: ~21% of the pass's FLOPs) and stores none.

    A weight is served this way when its tensor belongs to one Linear (or GPT-2 ``Conv1D``) module
    only (a tied weight's gradient also has its other users' share) and the forward reads it nowhere
    else: during each forward (:meth:`watching`) a torch-function mode records every served weight an
    op reads outside its own module's call (the chunked LM-head loss reads the head's weight, so the
    output embedding is never served). :func:`_taylor` runs the passes again with those weights (and
    any whose module ran but whose hooks saw no gradient) on the weight-gradient route. Where no earlier tensor carries a gradient, a hooked layer's input
    is made a leaf so the backward still reaches it; gradients downstream of it are the same.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor], uses: Mapping[str, list]) -> None:
        owners: dict[int, list[nn.Module]] = {}
        for _, mod in model.named_modules(remove_duplicate=False):
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor):
                owners.setdefault(id(w), []).append(mod)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.served: dict[str, tuple[nn.Module, set[str]]] = {}  # param name -> (module, {"in", "out"})
        for name, p in params.items():
            own = owners.get(id(p), [])
            if len(own) != 1 or own[0] is head or not name.endswith(".weight") or p.dim() != 2:
                continue
            in_dim = INPUT_DIM.get(type(own[0]).__name__)
            used = {m.dim for _, _, m in uses.get(name, [])}
            if in_dim is None or not used or not used <= {0, 1}:
                continue
            self.served[name] = (own[0], {"in" if d == in_dim else "out" for d in used})
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.foreign: set[str] = set()  # served weights read outside their module
        self.ran: set[str] = set()  # served weights whose module was called with grad enabled
        self._active: list[nn.Module] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "ActivationTaylor":
        for name, (mod, sides) in self.served.items():
            self._handles.append(mod.register_forward_pre_hook(self._pre_hook(name, sides)))
            self._handles.append(mod.register_forward_hook(self._post_hook(name, sides), always_call=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active.clear()

    def watching(self) -> TorchFunctionMode:
        """A torch-function mode, entered around each forward, that adds to :attr:`foreign`."""
        return _ForeignReads(self)

    def _add(self, key: tuple[str, str], act: torch.Tensor, grad: torch.Tensor) -> None:
        s = (act * grad).reshape(-1, act.shape[-1]).sum(0, dtype=torch.float32)
        self.sums[key] = self.sums[key] + s if key in self.sums else s

    def _pre_hook(self, name: str, sides: set[str]) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            self._active.append(mod)
            if torch.is_grad_enabled():
                self.ran.add(name)
            x = args[0] if args else None
            if not torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return None
            if x.requires_grad and "in" not in sides:
                return None
            # an alias of x gets only this layer's share of dL/dx; a leaf where nothing before has a gradient
            x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
            if "in" in sides:
                saved = x.detach()
                x.register_hook(lambda g: self._add((name, "in"), saved, g))
            return (x, *args[1:])
        return hook

    def _post_hook(self, name: str, sides: set[str]) -> Callable[..., Any]:
        def hook(mod: nn.Module, _args: tuple, out: Any) -> None:
            if self._active and self._active[-1] is mod:
                self._active.pop()
            if "out" not in sides or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            bias = getattr(mod, "bias", None)
            saved = out.detach() if bias is None else out.detach() - bias.detach().to(out.dtype)
            out.register_hook(lambda g: self._add((name, "out"), saved, g))
        return hook

    def unserved(self) -> set[str]:
        """Served weights the passes could not score from activations: read outside their module, or
        their module ran but no gradient reached a hook (its input came as a keyword, say)."""
        silent = {n for n in self.ran
                  if not any((n, side) in self.sums for side in self.served[n][1])}
        return self.foreign | silent

    def drop(self, names: set[str]) -> None:
        """Stop serving ``names`` and forget every sum gathered (the passes run again)."""
        for n in names:
            self.served.pop(n, None)
        self.sums.clear()
        self.foreign.clear()
        self.ran.clear()

    def element(self, name: str) -> dict[int, torch.Tensor] | None:
        """``{weight dim: per-channel sum W*G, keepdim}`` for a served weight (None: none gathered)."""
        mod, sides = self.served[name]
        in_dim = INPUT_DIM[type(mod).__name__]
        out: dict[int, torch.Tensor] = {}
        for side, dim in (("in", in_dim), ("out", 1 - in_dim)):
            s = self.sums.pop((name, side), None)
            if side in sides and s is not None:
                out[dim] = s.unsqueeze(1 - dim)
        return out or None


def _take_w_times_grad(p: torch.Tensor | None) -> torch.Tensor | None:
    """``W * G`` in float32 from ``p.grad``, which is released (free as we go: the peak is the model
    plus its member gradients); None without a gradient."""
    if p is None or p.grad is None:
        return None
    g, p.grad = p.grad, None
    return g.mul_(p.detach()) if g.dtype == torch.float32 else p.detach().float() * g.float()


def _taylor(req: ImportanceRequest, how: str) -> dict[str, np.ndarray]:
    """Shared body of the four Taylor passes; ``how`` is vector / element1 / element2 / mix."""
    tag = f"taylor-{how}"
    require_batches(req, tag)
    params = _member_params(req)
    state = ModelState(req.model)
    try:
        if how == "vector":
            acts = ActivationTaylor(req.model, params, member_uses(req.groups))
            while True:  # ends: each rerun serves fewer weights (unserved() is a subset of served)
                freeze_all_but(req.model, [p for n, p in params.items() if n not in acts.served])
                with acts:
                    for _ in backward_passes(req, tag, around_forward=acts.watching) if params else ():
                        pass
                redo = acts.unserved()
                if not redo:
                    break
                acts.drop(redo)  # e.g. read outside their module: their activations miss a share

            def vector(name: str) -> torch.Tensor | Mapping[int, torch.Tensor] | None:
                return acts.element(name) if name in acts.served else _take_w_times_grad(params.get(name))

            return score_groups(req, vector, abs_of_sums=True)
        freeze_all_but(req.model, list(params.values()))
        if how == "element1":
            for _ in backward_passes(req, tag) if params else ():
                pass

            def element(name: str) -> torch.Tensor | None:
                wg = _take_w_times_grad(params.get(name))
                return None if wg is None else wg.abs_()

            return score_groups(req, element)

        total = sum(_rows(b) for b in req.batches)
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        grad = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()
                if how == "mix"}
        for _ in backward_passes(req, tag, per_sample=True) if params else ():
            for n, p in params.items():
                if p.grad is None:
                    continue
                g = p.grad.float()
                fisher[n].addcmul_(g, g, value=1.0 / total)
                if how == "mix":
                    grad[n].add_(g, alpha=1.0 / total)
                p.grad = None

        def element2(name: str) -> torch.Tensor | None:
            if name not in params:
                return None
            w = params[name].detach().float()
            second = fisher.pop(name).mul_(w * w).mul_(0.5)  # 0.5 * W^2 * F
            if how == "element2":
                return second
            return (w * grad.pop(name)).sub_(second).abs_()  # |W*G - 0.5 * W^2 * F|

        return score_groups(req, element2)
    finally:
        state.restore()


def taylor_vector(req: ImportanceRequest) -> dict[str, np.ndarray]:
    """``|sum_{unit slice} W * G|`` per member, aggregated (LLM-Pruner's vector-wise Taylor)."""
    return _taylor(req, "vector")


def taylor_element1(req: ImportanceRequest) -> dict[str, np.ndarray]:
    """``sum_{unit slice} |W * G|`` per member, aggregated (first-order element-wise Taylor)."""
    return _taylor(req, "element1")


def taylor_element2(req: ImportanceRequest) -> dict[str, np.ndarray]:
    """``sum_{unit slice} 0.5 * W**2 * F``, ``F = mean_s g_s**2`` (second order, diagonal Fisher)."""
    return _taylor(req, "element2")


def taylor_mix(req: ImportanceRequest) -> dict[str, np.ndarray]:
    """``sum_{unit slice} |W * G - 0.5 * W**2 * F|`` (LLM-Pruner's ``param_mix``)."""
    return _taylor(req, "mix")
