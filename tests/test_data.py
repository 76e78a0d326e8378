"""Calibration text, token windows and perplexity."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxprune.data import calibration_text, perplexity, split_calib_eval, token_windows
from fxprune.errors import FxpruneError


class CharTokenizer:
    """One token per character: the ids are easy to predict."""

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [ord(c) % 251 for c in text]
        return {"input_ids": ([1] + ids) if add_special_tokens else ids}


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from fxprune.models import builtin_path

    return AutoTokenizer.from_pretrained(str(builtin_path("minilm-l6")), local_files_only=True)


# -- text ------------------------------------------------------------------------------------------


def test_default_text_is_long_english():
    text = calibration_text(None)
    assert len(text.encode()) > 100_000
    words = text.lower().split()
    assert words.count("the") > 1000 and sum(c.isascii() for c in text) / len(text) > 0.99


def test_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    assert calibration_text(str(f)) == "hello world\n"


@pytest.mark.parametrize("make", ["missing", "empty", "directory"])
def test_bad_text_file(tmp_path, make):
    f = tmp_path / "t.txt"
    if make == "empty":
        f.write_text("  \n")
    elif make == "directory":
        f.mkdir()
    with pytest.raises(FxpruneError, match="t.txt"):
        calibration_text(str(f))


# -- windows ---------------------------------------------------------------------------------------


def test_windows_shape_and_content():
    text = "abcdefghijklmnopqrstuvwxyz" * 10
    w = token_windows(CharTokenizer(), text, 3, 8)
    assert w.shape == (3, 8) and w.dtype == torch.long
    assert w.flatten().tolist() == [ord(c) for c in text[:24]]  # no special tokens, no overlap
    off = token_windows(CharTokenizer(), text, 2, 8, offset_tokens=5)
    assert off.flatten().tolist() == [ord(c) for c in text[5:21]]


def test_split_is_disjoint_calib_first():
    text = "".join(chr(ord("a") + i % 26) for i in range(500))
    calib, held = split_calib_eval(CharTokenizer(), text, 4, 10, 3)
    assert calib.shape == (4, 10) and held.shape == (3, 10)
    assert torch.equal(calib, token_windows(CharTokenizer(), text, 4, 10))
    assert torch.equal(held, token_windows(CharTokenizer(), text, 3, 10, offset_tokens=40))
    assert torch.cat([calib, held]).flatten().tolist() == [ord(c) for c in text[:70]]


def test_too_short_text():
    with pytest.raises(FxpruneError, match=r"has 50 tokens; 4 x 16 = 64 needed.*longer text"):
        token_windows(CharTokenizer(), "x" * 50, 4, 16)
    with pytest.raises(FxpruneError, match=r"has 50 tokens.*after the first 40"):
        token_windows(CharTokenizer(), "x" * 50, 1, 16, offset_tokens=40)
    with pytest.raises(FxpruneError, match=r"has 50 tokens; \(2 calibration \+ 2 evaluation\) x 16 = 64"):
        split_calib_eval(CharTokenizer(), "x" * 50, 2, 16, 2)
    with pytest.raises(FxpruneError, match="at least 1 window"):
        token_windows(CharTokenizer(), "x" * 50, 0, 16)


def test_large_text_prefix_equals_whole(minilm_tokenizer):
    """Tokenising a prefix of a long text gives the same ids as tokenising all of it."""
    text = calibration_text(None) * 3  # ~1.4 MB, so only a prefix is tokenised
    whole = minilm_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    w = token_windows(minilm_tokenizer, text, 8, 128, offset_tokens=1000)
    assert w.flatten().tolist() == whole[1000 : 1000 + 8 * 128]
    big = token_windows(minilm_tokenizer, text, 100, 1000)  # more than the first prefix holds
    assert big.flatten().tolist() == whole[:100_000]
    with pytest.raises(FxpruneError, match=f"has {len(whole)} tokens"):
        token_windows(minilm_tokenizer, text, len(whole) // 1000 + 1, 1000)


# -- perplexity ------------------------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def reference_ppl(logits, ids):
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def test_perplexity_matches_hand_computation():
    model = tiny_llama()
    ids = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    seen = []
    res = perplexity(model, ids, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert res["tokens"] == 5 * 11
    assert res["ppl"] == pytest.approx(reference_ppl(logits, ids), rel=1e-5)
    assert res["nll"] == pytest.approx(math.log(res["ppl"]), rel=1e-6)
    assert seen == [(2, 5), (4, 5), (5, 5)]
    # each window is scored on its own: batching does not change the result
    assert perplexity(model, ids, batch_size=5)["ppl"] == pytest.approx(res["ppl"], rel=1e-5)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_perplexity_of_plain_module_and_graph_module():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 32, (3, 9))
    with torch.no_grad():
        expected = reference_ppl(model(ids), ids)
    assert perplexity(model, ids)["ppl"] == pytest.approx(expected, rel=1e-5)
    gm = fx.symbolic_trace(model)
    assert perplexity(gm, ids, batch_size=1)["ppl"] == pytest.approx(expected, rel=1e-5)


def test_perplexity_restores_training_mode():
    model = TinyLM().train()
    perplexity(model, torch.zeros(2, 4, dtype=torch.long))
    assert model.training


def test_perplexity_needs_logits():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).eval()
    with pytest.raises(FxpruneError, match="no logits"):
        perplexity(model, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(FxpruneError, match="seqlen >= 2"):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long))


# -- self-written calibration windows --------------------------------------------------------------


def test_generate_windows_continue_the_prompts():
    from fxprune.data import generate_windows

    model = tiny_llama()
    calib = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    out = generate_windows(model, calib, 5, prompt_len=4, seed=7, batch=2)
    assert out.shape == (5, 20)
    # round robin over the windows; each later round takes the next prompt_len tokens as its prompt
    prompts = torch.stack([calib[0, :4], calib[1, :4], calib[2, :4], calib[0, 4:8], calib[1, 4:8]])
    assert torch.equal(out[:, :4], prompts)
    assert not torch.equal(out[:, 4:], calib[[0, 1, 2, 0, 1], 4:])  # the rest is the model's own
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    assert torch.equal(generate_windows(model, calib, 5, prompt_len=4, seed=7, batch=2), out)  # seeded
    assert not torch.equal(generate_windows(model, calib, 5, prompt_len=4, seed=8), out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_generate_windows_refuses_what_it_cannot_continue():
    from fxprune.data import generate_windows

    calib = torch.randint(0, 64, (2, 8))
    with pytest.raises(FxpruneError, match="causal LM with generate"):
        generate_windows(nn.Linear(4, 4), calib, 2)
    with pytest.raises(FxpruneError, match="shorter than the windows"):
        generate_windows(tiny_llama(), calib, 2, prompt_len=8)
    with pytest.raises(FxpruneError, match=">= 1"):
        generate_windows(tiny_llama(), calib, -1)
    for bad in ([{"input_ids": calib}], [calib, calib[:, :4]], []):  # not token windows of one width
        with pytest.raises(FxpruneError, match="tensor of token ids"):
            generate_windows(tiny_llama(), bad, 2)


def test_generate_windows_takes_a_list_of_batches_as_their_rows():
    from fxprune.data import generate_windows

    model = tiny_llama()
    calib = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate_windows(model, [calib[:1], calib[1:]], 4, prompt_len=4, seed=5),
                       generate_windows(model, calib, 4, prompt_len=4, seed=5))


def test_prune_with_written_windows():
    import fxprune

    model = tiny_llama()
    calib = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    res = fxprune.prune(model, {"input_ids": calib[:, :8]}, ratio=0.2, importance="obs", targets=("mlp",),
                        calib=calib, calib_generate=3, damp=1.0)
    assert res.report["calibration"] == {"windows": 2, "generated": 3, "prompt_tokens": 16}
    assert res.report["timings"]["generate_s"] > 0
    plain = fxprune.prune(model, {"input_ids": calib[:, :8]}, ratio=0.2, importance="obs", targets=("mlp",),
                          calib=calib, damp=1.0)
    assert "calibration" not in plain.report
    # the refit saw other windows, so the pruned weights differ
    w = dict(res.model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    w0 = dict(plain.model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    assert w.shape == w0.shape and not torch.allclose(w, w0)
    with pytest.raises(FxpruneError, match="pass calib"):
        fxprune.prune(model, ratio=0.2, calib_generate=3)


def test_generate_windows_first_continues_the_numbering():
    from fxprune.data import generate_windows

    model = tiny_llama()
    calib = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(4))
    whole = generate_windows(model, calib, 5, prompt_len=4, seed=5)
    assert torch.equal(generate_windows(model, calib, 5, prompt_len=4, seed=5, first=0), whole)
    later = generate_windows(model, calib, 3, prompt_len=4, seed=5, first=2)
    assert torch.equal(later[:, :4], whole[2:, :4])  # the prompts windows 2-4 take
    assert torch.equal(later[1:, :4], torch.stack([calib[0, 4:8], calib[1, 4:8]]))  # second round: next 4 tokens
    assert not torch.equal(later[:1, 4:], whole[2:3, 4:])  # another seed: not a resample of window 2
    with pytest.raises(FxpruneError, match="first must be >= 0"):
        generate_windows(model, calib, 2, prompt_len=4, first=-1)


def test_recovery_rows_shuffles_the_given_rows_with_the_written_ones():
    from fxprune.data import recovery_rows

    model = tiny_llama()
    calib = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(4))
    given = [calib[i : i + 1] for i in range(3)]
    rows = recovery_rows(model, calib, given, 5, first=3, seed=1)
    assert len(rows) == 8 and all(r.shape == (1, 20) for r in rows)
    kept = [r for r in rows if any(torch.equal(r, g) for g in given)]
    assert len(kept) == 3  # each given row once
    assert [i for i, r in enumerate(rows) if any(r is g for g in given)] != [0, 1, 2]  # spread, not first
    again = recovery_rows(model, calib, given, 5, first=3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(rows, again))


def test_prune_recovers_on_written_windows():
    import fxprune

    model = tiny_llama()
    calib = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxprune.prune(model, {"input_ids": calib[:, :8]}, ratio=0.2, targets=("mlp",), calib=calib,
                        calib_generate=1, recover_steps=6, recover_generate=4, distill=0.5)
    rec = res.report["recovery"]
    assert rec["generated"] == 4 and rec["rows"] == 2 + 1 + 4 and rec["rows_seen"] == 6
    assert res.report["timings"]["recover_generate_s"] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched
    for kwargs, msg in (({"recover_generate": 2}, "set recover_steps"),
                        ({"recover_generate": -1, "recover_steps": 2}, ">= 0 windows"),
                        ({"recover_generate": 2, "recover_steps": 2, "calib": None}, "pass calib"),
                        ({"recover_generate": 2, "recover_steps": 2, "calib": calib[:, :8]},
                         "recover_generate: prompt of 16 tokens")):
        with pytest.raises(FxpruneError, match=msg):
            fxprune.prune(model, {"input_ids": calib[:, :8]}, ratio=0.2, targets=("mlp",),
                          **{"calib": calib, **kwargs})
