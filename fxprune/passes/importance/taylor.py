"""LLM-Pruner's Taylor importances, from full weight gradients of the calibration loss.

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

from ...capture import call_extras, main_outputs
from ...depgraph import Group, Member
from ...errors import FxpruneError
from ...lm_loss import lm_loss_fn
from .base import ImportanceRequest, aggregate, param, unit_scores

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


def require_batches(req: ImportanceRequest, tag: str) -> list[Any]:
    """``req.batches`` as a list, or an error naming the pass when there are none."""
    batches = list(req.batches)
    if not batches:
        raise FxpruneError(f"importance '{tag}' needs calibration batches")
    return batches


def backward_passes(req: ImportanceRequest, tag: str, per_sample: bool = False) -> Iterator[int]:
    """Run backward over the calibration data; yield after each backward (gradients in ``.grad``).

    Batched (``per_sample=False``): each batch's loss is weighted ``n_b / N``, so the accumulated
    ``.grad`` ends as the gradient of the mean-over-samples loss. Per sample: each row's own loss,
    unweighted; the consumer reads ``.grad`` (``g_s``) at each yield and clears it.
    """
    batches = require_batches(req, tag)
    total = sum(_rows(b) for b in batches)
    loss_of = loss_function(req.model, batches)
    step = 0
    for batch in batches:
        parts = _split_samples(batch) if per_sample else [batch]
        for part in parts:
            with autocast(req.precision, req.model):
                loss = loss_of(part)
            weight = 1.0 if per_sample else _rows(part) / total
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


def _taylor(req: ImportanceRequest, how: str) -> dict[str, np.ndarray]:
    """Shared body of the four Taylor passes; ``how`` is vector / element1 / element2 / mix."""
    tag = f"taylor-{how}"
    require_batches(req, tag)
    params = _member_params(req)
    state = ModelState(req.model)
    try:
        freeze_all_but(req.model, list(params.values()))
        if how in ("vector", "element1"):
            for _ in backward_passes(req, tag) if params else ():
                pass

            def element(name: str) -> torch.Tensor | None:
                p = params.get(name)
                if p is None or p.grad is None:
                    return None
                g, p.grad = p.grad, None  # free as we go: peak is the model plus its member gradients
                wg = g.mul_(p.detach()) if g.dtype == torch.float32 else p.detach().float() * g.float()
                return wg if how == "vector" else wg.abs_()

            return score_groups(req, element, abs_of_sums=how == "vector")

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
