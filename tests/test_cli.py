"""The CLI as a user runs it: exit codes, one-line errors, nothing written on failure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxprune.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "fxprune.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _tokenizer():
    """A word-level tokenizer built in memory: no hub, no model package."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "a", "of", "cat", "sat"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer, and a calibration text for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tok")
    cfg = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    (d.parent / "calib.txt").write_text(" ".join(["the cat sat of a"] * 400))
    (d.parent / "short.txt").write_text("the cat sat")
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4)).save_pretrained(d)
    return d


def _files(d):
    """Every file under ``d`` with its bytes: to show a run changed nothing."""
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _bad_inputs(tmp, models):
    """(name, argv, words the one error line must hold: the problem and the fix)."""
    tiny, tok, bert = models
    (tmp / "badcfg").mkdir()
    (tmp / "badcfg" / "config.json").write_text("{oops")
    (tmp / "a_file").write_text("x")
    return {
        "ratio": ([str(tiny), "--ratio", "1.5"], ["--ratio", "between 0 and 1"]),
        "ratio-zero": ([str(tiny), "--ratio", "0"], ["--ratio", "between 0 and 1"]),
        "importance": ([str(tiny), "--importance", "psychic"], ["unknown importance 'psychic'", "choose one of"]),
        "aggregate": ([str(tiny), "--aggregate", "median"], ["unknown aggregate 'median'", "choose one of"]),
        "target": ([str(tiny), "--targets", "neurons"], ["unknown target kind 'neurons'", "choose from"]),
        "missing-model": ([str(tmp / "nope")], ["not found", "give an HF model directory"]),
        "not-a-model-dir": ([str(tmp)], ["no config.json", "give the directory"]),
        "unreadable-config": ([str(tmp / "badcfg")], ["config.json is unreadable", "replace it"]),
        "calib-too-short": ([str(tok), "--importance", "taylor-element1", "--calib", str(tok.parent / "short.txt")],
                            ["calibration text has 3 tokens", "longer text"]),
        "calib-missing": ([str(tok), "--importance", "taylor-element1", "--calib", str(tmp / "none.txt")],
                          ["cannot read text file", "readable plain-text file"]),
        "needs-tokenizer": ([str(tiny), "--importance", "taylor-element1"], ["no tokenizer", "need one"]),
        "nothing-prunable": ([str(bert), "--targets", "kv_heads"], ["nothing to prune", "choose --targets from"]),
        "layer-range": ([str(tiny), "--layers", "3:29"], ["layer range '3:29'", "layers 0..1"]),
        "layer-syntax": ([str(tiny), "--layers", "three"], ["layer range 'three'", "START:END"]),
        "out-is-a-file": ([str(tiny), "--out", str(tmp / "a_file")], ["is a file", "give a directory path"]),
    }


BAD = ["ratio", "ratio-zero", "importance", "aggregate", "target", "missing-model", "not-a-model-dir",
       "unreadable-config", "calib-too-short", "calib-missing", "needs-tokenizer", "nothing-prunable",
       "layer-range", "layer-syntax", "out-is-a-file"]


@pytest.mark.parametrize("name", BAD)
def test_user_error_is_one_line_with_the_fix(name, tiny_dir, tok_dir, bert_dir, tmp_path, capsys):
    argv, words = _bad_inputs(tmp_path, (tiny_dir, tok_dir, bert_dir))[name]
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    before = {d: _files(d) for d in (tiny_dir, tok_dir, bert_dir)}
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert main(["prune", *argv]) == 2  # progress on: it must not spill into the error
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fxprune:")]
    assert len(err) == 1, err
    assert err[0].startswith("fxprune: error: ") and "Traceback" not in err[0]
    for w in words:
        assert w in err[0], (w, err[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no output, no temp dir
    assert {d: _files(d) for d in before} == before  # the inputs are untouched


def test_errors_without_progress_are_exactly_one_line(tiny_dir, capsys):
    assert main(["prune", str(tiny_dir), "--aggregate", "median", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxprune: error: unknown aggregate")


def test_existing_out_without_force(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", str(tiny_dir), "--ratio", "0.2", "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_corrupt_weights(tiny_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["prune", str(bad), "--quiet", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "copy or download them again" in err[0]
    assert not (tmp_path / "out").exists()


def test_prune_save_reload_and_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    before = _files(tiny_dir)
    assert main(["prune", str(tiny_dir), "--ratio", "0.3", "--targets", "heads,kv_heads,mlp",
                 "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # --json stdout is JSON only ...
    for stage in ("loading", "capture", "rewrite", "verify", f"saving to {out}", "writing report.md"):
        assert stage in captured.err, stage  # ... while progress goes to stderr
    assert report["removed_fraction"] >= 0.3
    assert (out / "model.safetensors").exists() and (out / "fxprune.json").exists()
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert md.startswith("# fxprune report\n\n![kept width per layer](kept_width.png)\n")
    assert (out / "kept_width.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| parameters | {report['params_before']:,} | {report['params_after']:,} |" in md
    t = report["timings"]
    assert t["save_s"] > 0 and t["total_s"] >= t["save_s"] + t["capture_s"] and "| save |" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind
    assert _files(tiny_dir) == before
    import fxprune

    model, _ = fxprune.load(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]


def test_force_replaces_quietly_and_atomically(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old run")
    assert main(["prune", str(tiny_dir), "--out", str(out), "--force", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "parameters" in captured.out  # --quiet: no progress at all
    assert not (out / "old.txt").exists() and (out / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["fxprune.api.apply_plan", "fxprune.exporters.report.write_report"])
@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_leaves_nothing_half_written(where, existing, tiny_dir, tmp_path, capsys, monkeypatch):
    """Interrupted mid-prune or mid-save (after the weights are written): no output, no temp dir."""
    import importlib

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    module, name = where.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, interrupt)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    before = _files(tiny_dir)
    argv = ["prune", str(tiny_dir), "--out", str(out), "--quiet"] + (["--force"] if existing else [])
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert _files(out) == {Path("mine.txt"): b"keep me"}  # --force replaces only a finished run
    assert _files(tiny_dir) == before


def test_inspect_json(tiny_dir, tmp_path):
    js = tmp_path / "g.json"
    res = run("inspect", str(tiny_dir), "--json", str(js), "--quiet")
    assert res.returncode == 0, res.stderr
    data = json.loads(js.read_text())
    assert {"model", "params", "groups"} <= set(data)
    g = data["groups"][0]
    assert {"id", "kind", "layer", "units", "unit_size", "prunable", "reason", "members"} <= set(g)
    assert "mlp" in res.stdout and "pinned" in res.stdout


def test_debug_shows_traceback(tmp_path):
    res = run("prune", str(tmp_path / "nope"), "--debug", "--quiet")
    assert res.returncode == 2 and "Traceback" in res.stderr
    res = run("prune", str(tmp_path / "nope"), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_eval_prints_json_and_a_perplexity_bar(tok_dir, capsys):
    calib = tok_dir.parent / "calib.txt"
    assert main(["eval", str(tok_dir), "--text", str(calib), "--windows", "3", "--seqlen", "8", "--json"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["tokens"] == 3 * 7 and res["ppl"] > 1
    assert "perplexity over 3 x 8 tokens done: 3/3 window" in captured.err


def test_export_with_an_optimize_level(tiny_dir, tmp_path, capsys):
    import onnx

    from fxprune import cli
    from fxprune.exporters.onnx import OPTIMIZE_LEVELS

    assert cli.ONNX_OPTIMIZE == OPTIMIZE_LEVELS  # repeated in the CLI so --help stays light
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dir), "--ratio", "0.3", "--out", str(out), "--quiet", "--onnx",
                 "--onnx-optimize", "ort"]) == 0
    assert any(n.domain == "com.microsoft" for n in onnx.load(str(out / "model.onnx")).graph.node)
    capsys.readouterr()
    assert main(["export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--optimize", "none", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["max_abs_diff"] is not None and rep["max_abs_diff"] < 1e-3
    assert not any(n.domain == "com.microsoft" for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(out), "--onnx", str(tmp_path / "x.onnx"), "--optimize", "fast"])
    assert exc.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_of_a_saved_deep_model_stitches(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "deep")
    out = tmp_path / "out"
    assert main(["prune", str(tmp_path / "deep"), "--ratio", "0.3", "--mode", "global", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["capture"] == "stitched" and rep["max_abs_diff"] < 1e-4  # the saved plan and base config


@pytest.mark.parametrize("flag, corrected", [([], 4), (["--no-residual-correction"], 0)])
def test_reconstruct_residual_correction_flag(flag, corrected, tok_dir, capsys):
    calib = tok_dir.parent / "calib.txt"
    assert main(["prune", str(tok_dir), "--ratio", "0.3", "--targets", "heads,mlp", "--reconstruct",
                 "--calib", str(calib), "--calib-samples", "4", "--calib-seqlen", "8", "--json", "--quiet",
                 *flag]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reconstruct"]["residual_corrected"] == corrected  # o_proj and down_proj of both layers


def test_calib_generate_flag_adds_written_windows(tok_dir, capsys):
    calib = tok_dir.parent / "calib.txt"
    assert main(["prune", str(tok_dir), "--ratio", "0.3", "--importance", "obs", "--targets", "mlp",
                 "--calib", str(calib), "--calib-samples", "2", "--calib-seqlen", "20", "--calib-generate", "3",
                 "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"] == {"windows": 2, "generated": 3, "prompt_tokens": 16}
    assert report["timings"]["generate_s"] > 0


def test_recover_generate_flag_adds_written_recovery_windows(tok_dir, capsys):
    calib = tok_dir.parent / "calib.txt"
    assert main(["prune", str(tok_dir), "--ratio", "0.3", "--targets", "mlp", "--calib", str(calib),
                 "--calib-samples", "2", "--calib-seqlen", "20", "--recover-steps", "3", "--recover-generate", "3",
                 "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recovery"]["generated"] == 3 and report["recovery"]["rows"] == 5
    assert main(["prune", str(tok_dir), "--ratio", "0.3", "--targets", "mlp", "--calib", str(calib),
                 "--recover-generate", "3", "--quiet"]) == 2  # no --recover-steps
    assert "set recover_steps" in capsys.readouterr().err


def test_calib_generate_too_short_windows_is_a_user_error(tok_dir, capsys):
    calib = tok_dir.parent / "calib.txt"
    assert main(["prune", str(tok_dir), "--ratio", "0.3", "--importance", "obs", "--targets", "mlp",
                 "--calib", str(calib), "--calib-samples", "2", "--calib-seqlen", "8", "--calib-generate", "3",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "shorter than the windows (8)" in err and "Traceback" not in err
