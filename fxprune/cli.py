"""Command line: ``fxprune inspect | prune | eval | export``.

User errors (:class:`FxpruneError`) print one line and exit with code 2; ``--debug`` shows the
traceback. Progress goes to stderr, so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from .errors import FxpruneError
from .progress import Progress

DEFAULT_MODEL = "smollm2-135m"
PRECISION_NAMES = {"fp32": "float32", "bf16": "bfloat16"}  # --precision -> prune(precision=)


_Say = Progress  # stage lines and bars on stderr, silent with --quiet (see fxprune/progress.py)

# fxprune.exporters.onnx.OPTIMIZE_LEVELS, repeated so that --help does not import torch (a test checks)
ONNX_OPTIMIZE = ("none", "light", "full", "ort")
ONNX_OPTIMIZE_HELP = ("ONNX graph optimization: light (default: folding and clean-up), full (onnxscript's "
                      "whole optimizer), ort (light + fusions into onnxruntime contrib ops: faster in "
                      "onnxruntime, runs only there), none")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _load(spec: str, say: _Say):
    from .models import load_model

    with say.task(f"loading {spec}"):
        return load_model(spec)


# -- inspect ---------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace, say: _Say) -> int:
    from .capture import capture
    from .depgraph import dependency_graph, summarize
    from .models import example_inputs, model_from_config

    if args.config:
        say(f"building {args.config} on the meta device")
        model, tok, name = model_from_config(args.config), None, args.config
    else:
        model, tok = _load(args.model, say)
        name = args.model
    with say.task("capture"):
        program = capture(model, example_inputs(model, tok))
    say("dependency graph")
    dg = dependency_graph(program)
    data = dg.to_json(name)
    summary = summarize(dg)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    if args.graphml or args.dot or args.png or args.svg:
        from .exporters import graphs

        if args.graphml:
            graphs.write_graphml(dg, args.graphml)
        if args.dot:
            graphs.write_dot(dg, args.dot, layer=args.layer)
        for pic in (args.png, args.svg):
            if pic:
                graphs.draw_groups(dg, pic, layer=args.layer if args.layer is not None else 0)
    if args.json == "-":
        return 0
    print(format_groups(data, summary))
    return 0


def format_groups(data: dict[str, Any], summary: dict[str, Any]) -> str:
    """The inspect table and summary as text."""
    rows = [("kind", "layer", "units x size", "status", "members")]
    for g in data["groups"]:
        status = "prunable" if g["prunable"] else f"pinned: {g['reason']}"
        mem = ", ".join(_short(m) for m in g["members"][:4])
        if len(g["members"]) > 4:
            mem += f", ... ({len(g['members'])} in all)"
        units = f"{g['units']} x {g['unit_size']}"
        if g.get("units_per_kv_head"):
            units += f" ({g['units'] // g['units_per_kv_head']} kv x {g['units_per_kv_head']} q heads)"
        rows.append((g["kind"], "-" if g["layer"] is None else str(g["layer"]), units, status, mem))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines.append("")
    lines.append(f"model {data['model']}: {summary['params']:,} parameters")
    for kind, k in sorted(summary["kinds"].items()):
        lines.append(f"  {kind:9s} {k['groups']:4d} groups, {k['prunable']:4d} prunable, "
                     f"{k['params']:,} parameters in prunable groups")
    if summary["unknown_ops"]:
        lines.append("ops the rules don't know (their dims are pinned):")
        lines.extend(f"  {u}" for u in summary["unknown_ops"])
    return "\n".join(lines)


def _short(member: dict[str, Any]) -> str:
    alias = f" (= {', '.join(member['aliases'])})" if member.get("aliases") else ""
    return f"{member['param']}:{member['dim']}{alias}"


# -- prune -----------------------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace, say: _Say) -> int:
    from . import api
    from .data import calibration_text, split_calib_eval, token_windows
    from .plan import Plan

    if not 0.0 < args.ratio < 1.0 and not args.plan:
        raise FxpruneError(f"--ratio must be between 0 and 1 (exclusive), got {args.ratio}")
    from .checkpoint import check_destination

    out = check_destination(args.out, args.force) if args.out else None  # fail before the long work
    from .passes.importance import IMPORTANCES, NEEDS_DATA

    if args.importance is not None and args.importance not in IMPORTANCES:
        raise FxpruneError(f"unknown importance '{args.importance}'; choose one of {', '.join(sorted(IMPORTANCES))}")
    if args.recover_text is not None and (args.recover_steps <= 0 or args.recover_samples <= 0):
        raise FxpruneError("--recover-text needs --recover-steps N and --recover-samples M (windows of that text)")
    model, tok = _load(args.model, say)
    calib = eval_windows = recover_data = None
    # iterative pruning and recovery fine-tune on the calibration text
    needs_text = (args.importance in NEEDS_DATA or args.eval or args.iterative or args.recover_steps > 0
                  or args.reconstruct or args.calib_generate or args.recover_generate)
    if needs_text and tok is None:
        raise FxpruneError(f"{args.model} has no tokenizer; calibration and --eval need one")
    if needs_text:
        text = calibration_text(args.calib)
        if args.eval:
            calib, eval_windows = split_calib_eval(tok, text, args.calib_samples, args.calib_seqlen, args.eval_windows)
        else:
            calib = token_windows(tok, text, args.calib_samples, args.calib_seqlen)
        if args.recover_text is not None:  # another text: its first windows
            recover_data = token_windows(tok, calibration_text(args.recover_text), args.recover_samples,
                                         args.calib_seqlen)
        elif args.recover_samples:  # after the calibration and evaluation windows: disjoint from both
            used = (args.calib_samples + (args.eval_windows if args.eval else 0)) * args.calib_seqlen
            recover_data = token_windows(tok, text, args.recover_samples, args.calib_seqlen, offset_tokens=used)
    plan = Plan.load(args.plan) if args.plan else None
    result = api.prune(
        model, ratio=args.ratio, importance=args.importance, targets=_split(args.targets),
        layers=args.layers, mode=args.mode, round_to=args.round_to, aggregate=args.aggregate,
        depth_profile=args.depth_profile, calib=calib, plan=plan, tokenizer=tok, lora_rank=args.lora_rank, progress=say,
        iterative=args.iterative, steps=args.steps, prune_every=args.prune_every, ema=args.ema,
        recover_steps=args.recover_steps, lr=args.lr, reconstruct=args.reconstruct, damp=args.damp,
        refit_all=args.refit_all, residual_correction=not args.no_residual_correction, distill=args.distill,
        recover_schedule=args.recover_schedule, precision=PRECISION_NAMES[args.precision],
        recover_data=recover_data, recover_batch=args.recover_batch, calib_generate=args.calib_generate,
        recover_generate=args.recover_generate,
    )
    report = result.report
    if eval_windows is not None:
        _evaluate(report, model, result.model, eval_windows, say)
    if out is not None:
        _write_outputs(result, out, args, say)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(format_report(report))
    return 0


def _evaluate(report: dict[str, Any], dense: Any, pruned: Any, windows: Any, say: _Say) -> None:
    """Perplexity before/after on the held-out windows, with a bar each."""
    from .data import perplexity

    t = time.perf_counter()
    for key, model, name in (("ppl_before", dense, "dense"), ("ppl_after", pruned, "pruned")):
        with say.bar(f"perplexity ({name})", total=int(windows.shape[0]), unit="window") as bar:
            report[key] = perplexity(model, windows, progress=say.callback(bar))["ppl"]
    report["eval_tokens"] = int(windows.numel())
    _add_time(report, "eval_s", time.perf_counter() - t)


def _write_outputs(result: Any, out: Path, args: argparse.Namespace, say: _Say) -> None:
    """Model, ONNX and report all go into one temp dir, moved to ``out`` only when complete."""
    from .checkpoint import save
    from .exporters.report import write_report

    report = result.report
    t0 = time.perf_counter()

    def also(tmp: Path) -> None:  # runs once the model files are in tmp
        _add_time(report, "save_s", time.perf_counter() - t0)
        if args.onnx:
            from .exporters.onnx import export_onnx

            t = time.perf_counter()
            with say.task("exporting ONNX"):
                report["onnx"] = export_onnx(result, str(tmp / "model.onnx"), optimize=args.onnx_optimize)
            report["onnx"]["path"] = str(out / "model.onnx")  # where it lives once moved into place
            _add_time(report, "onnx_s", time.perf_counter() - t)
        say("writing report.md, report.json, kept_width.png")
        write_report(report, tmp)

    say(f"saving to {out}")
    save(result, out, force=args.force, also=also, max_shard_size=args.max_shard_size)


def _add_time(report: dict[str, Any], key: str, seconds: float) -> None:
    """A CLI stage's time in the report; ``total_s`` stays the sum of all stages."""
    t = report.setdefault("timings", {})
    t[key] = seconds
    t["total_s"] = t.get("total_s", 0.0) + seconds


def format_report(r: dict[str, Any]) -> str:
    from .depgraph import layer_sort_key

    lines = [f"parameters {r['params_before']:,} -> {r['params_after']:,} "
             f"({r['removed_fraction']:.1%} removed)"]
    if r.get("macs_before") and r.get("macs_after"):
        lines.append(f"MACs (example input) {r['macs_before']:,} -> {r['macs_after']:,}")
    if r.get("recovery"):
        rec = r["recovery"]
        lines.append(f"recovery: loss {rec['loss_before']:.4f} -> {rec['loss_after']:.4f} on its first "
                     f"{rec.get('loss_rows', '?')} windows ({rec['steps']} LoRA steps, merged)")
    if "ppl_before" in r:
        lines.append(f"perplexity {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} "
                     f"({r['ppl_after'] / r['ppl_before']:.2f}x) on {r['eval_tokens']:,} held-out tokens")
    if r.get("onnx"):
        lines.append(f"ONNX {r['onnx'].get('path')} (max |diff| vs torch {r['onnx'].get('max_abs_diff', 0):.2g})")
        lines += [f"note: {n}" for n in r["onnx"].get("notes", [])]
    per = []
    for layer, kinds in sorted(r["layers"].items(), key=lambda kv: layer_sort_key(kv[0])):
        parts = [f"{k} {v['kept']}/{v['units']}" for k, v in kinds.items() if v["kept"] != v["units"]]
        if parts:
            per.append(f"  layer {layer}: " + ", ".join(parts))
    if per:
        lines.append("kept units:")
        lines.extend(per)
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    t = r.get("timings", {})
    lines.append("time: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items()))
    return "\n".join(lines)


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


# -- eval / export ---------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace, say: _Say) -> int:
    from .data import calibration_text, perplexity, token_windows

    model, tok = _load(args.model, say)
    if tok is None:
        raise FxpruneError(f"{args.model} has no tokenizer to evaluate with")
    text = calibration_text(args.text)
    windows = token_windows(tok, text, args.windows, args.seqlen)
    with say.bar(f"perplexity over {args.windows} x {args.seqlen} tokens", total=args.windows, unit="window") as bar:
        res = perplexity(model, windows, progress=say.callback(bar))
    res["params"] = sum(p.numel() for p in model.parameters())
    if args.json:
        print(json.dumps(res))
    else:
        print(f"perplexity {res['ppl']:.3f} over {res['tokens']:,} tokens ({res['params']:,} parameters)")
    return 0


def cmd_export(args: argparse.Namespace, say: _Say) -> int:
    from .checkpoint import origin
    from .exporters.onnx import export_onnx
    from .models import example_inputs

    model, tok = _load(args.dir, say)
    with say.task("exporting ONNX"):
        rep = export_onnx(model, args.onnx, example_inputs(model, tok), optimize=args.optimize,
                          origin=origin(args.dir))
    print(json.dumps(rep, default=str) if args.json else "\n".join(
        [f"wrote {rep['path']} (max |diff| vs torch {rep['max_abs_diff']:.2g})"] + [f"note: {n}" for n in rep["notes"]]))
    return 0


# -- entry point -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description="Structured pruning compiler for PyTorch / HF models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress output")
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    i = sub.add_parser("inspect", parents=[common], help="show the dependency groups of a model")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF dir, .gguf file, or builtin name")
    i.add_argument("--config", help="build the model from a config.json on the meta device (no weights)")
    i.add_argument("--json", metavar="FILE", help="write the groups as JSON")
    i.add_argument("--graphml", metavar="FILE")
    i.add_argument("--dot", metavar="FILE")
    i.add_argument("--png", metavar="FILE", help="picture of one layer's groups")
    i.add_argument("--svg", metavar="FILE")
    i.add_argument("--layer", type=int, default=None)

    pr = sub.add_parser("prune", parents=[common], help="prune a model and save it")
    pr.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    pr.add_argument("--ratio", type=float, default=0.2, help="fraction of parameters to remove")
    pr.add_argument("--importance", default=None,
                    help="importance pass (default l2; lora with --iterative; obs: chosen for --reconstruct)")
    pr.add_argument("--targets", default="heads,mlp", help="comma list of heads,kv_heads,mlp,rank,hidden (rank: low-rank attention bottlenecks, e.g. DeepSeek's MLA)")
    pr.add_argument("--layers", default=None, help="layer range START:END, e.g. 3:29")
    pr.add_argument("--mode", default="local", choices=["local", "global"])
    pr.add_argument("--round-to", type=int, default=1)
    pr.add_argument("--depth-profile", type=float, default=0.0, metavar="P",
                    help="local ranking: remove (1+P)x in the middle of the layer range, (1-P)x at its ends (-1<P<1)")
    pr.add_argument("--aggregate", default="sum")
    pr.add_argument("--calib", default=None, help="calibration text file (default: CPython's pydoc topics)")
    pr.add_argument("--calib-samples", type=int, default=10)
    pr.add_argument("--calib-seqlen", type=int, default=128)
    pr.add_argument("--calib-generate", type=int, default=0, metavar="N",
                    help="add N windows the model writes itself, each continuing 16 tokens of a calibration "
                         "window (more contexts for importance and the refit; HF causal LMs)")
    pr.add_argument("--lora-rank", type=int, default=8)
    pr.add_argument("--iterative", action="store_true",
                    help="LoRAPrune schedule: masks + LoRA fine-tuning, cubic sparsity, EMA scores")
    pr.add_argument("--steps", type=int, default=20, help="LoRA steps of --iterative")
    pr.add_argument("--prune-every", type=int, default=5, help="steps between mask updates (--iterative)")
    pr.add_argument("--ema", type=float, default=0.9, help="moving-average weight of old scores (--iterative)")
    pr.add_argument("--recover-steps", type=int, default=0,
                    help="LoRA recovery steps after pruning, merged into the weights (0: off)")
    pr.add_argument("--recover-samples", type=int, default=0,
                    help="recovery windows taken from the text after the calibration (and --eval) windows; "
                         "0 = recover on the calibration windows")
    pr.add_argument("--recover-generate", type=int, default=0, metavar="N",
                    help="add N windows the dense model writes itself (on from the calibration windows) to "
                         "recovery's windows: a long recovery with no more text (HF causal LMs)")
    pr.add_argument("--recover-batch", type=int, default=1, metavar="N",
                    help="windows per recovery step (steps x N windows are trained on; the report says when "
                         "some --recover-samples windows were never used)")
    pr.add_argument("--recover-text", metavar="FILE",
                    help="take the --recover-samples windows from the start of FILE instead of the calibration "
                         "text (e.g. text of another domain than the one you evaluate on)")
    pr.add_argument("--recover-schedule", choices=("constant", "cosine"), default="constant",
                    help="learning rate of the recovery steps: constant, or cosine decay to 0")
    pr.add_argument("--distill", type=float, nargs="?", const=1.0, default=0.0, metavar="W",
                    help="recovery loss: W x KL to the dense model's next-token distribution + (1 - W) x the "
                         "text's cross-entropy; --distill alone: W = 1 (measured best at 20%%: 0.5)")
    pr.add_argument("--precision", choices=sorted(PRECISION_NAMES), default="fp32",
                    help="forward/backward precision of gradient importance (bf16: bf16 weights under autocast, "
                         "about 2x faster on CPUs with bf16 instructions, fp32 with a note elsewhere; the pruned "
                         "model stays fp32)")
    pr.add_argument("--lr", type=float, default=2e-4, help="learning rate of the LoRA fine-tuning")
    pr.add_argument("--reconstruct", action="store_true",
                    help="refit down_proj/o_proj... on the calibration activations (least squares, no new parameters)")
    pr.add_argument("--damp", type=float, default=1.0,
                    help="relative ridge damping of --reconstruct and obs; less pays with more windows "
                         "(SmolLM2 obs, measured best: 8 on 10 windows; 4 at 20%%, 2 at 50%% with "
                         "--calib-generate 30)")
    pr.add_argument("--refit-all", action="store_true",
                    help="--reconstruct also refits every other Linear whose inputs drift (q/k/v, gate/up...)")
    pr.add_argument("--no-residual-correction", action="store_true",
                    help="--reconstruct aims down_proj/o_proj at the dense layer output only, not at the dense "
                         "residual stream (which also cancels earlier layers' drift)")
    pr.add_argument("--plan", default=None, help="replay a saved plan (fxprune.json's or a plan file)")
    pr.add_argument("--out", default=None, help="directory for the pruned model")
    pr.add_argument("--force", action="store_true", help="replace an existing --out directory")
    pr.add_argument("--max-shard-size", default=None, metavar="SIZE",
                    help="split the saved weights into shards of at most SIZE (e.g. 5GB; default 50GB)")
    pr.add_argument("--onnx", action="store_true", help="also write OUT/model.onnx (verified)")
    pr.add_argument("--onnx-optimize", choices=ONNX_OPTIMIZE, default=None, metavar="LEVEL",
                    help=ONNX_OPTIMIZE_HELP)
    pr.add_argument("--eval", action="store_true", help="perplexity before/after on held-out text")
    pr.add_argument("--eval-windows", type=int, default=40)
    pr.add_argument("--json", action="store_true", help="print the report as JSON")

    e = sub.add_parser("eval", parents=[common], help="perplexity of a causal LM")
    e.add_argument("model")
    e.add_argument("--text", default=None, help="text file (default: CPython's pydoc topics)")
    e.add_argument("--seqlen", type=int, default=128)
    e.add_argument("--windows", type=int, default=200)
    e.add_argument("--json", action="store_true")

    x = sub.add_parser("export", parents=[common], help="export a saved model to ONNX")
    x.add_argument("dir")
    x.add_argument("--onnx", required=True, metavar="FILE")
    x.add_argument("--optimize", choices=ONNX_OPTIMIZE, default=None, metavar="LEVEL", help=ONNX_OPTIMIZE_HELP)
    x.add_argument("--json", action="store_true")
    return p


COMMANDS = {"inspect": cmd_inspect, "prune": cmd_prune, "eval": cmd_eval, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    say = Progress(quiet=args.quiet)  # stderr only: --json keeps stdout clean
    try:
        return COMMANDS[args.cmd](args, say)
    except FxpruneError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxprune: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
