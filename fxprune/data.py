"""Calibration and evaluation text: token windows and perplexity (LLM-Pruner's protocol)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FxpruneError


def calibration_text(path: str | None) -> str:
    """The text of ``path``; with None, CPython's own ``pydoc_data.topics`` (~465 KB of English)."""
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics.values())
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise FxpruneError(f"cannot read text file {path}: {exc.strerror or exc}") from exc


def _tokens(tokenizer: Any, text: str, needed: int) -> torch.Tensor:
    """Token ids of ``text``, tokenised in chunks, stopping once ``needed`` tokens are there."""
    out: list[int] = []
    step = 200_000
    for start in range(0, len(text), step):
        out.extend(tokenizer(text[start : start + step], add_special_tokens=False)["input_ids"])
        if len(out) >= needed:
            break
    return torch.tensor(out, dtype=torch.long)


def token_windows(tokenizer: Any, text: str, n: int, seqlen: int, *, offset_tokens: int = 0) -> torch.Tensor:
    """``n`` non-overlapping windows of ``seqlen`` tokens, from ``offset_tokens`` on: shape (n, seqlen)."""
    if n < 1 or seqlen < 2:
        raise FxpruneError(f"need at least 1 window of 2 tokens, got {n} x {seqlen}")
    needed = offset_tokens + n * seqlen
    ids = _tokens(tokenizer, text, needed)
    if ids.numel() < needed:
        raise FxpruneError(
            f"the text has {ids.numel()} tokens; {n} x {seqlen} = {n * seqlen} are needed"
            + (f" after {offset_tokens} calibration tokens" if offset_tokens else "")
            + ": give a longer file or fewer/shorter samples"
        )
    return ids[offset_tokens:needed].view(n, seqlen)


def split_calib_eval(tokenizer: Any, text: str, calib_n: int, seqlen: int, eval_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows from the start of ``text`` and held-out evaluation windows after them."""
    total = token_windows(tokenizer, text, calib_n + eval_windows, seqlen)
    return total[:calib_n], total[calib_n:]


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """exp(mean next-token NLL) over independent windows; ``{"ppl", "tokens"}``."""
    from .capture import call_extras, main_outputs

    nll, count = 0.0, 0
    hf = hasattr(model, "config")
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size]
        out = model(input_ids=x, **call_extras(model)) if hf else model(x)
        logits = main_outputs(out)[0][0].float()
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += x[:, 1:].numel()
        if progress:
            progress(i + x.shape[0], windows.shape[0])
    return {"ppl": math.exp(nll / count), "tokens": int(count)}
