"""Reconstruction: refit the layers that *read* pruned channels, from calibration activations.

Removing input channels ``R`` of a Linear ``y = W x`` loses ``W[:, R] x_R``. Much of it can be
recovered from the kept channels ``K``, which are correlated with the removed ones. The least-squares
refit of the kept columns against the original output over the calibration inputs,

    min_A  || X_K A^T - X W^T ||^2      =>      A = W[:, K] + W[:, R] H[R, K] H[K, K]^-1,

with ``H = X^T X`` (the layer's input second moment), is the structured form of the optimal-brain-
surgeon update that SparseGPT / ZipLM / SlimGPT apply. It adds no parameter: ``A`` has exactly the
pruned layer's shape, so the rewrite's shapes, graph and config stay as they are. ``H[K, K]`` gets a
ridge term ``damp * mean(diag H) * ||A - W[:, K]||^2`` pulling the refit towards the weights as
they are: calibration sets are small (1,280 tokens against 1,536 MLP channels), and a plain
least-squares fit overfits them (measured on SmolLM2, MLP 20%: held-out perplexity 80 -> 514
with ridge towards zero at damp 0.01). A large ``damp`` leaves the layer unchanged.

``H`` is measured in the *pruned* model, layer by layer in execution order:
each layer is refit against the inputs it will really see once the layers before it are pruned and
refit, as SparseGPT does. The target is still the dense model's output, so the refit also corrects
the drift of earlier layers: with inputs ``X'`` (pruned model) and ``X`` (dense model), the solution
is ``A = (W X^T X'_K)(X'_K^T X'_K)^-1``, which needs ``X'_K^T X`` across the two models. Both models
are run on the same batches. When one forward over all windows fits the budget of
:func:`one_pass_budget` (a quarter of the memory available, 1 to 8 GiB; :func:`one_pass_rows`), all
windows go through the pruned model as one batch, and each layer's forward pre-hook refits it just
before it runs, so every layer sees its refit predecessors; the dense model's forward runs in step
with it (:mod:`fxprune.passes.lockstep`), so only one layer's dense input (float32) is held at a
time (SmolLM2, 250 windows: peak RSS 3.1 GB, against 11.0 GB when every layer's dense inputs were
collected first). With more windows, the dense inputs of every refit layer are kept and the pruned
model runs once per refit layer, stopped there (quadratic in depth). Every
forward stops once the last refit layer has its input: nothing after it (an LM head's logits, the
largest tensor of the pass) is computed.

Residual writers (``o_proj``, ``down_proj`` of a pre-norm block) are aimed at the dense residual
stream rather than the dense layer output, so the refit also cancels the stream's drift from the
layers before (``residual_correction``, on by default; see :mod:`fxprune.passes.residual`).

Which layers: every ``nn.Linear`` (or GPT-2 ``Conv1D``) whose weight loses *input* channels under the
plan: ``down_proj`` / ``fc2`` for MLP channels, ``o_proj`` / ``dense`` for heads. When its output
dim shrinks too (hidden-size pruning) only the kept rows are written. A layer with a bias gets its
bias refit too (a constant input feature, undamped), which subsumes FLAP's mean compensation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..capture import Program
from ..data import stack_windows
from ..depgraph import DependencyGraph
from ..errors import FxpruneError
from ..plan import Plan
from .importance.base import INPUT_DIM
from .importance.taylor import run_batch
from .lockstep import DenseStepper
from .residual import StreamRecorder, Tap, check_taps, drift_terms, find_taps
from .rewrite import KeepMasks, _param_indices  # the rewrite's own parameter -> kept-indices map

# Bytes of dense inputs kept for a single-pass refit (float32, all refit layers). None: from the
# memory available at the call (one_pass_budget); an int fixes it (tests set small ones).
ONE_PASS_BYTES: int | None = None
ONE_PASS_MIN_BYTES, ONE_PASS_MAX_BYTES = 1 << 30, 8 << 30
# dtype of the activation products (X^T X' and the drift terms; their sums and the solves are float64).
# SmolLM2, obs with 30 written windows (40 x 128 tokens, 2-core AMX Xeon): float32 takes the choice
# from 32.1 to 25.8 s; perplexity the same to 4 decimals (20%: 59.6439, 50% heads+MLP: 127.5047)
MOMENT_DTYPE = torch.float32
# a single pass's bytes per window, in multiples of the widest consumer's dense values (float32):
# both models' live activations besides them. SmolLM2 (down_proj input + stream, 1.08 MB a 128-token
# window): peak RSS 2.29 GB with 40 windows, 3.06 GB with 250, ~3.7 MB a window (3.4x)
ACTIVATION_FACTOR = 8


@dataclass
class _Target:
    path: str
    in_dim: int
    kept_in: np.ndarray
    kept_out: np.ndarray | None


@dataclass
class Refit:
    """A layer's refit solved elsewhere (``obs`` solves it while choosing): the full-width weight
    ``(out, in)`` with removed columns zero, its bias (or None), and the input columns it kept."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    kept_in: np.ndarray


def apply_refits(original: nn.Module, pruned: nn.Module, program: Program, dg: DependencyGraph, plan: Plan,
                 refits: dict[str, Refit], batches: Iterable[Any], *, damp: float, residual_corrected: int,
                 notes: list[str]) -> dict[str, Any] | None:
    """Write refits already solved into ``pruned`` instead of solving them again, or None (nothing
    written) when they do not cover exactly the plan's refit targets with the same kept columns.

    ``obs`` refits each consumer in its own working copy with the objective, damping and sequential
    order of :func:`reconstruct` (its ridge mean runs over all columns, not the kept ones: on SmolLM2
    at 20% the held-out perplexity was 65.93 against 65.99), so the second pass (28% of the call)
    is skipped. The record is :func:`reconstruct`'s without the relative errors, with
    ``"source": "obs"``.
    """
    targets = refit_targets(original, program, dg, plan)
    if not targets or {t.path for t in targets} != set(refits):
        return None
    for t in targets:
        r = refits[t.path]
        mod = pruned.get_submodule(t.path)
        if t.in_dim != 1 or not np.array_equal(r.kept_in, t.kept_in) or (r.bias is None) != (mod.bias is None):
            return None
    with torch.no_grad():
        for t in targets:
            r, mod = refits[t.path], pruned.get_submodule(t.path)
            rows = slice(None) if t.kept_out is None else torch.as_tensor(t.kept_out)
            mod.weight.copy_(r.weight[rows][:, torch.as_tensor(t.kept_in)].to(mod.weight.dtype))
            if r.bias is not None:
                mod.bias.copy_(r.bias[rows].to(mod.bias.dtype))
    return {"layers": len(targets), "damp": damp, "residual_corrected": residual_corrected, "source": "obs",
            "notes": few_tokens_note(original, targets, list(batches)) + list(notes)}


def refit_targets(original: nn.Module, program: Program, dg: DependencyGraph, plan: Plan,
                  drift: bool = False) -> list[_Target]:
    """The layers whose input channels the plan removes, in parameter order. With ``drift``, also
    every other Linear (not tied to another parameter): its inputs drift once earlier layers are
    pruned, and refitting it against the dense output corrects that."""
    index = _param_indices(program, dg, KeepMasks(dg, plan))
    out = []
    for path, mod in original.named_modules():
        in_dim = INPUT_DIM.get(type(mod).__name__)
        weight = getattr(mod, "weight", None)
        if in_dim is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        dims = index.get(f"{path}.weight", {})
        if in_dim not in dims:
            if not drift or len(program.aliases.get(f"{path}.weight", [])) > 1:
                continue
            dims = {**dims, in_dim: np.arange(weight.shape[in_dim])}
        out.append(_Target(path, in_dim, dims[in_dim], dims.get(1 - in_dim)))
    return out


def _flat_input(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).to(MOMENT_DTYPE)


def _solve(w: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, prior: torch.Tensor, damp: float,
           n_damped: int, drift: torch.Tensor | None = None) -> torch.Tensor:
    """``A = (W C + D + lam P)(G + lam I)^-1``: least squares pulled towards ``prior`` (``P``).

    ``C = X^T X'_K``, ``G = X'_K^T X'_K``, ``lam = damp * mean(diag G)``. This minimises
    ``||X'_K A^T - X W^T - E||^2 + lam ||A - P||^2`` with ``P`` = the kept columns as they are, so a
    large damping leaves the layer unchanged instead of shrinking it to zero; ``D = E^T X'_K`` is the
    residual stream's drift term (``E`` = dense - pruned stream; None: no correction). Only the
    first ``n_damped`` entries (not an intercept's) are damped.
    """
    g = gram.clone()
    diag = torch.diagonal(g)[:n_damped]
    mean = float(diag.mean())
    lam = damp * mean if mean > 0 else damp
    diag += lam
    rhs = w @ cross  # (out, |K| [+1])
    if drift is not None:
        rhs[:, : drift.shape[1]] += drift
    rhs[:, :n_damped] += lam * prior[:, :n_damped]
    # G is symmetric positive definite after damping; solve A G = rhs  <=>  G A^T = rhs^T
    chol = torch.linalg.cholesky(g)
    return torch.cholesky_solve(rhs.T.contiguous(), chol).T


def reconstruct(original: nn.Module, pruned: nn.Module, program: Program, dg: DependencyGraph,
                plan: Plan, batches: Iterable[Any], *, damp: float = 1.0, drift: bool = False,
                residual_correction: bool = True,
                progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Refit, in place in ``pruned``, every layer whose input channels ``plan`` removed.

    ``original`` is the dense model (read only); ``pruned`` the rewritten copy (its graph module
    shares its parameters, so both change). ``batches`` are calibration batches as for the Taylor
    passes. ``residual_correction`` aims residual writers at the dense stream (module docstring).
    Returns ``{"layers": n, "damp": damp, "rel_error_before": x, "rel_error_after": y,
    "residual_corrected": m, "notes": [...]}``: the mean over refit layers of
    ``||X'_K A^T - X W^T|| / ||X W^T||`` on the calibration data, and how many layers were aimed at
    the dense stream (notes: the blocks where the dense model contradicts the rule table).
    """
    batches = list(batches)
    if not batches:
        raise FxpruneError("reconstruction needs calibration batches (--calib)")
    if damp <= 0:
        raise FxpruneError(f"reconstruction damping must be > 0, got {damp}")
    targets = refit_targets(original, program, dg, plan, drift)
    if not targets:
        return {"layers": 0, "damp": damp, "residual_corrected": 0, "notes": []}
    errors: dict[str, list[float]] = {"before": [], "after": []}
    was = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    taps = find_taps(original, [t.path for t in targets]) if residual_correction else {}
    widths = [(t.path, t.in_dim) for t in targets] + [(t.path, 1 - t.in_dim) for t in targets if t.path in taps]
    few_tokens = few_tokens_note(original, targets, batches)
    batches = stack_windows(batches, one_pass_rows(original, widths, batches))
    try:
        taps, notes = check_taps(original, taps, batches[0])
        notes = few_tokens + notes
        if len(batches) == 1:
            _refit_in_one_pass(original, pruned, targets, taps, batches[0], damp, errors, progress)
        else:
            dense_inputs, dense_streams = _dense_inputs(original, targets, batches, taps)
            for step, t in enumerate(targets):
                stats = _collect(pruned, t, dense_inputs.pop(t.path), batches, dense_streams.pop(t.path, None), taps)
                _refit(original, pruned, t, stats, damp, errors)
                if progress is not None:
                    progress("reconstruct", step + 1)
    finally:
        original.train(was[0])
        pruned.train(was[1])
    out: dict[str, Any] = {"layers": len(targets), "damp": damp,
                           "rel_error_before": float(np.mean(errors["before"])), "residual_corrected": len(taps),
                           "notes": notes}
    if errors["after"]:  # measured for bias-free layers (the error formula has no intercept term)
        out["rel_error_after"] = float(np.mean(errors["after"]))
    return out


# calibration tokens per input feature below which the report suggests more calibration text
TOKENS_PER_FEATURE = 2


def few_tokens_note(original: nn.Module, targets: list[_Target], batches: list[Any]) -> list[str]:
    """A note when the calibration token ids number under :data:`TOKENS_PER_FEATURE` x the widest
    refit input: the input moments are then poorly determined and more text measurably helps.
    Empty for other batch forms (the token count is not known)."""
    if not targets or not all(isinstance(b, torch.Tensor) and b.dim() == 2 and not b.is_floating_point()
                              for b in batches):
        return []
    tokens = sum(int(b.numel()) for b in batches)
    width, path = max((int(original.get_submodule(t.path).weight.shape[t.in_dim]), t.path) for t in targets)
    if tokens >= TOKENS_PER_FEATURE * width:
        return []
    return [f"reconstruction: {tokens:,} calibration tokens for inputs up to {width:,} wide ({path}); under "
            f"{TOKENS_PER_FEATURE}x the width the least-squares statistics are poorly determined and more "
            "calibration windows usually help (SmolLM2, obs at 20%: 10 x 128 tokens 1.55x dense perplexity, "
            "40 x 128 1.35x)"]


def _refit(original: nn.Module, pruned: nn.Module, t: _Target, stats: dict[str, torch.Tensor], damp: float,
           errors: dict[str, list[float]]) -> None:
    """Solve for ``t``'s kept weights (and bias) from its input moments and write them in place."""
    dense_w = original.get_submodule(t.path).weight.detach().double()
    w = dense_w if t.in_dim == 1 else dense_w.T  # as (out, in)
    mod = pruned.get_submodule(t.path)
    prior = w[:, torch.as_tensor(t.kept_in)]  # all rows: rows are cut after the solve
    bias = getattr(mod, "bias", None)
    if bias is None:
        a = _solve(w, stats["xx"], stats["gram"], prior, damp, len(t.kept_in), stats.get("drift"))
    else:  # refit the bias too (an intercept): FLAP's mean compensation, and more
        drift = stats.get("drift")
        if drift is not None:  # the intercept column's drift term: E^T 1
            drift = torch.cat([drift, stats["drift_1"][:, None]], 1)
        a_aug = _solve(torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype)], 1),
                       _augment_cross(stats), _augment_gram(stats), prior, damp, len(t.kept_in), drift)
        a, shift = a_aug[:, :-1], a_aug[:, -1]
    old = mod.weight.detach().double()
    old = old if t.in_dim == 1 else old.T
    if t.kept_out is not None:
        a = a[torch.as_tensor(t.kept_out)]
        w = w[torch.as_tensor(t.kept_out)]
    errors["before"].append(_rel_error(w, old, stats))
    if bias is None:
        errors["after"].append(_rel_error(w, a, stats))
    with torch.no_grad():
        mod.weight.copy_((a if t.in_dim == 1 else a.T).to(mod.weight.dtype))
        if bias is not None:
            kept_shift = shift if t.kept_out is None else shift[torch.as_tensor(t.kept_out)]
            bias.add_(kept_shift.to(bias.dtype))


def _refit_in_one_pass(original: nn.Module, pruned: nn.Module, targets: list[_Target], taps: dict[str, Tap],
                       batch: Any, damp: float, errors: dict[str, list[float]],
                       progress: Callable[[str, int], None] | None) -> None:
    """All calibration data in one forward of the pruned model: each target's pre-hook refits it
    before it runs, so later targets already see the refit earlier ones (sequential, one pass); the
    dense model's forward runs in step with it (:class:`~fxprune.passes.lockstep.DenseStepper`)."""
    done: list[str] = []
    streams = StreamRecorder(pruned, taps)
    dense = DenseStepper(original, [t.path for t in targets], taps, batch)

    def hook_for(t: _Target):
        def hook(_mod: nn.Module, args: tuple) -> None:
            if t.path in done:  # a module called twice: refit on its first call only
                return
            x, h = dense.inputs(t.path)
            xp, x = _flat_input(args[0]), x.to(MOMENT_DTYPE)
            drift = len(t.kept_in) != x.shape[1] or not torch.equal(xp, x)  # no drift: upstream of any pruning
            hp = streams.take(t.path)
            if drift:
                stats = moments(x, xp)
                if h is not None:
                    stats.update(drift_terms(h, hp, xp, t.kept_out))
                _refit(original, pruned, t, stats, damp, errors)
            done.append(t.path)
            if drift and progress is not None:
                progress("reconstruct", len(done))
            if len(done) == len(targets):
                raise _Stop
        return hook

    handles = [pruned.get_submodule(t.path).register_forward_pre_hook(hook_for(t)) for t in targets]
    try:
        with torch.no_grad():
            run_until_stopped(pruned, batch)
    finally:
        for h in handles:
            h.remove()
        streams.close()
        dense.close()
    missing = [t.path for t in targets if t.path not in done]
    if missing:
        raise FxpruneError(f"reconstruction: {missing[0]} was not called by the model's forward")


def _dense_inputs(original: nn.Module, targets: list, batches: list[Any], taps: dict[str, Tap] | None = None,
                  ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """Every target's input in the dense model, per batch (float32; a module called twice: its first
    call), from one pass over the data, each forward stopped once every target has its input; and,
    for targets in ``taps``, the residual stream they write back to (read before the target runs)."""
    got: dict[str, list[torch.Tensor]] = {t.path: [] for t in targets}
    streams: dict[str, list[torch.Tensor]] = {p: [] for p in got if taps and p in taps}
    seen: set[str] = set()
    recorder = StreamRecorder(original, {p: taps[p] for p in streams} if taps else {})

    def grab(path: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            if path in seen:
                return
            got[path].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
            if path in streams:
                streams[path].append(recorder.stream(path).float())
            seen.add(path)
            if len(seen) == len(got):
                raise _Stop
        return hook

    handles = [original.get_submodule(t.path).register_forward_pre_hook(grab(t.path)) for t in targets]
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                recorder.reset()
                run_until_stopped(original, batch)
    finally:
        for h in handles:
            h.remove()
        recorder.close()
    return got, streams


def one_pass_rows(model: nn.Module, consumers: list[tuple[str, int]], batches: list[Any]) -> int:
    """Windows per forward such that a single pass stays within :func:`one_pass_budget`; at least one.

    ``consumers`` are (module path, dim) pairs whose widths a consumer's dense values span (its
    input, and its residual stream when corrected). The dense model runs in step with the pruned one
    (:class:`~fxprune.passes.lockstep.DenseStepper`), so a pass holds one consumer's dense values
    at a time; with both models' live activations, :data:`ACTIVATION_FACTOR` x the widest."""
    if not batches or not isinstance(batches[0], torch.Tensor) or batches[0].dim() != 2:
        return 1
    widths: dict[str, int] = {}
    for path, dim in consumers:
        widths[path] = widths.get(path, 0) + int(model.get_submodule(path).weight.shape[dim])
    per_row = batches[0].shape[1] * max(widths.values(), default=0) * 4 * ACTIVATION_FACTOR
    return max(1, one_pass_budget() // max(per_row, 1))


def one_pass_budget() -> int:
    """Bytes a single-pass refit may use: :data:`ONE_PASS_BYTES` when set, else a quarter of the
    memory available now (Linux ``MemAvailable``), clamped to 1-8 GiB.

    Past the budget the refit runs the pruned model once per refit layer (quadratic in depth):
    SmolLM2 with 40 calibration windows took 362 s at a fixed 1 GiB and 107 s in one pass at 2 GiB.
    """
    if ONE_PASS_BYTES is not None:
        return ONE_PASS_BYTES
    available = _available_memory()
    if available is None:
        return ONE_PASS_MIN_BYTES
    return int(min(ONE_PASS_MAX_BYTES, max(ONE_PASS_MIN_BYTES, available // 4)))


def _available_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, or None where there is no such file (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_until_stopped(model: nn.Module, batch: Any) -> None:
    """``run_batch``, which a forward hook may end early by raising :class:`_Stop`."""
    try:
        run_batch(model, batch)
    except _Stop:
        pass


def _collect(pruned: nn.Module, t: _Target, dense: list[torch.Tensor], batches: list[Any],
             dense_streams: list[torch.Tensor] | None = None, taps: dict[str, Tap] | None = None,
             need_dense: bool = True) -> dict[str, torch.Tensor]:
    """Second moments at ``t``'s input: ``xx`` = X^T X'_K (dense against pruned inputs), ``gram`` =
    X'_K^T X'_K, ``dense`` = X^T X (with ``need_dense``), the sums for an intercept and, with ``dense_streams``, the
    residual drift term ``drift``. The pruned forward stops at ``t``."""
    acc: dict[str, torch.Tensor] = {}
    seen: list[torch.Tensor] = []
    streams = StreamRecorder(pruned, {t.path: taps[t.path]} if dense_streams is not None and taps else {})

    def hook(_mod: nn.Module, args: tuple) -> None:
        seen.append(_flat_input(args[0]))
        raise _Stop

    handle = pruned.get_submodule(t.path).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for i, (batch, x) in enumerate(zip(batches, dense)):
                streams.reset()
                run_until_stopped(pruned, batch)
                xp, x = seen.pop(), x.to(MOMENT_DTYPE)
                if t.in_dim == 1 and xp.shape[1] != len(t.kept_in):
                    raise FxpruneError(f"reconstruction: {t.path} sees {xp.shape[1]} inputs, "
                                       f"the plan keeps {len(t.kept_in)}")
                terms = moments(x, xp, dense=need_dense)
                if dense_streams is not None:
                    terms.update(drift_terms(dense_streams[i], streams.stream(t.path), xp, t.kept_out))
                for key, val in terms.items():
                    acc[key] = acc[key] + val if key in acc else val
    finally:
        handle.remove()
        streams.close()
    return acc


def _augment_cross(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[X, 1]^T [X'_K, 1]``: the cross moment with a constant feature on both sides."""
    top = torch.cat([s["xx"], s["sx"][:, None]], 1)
    bottom = torch.cat([s["sxp"], s["n"].reshape(1)])[None, :]
    return torch.cat([top, bottom], 0)


def _augment_gram(s: dict[str, torch.Tensor]) -> torch.Tensor:
    top = torch.cat([s["gram"], s["sxp"][:, None]], 1)
    bottom = torch.cat([s["sxp"], s["n"].reshape(1)])[None, :]
    return torch.cat([top, bottom], 0)


def moments(x: torch.Tensor, xp: torch.Tensor, dense: bool = True) -> dict[str, torch.Tensor]:
    """The refit's second moments from dense ``x`` and pruned ``xp`` inputs (rows = tokens), as
    float64; ``dense`` adds X^T X, which only the error report needs (obs skips it: 1536^2 x tokens
    per MLP). The products run in the inputs' dtype (:data:`MOMENT_DTYPE`)."""
    f64 = torch.float64
    out = {"xx": (x.T @ xp).to(f64), "gram": (xp.T @ xp).to(f64), "sx": x.sum(0).to(f64),
           "sxp": xp.sum(0).to(f64), "n": torch.tensor(float(x.shape[0]), dtype=f64)}
    if dense:
        out["dense"] = (x.T @ x).to(f64)
    return out


class _Stop(Exception):
    """Raised by a hook once it has the layer's input: the rest of the forward is not needed."""


def _rel_error(w: torch.Tensor, a: torch.Tensor, s: dict[str, torch.Tensor]) -> float:
    """``||X'_K A^T - X W^T||_F / ||X W^T||_F`` from the second moments, without the activations."""
    target = ((w @ s["dense"]) * w).sum()  # tr(W S W^T) without the (out x out) product
    cross = ((w @ s["xx"]) * a).sum()
    own = ((a @ s["gram"]) * a).sum()
    err = (target - 2 * cross + own).clamp_min(0)
    return float(torch.sqrt(err / target)) if target > 0 else 0.0
