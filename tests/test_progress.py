"""Progress: stage lines and bars on the given stream, silence when quiet, and prune() driving them."""

import io
import re
import time

import pytest
import torch

import fxprune
from fxprune.progress import Progress, as_progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_quiet_prints_nothing():
    out = io.StringIO()
    p = Progress(quiet=True, stream=out)
    p("capture")
    with p.task("loading"):
        pass
    with p.bar("importance", total=3) as bar:
        bar.update(3)
    assert list(p.iter([1, 2], "x")) == [1, 2]
    assert out.getvalue() == ""


def test_log_stream_gets_stage_lines_and_bar_summaries():
    out = io.StringIO()
    p = Progress(stream=out)  # a StringIO is no terminal: one line per event, no redraws
    p("capture")
    with p.bar("perplexity", total=4, unit="window") as bar:
        cb = p.callback(bar)
        cb(2, 4)
        cb(4, 4)
    assert list(p.iter(range(3), "steps")) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert all(re.match(r"\[ *\d+\.\ds\] ", ln) for ln in lines), lines
    assert lines[0].endswith("] capture")
    assert lines[1].endswith("] perplexity")
    assert re.search(r"perplexity done: 4/4 window in \d+\.\ds$", lines[2])
    assert re.search(r"steps done: 3/3 step in", lines[4])
    assert "\r" not in out.getvalue()


def test_terminal_draws_bars_and_a_ticking_clock():
    out = Tty()
    p = Progress(stream=out)
    assert p.live
    with p.bar("importance (taylor-element1)", total=5, unit="batch") as bar:
        for _ in range(5):
            bar.update()
    with p.task("capture"):
        time.sleep(0.6)  # long enough for the clock to redraw
    text = out.getvalue()
    assert "importance (taylor-element1)" in text and "5/5" in text and "100%" in text
    assert text.count("capture") >= 2  # drawn, then redrawn by the clock


def test_as_progress_accepts_none_bool_callable_and_progress():
    seen = []
    fwd = as_progress(seen.append)
    fwd("capture")
    with fwd.bar("importance", total=2) as bar:  # a bar is its stage name for a plain callable
        bar.update(2)
    assert seen == ["capture", "importance"]
    assert as_progress(None).quiet and as_progress(False).quiet
    assert not as_progress(True).quiet
    p = Progress(quiet=True)
    assert as_progress(p) is p
    with pytest.raises(TypeError, match="progress must be"):
        as_progress(3)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("importance, calib, steps", [
    ("taylor-element1", torch.randint(0, 64, (7, 12)), 2),  # batched: 5 windows a step (7 -> 5 + 2)
    ("taylor-element2", [torch.randint(0, 64, (2, 12))] * 2, 4),  # per sample: grows to the rows
])
def test_prune_drives_stage_lines_and_the_importance_bar(importance, calib, steps):
    out = io.StringIO()
    fxprune.prune(_tiny_llama(), ratio=0.2, importance=importance, calib=calib, progress=Progress(stream=out))
    text = out.getvalue()
    for stage in ("capture", "dependency graph", "select", "rewrite", "verify"):
        assert f"] {stage}\n" in text, (stage, text)
    assert re.search(rf"importance \({importance}\) done: {steps}/{steps} batch", text), text


def test_prune_accepts_a_plain_callable():
    seen = []
    fxprune.prune(_tiny_llama(), ratio=0.2, progress=seen.append)
    assert seen[:3] == ["capture", "dependency graph", "importance (l2)"]
