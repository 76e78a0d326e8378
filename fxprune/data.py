"""Calibration and evaluation text: token windows and perplexity (LLM-Pruner's protocol).

The default text is CPython's own ``pydoc_data.topics`` (about 465 KB of English reference prose),
so calibration and evaluation work offline with no data set installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FxpruneError

# Tokens kept beyond the ones needed when tokenising a prefix of the text: a prefix cut inside a
# word could tokenise its end differently from the whole text; tokens this far back cannot change.
_MARGIN = 64
_FIX = "give a longer text file or fewer/shorter windows"


def calibration_text(path: str | None) -> str:
    """The text of the file ``path``; with None, CPython's ``pydoc_data.topics`` (~465 KB of English).

    A missing, unreadable or empty file raises :class:`FxpruneError`.
    """
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics.values())
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise FxpruneError(f"cannot read text file {path} ({exc.strerror or exc}); give a readable plain-text file") from exc
    if not text.strip():
        raise FxpruneError(f"text file {path} is empty; give a file of plain text")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _tokens(tokenizer: Any, text: str, needed: int) -> tuple[torch.Tensor, bool]:
    """The first ``needed`` token ids of ``text`` (fewer if it is short), and whether that is all of it.

    Tokenises growing prefixes cut at line ends, so a 100 MB file costs no more than the
    windows need; the ids equal those of tokenising the whole text.
    """
    size = max(8 * (needed + _MARGIN), 1 << 16)
    while size < len(text):
        cut = text.rfind("\n", size // 2, size)
        cut = cut + 1 if cut > 0 else size
        ids = _encode(tokenizer, text[:cut])
        if len(ids) >= needed + _MARGIN:
            return torch.tensor(ids[:needed], dtype=torch.long), False
        size *= 2
    ids = _encode(tokenizer, text)
    return torch.tensor(ids[:needed], dtype=torch.long), True


def _check(n: int, seqlen: int, what: str) -> None:
    if n < 1 or seqlen < 2:
        raise FxpruneError(f"{what} need at least 1 window of 2 tokens, got {n} x {seqlen}")


def token_windows(tokenizer: Any, text: str, n: int, seqlen: int, *, offset_tokens: int = 0) -> torch.Tensor:
    """``n`` non-overlapping windows of ``seqlen`` tokens of ``text``, from token ``offset_tokens`` on.

    Returns a LongTensor of shape (n, seqlen); no special tokens are added. Too short a text
    raises :class:`FxpruneError` naming how many tokens there are and how many are needed.
    """
    _check(n, seqlen, "token windows")
    if offset_tokens < 0:
        raise FxpruneError(f"offset_tokens must be >= 0, got {offset_tokens}")
    needed = offset_tokens + n * seqlen
    ids, _ = _tokens(tokenizer, text, needed)
    if ids.numel() < needed:
        after = f" after the first {offset_tokens}" if offset_tokens else ""
        raise FxpruneError(f"calibration text has {ids.numel()} tokens; {n} x {seqlen} = {n * seqlen} "
                           f"needed{after}: {_FIX}")
    return ids[offset_tokens:needed].view(n, seqlen)


def split_calib_eval(tokenizer: Any, text: str, calib_n: int, seqlen: int,
                     eval_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint calibration and held-out evaluation windows of one text.

    Calibration takes ``calib_n`` windows from the start, evaluation the ``eval_windows`` windows
    that follow; both are (k, seqlen) LongTensors and share no token.
    """
    _check(calib_n, seqlen, "calibration windows")
    _check(eval_windows, seqlen, "evaluation windows")
    needed = (calib_n + eval_windows) * seqlen
    ids, _ = _tokens(tokenizer, text, needed)
    if ids.numel() < needed:
        raise FxpruneError(f"calibration text has {ids.numel()} tokens; ({calib_n} calibration + {eval_windows} "
                           f"evaluation) x {seqlen} = {needed} needed: {_FIX}")
    windows = ids.view(calib_n + eval_windows, seqlen)
    return windows[:calib_n], windows[calib_n:]


def stack_windows(batches: list[Any], rows: int) -> list[Any]:
    """Equal-length token-id batches stacked ``rows`` at a time: fewer, larger forwards.

    Any other batch form (dicts, (inputs, targets) pairs, mixed lengths) is returned as it is.
    """
    ids = concat_windows(batches)
    if ids is None:
        return batches
    return [ids[i : i + rows] for i in range(0, ids.shape[0], rows)]


def concat_windows(batches: Sequence[Any]) -> torch.Tensor | None:
    """Token-id batches of one width as a single tensor; None for any other batch form."""
    if batches and all(isinstance(b, torch.Tensor) for b in batches) and len({b.shape[1:] for b in batches}) == 1:
        return torch.cat(list(batches))
    return None


GENERATE_PROMPT = 16  # tokens of each calibration window the model continues from


def generate_windows(model: nn.Module, calib: torch.Tensor | list[torch.Tensor], n: int, *,
                     prompt_len: int = GENERATE_PROMPT, temperature: float = 1.0, seed: int = 0,
                     batch: int = 30, first: int = 0, option: str = "calib_generate") -> torch.Tensor:
    """``n`` windows the model writes itself, as long as ``calib``'s windows (an ``(n, seqlen)``
    tensor of token ids, or a list of equal-width ones).

    Window ``i`` takes its prompt from ``calib[i % len(calib)]``: the first ``prompt_len`` tokens in
    the first round over ``calib``, the next ``prompt_len`` in the second, and so on; the model
    continues it by sampling (``temperature``, no top-k/top-p cut) to the full length. They widen
    few calibration windows with more contexts of the same text (SmolLM2 at 20%, obs, compare.py:
    10 windows 1.546x dense; plus 30 written ones 1.411x / 1.443x (seeds 0 / 1), against 1.439x /
    1.484x with every prompt at the window's start, and 1.468x with prompts 48 tokens apart;
    prompts of 4 or 8 tokens were worse). The caller's RNG state and the model's train/eval mode
    are left as they were.
    """
    if not hasattr(model, "generate") or getattr(model, "config", None) is None:
        raise FxpruneError(f"{option} needs a Hugging Face causal LM with generate(); "
                           f"{type(model).__name__} has none")
    if isinstance(calib, (list, tuple)):
        calib = concat_windows(calib)
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2:
        raise FxpruneError(f"{option} continues token windows: calib must be an (n, seqlen) tensor of token "
                           "ids, or a list of equal-width ones")
    if n < 1:
        raise FxpruneError(f"{option} must be >= 1 windows, got {n}")
    if first < 0:
        raise FxpruneError(f"generate_windows: first must be >= 0, got {first}")
    seqlen = calib.shape[1]
    if not 0 < prompt_len < seqlen:
        raise FxpruneError(f"{option}: prompt of {prompt_len} tokens must be shorter than the windows ({seqlen})")
    # later rounds move the prompt along the window: new contexts rather than resamples of one
    index = torch.arange(first, first + n)
    rows, rounds = index % calib.shape[0], index // calib.shape[0]
    starts = (rounds * prompt_len) % (seqlen - prompt_len + 1)
    prompts = torch.stack([calib[r, s : s + prompt_len] for r, s in zip(rows.tolist(), starts.tolist())])
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
    pad = (pad[0] if isinstance(pad, (list, tuple)) else pad) or 0
    was_training = model.training
    model.eval()
    new = seqlen - prompt_len
    out = []
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed + first)
            for i in range(0, n, batch):
                p = prompts[i : i + batch]
                ids = model.generate(p, attention_mask=torch.ones_like(p), do_sample=True, temperature=temperature,
                                     top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                                     pad_token_id=pad, use_cache=True)
                out.append(ids[:, :seqlen])
    finally:
        model.train(was_training)
    windows = torch.cat(out)
    if windows.shape != (n, seqlen):
        raise FxpruneError(f"{option}: the model wrote {tuple(windows.shape)} tokens, {(n, seqlen)} expected")
    return windows


# windows written per generate() call for recovery: 120 take 0.42 s a window on 2 cores, 30 take 0.61
RECOVERY_WRITE_BATCH = 120


def recovery_rows(model: nn.Module, prompts: torch.Tensor | list[torch.Tensor], rows: list[torch.Tensor], n: int, *,
                  first: int = 0, seed: int = 0) -> list[torch.Tensor]:
    """Recovery's windows: ``rows`` plus ``n`` windows ``model`` writes on from ``prompts`` (numbered
    from ``first``: :func:`generate_windows`), shuffled with ``seed`` so each part is spread over the
    schedule. Few real windows are what makes long recoveries overfit; the dense model's own text
    gives recovery as much to learn from as the time allows (its cross-entropy distils that model),
    with no text beyond ``prompts``."""
    written = generate_windows(model, prompts, n, seed=seed, first=first, batch=RECOVERY_WRITE_BATCH,
                               option="recover_generate")
    rows = list(rows) + [written[i : i + 1] for i in range(n)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return [rows[i] for i in order.tolist()]


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):  # HF ModelOutput is a Mapping
        if out.get("logits") is None:
            raise FxpruneError(f"the model returns no logits ({', '.join(out.keys())}); "
                               f"perplexity needs a causal language model")
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise FxpruneError(f"the model returned {type(out).__name__}, not logits; perplexity needs a causal LM")


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Perplexity over independent windows, LLM-Pruner's protocol: exp(mean next-token NLL).

    Each row of ``windows`` (n, seqlen) is scored on its own, labels = inputs shifted by one, so
    ``tokens`` = n x (seqlen - 1). HF models are called as ``model(input_ids=..., use_cache=False)``,
    other modules (an FX GraphModule, say) as ``model(ids)`` and must return logits (B, L, V).
    ``progress(done, total)`` is called after each batch. Returns ``{"ppl", "nll", "tokens"}``.
    """
    from .capture import call_extras

    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise FxpruneError(f"perplexity needs windows of shape (n, seqlen >= 2), got {tuple(windows.shape)}")
    if batch_size < 1:
        raise FxpruneError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else windows.device
    hf = getattr(model, "config", None) is not None
    extras = call_extras(model) if hf else {}
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i : i + batch_size].to(device=device, dtype=torch.long)
            logits = _logits(model(input_ids=x, **extras) if hf else model(x))
            if logits.dim() != 3 or logits.shape[:2] != x.shape:
                raise FxpruneError(f"the model's logits have shape {tuple(logits.shape)}; perplexity needs "
                                   f"(batch, seqlen, vocab) = ({x.shape[0]}, {x.shape[1]}, V)")
            for row in range(x.shape[0]):  # one row at a time: float32 logits of a 128k vocab are large
                nll += F.cross_entropy(logits[row, :-1].float(), x[row, 1:], reduction="sum").item()
            count += x.shape[0] * (x.shape[1] - 1)
            if progress is not None:
                progress(i + x.shape[0], windows.shape[0])
    finally:
        model.train(was_training)
    mean = nll / count
    ppl = math.exp(mean) if mean < 700 else math.inf
    return {"ppl": ppl, "nll": mean, "tokens": int(count)}
