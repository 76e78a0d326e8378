"""Shared pieces of the side-by-side benchmarks (compare, pipeline, latency).

Output protocol: one JSON object per line on stdout (``{"bench": ..., ...}``), progress on stderr.
A benchmark that cannot run (no data file, no peer package) prints one ``{"bench", "skipped"}``
line and exits 0. Methods that need their own peak RSS run in a child process of the same script
(``--only METHOD``), whose JSON lines the parent collects.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared/data/wikitext2_valid.txt"
MODEL = "smollm2-135m"
TP_VERSION = "1.6.1"
# windows left out between the calibration slice and the evaluation slice (as bench/quality.py)
GAP_WINDOWS = 20


def emit(record: dict[str, Any]) -> None:
    """One JSON result line on stdout."""
    print(json.dumps(record), flush=True)


def log(msg: str) -> None:
    """A progress line on stderr, with the elapsed process time."""
    print(f"[{time.process_time():7.1f}s cpu] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def missing_prerequisite(need_data: bool = True, need_tp: bool = False) -> str | None:
    """Why the benchmark cannot run here, or None when it can."""
    if need_data and not DATA.exists():
        return f"{DATA} not found"
    if need_tp:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            version = dist_version("torch-pruning")  # torch_pruning.__version__ of 1.6.1 says 1.6.0
        except PackageNotFoundError:
            return "torch-pruning not installed: .venv/bin/pip install -e '.[test,bench]'"
        if version != TP_VERSION:
            return f"torch-pruning {version} installed, the comparison pins {TP_VERSION}"
    return None


def calib_eval_windows(tok: Any, calib_n: int, seqlen: int, eval_n: int) -> tuple[Any, Any]:
    """(calibration, evaluation) token windows of the data file: the first ``calib_n`` windows, and
    ``eval_n`` windows after a gap of :data:`GAP_WINDOWS`, so the two never share a token."""
    from fxprune.data import token_windows

    allw = token_windows(tok, DATA.read_text(encoding="utf-8"), calib_n + GAP_WINDOWS + eval_n, seqlen)
    return allw[:calib_n], allw[calib_n + GAP_WINDOWS:]


def recovery_windows(tok: Any, n: int, seqlen: int, source: str, after_windows: int) -> Any:
    """``n`` recovery windows: ``wikitext``, from the data file after its first ``after_windows``
    windows (past the calibration and evaluation slices, so disjoint from both, but the evaluation's
    own domain), or ``pydoc``, CPython's pydoc topics (English about Python: no wikitext seen)."""
    from fxprune.data import calibration_text, token_windows

    if source == "pydoc":
        return token_windows(tok, calibration_text(None), n, seqlen)
    if source != "wikitext":
        raise SystemExit(f"recovery text must be wikitext or pydoc, got {source!r}")
    return token_windows(tok, DATA.read_text(encoding="utf-8"), n, seqlen, offset_tokens=after_windows * seqlen)


def run_child(script: str, args: list[str], timeout: float | None = None) -> list[dict[str, Any]]:
    """Run ``python script *args`` and return its JSON stdout lines; stderr streams through.

    A child that fails or prints nothing yields one ``{"error": ...}`` record instead, so one
    broken method never hides the others' results.
    """
    try:
        out = subprocess.run([sys.executable, script, *args], stdout=subprocess.PIPE, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {timeout} s"}]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not records:
        return [{"error": f"child exited with {out.returncode}", **(records[-1] if records else {})}]
    return records


# -- Torch-Pruning on a Llama's MLP channels ---------------------------------------------------------


def import_tp() -> Any:
    """torch_pruning, with the dim guard raised: on torch 2.13 its default (100) makes the graph
    build mistake real cat/split dims for uninitialised ones and hang."""
    import torch_pruning as tp

    tp.dependency.constants.MAX_VALID_DIM = 2**65
    return tp


def mlp_modules(model: Any, layers: range) -> list[tuple[Any, Any, Any]]:
    """(gate_proj, up_proj, down_proj) of each decoder layer in ``layers``."""
    blocks = model.model.layers
    return [(blocks[i].mlp.gate_proj, blocks[i].mlp.up_proj, blocks[i].mlp.down_proj) for i in layers]


def tp_ratio_for(model: Any, layers: range, remove_params: int) -> tuple[float, int]:
    """Torch-Pruning's per-layer ``pruning_ratio`` that removes about ``remove_params`` parameters
    from the MLP channels of ``layers``, and the channels it removes per layer.

    Each intermediate channel holds one row of gate/up (plus biases) and one column of down.
    Torch-Pruning removes ``C - int(C * (1 - r))`` channels of a C-channel group (local ranking);
    r = (k - 0.5) / C makes that exactly k.
    """
    gate, up, down = mlp_modules(model, layers)[0]
    per_channel = gate.in_features + up.in_features + down.out_features
    per_channel += sum(1 for m in (gate, up) if m.bias is not None)
    channels = gate.out_features
    k = round(remove_params / (per_channel * len(layers)))
    k = max(1, min(channels - 1, k))
    return (k - 0.5) / channels, k


def tp_pruner(tp: Any, model: Any, layers: range, importance: Any, ratio: float, example: Any) -> Any:
    """A MetaPruner over the MLP channels of ``layers`` only: every other Linear/Embedding is
    ignored, so attention (its GQA head pruning crashes on SmolLM2), the residual stream and the
    tied embedding stay whole; one local ranking per layer, like fxprune's ``mode="local"``."""
    import torch

    keep = {m for gate, up, _ in mlp_modules(model, layers) for m in (gate, up)}
    ignored = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m not in keep]
    # HF's RMSNorm is no module Torch-Pruning knows: name its weight's channel dim (as it would guess)
    norms = [(m.weight, 0) for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    return tp.pruner.MetaPruner(
        model, example_inputs=example, importance=importance, pruning_ratio=ratio,
        ignored_layers=ignored, global_pruning=False, unwrapped_parameters=norms,
        forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
    )


def taylor_gradients(model: Any, calib: Any, layers: range) -> None:
    """Gradients of the mean calibration loss on the MLP weights of ``layers`` (Torch-Pruning's
    Taylor importance reads ``weight.grad``): one backward per window, as fxprune's Taylor pass.
    Other parameters get no gradient, which only saves time."""
    wanted = {id(p) for mods in mlp_modules(model, layers) for m in mods for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    model.eval()  # no dropout: deterministic scores
    for row in calib:
        ids = row.unsqueeze(0)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss / calib.shape[0]
        loss.backward()

