"""report.md / report.json / kept_width.png from a prune report."""

import json

import numpy as np
import pytest
import torch

import fxprune
from fxprune.exporters.graphs import KIND_COLORS
from fxprune.exporters.report import layer_widths, render_markdown, write_report


def _report(**extra):
    layers = {"model": {"hidden": {"kept": 24, "units": 32}}}
    for i in range(4):
        layers[str(i)] = {"heads": {"kept": 4 if i < 2 else 2, "units": 4}, "kv_heads": {"kept": 2, "units": 2},
                          "mlp": {"kept": 48 - 8 * i, "units": 48}}
    return {
        "params_before": 20000, "params_after": 14000, "removed_fraction": 0.3,
        "macs_before": 500000, "macs_after": 350000,
        "plan": {"importance": "taylor-element1", "ratio": 0.3, "targets": ["heads", "mlp"], "layers": None,
                 "mode": "local", "round_to": 1, "aggregate": "sum"},
        "groups": [], "layers": layers,
        "timings": {"capture_s": 2.0, "importance_s": 1.0, "rewrite_s": 0.5, "total_s": 3.5},
        "pinned_reasons": ["head_dim (heads are pruned whole)"], "unknown_ops": ["aten.weird.default"],
        "notes": ["a note"], **extra,
    }


def _rgb(hex_color):
    return np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]) / 255.0


def test_writes_markdown_json_and_picture(tmp_path):
    r = _report(ppl_before=20.0, ppl_after=25.0, eval_tokens=5080,
                onnx={"path": "/x/model.onnx", "opset": 20, "max_abs_diff": 3e-6, "verified_on": {"input_ids": [3, 23]}},
                recovery={"steps": 5, "loss_before": 3.0, "loss_after": 2.5})
    r["timings"]["eval_s"] = 1.5  # a stage the CLI adds after prune's total
    paths = write_report(r, tmp_path)
    assert set(paths) == {"md", "json", "png"}
    assert json.loads(paths["json"].read_text()) == r
    md = paths["md"].read_text()
    assert md.splitlines()[:3] == ["# fxprune report", "", "![kept width per layer](kept_width.png)"]
    for text in ("| parameters | 20,000 | 14,000 | 0.700 |", "| MACs (example input) | 500,000 | 350,000 | 0.700 |",
                 "| perplexity (5,080 held-out tokens) | 20.000 | 25.000 | 1.250 |",
                 "| importance | `taylor-element1` |", "| layers | `all` |", "| capture | 2.00 | 57% |",
                 "| model |  |  |  | **24/32** |", "| 2 | **2/4** | 2/2 | **32/48** |  |",
                 "`model.onnx` (opset 20)", "max |diff| vs torch = 3e-06", "- head_dim (heads are pruned whole)",
                 "- `aten.weird.default`", "- a note", "## Other results", '"loss_after": 2.5'):
        assert text in md, text
    assert "/x/" not in md  # the ONNX file is named relative to the report
    assert md.index("| eval | 1.50 |") < md.index("| **total** | 3.50 |")  # total is the last row

    from matplotlib.image import imread

    img = imread(paths["png"])[..., :3]
    assert img.shape[0] > 300 and img.shape[1] > 600
    for kind in ("heads", "kv_heads", "mlp", "hidden"):  # every series is drawn in its colour
        near = np.abs(img - _rgb(KIND_COLORS[kind])).max(axis=-1) < 0.05
        assert near.sum() > 50, kind


def test_sections_are_left_out_when_there_is_nothing_to_say(tmp_path):
    r = _report(unknown_ops=[], notes=[])
    md = render_markdown(r)
    assert "perplexity" not in md and "## ONNX" not in md and "## Notes" not in md
    assert "## Ops the rules don't know" not in md and "## Other results" not in md


def test_model_without_layers_has_no_picture(tmp_path):
    r = _report()
    r["layers"] = {"model": {"mlp": {"kept": 10, "units": 16}}}
    paths = write_report(r, tmp_path)
    assert "png" not in paths and not (tmp_path / "kept_width.png").exists()
    md = paths["md"].read_text()
    assert "![" not in md and "| model | **10/16** |" in md


def test_layer_widths_of_a_real_prune():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    result = fxprune.prune(LlamaForCausalLM(cfg).eval(), ratio=0.2, targets=("mlp",), layers="1:3")
    layers, per_kind = layer_widths(result.report)
    assert layers == [0, 1, 2]
    assert per_kind["mlp"][0] == (48, 48)  # outside the range: untouched
    assert per_kind["mlp"][1][0] < 48 and per_kind["mlp"][2][0] < 48
    assert all(v == (4, 4) for v in per_kind["heads"].values())
    md = render_markdown(result.report)
    assert f"| 1 | 4/4 | 2/2 | **{per_kind['mlp'][1][0]}/48** |" in md


def test_encoder_decoder_layers_are_labelled_by_stack_and_module(tmp_path):
    """BART numbers encoder and decoder layers from 0, and a decoder layer has two attentions: each
    gets its own line instead of overwriting another."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    result = fxprune.prune(BartForConditionalGeneration(cfg).eval(), ratio=0.3, targets=("heads", "mlp"))
    layers = result.report["layers"]
    assert {"encoder.0", "encoder.1", "decoder.0", "decoder.1"} <= set(layers)
    assert {"heads (self_attn)", "heads (encoder_attn)", "mlp"} <= set(layers["decoder.0"])
    assert {"heads", "mlp"} <= set(layers["encoder.1"])
    positions, per_kind = layer_widths(result.report)
    assert positions == [0, 1, 2, 3] and len(per_kind["mlp"]) == 4  # decoder.0, decoder.1, encoder.0, encoder.1
    assert "decoder.1" in render_markdown(result.report)
    assert write_report(result.report, tmp_path)["png"].exists()


@pytest.mark.parametrize("bad", [{"layers": {}}, {"layers": {"model": {}}}])
def test_empty_layers_still_renders(tmp_path, bad):
    paths = write_report(_report(**bad), tmp_path)
    assert "## Summary" in paths["md"].read_text()


def test_every_prunable_kind_is_drawn(tmp_path):
    """Each kind a report's layers may hold gets a label, a colour and a line (DeepSeek's 'rank'
    groups reached the picture without them and the report could not be written)."""
    from fxprune.depgraph import PRUNABLE_KINDS
    from fxprune.exporters.report import _STYLE, KIND_LABELS

    for kind in PRUNABLE_KINDS:
        assert kind in KIND_LABELS and kind in KIND_COLORS, kind
        assert kind == "hidden" or kind in _STYLE, kind
    r = _report()
    for i in range(4):
        r["layers"][str(i)]["rank"] = {"kept": 8 + i, "units": 16}
    paths = write_report(r, tmp_path)
    from matplotlib.image import imread

    img = imread(paths["png"])[..., :3]
    assert (np.abs(img - _rgb(KIND_COLORS["rank"])).max(axis=-1) < 0.05).sum() > 50
    assert "attention ranks" in paths["md"].read_text()
