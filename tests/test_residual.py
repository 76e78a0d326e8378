"""Residual-drift correction: the rule table is used only where the dense model confirms it, and the
corrected refit is the least-squares fit to the dense residual stream."""

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.passes.reconstruct import reconstruct
from fxprune.passes.residual import check_taps, find_taps
from fxprune.passes.rewrite import apply_plan
from fxprune.plan import Plan

D, HID = 6, 16


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q(x)))


class MLP(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.up = nn.Linear(D, HID)
        self.down_proj = nn.Linear(HID, D, bias=bias)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up(x)))


class Block(nn.Module):
    """Llama's layout (pre-norm, two residual adds); ``post_norm`` adds Gemma's norm after the MLP."""

    def __init__(self, post_norm=False, bias=False):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(D)
        self.self_attn = Attn()
        self.post_attention_layernorm = nn.LayerNorm(D)
        self.mlp = MLP(bias)
        self.post_norm = nn.LayerNorm(D) if post_norm else None

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        out = self.mlp(self.post_attention_layernorm(h))
        return h + (self.post_norm(out) if self.post_norm is not None else out)


class Stack(nn.Module):
    def __init__(self, post_norm=(False, False, False), bias=False):
        super().__init__()
        self.layers = nn.ModuleList(Block(p, bias) for p in post_norm)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def data(n=4, rows=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, D, generator=g), torch.zeros(rows, D)) for _ in range(n)]


def test_rule_table_finds_both_residual_writers_of_each_block():
    model = Stack()
    taps = find_taps(model, ["layers.0.mlp.down_proj", "layers.1.self_attn.o_proj", "layers.1.mlp.up"])
    assert set(taps) == {"layers.0.mlp.down_proj", "layers.1.self_attn.o_proj"}
    assert taps["layers.0.mlp.down_proj"].stream == "layers.0.post_attention_layernorm"
    assert taps["layers.1.self_attn.o_proj"].stream == "layers.1.input_layernorm"


def test_dense_check_rejects_a_block_whose_output_is_not_a_plain_residual_add():
    torch.manual_seed(0)
    model = Stack(post_norm=(False, True, False)).eval()
    paths = [f"layers.{i}.mlp.down_proj" for i in range(3)]
    x = torch.randn(5, D)
    taps, notes = check_taps(model, find_taps(model, paths), (x, torch.zeros(5, D)))
    assert set(taps) == {"layers.0.mlp.down_proj", "layers.2.mlp.down_proj"}
    assert len(notes) == 1 and "layers.1" in notes[0] and "down_proj" in notes[0]


def setup(post_norm=(False, False, False), bias=False):
    torch.manual_seed(0)
    model = Stack(post_norm, bias).eval()
    program = fxprune.capture(model, (torch.randn(2, D),))
    dg = fxprune.dependency_graph(program)
    mlp = sorted((g for g in dg.prunable if g.units == HID), key=lambda g: g.id)
    assert len(mlp) == 3
    plan = Plan({g.id: list(range(0, HID, 2)) for g in mlp})  # half of every MLP
    return model, program, dg, plan


def inputs_of(model, paths, x):
    got = {}

    def grab(path):
        def hook(_m, args):
            got.setdefault(path, args[0].detach().double())  # returns None: the input stays as it is
        return hook

    hooks = [model.get_submodule(p).register_forward_pre_hook(grab(p)) for p in paths]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("bias", [False, True])
def test_corrected_refit_is_least_squares_to_the_dense_stream(bias):
    model, program, dg, plan = setup(bias=bias)
    calib = data()
    rw = apply_plan(program, dg, plan)
    rep = reconstruct(model, rw.model, program, dg, plan, calib, damp=1e-9)
    assert rep["residual_corrected"] == 3 and rep["notes"] == []
    # layer 1's down_proj: fit X'_K A^T to X W^T + (h - h_p), h = the stream entering its MLP
    x = torch.cat([b[0] for b in calib])
    paths = ["layers.1.post_attention_layernorm", "layers.1.mlp.down_proj"]
    dense, pruned = inputs_of(model, paths, x), inputs_of(rw.model, paths, x)
    w = model.layers[1].mlp.down_proj.weight.detach().double()
    target = dense[paths[1]] @ w.T + dense[paths[0]] - pruned[paths[0]]
    feats = pruned[paths[1]].numpy()
    if bias:  # the bias is refit as an intercept: it takes the drift's mean as well
        feats = np.concatenate([feats, np.ones((len(feats), 1))], 1)
    want, *_ = np.linalg.lstsq(feats, target.numpy(), rcond=None)
    down = rw.model.layers[1].mlp.down_proj
    np.testing.assert_allclose(down.weight.detach().double().numpy(), want[: HID // 2].T, rtol=1e-4, atol=1e-6)
    if bias:
        shift = down.bias.detach().double() - model.layers[1].mlp.down_proj.bias.detach().double()
        np.testing.assert_allclose(shift.numpy(), want[-1], rtol=1e-4, atol=1e-6)


def test_correction_brings_the_output_closer_to_the_dense_model():
    model, program, dg, plan = setup()
    calib, held = data(), data(seed=7)
    x = torch.cat([b[0] for b in held])
    with torch.no_grad():
        dense = model(x)
    err = {}
    for on in (False, True):
        rw = apply_plan(program, dg, plan)
        reconstruct(model, rw.model, program, dg, plan, calib, damp=0.1, residual_correction=on)
        with torch.no_grad():
            err[on] = float((rw.model(x) - dense).norm() / dense.norm())
    assert err[True] < err[False]


def test_unconfirmed_block_is_refit_as_before_and_reported():
    model, program, dg, plan = setup(post_norm=(False, True, False))
    calib = data()
    rw = apply_plan(program, dg, plan)
    rep = reconstruct(model, rw.model, program, dg, plan, calib, damp=1e-9)
    assert rep["residual_corrected"] == 2
    assert any("layers.1" in n for n in rep["notes"])
    # layer 1 (not confirmed): the plain refit, kept inputs against the dense layer output
    x = torch.cat([b[0] for b in calib])
    p = "layers.1.mlp.down_proj"
    dense, pruned = inputs_of(model, [p], x)[p], inputs_of(rw.model, [p], x)[p]
    w = model.layers[1].mlp.down_proj.weight.detach().double()
    want, *_ = np.linalg.lstsq(pruned.numpy(), (dense @ w.T).numpy(), rcond=None)
    np.testing.assert_allclose(rw.model.layers[1].mlp.down_proj.weight.detach().double().numpy(), want.T,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("importance", ["l2", "obs"])
def test_prune_reports_correction_and_can_turn_it_off(importance):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    calib = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(3))
    kw = dict(ratio=0.3, importance=importance, targets=("heads", "mlp"), calib=calib, reconstruct=True)
    on = fxprune.prune(model, {"input_ids": calib[:2]}, **kw)
    off = fxprune.prune(model, {"input_ids": calib[:2]}, residual_correction=False, **kw)
    assert on.report["reconstruct"]["residual_corrected"] == 4  # o_proj and down_proj of both layers
    assert off.report["reconstruct"]["residual_corrected"] == 0
    w_on = on.model.model.layers[1].mlp.down_proj.weight
    w_off = off.model.model.layers[1].mlp.down_proj.weight
    assert w_on.shape == w_off.shape and not torch.allclose(w_on, w_off)


def _tiny(arch):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=0, eos_token_id=0))
    if arch == "opt":  # flattens the stream to (tokens, hidden) before its MLP
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                                              word_embed_proj_dim=32))
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=64, head_dim=8))


@pytest.mark.parametrize("arch, corrected", [("gpt2", 4), ("opt", 4), ("gemma2", 0)])
def test_hf_layouts_are_confirmed_or_refused_on_data(arch, corrected):
    model = _tiny(arch).eval()
    calib = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(3))
    res = fxprune.prune(model, {"input_ids": calib[:2]}, ratio=0.3, importance="l2", targets=("heads", "mlp"),
                        calib=calib, reconstruct=True)
    rep = res.report["reconstruct"]
    assert rep["layers"] == 4 and rep["residual_corrected"] == corrected
    if corrected:
        assert rep["notes"] == []
    else:  # Gemma-2 norms each sub-block's output before the add: refit plainly, and said so
        assert len(rep["notes"]) == 2 and all("not a plain residual add" in n for n in rep["notes"])
        assert all(n in res.report["notes"] for n in rep["notes"])
