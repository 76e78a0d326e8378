"""Capture: ``nn.Module`` + example inputs -> :class:`Program` (an ATen-level FX graph).

Uses ``torch.export.export(strict=False)`` with dynamic batch and sequence dims. HF models are taken
as loaded: ``use_cache=False`` is passed as an argument (the config is not touched) and the main
tensor of a ``ModelOutput`` (``logits`` or ``last_hidden_state``) becomes the graph output.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx.config
from torch import fx, nn

from .errors import CaptureError, first_line
from .rules import module_path
from .stitch import run_lifted, stitched_export

WRAP = "m"  # attribute name of the user's model inside the capture wrapper
OUTPUT_KEYS = ("logits", "last_hidden_state", "pooler_output")


@dataclass
class Program:
    """A captured model: the exported program plus the maps the later passes need."""

    exported: torch.export.ExportedProgram
    model: nn.Module
    example_args: tuple
    example_kwargs: dict[str, Any]
    input_names: list[str]
    output_names: list[str]
    params: dict[str, str] = field(default_factory=dict)  # placeholder -> parameter name
    buffers: dict[str, str] = field(default_factory=dict)  # placeholder -> buffer name
    aliases: dict[str, list[str]] = field(default_factory=dict)  # name -> all names of that tensor
    stitched: bool = False  # built by fxprune.stitch (two layers exported, the rest copied)

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.exported.graph_module

    @property
    def graph(self) -> fx.Graph:
        return self.exported.graph_module.graph

    def module_of(self, node: fx.Node) -> str:
        """Dotted path (in the user's model) of the module that produced ``node``."""
        return module_path(node, WRAP + ".")


class _CaptureWrapper(nn.Module):
    """Calls the user's model with ``use_cache=False`` (when it takes it) and returns plain tensors."""

    def __init__(self, model: nn.Module, extra: dict[str, Any], n_args: int, kw_names: list[str]) -> None:
        super().__init__()
        setattr(self, WRAP, model)
        self.extra = extra
        self.n_args = n_args
        self.kw_names = kw_names
        self.output_names: list[str] = []

    def forward(self, *inputs: Any) -> Any:
        # keyword inputs arrive positionally: torch.export's dynamic shapes are simplest that way
        args, kwargs = inputs[: self.n_args], dict(zip(self.kw_names, inputs[self.n_args :]))
        out = getattr(self, WRAP)(*args, **kwargs, **self.extra)
        tensors, names = main_outputs(out)
        self.output_names = names
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


def main_outputs(out: Any) -> tuple[list[torch.Tensor], list[str]]:
    """The tensors a user ships from a forward's return value, with names."""
    if isinstance(out, torch.Tensor):
        return [out], ["output"]
    if isinstance(out, Mapping):
        for key in OUTPUT_KEYS:
            if out.get(key) is not None:
                return [out[key]], [key]
        for key, val in out.items():
            if isinstance(val, torch.Tensor):
                return [val], [key]
    if isinstance(out, (tuple, list)):
        tensors = [t for t in out if isinstance(t, torch.Tensor)]
        if tensors:
            names = ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
            return tensors, names
    raise CaptureError(f"the model returned {type(out).__name__}, which holds no tensor to capture")


def call_extras(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments fxprune adds to every call: ``use_cache=False`` where accepted."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "use_cache" in params or (takes_kwargs and hasattr(model, "config")):
        return {"use_cache": False}
    return {}


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """Accept a tensor, a tuple of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example inputs must be a tensor, a tuple of tensors or a dict of tensors, "
        f"not {type(example_inputs).__name__}"
    )


def _dynamic_spec(t: Any) -> Any:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    spec = {0: torch.export.Dim.AUTO}
    if t.dim() >= 2 and not t.is_floating_point():  # token-like: (batch, sequence)
        spec[1] = torch.export.Dim.AUTO
    elif t.dim() == 3 and t.is_floating_point():  # (batch, sequence, features)
        spec[1] = torch.export.Dim.AUTO
    return spec


@contextlib.contextmanager
def no_node_tracebacks() -> Iterator[None]:
    """While active, torch.fx records no Python traceback per created node (``stack_trace``).

    Capture and the ONNX exporter's re-trace would otherwise extract one for every node: a sixth
    of capture time, a third of ``torch.onnx.export``'s. The user's setting comes back afterwards.
    """
    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


def capture(model: nn.Module, example_inputs: Any, *, stitch: bool = True) -> Program:
    """Export ``model`` on ``example_inputs`` into a :class:`Program` without changing the model.

    ``example_inputs`` is a tensor, a tuple (positional) or a dict (keyword inputs). The batch
    dim (and the sequence dim of token inputs) stays dynamic; use a batch of at least 2.
    ``stitch``: export a uniform layer stack as two layers and copy the second one's graph for
    the rest (:mod:`fxprune.stitch`; checked, and a full export when any check fails).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
    if first is None:
        raise CaptureError("example inputs hold no tensor")
    if first.dim() > 0 and first.shape[0] < 2:
        raise CaptureError(
            f"example batch size is {first.shape[0]}; use at least 2 so the batch dim stays dynamic"
        )
    wrapper = _CaptureWrapper(model, call_extras(model), len(args), list(kwargs))
    flat = tuple(args) + tuple(kwargs.values())
    program = None
    try:
        with in_eval_mode(model), torch.no_grad(), no_node_tracebacks():
            if stitch:
                program = stitched_program(model, example_inputs, lambda ep: ep)
                if program is not None and not _same_output(program.exported, model, args, kwargs, flat):
                    program = None
            if program is None:
                ep = _export(wrapper, flat, tuple(_dynamic_spec(t) for t in flat))
    except CaptureError:
        raise
    except Exception as exc:  # torch.export raises many types; give the user one clear line
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {first_line(exc)}") from exc
    if program is None:
        program = _program(ep, model, args, kwargs, _input_names(model, args, kwargs),
                           wrapper.output_names or ["output"])
    return program


class _Positional(nn.Module):
    """Calls a GraphModule with flat positional inputs, as fxprune's graph modules expect.

    ``train``/``eval`` do not reach the graph: a module unlifted from torch.export refuses them
    (and has no train/eval behaviour to switch).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def train(self, mode: bool = True) -> "_Positional":
        self.training = mode
        return self

    def forward(self, *inputs: Any) -> Any:
        return self.gm(*inputs)


def capture_as_called(model: nn.Module, example_inputs: Any) -> Program:
    """:func:`capture`, where an ``fx.GraphModule`` (a pruned graph module returned as the model)
    is fed the inputs positionally, as it is called (its placeholders are not the HF names)."""
    if isinstance(model, fx.GraphModule):
        args, kwargs = normalize_inputs(example_inputs)
        placeholders = [n.name for n in model.graph.nodes if n.op == "placeholder"]
        program = capture(_Positional(model), tuple(args) + tuple(kwargs.values()))
        names = [placeholders[i] if i < len(placeholders) else f"input_{i}" for i in range(len(args))]
        program.input_names = names + list(kwargs)
        return program
    return capture(model, example_inputs)


def stitched_program(model: nn.Module, example_inputs: Any,
                     prepare: Callable[[torch.export.ExportedProgram], torch.export.ExportedProgram]
                     ) -> Program | None:
    """A stitched :class:`Program` of ``model`` whose two-layer export went through ``prepare`` first.

    ``prepare`` transforms the shallow program before its layer 1 is copied for the rest of the
    stack (the ONNX exporter passes torch.onnx's decompositions, which then trace two layers, not
    all). Nothing here compares the result with eager: the caller checks it (:func:`matches_eager`),
    usually after rewriting it further. None when ``model`` has no stack that stitches.
    """
    args, kwargs = normalize_inputs(example_inputs)
    flat = tuple(args) + tuple(kwargs.values())
    dynamic = tuple(_dynamic_spec(t) for t in flat)
    wrappers: list[_CaptureWrapper] = []

    def export_prepared(shallow: nn.Module) -> torch.export.ExportedProgram:
        wrappers.append(_CaptureWrapper(shallow, call_extras(model), len(args), list(kwargs)))
        return prepare(_export(wrappers[-1], flat, dynamic))

    with in_eval_mode(model), torch.no_grad(), no_node_tracebacks():
        ep = stitched_export(model, WRAP, export_prepared, lambda _: True)
    if ep is None:
        return None
    program = _program(ep, model, args, kwargs, _input_names(model, args, kwargs),
                       wrappers[-1].output_names or ["output"])
    program.stitched = True
    return program


def matches_eager(ep: torch.export.ExportedProgram, model: nn.Module, example_inputs: Any) -> bool:
    """Whether ``ep`` computes what the eager ``model`` does on ``example_inputs`` (True on meta)."""
    args, kwargs = normalize_inputs(example_inputs)
    with in_eval_mode(model), torch.no_grad():
        return _same_output(ep, model, args, kwargs, tuple(args) + tuple(kwargs.values()))


@contextlib.contextmanager
def in_eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the duration; every module's own mode comes back afterwards."""
    was_training = [(m, m.training) for m in model.modules()]
    eval_if_supported(model)
    try:
        yield
    finally:
        for m, mode in was_training:
            m.training = mode


def eval_if_supported(model: nn.Module) -> nn.Module:
    """``model.eval()``; a module unlifted from torch.export (a pruned graph module, a saved plain
    module reloaded) refuses train/eval, having no such behaviour to switch, and is left as it is."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def _export(wrapper: nn.Module, flat: tuple, dynamic: tuple) -> torch.export.ExportedProgram:
    return torch.export.export(wrapper, flat, strict=False, dynamic_shapes=(dynamic,))  # one entry: *inputs


def _same_output(ep: torch.export.ExportedProgram, model: nn.Module, args: tuple, kwargs: dict[str, Any],
                 flat: tuple) -> bool:
    """Whether a stitched program computes what the eager model does on the example inputs."""
    if any(p.is_meta for p in model.parameters()):
        return True  # nothing runs on the meta device: the stitch's structural checks are all there is
    want = main_outputs(model(*args, **kwargs, **call_extras(model)))[0]
    got = run_lifted(ep, flat)
    return len(got) == len(want) and all(
        g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, float(w.abs().max())))
        for g, w in zip(got, want))


def _input_names(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [params[i].name if i < len(params) else f"input_{i}" for i in range(len(args))]
    return names + list(kwargs)


def _program(ep, model, args, kwargs, input_names, output_names) -> Program:
    sig = ep.graph_signature
    strip = WRAP + "."

    def rel(name: str) -> str:
        return name[len(strip):] if name.startswith(strip) else name

    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    aliases = {n: names for names in by_id.values() for n in names}
    # tied parameters may reach the graph under either name: use the first (canonical) one
    params = {ph: aliases.get(rel(p), [rel(p)])[0] for ph, p in sig.inputs_to_parameters.items()}
    buffers = {ph: rel(b) for ph, b in sig.inputs_to_buffers.items()}
    return Program(ep, model, args, kwargs, input_names, output_names, params, buffers, aliases)
