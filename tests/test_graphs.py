"""GraphML / DOT / picture exports of the dependency graph."""

from __future__ import annotations

import re

import networkx as nx
import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import FxpruneError
from fxprune.exporters.graphs import draw_groups, write_dot, write_graphml


@pytest.fixture(scope="module")
def llama_dg():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    return fxprune.dependency_graph(fxprune.capture(model, {"input_ids": torch.randint(0, 64, (2, 7))}))


@pytest.fixture(scope="module")
def mlp_dg():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8))
    return fxprune.dependency_graph(fxprune.capture(model, torch.randn(2, 16)))


def test_graphml_round_trip(llama_dg, tmp_path):
    path = tmp_path / "deps.graphml"
    write_graphml(llama_dg, path)
    g = nx.read_graphml(path)
    assert g.number_of_nodes() == llama_dg.nx.number_of_nodes()
    assert g.number_of_edges() == llama_dg.nx.number_of_edges()
    node = g.nodes["model.layers.0.mlp.up_proj.weight:0"]
    assert node["kind"] == "param" and node["param"] == "model.layers.0.mlp.up_proj.weight"
    assert node["dim"] == 0 and node["layer"] == 0 and node["prunable"] is True
    assert "mlp:" in node["groups"] and node["group_kinds"] == "mlp"
    for _, data in g.nodes(data=True):
        assert all(isinstance(v, (str, int, float, bool)) for v in data.values())


def _dot_clusters(text: str) -> list[str]:
    return re.findall(r"subgraph (cluster_\d+) \{", text)


def test_dot_layer_clusters(llama_dg, tmp_path):
    path = tmp_path / "layer0.dot"
    write_dot(llama_dg, path, layer=0)
    text = path.read_text()
    layer_groups = [g for g in llama_dg.groups if g.layer == 0]
    assert len(_dot_clusters(text)) == len(layer_groups) >= 4
    assert text.startswith("graph ") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    assert len(re.findall(r'(?<!\\)"', text)) % 2 == 0  # quotes balanced
    for g in layer_groups:
        assert f"{g.kind} · layer 0 · {g.units}×{g.unit_size}" in text
        for m in g.members:
            assert f'"{m.param}:{m.dim}"' in text
    assert "model.layers.1." not in text
    assert "pinned: " in text and "prunable" in text
    defined = set(re.findall(r"^\s*(g\d+_m\d+) \[", text, re.M))
    for a, b in re.findall(r"^\s*(g\d+_m\d+) -- (g\d+_m\d+)", text, re.M):
        assert a in defined and b in defined
    # q_proj rows are in the heads and the kv_heads group: the copies are linked
    assert re.search(r"^\s*g\d+_m\d+ -- g\d+_m\d+ \[style=dashed", text, re.M)


def test_dot_whole_model_and_bad_layer(llama_dg, tmp_path):
    path = tmp_path / "all.dot"
    write_dot(llama_dg, path)
    text = path.read_text()
    assert len(_dot_clusters(text)) == len(llama_dg.groups)
    assert "(tied: lm_head.weight)" in text  # the tied embedding is labelled
    with pytest.raises(FxpruneError, match="no groups in layer 7"):
        write_dot(llama_dg, tmp_path / "x.dot", layer=7)


@pytest.mark.parametrize("ext", ["png", "svg"])
def test_draw_groups(llama_dg, tmp_path, ext):
    path = tmp_path / f"layer0.{ext}"
    draw_groups(llama_dg, path, layer=0)
    data = path.read_bytes()
    assert len(data) > 10_000
    if ext == "png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert b"<svg" in data[:2000]


def test_draw_layer1_and_errors(llama_dg, mlp_dg, tmp_path):
    draw_groups(llama_dg, tmp_path / "layer1.png", layer=1)
    assert (tmp_path / "layer1.png").stat().st_size > 10_000
    draw_groups(mlp_dg, tmp_path / "mlp.png")  # no layers: the whole model is drawn
    assert (tmp_path / "mlp.png").stat().st_size > 5_000
    with pytest.raises(FxpruneError):
        draw_groups(llama_dg, tmp_path / "x.png", layer=9)
    with pytest.raises(FxpruneError):
        draw_groups(llama_dg, tmp_path / "x.jpg", layer=0)
