"""Reconstruction pass: the refit is the least-squares solution, lowers error, keeps shapes."""

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.api import run_model
from fxprune.errors import FxpruneError
from fxprune.passes.reconstruct import reconstruct, refit_targets
from fxprune.passes.rewrite import apply_plan
from fxprune.plan import Plan


def correlated_mlp(bias=True):
    """Linear(8->32) -> ReLU -> Linear(32->6): hidden channels are strongly correlated (rank ~8)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 6, bias=bias)).eval()


def batches(n=6, rows=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 8, generator=g), torch.zeros(rows, 6)) for _ in range(n)]


def setup(keep, bias=True):
    model = correlated_mlp(bias)
    program = fxprune.capture(model, (torch.randn(2, 8),))
    dg = fxprune.dependency_graph(program)
    (g,) = [g for g in dg.prunable if g.units == 32]
    plan = Plan({g.id: keep})
    return model, program, dg, plan


def hidden(model, x):
    return model[1](model[0](x))


@pytest.mark.parametrize("bias", [False, True])
def test_refit_equals_independent_least_squares(bias):
    keep = list(range(0, 32, 2))
    model, program, dg, plan = setup(keep, bias)
    data = batches()
    rw = apply_plan(program, dg, plan)
    rep = reconstruct(model, rw.model, program, dg, plan, data, damp=1e-9)
    assert rep["layers"] == 1
    # independent: lstsq of the dense output W h on the kept hidden channels (and a constant)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        h = hidden(model, x).double().numpy()
        y = h @ model[2].weight.double().numpy().T
    feats = np.concatenate([h[:, keep], np.ones((len(h), 1))], 1) if bias else h[:, keep]
    want, *_ = np.linalg.lstsq(feats, y, rcond=None)
    got = rw.model[2].weight.detach().double().numpy()
    np.testing.assert_allclose(got, want[: len(keep)].T, rtol=1e-4, atol=1e-5)
    if bias:
        shift = rw.model[2].bias.detach().double().numpy() - model[2].bias.detach().double().numpy()
        np.testing.assert_allclose(shift, want[-1], rtol=1e-4, atol=1e-5)
    else:
        assert rep["rel_error_after"] < rep["rel_error_before"]


def test_refit_lowers_output_error_and_graph_agrees():
    keep = list(range(0, 32, 3))
    model, program, dg, plan = setup(keep)
    data = batches()
    plain = apply_plan(program, dg, plan).model
    rw = apply_plan(program, dg, plan)
    reconstruct(model, rw.model, program, dg, plan, data, damp=0.01)  # 240 rows, 11 features
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(7))  # unseen inputs
    with torch.no_grad():
        ref = model(x)
        err_plain = float((plain(x) - ref).norm())
        err_refit = float((rw.model(x) - ref).norm())
        assert err_refit < 0.6 * err_plain
        # the graph module shares the refit parameters
        assert torch.allclose(rw.graph_module(x), rw.model(x), atol=1e-6)
    assert rw.model[2].weight.shape == (6, len(keep))


def test_keep_all_plan_has_nothing_to_refit():
    model, program, dg, _ = setup(list(range(32)))
    plan = Plan.keep_all(dg)
    assert refit_targets(model, program, dg, plan) == []


def test_bad_arguments():
    model, program, dg, plan = setup([0, 1, 2])
    rw = apply_plan(program, dg, plan)
    with pytest.raises(FxpruneError, match="calibration"):
        reconstruct(model, rw.model, program, dg, plan, [])
    with pytest.raises(FxpruneError, match="damping"):
        reconstruct(model, rw.model, program, dg, plan, batches(), damp=0.0)


def test_prune_with_reconstruct_on_llama_lowers_loss_and_leaves_user_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    before = copy.deepcopy(model.state_dict())
    calib = torch.randint(0, 64, (8, 24), generator=torch.Generator().manual_seed(3))
    kw = dict(ratio=0.3, importance="l2", targets=("heads", "mlp"), calib=calib)
    plain = fxprune.prune(model, {"input_ids": calib[:2]}, **kw)
    refit = fxprune.prune(model, {"input_ids": calib[:2]}, reconstruct=True, **kw)
    assert refit.report["params_after"] == plain.report["params_after"]
    assert refit.report["reconstruct"]["layers"] == 4  # o_proj and down_proj of both layers
    x = {"input_ids": calib}
    ref = run_model(model, x)
    assert float((run_model(refit.model, x) - ref).norm()) < float((run_model(plain.model, x) - ref).norm())
    assert torch.allclose(run_model(refit.graph_module, x), run_model(refit.model, x), atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_few_calibration_tokens_are_noted():
    import fxprune.passes.reconstruct as rc

    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 4))
    targets = [rc._Target("1", 1, np.arange(16), None), rc._Target("0", 1, np.arange(4), None)]
    (note,) = rc.few_tokens_note(model, targets, [torch.zeros(2, 16, dtype=torch.long)])  # 32 tokens, 32 wide
    assert "32 calibration tokens for inputs up to 32 wide (1)" in note
    assert rc.few_tokens_note(model, targets, [torch.zeros(2, 16, dtype=torch.long)] * 2) == []  # 64 = 2 x 32
    assert rc.few_tokens_note(model, targets, [torch.zeros(2, 8)]) == []  # not token ids: count unknown
    assert rc.few_tokens_note(model, [], [torch.zeros(2, 16, dtype=torch.long)]) == []


def test_prune_report_notes_few_calibration_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    calib = torch.randint(0, 64, (8, 24), generator=torch.Generator().manual_seed(3))
    kw = dict(ratio=0.3, importance="l2", targets=("mlp",), reconstruct=True)
    few = fxprune.prune(model, {"input_ids": calib[:2]}, calib=calib[:2], **kw)  # 48 tokens, 64-wide down_proj
    enough = fxprune.prune(model, {"input_ids": calib[:2]}, calib=calib, **kw)  # 192 tokens
    assert any("48 calibration tokens for inputs up to 64 wide" in n for n in few.report["notes"])
    assert not any("calibration tokens" in n for n in enough.report["notes"])


def tiny_llama_plan(targets):
    """A 2-layer Llama, its capture, groups and an l2 plan removing 30% over ``targets``, and 6 windows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    calib = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(3))
    program = fxprune.capture(model, {"input_ids": calib[:2]})
    dg = fxprune.dependency_graph(program)
    plan = fxprune.prune(model, {"input_ids": calib[:2]}, ratio=0.3, importance="l2", targets=targets).plan
    return model, program, dg, plan, calib


def test_one_pass_and_layer_by_layer_refits_agree(monkeypatch):
    import fxprune.passes.reconstruct as rc

    model, program, dg, plan, calib = tiny_llama_plan(("heads", "mlp"))
    windows = [calib[i : i + 1] for i in range(6)]
    one = apply_plan(program, dg, plan)
    rep_one = reconstruct(model, one.model, program, dg, plan, windows)
    monkeypatch.setattr(rc, "one_pass_rows", lambda *a: 2)  # 3 batches: the pruned model runs once per layer
    many = apply_plan(program, dg, plan)
    rep_many = reconstruct(model, many.model, program, dg, plan, windows)
    assert rep_one["layers"] == rep_many["layers"] == 4
    for (name, a), (_, b) in zip(one.model.named_parameters(), many.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert rep_one["rel_error_after"] == pytest.approx(rep_many["rel_error_after"], rel=1e-6)


def test_one_pass_rows_follow_the_memory_budget(monkeypatch):
    import fxprune.passes.reconstruct as rc

    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 4))
    ids = [torch.zeros(1, 16, dtype=torch.long)]
    # tokens x the widest consumer's values (layer 1: input 32 + stream 4) x float32 x live activations
    per_row = 16 * (32 + 4) * 4 * rc.ACTIVATION_FACTOR
    monkeypatch.setattr(rc, "ONE_PASS_BYTES", 10 * per_row + 1)
    assert rc.one_pass_rows(model, [("1", 1), ("0", 1), ("1", 0)], ids) == 10
    monkeypatch.setattr(rc, "ONE_PASS_BYTES", per_row // 2)
    assert rc.one_pass_rows(model, [("1", 1), ("0", 1), ("1", 0)], ids) == 1  # always at least one window
    assert rc.one_pass_rows(model, [("1", 1)], [(torch.zeros(3, 8), torch.zeros(3, 4))]) == 1  # not token ids


def test_one_pass_budget_is_a_quarter_of_available_memory_clamped(monkeypatch):
    import fxprune.passes.reconstruct as rc

    monkeypatch.setattr(rc, "ONE_PASS_BYTES", None)
    gib = 1 << 30
    for available, budget in [(20 * gib, 5 * gib), (2 * gib, gib), (100 * gib, 8 * gib), (None, gib)]:
        monkeypatch.setattr(rc, "_available_memory", lambda a=available: a)
        assert rc.one_pass_budget() == budget
    monkeypatch.setattr(rc, "ONE_PASS_BYTES", 12345)  # a fixed budget wins over the machine's memory
    assert rc.one_pass_budget() == 12345


def test_available_memory_reads_meminfo():
    import fxprune.passes.reconstruct as rc

    got = rc._available_memory()
    if os.path.exists("/proc/meminfo"):
        assert got is not None and got > 0
    else:
        assert got is None


@pytest.mark.parametrize("rows", [None, 2])  # one pass over all windows; or 3 batches, layer by layer
def test_forwards_stop_after_the_last_refit_layer(monkeypatch, rows):
    """Nothing after the last refit layer runs: an LM head's logits are the pass's largest tensor."""
    import fxprune.passes.reconstruct as rc

    if rows:
        monkeypatch.setattr(rc, "one_pass_rows", lambda *a: rows)
    model, program, dg, plan, calib = tiny_llama_plan(("mlp",))
    pruned = apply_plan(program, dg, plan)
    before = [m.mlp.down_proj.weight.detach().clone() for m in pruned.model.model.layers]
    heads: list[int] = []
    hooks = [m.lm_head.register_forward_hook(lambda *_: heads.append(1)) for m in (model, pruned.model)]
    rep = reconstruct(model, pruned.model, program, dg, plan, [calib[i : i + 1] for i in range(6)])
    for h in hooks:
        h.remove()
    assert heads == []
    assert rep["layers"] == 2
    assert all(not torch.equal(b, m.mlp.down_proj.weight) for b, m in zip(before, pruned.model.model.layers))


def test_moments_are_float64_from_float32_products():
    """The refit's moments come back float64 (every solve runs there) and match float64 products to
    float32 rounding, also with a token whose activations are 1000x the rest (massive activations)."""
    from fxprune.passes.reconstruct import MOMENT_DTYPE, moments

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    x[0] *= 1000.0
    xp = x[:, :16] + 0.01 * torch.randn(300, 16, generator=gen, dtype=torch.float64)
    got = moments(x.to(MOMENT_DTYPE), xp.to(MOMENT_DTYPE))
    want = {"xx": x.T @ xp, "gram": xp.T @ xp, "dense": x.T @ x, "sx": x.sum(0), "sxp": xp.sum(0)}
    for key, value in want.items():
        assert got[key].dtype == torch.float64, key
        scale = float(value.abs().max())
        assert float((got[key] - value).abs().max()) < 1e-5 * scale, key
