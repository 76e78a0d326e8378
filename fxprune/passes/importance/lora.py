"""LoRAPrune's ``lora`` importance: weight gradients estimated from LoRA factor gradients only.

LoRAPrune (Zhang et al., 2023) never forms ``dL/dW`` for a frozen weight ``W``; it attaches a LoRA
adapter ``W_eff = W + s * B @ A`` (``A``: r x in, ``B``: out x r, ``s = alpha / r`` as peft scales it)
and estimates the weight gradient from one step of the factors::

    G = s * (dB @ A + B @ dA - dB @ dA)   # dB = dL/dB = s * dL/dW_eff @ A.T,  dA = s * B.T @ dL/dW_eff
    score(element) = |G * (W + s * B @ A)|

summed into units by :func:`unit_scores` and combined over members with ``req.aggregate``. Here
``G`` is used half by half (``G_out`` for row members, ``G_in`` for column members, divided by
``s**2``), for the reason and with the initialisation given below.
Gradients are those of the same mean-over-samples calibration loss as the Taylor passes
(:mod:`.taylor`), accumulated over all batches with ``A``, ``B`` fixed (no adapter step is taken).

Initialisation (why not peft's). peft initialises ``A`` Kaiming-uniform and ``B = 0``, so at the
start ``dA = s * B.T @ dL/dW = 0`` and ``G = s * dB @ A = s**2 * dL/dW @ A.T @ A``: a projection of each
row of the gradient onto ``r`` random input directions. That keeps the identity of output channels
(rows) but mixes the input channels (columns) together, so the ``o_proj`` / ``down_proj`` members of
head and MLP groups, which are scored along columns, get no gradient signal at all. LoRAPrune itself
gets a non-zero ``B`` by fine-tuning the factors first. We keep the model function exactly unchanged
(``B @ A = 0``) and get both sides by splitting the rank: the first ``r_out = ceil(r/2)`` components
have random ``A`` rows and zero ``B`` columns (``A1``), the other ``r_in = floor(r/2)`` have zero ``A``
rows and random ``B`` columns (``B2``); entries ``N(0, 1/r_side)`` from a generator seeded with
``req.seed`` and the module's position, so runs are deterministic. Then ``dB @ dA = 0`` identically
(each rank component has a zero factor gradient on one side) and LoRAPrune's ``G`` splits exactly::

    G = G_out + G_in
    G_out = s * dB @ A = s**2 * dL/dW @ A1.T @ A1
    G_in  = s * B @ dA = s**2 * B2 @ B2.T @ dL/dW

with ``E[A1.T @ A1] = I`` and ``E[B2 @ B2.T] = I``: each half is an unbiased sketch of ``s**2 dL/dW``.
``G_out`` keeps rows (output channels) apart and mixes columns; ``G_in`` the reverse. Adding the
other half's mixing noise hurts the ranking, so a member whose unit dim is 0 (rows) is scored with
``G_out`` and one whose unit dim is 1 (columns) with ``G_in`` (with ``r = 1`` there is no ``G_in``
and columns use ``G_out``). Both are divided by ``s**2`` so the scores are in the units of
``taylor-element1``; rankings do not depend on that. Measured on SmolLM2-135M (8 x 128 wikitext
tokens, r = 8, Spearman of per-member unit scores vs ``taylor-element1``, layers 2/10/20): peft init
0.83-0.85 for q/gate/up rows but about 0 for o/down columns (as ``l1``); split init scoring every
member with the full ``G_out + G_in`` 0.22-0.90; split init with the matching half 0.70-0.91.
With ``B @ A = 0`` the scored weight ``W + s * B @ A`` is ``W`` itself. ``alpha = 2 * r`` (``s = 2``);
any value ranks the same.

Members without an adapter. Adapters go on the ``nn.Linear`` modules whose weight is a group member
(by exact module name). Other members (norm weights, embeddings, biases, buffers) have no factor to
carry a gradient, and they must not get a weight gradient either, so they are **left out of the
aggregate**; a group with no adapted member at all is scored by ``l1`` magnitude (``sum |W|``). A
weight tied between an ``nn.Linear`` (e.g. ``lm_head``) and an embedding is estimated through the
Linear's use only.

Memory. Adapters are injected into ``req.model`` in place (no copy of the model) and unloaded
afterwards; every base parameter has ``requires_grad=False`` for the whole run, so no weight gradient
is ever allocated, only the ``r * (in + out)`` factor gradients. The scores of one weight are formed
in row blocks and reduced to per-row and per-column sums at once, so a ``G`` as large as the weight
is never held either. The user's ``requires_grad`` flags, modes and ``.grad`` references are restored.

Sequential adapters. For an adapter in series with the layer, ``W_eff = (I + s * B @ A) @ W``
(``A``: r x out, ``B``: out x r), ``dB = s * dL/dW_eff @ W.T @ A.T`` and ``dA = s * B.T @ dL/dW_eff @ W.T``;
a factor step changes ``W_eff`` by ``s * d(B @ A) @ W``, so the estimate becomes
``G = s * (dB @ A + B @ dA - dB @ dA) @ W`` and the scored weight ``(I + s * B @ A) @ W``. The row/column
split above would not carry over: the ``dB`` half still keeps rows apart, but both halves mix columns
(through ``W.T @ A.T @ A @ W`` or ``W.T @ W``), so column members would need another estimate.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch
from torch import nn

from .base import ImportanceRequest, param
from .taylor import (ModelState, backward_passes, freeze_all_but, member_uses, require_batches,
                     score_groups)

ADAPTER = "fxprune_lora"
_ROW_BLOCK = 4096  # rows of G formed at once when scoring a weight


def _linear_targets(req: ImportanceRequest) -> dict[str, str]:
    """Member parameter name -> name of the ``nn.Linear`` module whose ``weight`` it is."""
    modules = dict(req.model.named_modules(remove_duplicate=False))
    out: dict[str, str] = {}
    for name, uses in member_uses(req.groups).items():
        for alias in [name, *uses[0][2].aliases]:
            mod_name, _, attr = alias.rpartition(".")
            if attr == "weight" and isinstance(modules.get(mod_name), nn.Linear):
                out[name] = mod_name
                break
    return out


def _init_factors(layer: nn.Module, seed: int, index: int) -> int:
    """Split-rank init (module docstring): ``B @ A = 0``, both ``dA`` and ``dB`` informative.

    Returns ``r_in``, the number of rank components that carry the column (``G_in``) sketch.
    """
    a = layer.lora_A[ADAPTER].weight  # r x in
    b = layer.lora_B[ADAPTER].weight  # out x r
    r = a.shape[0]
    ra = (r + 1) // 2
    rb = r - ra
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    with torch.no_grad():
        a.zero_()
        b.zero_()
        a[:ra] = torch.randn(ra, a.shape[1], generator=gen) / math.sqrt(ra)
        if rb:
            b[:, ra:] = torch.randn(b.shape[0], rb, generator=gen) / math.sqrt(rb)
    return rb


def _reduced_scores(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, da: torch.Tensor,
                    db: torch.Tensor, s: float, has_in: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (out x 1) of ``|G_out/s^2 * W_eff|`` and column sums (1 x in) of ``|G_in/s^2 * W_eff|``.

    ``W_eff = W + s * B @ A``. Formed in blocks of rows so no full-size ``G`` is held.
    """
    rows = torch.zeros(w.shape[0], 1, dtype=torch.float32)
    cols = torch.zeros(1, w.shape[1], dtype=torch.float32)
    a, da = a.float(), da.float()
    for lo in range(0, w.shape[0], _ROW_BLOCK):
        hi = min(lo + _ROW_BLOCK, w.shape[0])
        bb, dbb = b[lo:hi].float(), db[lo:hi].float()
        w_eff = w[lo:hi].float() + s * (bb @ a)
        g_out = (dbb @ a).mul_(1.0 / s)  # s * dB @ A / s^2
        rows[lo:hi, 0] = (g_out * w_eff).abs_().sum(1)
        g_in = (bb @ da).mul_(1.0 / s) if has_in else g_out  # s * B @ dA / s^2
        cols += (g_in * w_eff).abs_().sum(0, keepdim=True)
    return rows, cols


def lora_importance(req: ImportanceRequest) -> dict[str, np.ndarray]:
    """LoRAPrune importance, without any weight gradient (formulas in the module docstring).

    Per unit and member: ``sum |G_out / s**2 * (W + s B A)|`` over the unit's rows (member dim 0) or
    ``sum |G_in / s**2 * (W + s B A)|`` over its columns (dim 1); members without an adapter are left
    out of the aggregate, a group with none is scored ``sum |W|``.
    """
    from peft import LoraConfig, LoraModel

    require_batches(req, "lora")
    targets = _linear_targets(req)
    # tensors by their names now: injection moves each adapted Linear's weight under ".base_layer"
    base = {name: param(req.model, name) for name in member_uses(req.groups)}
    model = req.model
    state = ModelState(model)
    had_cfg = "peft_config" in model.__dict__
    old_cfg = model.__dict__.get("peft_config")
    tuner = None
    rank = max(1, int(req.lora_rank))
    try:
        module_names = sorted(set(targets.values()))
        if module_names:
            cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                             target_modules="|".join(re.escape(n) for n in module_names))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft warns about tied lm_head; we never merge
                tuner = LoraModel(model, cfg, adapter_name=ADAPTER)
        modules = dict(model.named_modules())
        layers = {n: modules[n] for n in module_names}
        r_in = {n: _init_factors(layer, req.seed, i) for i, (n, layer) in enumerate(layers.items())}
        factors = [t for layer in layers.values()
                   for t in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
        freeze_all_but(model, factors)  # base weights: requires_grad=False, no .grad ever
        if factors:
            for _ in backward_passes(req, "lora"):
                pass

        def element(name: str) -> dict[int, torch.Tensor] | None:
            mod = targets.get(name)
            if mod is None:
                return None  # no adapter: left out of the aggregate
            layer = layers[mod]
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            s = float(layer.scaling[ADAPTER])
            da = a.grad if a.grad is not None else torch.zeros_like(a)
            db = b.grad if b.grad is not None else torch.zeros_like(b)
            with torch.no_grad():
                rows, cols = _reduced_scores(base[name].detach(), a.detach(), b.detach(), da, db, s,
                                             r_in[mod] > 0)
            # unit_scores only sums over the dims other than the member's: the sums are enough
            return {0: rows, 1: cols}

        def magnitude(name: str) -> torch.Tensor:
            return base[name].detach().abs()

        return score_groups(req, element, fallback=magnitude)
    finally:
        if tuner is not None:
            tuner.unload()
        if had_cfg:
            model.peft_config = old_cfg
        elif "peft_config" in model.__dict__:
            del model.peft_config
        state.restore()

