"""Recovery (LLM-Pruner's LoRA fine-tuning, merged) and the CLI flags of the schedules."""

import json
import math

import pytest
import torch

import fxprune
from fxprune.api import run_model
from fxprune.cli import main
from fxprune.errors import FxpruneError
from fxprune.passes.recovery import linear_modules, recover

VOCAB = 64


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


X = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}
CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def loss_of(model, windows):
    """Mean next-token loss over the windows, computed here independently of fxprune."""
    with torch.no_grad():
        return sum(float(model(input_ids=w[None], labels=w[None], use_cache=False).loss) for w in windows) / len(windows)


@pytest.fixture(scope="module")
def pruned_pair():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"))
    rec = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"), calib=CALIB,
                        recover_steps=30, lr=1e-2)
    return model, state, plain, rec


def test_recovery_lowers_the_calibration_loss(pruned_pair):
    _, _, plain, rec = pruned_pair
    r = rec.report["recovery"]
    assert r["steps"] == 30 and r["lr"] == 1e-2 and r["rank"] == 8
    assert r["loss_before"] == pytest.approx(loss_of(plain.model, CALIB), rel=1e-5)
    assert r["loss_after"] == pytest.approx(loss_of(rec.model, CALIB), rel=1e-5)
    assert r["loss_after"] < r["loss_before"] - 0.05
    assert rec.report["timings"]["recovery_s"] > 0
    # 7 linears per layer (q, k, v, o, gate, up, down) in 2 layers; lm_head is outside the layers
    assert r["adapted_layers"] == 14


def test_recovery_leaves_no_lora_and_the_same_shapes(pruned_pair):
    _, _, plain, rec = pruned_pair
    assert rec.plan.keep == plain.plan.keep
    shapes = {n: p.shape for n, p in rec.model.named_parameters()}
    assert shapes == {n: p.shape for n, p in plain.model.named_parameters()}
    assert not any("lora" in n for n, _ in rec.model.named_modules())
    assert "peft_config" not in rec.model.__dict__
    assert rec.report["params_after"] == plain.report["params_after"]
    assert all(p.requires_grad for p in rec.model.parameters())
    assert all(p.grad is None for p in rec.model.parameters())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(rec.model.named_parameters())[q], dict(plain.model.named_parameters())[q])


def test_recovery_does_not_touch_the_users_model(pruned_pair):
    model, state, _, _ = pruned_pair
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert "peft_config" not in model.__dict__
    assert not any("lora" in n for n, _ in model.named_modules())


def test_recovered_graph_agrees_saves_reloads_and_exports(pruned_pair, tmp_path):
    _, _, plain, rec = pruned_pair
    x = {"input_ids": torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(4))}
    got = run_model(rec.model, x)
    assert torch.allclose(run_model(rec.graph_module, x), got, atol=1e-5)
    assert not torch.allclose(run_model(plain.model, x), got, atol=1e-3)  # recovery did change it
    fxprune.save(rec, tmp_path / "out")
    model2, _ = fxprune.load(tmp_path / "out")
    assert torch.allclose(run_model(model2, x), got, atol=1e-5)
    assert fxprune.export_onnx(rec, tmp_path / "m.onnx")["max_abs_diff"] < 1e-3


def test_recovery_after_iterative_and_with_a_replayed_plan(pruned_pair):
    _, _, plain, _ = pruned_pair
    res = fxprune.prune(tiny_llama(), X, calib=CALIB, plan=plain.plan, recover_steps=3)
    assert res.report["recovery"]["steps"] == 3 and "iterative" not in res.report
    res = fxprune.prune(tiny_llama(), X, ratio=0.2, targets=("mlp",), calib=CALIB, iterative=True,
                        steps=2, prune_every=1, recover_steps=2)
    assert {"iterative", "recovery"} <= set(res.report)
    assert torch.allclose(run_model(res.model, X), run_model(res.graph_module, X), atol=1e-5)


def test_recovery_needs_calibration_and_an_eager_module():
    with pytest.raises(FxpruneError, match="calibration"):
        fxprune.prune(tiny_llama(), X, ratio=0.2, recover_steps=2)
    gm = fxprune.capture(tiny_llama(), X).exported.module()
    with pytest.raises(FxpruneError, match="eager module"):
        recover(gm, [CALIB[:1]], steps=1)


def test_linear_modules_skip_tied_and_outside_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    names = linear_modules(tied)
    assert "lm_head" not in names and len(names) == 7
    assert linear_modules(tied, {"model.layers.0.mlp.up_proj.weight"}) == ["model.layers.0.mlp.up_proj"]


# -- CLI -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir_with_tokenizer(tmp_path_factory):
    """A tiny Llama with a character-level tokenizer (63 symbols + [UNK]) saved as an HF directory."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(" etaoinshrdlucmfwypvbgkjqxz.,ETAOINSHRDLCMFWYPBG0123456789()")
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars[:VOCAB - 1])}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    d = tmp_path_factory.mktemp("tiny_tok")
    tiny_llama().save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(d)
    text = d / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, 1234 times (twice).\n" * 40)
    return d, text


def test_cli_iterative_and_recovery_flags(tiny_dir_with_tokenizer, tmp_path, capsys):
    d, text = tiny_dir_with_tokenizer
    out = tmp_path / "out"
    code = main(["prune", str(d), "--ratio", "0.2", "--targets", "mlp", "--iterative", "--steps", "4",
                 "--prune-every", "2", "--ema", "0.5", "--recover-steps", "3", "--lr", "1e-3",
                 "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "16",
                 "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["importance"] == "lora" and report["plan"]["ema"] == 0.5
    assert [h["step"] for h in report["iterative"]] == [2, 4]
    assert report["recovery"]["steps"] == 3 and report["recovery"]["lr"] == 1e-3
    assert report["removed_fraction"] >= 0.2
    model2, tok2 = fxprune.load(out)
    assert tok2 is not None and model2.model.layers[0].mlp.up_proj.weight.shape[0] < 48


@pytest.mark.parametrize("flags,match", [(["--iterative", "--ema", "1.5"], "ema must be in"),
                                         (["--iterative", "--steps", "0"], "steps must be"),
                                         (["--recover-steps", "-2"], "recover_steps must be")])
def test_cli_bad_schedule_values_exit_2(tiny_dir_with_tokenizer, tmp_path, capsys, flags, match):
    d, text = tiny_dir_with_tokenizer
    out = tmp_path / "out"
    assert main(["prune", str(d), "--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "8",
                 "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not out.exists()


# -- one real-model check --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_short_recovery():
    """SmolLM2-135M (tied embeddings): 3 recovery steps on 2 x 32 tokens lower the loss, leave no LoRA."""
    from fxprune.data import calibration_text, token_windows

    model, tok = fxprune.load_model("smollm2-135m")
    calib = token_windows(tok, calibration_text(None), 2, 32)
    res = fxprune.prune(model, ratio=0.1, importance="l2", targets=("mlp",), layers="3:29", calib=calib,
                        recover_steps=3, lr=1e-3, tokenizer=tok)
    r = res.report["recovery"]
    assert r["adapted_layers"] == 30 * 7  # every layer's q k v o gate up down; never the tied lm_head
    assert r["loss_after"] < r["loss_before"]
    assert not any("lora" in n for n, _ in res.model.named_parameters())
    assert res.model.lm_head.weight is res.model.model.embed_tokens.weight
    x = {"input_ids": calib[:, :16]}
    assert torch.allclose(run_model(res.model, x), run_model(res.graph_module, x), atol=1e-4)


def test_cli_reconstruct_flag(tiny_dir_with_tokenizer, tmp_path, capsys):
    d, text = tiny_dir_with_tokenizer
    out = tmp_path / "out"
    code = main(["prune", str(d), "--ratio", "0.2", "--targets", "heads,mlp", "--reconstruct", "--damp", "0.5",
                 "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "16", "--out", str(out),
                 "--json", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rec = report["reconstruct"]
    assert rec["layers"] > 0 and rec["damp"] == 0.5 and rec["rel_error_after"] < rec["rel_error_before"]
    model2, _ = fxprune.load(out)
    assert sum(p.numel() for p in model2.parameters()) == report["params_after"]
    assert main(["prune", str(d), "--reconstruct", "--damp", "0", "--calib", str(text), "--calib-samples", "2",
                 "--calib-seqlen", "8", "--quiet"]) == 2
    assert "damping must be > 0" in capsys.readouterr().err


def test_recovery_on_separate_data(pruned_pair):
    model, _, plain, _ = pruned_pair
    other = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(9))
    rec = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"), calib=CALIB,
                        recover_steps=6, lr=1e-2, recover_data=other)
    r = rec.report["recovery"]
    # the recovery losses are measured on recover_data, not on calib
    assert r["loss_before"] == pytest.approx(loss_of(plain.model, other), rel=1e-4)
    assert r["loss_after"] == pytest.approx(loss_of(rec.model, other), rel=1e-4)
    assert r["loss_after"] < r["loss_before"]


def test_recovery_loss_measured_on_first_rows(pruned_pair, monkeypatch):
    # a large recover_data must not cost two full passes over it just to report the losses
    from fxprune.passes import recovery

    monkeypatch.setattr(recovery, "LOSS_ROWS", 4)
    model, _, plain, _ = pruned_pair
    other = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(9))
    rec = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"), calib=CALIB,
                        recover_steps=6, lr=1e-2, recover_data=other)
    r = rec.report["recovery"]
    assert r["loss_rows"] == 4
    assert r["loss_before"] == pytest.approx(loss_of(plain.model, other[:4]), rel=1e-4)
    assert r["loss_after"] == pytest.approx(loss_of(rec.model, other[:4]), rel=1e-4)
    assert r["loss_before"] != pytest.approx(loss_of(plain.model, other), rel=1e-6)


def kl_to_teacher(student, teacher, windows):
    """Mean per-position KL(teacher || student), computed here independently of fxprune."""
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=windows, use_cache=False).logits, -1)
        s = torch.log_softmax(student(input_ids=windows, use_cache=False).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_distillation_recovery_moves_towards_the_dense_model():
    model = tiny_llama()
    with torch.no_grad():  # a random tiny model predicts near-uniformly: sharpen it, as trained ones are
        model.lm_head.weight.mul_(20)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"))
    rec = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"), calib=CALIB,
                        recover_steps=30, lr=3e-3, distill=True)
    r = rec.report["recovery"]
    assert r["loss"] == "distill"
    assert kl_to_teacher(rec.model, model, CALIB) < 0.8 * kl_to_teacher(plain.model, model, CALIB)
    assert rec.plan.keep == plain.plan.keep
    # the teacher (the user's model) is only read
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_mixed_distill_loss_is_the_weighted_sum():
    """weight * KL(teacher || student) + (1 - weight) * next-token cross-entropy, from one student pass."""
    from fxprune.passes.recovery import distill_loss

    teacher, student = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = CALIB[:2]
    with torch.no_grad():
        ce = float(student(input_ids=batch, labels=batch, use_cache=False).loss)
        kl = kl_to_teacher(student, teacher, batch)
        for w in (0.0, 0.25, 1.0):
            got = float(distill_loss(student, batch, teacher=teacher, weight=w))
            assert got == pytest.approx(w * kl + (1 - w) * ce, rel=1e-5), w
    assert kl > 0 and ce > 0


def test_partial_distill_recovery_and_bad_weight():
    model = tiny_llama()
    rec = fxprune.prune(model, X, ratio=0.3, importance="l2", calib=CALIB, recover_steps=3, distill=0.5)
    assert rec.report["recovery"]["loss"] == "distill 0.5 + calibration 0.5"
    with pytest.raises(FxpruneError, match="distill weight must be between 0"):
        fxprune.prune(model, X, ratio=0.3, importance="l2", calib=CALIB, recover_steps=3, distill=1.5)


def test_distill_needs_recovery_steps():
    with pytest.raises(FxpruneError, match="distill is a recovery loss"):
        fxprune.prune(tiny_llama(), X, ratio=0.3, importance="l2", calib=CALIB, distill=True)


def test_cli_distill_flag(tiny_dir_with_tokenizer, tmp_path, capsys):
    d, text = tiny_dir_with_tokenizer
    out = tmp_path / "out"
    assert main(["prune", str(d), "--ratio", "0.3", "--calib", str(text), "--calib-samples", "2",
                 "--calib-seqlen", "8", "--recover-steps", "3", "--distill", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "report.json").read_text())["recovery"]["loss"] == "distill"
    common = ["prune", str(d), "--ratio", "0.3", "--calib", str(text), "--calib-samples", "2",
              "--calib-seqlen", "8", "--recover-steps", "2", "--quiet"]
    assert main([*common, "--distill", "0.5", "--out", str(tmp_path / "half")]) == 0
    assert json.loads((tmp_path / "half" / "report.json").read_text())["recovery"]["loss"] == \
        "distill 0.5 + calibration 0.5"
    capsys.readouterr()
    assert main([*common, "--distill", "2", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fxprune: error: distill weight must be between 0") and not (tmp_path / "bad").exists()


def test_cli_recover_text_flag(tiny_dir_with_tokenizer, tmp_path, capsys):
    d, text = tiny_dir_with_tokenizer
    other = tmp_path / "other.txt"
    other.write_text("a wholly different text about something else entirely. " * 40)
    common = ["prune", str(d), "--ratio", "0.3", "--calib", str(text), "--calib-samples", "2",
              "--calib-seqlen", "8", "--recover-steps", "2", "--quiet"]
    assert main([*common, "--recover-text", str(other), "--recover-samples", "3", "--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())["recovery"]
    assert main([*common, "--recover-samples", "3", "--out", str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b" / "report.json").read_text())["recovery"]
    assert a["loss_rows"] == b["loss_rows"] == 3
    # same pruned model, different recovery windows: the measured starting loss differs
    assert a["loss_before"] != pytest.approx(b["loss_before"], rel=1e-6)
    capsys.readouterr()
    assert main([*common, "--recover-text", str(other), "--out", str(tmp_path / "c")]) == 2
    assert "--recover-text needs" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert main([*common, "--recover-text", str(tmp_path / "missing.txt"), "--recover-samples", "2",
                 "--out", str(tmp_path / "d")]) == 2
    assert "cannot read text file" in capsys.readouterr().err


def test_cosine_recovery_schedule_decays_the_learning_rate(monkeypatch):
    from fxprune.passes import recovery as rec_mod

    seen = []
    real_step = torch.optim.AdamW.step

    def spying_step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spying_step)
    model = tiny_llama()
    res = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"), calib=CALIB,
                        recover_steps=4, lr=1e-2, recover_schedule="cosine")
    assert res.report["recovery"]["schedule"] == "cosine"
    assert seen == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])
    assert res.report["recovery"]["loss_after"] < res.report["recovery"]["loss_before"]
    with pytest.raises(FxpruneError, match="unknown learning-rate schedule 'linear'"):
        fxprune.prune(model, X, ratio=0.3, importance="l2", calib=CALIB, recover_steps=2, recover_schedule="linear")
    with pytest.raises(FxpruneError, match="unknown learning-rate schedule"):
        rec_mod.finetune(model, [], [CALIB[:1]], 1, 1e-3, schedule="step")


def test_cli_recover_schedule_flag(tiny_dir_with_tokenizer, tmp_path):
    d, text = tiny_dir_with_tokenizer
    out = tmp_path / "out"
    assert main(["prune", str(d), "--ratio", "0.3", "--calib", str(text), "--calib-samples", "2",
                 "--calib-seqlen", "8", "--recover-steps", "2", "--recover-schedule", "cosine",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "report.json").read_text())["recovery"]["schedule"] == "cosine"


def test_recover_batch_stacks_windows_and_reports_the_windows_used(pruned_pair, monkeypatch):
    from fxprune.passes import recovery as rec_mod

    shapes = []
    real_loss = rec_mod.calibration_loss

    def spying_loss(model, batch):
        if torch.is_grad_enabled():  # a training step, not the before/after measurement
            shapes.append(tuple(batch.shape))
        return real_loss(model, batch)

    monkeypatch.setattr(rec_mod, "calibration_loss", spying_loss)
    model, _, _, _ = pruned_pair
    other = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(9))
    # 2 steps x 2 windows: the first four of the six windows, two per step, and a note about the rest
    res = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"), calib=CALIB,
                        recover_steps=2, lr=1e-2, recover_data=other, recover_batch=2)
    r = res.report["recovery"]
    assert shapes == [(2, 16), (2, 16)]
    assert (r["batch"], r["rows"], r["rows_seen"]) == (2, 6, 4)
    assert any("recovery trained on 4 of its 6 windows" in n for n in res.report["notes"])
    shapes.clear()
    # 3 steps x 2 windows see all six: no note
    res = fxprune.prune(model, X, ratio=0.3, importance="l2", targets=("heads", "mlp"), calib=CALIB,
                        recover_steps=3, lr=1e-2, recover_data=other, recover_batch=2)
    assert shapes == [(2, 16)] * 3 and res.report["recovery"]["rows_seen"] == 6
    assert not any("recovery trained on" in n for n in res.report["notes"])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(FxpruneError, match="recovery batch must be a positive number"):
            fxprune.prune(model, X, ratio=0.3, importance="l2", calib=CALIB, recover_steps=2, recover_batch=bad)


def test_cli_recover_batch_flag(tiny_dir_with_tokenizer, tmp_path, capsys):
    d, text = tiny_dir_with_tokenizer
    common = ["prune", str(d), "--ratio", "0.3", "--calib", str(text), "--calib-samples", "2",
              "--calib-seqlen", "8", "--recover-steps", "2", "--recover-samples", "4", "--quiet"]
    assert main([*common, "--recover-batch", "2", "--out", str(tmp_path / "a")]) == 0
    r = json.loads((tmp_path / "a" / "report.json").read_text())["recovery"]
    assert (r["batch"], r["rows"], r["rows_seen"]) == (2, 4, 4)
    assert main([*common, "--recover-batch", "0", "--out", str(tmp_path / "b")]) == 2
    assert "recovery batch must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
