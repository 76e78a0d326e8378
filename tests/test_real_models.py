"""Real models shipped offline as packages: SmolLM2-135M (GGUF) and all-MiniLM-L6-v2 (BERT)."""

import json

import pytest
import torch

import fxprune
from fxprune.cli import main
from fxprune.models import example_inputs, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_smollm2_groups(smollm):
    model, tok = smollm
    dg = fxprune.dependency_graph(fxprune.capture(model, example_inputs(model, tok)))
    mlp = dg.by_kind("mlp")
    assert len(mlp) == 30 and all(g.units == 1536 and g.prunable for g in mlp)
    heads = dg.by_kind("heads")
    assert len(heads) == 30 and all(g.units == 9 and g.block == 3 and g.unit_size == 64 for g in heads)
    kv = dg.by_kind("kv_heads")
    assert len(kv) == 30 and all(g.units == 3 and g.prunable for g in kv)
    hidden = dg.by_kind("hidden")
    assert len(hidden) == 1 and hidden[0].units == 576
    params = [m.param for m in hidden[0].members]
    assert params.count("model.embed_tokens.weight") == 1  # tied with lm_head: once, with an alias
    norms = [p for p in params if "norm" in p]
    assert len(norms) == 61
    vocab = [g for g in dg.groups if g.units == 49152]
    assert vocab and not vocab[0].prunable and "vocabulary" in vocab[0].reason


def test_minilm_groups():
    model, tok = load_model("minilm-l6")
    dg = fxprune.dependency_graph(fxprune.capture(model, example_inputs(model, tok)))
    heads = dg.by_kind("heads")
    assert len(heads) == 6 and all(g.units == 12 and g.unit_size == 32 and g.prunable for g in heads)
    mlp = [g for g in dg.by_kind("mlp") if g.prunable]
    assert len(mlp) == 6 and all(g.units == 1536 for g in mlp)
    hidden = dg.by_kind("hidden")
    assert len(hidden) == 1 and hidden[0].units == 384


def test_smollm2_prune_cli_save_reload_onnx(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prune", "smollm2-135m", "--ratio", "0.2", "--layers", "3:29", "--out", str(out),
               "--onnx", "--json", "--quiet"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.19 <= report["removed_fraction"] <= 0.22
    assert report["onnx"]["max_abs_diff"] <= 1e-3 and report["onnx"]["capture"] == "stitched"
    model, tok = fxprune.load(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    plain, _ = fxprune.load_model(str(out))
    ids = torch.randint(0, 49152, (2, 12))
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=False).logits
        b = plain(input_ids=ids, use_cache=False).logits
    assert torch.equal(a, b)
    assert (out / "model.onnx").exists()
