"""The CLI as a user runs it: exit codes, one-line errors, nothing written on failure."""

import json
import subprocess
import sys

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


def test_bad_ratio_is_one_line_exit_2(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dir), "--ratio", "1.5", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ratio" in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_missing_model_path(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nope"), "--quiet"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_unknown_importance(tiny_dir, capsys):
    assert main(["prune", str(tiny_dir), "--importance", "psychic", "--quiet"]) == 2
    assert "unknown importance" in capsys.readouterr().err


def test_existing_out_without_force(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", str(tiny_dir), "--ratio", "0.2", "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_layer_range_outside_model(tiny_dir, capsys):
    assert main(["prune", str(tiny_dir), "--layers", "3:29", "--quiet"]) == 2
    assert "layer range" in capsys.readouterr().err


def test_corrupt_weights(tiny_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["prune", str(bad), "--quiet"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_prune_save_reload_and_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dir), "--ratio", "0.3", "--targets", "heads,kv_heads,mlp",
                 "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # --json stdout is JSON only
    assert report["removed_fraction"] >= 0.3
    assert (out / "model.safetensors").exists() and (out / "fxprune.json").exists()
    import fxprune

    model, _ = fxprune.load(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]


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
