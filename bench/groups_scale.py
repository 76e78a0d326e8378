"""Dependency groups of 7B- and 70B-shaped Llama configs on the meta device (no weights).

Each size runs in a fresh subprocess so peak RSS is its own. Prints one JSON line per model:
{"bench": "groups_scale", "model": ..., "params": ..., "groups": ..., "capture_s": ...,
 "groups_s": ..., "total_s": ..., "peak_rss_mb": ...}. Targets: 7B <= 30 s and 1 GB, 70B <= 120 s and 2 GB.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}


def run_one(name: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxprune

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[name]))
    ids = torch.zeros((2, 16), dtype=torch.long, device="meta")
    t1 = time.perf_counter()
    program = fxprune.capture(model, {"input_ids": ids})
    t2 = time.perf_counter()
    dg = fxprune.dependency_graph(program)
    t3 = time.perf_counter()
    kinds: dict[str, int] = {}
    for g in dg.prunable:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    return {
        "bench": "groups_scale", "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "groups": len(dg.groups), "prunable_by_kind": kinds,
        "build_s": round(t1 - t0, 2), "capture_s": round(t2 - t1, 2), "groups_s": round(t3 - t2, 2),
        "total_s": round(t3 - t0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(run_one(sys.argv[1])), flush=True)
        return
    for name in SHAPES:
        out = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(json.dumps({"bench": "groups_scale", "model": name, "error": out.stderr.strip()[-500:]}))
        else:
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
