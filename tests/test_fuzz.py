"""Correctness under fuzz: random small networks are either pruned correctly or refused clearly.

Hypothesis draws network *specs* (plain data); ``build`` turns a spec into an ``nn.Module``:
an input projection, a stack of MLP / attention blocks on a residual stream, an output projection.
Blocks vary the things fxprune's rules must get right: norms, activations, gated and fused
(gate_up, qkv) projections split with ``split`` / ``chunk`` / slices, head and kv-head counts
(GQA through HF's expand+reshape or ``repeat_interleave``), SDPA or explicit attention, RoPE's
rotate-half, and now and then an op the rules don't know.

For every network, ``fxprune.prune`` must either raise :class:`fxprune.FxpruneError` with one line,
or return a model that (a) equals its own pruned graph on inputs of another batch / sequence size
and (b) equals the zero-masked original wherever removal is exactly masking; dims an unknown op
touches keep their size and the op is named in the report. Independently of the ratio search, an
exact plan (random MLP channels, whole heads, whole kv groups) is applied and compared with
``masked_copy``, and a plan cutting every prunable group must still run and agree with the pruned
module. A few networks are also exported to ONNX and checked in onnxruntime.

Seeded and bounded for CI (about a minute of CPU). ``FXPRUNE_FUZZ_SCALE=10`` runs ten times the
examples; ``FXPRUNE_FUZZ_SHRINK=1`` shrinks a failure to a minimal network (slow).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.api import run_model
from fxprune.errors import VerificationError
from fxprune.passes.rewrite import apply_plan, masked_copy
from fxprune.plan import Plan


def fuzz(examples: int) -> settings:
    """A fixed seed and a bounded number of examples: the same networks on every CI run."""
    # shrinking a failure can take minutes: CI reports the drawn spec as is (readable dataclasses);
    # FXPRUNE_FUZZ_SHRINK=1 turns shrinking on when debugging one
    phases = list(Phase) if os.environ.get("FXPRUNE_FUZZ_SHRINK") else [Phase.explicit, Phase.generate]
    # FXPRUNE_FUZZ_SCALE=10 runs ten times the examples (a longer local hunt, same seed)
    examples = int(examples * float(os.environ.get("FXPRUNE_FUZZ_SCALE", "1")))
    return settings(derandomize=True, max_examples=examples, deadline=None, database=None, phases=phases,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


CAPTURE_SHAPE = (2, 5)  # batch, sequence of the example inputs prune() captures with
FRESH_SHAPE = (3, 7)  # another batch / sequence size for every comparison
RTOL = 1e-4  # max |a - b| <= RTOL * max(1, max |b|): float32 noise, far below a wrong output


# -- ops the rules don't know (and which must therefore pin what they touch) ----------------------

class _RollFn(torch.autograd.Function):
    """A custom autograd function: export traces its forward, where ``roll`` is unknown."""

    @staticmethod
    def forward(ctx, x):
        return x.roll(1, -1)

    @staticmethod
    def backward(ctx, g):
        return g.roll(-1, -1)


@torch.library.custom_op("fxprune_fuzz::mix", mutates_args=())
def _mix(x: torch.Tensor) -> torch.Tensor:
    """A custom op: opaque to the rules."""
    return x + 0.5 * x.flip(-1)


@_mix.register_fake
def _(x):
    return torch.empty_like(x)


# name -> (function over the last dim, the op name the report must mention)
UNKNOWN_OPS = {
    "cumsum": (lambda x: x.cumsum(-1), "cumsum"),
    "flip": (lambda x: x.flip(-1), "flip"),
    "cummax": (lambda x: x.cummax(-1).values, "cummax"),
    "autograd_fn": (_RollFn.apply, "roll"),
    "custom_op": (_mix, "mix"),
}
# known ops that normalise over the channel dim: removal is not masking there
NORMALISING_OPS = {
    "softmax": lambda x: x.softmax(-1),
    "normalize": lambda x: F.normalize(x, dim=-1),
}
MID_OPS = {**{k: v[0] for k, v in UNKNOWN_OPS.items()}, **NORMALISING_OPS}
ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


class ManualRMSNorm(nn.Module):
    """RMSNorm written out (pow / mean / rsqrt / mul), as many HF models do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


NORM_TYPES = {"layer": nn.LayerNorm, "rms": nn.RMSNorm, "manual_rms": ManualRMSNorm}


def make_norm(kind: str | None, d: int) -> nn.Module:
    return NORM_TYPES[kind](d) if kind else nn.Identity()


# -- specs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MlpSpec:
    width: int
    kind: str  # plain | gated | fused_chunk | fused_slice
    act: str
    norm: str | None
    residual: bool
    mid_op: str | None  # an op on the intermediate channels (UNKNOWN_OPS or NORMALISING_OPS)


@dataclass(frozen=True)
class AttnSpec:
    kv_heads: int
    per_kv: int  # query heads per kv head
    head_dim: int
    qkv: str  # separate | fused_split | fused_chunk
    gqa: str  # expand | repeat_interleave (only used when per_kv > 1)
    sdpa: bool
    causal: bool
    rope: str | None  # None | slice | chunk (how rotate-half halves head_dim)
    norm: str | None
    qk_norm: str | None  # None | rms (Qwen3's per-head RMSNorm) | l2 (F.normalize over head_dim)
    bias: bool
    unknown: str | None  # an unknown op on the merged heads before o_proj


@dataclass(frozen=True)
class NetSpec:
    d_in: int
    d: int
    d_out: int
    blocks: tuple
    final_norm: str | None
    stream_op: str | None  # an unknown op on the residual stream right after the input projection
    hf_names: bool  # sizes in attributes fxprune rewrites (num_heads...) or in private ones (_hq...)


NORMS = st.sampled_from([None, "layer", "rms", "manual_rms"])


def rare(values: list[str]) -> st.SearchStrategy:
    """None most of the time, one of ``values`` now and then."""
    return st.one_of(st.none(), st.none(), st.none(), st.sampled_from(values))


@st.composite
def mlp_specs(draw) -> MlpSpec:
    kind = draw(st.sampled_from(["plain", "gated", "fused_chunk", "fused_slice"]))
    return MlpSpec(draw(st.integers(3, 12)), kind, draw(st.sampled_from(sorted(ACTS))), draw(NORMS),
                   draw(st.booleans()), draw(rare(sorted(MID_OPS))))


@st.composite
def attn_specs(draw) -> AttnSpec:
    kv, per = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rope = draw(st.sampled_from([None, None, "slice", "chunk"]))  # RoPE pins head_dim: rarer
    hd = draw(st.sampled_from([2, 4] if rope else [1, 2, 3, 4]))
    qkv = draw(st.sampled_from(["separate", "fused_split"] + (["fused_chunk"] if per == 1 else [])))
    return AttnSpec(kv, per, hd, qkv, draw(st.sampled_from(["expand", "repeat_interleave"])),
                    draw(st.booleans()), draw(st.booleans()), rope, draw(NORMS),
                    draw(st.sampled_from([None, None, "rms", "l2"])), draw(st.booleans()),
                    draw(rare(sorted(UNKNOWN_OPS))))


@st.composite
def net_specs(draw, attention: bool = True) -> NetSpec:
    block = st.one_of(mlp_specs(), attn_specs()) if attention else mlp_specs()
    blocks = tuple(draw(st.lists(block, min_size=1, max_size=2)))
    return NetSpec(draw(st.integers(2, 5)), draw(st.integers(3, 10)), draw(st.integers(1, 4)), blocks,
                   draw(NORMS), draw(rare(sorted(UNKNOWN_OPS))), draw(st.booleans()))


# -- modules built from specs ----------------------------------------------------------------------

# count -> attribute holding it. With HF's names fxprune updates them and the pruned module runs
# eagerly; with private names the module's code keeps the old sizes, and prune() must return the
# pruned graph instead.
HF_NAMES = {"q_heads": "num_heads", "kv_heads": "num_key_value_heads", "kv_groups": "num_key_value_groups",
            "mlp": "intermediate_size"}
PRIVATE_NAMES = {k: f"_{k}" for k in HF_NAMES}


class Sized(nn.Module):
    """A module whose code reads its sizes from attributes named after ``names``."""

    def __init__(self, hf_names: bool, **counts: int) -> None:
        super().__init__()
        self.names = HF_NAMES if hf_names else PRIVATE_NAMES
        for key, val in counts.items():
            setattr(self, self.names[key], val)

    def n(self, key: str) -> int:
        return getattr(self, self.names[key])


class Mlp(Sized):
    def __init__(self, d: int, s: MlpSpec, hf_names: bool) -> None:
        super().__init__(hf_names, mlp=s.width)
        self.s = s
        self.norm = make_norm(s.norm, d)
        if s.kind == "plain":
            self.up = nn.Linear(d, s.width)
        elif s.kind == "gated":
            self.gate, self.up = nn.Linear(d, s.width, bias=False), nn.Linear(d, s.width, bias=False)
        else:
            self.gate_up = nn.Linear(d, 2 * s.width)
        self.down = nn.Linear(s.width, d)

    def forward(self, x):
        s, h = self.s, self.norm(x)
        act = ACTS[s.act]
        if s.kind == "plain":
            mid = act(self.up(h))
        elif s.kind == "gated":
            mid = act(self.gate(h)) * self.up(h)
        elif s.kind == "fused_chunk":
            g, u = self.gate_up(h).chunk(2, dim=-1)
            mid = act(g) * u
        else:
            gu = self.gate_up(h)
            w = self.n("mlp")
            mid = act(gu[..., :w]) * gu[..., w:]
        if s.mid_op:
            mid = MID_OPS[s.mid_op](mid)
        out = self.down(mid)
        return x + out if s.residual else out


def rotate_half(x, how: str):
    if how == "chunk":
        a, b = x.chunk(2, dim=-1)
    else:
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
    return torch.cat((-b, a), dim=-1)


class Attention(Sized):
    def __init__(self, d: int, s: AttnSpec, hf_names: bool) -> None:
        super().__init__(hf_names, q_heads=s.kv_heads * s.per_kv, kv_heads=s.kv_heads, kv_groups=s.per_kv)
        self.s = s
        self.hd = s.head_dim
        self.norm = make_norm(s.norm, d)
        q, kv = self.n("q_heads") * self.hd, self.n("kv_heads") * self.hd
        if s.qkv == "separate":
            self.q_proj, self.k_proj = nn.Linear(d, q, bias=s.bias), nn.Linear(d, kv, bias=s.bias)
            self.v_proj = nn.Linear(d, kv, bias=s.bias)
        else:
            self.qkv_proj = nn.Linear(d, q + 2 * kv, bias=s.bias)
        self.o_proj = nn.Linear(q, d, bias=s.bias)
        if s.qk_norm == "rms":
            self.q_norm, self.k_norm = nn.RMSNorm(self.hd), nn.RMSNorm(self.hd)
        if s.rope:
            self.register_buffer("inv_freq", 1.0 / 10.0 ** (torch.arange(0, self.hd, 2).float() / self.hd))

    def forward(self, x):
        s = self.s
        b, n, _ = x.shape
        h = self.norm(x)
        if s.qkv == "separate":
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        elif s.qkv == "fused_chunk":
            q, k, v = self.qkv_proj(h).chunk(3, dim=-1)
        else:
            kv = self.n("kv_heads") * self.hd
            q, k, v = self.qkv_proj(h).split([self.n("q_heads") * self.hd, kv, kv], -1)
        q = q.view(b, n, -1, self.hd).transpose(1, 2)
        k = k.view(b, n, -1, self.hd).transpose(1, 2)
        v = v.view(b, n, -1, self.hd).transpose(1, 2)
        if s.qk_norm == "rms":
            q, k = self.q_norm(q), self.k_norm(k)
        elif s.qk_norm == "l2":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if s.rope:
            angles = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((angles, angles), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            q = q * cos + rotate_half(q, s.rope) * sin
            k = k * cos + rotate_half(k, s.rope) * sin
        if self.n("kv_groups") > 1:
            k, v = self._repeat_kv(k), self._repeat_kv(v)
        if s.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
            if s.causal:
                scores = scores + torch.full((n, n), float("-inf")).triu(1)
            a = scores.softmax(-1) @ v
        a = a.transpose(1, 2).reshape(b, n, self.n("q_heads") * self.hd)
        if s.unknown:
            a = UNKNOWN_OPS[s.unknown][0](a)
        return x + self.o_proj(a)

    def _repeat_kv(self, t):
        b, _, n, hd = t.shape
        if self.s.gqa == "repeat_interleave":
            return t.repeat_interleave(self.n("kv_groups"), dim=1)
        kv, per = self.n("kv_heads"), self.n("kv_groups")
        return t[:, :, None].expand(b, kv, per, n, hd).reshape(b, kv * per, n, hd)


class Net(nn.Module):
    def __init__(self, s: NetSpec) -> None:
        super().__init__()
        self.s = s
        self.inp = nn.Linear(s.d_in, s.d)
        self.layers = nn.ModuleList((Mlp if isinstance(b, MlpSpec) else Attention)(s.d, b, s.hf_names)
                                    for b in s.blocks)
        self.norm = make_norm(s.final_norm, s.d)
        self.out = nn.Linear(s.d, s.d_out)

    def forward(self, x):
        h = self.inp(x)
        if self.s.stream_op:
            h = UNKNOWN_OPS[self.s.stream_op][0](h)
        for layer in self.layers:
            h = layer(h)
        return self.out(self.norm(h))


def build(spec: NetSpec, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(spec).eval()
    with torch.no_grad():  # norms with non-trivial weights, so a wrong slice shows
        for mod in net.modules():
            if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                mod.weight.uniform_(0.5, 1.5)
    return net


def pinned_by_unknown(spec: NetSpec) -> dict[tuple[str, int], str]:
    """Parameter dims an unknown op touches (they must keep their size), with the op's name."""
    out = {}
    if spec.stream_op:
        out[("inp.weight", 0)] = UNKNOWN_OPS[spec.stream_op][1]
    for i, b in enumerate(spec.blocks):
        if isinstance(b, MlpSpec) and b.mid_op in UNKNOWN_OPS:
            out[(f"layers.{i}.down.weight", 1)] = UNKNOWN_OPS[b.mid_op][1]
        if isinstance(b, AttnSpec) and b.unknown:
            out[(f"layers.{i}.o_proj.weight", 1)] = UNKNOWN_OPS[b.unknown][1]
    return out


# -- the properties --------------------------------------------------------------------------------

def float_inputs(spec: NetSpec, shape: tuple[int, int], seed: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, spec.d_in, generator=g),)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and float((got - want).abs().max()) <= RTOL * max(1.0, float(want.abs().max()))


def random_plan(dg, rng: np.random.Generator, exact: bool = True) -> Plan:
    """Random units of every prunable group (GQA: the same count in every kv head). ``exact``:
    only groups where removal equals zero-masking (MLP / hidden channels, whole heads, kv groups)."""
    keep = {}
    for g in dg.prunable:
        if (exact and g.inexact) or g.units < 2:
            continue
        if g.block:  # GQA query heads: the same count inside every kv head
            per = int(rng.integers(1, g.block)) if g.block > 1 else 1
            keep[g.id] = [b * g.block + int(e) for b in range(g.units // g.block)
                          for e in sorted(rng.choice(g.block, per, replace=False))]
        elif g.kind in ("mlp", "hidden", "heads", "kv_heads") or not exact:
            keep[g.id] = sorted(rng.choice(g.units, int(rng.integers(1, g.units)), replace=False).tolist())
    return Plan(keep)


def check_refusal(exc: fxprune.FxpruneError) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg.strip(), f"refusal should be one line: {msg!r}"


def check_prune(model: nn.Module, x, fresh, spec_pins: dict[tuple[str, int], str], **kw) -> fxprune.api.PruneResult | None:
    """prune() either refuses with one clear line or returns a model that is right."""
    before = copy.deepcopy(model.state_dict())
    try:
        res = fxprune.prune(model, x, **kw)
    except fxprune.FxpruneError as exc:
        # these networks never compute values from a channel count, so a disagreement between the
        # pruned module and its pruned graph is a rewrite bug, not a model fxprune must refuse
        assert not isinstance(exc, VerificationError), exc
        check_refusal(exc)
        event(f"refused: {type(exc).__name__}: {str(exc)[:40]}")
        return None
    finally:
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    event("pruned" + (" (graph module returned)" if isinstance(res.model, torch.fx.GraphModule) else ""))
    # (a) the pruned module equals its pruned graph on another batch / sequence size
    got = run_model(res.model, fresh)
    assert close(got, run_model(res.graph_module, fresh)), "pruned eager module != pruned graph"
    # (b) it equals the zero-masked original where removal is exactly masking
    pruned = res.plan.pruned_groups(res.dg)
    if not any(g.inexact for g, _ in pruned):
        assert close(got, run_model(masked_copy(res.program, res.dg, res.plan), fresh)), \
            f"pruned != masked for {[g.id for g, _ in pruned]}"
    # an unknown op's dims are pinned, never pruned, and the op is named
    # the pruned graph module stands in when the module's own code hard-codes sizes (names get "m.")
    shapes = {name.removeprefix("m."): tuple(p.shape) for name, p in res.model.named_parameters()}
    orig = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for (param, dim), op in spec_pins.items():
        assert shapes[param][dim] == orig[param][dim], f"{param}:{dim} touches {op} but was pruned"
        assert any(f"op {op}" in u for u in res.report["unknown_ops"]), (op, res.report["unknown_ops"])
    assert res.report["params_after"] < res.report["params_before"]
    return res


def check_random_plans(model: nn.Module, x, fresh, seed: int, res=None) -> None:
    """Plans applied by the rewrite pass directly, whatever the ratio search would pick: an exact
    one equals masking (graph and module); one over all prunable groups runs and agrees."""
    program = res.program if res is not None else fxprune.capture(model, x)
    dg = res.dg if res is not None else fxprune.dependency_graph(program)
    rng = np.random.default_rng(seed)
    plan = random_plan(dg, rng)
    event(f"exact plan prunes {len(plan.keep)} groups")
    rw = apply_plan(program, dg, plan)
    want = run_model(masked_copy(program, dg, plan), fresh)
    assert close(run_model(rw.graph_module, fresh), want), f"graph != masked for {sorted(plan.keep)}"
    check_eager(rw, fresh, want, plan)
    # every prunable group at once, normalised ones included: no reference value, but the pruned
    # graph must run on new shapes, keep the output shape and agree with the pruned module
    plan = random_plan(dg, rng, exact=False)
    rw = apply_plan(program, dg, plan)
    got = run_model(rw.graph_module, fresh)
    assert got.shape == want.shape and torch.isfinite(got).all()
    check_eager(rw, fresh, got, plan)


def check_eager(rw, fresh, want: torch.Tensor, plan: Plan) -> None:
    """The pruned module agrees with ``want`` (when its own code can run at the new sizes)."""
    try:
        got = run_model(rw.model, fresh)
    except RuntimeError:  # the module's code hard-codes a size (prune() then returns the graph)
        event(f"pruned {type(rw.model).__name__} hard-codes a size")
        return
    assert close(got, want), f"pruned module != reference for {sorted(plan.keep)}"


# mostly with "mlp" (every network has an MLP-like group); without it, refusals are exercised
TARGETS = st.lists(st.sampled_from(["heads", "kv_heads", "hidden"]), max_size=3, unique=True).flatmap(
    lambda t: st.sampled_from([["mlp", *t], ["mlp", *t], ["mlp", *t], t or ["heads"]]))


@fuzz(45)
@given(spec=net_specs(), ratio=st.sampled_from([0.1, 0.2, 0.35]), importance=st.sampled_from(["l2", "random"]),
       targets=TARGETS, seed=st.integers(0, 2**16))
def test_random_networks_prune_correctly_or_refuse(spec, ratio, importance, targets, seed):
    model = build(spec, seed)
    for b in spec.blocks:
        event(f"block {type(b).__name__}" + (f" qk_norm={b.qk_norm}" if isinstance(b, AttnSpec) else ""))
    x, fresh = float_inputs(spec, CAPTURE_SHAPE, seed), float_inputs(spec, FRESH_SHAPE, seed + 1)
    res = check_prune(model, x, fresh, pinned_by_unknown(spec), ratio=ratio, importance=importance,
                      targets=tuple(targets), seed=seed)
    check_random_plans(model, x, fresh, seed, res)


@fuzz(4)
@given(spec=net_specs(), seed=st.integers(0, 2**16))
def test_random_networks_export_onnx_with_parity(spec, seed, tmp_path_factory):
    model = build(spec, seed)
    for b in spec.blocks:
        event(f"block {type(b).__name__}" + (f" qk_norm={b.qk_norm}" if isinstance(b, AttnSpec) else ""))
    x, fresh = float_inputs(spec, CAPTURE_SHAPE, seed), float_inputs(spec, FRESH_SHAPE, seed + 1)
    res = check_prune(model, x, fresh, pinned_by_unknown(spec), ratio=0.15, importance="l2",
                      targets=("heads", "kv_heads", "mlp", "hidden"), seed=seed)
    if res is None:
        return
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    info = fxprune.export_onnx(res, path)  # raises VerificationError when onnxruntime disagrees
    assert path.exists() and info["max_abs_diff"] is not None


@st.composite
def llama_configs(draw):
    from transformers import LlamaConfig

    kv, per, hd = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([2, 4]))
    hidden = kv * per * draw(st.integers(1, 3))  # HF requires hidden_size % heads == 0
    return LlamaConfig(vocab_size=32, hidden_size=max(hidden, 4), intermediate_size=draw(st.integers(4, 16)),
                       num_hidden_layers=draw(st.integers(1, 2)), num_attention_heads=kv * per,
                       num_key_value_heads=kv, head_dim=hd, tie_word_embeddings=draw(st.booleans()),
                       max_position_embeddings=64)


@fuzz(3)
@given(cfg=llama_configs(), importance=st.sampled_from(["l2", "random"]), targets=TARGETS, seed=st.integers(0, 2**16))
def test_random_llama_configs_prune_correctly_or_refuse(cfg, importance, targets, seed):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(0, 32, CAPTURE_SHAPE, generator=g)}
    fresh = {"input_ids": torch.randint(0, 32, FRESH_SHAPE, generator=g)}
    res = check_prune(model, x, fresh, {}, ratio=0.15, importance=importance, targets=tuple(targets), seed=seed)
    check_random_plans(model, x, fresh, seed, res)
