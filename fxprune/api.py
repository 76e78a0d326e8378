"""The pipeline: capture -> dependency graph -> importance -> select -> rewrite -> verify.

:func:`prune` runs it end to end and returns a :class:`PruneResult`. Each stage is one function with
one input and one output type; :func:`inspect_model` stops after the groups, and passing ``plan=``
replays a saved plan instead of scoring.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from .capture import Program, capture, call_extras, main_outputs, normalize_inputs
from .data import GENERATE_PROMPT, generate_windows, recovery_rows, stack_windows
from .depgraph import PRUNABLE_KINDS, DependencyGraph, count_params, dependency_graph, stack_of
from .errors import FxpruneError, PlanError, VerificationError
from .passes.importance import NEEDS_DATA, AGGREGATES, SELECTS, ImportanceRequest, get_importance
from .passes.importance.taylor import ModelState, effective_precision
from .passes.recovery import check_batch, check_distill, check_schedule, recover, sync_graph_module
from .passes.rewrite import apply_plan
from .passes.schedule import Schedule, check_options, iterative_prune
from .passes.select import Selection, parse_layers, select
from .plan import Plan
from .progress import ProgressLike, as_progress

IMPORTANCE_ROWS = 5  # windows per forward/backward of a gradient pass: larger matmuls, same gradient
Progress = ProgressLike  # a fxprune.progress.Progress, a callable(str) for stage names, True or None


@dataclass
class PruneResult:
    """A pruned model, its pruned FX graph, the plan that made it and a report."""

    model: nn.Module
    graph_module: fx.GraphModule
    plan: Plan
    report: dict[str, Any]
    program: Program  # the capture of the *original* model
    dg: DependencyGraph
    example_inputs: Any = None
    tokenizer: Any = None
    base_model: nn.Module | None = field(default=None, repr=False)


def inspect_model(model: nn.Module, example_inputs: Any) -> DependencyGraph:
    """Capture ``model`` and return its dependency graph (groups, pins, networkx graph)."""
    return dependency_graph(capture(model, example_inputs))


def count_macs(model: nn.Module, example_inputs: Any) -> int | None:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (None on the meta device)."""
    args, kwargs = normalize_inputs(example_inputs)
    if any(p.is_meta for p in model.parameters()):
        return None
    counter = FlopCounterMode(display=False)
    # no parameter requires grad while counting: the counter's module tracker hooks tensors that
    # do, and fails on a view of a parameter made under no_grad (LFM2's and Jamba's conv layers)
    state = ModelState(model)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad(), counter:
            model(*args, **kwargs, **call_extras(model))
    finally:
        state.restore()
    return int(counter.get_total_flops() // 2)


def run_model(model: nn.Module, example_inputs: Any) -> torch.Tensor:
    """The main output tensor of ``model`` (HF or plain) on ``example_inputs``."""
    args, kwargs = normalize_inputs(example_inputs)
    with torch.no_grad():
        if isinstance(model, fx.GraphModule):
            out = model(*args, *kwargs.values())
        else:
            out = model(*args, **kwargs, **call_extras(model))
    return main_outputs(out)[0][0]


def prune(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    ratio: float = 0.3,
    importance: str | None = None,
    targets: Sequence[str] = ("heads", "mlp"),
    layers: str | range | None = None,
    mode: str = "local",
    round_to: int = 1,
    depth_profile: float = 0.0,
    aggregate: str = "sum",
    calib: torch.Tensor | list[torch.Tensor] | None = None,
    calib_generate: int = 0,
    plan: Plan | None = None,
    iterative: bool = False,
    steps: int = 20,
    prune_every: int = 5,
    ema: float = 0.9,
    recover_steps: int = 0,
    recover_data: torch.Tensor | list[torch.Tensor] | None = None,
    recover_generate: int = 0,
    recover_batch: int = 1,
    lr: float = 2e-4,
    tokenizer: Any = None,
    lora_rank: int = 8,
    seed: int = 0,
    reconstruct: bool = False,
    damp: float = 1.0,
    refit_all: bool = False,
    residual_correction: bool = True,
    distill: float = 0.0,
    recover_schedule: str = "constant",
    precision: str = "float32",
    progress: Progress | None = None,
) -> PruneResult:
    """Prune ``ratio`` of ``model``'s parameters; the caller's model is never modified.

    Args:
        model: any ``nn.Module`` (HF models as loaded).
        example_inputs: tensor, tuple or dict of inputs (batch >= 2); HF text models get random
            token ids when omitted.
        ratio: fraction of all parameters to remove, in (0, 1).
        importance: ``l1``, ``l2``, ``random``, or a gradient pass (``taylor-*``, ``lora``) that
            needs ``calib`` token windows. Default ``l2``, or ``lora`` when ``iterative``.
        targets: group kinds to prune: ``heads``, ``kv_heads``, ``mlp``, ``rank`` (the low-rank
            bottlenecks of an attention, DeepSeek's MLA), ``hidden``.
        layers: ``"3:29"`` or a ``range``: prune only these layers.
        mode: ``local`` (same fraction per group) or ``global`` ranking.
        round_to: keep a multiple of this many units per group (hardware-friendly widths).
        depth_profile: local ranking only: shape the removal over the layer range; a layer at
            position ``x`` in ``[-1, 1]`` removes ``f * (1 + p * (1 - 2|x|))`` of its units, ``f``
            set to reach ``ratio`` (``-1 < p < 1``; 0: the same fraction everywhere; p > 0 prunes
            the middle of the range more than its ends). SmolLM2 at 20% (obs, MLP 3:29): p 0.5
            1.383x dense against 1.399x uniform (seed 1, the same shape: 1.395x against 1.428x);
            over 3:28, p 0.3: 1.366x, lower than 3:29 uniform on three seeds and three evaluation
            slices; with 240 written windows (``calib_generate``) p 0.5 measured best (1.305x dense,
            seeds 1-2 1.338x / 1.367x); at 50% (heads+MLP 1:30) worse, 3.796x against 3.295x.
        aggregate: how member scores combine: sum, mean, max, prod, last.
        calib_generate: add this many windows the model writes itself to ``calib``, each continuing
            16 tokens of a calibration window (the first 16, then the next 16 in later rounds;
            :func:`fxprune.data.generate_windows`; HF causal LMs). Every pass that reads ``calib``
            sees them. SmolLM2 at 20% (obs): 10 windows 1.546x dense, plus 30 written ones 1.411x
            (+30 s writing, about twice the choosing time); more keep paying with less ``damp``:
            240 at damp 0.5 (layers 3:28, depth_profile 0.5) 1.305x, in 4.3 min on 2 cores.
        iterative: LoRAPrune's schedule instead of one-shot scoring: masks, LoRA fine-tuning on
            ``calib`` between mask updates, moving-average scores, cubic sparsity schedule; the
            final masks are rewritten as usual (:mod:`fxprune.passes.schedule`).
        steps: LoRA steps of the iterative run (one calibration window per step), >= 1.
        prune_every: steps between mask updates (the last step always updates), 1..steps.
        ema: moving-average weight of the old scores, ``s <- ema*s + (1-ema)*s_new``, in [0, 1).
        recover_steps: LLM-Pruner's recovery: LoRA-fine-tune the pruned model on ``calib`` for this
            many steps, then merge the adapters (no extra parameters); 0 = off.
        recover_data: token windows for recovery instead of ``calib`` (10 x 128 calibration
            tokens are few: many recovery steps on them overfit).
        recover_generate: add this many windows the dense model writes itself (on from prompts of
            ``calib``'s own windows, after those of ``calib_generate``) to recovery's windows, all
            shuffled: a long recovery without text beyond ``calib``. SmolLM2 (compare.py's presets,
            460 written + the 40 calibration windows, 500 steps, distill 0): 20% 0.92x dense (0.88x
            from the 240-window preset with 250 written), 50% 1.77x, against 0.99x / 1.94x with 260
            written, 300 steps, distill 0.5 and 1.03x / 2.23x after 80 steps on the 40 (2-core Xeon:
            writing ~2.8 min, training ~3-4 more).
            The report's ``recovery.loss_before/after`` are then over the first shuffled windows.
        recover_batch: token windows per recovery step. Each step takes the next batch, cycling, so
            ``recover_steps x recover_batch`` windows are seen; the report's ``recovery`` says how
            many of them were (``rows_seen`` of ``rows``) and a note says when some were never used.
        distill: weight of the dense model in the recovery loss, 0..1: the loss is
            ``distill * KL(dense || pruned) + (1 - distill) * cross-entropy on the text`` per token
            (``True`` = 1: the dense model only). The user's model is the teacher, only read.
            Measured best on SmolLM2 at 20%: 0.5 (overfits 10 calibration windows less than text only);
            with ``recover_generate``'s windows 0 (their text is the dense model's own samples: 50%,
            1.82x dense against 1.94x at 0.5, and each step skips the teacher's forward).
        precision: forward/backward precision of the gradient importance passes: ``float32`` or
            ``bfloat16`` (bf16 copies of the weights for the passes, under autocast; measured 1.9x
            faster Taylor on a bf16-capable CPU, 99% of the same channels removed). The model's
            float32 weights are put back unchanged; the pruned model is float32. On a CPU
            without bf16 instructions it runs float32 and the report's notes say so.
        recover_schedule: recovery's learning rate: ``constant``, or ``cosine`` decay to 0 over
            ``recover_steps``.
        lr: AdamW learning rate of the LoRA fine-tuning (iterative and recovery), > 0.
        plan: replay this plan instead of scoring and selecting.
        progress: ``True`` for stage lines and bars on stderr, a ``callable(str)`` for stage names, a
            :class:`fxprune.progress.Progress`, or None (silent).
        reconstruct: after the rewrite, refit the layers that read pruned channels (down_proj,
            o_proj...) by least squares on ``calib`` activations (adds no parameter; see
            :mod:`fxprune.passes.reconstruct`). ``damp`` is its relative ridge damping
            (``lam = damp * mean(diag X^T X)``; more windows want less: SmolLM2 obs measured best at 8
            on 10 windows, 2-4 on 40). Importance
            ``obs`` chooses units for this refit (:mod:`fxprune.passes.importance.obs`) and turns it on.
        refit_all: reconstruct also refits every other untied Linear (q/k/v, gate/up...) against
            the dense model's output, correcting the drift of its inputs; turns ``reconstruct`` on.
        residual_correction: the refit (and ``obs``) aims residual writers (``o_proj``, ``down_proj``
            of a pre-norm block) at the dense residual stream, so the stream's drift from earlier
            pruned layers is cancelled too (:mod:`fxprune.passes.residual`); blocks whose layout the
            dense model does not confirm are refit without it (the report's notes say which).
    """
    say = as_progress(progress)  # callable like before: say("stage"); plus say.bar / say.task
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    bad = [t for t in targets if t not in PRUNABLE_KINDS]
    if bad:
        raise FxpruneError(f"unknown target kind '{bad[0]}'; choose from {', '.join(PRUNABLE_KINDS)}")
    if aggregate not in AGGREGATES:
        raise FxpruneError(f"unknown aggregate '{aggregate}'; choose one of {', '.join(AGGREGATES)}")
    precision, precision_note = effective_precision(precision, model)  # checks the name too
    check_schedule(recover_schedule)
    check_batch(recover_batch)
    check_options(steps=steps, prune_every=prune_every, ema=ema, recover_steps=recover_steps, lr=lr,
                  lora_rank=lora_rank)
    if iterative and plan is not None:
        raise FxpruneError("iterative pruning makes its own plan; drop plan= (--plan) or iterative")
    distill = check_distill(distill)
    if distill and not recover_steps:
        raise FxpruneError("distill is a recovery loss: set recover_steps (--recover-steps N)")
    if recover_generate < 0:
        raise FxpruneError(f"recover_generate must be >= 0 windows, got {recover_generate}")
    if recover_generate and not recover_steps:
        raise FxpruneError("recover_generate writes windows for recovery: set recover_steps (--recover-steps N)")
    prompts = _batches(calib)  # the caller's windows: written ones are prompted from these only
    for option, n in (("calib_generate", calib_generate), ("recover_generate", recover_generate)):
        if n and not prompts:
            raise FxpruneError(f"{option} continues calibration windows; pass calib=... (--calib FILE)")
    if calib_generate:
        t = time.perf_counter()
        with say.task(f"writing {calib_generate} calibration windows"):
            written = generate_windows(model, prompts, int(calib_generate), seed=seed)
        calib = prompts + _batches(written)
        timings["generate_s"] = time.perf_counter() - t
    if (iterative or recover_steps) and not _batches(calib):
        what = "iterative pruning" if iterative else "recover_steps"
        raise FxpruneError(f"{what} fine-tunes on calibration text; pass calib=... (--calib FILE)")
    importance = importance or ("lora" if iterative else "l2")
    if plan is None and not 0.0 < float(ratio) < 1.0:
        raise FxpruneError(f"ratio must be between 0 and 1 (exclusive), got {ratio}")
    importance_fn = get_importance(importance) if plan is None else None
    gradient_pass = plan is None and not iterative and importance in NEEDS_DATA - SELECTS  # runs at `precision`
    reconstruct = reconstruct or refit_all
    if plan is None and importance in SELECTS:
        if iterative:
            raise FxpruneError(f"importance '{importance}' selects in one shot; drop iterative (--iterative)")
        if mode != "local":
            raise FxpruneError(f"importance '{importance}' ranks within each group: use --mode local")
        reconstruct = True  # it picks the units the refit compensates best: the refit must follow
    if reconstruct and not _batches(calib):
        raise FxpruneError("reconstruct needs calibration text (--calib FILE, or calib= token windows)")
    if reconstruct and not damp > 0:
        raise FxpruneError(f"reconstruct damping must be > 0, got {damp}")
    if example_inputs is None:
        from .models import example_inputs as make_inputs

        example_inputs = make_inputs(model, tokenizer)

    t = time.perf_counter()
    with say.task("capture"):
        program = capture(model, example_inputs)
    timings["capture_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("dependency graph")
    dg = dependency_graph(program)
    timings["groups_s"] = time.perf_counter() - t
    rewrite_from, history = program, None  # iterative runs rewrite their fine-tuned copy instead
    solved: dict[str, Any] = {}  # an importance pass's by-products (obs: its refit)

    if plan is None:
        t = time.perf_counter()
        n_layers = _num_layers(model)
        layer_range = layers if isinstance(layers, range) or layers is None else parse_layers(layers, n_layers)
        sel = Selection(float(ratio), tuple(targets), layer_range, mode, max(1, int(round_to)),
                        depth_profile=float(depth_profile))
        from .passes.select import candidates

        groups = candidates(dg, sel)
        if not groups:
            raise PlanError(_nothing_to_prune(dg, sel))
        batches = _batches(calib)
        if importance in NEEDS_DATA and not batches:
            raise FxpruneError(f"importance '{importance}' needs calibration text (--calib FILE)")
        if iterative:
            sched = Schedule(steps, prune_every, ema, lr, lora_rank, importance)
            it = iterative_prune(program, dg, sel, batches, sched, aggregate=aggregate, seed=seed, progress=say)
            plan, history = it.plan, it.history
            rewrite_from = dataclasses.replace(program, model=it.model)
            plan.meta.update({"schedule": "iterative", "steps": steps, "prune_every": prune_every,
                              "ema": ema, "lr": lr})
            timings["iterative_s"] = time.perf_counter() - t
            t = time.perf_counter()
        else:
            # the passes weight each batch by its rows, so stacking leaves the gradient as it is
            req = ImportanceRequest(model, dg, groups, stack_windows(batches, IMPORTANCE_ROWS), aggregate,
                                    seed, lora_rank, damp=damp, precision=precision,
                                    residual_correction=residual_correction)
            if importance in SELECTS:  # the counts local ranking keeps, whatever the scores
                probe = select(dg, {g.id: np.zeros(g.units) for g in groups}, sel)
                req.keep = {g.id: len(probe.keep.get(g.id, range(g.units))) for g in groups}
            with _importance_bar(say, importance, req.batches, len(groups)) as req.progress:
                scores = importance_fn(req)
            solved = req.by_products
            timings["importance_s"] = time.perf_counter() - t
            t = time.perf_counter()
            say("select")
            plan = select(dg, scores, sel)
        plan.meta.update({"importance": importance, "ratio": ratio, "targets": list(targets),
                          "layers": None if layer_range is None else f"{layer_range.start}:{layer_range.stop}",
                          "mode": mode, "round_to": round_to, "depth_profile": depth_profile,
                          "aggregate": aggregate})
        timings["select_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("rewrite")
    rw = apply_plan(rewrite_from, dg, plan)
    timings["rewrite_s"] = time.perf_counter() - t

    if reconstruct:
        from .passes.reconstruct import apply_refits, reconstruct as refit

        t = time.perf_counter()
        say("reconstruct")
        batches = _batches(calib)
        recon = None
        if "refit" in solved and not refit_all:  # obs solved the refit while choosing: write it
            recon = apply_refits(program.model, rw.model, program, dg, plan, solved["refit"], batches, damp=damp,
                                 residual_corrected=solved["residual_corrected"], notes=solved["refit_notes"])
        if recon is None:
            recon = refit(program.model, rw.model, program, dg, plan, batches, damp=damp, drift=refit_all,
                          residual_correction=residual_correction)
        timings["reconstruct_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("verify")
    pruned_model, notes = _check_eager(rw.model, rw.graph_module, example_inputs,
                                       ([precision_note] if precision_note and gradient_pass else []) + rw.notes
                                       + (recon.get("notes", []) if reconstruct else []))
    timings["verify_s"] = time.perf_counter() - t
    recovery = None
    if recover_steps:
        t = time.perf_counter()
        recover_batches = _batches(recover_data) or _batches(calib)
        if recover_generate:
            with say.task(f"writing {recover_generate} recovery windows"):
                recover_batches = recovery_rows(model, prompts, recover_batches, int(recover_generate),
                                                first=int(calib_generate), seed=seed)
            timings["recover_generate_s"] = time.perf_counter() - t
        recovery = recover(pruned_model, recover_batches, steps=recover_steps, lr=lr, rank=lora_rank,
                           seed=seed, teacher=model if distill else None, distill=distill, schedule=recover_schedule,
                           batch=recover_batch, progress=say)
        sync_graph_module(rw.graph_module, pruned_model)
        if recovery["rows_seen"] < recovery["rows"]:
            notes.append(f"recovery trained on {recovery['rows_seen']} of its {recovery['rows']} windows "
                         f"({recover_steps} steps x {recover_batch} per step); raise recover_steps or "
                         "recover_batch to use them all")
        pruned_model, notes = _check_eager(pruned_model, rw.graph_module, example_inputs, notes)
        timings["recovery_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    report = build_report(model, pruned_model, dg, plan, example_inputs, timings, notes)
    if calib_generate:
        report["calibration"] = {"windows": len(calib) - len(written), "generated": len(written),
                                 "prompt_tokens": GENERATE_PROMPT}
    if reconstruct:
        report["reconstruct"] = recon
    if history is not None:
        report["iterative"] = history
    if recovery is not None:
        report["recovery"] = recovery
        if recover_generate:
            recovery["generated"] = int(recover_generate)
    return PruneResult(pruned_model, rw.graph_module, plan, report, program, dg, example_inputs,
                       tokenizer, model)


def _nothing_to_prune(dg: DependencyGraph, sel: Selection) -> str:
    """The error for targets / a layer range that select no group, naming what the model has."""
    where = f" in layers {sel.layers.start}:{sel.layers.stop}" if sel.layers is not None else ""
    have = sorted({g.kind for g in dg.prunable if g.kind in PRUNABLE_KINDS})
    fix = (f"choose --targets from {', '.join(have)}" if have
           else "every group of this model is pinned; `fxprune inspect` shows why")
    return f"nothing to prune: no prunable {', '.join(sel.targets)} group{where}; {fix}" + (
        " or widen --layers" if have and where else "")


@contextmanager
def _importance_bar(say: Any, importance: str, batches: list[Any], n_groups: int
                    ) -> Iterator[Callable[[str, int], None] | None]:
    """A bar over the backward passes of a gradient importance, over the groups of a selecting one
    (obs steps once per group), a stage line for the others."""
    if importance not in NEEDS_DATA:
        say(f"importance ({importance})")
        yield None
        return
    if importance in SELECTS:
        with say.bar(f"importance ({importance})", total=n_groups, unit="group") as bar:
            yield lambda tag, step: bar.to(step, n_groups)
        return
    rows = sum(int(b.shape[0]) if hasattr(b, "shape") else 1 for b in batches)
    with say.bar(f"importance ({importance})", total=len(batches), unit="batch") as bar:
        # batched passes step once per batch, per-sample passes once per row: grow to the rows
        yield lambda tag, step: bar.to(step, len(batches) if step <= len(batches) else rows)


def _num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def _batches(calib: Any) -> list[torch.Tensor]:
    if calib is None:
        return []
    if isinstance(calib, torch.Tensor):
        return [calib[i : i + 1] for i in range(calib.shape[0])]
    return list(calib)


def _check_eager(model: nn.Module, gm: fx.GraphModule, example_inputs: Any, notes: list[str]) -> tuple[nn.Module, list[str]]:
    """The pruned graph is the reference; the pruned eager module must agree with it."""
    notes = list(notes)
    if any(p.is_meta for p in model.parameters()):
        return model, notes + ["meta device: outputs not compared"]
    want = run_model(gm, example_inputs)
    try:
        got = run_model(model, example_inputs)
        diff = float((got - want).abs().max())
    except Exception as exc:  # the module's own code may hard-code shapes
        hint = ""
        if "multiple of 16 bytes" in str(exc):  # torch's grouped matmul (mixture-of-experts layers)
            hint = "; grouped matmuls need widths in multiples of 16 bytes: prune with --round-to 8 to keep the module"
        notes.append(f"eager module does not run after pruning ({type(exc).__name__}: {exc}); "
                     f"the pruned graph module is returned as the model{hint}")
        return gm, notes
    if diff > 1e-4 * max(1.0, float(want.abs().max())):
        raise VerificationError(f"pruned eager model and pruned graph disagree by {diff:.3g}")
    return model, notes


_GENERIC = {"model", "transformer", "backbone", "layers", "layer", "h", "blocks", "block"}


def _owner_name(g: Any) -> str:
    """The innermost named module holding all of ``g``'s members (``encoder_attn``; ``encoder``
    for a group across its stack's layers), for labels."""
    common: list[str] = []
    for names in zip(*(m.module.split(".") for m in g.members)):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    named = [n for n in common if n not in _GENERIC and not n.isdigit()]
    return named[-1] if named else g.id


def build_report(before: nn.Module, after: nn.Module, dg: DependencyGraph, plan: Plan,
                 example_inputs: Any, timings: dict[str, float], notes: list[str]) -> dict[str, Any]:
    """Parameters and MACs before/after, kept units per group and per layer, timings, notes."""
    p0, p1 = count_params(before), count_params(after)
    m0 = count_macs(before, example_inputs)
    m1 = count_macs(after, example_inputs) if not isinstance(after, fx.GraphModule) else None
    groups = []
    layers: dict[str, dict[str, Any]] = {}
    shown = [g for g in dg.groups if g.prunable and g.kind != "other"]
    # an encoder-decoder numbers both stacks from 0: its layers are labelled "encoder.3", "decoder.3"
    stacks = {stack_of(g.members[0].module) for g in shown if g.layer is not None}
    labelled: dict[tuple[str, str], list[tuple[Any, int]]] = {}
    for g in shown:
        kept = len(plan.keep.get(g.id, range(g.units)))
        groups.append({"id": g.id, "kind": g.kind, "layer": g.layer, "units": g.units, "kept": kept,
                       "unit_size": g.unit_size})
        key = "model" if g.layer is None else str(g.layer)
        if g.layer is not None and len(stacks) > 1:
            key = f"{stack_of(g.members[0].module)}.{g.layer}"
        labelled.setdefault((key, g.kind), []).append((g, kept))
    for (key, kind), entries in labelled.items():
        for g, kept in entries:  # several of a kind in one layer (self- and cross-attention): named
            label = kind if len(entries) == 1 else f"{kind} ({_owner_name(g)})"
            layers.setdefault(key, {})[label] = {"kept": kept, "units": g.units}
    pinned = sorted({g.reason for g in dg.groups if not g.prunable})
    return {
        "params_before": p0, "params_after": p1, "removed_fraction": 1 - p1 / p0 if p0 else 0.0,
        "macs_before": m0, "macs_after": m1,
        "plan": plan.meta, "groups": groups, "layers": layers, "timings": timings,
        "pinned_reasons": pinned, "unknown_ops": dg.unknown_ops, "notes": notes,
        "capture": "stitched" if dg.program.stitched else "full",
    }
