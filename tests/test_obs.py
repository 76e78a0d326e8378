"""OBS selection: its removal cost is the damped refit error (checked by brute force), it keeps the
counts it is given, GQA quotas hold, and prune(importance="obs") refits and leaves the user's model."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.api import run_model
from fxprune.errors import FxpruneError
from fxprune.passes.importance import ImportanceRequest
from fxprune.passes.importance.obs import obs_importance


def mlp_setup(bias: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6, bias=bias)).eval()
    program = fxprune.capture(model, (torch.randn(2, 8),))
    dg = fxprune.dependency_graph(program)
    (g,) = [g for g in dg.prunable if g.units == 12]
    g_ = torch.Generator().manual_seed(1)
    data = [(torch.randn(30, 8, generator=g_), torch.zeros(30, 6)) for _ in range(2)]
    return model, dg, g, data


def damped_error(h: np.ndarray, w: np.ndarray, keep: list[int], lam: float, bias: bool) -> float:
    """min_A ||[H_K (1)] A^T - H W^T||^2 + lam ||A_K - W_K||^2, by an independent lstsq."""
    y = h @ w.T
    feats = h[:, keep]
    if bias:
        feats = np.concatenate([feats, np.ones((len(h), 1))], 1)
    ridge = np.sqrt(lam) * np.eye(feats.shape[1])[: len(keep)]  # no ridge on the intercept
    a_feats = np.concatenate([feats, ridge], 0)
    a_y = np.concatenate([y, np.sqrt(lam) * w[:, keep].T], 0)
    sol, *_ = np.linalg.lstsq(a_feats, a_y, rcond=None)
    return float(((a_feats @ sol - a_y) ** 2).sum())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damp", [0.05, 1.0])
def test_first_removal_is_the_brute_force_best(bias, damp):
    model, dg, g, data = mlp_setup(bias)
    req = ImportanceRequest(model, dg, [g], data, keep={g.id: g.units - 1}, damp=damp)
    scores = obs_importance(req)[g.id]
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        h = model[1](model[0](x)).double().numpy()
    w = model[2].weight.detach().double().numpy()
    lam = damp * float(np.diag(h.T @ h).mean())
    errs = [damped_error(h, w, [k for k in range(g.units) if k != j], lam, bias) for j in range(g.units)]
    assert int(np.argmin(scores)) == int(np.argmin(errs))
    assert len(set(scores.tolist())) == g.units  # a strict order: selection takes the removed one


def test_greedy_beats_magnitude_on_refit_error():
    model, dg, g, data = mlp_setup(False)
    keep = 6
    req = ImportanceRequest(model, dg, [g], data, keep={g.id: keep}, damp=0.05)
    scores = obs_importance(req)[g.id]
    chosen = sorted(np.argsort(-scores)[:keep].tolist())
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        h = model[1](model[0](x)).double().numpy()
    w = model[2].weight.detach().double().numpy()
    lam = 0.05 * float(np.diag(h.T @ h).mean())
    by_norm = sorted(np.argsort(-np.linalg.norm(w, axis=0))[:keep].tolist())
    assert damped_error(h, w, chosen, lam, False) <= damped_error(h, w, by_norm, lam, False) + 1e-9


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


def test_prune_with_obs_on_llama_refits_and_keeps_gqa_balanced():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    calib = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(3))
    res = fxprune.prune(model, {"input_ids": calib[:2]}, ratio=0.3, importance="obs",
                        targets=("heads", "mlp"), calib=calib)
    assert res.report["reconstruct"]["layers"] == 4  # obs turns the refit on
    assert res.report["removed_fraction"] == pytest.approx(0.3, abs=0.05)
    for g in res.dg.prunable:
        if g.kind == "heads" and g.id in res.plan.keep:
            kept = np.asarray(res.plan.keep[g.id])
            per_block = np.bincount(kept // g.block, minlength=g.units // g.block)
            assert len(set(per_block.tolist())) == 1  # same query heads in every kv group
    x = {"input_ids": calib}
    assert torch.allclose(run_model(res.graph_module, x), run_model(res.model, x), atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_obs_refuses_global_ranking_and_iterative():
    model = tiny_llama()
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    with pytest.raises(FxpruneError, match="local"):
        fxprune.prune(model, {"input_ids": calib[:2]}, ratio=0.3, importance="obs", mode="global", calib=calib)
    with pytest.raises(FxpruneError, match="iterative"):
        fxprune.prune(model, {"input_ids": calib[:2]}, ratio=0.3, importance="obs", iterative=True, calib=calib)
    with pytest.raises(FxpruneError, match="calib"):
        fxprune.prune(model, {"input_ids": calib[:2]}, ratio=0.3, importance="obs")


def test_refit_all_lowers_error_further_on_llama():
    model = tiny_llama()
    calib = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(3))
    kw = dict(ratio=0.15, importance="l2", targets=("mlp",), layers="0:1", calib=calib, damp=0.1)
    some = fxprune.prune(model, {"input_ids": calib[:2]}, reconstruct=True, **kw)
    every = fxprune.prune(model, {"input_ids": calib[:2]}, refit_all=True, **kw)
    assert some.report["reconstruct"]["layers"] == 1
    assert every.report["reconstruct"]["layers"] > 1  # the second layer's Linears too
    x = {"input_ids": calib}
    ref = run_model(model, x)
    err_some = float((run_model(some.model, x) - ref).norm())
    err_every = float((run_model(every.model, x) - ref).norm())
    assert err_every < err_some


def test_one_pass_and_layer_by_layer_choose_the_same(monkeypatch):
    import fxprune.passes.reconstruct as rc

    model = tiny_llama()
    calib = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(3))
    kw = dict(ratio=0.3, importance="obs", targets=("heads", "mlp"), calib=calib)
    one = fxprune.prune(model, {"input_ids": calib[:2]}, **kw)
    monkeypatch.setattr(rc, "one_pass_rows", lambda *a: 2)  # 3 batches: measured consumer by consumer
    many = fxprune.prune(model, {"input_ids": calib[:2]}, **kw)
    assert one.plan.keep == many.plan.keep


def test_prune_writes_the_refit_obs_solved_instead_of_solving_it_again():
    """obs refits each consumer while it chooses: prune() writes that refit (record "source": "obs")
    rather than running the reconstruct pass, and it fits the dense outputs as well as that pass."""
    model = tiny_llama()
    calib = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(3))
    x, kw = {"input_ids": calib}, dict(targets=("heads", "mlp"), calib=calib, damp=1.0)
    res = fxprune.prune(model, {"input_ids": calib[:2]}, ratio=0.3, importance="obs", **kw)
    assert res.report["reconstruct"]["source"] == "obs" and res.report["reconstruct"]["layers"] == 4
    assert "reconstruct_s" in res.report["timings"]
    plain = fxprune.prune(model, {"input_ids": calib[:2]}, plan=res.plan, calib=calib)
    solved = fxprune.prune(model, {"input_ids": calib[:2]}, plan=res.plan, reconstruct=True, **kw)
    assert "source" not in solved.report["reconstruct"]  # a replayed plan has no obs refit: solved anew
    ref = run_model(model, x)
    err = {name: float((run_model(r.model, x) - ref).norm()) for name, r in
           (("obs", res), ("plain", plain), ("solved", solved))}
    assert err["obs"] < 0.8 * err["plain"]
    assert err["obs"] == pytest.approx(err["solved"], rel=0.1)
    assert torch.allclose(run_model(res.graph_module, x), run_model(res.model, x), atol=1e-5)
    every = fxprune.prune(model, {"input_ids": calib[:2]}, ratio=0.3, importance="obs", refit_all=True, **kw)
    assert "source" not in every.report["reconstruct"]  # refit_all refits more layers than obs did


def test_apply_refits_declines_what_does_not_match_the_plan():
    from fxprune.passes.reconstruct import Refit, apply_refits, refit_targets

    model = tiny_llama()
    calib = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(3))
    res = fxprune.prune(model, {"input_ids": calib[:2]}, ratio=0.3, importance="l2", targets=("mlp",))
    program = fxprune.capture(model, {"input_ids": calib[:2]})
    targets = refit_targets(model, program, res.dg, res.plan)
    good = {t.path: Refit(model.get_submodule(t.path).weight.detach().clone(), None, t.kept_in) for t in targets}
    before = {k: v.clone() for k, v in res.model.state_dict().items()}
    kw = dict(damp=1.0, residual_corrected=0, notes=[])
    shifted = {**good, targets[0].path: Refit(good[targets[0].path].weight, None, targets[0].kept_in[1:])}
    assert apply_refits(model, res.model, program, res.dg, res.plan, shifted, [calib], **kw) is None
    assert apply_refits(model, res.model, program, res.dg, res.plan, dict(list(good.items())[1:]), [calib], **kw) is None
    assert all(torch.equal(v, before[k]) for k, v in res.model.state_dict().items()), "a declined call writes nothing"
    rec = apply_refits(model, res.model, program, res.dg, res.plan, good, [calib], **kw)
    assert rec["source"] == "obs" and rec["layers"] == len(targets)
    t = targets[0]
    assert torch.equal(res.model.get_submodule(t.path).weight,
                       model.get_submodule(t.path).weight[:, torch.as_tensor(t.kept_in)])
