"""Stitched capture (two layers exported, the rest copied) equals the full export, or is not used."""

import sys
from collections import Counter

import pytest
import torch

import fxprune
from fxprune import stitch
from fxprune.capture import capture
from fxprune.depgraph import dependency_graph

capture_mod = sys.modules["fxprune.capture"]  # fxprune.capture is the function
LAYERS = 5


def deep(name):
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=36, intermediate_size=48, num_hidden_layers=LAYERS)
    if name == "llama-9-3-tied":
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=9, num_key_value_heads=3, head_dim=4,
                                            tie_word_embeddings=True))
    if name == "bert":
        return BertModel(BertConfig(**{**common, "hidden_size": 32}, num_attention_heads=4, max_position_embeddings=64))
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    if name == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    if name == "phi3":
        return Phi3ForCausalLM(Phi3Config(**{**common, "hidden_size": 32}, num_attention_heads=4, num_key_value_heads=2,
                                          pad_token_id=0, eos_token_id=0, bos_token_id=0))
    raise KeyError(name)


X = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}


@pytest.fixture
def spy(monkeypatch):
    """Records whether each capture's stitch produced a program."""
    made = []
    orig = stitch.stitch

    def recording(*args, **kwargs):
        out = orig(*args, **kwargs)
        made.append(out is not None)
        return out

    monkeypatch.setattr(stitch, "stitch", recording)
    return made


def groups_of(program):
    return [(g.id, g.kind, g.layer, g.units, g.unit_size, g.prunable, g.reason,
             [(m.param, m.dim, m.unit_of.tolist()) for m in g.members]) for g in dependency_graph(program).groups]


@pytest.mark.parametrize("name", ["llama-9-3-tied", "gpt2", "bert", "qwen3", "phi3"])
def test_stitched_capture_equals_the_full_export(name, spy):
    model = deep(name)
    fast = capture(model, X)
    assert spy == [True], "the stack should have been stitched"
    full = capture(model, X, stitch=False)
    ops = lambda p: Counter(str(n.target) for n in p.graph.nodes if n.op == "call_function")  # noqa: E731
    assert ops(fast) == ops(full)
    assert sorted(fast.params.values()) == sorted(full.params.values())
    assert sorted(fast.buffers.values()) == sorted(full.buffers.values())
    assert fast.output_names == full.output_names
    assert groups_of(fast) == groups_of(full)
    fresh = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = full.exported.module()(fresh)
        got = fast.exported.module()(fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # every stitched layer's nodes name their own layer
    layers = {capture_mod.module_path(n, "m.").split(".")[2] for n in fast.graph.nodes
              if ".layers." in capture_mod.module_path(n, "m.") or ".h." in capture_mod.module_path(n, "m.")
              or ".layer." in capture_mod.module_path(n, "m.")}
    assert layers == {str(i) for i in range(LAYERS)}


def test_stitching_leaves_the_model_alone():
    model = deep("llama-9-3-tied")
    before = (model.config.num_hidden_layers, len(model.model.layers), id(model.model), id(model.config),
              dict(model._modules), dict(model.model._modules))
    capture(model, X)
    after = (model.config.num_hidden_layers, len(model.model.layers), id(model.model), id(model.config),
             dict(model._modules), dict(model.model._modules))
    assert before == after


def test_pruning_a_stitched_capture_matches_masking():
    from fxprune.passes.rewrite import masked_copy

    model = deep("llama-9-3-tied")
    res = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"))
    assert res.report["capture"] == "stitched" and res.program.stitched
    masked = masked_copy(res.program, res.dg, res.plan)
    fresh = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(res.model(input_ids=fresh).logits, masked(input_ids=fresh).logits,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res.graph_module(fresh), res.model(input_ids=fresh).logits, rtol=1e-5, atol=1e-6)


def test_layers_that_differ_are_exported_whole(spy):
    model = deep("llama-9-3-tied")
    layer = model.model.layers[3].mlp
    layer.down_proj = torch.nn.Linear(48, 36, bias=True)  # one layer with a bias: not a copy of layer 1
    assert stitch.find_stack(model) is None
    p = capture(model, X)
    assert spy == [] and not p.stitched
    assert "model.layers.3.mlp.down_proj.bias" in p.params.values()


def test_uneven_layer_types_are_exported_whole():
    model = deep("qwen3")
    model.config.layer_types = ["full_attention", "sliding_attention"] * 2 + ["full_attention"]
    assert stitch.find_stack(model) is None


def test_a_stitch_that_disagrees_with_eager_falls_back(monkeypatch, spy):
    model = deep("llama-9-3-tied")
    monkeypatch.setattr(capture_mod, "_same_output", lambda *a, **k: False)
    p = capture(model, X)
    assert spy == [True]  # stitched, rejected by the output check, exported whole
    full = capture(model, X, stitch=False)
    assert len(p.graph.nodes) == len(full.graph.nodes)
    assert sorted(p.params.values()) == sorted(full.params.values())


def test_meta_device_stitches_on_shapes(spy):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=36, intermediate_size=48, num_hidden_layers=6,
                                             num_attention_heads=9, num_key_value_heads=3, head_dim=4))
    dg = dependency_graph(capture(model, X))
    assert spy == [True]
    assert sum(1 for g in dg.groups if g.kind == "mlp") == 6


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.register_buffer("scale", torch.rand(8))

    def forward(self, x):
        return x + torch.relu(self.fc(x)) * self.scale


class _Stack(torch.nn.Module):
    """Not an HF model, but with a config naming its layer count: layers hold a buffer each."""

    def __init__(self, n=5):
        super().__init__()
        from types import SimpleNamespace

        torch.manual_seed(1)
        self.config = SimpleNamespace(num_hidden_layers=n)
        self.inp = torch.nn.Linear(4, 8)
        self.layers = torch.nn.ModuleList(_Block() for _ in range(n))
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers[: self.config.num_hidden_layers]:
            h = layer(h)
        return self.out(h)


def test_layers_with_buffers_keep_placeholders_in_signature_order(spy):
    model = _Stack()
    x = torch.randn(2, 4)
    fast = capture(model, x)
    assert spy == [True]
    full = capture(model, x, stitch=False)
    assert sorted(fast.buffers.values()) == sorted(full.buffers.values()) == [f"layers.{i}.scale" for i in range(5)]
    kinds = [s.kind.name for s in fast.exported.graph_signature.input_specs]
    assert kinds == [s.kind.name for s in full.exported.graph_signature.input_specs]
    fresh = torch.randn(6, 4)
    torch.testing.assert_close(fast.exported.module()(fresh), model(fresh), rtol=0, atol=0)
    assert groups_of(fast) == groups_of(full)
