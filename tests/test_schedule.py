"""Iterative pruning (LoRAPrune's schedule) on tiny random Llama configs."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

import fxprune
from fxprune.api import run_model
from fxprune.errors import FxpruneError
from fxprune.passes import schedule as sched_mod
from fxprune.passes.recovery import attach_lora, finetune, linear_modules, merge_lora
from fxprune.passes.rewrite import apply_plan
from fxprune.passes.schedule import (Schedule, _forget_pruned, _train_interval, cubic_ratio, ema_update,
                                     iterative_prune, update_points)
from fxprune.passes.select import Selection
from fxprune.plan import Plan


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


X = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}
CALIB = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "peft_config" not in model.__dict__
    assert not any("lora" in n for n, _ in model.named_modules())


# -- the arithmetic --------------------------------------------------------------------------------


def test_cubic_ratio_values():
    # r * (1 - (1 - t/T)^3), T = 4, r = 0.2, computed by hand
    want = [0.0, 0.2 * (1 - 27 / 64), 0.2 * (1 - 1 / 8), 0.2 * (1 - 1 / 64), 0.2]
    got = [cubic_ratio(t, 4, 0.2) for t in range(5)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[1] == pytest.approx(0.115625)
    assert cubic_ratio(9, 4, 0.2) == pytest.approx(0.2)  # clamped at the end
    # most of the pruning happens early: the increments shrink
    inc = np.diff(got)
    assert (inc > 0).all() and (np.diff(inc) < 0).all()


@pytest.mark.parametrize("steps,every,want", [(20, 5, [5, 10, 15, 20]), (7, 3, [3, 6, 7]), (3, 3, [3]),
                                              (1, 1, [1])])
def test_update_points(steps, every, want):
    assert update_points(steps, every) == want


def test_ema_update_arithmetic():
    first = ema_update(None, {"g": np.array([1.0, 2.0])}, 0.9)
    assert first["g"].tolist() == [1.0, 2.0]
    second = ema_update(first, {"g": np.array([3.0, 0.0])}, 0.9)
    assert second["g"] == pytest.approx([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 0])
    assert first["g"].tolist() == [1.0, 2.0]  # not updated in place
    assert ema_update(first, {"g": np.array([5.0, 7.0])}, 0.0)["g"].tolist() == [5.0, 7.0]


def test_forget_pruned_zeroes_dropped_units_only():
    avg = {"a": np.array([3.0, 1.0, 2.0, 4.0]), "b": np.array([1.0, 1.0])}
    out = _forget_pruned(avg, Plan({"a": [0, 3]}))
    assert out["a"].tolist() == [3.0, 0.0, 0.0, 4.0]
    assert out["b"].tolist() == [1.0, 1.0]
    assert avg["a"].tolist() == [3.0, 1.0, 2.0, 4.0]


# -- bad options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"iterative": True, "steps": 0}, "steps must be an integer >= 1"),
    ({"iterative": True, "ema": 1.0}, r"ema must be in \[0, 1\)"),
    ({"iterative": True, "ema": -0.1}, r"ema must be in \[0, 1\)"),
    ({"iterative": True, "prune_every": 0}, "prune_every must be an integer >= 1"),
    ({"iterative": True, "steps": 4, "prune_every": 5}, "must not exceed steps"),
    ({"iterative": True, "lr": 0.0}, "lr must be a positive number"),
    ({"iterative": True, "lr": float("nan")}, "lr must be a positive number"),
    ({"recover_steps": -1}, "recover_steps must be an integer >= 0"),
    ({"recover_steps": 2.5}, "recover_steps must be an integer >= 0"),
    ({"iterative": True, "plan": Plan({})}, "makes its own plan"),
    ({"iterative": True, "calib": None}, "calibration"),
    ({"iterative": True, "importance": "l2", "calib": None}, "calibration"),
])
def test_bad_options_are_one_line_errors(kwargs, match):
    kw = {"ratio": 0.2, "calib": CALIB, **kwargs}
    with pytest.raises(FxpruneError, match=match) as info:
        fxprune.prune(tiny_llama(), X, **kw)
    assert "\n" not in str(info.value)


# -- masks during fine-tuning ----------------------------------------------------------------------


def test_masked_units_stay_zero_while_lora_trains():
    """The adapter slices feeding masked units are re-zeroed after each step, so W + s*BA stays masked."""
    model = tiny_llama()
    program = fxprune.capture(model, X)
    dg = fxprune.dependency_graph(program)
    g = next(g for g in dg.prunable if g.kind == "mlp" and g.layer == 0)
    plan = Plan({g.id: list(range(0, g.units, 2))})  # drop the odd MLP channels of layer 0
    work = copy.deepcopy(model)
    from fxprune.passes.rewrite import masked_copy

    work = masked_copy(dataclasses.replace(program, model=work), dg, plan)
    modules = linear_modules(work)
    batches = [CALIB[i:i + 1] for i in range(4)]
    before = {n: p.clone() for n, p in work.named_parameters()}
    losses = _train_interval(work, modules, program, dg, plan, batches, 0, 4, Schedule(lr=1e-2), seed=0)
    assert len(losses) == 4
    mlp = work.model.layers[0].mlp
    odd = torch.arange(1, g.units, 2)
    assert mlp.gate_proj.weight[odd].abs().max() == 0
    assert mlp.up_proj.weight[odd].abs().max() == 0
    assert mlp.down_proj.weight[:, odd].abs().max() == 0
    # ...while the kept channels did train (the merged adapters changed them)
    even = torch.arange(0, g.units, 2)
    assert not torch.equal(mlp.gate_proj.weight[even], before["model.layers.0.mlp.gate_proj.weight"][even])
    assert not any("lora" in n for n, _ in work.named_parameters())


def test_lora_without_masks_would_leak_into_masked_rows():
    """Control for the test above: unmasked LoRA training does move zeroed rows."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[1].zero_()
    handle = attach_lora(model, linear_modules(model), 8, 0)
    finetune(model, handle.params, [CALIB[i:i + 1] for i in range(4)], 4, 1e-2)
    merge_lora(model, handle)
    assert model.model.layers[0].mlp.gate_proj.weight[1].abs().max() > 0


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iterative_result():
    model = tiny_llama()
    snap = snapshot(model)
    res = fxprune.prune(model, X, ratio=0.2, targets=("mlp",), iterative=True, steps=6, prune_every=2,
                        calib=CALIB, lr=1e-2)
    return model, snap, res


def test_iterative_reaches_the_ratio_in_a_smaller_model(iterative_result):
    model, snap, res = iterative_result
    r = res.report
    one_shot = fxprune.prune(tiny_llama(), X, ratio=0.2, targets=("mlp",), importance="l2")
    # local ranking: the same unit counts as a one-shot selection at the same ratio
    assert r["params_after"] == one_shot.report["params_after"] < r["params_before"]
    assert r["removed_fraction"] >= 0.2
    assert res.plan.meta["importance"] == "lora" and res.plan.meta["schedule"] == "iterative"
    assert [h["step"] for h in r["iterative"]] == [2, 4, 6]
    ratios = [h["target_ratio"] for h in r["iterative"]]
    assert ratios == pytest.approx([cubic_ratio(s, 6, 0.2) for s in (2, 4, 6)])
    removed = [h["removed_fraction"] for h in r["iterative"]]
    assert removed == sorted(removed) and removed[-1] == pytest.approx(r["removed_fraction"])
    assert r["timings"]["iterative_s"] > 0
    kept = len(next(v for k, v in res.plan.keep.items() if ".layers.0." in k))
    assert res.model.model.layers[0].mlp.gate_proj.weight.shape[0] == kept < 48
    assert_unchanged(model, snap)


def test_iterative_model_equals_graph_saves_reloads_and_exports(iterative_result, tmp_path):
    _, _, res = iterative_result
    x = {"input_ids": torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))}
    got = run_model(res.model, x)
    assert torch.allclose(got, run_model(res.graph_module, x), atol=1e-5)
    assert not any("lora" in n for n, _ in res.model.named_parameters())
    fxprune.save(res, tmp_path / "out")
    model2, _ = fxprune.load(tmp_path / "out")
    assert torch.allclose(run_model(model2, x), got, atol=1e-5)
    rep = fxprune.export_onnx(res, tmp_path / "model.onnx")
    assert rep["max_abs_diff"] is not None and rep["max_abs_diff"] < 1e-3


def test_iterative_masks_grow_and_rewrite_equals_the_finetuned_masked_copy(monkeypatch):
    model = tiny_llama()
    program = fxprune.capture(model, X)
    dg = fxprune.dependency_graph(program)
    plans = []
    real_select = sched_mod.select

    def recording(*args, **kwargs):
        plans.append(real_select(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(sched_mod, "select", recording)
    batches = [CALIB[i:i + 1] for i in range(4)]
    sel = Selection(0.25, ("heads", "mlp"))
    it = iterative_prune(program, dg, sel, batches, Schedule(steps=6, prune_every=2, lr=1e-2,
                                                             importance="taylor-element1"))
    assert len(plans) == 3 and it.plan is plans[-1]
    for old, new in zip(plans, plans[1:]):  # a dropped unit never comes back
        for gid, kept in new.keep.items():
            assert set(kept) <= set(old.keep.get(gid, range(dg.group(gid).units)))
    # the fine-tuned copy moved away from the user's weights (the adapters were merged)
    w0 = model.model.layers[1].self_attn.q_proj.weight
    assert not torch.allclose(it.model.model.layers[1].self_attn.q_proj.weight, w0)
    # removing what the masks zeroed is exact for MLP channels and whole heads
    rw = apply_plan(dataclasses.replace(program, model=it.model), dg, it.plan)
    x = {"input_ids": torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))}
    assert torch.allclose(run_model(rw.model, x), run_model(it.model, x), atol=1e-5)
    assert torch.allclose(run_model(rw.graph_module, x), run_model(it.model, x), atol=1e-5)


@pytest.mark.parametrize("importance", ["l1", "random", "taylor-vector"])
def test_iterative_with_other_importances(importance):
    res = fxprune.prune(tiny_llama(), X, ratio=0.2, targets=("mlp",), iterative=True, steps=2,
                        prune_every=1, calib=CALIB, importance=importance)
    assert res.plan.meta["importance"] == importance
    assert res.report["removed_fraction"] >= 0.2
