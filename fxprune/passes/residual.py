"""Residual-drift correction for the refit: aim a residual writer at the dense residual stream.

A pre-norm transformer block adds each sub-block's last Linear (``o_proj``, ``down_proj``) back
onto the residual stream: ``h' = h + W x``. Once earlier layers are pruned, the pruned model's
stream ``h_p`` has drifted from the dense one ``h``. The plain refit aims ``W x`` at the dense
output ``W_dense x_dense``, so the drift passes on unchanged. Aiming it instead at
``W_dense x_dense + (h - h_p)`` makes the pruned stream after the sub-block match the dense one as
well as the kept columns allow, so errors stop piling up across layers. In the least-squares
solution this adds ``(h - h_p)^T X'`` to the right-hand side (the "asymmetric" calibration of
GPTAQ, applied to structured pruning). Measured on SmolLM2-135M (held-out perplexity / dense, three
disjoint slices), obs at damp 3: MLP 20% 1.590 / 1.663 / 1.543 -> 1.568 / 1.642 / 1.534; heads+MLP
50% 5.13 / 7.22 / 5.46 -> 4.89 / 6.94 / 5.04. The correction makes stronger damping pay: at damp 8,
1.548 / 1.629 / 1.516 and 4.32 / 5.94 / 4.60 (the plain refit is worse at damp 8 than at 3).

Which value is the stream ``h`` comes from a rule table (data, not code): for each known block
layout, its sub-blocks in order as (module whose input is the stream, Linear whose output is added
back to it). A rule is used only where the dense model confirms it on calibration data: for each
sub-block, stream-in + Linear-out must equal the next sub-block's stream-in (the block's output for
the last one). A block whose layout differs (a norm after the MLP as in Gemma, parallel attention
and MLP as in GPT-NeoX, dropout in train mode) fails that check and is refit without correction;
the report says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .importance.taylor import run_batch

# per block layout: (module reading the residual stream, Linear whose output is added back to it)
SUBBLOCKS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("input_layernorm", "self_attn.o_proj"), ("post_attention_layernorm", "mlp.down_proj")),  # Llama, Mistral, Qwen, Phi-3
    (("ln_1", "attn.c_proj"), ("ln_2", "mlp.c_proj")),  # GPT-2
    (("self_attn_layer_norm", "self_attn.out_proj"), ("final_layer_norm", "fc2")),  # OPT (pre-LN)
)
RTOL = 1e-4  # of the dense check, relative to the stream's largest magnitude (float32 sums)


@dataclass(frozen=True)
class Tap:
    """Where a residual writer's stream is read: ``stream`` is the module whose input it is."""

    block: str  # the block holding both
    stream: str  # path of the module whose first input is the residual stream
    layout: tuple[tuple[str, str], ...]


def find_taps(model: nn.Module, paths: list[str]) -> dict[str, Tap]:
    """The rule-table match of each consumer path that has one (not yet checked on data)."""
    names = dict(model.named_modules())
    taps: dict[str, Tap] = {}
    for path in paths:
        for layout in SUBBLOCKS:
            for stream, linear in layout:
                if not path.endswith("." + linear):
                    continue
                block = path[: -len(linear) - 1]
                if all(f"{block}.{s}" in names and f"{block}.{lin}" in names for s, lin in layout):
                    taps[path] = Tap(block, f"{block}.{stream}", layout)
    return taps


def check_taps(model: nn.Module, taps: dict[str, Tap], batch: Any) -> tuple[dict[str, Tap], list[str]]:
    """Keep the taps whose block the dense model confirms (see the module docstring) on one forward
    over the start of calibration ``batch`` (token ids: two windows); return them and a note per
    block that failed."""
    if not taps:
        return {}, []
    blocks = {t.block: t.layout for t in taps.values()}
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str, value: Any) -> None:
        if key not in seen and isinstance(value, torch.Tensor):
            seen[key] = value.detach()
        if key in blocks and all(b in seen for b in blocks):
            raise _Done  # every block has its output: the rest of the forward is not needed

    handles = []
    for block, layout in blocks.items():
        for stream, linear in layout:
            handles.append(model.get_submodule(f"{block}.{stream}").register_forward_pre_hook(
                lambda _m, args, k=f"{block}.{stream}": keep(k, args[0] if args else None)))
            handles.append(model.get_submodule(f"{block}.{linear}").register_forward_hook(
                lambda _m, _a, out, k=f"{block}.{linear}": keep(k, out)))
        handles.append(model.get_submodule(block).register_forward_hook(
            lambda _m, _a, out, k=block: keep(k, out[0] if isinstance(out, (tuple, list)) else out)))
    try:
        with torch.no_grad():
            run_batch(model, batch[:2] if isinstance(batch, torch.Tensor) and batch.dim() == 2 else batch)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    good: set[str] = set()
    notes = []
    for block, layout in blocks.items():
        why = _check_block(block, layout, seen)
        if why is None:
            good.add(block)
        else:
            notes.append(f"residual correction off for {block}: {why}")
    return {p: t for p, t in taps.items() if t.block in good}, notes


def _check_block(block: str, layout: tuple[tuple[str, str], ...], seen: dict[str, torch.Tensor]) -> str | None:
    """Why the dense values contradict ``layout`` for ``block``, or None when they confirm it."""
    ends = [f"{block}.{s}" for s, _ in layout[1:]] + [block]
    for (stream, linear), end in zip(layout, ends):
        parts = [f"{block}.{stream}", f"{block}.{linear}", end]
        missing = [p for p in parts if p not in seen]
        if missing:
            return f"{missing[0]} did not run"
        h, out, after = (seen[p].float() for p in parts)
        if not (h.shape[-1] == out.shape[-1] == after.shape[-1] and h.numel() == out.numel() == after.numel()):
            return (f"{linear} output {tuple(out.shape)} does not add onto the stream {tuple(h.shape)} "
                    f"giving {tuple(after.shape)}")
        # rows as the refit sees them (OPT flattens the stream to (tokens, hidden) inside its block)
        h, out, after = (v.reshape(-1, v.shape[-1]) for v in (h, out, after))
        scale = float(after.abs().max()) or 1.0
        err = float((h + out - after).abs().max())
        if err > RTOL * scale + 1e-6:
            return f"stream + {linear} differs from the next stream by {err:.2g} (not a plain residual add)"
    return None


def drift_terms(dense_h: torch.Tensor, pruned_h: torch.Tensor, xp: torch.Tensor,
                kept_out: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """A writer's drift terms for the refit, ``E = h - h_p`` (dense minus pruned stream, rows =
    tokens): ``drift`` = E^T X' and, for an intercept, ``drift_1`` = E^T 1. Every output row of the
    dense layer (the stream's width) is covered; with ``kept_out`` (the stream itself pruned) the
    other rows get zero, they are cut after the solve."""
    dense_h, pruned_h = dense_h.to(xp.dtype), pruned_h.to(xp.dtype)  # the products run in xp's dtype
    if kept_out is None:
        e = dense_h - pruned_h
    else:
        kept = torch.as_tensor(kept_out)
        e = torch.zeros_like(dense_h)
        e[:, kept] = dense_h[:, kept] - pruned_h
    return {"drift": (e.T @ xp).double(), "drift_1": e.sum(0).double()}


class StreamRecorder:
    """Forward pre-hooks keeping, per tap, the latest residual stream its block read (flattened to
    rows, float32); ``reset()`` before each forward so a module called twice keeps its first call."""

    def __init__(self, model: nn.Module, taps: dict[str, Tap]):
        self.values: dict[str, torch.Tensor] = {}
        streams = {t.stream for t in taps.values()}
        self._handles = [model.get_submodule(s).register_forward_pre_hook(self._hook(s)) for s in streams]
        self._of = {p: t.stream for p, t in taps.items()}

    def _hook(self, stream: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            if stream not in self.values:
                self.values[stream] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    def reset(self) -> None:
        self.values.clear()

    def stream(self, consumer: str) -> torch.Tensor | None:
        """The stream ``consumer`` writes back to, from the last forward (None: no tap)."""
        s = self._of.get(consumer)
        return None if s is None else self.values.get(s)

    def take(self, consumer: str) -> torch.Tensor | None:
        """:meth:`stream`, forgotten here: a forward over many windows need not keep every stream."""
        s = self._of.get(consumer)
        return None if s is None else self.values.pop(s, None)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _Done(Exception):
    """Raised by the check's hooks once every block has run."""
