"""The rewrite pass: pruned == masked original, graph == eager, caller's model untouched."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.api import run_model
from fxprune.errors import PlanError
from fxprune.passes.rewrite import apply_plan, masked_copy
from fxprune.plan import Plan


def tiny(name):
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    if name == "llama-4-2":
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2))
    if name == "llama-9-3-tied":
        return LlamaForCausalLM(LlamaConfig(**{**common, "hidden_size": 36}, num_attention_heads=9,
                                            num_key_value_heads=3, head_dim=4, tie_word_embeddings=True))
    if name == "bert":
        return BertModel(BertConfig(**common, num_attention_heads=4, max_position_embeddings=64))
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    if name == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    if name == "phi3":
        return Phi3ForCausalLM(Phi3Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                          pad_token_id=0, eos_token_id=0, bos_token_id=0))
    if name == "mlp":
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8))
    raise KeyError(name)


ARCHS = ["llama-4-2", "llama-9-3-tied", "bert", "gpt2", "qwen3", "phi3", "mlp"]


def inputs(name, batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return (torch.randn(batch, 16, generator=g),)
    return {"input_ids": torch.randint(0, 64, (batch, seq), generator=g)}


def exact_plan(dg, seed=0):
    """Remove MLP channels, whole heads and (GQA) whole kv groups: removal == masking there."""
    rng = np.random.default_rng(seed)
    keep = {}
    for g in dg.prunable:
        if g.kind in ("mlp", "hidden") and not g.inexact and g.units > 2:
            keep[g.id] = sorted(rng.choice(g.units, g.units // 2, replace=False).tolist())
        elif g.kind == "kv_heads" and g.units > 1:
            keep[g.id] = sorted(rng.choice(g.units, g.units - 1, replace=False).tolist())
        elif g.kind == "heads" and g.block > 1:
            per = g.block - 1
            keep[g.id] = [b * g.block + int(e) for b in range(g.units // g.block)
                          for e in sorted(rng.choice(g.block, per, replace=False))]
        elif g.kind == "heads" and g.units > 1:
            keep[g.id] = sorted(rng.choice(g.units, g.units - 1, replace=False).tolist())
    return Plan(keep)


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_all_plan_is_bit_exact(arch):
    model = tiny(arch).eval()
    program = fxprune.capture(model, inputs(arch))
    dg = fxprune.dependency_graph(program)
    rw = apply_plan(program, dg, Plan.keep_all(dg))
    x = inputs(arch, 3, 11, seed=1)
    ref = run_model(model, x)
    assert torch.equal(run_model(rw.model, x), ref)
    assert torch.equal(run_model(rw.graph_module, x), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_equals_masked_original(arch):
    model = tiny(arch).eval()
    before = copy.deepcopy(model.state_dict())
    program = fxprune.capture(model, inputs(arch))
    dg = fxprune.dependency_graph(program)
    plan = exact_plan(dg)
    assert plan.keep, "the architecture should have exactly-maskable groups"
    rw = apply_plan(program, dg, plan)
    masked = masked_copy(program, dg, plan)
    x = inputs(arch, 3, 11, seed=2)
    ref = run_model(masked, x)
    assert (run_model(rw.model, x) - ref).abs().max() < 1e-5
    assert (run_model(rw.graph_module, x) - ref).abs().max() < 1e-5
    assert sum(p.numel() for p in rw.model.parameters()) < sum(p.numel() for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # caller's model untouched


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_30_percent_graph_and_eager_agree_and_recapture(arch):
    model = tiny(arch).eval()
    targets = ("mlp",) if arch == "mlp" else ("heads", "kv_heads", "mlp")
    ratio = 0.2 if arch in ("phi3", "llama-9-3-tied", "mlp") else 0.3  # tiny vocab-heavy configs cap out
    res = fxprune.prune(model, inputs(arch), ratio=ratio, targets=targets)
    assert res.report["removed_fraction"] >= ratio - 1e-9
    x = inputs(arch, 3, 23, seed=3)
    assert (run_model(res.model, x) - run_model(res.graph_module, x)).abs().max() < 1e-5
    again = fxprune.inspect_model(res.model, inputs(arch))  # the pruned model captures again
    assert again.groups


def test_gqa_rewrite_updates_expand_constants_and_module_attributes():
    model = tiny("llama-9-3-tied").eval()
    program = fxprune.capture(model, inputs("llama-9-3-tied"))
    dg = fxprune.dependency_graph(program)
    kv = [g for g in dg.prunable if g.kind == "kv_heads" and g.layer == 0][0]
    heads = [g for g in dg.prunable if g.kind == "heads" and g.layer == 0][0]
    plan = Plan({kv.id: [0, 2], heads.id: [0, 1, 3, 4, 6, 7]})
    rw = apply_plan(program, dg, plan)
    attn = rw.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape[0] == 2 * 2 * 4 and attn.k_proj.weight.shape[0] == 2 * 4
    assert attn.num_key_value_groups == 2
    expands = [n.args[1] for n in rw.graph_module.graph.nodes
               if n.op == "call_function" and "expand" in str(n.target) and len(n.args[1]) == 5]
    assert any(list(a)[1:3] == [2, 2] for a in expands)
    assert rw.model.lm_head.weight is rw.model.model.embed_tokens.weight  # still tied


def test_invalid_plans_are_refused_and_nothing_changes():
    model = tiny("llama-4-2").eval()
    before = copy.deepcopy(model.state_dict())
    program = fxprune.capture(model, inputs("llama-4-2"))
    dg = fxprune.dependency_graph(program)
    heads = [g for g in dg.prunable if g.kind == "heads"][0]
    pinned = [g for g in dg.groups if not g.prunable][0]
    for bad, msg in [({"nope": [0]}, "does not have"), ({heads.id: []}, "at least one"),
                     ({heads.id: [0, 0]}, "duplicate"), ({heads.id: [0, 1, 2]}, "same count"),
                     ({pinned.id: [0]}, "pinned")]:
        with pytest.raises(PlanError, match=msg):
            apply_plan(program, dg, Plan(bad))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_json_round_trip_replays_the_same_model(tmp_path):
    model = tiny("llama-4-2").eval()
    res = fxprune.prune(model, inputs("llama-4-2"), ratio=0.3)
    res.plan.save(tmp_path / "plan.json")
    again = fxprune.prune(model, inputs("llama-4-2"), plan=Plan.load(tmp_path / "plan.json"))
    x = inputs("llama-4-2", 3, 9, seed=4)
    assert torch.equal(run_model(res.model, x), run_model(again.model, x))


def test_bad_ratio_and_unreachable_ratio():
    model = tiny("mlp")
    for r in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(fxprune.FxpruneError, match="ratio"):
            fxprune.prune(model, inputs("mlp"), ratio=r)
    with pytest.raises(fxprune.FxpruneError, match="cannot be reached"):
        fxprune.prune(model, inputs("mlp"), ratio=0.99, targets=("mlp",))


def test_round_to_keeps_multiples():
    model = tiny("llama-4-2").eval()
    res = fxprune.prune(model, inputs("llama-4-2"), ratio=0.2, targets=("mlp",), round_to=8)
    for g in res.report["groups"]:
        if g["kind"] == "mlp":
            assert g["kept"] % 8 == 0 or g["kept"] == g["units"]


def _mlp_kept_by_layer(res):
    return {g["layer"]: g["kept"] for g in res.report["groups"] if g["kind"] == "mlp"}


def test_depth_profile_prunes_the_middle_of_the_range_more():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=5,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    x = inputs("llama-4-2")
    flat = fxprune.prune(model, x, ratio=0.2, targets=("mlp",))
    shaped = fxprune.prune(model, x, ratio=0.2, targets=("mlp",), depth_profile=0.6)
    assert len(set(_mlp_kept_by_layer(flat).values())) == 1  # 0: the same count everywhere
    kept = _mlp_kept_by_layer(shaped)
    assert kept[2] < kept[1] < kept[0] and kept[0] == kept[4] and kept[1] == kept[3]
    # the bisection still lands on the ratio: within two MLP channels of the uniform plan
    per_channel = 3 * 32
    assert abs(shaped.report["params_after"] - flat.report["params_after"]) <= 2 * per_channel
    assert shaped.plan.meta["depth_profile"] == 0.6
    # shaped plans are plans: replaying one gives the same model
    again = fxprune.prune(model, x, plan=shaped.plan)
    assert _mlp_kept_by_layer(again) == kept


@pytest.mark.parametrize("kwargs, match", [({"depth_profile": 1.0}, "between -1 and 1"),
                                           ({"depth_profile": 0.3, "mode": "global"}, "local ranking")])
def test_depth_profile_bad_values_are_named(kwargs, match):
    model = tiny("llama-4-2").eval()
    with pytest.raises(PlanError, match=match):
        fxprune.prune(model, inputs("llama-4-2"), ratio=0.2, targets=("mlp",), **kwargs)


class NormedResidual(nn.Module):
    """A residual stream normalised by LayerNorm and RMSNorm: their normalized_shape is a graph constant."""

    def __init__(self):
        super().__init__()
        self.inp, self.ln, self.rms = nn.Linear(4, 8), nn.LayerNorm(8), nn.RMSNorm(8)
        self.up, self.down, self.out = nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(torch.relu(self.up(self.ln(h))))
        return self.out(self.rms(h))


def test_pruning_a_normalised_stream_rewrites_normalized_shape():
    # regression (fuzz): layer_norm's [8] stayed in the graph after its weight shrank to 5
    model = NormedResidual().eval()
    x = torch.randn(2, 5, 4)
    program = fxprune.capture(model, x)
    dg = fxprune.dependency_graph(program)
    stream = next(g for g in dg.prunable if any(m.param == "ln.weight" for m in g.members))
    rw = apply_plan(program, dg, Plan({stream.id: [0, 2, 3, 5, 7]}))
    fresh = torch.randn(3, 7, 4)
    assert rw.model.ln.weight.shape == (5,) and rw.model.rms.weight.shape == (5,)
    got = run_model(rw.graph_module, fresh)
    assert got.shape == (3, 7, 3)
    assert (got - run_model(rw.model, fresh)).abs().max() < 1e-5


# GQA with tied embeddings, layer norm, Conv1D with a fused qkv split, fused qkv and gate/up
@pytest.mark.parametrize("arch", ["llama-9-3-tied", "bert", "gpt2", "phi3"])
def test_rewrite_exported_keeps_a_lifted_program_that_computes_the_pruned_model(arch):
    from fxprune.passes.rewrite import rewrite_exported
    from fxprune.stitch import run_lifted

    model = tiny(arch).eval()
    dg = fxprune.dependency_graph(fxprune.capture(model, inputs(arch)))
    plan = exact_plan(dg)
    rw = apply_plan(dg.program, dg, plan)
    program = fxprune.capture(model, inputs(arch))  # rewrite_exported edits its program: a copy of our own
    ep = rewrite_exported(program, fxprune.dependency_graph(program), plan, rw.model)
    x = inputs(arch, 3, 11, seed=4)
    got = run_lifted(ep, tuple(x.values()))[0]
    assert (got - run_model(rw.model, x)).abs().max() < 1e-5
    for spec in ep.graph_signature.input_specs:  # every placeholder's recorded shape is its tensor's
        node = next(n for n in ep.graph.nodes if n.name == spec.arg.name)
        tensor = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
        if tensor is not None:
            assert tuple(node.meta["val"].shape) == tuple(tensor.shape), spec.target
    stale = fxprune.capture(model, inputs(arch))
    with pytest.raises(PlanError, match="has shape"):  # the unpruned tensors do not fit the plan
        rewrite_exported(stale, fxprune.dependency_graph(stale), plan, model)
