"""Recovery (LLM-Pruner): LoRA fine-tuning of the pruned model, merged back into its weights.

:func:`recover` attaches peft LoRA adapters (rank ``rank``, ``alpha = 2 * rank`` as LLM-Pruner's
``lora_r=8, lora_alpha=16``, no dropout) to the ``nn.Linear`` layers inside the model's layer stack,
freezes every base weight, trains the adapters with AdamW on the calibration windows for ``steps``
steps (one batch per step, cycling), then ``merge_and_unload``\\s them: the returned model has the
same parameters, names and shapes as before, only different values. The pruned FX graph module
shares nothing it must not: :func:`sync_graph_module` points it at the merged weights, so the
result's model and graph still agree (``fxprune.prune`` re-checks that) and export the same.

The LoRA primitives here (:func:`attach_lora`, :func:`merge_lora`, :func:`finetune`) are also what
the iterative schedule (:mod:`.schedule`) trains with between mask updates.

Linear layers whose weight is tied to another parameter (``lm_head`` tied to the embedding) get no
adapter: merging into a tied weight would change the embedding too. The output head sits outside
the layer stack anyway.
"""

from __future__ import annotations

import functools
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..capture import WRAP, main_outputs
from ..data import stack_windows
from ..depgraph import layer_of
from ..errors import FxpruneError
from .importance.taylor import ModelState, _rows, calibration_loss, calibration_output, freeze_all_but, run_batch

ADAPTER = "fxprune_recover"
AfterStep = Callable[[], None]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class LoraHandle:
    """Adapters injected into a model: the peft tuner, the adapted module names, the factors."""

    tuner: Any
    modules: list[str]
    params: list[nn.Parameter] = field(default_factory=list)


def linear_modules(model: nn.Module, weights: Iterable[str] | None = None) -> list[str]:
    """Names of the untied ``nn.Linear`` layers inside the layer stack.

    With ``weights`` (parameter names), only the layers whose ``weight`` is one of them.
    """
    wanted = None if weights is None else set(weights)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or layer_of(name) is None:
            continue
        if uses.get(id(mod.weight), 0) > 1:  # tied: a merge would change the other user too
            continue
        if wanted is None or f"{name}.weight" in wanted:
            out.append(name)
    return out


def attach_lora(model: nn.Module, modules: list[str], rank: int, seed: int, adapter: str = ADAPTER) -> LoraHandle:
    """Inject peft LoRA adapters into ``modules`` of ``model`` in place; only the factors train.

    peft's own init (Kaiming-uniform ``A``, zero ``B``): the model's function is unchanged until the
    first step. The init draws from a generator forked from ``seed``, so runs repeat.
    """
    from peft import LoraConfig, LoraModel

    if not modules:
        raise FxpruneError("LoRA fine-tuning found no nn.Linear layer to adapt inside the model's layers; "
                           "recovery and iterative pruning need a transformer-style layer stack")
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                     target_modules="|".join(re.escape(n) for n in modules))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore")  # peft's notes about model types it has no defaults for
        tuner = LoraModel(model, cfg, adapter_name=adapter)
    found = dict(model.named_modules())
    params = [t for n in modules for t in (found[n].lora_A[adapter].weight, found[n].lora_B[adapter].weight)]
    freeze_all_but(model, params)
    return LoraHandle(tuner, list(modules), params)


def merge_lora(model: nn.Module, handle: LoraHandle) -> nn.Module:
    """Merge the adapters into the base weights (in place) and remove every trace of peft."""
    merged = handle.tuner.merge_and_unload()
    if "peft_config" in merged.__dict__:
        del merged.peft_config
    if merged is not model:  # LoraModel works in place; guard against a future peft changing that
        raise RuntimeError("peft merge_and_unload returned a new model object")
    return merged


LR_SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str) -> None:
    """A clear error for a learning-rate schedule fine-tuning does not offer."""
    if schedule not in LR_SCHEDULES:
        raise FxpruneError(f"unknown learning-rate schedule '{schedule}'; choose {' or '.join(LR_SCHEDULES)}")


def finetune(model: nn.Module, params: list[nn.Parameter], batches: list[Any], steps: int, lr: float,
             *, start: int = 0, after_step: AfterStep | None = None,
             loss_fn: LossFn = calibration_loss, schedule: str = "constant") -> list[float]:
    """``steps`` AdamW steps on ``params``, batch ``start + i`` (cycling) at step ``i``; the losses.

    Eval mode (no dropout: runs repeat). ``after_step`` runs after every optimizer step (the
    iterative schedule re-applies its masks there). ``loss_fn(model, batch)``: the calibration loss,
    or :func:`distill_loss` bound to a teacher. ``schedule``: ``constant`` learning rate, or
    ``cosine`` decay from ``lr`` to 0 over the steps.
    """
    check_schedule(schedule)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    factor = (lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps))) if schedule == "cosine" else (lambda i: 1.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train(False)
    losses = []
    for i in range(steps):
        loss = loss_fn(model, batches[(start + i) % len(batches)])
        if not torch.isfinite(loss):
            raise FxpruneError(f"LoRA fine-tuning diverged (loss {loss.item()} at step {i}); lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)
    return losses


def check_batch(batch: int) -> int:
    """``batch`` (windows per recovery step) if it is a positive integer, else a clear error."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise FxpruneError(f"recovery batch must be a positive number of windows per step, got {batch!r}")
    return batch


def check_distill(weight: float) -> float:
    """``weight`` (a bool or a number) as the KL weight in [0, 1], or a clear error."""
    w = float(weight)
    if not 0.0 <= w <= 1.0:
        raise FxpruneError(f"distill weight must be between 0 (text only) and 1 (dense model only), got {weight}")
    return w


def distill_loss(student: nn.Module, batch: Any, *, teacher: nn.Module, weight: float = 1.0) -> torch.Tensor:
    """Knowledge distillation from ``teacher`` (the dense model) on one batch, mixed with the text.

    ``weight * D + (1 - weight) * L``: ``L`` is the calibration loss, ``D`` for models with ``.logits``
    the KL divergence from the teacher's to the student's distribution per position, averaged over
    positions, for other models the mean squared error of the main outputs. The dense model's full
    distribution says more per token than the one observed next token, so on few calibration
    windows the mix overfits less than the text alone (SmolLM2, 10 windows: see bench/compare.py).
    The teacher runs without gradients and is not modified.
    """
    with torch.no_grad():
        t_out = run_batch(teacher, batch)
    if weight < 1.0:
        s_out, text = calibration_output(student, batch)
    else:
        s_out, text = run_batch(student, batch), None
    t_logits, s_logits = getattr(t_out, "logits", None), getattr(s_out, "logits", None)
    if t_logits is None or s_logits is None:
        t_main, s_main = main_outputs(t_out)[0][0], main_outputs(s_out)[0][0]
        dist = F.mse_loss(s_main.float(), t_main.float())
    else:
        t_log = F.log_softmax(t_logits.float(), -1).flatten(0, -2)
        s_log = F.log_softmax(s_logits.float(), -1).flatten(0, -2)
        dist = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean")
    return dist if text is None else weight * dist + (1.0 - weight) * text


LOSS_ROWS = 32  # rows the before/after loss is measured on: on 320 recovery windows it was half the time
LOSS_STACK = 8  # rows per forward of that measurement (larger matmuls, same row-weighted mean)


def first_rows(batches: list[Any], n: int) -> list[Any]:
    """The first batches of ``batches`` that hold at least ``n`` rows (all of them when fewer)."""
    kept, rows = [], 0
    for b in batches:
        if rows >= n:
            break
        kept.append(b)
        rows += _rows(b)
    return kept


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Any]) -> float:
    """The calibration loss averaged over ``batches`` (weighted by rows), without gradients."""
    total, rows = 0.0, 0
    for b in stack_windows(batches, LOSS_STACK):
        n = _rows(b)
        total += float(calibration_loss(model, b)) * n
        rows += n
    return total / max(rows, 1)


def _loss_name(teacher: nn.Module | None, distill: float) -> str:
    if teacher is None:
        return "calibration"
    return "distill" if distill == 1 else f"distill {distill:g} + calibration {1 - distill:g}"


def sync_graph_module(gm: fx.GraphModule, model: nn.Module) -> None:
    """Point the pruned graph module's parameters at ``model``'s (the unlifted graph's ``m.<name>``)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        path, _, leaf = f"{WRAP}.{name}".rpartition(".")
        try:
            owner = gm.get_submodule(path)
        except AttributeError:
            continue
        if leaf in owner._parameters:
            owner._parameters[leaf] = p


def recover(model: nn.Module, batches: list[Any], *, steps: int, lr: float = 2e-4, rank: int = 8,
            seed: int = 0, teacher: nn.Module | None = None, distill: float = 1.0, schedule: str = "constant",
            batch: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """LoRA-fine-tune the pruned ``model`` in place, merge, and return the record.

    ``model`` must be fxprune's own pruned copy (never the user's). With ``teacher`` (the dense
    model, only read) the loss is :func:`distill_loss` with weight ``distill`` instead of the
    calibration loss: at 1 the pruned model learns to match the dense one only, not the text.
    ``batch``: token windows per step (equal-width token-id batches are re-stacked that many rows
    at a time; any other batch form is used as given). Returns ``{"steps", "lr", "schedule", "rank",
    "batch", "adapted_layers", "loss", "trainable_params", "rows", "rows_seen", "loss_before",
    "loss_after", "loss_rows", "train_loss_first", "train_loss_last", "seconds"}``: ``rows_seen`` of
    the ``rows`` windows were trained on (fewer when ``steps x batch`` does not reach them all); the
    losses are the mean calibration loss over the first ``loss_rows`` rows of ``batches``
    (:func:`first_rows`, :data:`LOSS_ROWS`).
    """
    distill = check_distill(distill)
    check_batch(batch)
    if distill == 0:
        teacher = None  # weight 0 is the text alone: no teacher forwards
    if isinstance(model, fx.GraphModule):
        raise FxpruneError("recovery needs the pruned eager module, but only its graph module runs; "
                           "use recover_steps=0 for this model")
    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    state = ModelState(model)
    loss_batches = first_rows(batches, LOSS_ROWS)
    before = mean_loss(model, loss_batches)
    if batch > 1:
        batches = stack_windows(batches, batch)
    rows = sum(_rows(b) for b in batches)
    rows_seen = sum(_rows(b) for b in batches[:steps])
    handle = attach_lora(model, linear_modules(model), rank, seed)
    trainable = sum(p.numel() for p in handle.params)
    try:
        say(f"recovery: {steps} LoRA steps on {len(handle.modules)} layers"
            + (f" (distillation, weight {distill:g})" if teacher is not None else ""))
        loss_fn = (calibration_loss if teacher is None
                   else functools.partial(distill_loss, teacher=teacher, weight=distill))
        teacher_state = ModelState(teacher) if teacher is not None else None
        try:
            if teacher is not None:
                teacher.eval()  # as every fxprune forward; its modes are put back below
            losses = finetune(model, handle.params, batches, steps, lr, loss_fn=loss_fn, schedule=schedule)
        finally:
            if teacher_state is not None:
                teacher_state.restore()
    finally:
        merge_lora(model, handle)
        state.restore()
    after = mean_loss(model, loss_batches)
    if not math.isfinite(after):
        raise FxpruneError("recovery produced non-finite weights; lower the learning rate")
    return {"steps": steps, "lr": lr, "schedule": schedule, "rank": rank, "batch": batch,
            "adapted_layers": len(handle.modules), "loss": _loss_name(teacher, distill),
            "trainable_params": trainable, "rows": rows, "rows_seen": rows_seen,
            "loss_before": before, "loss_after": after,
            "loss_rows": sum(_rows(b) for b in loss_batches),
            "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "seconds": time.perf_counter() - t0}
