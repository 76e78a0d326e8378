"""ONNX translation that decomposes two layers, not the whole stack.

``torch.onnx.export`` first decomposes the ExportedProgram for its op registry
(``run_decompositions``), which re-traces every node with fake tensors and symbolic shapes: 13 of
the 28 s SmolLM2-135M took to export, and exporting a ``PruneResult`` added a fresh 30-layer capture
of the pruned model (5 s; its layers differ in width, so that capture cannot stitch).

Here the unpruned model's shallow two-layer view is exported once and prepared by torch's own
preparation (the same decompositions, explicit type promotion, assertion nodes removed), then
stitched into the full stack (:mod:`fxprune.stitch`). A prune plan is applied to that program the
way the rewrite pass applies it to the captured one (:func:`~fxprune.passes.rewrite.rewrite_exported`:
dependency graph of the prepared graph, shape literals, node shapes), with the pruned model's own
tensors as its state. The program must reproduce the pruned model's eager output on the example
inputs; torch's translation to ONNX then runs on it. The unpruned model may be on the meta device
(a reloaded model's origin, :func:`fxprune.checkpoint.origin`): the graph's tensor factories are
then pointed at the pruned model's device.

The preparation and translation steps are ``torch.onnx`` internals (``_core``), measured on torch
2.13 (pyproject allows up to 2.14).
Anything unexpected, whether a missing internal, a model that does not stitch, a plan the prepared
graph cannot take or an output that differs, returns None, and :func:`~fxprune.exporters.onnx.export_onnx`
runs the ordinary ``torch.onnx.export`` instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..capture import Program, matches_eager, normalize_inputs, stitched_program
from ..depgraph import dependency_graph
from ..plan import Plan

log = logging.getLogger(__name__)


def stitched_onnx(source: nn.Module, pruned: nn.Module, plan: Plan | None, example_inputs: Any, opset: int,
                  optimize: bool) -> tuple[Any, Program] | None:
    """``(ONNXProgram, Program of pruned)`` the fast way, or None where it does not apply.

    ``source``: the unpruned model (its uniform stack is what stitches); ``pruned``: the model the
    file must compute (``source`` itself for a plain export), the result of ``plan`` on ``source``.
    The returned Program (the prepared, pruned graph with ``pruned`` as its model) is what the
    caller names the file's inputs from and verifies against.
    """
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis
        from torch.onnx._internal.exporter import _constants, _core, _registration

        registry = _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, _constants.TORCHLIB_OPSET))
        program = stitched_program(
            source, _like_model(source, example_inputs),
            lambda ep: _core._prepare_exported_program_for_export(ep, registry=registry))
        if program is None:
            log.debug("stitched ONNX export: %s does not stitch", type(source).__name__)
            return None
        if any(p.is_meta for p in source.parameters()):
            _factories_on(program.graph_module, next(pruned.parameters()).device)
        if plan is not None:
            from ..passes.rewrite import rewrite_exported

            program.exported = rewrite_exported(program, dependency_graph(program), plan, pruned)
        elif pruned is not source:
            return None
        program.model = pruned
        program.example_args, program.example_kwargs = normalize_inputs(example_inputs)
        if not matches_eager(program.exported, pruned, example_inputs):
            log.debug("stitched ONNX export: the prepared program differs from eager")
            return None
        onnx_program = _core._exported_program_to_onnx_program(program.exported, registry=registry)
        onnx_program.model = onnxscript_apis.convert_version(onnx_program.model, opset)
        if optimize:
            onnx_program.optimize()
        return onnx_program, program
    except Exception as exc:  # noqa: BLE001 -- any failure here means: export the ordinary way
        log.debug("stitched ONNX export failed (%s: %s); exporting the whole program", type(exc).__name__, exc)
        return None


def _like_model(model: nn.Module, example_inputs: Any) -> Any:
    """The example inputs on the meta device when ``model`` is there (an unpruned origin rebuilt
    without weights), else as they are."""
    if not any(p.is_meta for p in model.parameters()):
        return example_inputs
    args, kwargs = normalize_inputs(example_inputs)

    def meta(t: Any) -> Any:
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    return {k: meta(v) for k, v in kwargs.items()} if kwargs else tuple(meta(a) for a in args)


def _factories_on(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """Point the tensor factories of a graph traced on the meta device (``arange``, ``ones``...
    with ``device=meta``) at ``device``, where the pruned model's tensors are."""
    meta = torch.device("meta")
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.kwargs.get("device") == meta:
            node.kwargs = {**node.kwargs, "device": device}
    gm.recompile()
