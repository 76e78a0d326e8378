"""Fast capture of layer stacks: export two layers, copy the second one's graph for the rest.

``torch.export`` spends most of its time tracing with symbolic shapes, op by op: SmolLM2's 30
layers take ~8.5 s, its first two layers with the embedding and head ~1.5 s. Decoder and encoder
stacks repeat one layer: this module exports a shallow view of the model that holds only
the first two layers of its stack (same parameter objects, a copied config with the smaller layer
count), then builds the full graph by copying layer 1's nodes once per further layer, each copy
reading its own layer's parameters and the previous copy's outputs, exactly as layer 1 reads layer
0's. The result is an ordinary ``ExportedProgram`` of the whole model.

It is only an accelerator, never a source of a different graph:

* a stack qualifies only when every layer has the same class, parameter and buffer names, shapes
  and dtypes, the config says how many layers run (``num_hidden_layers`` / ``n_layer`` /
  ``num_layers``) and per-layer config lists (``layer_types``) are uniform;
* layers 0 and 1 of the shallow export must be the same op sequence with the same literal
  arguments (else the layers differ in a way the structure check could not see), and layer 1 may
  read only its own parameters, layer 0's nodes and values computed before the stack;
* the stitched program must reproduce the model's eager output on the example inputs (on the
  meta device nothing runs: there the structural checks above are all there is).

Any failed check returns ``None`` and :func:`fxprune.capture.capture` runs the ordinary full export.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, InputSpec, OutputSpec, TensorArgument

from .rules import _clean_path

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
MIN_LAYERS = 4  # below this a full export is as fast


def find_stack(model: nn.Module) -> tuple[str, str] | None:
    """``(path of the layer ModuleList, config key of its length)`` for a uniform stack, or None."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(getattr(cfg, k, None), int)), None)
    if key is None:
        return None
    n = getattr(cfg, key)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(set(map(str, types))) > 1:
        return None  # e.g. sliding / full attention alternating: layers are not copies
    found = [(path, mod) for path, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == n and n >= MIN_LAYERS]
    if len(found) != 1:
        return None
    path, stack = found[0]
    sig = _layer_signature(stack[0])
    if any(_layer_signature(layer) != sig or type(layer) is not type(stack[0]) for layer in stack):
        return None
    return path, key


def _layer_signature(layer: nn.Module) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters(remove_duplicate=False))
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in layer.named_buffers(remove_duplicate=False))
    mods = tuple((n, type(m).__name__) for n, m in layer.named_modules())
    return params, buffers, mods


def shallow_model(model: nn.Module, stack_path: str, count_key: str, keep: int = 2) -> nn.Module:
    """A view of ``model`` whose stack holds its first ``keep`` layers (shared parameters).

    The modules on the path to the stack are shallow copies with their own child dicts, and every
    config on that path is one copied config with ``count_key = keep``; ``model`` is not touched.
    """
    configs: dict[int, Any] = {}

    def own_config(mod: nn.Module) -> None:
        cfg = getattr(mod, "config", None)
        if cfg is not None and not isinstance(cfg, nn.Module):
            if id(cfg) not in configs:
                configs[id(cfg)] = copy.copy(cfg)
                setattr(configs[id(cfg)], count_key, keep)
            mod.config = configs[id(cfg)]

    def clone(mod: nn.Module) -> nn.Module:
        out = copy.copy(mod)
        out._modules = dict(mod._modules)  # copy.copy shares the dict: never write into the user's
        own_config(out)
        return out

    root = clone(model)
    parts = stack_path.split(".")
    parent = root
    for name in parts[:-1]:
        child = clone(parent._modules[name])
        parent._modules[name] = child
        parent = child
    parent._modules[parts[-1]] = nn.ModuleList(list(parent._modules[parts[-1]])[:keep])
    return root


def _layer_of(node: fx.Node, prefix: str) -> int | None:
    """Index of the stack layer that produced ``node`` (``prefix`` = 'm.model.layers.'), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in stack.values():
        path = _clean_path(path)
        if path.startswith(prefix):
            head = path[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def _node_key(node: fx.Node) -> str:
    """A node's op, target and non-node arguments (sizes, scalars, dims): two layers whose nodes
    have equal keys, in order, compute the same thing from their inputs."""
    def leaves(x: Any) -> str:
        if isinstance(x, fx.Node):
            return "%"
        if isinstance(x, (list, tuple)):
            return "[" + ",".join(leaves(v) for v in x) + "]"
        if isinstance(x, dict):
            return "{" + ",".join(f"{k}:{leaves(v)}" for k, v in sorted(x.items())) + "}"
        return repr(x)
    return f"{node.op} {node.target} {leaves(node.args)} {leaves(node.kwargs)}"


def stitch(ep: torch.export.ExportedProgram, full_state: dict[str, torch.Tensor], prefix: str, n_layers: int
           ) -> torch.export.ExportedProgram | None:
    """The ``ExportedProgram`` of the whole stack from that of its first two layers, or None.

    ``prefix``: the stack's dotted path in the program plus '.' (``m.model.layers.``);
    ``full_state``: every parameter and buffer of the full model under its program name.
    """
    gm = ep.graph_module  # the shallow export is ours alone: edit it in place
    graph = gm.graph
    sig = ep.graph_signature
    nodes = list(graph.nodes)
    by_layer: dict[int, list[fx.Node]] = {0: [], 1: []}
    for node in nodes:
        if node.op == "call_function":
            i = _layer_of(node, prefix)
            if i is not None:
                if i not in by_layer:
                    return None
                by_layer[i].append(node)
    l0, l1 = by_layer[0], by_layer[1]
    if not l1 or [_node_key(n) for n in l0] != [_node_key(n) for n in l1]:
        return None
    in_l0, in_l1 = set(l0), set(l1)
    order = {n: i for i, n in enumerate(nodes)}
    kind_of = {s.arg.name: s for s in sig.input_specs if isinstance(s.arg, TensorArgument)}
    layer1 = prefix + "1."
    # layer 1's own inputs: its parameters/buffers (placeholders) -- copied per layer
    own = {n: str(kind_of[n.name].target) for n in nodes
           if n.op == "placeholder" and n.name in kind_of and str(kind_of[n.name].target).startswith(layer1)}
    for n in l1:  # anything else layer 1 reads must be layer 0's output or shared (masks, rope, sizes)
        for a in n.all_input_nodes:
            if a in in_l1 or a in own or a in in_l0:
                continue
            if a.op == "placeholder" or order[a] < order[l0[0]]:
                continue  # computed before the stack: the same for every layer
            return None  # computed between the layers: layer k would need its own copy

    if not own:
        return None
    specs = list(sig.input_specs)
    # new placeholders go after the last of layer 1's of the same kind (parameters, then buffers),
    # and their specs after its spec: placeholder order and spec order stay the same
    anchor: dict[InputKind, fx.Node] = {}
    spec_at: dict[InputKind, int] = {}
    for ph in own:  # ``own`` is in placeholder order
        kind = kind_of[ph.name].kind
        anchor[kind] = ph
        spec_at[kind] = specs.index(kind_of[ph.name])
    new_specs: dict[InputKind, list[InputSpec]] = {kind: [] for kind in anchor}
    prev = l1  # the previous layer's nodes, by position
    out_users = [(u, n) for n in l1 for u in list(n.users) if u not in in_l1]
    insert_at = l1[-1]
    for k in range(2, n_layers):
        env: dict[fx.Node, fx.Node] = {}
        for ph, tgt in own.items():
            spec = kind_of[ph.name]
            new_tgt = prefix + str(k) + tgt[len(layer1) - 1:]
            with graph.inserting_after(anchor[spec.kind]):
                new_ph = graph.placeholder(_mangle(new_tgt, ph.name[:2]))
            new_ph.meta = copy.copy(ph.meta)
            anchor[spec.kind] = new_ph
            env[ph] = new_ph
            new_specs[spec.kind].append(InputSpec(kind=spec.kind, arg=TensorArgument(name=new_ph.name),
                                                  target=new_tgt, persistent=spec.persistent))
        for j, n in enumerate(l0):
            env[n] = prev[j]
        copies = []
        for n in l1:
            with graph.inserting_after(insert_at):
                c = graph.node_copy(n, lambda a: env.get(a, a))
            c.meta = _renamed_meta(n.meta, prefix, 1, k)
            env[n] = c
            insert_at = c
            copies.append(c)
        prev = copies
    last = {n.name: prev[j] for j, n in enumerate(l1)}
    for user, n in out_users:  # what read layer 1's output now reads the last layer's
        user.replace_input_with(n, last[n.name])
    outputs = [OutputSpec(kind=o.kind, arg=TensorArgument(name=last[o.arg.name].name), target=o.target)
               if isinstance(o.arg, TensorArgument) and o.arg.name in last else o for o in sig.output_specs]
    for kind in sorted(spec_at, key=spec_at.get, reverse=True):  # later position first: indices hold
        specs[spec_at[kind] + 1:spec_at[kind] + 1] = new_specs[kind]
    graph.lint()
    gm.recompile()
    new_sig = torch.export.ExportGraphSignature(input_specs=specs, output_specs=outputs)
    state, constants = {}, dict(ep.constants)
    for s in specs:
        if s.kind not in (InputKind.PARAMETER, InputKind.BUFFER):
            continue
        if s.target not in full_state:
            return None
        if s.kind is InputKind.BUFFER and s.persistent is False:  # exported programs keep these as constants
            constants[s.target] = full_state[s.target]
        else:
            state[s.target] = full_state[s.target]
    return torch.export.ExportedProgram(
        root=gm, graph=graph, graph_signature=new_sig, state_dict=state,
        range_constraints=dict(ep.range_constraints), module_call_graph=list(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=constants, verifiers=[ep.verifier],
    )


def run_lifted(ep: torch.export.ExportedProgram, user_inputs: tuple) -> list[torch.Tensor]:
    """Run ``ep``'s graph as it is (parameters passed as inputs): no unlifting, so it is cheap."""
    flat = []
    users = iter(user_inputs)
    for s in ep.graph_signature.input_specs:
        if s.kind is InputKind.USER_INPUT:
            flat.append(next(users))
        elif s.target in ep.state_dict:
            flat.append(ep.state_dict[s.target])
        else:
            flat.append(ep.constants[s.target])
    out = ep.graph_module(*flat)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _mangle(target: str, kind: str) -> str:
    return kind + target.replace(".", "_")


def _renamed_meta(meta: dict[str, Any], prefix: str, old: int, new: int) -> dict[str, Any]:
    out = copy.copy(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        a, b = f"{prefix}{old}", f"{prefix}{new}"
        renamed = {}
        for key, (path, cls) in stack.items():
            clean = _clean_path(path)
            if clean == a or clean.startswith(a + "."):
                path = b + clean[len(a):]
                key = f"{key}@{new}"
            renamed[key] = (path, cls)
        out["nn_module_stack"] = renamed
    return out


def stitched_export(model: nn.Module, wrap_name: str, export: Callable[[nn.Module], torch.export.ExportedProgram],
                    check: Callable[[torch.export.ExportedProgram], bool]) -> torch.export.ExportedProgram | None:
    """Export ``model`` by stitching when its layer stack qualifies and every check passes, else None.

    ``export(module)`` exports a model (the shallow view) exactly as the full capture would;
    ``check(ep)`` compares a program's output with the full model's eager output.
    """
    found = find_stack(model)
    if found is None:
        return None
    path, key = found
    n = len(model.get_submodule(path))
    shallow = shallow_model(model, path, key)
    ep = export(shallow)
    state = {f"{wrap_name}.{k}": v for k, v in model.named_parameters(remove_duplicate=False)}
    state.update({f"{wrap_name}.{k}": v for k, v in model.named_buffers(remove_duplicate=False)})
    try:
        out = stitch(ep, state, f"{wrap_name}.{path}.", n)
    except Exception:  # noqa: BLE001 -- torch's program checks raise many types; any of them means: export whole
        return None
    if out is None or not check(out):
        return None
    return out
