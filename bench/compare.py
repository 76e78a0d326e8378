"""fxprune against Torch-Pruning on SmolLM2-135M, side by side, in one run.

Same calibration slice for every method (the first 10 x 128 tokens of wikitext2_valid.txt), same
held-out evaluation slice (``--windows`` 128-token windows after a gap of 20 windows). Methods:

    dense                 the unpruned model
    dense+rec, dense+rec-long
                          the unpruned model given the same LoRA fine-tuning as fxprune+rec@R /
                          fxprune+rec-long@R (same steps, text, loss and schedule; the teacher is a
                          frozen copy of itself). The reference that separates recovery from
                          adaptation to the text: those methods' lines add ``ppl_over_dense_rec``
    tp-taylor, tp-l2      Torch-Pruning 1.6.1 (MetaPruner, Taylor / group L2), MLP channels of layers
                          3-28 at the parameter count fxprune reaches at ``--tp-ratio`` (its GQA head
                          pruning crashes on this model)
    fxprune@R             fxprune.prune(ratio=R, **settings, **extra) for each R in ``--fx-ratios``
    fxprune+rec@R         the same plus ``--fx-recovery`` kwargs (only when that option is given);
                          by default 500 LoRA steps, one window each: the calibration windows (the
                          10 and those the preset writes) plus enough windows the dense model writes
                          on from them to fill the steps, the text's cross-entropy alone: no text
                          beyond the calibration slice.
                          ``"recover_windows": N`` there recovers on N windows taken after the
                          evaluation slice (disjoint from calibration and evaluation)
    fxprune+rec-long@R    the same plus ``--fx-recovery-long`` kwargs: by default the recipe for a
                          user with more of their own text than the 10 calibration windows, 600
                          steps, one each, on 600 wikitext windows after the evaluation slice (never
                          evaluated on; under 10 minutes on 2 cores). It is in the evaluation's domain, so it
                          can go below dense: read it as recovery plus adaptation to that domain.
                          ``"recover_text": "pydoc"`` takes CPython's pydoc topics instead

Each method runs in its own process (the script calls itself with ``--only METHOD``), so wall time
and peak RSS are that method's own; model loading and perplexity evaluation are excluded from
``wall_s`` (``eval_s`` is reported beside it). One JSON line per method on stdout:
{"bench": "compare", "method", "params", "removed", "wall_s", "peak_rss_mb", "ppl", "ppl_ratio", ...}

    python bench/compare.py [--windows 40] [--fxprune-settings best|default|reconstruct|heads-mlp|obs|obs-heads-mlp|obs-gen|obs-heads-mlp-gen|'{"importance": ...}']
                            [--fx-extra '{"reconstruct": true}'] [--fx-recovery best|JSON ("" for none)]
                            [--fx-recovery-long JSON (default: LONG_RECOVERY; "" for none)]
                            [--methods dense,tp-taylor,tp-l2,fxprune]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from typing import Any, Callable

from _common import (DATA, GAP_WINDOWS, MODEL, calib_eval_windows, emit, import_tp, log, missing_prerequisite,
                     peak_rss_mb, recovery_windows, run_child, taylor_gradients, tp_pruner, tp_ratio_for)

BENCH = "compare"
TP_LAYERS = range(3, 29)
# named fxprune settings; pass JSON to --fxprune-settings for anything else
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"importance": "taylor-element1", "targets": ["mlp"], "layers": "3:29"},
    "reconstruct": {"importance": "taylor-element1", "targets": ["mlp"], "layers": "3:29", "reconstruct": True},
    "heads-mlp": {"importance": "taylor-element1", "targets": ["heads", "mlp"], "layers": "1:30", "reconstruct": True},
    # OBS choice of the units the refit absorbs best (reconstruct implied). Without residual
    # correction damping 3 measured best at 20% (held-out x dense: damp 0.3 1.68, 1 1.62, 3 1.59,
    # 10 1.60; per-channel damp x diag(H) no better; layers 3:29 1.590, 4:29 1.591, 3:30 1.685,
    # 2:30 1.718). With it (the default), ppl on the eval / second / third slices: 20% damp 2 66.8 /
    # 56.5 / 66.8, 3 66.8 / 56.7 / 66.6, 5 66.5 / 56.3 / 65.9, 8 66.0 / 56.2 / 65.9, 12 66.5 / 56.8 /
    # 65.8, 20 67.0 / 58.5 / 67.5; MLP damp 8 layers 2:29 66.7 / 56.8 / 66.5, 3:30 68.3 / 57.6 / 67.3;
    # refit_all 66.8 / 57.0 / 67.1; heads+MLP damp 8: 3:29 69.0 / 59.2 / 69.2, 1:30 89.0 / 74.9 / 90.5.
    # 50% heads+MLP: damp 3 208 / 240 / 219, 8 184 / 205 / 200, 15 191 / 218 / 207. The plain refit
    # (residual_correction=False) at damp 8: 20% 68.2 / 57.3 / 67.6, 50% 248 / 383 / 325 (damp 3:
    # 67.8 / 57.4 / 67.0 and 219 / 249 / 237): the correction is what makes the stronger damping pay
    "obs": {"importance": "obs", "targets": ["mlp"], "layers": "3:29", "damp": 8.0},
    "obs-heads-mlp": {"importance": "obs", "targets": ["heads", "mlp"], "layers": "1:30", "damp": 8.0},
    # obs on the 10 calibration windows plus 30 the model writes on from their first 16 tokens (no
    # text beyond the slice). 20%, dense 42.635: 61.775 (1.449x; seed 1 1.447x, second slice 1.431x)
    # against 65.931 (1.546x); writing 31 s, prune 74-78 s against 40.5 s. 90 written 61.03 (1.432x,
    # prune 165 s); prompts of 4 / 8 / 32 / 64 tokens 1.586x (90) / 1.485x / 1.460x / 1.479x; T=0.8 1.477x
    # With the 30 written windows (moved prompts, 3c20239) the statistics are better determined and
    # less damping pays, most at 50%. x dense by damp, 20% 1 / 2 / 2.5 / 4 / 8 / 12: 1.428 / 1.413 /
    # 1.406 / 1.399 / 1.411 / 1.418 (seed 1: damp 4 1.428, 8 1.443); 50% 0.5 / 1 / 2 / 4 / 6 / 8:
    # 3.729 / 3.423 / 3.295 / 3.582 / 3.857 / 3.988 (seed 1: damp 2 3.331, 8 3.987). Also tried, 20%
    # at damp 4: 20 / 60 written windows 1.492 / 1.462 (40 at damp 3 1.406); the real windows counted twice 1.421; an intercept on
    # down_proj 1.404; refit_all 1.407; at damp 8: windows written on from whole calibration windows
    # (128-token prompts) 1.457; real windows re-cut at offsets 64 / 32-96 added 1.436 / 1.441. 50%
    # at damp 4: six heads kept instead of three (heads at half the MLP fraction) 3.861 against 3.582.
    # 2026-12-04 (second session), 20% at damp 4: depth_profile 0.5 (the middle of 3:29 removes 1.5x,
    # its ends 0.5x) 58.973 (1.383x; seed 1 1.395x against 1.428x; second slice 61.684 against 61.611:
    # not kept in the preset, too small against the noise; at 50% heads+MLP damp 2 it is worse: p 0.5
    # 3.796x, 0.25 4.108x against 3.295x); 0.3 1.376x; 0.5 at damp 3 / 6 1.386x / 1.381x; 0.75
    # 1.410x, 1.0 1.403x (2:30 1.417x), -0.5 1.457x; more removed deep / shallow (linear ramp
    # +-0.5) 1.442x / 1.395x. OBS costs weighted by the dense loss's Fisher at each down_proj
    # output (E[g g^T], 576 x 576) 1.399x (half Fisher, half identity 1.411x): where the refit
    # error lands in the stream does not change the choice. Heads+MLP at 20% 1.415x; 256 greedy
    # rounds instead of 64 no change (1.386x)
    # 2026-12-04 (third session), tried and not kept: OBS moments with each token's weight capped at
    # 10 / 100 x the median token energy (position 0 carries 94-99.9% of the down_proj input energy
    # in layers 11 and 28: massive activations) 1.404x / 1.402x at 20%; at 50% (heads+MLP, damp 2)
    # the residual width pruned first by Taylor (10% of parameters, then obs to 50%) 4.877x, layers
    # 0:30 17.58x, depth_profile -0.3 3.654x, all against 3.295x. depth_profile 0.3 at 20%, seed 1:
    # 60.085 (1.409x, uniform 1.428x); second slice 61.956 (uniform 61.611): mixed, preset unchanged.
    # Written windows sampled at T=1.15 / 1.3: 1.432x / 1.428x (T=0.8 was 1.477x): T=1 stays
    # 2026-12-04 (fourth session), 20% at damp 4, not kept: the residual drift term scaled by 0.5 /
    # 1.3: 1.436x / 1.403x (1 stays). Per-layer shares learned from the pruned model: with the
    # uniform plan pruned, swapping layer l's dense MLP back in lowers the log-perplexity on 30
    # held-out written windows (seed 7) by 0.020 / 0.017 in layers 3-4, 0.003-0.014 in 5-18 and
    # 0.010-0.020 in 19-28 (U-shaped, like the depth_profile optimum); removing in proportion to
    # 1 / gain^g (3-layer smoothing, clipped to 0.5-1.6x) gave g 0.5 1.386x, g 1 1.395x, against
    # uniform 1.399x and depth_profile 0.3 1.376x. Each layer pruned alone (50%) instead ranks the
    # early layers most sensitive (0.07 at layer 3, 0.01 beyond 14): it misses that later refits
    # correct earlier layers' errors. At 50% (heads+MLP, damp 2; whole decoder layers swapped back:
    # 0.003-0.017 in 1-15, 0.03-0.05 in 16-27, 0.125 in 29) g 0.5 gave 137.439 (3.224x, uniform
    # 3.295x) but 173.832 on the second slice against uniform 170.212; layer 29 alone at 0.4x 3.252x.
    # Mixed at both ratios: the probe (a second prune plus 26-29 evaluations) is not worth its time.
    # Written windows chosen by the dense model's loss (2026-12-05, 2-core AMX Xeon; 60 written with
    # seed 0, whose first 30 are this preset's and reproduce 59.644 / 1.3989x): the 30 it finds most
    # likely 62.731 (1.471x), the 30 least likely 62.001 (1.454x). Both worse; which 30 windows are
    # used moves the result by 4-5%, more than any method change tried at 20%.
    # 2026-12-05 (second session, same Xeon): the refit re-solved at another damping than the choice
    # (choice damp 4): refit damp 1 / 2 / 8 gave 59.877 / 59.633 / 60.205 (1.404x / 1.399x / 1.412x)
    # against 59.644: how strongly the refit is pulled towards W does not matter once the choice is made.
    # Where the loss goes (eval slice, per predicted position): positions 0-15 lose -0.03 nats on
    # average, positions 16-126 +0.39 (-0.02 to +0.80); tokens the dense model predicts at 0.5-2 nats
    # lose 0.55, those above 7 nats gain 0.12. Not a logit scale: temperature 0.9 / 1.05 / 1.1 on the
    # pruned logits 1.411x / 1.434x / 1.493x. Calibration tokens weighted by position in the OBS
    # moments and drift terms (positions 1-15 at 0.2; or t/64 clipped to 0.25-1.5): 1.425x / 1.425x.
    # Without the written windows (10 real, damp 8) the same shape: +0.079 nats at 0-15, +0.491 after,
    # so it is not that the written windows are model text from position 16 on.
    # 2026-12-06 (same Xeon), 20% at damp 4, not kept: OBS moments and drift terms with each token
    # weighted by ||dL/dy||^2 at the consumer's output (dense model; GuidedQuant's per-token
    # weighting) 64.044 (1.502x), by ||dL/dy|| 60.800 (1.426x). Written windows sampled with top-p
    # 0.95 / 0.9 (T=1): 60.850 (1.427x) / 63.018 (1.478x); seed 1, top-p 0.95 1.455x against 1.428x.
    # Like lower temperatures, cutting the tail of the model's distribution makes worse calibration.
    # Tokens weighted by the RMSNorm the next block applies (1 / mean square of the dense stream, so an
    # error counts as the next norm sees it): 60.457 (1.418x); its square root 59.699 (1.400x).
    # 2026-12-06 (fifth session, same Xeon), 20% obs-gen pruned model against dense on 16 eval windows:
    # the attention sink (position 0, |h| ~23,700 from layer 12) keeps its norm within 0.6%; the other
    # positions' residual stream is 3-4% smaller in every pruned layer; the loss rises 0.09 nats at
    # positions 0-15 and 0.38-0.69 after. Rescaling each pruned down_proj on the 10 calibration windows
    # (positions 1+) towards the dense MLP output, layer by layer: one scalar per layer (norm ratio)
    # 59.209 (1.389x), per channel std ratio 60.303 (1.414x), its square root 59.678 (1.400x), per
    # channel least-squares scale 59.917 (1.405x), against 59.644: within the noise, not kept
    # 2026-12-06 (sixth session, same Xeon), 20% at damp 4, written windows sampled with generate()'s
    # repetition controls: repetition_penalty 1.1 / 1.2 62.189 (1.459x) / 63.182 (1.482x);
    # no_repeat_ngram_size 4 59.072 (1.386x; seed 1 1.424x against 1.428x), 3 60.036 (1.408x). The
    # plain T=1 windows already repeat little (99% of their 4-grams distinct), so there is nothing to
    # cure: the penalty pushes the text away from the model's distribution, and n-gram blocking moves
    # the result by less than the seed noise. Not kept
    # 2026-12-06 (sixth session, same Xeon): layers 3:28 with depth_profile 0.3 together, measured as
    # no setting before on three seeds and three slices (raw perplexity; the slices are the eval
    # slice and the 40 windows after it, then the 40 after those). Layers 3:29 uniform (the preset
    # until now) against 3:28 + 0.3: seed 0 59.644 / 58.249, seed 1 60.879 / 59.384, seed 2 61.325 /
    # 59.438 (1.399x / 1.428x / 1.438x -> 1.366x / 1.393x / 1.394x dense); second slice 61.611 /
    # 60.809, third slice 55.470 / 54.984. Lower on all five, by 2.3-3.1% on the eval slice and
    # 0.9-1.3% on the others. Each part alone was mixed (3:28 uniform: 1.390x, seed 1 1.426x, second
    # slice 61.076; 3:29 with 0.3: second slice 61.956). 3:28 with depth_profile 0.5: 1.377x /
    # 1.372x / 1.382x, second slice 61.870 (worse), third 55.213; with 0.7: 1.384x / 1.384x / 1.369x.
    # Around it (seeds 0 / 1): 3:27 1.365x / 1.386x, 4:28 1.367x / 1.383x; damp 3 1.363x / 1.387x,
    # damp 6 1.366x / 1.405x; heads+MLP 1.387x (seed 0): a flat region, the preset stays as it is.
    # 2026-12-07 (third session, same Xeon): more written windows, less damping, p 0.5. Raw perplexity
    # on the eval / second / third slices; seeds 0 / 1 / 2 on the eval slice (x dense). The preset
    # until then (30 written, damp 4, p 0.3): 58.249 / 60.809 / 54.984; seeds 1.366 / 1.393 / 1.394.
    # 120 written, p 0.3: damp 1 57.876 / 58.930 / 53.336 (1.358x). 120, p 0, damp 2 / 1 / 0.5 / 0.25:
    # 58.894 / 58.100 / 57.676 / 58.200 (eval only). 120, p 0.5: damp 1 56.999 / 58.442 / 52.810,
    # seeds 1.337 / 1.366 / 1.389; damp 0.5 57.044 / 58.485 / 52.635; p 0.7 (damp 1) 57.084 / 58.393 /
    # 53.062. 180, damp 0.5, p 0.5: 56.625 / 57.562 / 51.935, seeds 1.328 / 1.333 / 1.385 (209-232 s).
    # 240, damp 0.5, p 0.5: 55.625 / 56.466 / 51.509, seeds 1.305 / 1.338 / 1.367 (mean 1.337 against
    # 1.384 before; 254-305 s against 42 s). 250 windows kept every layer's dense inputs (11.0 GB peak
    # RSS, and past the one-pass budget: over 10 min) until the dense forward ran in step with the
    # pruned one (fxprune/passes/lockstep.py): 3.1 GB, 259 s, the same perplexity to the last digit.
    "obs-gen": {"importance": "obs", "targets": ["mlp"], "layers": "3:28", "damp": 0.5, "calib_generate": 240,
                "depth_profile": 0.5},
    # 50% over layers 1:29 rather than 1:30 (layer 29 left whole): 127.504 (2.991x) against 140.474
    # (3.295x); seed 1 3.025x against 3.331x; second slice 167.678 against 170.212; 1:28 3.012x
    # (damp 3 over 1:29: 126.374 / 167.586, within noise of damp 2). At 20%, layers 3:28: 59.251
    # (1.390x) / second slice 61.075, against 3:29's 59.643 / 61.611: small and consistent on the two
    # slices but under the seed noise (2%); seed 1 1.426x against 1.428x: not adopted
    # 2026-12-06: 60 written windows at damp 2 / 1.5: 126.453 (2.966x) / 127.439 (2.989x); 90 at damp 1
    # 124.430 (2.918x, prune 141 s against ~60 s): within the seed noise (seed 1 at 30: 3.025x)
    # 2026-12-07 (third session): 240 written windows, as the 20% preset now takes, do not carry over
    # to 50%: damp 0.5 / 1 / 2 129.810 (3.045x) / 129.611 (3.040x) / 134.663 (3.159x), ~250 s each
    "obs-heads-mlp-gen": {"importance": "obs", "targets": ["heads", "mlp"], "layers": "1:29", "damp": 2.0,
                          "calib_generate": 30},
}
# "best": the preset measured best at each ratio (MLP-only at 50% leaves 3% of those channels);
# held-out x dense, no fine-tuning: 20% reconstruct 1.74, obs 1.55; 50% heads-mlp 5.92, obs-heads-mlp 4.32
# (4.03 since prune() writes obs's own refit instead of re-solving it: 171.6 against 184.0; 20% 1.546)
# With 30 self-written windows (same 10-window slice; full compare.py run of 2026-12-04, 2-core
# AVX2 EPYC, dense 42.635): 20% 61.353 (1.439x, 101 s), +rec 46.633 (1.094x, 223 s), +rec-long
# 29.512 (0.692x, 536 s); 50% 167.216 (3.922x, 107 s), +rec 102.922 (2.414x, 215 s), +rec-long
# 53.749 (1.261x, 462 s); tp-taylor 80.491 (1.888x, 13 s), tp-l2 1923.3 (45.1x). With later
# rounds' prompts moved along the window (3c20239): 20% 60.144 (1.411x, 91 s), +rec 45.146
# (1.059x, 229 s); 50% 170.016 (3.988x, 111 s), +rec 104.614 (2.454x, 212 s); rec-long not re-run.
# At damp 4 (20%) and 2 (50%), full run of 2026-12-04: 20% 59.643 (1.399x, 105 s), +rec 45.041
# (1.056x, 254 s), +rec-long 29.313 (0.688x, 540 s); 50% 140.474 (3.295x, 120 s), +rec 98.793
# (2.317x, 217 s), +rec-long 54.384 (1.276x, 461 s); tp-taylor 80.491 (1.888x), tp-l2 45.1x.
# 50% over layers 1:29 (fourth session, --methods fxprune --fx-ratios 0.5): 127.504 (2.991x, 122 s),
# +rec 94.844 (2.225x, 205 s), +rec-long 54.275 (1.273x, 495 s).
# Full run of 2026-12-05 on a 2-core AMX Xeon (14.7 min): the same perplexities as above to the third
# decimal (20% 59.644 / +rec 45.041 / +rec-long 29.314; 50% 127.505 / 94.859 / 54.245; tp-taylor
# 80.491, tp-l2 1923.345), in half the time: fxprune@0.2 50 s, +rec 112 s, +rec-long 255 s; @0.5 58 s,
# 107 s, 219 s; tp-taylor 5.5 s.
# Full run of 2026-12-06 (same Xeon), after the refit moments moved to float32 products: the same
# perplexities (20% 59.644 / 45.041 / 29.314; 50% 127.505 / 94.860 / 54.212, recovery's last digits
# vary run to run; tp-taylor 80.491, tp-l2 1923.345) in less time: fxprune@0.2 40.4 s (writing
# 15.3, choosing 22.2), +rec 102 s, +rec-long 277 s; @0.5 46.8 s, 96 s, 214 s; tp-taylor 5.75 s.
# Full run of 2026-12-06 (second session, same Xeon, ~15% slower that hour; pruning code unchanged):
# the same perplexities (20% 59.644 / 45.041 / 29.314; 50% 127.505 / 94.860 / 54.212; tp-taylor
# 80.491, tp-l2 1923.345); fxprune@0.2 47.1 s, +rec 114 s, +rec-long 280 s; @0.5 51.4 s, 106 s, 234 s;
# tp-taylor 5.9 s.
# Full run of 2026-12-06 (third session, same Xeon), with the dense references and the long recipe
# at 600 steps on 600 windows: dense 42.635, dense+rec 29.582 (0.694x), dense+rec-long 20.120
# (0.472x); fxprune@0.2 59.644 (1.399x, 42.1 s), +rec 45.041 (1.056x; 1.523x dense+rec; 104 s),
# +rec-long 26.473 (0.621x; 1.316x dense+rec-long; recovery 417 s); @0.5 127.505 (2.991x, 48.1 s),
# +rec 94.860 (2.225x; 3.207x; 95 s), +rec-long 47.762 (1.120x; 2.374x; recovery 328 s);
# tp-taylor 80.491 (1.888x, 5.6 s), tp-l2 1923.345. Fine-tuning the dense model on the 10
# calibration windows alone takes it to 0.694x: SmolLM2-135M-Instruct is far from wikitext, and
# much of what any recovery on wikitext gains is adaptation, not recovery.
# Recovery towards the dense model only (distill 1: KL to it, no text loss; its dense reference is
# the dense model itself, which that loss leaves unchanged), same run: 80 steps on the calibration
# windows 20% 58.557 (1.373x), 50% 115.040 (2.698x); 600 steps on the 600 windows 20% 50.530
# (1.185x, recovery 427 s), 50% 78.316 (1.837x, 339 s). With that much unlabeled text the 20% model
# comes within 1.2x of dense without learning anything the dense model does not know.
# 2026-12-06 (fourth session, same Xeon; rewrite and rules changed for other architectures only):
# dense, fxprune@0.2 / @0.5 and tp-taylor reproduce 42.635 / 59.644 (1.399x, 41.0 s) / 127.505
# (2.991x, 49.0 s) / 80.491 (1.888x, 5.5 s).
# Keeping the teacher's log-probabilities for windows recovery sees again (40 windows, 80 steps)
# was tried: recovery 61.8 s against 60.6 s, 0.9 GB more peak memory; not kept.
BEST = {0.2: "obs-gen", 0.5: "obs-heads-mlp-gen"}
# Plain Taylor at 20% (MLP, layers 3:29, no refit; 2026-12-05, AMX Xeon): taylor-element1 80.536
# (1.889x, as Torch-Pruning's Taylor), bf16 79.897; taylor-vector 107.055 (2.511x), bf16 105.693.
# The vector form now skips weight gradients (importance 3.3 s against 3.9 s) but ranks worse here.
# Calibration size (--calib-samples; both tools get the same windows, the evaluation slice moves
# past them): 40 windows, 20%: dense 40.09, obs 53.92 (1.345x), tp-taylor 74.61 (1.861x). On the
# protocol's eval slice with the 10 windows plus 30 from after the third slice: obs damp 3 54.47,
# 5 54.61, 8 54.92 (1.288x), against 65.99 on 10; 30 windows sampled from the dense model instead
# (T=1, prompts = the first 16 tokens of each calibration window) 63.88: the gain is in real text.
# on the 10 calibration windows, loss = 0.5 x KL to the dense model + 0.5 x the text's cross-entropy.
# Held-out x dense after obs at 20% (eval slice / second slice / a third slice never used for
# choosing): text only, cosine 4e-4, 50 steps 1.199 / 1.265 / 1.131; mixed, 80 steps 1.136 / 1.195 / 1.081.
# Mixed, tried and worse on the first two: 120 steps, weight 0.75, lr 6e-4; rank 16 ~equal.
# At 50% (obs heads+MLP) 80 steps give 2.917 / 4.789; 160 steps 3.035 / 4.932; adding 40 windows
# sampled from the dense model (T=1, prompts from the calibration text) 3.248 / 4.811
# Recovery under bf16 autocast (2026-12-05, AMX Xeon, 20% obs-gen + this recipe): fine-tuning 48.6 s
# against 53.3 s in fp32, perplexity 48.901 (1.147x) against 45.041 (1.056x): not offered.
# 2026-12-07 (AMX Xeon): recovery on windows the dense model writes (recover_generate), the 10
# calibration windows and 30 written ones among them, shuffled, one a step: with 300 written (seed
# 123, before recover_generate existed) and 300 steps, 50% 83.669 (1.963x) against 94.860 (2.225x)
# for 80 steps on the 40 calibration windows; distill 1 (KL only) 106.774 (2.504x): the text's
# cross-entropy on written windows is what pays. 20% 42.131 (0.988x) against 44.013 (1.032x).
# Writing 300 windows took 168-183 s at 30 a generate() call (0.42 s a window at 120: the default
# for recovery); recovery 191 s (50%) / 238 s (20%): under 10 minutes together.
# Recovery on 80 steps of the 40 calibration windows was the recipe until then.
# Not kept (2026-12-07, 20%, no recovery): 120 calibration windows (calib_generate 110) at damp 2 / 1
# 58.894 (1.381x) / 58.100 (1.363x) against 58.249 with 40, in 150 s against 50 s; OSSCAR-style swap
# search after obs's greedy (add the removed unit the refit gains most from, drop the cheapest kept
# one, while the damped error falls: 1-10 swaps a layer, the error lower by < 0.01%) 57.693 (1.353x)
# but seed 1 / 2 59.388 / 59.318 against 59.384 / 59.438: the greedy's choice is already a local
# optimum, the 1% on seed 0 is how much a few swapped channels move perplexity; real windows with
# their tokens resampled from the dense model's next-token distribution (each position with p 0.3 /
# 1, 30 windows instead of the written ones) 1.463x / 1.445x, and with the written ones 1.412x.
# The final RMSNorm's weight refit (576 numbers, closed form) so the pruned logits match the dense
# ones in least squares over the 40 calibration windows, ridge towards the dense weight at 0.001 /
# 0.01 / 0.1 / 1 x mean(diag): 1.382x / 1.380x / 1.375x / 1.369x against 1.366x: a logit-MSE fit
# is not the loss, and the residual-stream refits already leave nothing it can take.
# 2026-12-07 (second session): every residual writer refit to the dense stream (o_proj of every
# layer and the unpruned layers' down_proj too, with the drift correction; refit_all limited to
# them) 58.685 (1.376x) against 58.249: more correction points do not help.
# Full run with that 300-step recipe (distill 0.5, 260 written; 2026-12-07, same Xeon; no rec-long):
# dense 42.635, dense+rec 31.440 (0.737x; 0.694x with the 80-step recipe: less of the gain is
# adaptation to wikitext), fxprune@0.2 58.249 (1.366x, 49.8 s), +rec 42.347 (0.993x, 1.347x dense+rec;
# 402.7 s: writing 106.2, recovery with it 355.8); @0.5 127.505 (2.991x, 56.6 s), +rec 82.835 (1.943x,
# 2.635x dense+rec; 380.8 s: writing 115.5, recovery with it 323.0); tp-taylor 80.491 (1.888x, 6.2 s).
# 2026-12-07 (second session, same Xeon), recipes at 50% (obs-heads-mlp-gen; 260 written, 300 steps,
# cosine; the recipe above: lr 4e-4, LoRA rank 8, distill 0.5, 82.835 / 1.943x): lr 8e-4 81.510
# (1.912x); rank 32 80.585 (1.890x); distill 0.25 79.429 (1.863x), with rank 32 77.895 (1.827x), with
# rank 32 and lr 8e-4 81.667 (1.916x); distill 0 (the text's cross-entropy alone) 77.381 (1.815x) in
# 252 s against 348 s, with rank 32 77.443 (1.816x). On written windows the text is the dense model's
# own samples, so its cross-entropy already distils that model (sequence-level distillation); the
# token-level KL costs a teacher forward a step (0.66 s a step against 0.41) and measured worse. (On
# the 10 real windows alone distill 0.5 had measured best: it overfits them less.) The time saved
# buys more written windows: 460 written and 500 steps 75.445 (1.770x, 397 s in all).
# Writing in bf16 (bf16 copy of the model, AMX) is 1.55x faster (120 windows x 40 new tokens: 10.4 s
# against 16.1 s). In recovery (50%, 460 written, 500 steps, distill 0): 76.013 (1.783x) in 337.9 s
# against 75.445 (1.770x) in 396.6 s. Not adopted yet: 59 s saved for text that differs from what the
# float32 model writes; it would need an option and a 20% measurement of its own.
# Full run with this recipe (2026-12-07, second session; --methods dense,tp-taylor,fxprune, no
# rec-long): dense 42.635, dense+rec 29.159 (0.684x, 301.1 s), fxprune@0.2 58.249 (1.366x, 45.7 s),
# +rec 39.102 (0.917x; 1.341x dense+rec; 460.4 s: writing 168.2, recovery with it 415.9, peak RSS
# 3.2 GB); @0.5 127.505 (2.991x, 51.2 s), +rec 75.445 (1.770x; 2.587x dense+rec; 403.7 s: writing
# 164.2, recovery with it 351.4, peak RSS 4.5 GB); tp-taylor 80.491 (1.888x, 6.1 s).
# Full run after the 20% preset moved to 240 written windows (2026-12-07, third session, same Xeon;
# --fx-recovery-long ''): dense 42.635, dense+rec 28.907 (0.678x, 317.1 s; its windows now follow the
# 20% assembly: 240 + 250 written), fxprune@0.2 55.625 (1.305x, 254.8 s: writing 136.2, obs 115.3;
# peak RSS 3.3 GB), +rec 37.303 (0.875x; 1.290x dense+rec; 663.0 s: pruning 260, recovery 401.9 of it
# writing 107.9); @0.5 127.505 (2.991x, 53.7 s), +rec 75.445 (1.770x; 2.610x dense+rec; 416.1 s:
# recovery 364.8, of it writing 176.5); tp-taylor 80.491 (1.888x, 6.0 s), tp-l2 1923.345 (45.1x).
BEST_RECOVERY = '{"recover_steps": 500, "lr": 4e-4, "recover_schedule": "cosine", "distill": 0.0}'
# --fx-recovery best (the default) is BEST_RECOVERY plus as many written windows (recover_generate)
# as it takes for recovery to see each window once: steps - calibration windows - those the preset
# writes for calibration. 50% (30 written for calibration): 460, as above; 20% (240): 250.
# With text beyond the calibration slice the same recipe runs longer without overfitting. Wikitext
# windows after the evaluation slice (never evaluated on), 2-core AVX2 EPYC, dense 42.635: 50% (obs
# heads+MLP) 160 steps on 320 windows 75.71 (1.776x; 2.666x on the 10 calibration windows, 2.816x
# on an earlier machine), 300 steps on 600 windows 64.51 (1.513x, recovery 376-396 s); 20% 300 on
# 600 31.20 (0.732x, 477-488 s): below dense, so part of it is adaptation to wikitext, not recovery.
# The same 300 steps on 600 windows of another domain (pydoc topics) do not help wikitext at all:
# 20% 67.37 (1.580x, against 1.546x without recovery), 50% 186.1 (4.365x, against 4.025x); 50% with
# the KL to the dense model only (distill 1) 181.8 (4.263x). What recovery regains is specific to
# the text it sees.
# Until 2026-12-06 this recipe said 600 windows but trained on 300: recovery takes one window a step,
# so 300 steps saw the first 300 (fxprune now reports rows_seen and notes unused windows). The
# numbers above are for 300 windows seen once. 2026-12-06 (third session, AMX Xeon), 50% obs-gen:
# 900 steps x 1 window 44.647 (1.047x, recovery 479 s); 600 steps x 2 windows (recover_batch 2)
# 45.189 (1.060x, 602 s): on 2 cores a 2-window step costs 2 one-window steps, and fewer, larger
# steps do worse. The dense model given the same 900 steps: 19.637 (0.461x): the pruned model is
# 2.27x the dense one fine-tuned alike, so most of the 1.047x is adaptation to wikitext. Hence the
# dense+rec-long line. 600 steps keep both ratios under 10 minutes (20% runs ~0.75 s a step).
LONG_RECOVERY = ('{"recover_steps": 600, "lr": 4e-4, "recover_schedule": "cosine", "distill": 0.5, '
                 '"recover_windows": 600}')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="dense,tp-taylor,tp-l2,fxprune",
                    help="comma list of dense (with dense+rec and dense+rec-long), tp-taylor, tp-l2, fxprune")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of --seqlen tokens")
    ap.add_argument("--calib-samples", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--tp-ratio", type=float, default=0.2, help="fraction of all parameters Torch-Pruning removes")
    ap.add_argument("--fx-ratios", default="0.2,0.5")
    ap.add_argument("--fxprune-settings", default="best",
                    help=f"best (per ratio: {BEST}), a preset ({', '.join(PRESETS)}) or a JSON object of "
                         "fxprune.prune kwargs")
    ap.add_argument("--fx-extra", default="{}", help="JSON kwargs added to every fxprune.prune call")
    ap.add_argument("--fx-recovery", default="best",
                    help="JSON kwargs for the fxprune+rec@R methods, best (BEST_RECOVERY, written windows to "
                         "fill its steps) or '' for none")
    ap.add_argument("--fx-recovery-long", default=LONG_RECOVERY,
                    help="JSON kwargs for the fxprune+rec-long@R methods ('' for none)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child mode: one method
    ap.add_argument("--match-params", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


RECOVERY_FLAGS = {"": None, "+rec": "fx_recovery", "+rec-long": "fx_recovery_long"}  # method suffix -> option


def fx_settings(args: argparse.Namespace, recovery: str = "", ratio: float = 0.2) -> dict[str, Any]:
    """fxprune.prune kwargs (ratio excluded): preset or JSON, then --fx-extra, then the recovery
    option of the method suffix ``recovery`` ("", "+rec" or "+rec-long")."""
    spec = args.fxprune_settings
    if spec == "best":
        spec = BEST.get(ratio, "obs-heads-mlp-gen" if ratio > 0.3 else "obs-gen")
    settings = dict(PRESETS[spec]) if spec in PRESETS else _json_object(spec, "--fxprune-settings")
    settings.update(_json_object(args.fx_extra, "--fx-extra"))
    flag = RECOVERY_FLAGS[recovery]
    if flag is not None:
        spec = getattr(args, flag)
        if spec == "best":
            rec = _json_object(BEST_RECOVERY, "BEST_RECOVERY")
            written = rec["recover_steps"] - args.calib_samples - settings.get("calib_generate", 0)
            rec["recover_generate"] = max(0, written)
        else:
            rec = _json_object(spec, "--" + flag.replace("_", "-"))
        settings.update(rec)
    if "targets" in settings:
        settings["targets"] = tuple(settings["targets"])
    return settings


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{flag}: not a preset name nor JSON ({exc}); e.g. '{{\"importance\": \"l2\"}}'")
    if not isinstance(value, dict):
        raise SystemExit(f"{flag}: give a JSON object of fxprune.prune keyword arguments, got {text}")
    return value


# -- one method (child process) ---------------------------------------------------------------------


def run_dense(model: Any, calib: Any, args: argparse.Namespace) -> dict[str, Any]:
    return {"params": _count(model), "removed": 0.0, "wall_s": 0.0}


def run_dense_recovery(model: Any, calib: Any, args: argparse.Namespace, recovery: str) -> dict[str, Any]:
    """The dense model LoRA-fine-tuned with the recovery recipe of method suffix ``recovery``, as
    ``fxprune.prune`` would run it (its defaults for whatever the recipe leaves out)."""
    import copy

    import torch

    import fxprune
    from fxprune.data import generate_windows, recovery_rows
    from fxprune.passes.recovery import recover

    settings = fx_settings(args, recovery)
    kwargs = dict(settings)
    data = _recovery_data(kwargs, args)
    data = calib if data is None else data
    n_calib, n_rec = kwargs.get("calib_generate", 0), kwargs.get("recover_generate", 0)
    if n_rec:  # the windows fxprune.prune recovers on: calibration, its written ones, recovery's written ones
        rows = [data[i : i + 1] for i in range(data.shape[0])]
        if n_calib and data is calib:
            written = generate_windows(model, calib, n_calib, seed=0)
            rows += [written[i : i + 1] for i in range(n_calib)]
        data = torch.cat(recovery_rows(model, calib, rows, n_rec, first=n_calib, seed=0))
    defaults = {k: p.default for k, p in inspect.signature(fxprune.prune).parameters.items()}
    opt = lambda k: kwargs.get(k, defaults[k])  # noqa: E731
    student = copy.deepcopy(model)
    t0 = time.perf_counter()
    record = recover(student, [data[i : i + 1] for i in range(data.shape[0])], steps=opt("recover_steps"),
                     lr=opt("lr"), rank=opt("lora_rank"), teacher=model if opt("distill") else None,
                     distill=opt("distill"), schedule=opt("recover_schedule"), batch=opt("recover_batch"))
    keys = ("recover_steps", "recover_batch", "lr", "recover_schedule", "distill", "recover_windows", "recover_text",
            "lora_rank", "recover_generate")
    return {"params": _count(student), "removed": 0.0, "wall_s": round(time.perf_counter() - t0, 2),
            "settings": {k: settings[k] for k in keys if k in settings},
            "recovery_s": round(record["seconds"], 2), "_model": student}


def _recovery_data(kwargs: dict[str, Any], args: argparse.Namespace) -> Any:
    """Pop the bench-only ``recover_windows`` / ``recover_text`` from ``kwargs``; the recovery
    windows they ask for (after the evaluation slice), or None for none."""
    n_rec = kwargs.pop("recover_windows", 0)
    source = kwargs.pop("recover_text", "wikitext")
    if not n_rec:
        return None
    return recovery_windows(args.tokenizer, n_rec, args.seqlen, source, args.calib_samples + GAP_WINDOWS + args.windows)


def run_tp(model: Any, calib: Any, args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """Torch-Pruning as its LLM example does it, restricted to MLP channels of layers 3-28.

    Taylor: the calibration loss is backpropagated before ``step()``, which reads ``weight.grad``.
    """
    tp = import_tp()
    total = _count(model)
    target = total - args.match_params if args.match_params else round(args.tp_ratio * total)
    ratio, per_layer = tp_ratio_for(model, TP_LAYERS, target)
    importance = (tp.importance.GroupTaylorImportance() if kind == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=2))
    t0 = time.perf_counter()
    if kind == "taylor":
        taylor_gradients(model, calib, TP_LAYERS)
    pruner = tp_pruner(tp, model, TP_LAYERS, importance, ratio, calib[:1, :16])
    pruner.step()
    wall = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    model.requires_grad_(False)
    return {"params": _count(model), "removed": round(1 - _count(model) / total, 4), "wall_s": round(wall, 2),
            "settings": {"importance": kind, "layers": "3:29", "targets": ["mlp"], "pruning_ratio": round(ratio, 5),
                         "channels_removed_per_layer": per_layer}}


def run_fx(model: Any, calib: Any, args: argparse.Namespace, ratio: float, recovery: str) -> dict[str, Any]:
    import fxprune

    settings = fx_settings(args, recovery, ratio)
    unknown = set(settings) - set(inspect.signature(fxprune.prune).parameters) - {"recover_windows", "recover_text"}
    if unknown:
        return {"error": f"fxprune.prune has no keyword {', '.join(sorted(unknown))} in this checkout",
                "settings": settings}
    kwargs = dict(settings)
    data = _recovery_data(kwargs, args)
    if data is not None:
        kwargs["recover_data"] = data
    t0 = time.perf_counter()
    res = fxprune.prune(model, {"input_ids": calib[:2, :16]}, ratio=ratio, calib=calib, **kwargs)
    wall = time.perf_counter() - t0
    timings = {k: round(v, 2) for k, v in res.report["timings"].items()}
    model = res.model
    return {"params": res.report["params_after"], "removed": round(res.report["removed_fraction"], 4),
            "wall_s": round(wall, 2), "timings": timings,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, "_model": model}


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def child(args: argparse.Namespace) -> None:
    """Run the one method ``args.only`` and print its JSON line."""
    import torch

    import fxprune
    from fxprune.data import perplexity

    method = args.only
    runner = _runner(method)
    model, tok = fxprune.load_model(MODEL)
    args.tokenizer = tok
    calib, evalw = calib_eval_windows(tok, args.calib_samples, args.seqlen, args.windows)
    log(f"{method}: pruning")
    record = runner(model, calib, args)
    pruned = record.pop("_model", model)
    if "error" not in record:
        log(f"{method}: perplexity on {evalw.shape[0]} x {evalw.shape[1]} tokens")
        t0 = time.perf_counter()
        with torch.no_grad():
            record["ppl"] = round(perplexity(pruned, evalw)["ppl"], 3)
        record["eval_s"] = round(time.perf_counter() - t0, 1)
    emit({"bench": BENCH, "method": method, **record, "peak_rss_mb": peak_rss_mb(),
          "eval_tokens": int(evalw.shape[0] * (evalw.shape[1] - 1))})


def _runner(method: str) -> Callable[[Any, Any, argparse.Namespace], dict[str, Any]]:
    """The function running ``method`` (names as listed in the module docstring)."""
    fixed: dict[str, Callable[..., dict[str, Any]]] = {
        "dense": run_dense,
        "tp-taylor": lambda m, c, a: run_tp(m, c, a, "taylor"),
        "tp-l2": lambda m, c, a: run_tp(m, c, a, "l2"),
        "dense+rec": lambda m, c, a: run_dense_recovery(m, c, a, "+rec"),
        "dense+rec-long": lambda m, c, a: run_dense_recovery(m, c, a, "+rec-long"),
    }
    if method in fixed:
        return fixed[method]
    name, _, ratio = method.partition("@")
    suffix = name.removeprefix("fxprune")
    if name.startswith("fxprune") and suffix in RECOVERY_FLAGS and ratio:
        return lambda m, c, a: run_fx(m, c, a, float(ratio), suffix)
    raise SystemExit(f"unknown method {method}")


# -- the whole comparison (parent process) ------------------------------------------------------------


def plan_methods(args: argparse.Namespace) -> list[str]:
    """Child methods in run order: dense first (the ratios' reference), fxprune before Torch-Pruning
    (which matches fxprune's parameter count at the same ratio)."""
    wanted = args.methods.split(",")
    methods = ["dense"] if "dense" in wanted else []
    for suffix, flag in RECOVERY_FLAGS.items():
        if flag and getattr(args, flag) and ("dense" in wanted or f"dense{suffix}" in wanted):
            methods.append(f"dense{suffix}")
    if "fxprune" in wanted:
        ratios = [f"{float(r):g}" for r in args.fx_ratios.split(",")]
        methods += [f"fxprune@{r}" for r in ratios]
        if args.fx_recovery:
            methods += [f"fxprune+rec@{r}" for r in ratios]
        if args.fx_recovery_long:
            methods += [f"fxprune+rec-long@{r}" for r in ratios]
    methods += [m for m in ("tp-taylor", "tp-l2") if m in wanted]
    return methods


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--windows", str(args.windows), "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
           "--tp-ratio", str(args.tp_ratio), "--fxprune-settings", args.fxprune_settings, "--fx-extra", args.fx_extra]
    out += ["--fx-recovery", args.fx_recovery] if args.fx_recovery else []
    return out + ["--fx-recovery-long", args.fx_recovery_long]


def parent(args: argparse.Namespace) -> None:
    why = missing_prerequisite(need_data=True, need_tp=any(m.startswith("tp") for m in args.methods.split(",")))
    if why:
        emit({"bench": BENCH, "skipped": why})
        return
    for suffix, flag in RECOVERY_FLAGS.items():  # fail on bad JSON before any child starts
        if flag is None or getattr(args, flag):
            fx_settings(args, suffix)
    dense_ppl, fx_params = None, None
    dense_rec_ppl: dict[str, float] = {}  # recovery suffix -> the dense model's perplexity after it
    for method in plan_methods(args):
        extra = ["--match-params", str(fx_params)] if method.startswith("tp") and fx_params else []
        log(f"--- {method}")
        for rec in run_child(__file__, ["--only", method, *_forwarded(args), *extra]):
            rec = {"bench": BENCH, "method": method, **rec}
            if method == "dense" and "ppl" in rec:
                dense_ppl = rec["ppl"]
            if method == f"fxprune@{args.tp_ratio:g}" and "params" in rec and "error" not in rec:
                fx_params = rec["params"]
            suffix = method.partition("@")[0].removeprefix("fxprune").removeprefix("dense")
            if method.startswith("dense+") and rec.get("ppl") is not None:
                dense_rec_ppl[suffix] = rec["ppl"]
            if dense_ppl and rec.get("ppl") is not None:
                rec["ppl_ratio"] = round(rec["ppl"] / dense_ppl, 3)
            if method.startswith("fxprune+") and suffix in dense_rec_ppl and rec.get("ppl") is not None:
                rec["ppl_over_dense_rec"] = round(rec["ppl"] / dense_rec_ppl[suffix], 3)
            emit(rec)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.only:
        child(args)
    else:
        log(f"data {DATA}")
        parent(args)


if __name__ == "__main__":
    sys.exit(main())
