"""Perplexity of SmolLM2-135M with 20% of parameters removed, per importance pass.

Calibration: the first N x L tokens of ../shared/data/wikitext2_valid.txt; evaluation: 128-token
windows taken after a gap, never overlapping the calibration slice. Dense perplexity is measured
in the same run. One JSON line per setting. Skips cleanly when the data file is absent.

    python bench/quality.py [--importance l2,taylor-element1,...] [--targets mlp] [--windows 40]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2_valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--importance", default="l2,random,taylor-vector,taylor-element1,taylor-element2,taylor-mix,lora")
    ap.add_argument("--targets", default="mlp")
    ap.add_argument("--layers", default="3:29")
    ap.add_argument("--mode", default="local")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--calib-samples", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--recover-windows", type=int, default=0,
                    help="recovery data: this many windows after the evaluation slice (disjoint from both)")
    ap.add_argument("--recover-text", default="wikitext", choices=["wikitext", "pydoc"],
                    help="where --recover-windows come from: wikitext after the eval slice (in domain), "
                         "or CPython's pydoc topics (out of domain: no wikitext seen in recovery)")
    ap.add_argument("--extra", default="{}", help='more fxprune.prune kwargs as JSON, e.g. {"reconstruct": true}, or a list of such (one run each)')
    args = ap.parse_args()
    extras = json.loads(args.extra)
    extras = extras if isinstance(extras, list) else [extras]
    if not DATA.exists():
        print(json.dumps({"bench": "quality", "skipped": f"{DATA} not found"}))
        return

    import fxprune
    from fxprune.data import perplexity, token_windows

    model, tok = fxprune.load_model("smollm2-135m")
    text = DATA.read_text()
    gap = 20  # windows between calibration and evaluation
    n_eval_end = args.calib_samples + gap + args.windows
    allw = token_windows(tok, text, n_eval_end, args.seqlen)
    calib, evalw = allw[: args.calib_samples], allw[args.calib_samples + gap : n_eval_end]
    if args.recover_windows:
        from _common import recovery_windows

        rec = recovery_windows(tok, args.recover_windows, args.seqlen, args.recover_text, n_eval_end)
        extras = [{"recover_data": rec, **e} for e in extras]
    dense = perplexity(model, evalw)["ppl"]
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"bench": "quality", "method": "dense", "params": params, "ppl": round(dense, 3),
                      "eval_tokens": int(evalw.numel())}), flush=True)
    for imp, extra in [(i, e) for i in args.importance.split(",") for e in extras]:
        t0 = time.perf_counter()
        res = fxprune.prune(model, {"input_ids": calib[:2, :16]}, ratio=args.ratio, importance=imp,
                            targets=tuple(args.targets.split(",")), layers=args.layers, mode=args.mode,
                            calib=calib, **extra)
        wall = time.perf_counter() - t0
        ppl = perplexity(res.model, evalw)["ppl"]
        print(json.dumps({
            "bench": "quality", "method": f"fxprune-{imp}",
            "extra": {k: v for k, v in extra.items() if k != "recover_data"},
            "recover_windows": args.recover_windows, "recover_text": args.recover_text, "targets": args.targets, "mode": args.mode,
            "layers": args.layers, "params": res.report["params_after"],
            "removed": round(res.report["removed_fraction"], 4), "wall_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "ppl": round(ppl, 3), "ppl_ratio": round(ppl / dense, 3),
        }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
