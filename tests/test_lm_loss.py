"""The chunked LM-head loss (fxprune.lm_loss) against the model's own ``labels=`` loss.

The same loss value and the same gradients, for the decoder's parameters and for the head's
(tied) weight, whatever the chunk size; models whose logits are not ``head(decoder(ids))`` are
refused so the gradient passes keep the model's own loss for them.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from fxprune import lm_loss
from fxprune.lm_loss import linear_cross_entropy, lm_loss_fn

V = 64


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return tf.LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    if arch == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    # Gemma-2 soft-caps its logits after the head: not head(decoder(ids))
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=64, head_dim=8)).eval()


IDS = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))


def loss_and_grads(model, fn, params):
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)
    loss = fn(IDS)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in params]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("chunk", [7, 256])
def test_same_loss_and_gradients_as_the_model(arch, chunk, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK", chunk)  # 7: chunks that split windows and a short last one
    model = tiny(arch)
    fast = lm_loss_fn(model, IDS)
    assert fast is not None
    head = model.get_output_embeddings().weight
    inner = [p for n, p in model.named_parameters() if "1." in n and p.dim() == 2][0]  # a layer-1 matrix
    want_loss, want = loss_and_grads(model, lambda b: model(input_ids=b, labels=b, use_cache=False).loss, [inner, head])
    got_loss, got = loss_and_grads(model, fast, [inner, head])
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for w, g in zip(want, got):
        assert torch.allclose(w, g, rtol=1e-4, atol=1e-6)


def test_chunks_add_up_to_the_whole():
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (50,))
    want = torch.nn.functional.cross_entropy(h @ w.t(), t)
    gh, gw = torch.autograd.grad(want, (h, w))
    got = linear_cross_entropy(h, w, t, chunk=8)
    fh, fw = torch.autograd.grad(got * 3.0, (h, w))  # the incoming gradient scales both
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert torch.allclose(fh, 3 * gh, atol=1e-6) and torch.allclose(fw, 3 * gw, atol=1e-6)


def test_bf16_autocast_runs_the_head_in_bf16_close_to_the_model():
    model = tiny("llama")
    fast = lm_loss_fn(model, IDS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = float(model(input_ids=IDS, labels=IDS, use_cache=False).loss)
        got = float(fast(IDS))
    exact = float(fast(IDS).detach())
    assert got == pytest.approx(want, rel=2e-2)
    assert got != exact  # the autocast dtype reached the head's matmul


def test_models_it_cannot_reproduce_are_refused(monkeypatch):
    assert lm_loss_fn(tiny("gemma2"), IDS) is None  # logit soft-capping, named in its config
    capped = tiny("gemma2")
    capped.config.final_logit_softcapping = 0.5
    monkeypatch.setattr(lm_loss, "LOGIT_TRANSFORMS", ())
    assert lm_loss_fn(capped, IDS) is None  # the probe alone sees it too
    capped.config.final_logit_softcapping = None
    assert lm_loss_fn(capped, IDS) is not None  # Gemma's embedding scale is inside the decoder: fine
    assert lm_loss_fn(tiny("llama"), IDS[:, :1]) is None  # nothing to predict
    assert lm_loss_fn(torch.nn.Linear(4, 4), IDS) is None  # no LM head at all
