"""ONNX export: names, dynamic axes, onnxruntime parity, atomic writes, external data."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import fx, nn

import fxprune
from fxprune.errors import FxpruneError, VerificationError
from fxprune.exporters import onnx as onnx_exp
from fxprune.exporters.onnx import export_onnx

VOCAB = 64


def tiny(name: str) -> nn.Module:
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)).eval()
    if name == "bert":
        return BertModel(BertConfig(**common, num_attention_heads=4, max_position_embeddings=64)).eval()
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()
    if name == "mlp":
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8)).eval()
    raise KeyError(name)


def example(name: str, batch: int = 2, seq: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(batch, 16, generator=g)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    if name == "gpt2":
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, -2:] = 0  # some right padding
    return {"input_ids": ids, "attention_mask": mask}


EXPECTED = {
    "llama": (["input_ids", "attention_mask"], ["logits"]),
    "bert": (["input_ids", "attention_mask"], ["last_hidden_state"]),
    "gpt2": (["input_ids"], ["logits"]),
    "mlp": (["input"], ["output"]),
}


def torch_out(model: nn.Module, x) -> np.ndarray:
    with torch.no_grad():
        if isinstance(x, dict):
            out = model(**x, **({"use_cache": False} if hasattr(model, "config") else {}))
        else:
            out = model(x)
    if not isinstance(out, torch.Tensor):
        out = out["logits"] if "logits" in out else out["last_hidden_state"]
    return out.numpy()


def ort_out(path: Path, x) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {"input": x.numpy()}
    return sess.run(None, feed)[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each tiny model once; tests share the files and reports."""
    root = tmp_path_factory.mktemp("onnx")
    done = {}
    for name in EXPECTED:
        model = tiny(name)
        path = root / f"{name}.onnx"
        report = export_onnx(model, path, example(name))
        done[name] = (model, path, report)
    return done


@pytest.mark.parametrize("name", list(EXPECTED))
def test_export_names_and_parity(exported, name):
    model, path, report = exported[name]
    ins, outs = EXPECTED[name]
    assert path.is_file() and report["path"] == str(path)
    assert report["opset"] == 20 and report["external_data"] is False
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] <= 1e-4
    verified = report["verified_on"][ins[0]]
    assert verified[0] == 3 and (name == "mlp" or verified[1] == 23)  # not the capture shape
    assert [i["name"] for i in report["inputs"]] == ins
    assert [o["name"] for o in report["outputs"]] == outs
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ins
    assert [o.name for o in proto.graph.output] == outs
    assert not (path.parent / f"{path.name}.data").exists()  # small model: one file


@pytest.mark.parametrize("name", list(EXPECTED))
def test_dynamic_axes(exported, name):
    model, path, report = exported[name]
    shape = report["inputs"][0]["shape"]
    assert shape[0] == "batch"
    if name != "mlp":
        assert shape[1] == "sequence"
    for batch, seq, seed in [(3, 23, 1), (1, 5, 2), (5, 40, 3)]:
        x = example(name, batch, seq, seed)
        got, want = ort_out(path, x), torch_out(model, x)
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= 1e-4, (name, batch, seq)


def test_program_input_and_renaming(tmp_path):
    model = tiny("gpt2")
    program = fxprune.capture(model, example("gpt2"))
    path = tmp_path / "sub" / "g.onnx"
    rep = export_onnx(program, path, input_names=["ids"], output_names=["scores"])
    assert [i["name"] for i in rep["inputs"]] == ["ids"]
    assert [o["name"] for o in rep["outputs"]] == ["scores"]
    x = torch.randint(0, VOCAB, (2, 9))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["scores"], {"ids": x.numpy()})[0]
    np.testing.assert_allclose(got, torch_out(model, {"input_ids": x}), atol=1e-4)
    program.exported.module()(x)  # the caller's program still runs after export
    with pytest.raises(FxpruneError):
        export_onnx(program, tmp_path / "bad.onnx", input_names=["a", "b"])


def test_prune_result_exports_the_pruned_model(tmp_path):
    model = tiny("llama")
    x = example("llama")
    result = fxprune.prune(model, x, ratio=0.3, targets=("heads", "mlp"))
    assert result.program.model is model  # the original capture: must not be what gets exported
    path = tmp_path / "pruned.onnx"
    rep = export_onnx(result, path)
    assert rep["max_abs_diff"] <= 1e-4
    fresh = example("llama", 3, 11, seed=5)
    np.testing.assert_allclose(ort_out(path, fresh), torch_out(result.model, fresh), atol=1e-4)
    n_pruned = sum(p.numel() for p in result.model.parameters())
    n_dense = sum(p.numel() for p in model.parameters())
    assert n_pruned < n_dense
    init = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    assert init < n_dense
    # when the pruned eager module cannot run, a PruneResult carries the pruned graph module
    as_graph = types.SimpleNamespace(model=result.graph_module, example_inputs=x, program=result.program)
    rep = export_onnx(as_graph, tmp_path / "graph.onnx")
    assert [i["name"] for i in rep["inputs"]] == ["input_ids", "attention_mask"]
    assert [o["name"] for o in rep["outputs"]] == ["logits"]
    np.testing.assert_allclose(ort_out(tmp_path / "graph.onnx", fresh), torch_out(result.model, fresh), atol=1e-4)


def test_graph_module_and_duck_typed_result(tmp_path):
    mlp = tiny("mlp")
    gm = fx.symbolic_trace(mlp)
    rep = export_onnx(gm, tmp_path / "gm.onnx", example("mlp"))
    assert rep["max_abs_diff"] <= 1e-4
    # a PruneResult-like object without a program: its model is captured with its inputs
    obj = types.SimpleNamespace(model=tiny("bert"), example_inputs=example("bert"))
    rep = export_onnx(obj, tmp_path / "ns.onnx")
    assert [i["name"] for i in rep["inputs"]] == ["input_ids", "attention_mask"]
    with pytest.raises(FxpruneError):
        export_onnx(mlp, tmp_path / "x.onnx")  # a module needs example inputs
    with pytest.raises(FxpruneError):
        export_onnx(object(), tmp_path / "y.onnx")


def test_wrong_reference_raises_and_leaves_nothing(tmp_path, monkeypatch):
    real = onnx_exp.reference_outputs

    def perturbed(program, flat):
        return [t + 1e-2 for t in real(program, flat)]

    monkeypatch.setattr(onnx_exp, "reference_outputs", perturbed)
    path = tmp_path / "model.onnx"
    with pytest.raises(VerificationError, match=r"ONNX output 'logits' differs from float32 torch by"):
        export_onnx(tiny("gpt2"), path, example("gpt2"))
    assert list(tmp_path.iterdir()) == []  # no model, no data file, no temp dir

    # an existing file at the destination survives a failed export untouched
    path.write_bytes(b"old")
    with pytest.raises(VerificationError, match=r"ONNX output 'output' differs"):
        export_onnx(tiny("mlp"), path, example("mlp"))
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_float64_referee_passes_an_export_when_float32_torch_is_the_inaccurate_side(tmp_path, monkeypatch):
    real = onnx_exp.reference_outputs

    def noisy_float32(program, flat):  # float32 torch off by 1e-2; the float64 copy exact
        wide = next(program.model.parameters()).dtype == torch.float64
        return [t if wide else t + 1e-2 for t in real(program, flat)]

    monkeypatch.setattr(onnx_exp, "reference_outputs", noisy_float32)
    rep = export_onnx(tiny("gpt2"), tmp_path / "g.onnx", example("gpt2"))
    assert rep["max_abs_diff"] == pytest.approx(1e-2, rel=0.05)  # still the honest float32 difference
    assert len(rep["notes"]) == 1 and "as close to float64 torch" in rep["notes"][0]
    # but where onnxruntime is further from float64 than float32 torch is, the export fails
    monkeypatch.setattr(onnx_exp, "reference_outputs",
                        lambda program, flat: [t + (1e-3 if next(program.model.parameters()).dtype == torch.float32
                                                    else 5e-2) for t in real(program, flat)])
    monkeypatch.setattr(onnx_exp, "FLOAT64_REFEREE_BYTES", int(1e9))
    with pytest.raises(VerificationError, match=r"against float64 torch: onnxruntime .*, float32 torch"):
        export_onnx(tiny("gpt2"), tmp_path / "h.onnx", example("gpt2"), atol=1e-5)
    assert not (tmp_path / "h.onnx").exists()
    # no referee for a model too large to copy in float64: the plain check decides
    monkeypatch.setattr(onnx_exp, "reference_outputs", noisy_float32)
    monkeypatch.setattr(onnx_exp, "FLOAT64_REFEREE_BYTES", 0)
    with pytest.raises(VerificationError, match=r"differs from float32 torch by [0-9.e-]+ \(> 0.0001 x output scale [0-9.e-]+\)$"):
        export_onnx(tiny("gpt2"), tmp_path / "i.onnx", example("gpt2"))


def test_verify_off_and_atol(tmp_path):
    rep = export_onnx(tiny("mlp"), tmp_path / "m.onnx", example("mlp"), verify=False)
    assert rep["max_abs_diff"] is None
    rep = export_onnx(tiny("mlp"), tmp_path / "n.onnx", example("mlp"), optimize=False, atol=1e-6)
    assert rep["max_abs_diff"] <= 1e-6
    with pytest.raises(FxpruneError):
        export_onnx(tiny("mlp"), tmp_path, example("mlp"))  # a directory is not a file path


def test_external_data_when_large(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_exp, "EXTERNAL_DATA_BYTES", 0)  # treat the tiny model as large
    model = tiny("mlp")
    path = tmp_path / "model.onnx"
    rep = export_onnx(model, path, example("mlp"))
    assert rep["external_data"] is True
    data = tmp_path / "model.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    proto = onnx.load(str(path), load_external_data=False)
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert {e.value for t in weights for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    onnx.checker.check_model(str(path))
    x = example("mlp", 3, seed=4)
    np.testing.assert_allclose(ort_out(path, x), torch_out(model, x), atol=1e-4)

    # exporting a small model over it removes the stale data file
    monkeypatch.setattr(onnx_exp, "EXTERNAL_DATA_BYTES", int(1.8e9))
    rep = export_onnx(model, path, example("mlp"))
    assert rep["external_data"] is False and not data.exists()
    np.testing.assert_allclose(ort_out(path, x), torch_out(model, x), atol=1e-4)


def test_optimize_levels(tmp_path):
    """light folds and cleans (far fewer nodes than none, a few more than full); all three agree
    with torch in onnxruntime; an unknown level is a clear error."""
    nodes = {}
    for level in ("none", "light", "full"):
        path = tmp_path / f"{level}.onnx"
        rep = export_onnx(tiny("llama"), path, example("llama"), optimize=level)
        assert rep["max_abs_diff"] is not None and rep["max_abs_diff"] < 1e-4
        nodes[level] = len(onnx.load(str(path)).graph.node)
    assert nodes["light"] < 0.7 * nodes["none"], nodes
    assert nodes["full"] <= nodes["light"] <= 1.2 * nodes["full"], nodes
    assert onnx_exp._optimize_level(None, 20) == "light" and onnx_exp._optimize_level(None, 23) == "none"
    assert onnx_exp._optimize_level(True, 20) == "full" and onnx_exp._optimize_level(False, 20) == "none"
    with pytest.raises(FxpruneError, match="unknown optimize level 'fast'"):
        export_onnx(tiny("mlp"), tmp_path / "x.onnx", example("mlp"), optimize="fast")
    assert not (tmp_path / "x.onnx").exists()


def test_optimize_ort_fuses_into_onnxruntime_ops(tmp_path):
    """"ort" replaces the RMS norms (with their residual adds) and the attention of a pruned Llama by
    onnxruntime contrib ops, and the file still matches torch in onnxruntime."""
    model = tiny("llama")
    res = fxprune.prune(model, example("llama"), ratio=0.3, importance="l2", targets=("heads", "mlp"))
    path = tmp_path / "ort.onnx"
    rep = export_onnx(res, path, optimize="ort")
    assert rep["max_abs_diff"] is not None and rep["max_abs_diff"] < 1e-4
    ops = {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}
    fused = {op for domain, op in ops if domain == "com.microsoft"}
    assert {"SkipSimplifiedLayerNormalization", "MultiHeadAttention"} <= fused, ops
    assert ("", "Softmax") not in ops  # attention became one fused op


@pytest.mark.parametrize("before", [False, True])
def test_export_restores_stack_trace_flag_and_keeps_module_scopes(tmp_path, before, monkeypatch):
    # the export turns per-node tracebacks off for speed; the user's setting must come back
    monkeypatch.setattr(torch.fx.config, "do_not_emit_stack_traces", before)
    model = tiny("llama")
    path = tmp_path / "l.onnx"
    export_onnx(model, path, example("llama"))
    assert torch.fx.config.do_not_emit_stack_traces is before
    props = [dict((p.key, p.value) for p in n.metadata_props) for n in onnx.load(str(path)).graph.node]
    assert not any("pkg.torch.onnx.stack_trace" in p for p in props)
    assert any("layers.1.self_attn" in p.get("namespace", "") for p in props)


def _ir_model(nodes: list, ints: dict[str, int], x_shape: list[int], out: str, out_shape=None):
    """An onnx_ir model: input ``x`` (float), the given nodes, int64 scalar-list initializers."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    inits = [helper.make_tensor(name, TensorProto.INT64, [1], [v]) for name, v in ints.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def _slice_model(ends_first: int):
    """x -> Slice(0:ends_first on axis 1) -> Slice(0:2 on axis 1) -> Relu."""
    from onnx import helper

    nodes = [helper.make_node("Slice", ["x", "zero", "end1", "axis", "one"], ["a"]),
             helper.make_node("Slice", ["a", "zero", "two", "axis", "one"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    return _ir_model(nodes, {"zero": 0, "end1": ends_first, "two": 2, "axis": 1, "one": 1}, [2, 4], "y")


def test_noop_slices_are_dropped_and_real_ones_kept():
    keep_all = _slice_model(2**63 - 1)
    assert onnx_exp._drop_noop_slices_pass()(keep_all).modified
    slices = [n for n in keep_all.graph if n.op_type == "Slice"]
    assert len(slices) == 1 and slices[0].inputs[0].name == "x"  # the real slice now reads x itself
    cut = _slice_model(3)  # 0:3 of 4 columns is a real slice
    assert not onnx_exp._drop_noop_slices_pass()(cut).modified
    assert sum(n.op_type == "Slice" for n in cut.graph) == 2


def test_noop_slice_feeding_a_graph_output_is_kept():
    from onnx import helper

    model = _ir_model([helper.make_node("Slice", ["x", "zero", "end", "axis", "one"], ["y"])],
                      {"zero": 0, "end": 2**63 - 1, "axis": 1, "one": 1}, [2, 4], "y")
    assert not onnx_exp._drop_noop_slices_pass()(model).modified


def test_multi_output_rule_guard_keeps_results_and_restores_the_rules():
    from onnx import helper
    from onnxscript import optimizer, rewriter

    def halves():  # x[:, 2:] and x[:, :2]: SlicesSplit turns the pair into one Split
        # this order: the matcher pairs each Slice with every Slice, itself included, and stops
        # at the first structural match, whose check then fails
        nodes = [helper.make_node("Slice", ["x", "two", "four", "axis"], ["b"]),
                 helper.make_node("Slice", ["x", "zero", "two", "axis"], ["a"]),
                 helper.make_node("Mul", ["a", "b"], ["y"])]
        return _ir_model(nodes, {"zero": 0, "two": 2, "four": 4, "axis": 1}, [3, 4], "y", [3, 2])

    plain, guarded = halves(), halves()
    optimizer.optimize(plain)
    with onnx_exp._multi_output_rules_skip_other_ops():
        multi = [r for r in rewriter._DEFAULT_REWRITE_RULES if not r._target_pattern.has_single_output_node]
        assert multi and all("try_rewrite" in vars(r) for r in multi)
        optimizer.optimize(guarded)
    assert not any("try_rewrite" in vars(r) for r in rewriter._DEFAULT_REWRITE_RULES)
    ops = [n.op_type for n in guarded.graph]
    assert ops == [n.op_type for n in plain.graph] and "Split" in ops


def deep_llama() -> nn.Module:
    """Four layers: enough for the capture and the ONNX export to stitch (fxprune.stitch.MIN_LAYERS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


@pytest.fixture(scope="module")
def pruned_deep(tmp_path_factory):
    """A PruneResult with layers of different widths (heads and MLP), exported the stitched way."""
    model = deep_llama()
    result = fxprune.prune(model, example("llama"), ratio=0.3, importance="taylor-element1",
                           targets=("heads", "mlp"), mode="global", calib=torch.randint(0, VOCAB, (4, 16)))
    widths = {m.mlp.up_proj.out_features for m in result.model.model.layers}
    assert len(widths) > 1, "the test needs layers of different widths"
    path = tmp_path_factory.mktemp("stitched") / "pruned.onnx"
    return model, result, path, export_onnx(result, path)


def test_prune_result_exports_stitched_with_per_layer_widths(pruned_deep):
    model, result, path, rep = pruned_deep
    assert rep["capture"] == "stitched"
    assert rep["max_abs_diff"] <= 1e-4
    assert [i["name"] for i in rep["inputs"]] == ["input_ids", "attention_mask"]
    assert [o["name"] for o in rep["outputs"]] == ["logits"] and rep["outputs"][0]["shape"][:2] == ["batch", "sequence"]
    for batch, seq, seed in [(3, 11, 5), (1, 4, 6)]:
        x = example("llama", batch, seq, seed)
        np.testing.assert_allclose(ort_out(path, x), torch_out(result.model, x), atol=1e-4)
    init = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    assert init < sum(p.numel() for p in model.parameters())


def test_stitched_and_full_exports_compute_the_same(pruned_deep, tmp_path, monkeypatch):
    _, result, path, _ = pruned_deep
    from fxprune.exporters import onnx_stitched

    monkeypatch.setattr(onnx_stitched, "stitched_onnx", lambda *a, **k: None)
    full = tmp_path / "full.onnx"
    assert export_onnx(result, full)["capture"] == "full"
    x = example("llama", 2, 9, seed=7)
    np.testing.assert_allclose(ort_out(path, x), ort_out(full, x), atol=1e-5)


def test_stitched_export_falls_back_when_the_plan_does_not_apply(pruned_deep, tmp_path, monkeypatch):
    _, result, _, _ = pruned_deep
    from fxprune.passes import rewrite

    def broken(*args, **kwargs):
        raise RuntimeError("simulated: the prepared graph cannot take the plan")

    monkeypatch.setattr(rewrite, "rewrite_exported", broken)
    rep = export_onnx(result, tmp_path / "fallback.onnx")
    assert rep["capture"] == "full" and rep["max_abs_diff"] <= 1e-4


def test_stitched_export_refuses_a_program_that_differs_from_eager(pruned_deep, tmp_path, monkeypatch):
    _, result, _, _ = pruned_deep
    from fxprune.exporters import onnx_stitched

    monkeypatch.setattr(onnx_stitched, "matches_eager", lambda *a, **k: False)
    assert export_onnx(result, tmp_path / "checked.onnx")["capture"] == "full"


def test_dense_deep_model_exports_stitched(tmp_path):
    model = deep_llama()
    rep = export_onnx(model, tmp_path / "dense.onnx", example("llama"))
    assert rep["capture"] == "stitched" and rep["max_abs_diff"] <= 1e-4
    x = example("llama", 3, 13, seed=8)
    np.testing.assert_allclose(ort_out(tmp_path / "dense.onnx", x), torch_out(model, x), atol=1e-4)


def test_saved_and_reloaded_model_exports_stitched_with_its_origin(pruned_deep, tmp_path):
    from fxprune.checkpoint import origin

    _, result, _, _ = pruned_deep
    fxprune.save(result, str(tmp_path / "saved"))
    model, _ = fxprune.load(str(tmp_path / "saved"))
    base, plan = origin(tmp_path / "saved")
    assert all(p.is_meta for p in base.parameters()) and plan.keep == result.plan.keep  # no weights read
    rep = export_onnx(model, tmp_path / "reloaded.onnx", example("llama"), origin=(base, plan))
    assert rep["capture"] == "stitched" and rep["max_abs_diff"] <= 1e-4
    assert [i["name"] for i in rep["inputs"]] == ["input_ids", "attention_mask"]
    assert [o["name"] for o in rep["outputs"]] == ["logits"]
    x = example("llama", 3, 10, seed=9)
    np.testing.assert_allclose(ort_out(tmp_path / "reloaded.onnx", x), torch_out(model, x), atol=1e-4)
    assert origin(tmp_path) is None  # not an fxprune directory: no origin, the plain export
    with pytest.raises(FxpruneError, match="origin must be"):
        export_onnx(model, tmp_path / "bad.onnx", example("llama"), origin=(base, "not a plan"))


def deep(arch: str) -> nn.Module:
    """Four-layer (stitchable) versions of the other architectures."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()
    if arch == "bert":
        return BertModel(BertConfig(**common, max_position_embeddings=64)).eval()
    if arch == "phi3":
        return Phi3ForCausalLM(Phi3Config(**common, num_key_value_heads=2, pad_token_id=0, eos_token_id=0,
                                          bos_token_id=0)).eval()
    return Qwen3ForCausalLM(Qwen3Config(**common, num_key_value_heads=2, head_dim=8)).eval()


# Conv1D with a fused qkv split, layer norm, fused qkv and gate/up, q/k norms: each prepares its own ops
@pytest.mark.parametrize("arch", ["gpt2", "bert", "phi3", "qwen3"])
def test_pruned_architectures_export_stitched(arch, tmp_path):
    model = deep(arch)
    x = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}
    result = fxprune.prune(model, x, ratio=0.2, importance="l2", targets=("heads", "mlp"), mode="global")
    rep = export_onnx(result, tmp_path / f"{arch}.onnx")
    assert rep["capture"] == "stitched" and rep["max_abs_diff"] <= 1e-4
    fresh = {"input_ids": torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))}
    np.testing.assert_allclose(ort_out(tmp_path / f"{arch}.onnx", fresh), torch_out(result.model, fresh), atol=1e-4)


def test_t5_encoder_exports_its_transposed_reshapes(tmp_path):
    """T5's attention reshapes a transposed tensor; torch.onnx's decomposition made that a view
    that failed to run (unpruned too) until the export reads a contiguous clone there."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, d_kv=8, num_layers=2,
                                    num_heads=4)).eval()
    x = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}
    result = fxprune.prune(model, x, ratio=0.2, importance="l2", targets=("heads", "mlp"))
    program = fxprune.capture(result.model, x)
    before = [(n.name, n.target, n.args) for n in program.exported.graph.nodes]
    rep = export_onnx(program, tmp_path / "t5.onnx")
    assert rep["max_abs_diff"] <= 1e-4
    assert [(n.name, n.target, n.args) for n in program.exported.graph.nodes] == before  # clones taken out
    fresh = {"input_ids": torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))}
    np.testing.assert_allclose(ort_out(tmp_path / "t5.onnx", fresh), torch_out(result.model, fresh), atol=1e-4)


def test_copies_before_reshapes_only_after_layout_ops():
    class M(nn.Module):
        def forward(self, x):
            a = x.transpose(1, 2).contiguous().reshape(x.shape[0], -1)  # gets a clone
            b = x.reshape(x.shape[0], -1)  # does not
            return a + b

    ep = torch.export.export(M(), (torch.randn(2, 3, 4),), strict=False)
    gm = ep.graph_module
    clones = lambda: sum(n.target is torch.ops.aten.clone.default for n in gm.graph.nodes)  # noqa: E731
    code = gm.code
    with onnx_exp.copies_before_reshapes(gm) as n:
        assert n == 1 and clones() == 1
        x = torch.randn(2, 3, 4)  # the export is static
        torch.testing.assert_close(gm(x)[0], M()(x))
    assert clones() == 0 and gm.code == code


def test_torch_onnx_errors_reduced_to_their_cause():
    msg = ("Failed to decompose the FX graph for ONNX compatibility. \x1b[96mThis is step 2/3\x1b[0m of exporting "
           "the model to ONNX. Next steps:\n- Create an issue\n\n## Exception summary\n\n"
           "<class 'ValueError'>: Cannot view a tensor with shape [2, 7]\n\nWhile executing %view_4")
    line = onnx_exp._one_line(RuntimeError(msg))
    assert line == ("Failed to decompose the FX graph for ONNX compatibility. "
                    "<class 'ValueError'>: Cannot view a tensor with shape [2, 7]")
    assert onnx_exp._one_line(ValueError("")) == "ValueError"
    assert onnx_exp._one_line(ValueError("plain\nsecond")) == "plain"


def test_half_precision_tolerance_is_the_dtypes_rounding():
    assert onnx_exp.output_tolerance(1e-4, torch.float32) == 1e-4
    assert onnx_exp.output_tolerance(1e-4, torch.float16) == pytest.approx(4 * 2 ** -10)
    assert onnx_exp.output_tolerance(1e-4, torch.bfloat16) == pytest.approx(4 * 2 ** -7)
    assert onnx_exp.output_tolerance(1e-2, torch.float16) == 1e-2  # a looser atol stays
    assert onnx_exp.output_tolerance(1e-4, torch.int64) == 1e-4


def test_float16_model_exports_and_verifies(tmp_path):
    """A float16 model's file differs from float16 torch by float16 rounding (2.4e-4 here), which
    the float32 tolerance of 1e-4 refused."""
    model = tiny("llama").half()
    result = fxprune.prune(model, example("llama"), ratio=0.2, importance="l2", targets=("mlp",))
    rep = export_onnx(result, tmp_path / "half.onnx")
    assert 0 < rep["max_abs_diff"] <= onnx_exp.output_tolerance(1e-4, torch.float16) * 64
    x = example("llama", 3, 9, seed=4)
    ref = result.model(**x).logits.float().detach().numpy()
    np.testing.assert_allclose(ort_out(tmp_path / "half.onnx", x), ref, atol=2e-2)


def test_bfloat16_model_without_cpu_kernels_says_what_to_do(tmp_path):
    model = tiny("llama").to(torch.bfloat16)
    with pytest.raises(VerificationError, match=r"few bfloat16 kernels: export a float32 or float16 copy"):
        export_onnx(model, tmp_path / "bf16.onnx", example("llama"))
    assert not (tmp_path / "bf16.onnx").exists()
    rep = export_onnx(model, tmp_path / "bf16.onnx", example("llama"), verify=False)  # unchecked, as asked
    assert rep["max_abs_diff"] is None and (tmp_path / "bf16.onnx").exists()
