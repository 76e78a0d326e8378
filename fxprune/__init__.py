"""fxprune: a structured-pruning compiler for PyTorch and Hugging Face models.

Public API::

    model, tok = fxprune.load_model("smollm2-135m")
    dg = fxprune.dependency_graph(fxprune.capture(model, inputs))
    result = fxprune.prune(model, inputs, ratio=0.2, importance="l2")
    fxprune.export_onnx(result, "model.onnx")
    fxprune.save(result, "out/"); model, tok = fxprune.load("out/")
"""

from __future__ import annotations

from typing import Any

from .api import PruneResult, inspect_model, prune
from .capture import Program, capture
from .depgraph import DependencyGraph, Group, Member, dependency_graph
from .errors import FxpruneError
from .plan import Plan

__version__ = "0.1.0"


def load_model(spec: str, **kwargs: Any):
    """Load a model and its tokenizer: an HF dir, a .gguf file, a saved fxprune dir, or a builtin
    name (``smollm2-135m``, ``minilm-l6``). See :mod:`fxprune.models`."""
    from .models import load_model as _load

    return _load(spec, **kwargs)


def export_onnx(obj: Any, path: str, *args: Any, **kwargs: Any) -> dict:
    """Export a PruneResult / module / Program to ONNX and verify it in onnxruntime."""
    from .exporters.onnx import export_onnx as _export

    return _export(obj, path, *args, **kwargs)


def save(result: PruneResult, directory: str, **kwargs: Any) -> None:
    """Write model.safetensors, fxprune.json (config, shapes, plan) and the tokenizer."""
    from .checkpoint import save as _save

    _save(result, directory, **kwargs)


def load(directory: str):
    """Rebuild a model saved by :func:`save`; returns ``(model, tokenizer)``."""
    from .checkpoint import load as _load

    return _load(directory)


__all__ = ["DependencyGraph", "FxpruneError", "Group", "Member", "Plan", "Program", "PruneResult",
           "capture", "dependency_graph", "export_onnx", "inspect_model", "load", "load_model",
           "prune", "save"]
