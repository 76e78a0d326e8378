"""One tiny graph per coupling rule: the groups it must produce."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.rules import RULES


def groups_of(model, *inputs):
    dg = fxprune.inspect_model(model.eval(), inputs if len(inputs) > 1 else inputs[0])
    return dg


def members(g):
    return {(m.param, m.dim) for m in g.members}


def find(dg, param, dim):
    for g in dg.groups:
        if (param, dim) in members(g):
            return g
    raise AssertionError(f"no group holds {param}:{dim}")


def test_rules_are_a_table():
    for op in ("linear", "view", "expand", "cat", "split", "slice", "scaled_dot_product_attention",
               "embedding", "layer_norm", "transpose", "permute", "matmul", "addmm", "conv2d"):
        assert callable(RULES[op])


def test_linear_chain_couples_out_rows_bias_and_next_columns():
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    dg = groups_of(m, torch.randn(2, 4))
    g = find(dg, "0.weight", 0)
    assert members(g) == {("0.weight", 0), ("0.bias", 0), ("2.weight", 1)}
    assert g.units == 6 and g.prunable
    assert not find(dg, "2.weight", 0).prunable  # model output
    assert "model output" in find(dg, "2.weight", 0).reason
    assert not find(dg, "0.weight", 1).prunable  # model input


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc(self.norm(h))
        return self.head(h)


def test_residual_add_embedding_and_layernorm_share_the_hidden_group():
    dg = groups_of(Residual(), torch.randint(0, 10, (2, 5)))
    g = find(dg, "emb.weight", 1)
    assert {("norm.weight", 0), ("norm.bias", 0), ("fc.weight", 0), ("fc.weight", 1),
            ("fc.bias", 0), ("head.weight", 1)} <= members(g)
    assert g.kind == "hidden" and g.inexact  # LayerNorm statistics change when channels go
    vocab = find(dg, "emb.weight", 0)
    assert not vocab.prunable and "vocabulary" in vocab.reason


class Heads(nn.Module):
    """Multi-head attention written with view / transpose / matmul / softmax."""

    def __init__(self, d=8, h=2):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.h, d // self.h).transpose(1, 2)
        k = self.k(x).view(b, s, self.h, d // self.h).transpose(1, 2)
        v = self.v(x).view(b, s, self.h, d // self.h).permute(0, 2, 1, 3)
        a = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(b, s, d))


def test_view_transpose_matmul_make_head_groups():
    dg = groups_of(Heads(), torch.randn(2, 5, 8))
    g = find(dg, "o.weight", 1)
    assert g.kind == "heads" and g.units == 2 and g.unit_size == 4 and g.prunable
    assert {("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)} <= members(g)
    q = next(m for m in g.members if m.param == "q.weight")
    assert q.unit_of.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


class Gqa(nn.Module):
    """4 query heads sharing 2 kv heads through expand + reshape, as HF's repeat_kv does."""

    def __init__(self, d=16, hq=4, hkv=2, hd=4):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, hd
        self.q = nn.Linear(d, hq * hd, bias=False)
        self.k = nn.Linear(d, hkv * hd, bias=False)
        self.v = nn.Linear(d, hkv * hd, bias=False)
        self.o = nn.Linear(hq * hd, d, bias=False)

    def qk(self, q, k):
        return q, k

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.hd).transpose(1, 2)
        q, k = self.qk(q, k)
        v = self.v(x).view(b, s, -1, self.hd).transpose(1, 2)
        n = self.hq // self.hkv
        k = k[:, :, None].expand(b, self.hkv, n, s, self.hd).reshape(b, self.hq, s, self.hd)
        v = v[:, :, None].expand(b, self.hkv, n, s, self.hd).reshape(b, self.hq, s, self.hd)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


def test_gqa_expand_reshape_gives_kv_groups_and_query_heads_inside_them():
    dg = groups_of(Gqa(), torch.randn(2, 5, 16))
    kv = find(dg, "k.weight", 0)
    assert kv.kind == "kv_heads" and kv.units == 2
    assert {("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)} == members(kv)
    q = next(m for m in kv.members if m.param == "q.weight")
    assert q.unit_of.tolist() == [0] * 8 + [1] * 8  # query heads 0,1 belong to kv head 0
    heads = next(g for g in dg.groups if g.kind == "heads")
    assert heads.units == 4 and heads.block == 2
    assert members(heads) == {("q.weight", 0), ("o.weight", 1)}


class FusedQkv(nn.Module):
    def __init__(self, d=8, h=2):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.h, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(b, s, d))


def test_split_of_fused_qkv_maps_rows_of_each_head():
    dg = groups_of(FusedQkv(), torch.randn(2, 5, 8))
    g = find(dg, "o.weight", 1)
    assert g.kind == "heads" and g.units == 2
    qkv = next(m for m in g.members if m.param == "qkv.weight" and m.dim == 0)
    # rows: q head0, q head1, k head0, k head1, v head0, v head1 (4 rows each)
    assert qkv.unit_of.tolist() == ([0] * 4 + [1] * 4) * 3


class GateUp(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear(4, 12)
        self.down = nn.Linear(6, 4)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def test_chunk_of_fused_gate_up_pairs_gate_and_up_rows():
    dg = groups_of(GateUp(), torch.randn(2, 3, 4))
    g = find(dg, "down.weight", 1)
    assert g.kind == "mlp" and g.units == 6 and g.prunable
    gu = next(m for m in g.members if m.param == "gate_up.weight")
    assert gu.unit_of.tolist() == list(range(6)) * 2


class RotateHalf(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 2, 4)
        q = q + torch.cat((-q[..., 2:], q[..., :2]), dim=-1)  # slice + neg + cat: rotate-half
        return self.o(q.reshape(b, s, 8))


def test_slice_and_cat_of_rotate_half_pin_head_dim_but_not_heads():
    dg = groups_of(RotateHalf(), torch.randn(2, 3, 8))
    heads = find(dg, "o.weight", 1)
    assert heads.kind == "heads" and heads.prunable and heads.units == 2
    pinned = [g for g in dg.groups if not g.prunable and "RoPE" in g.reason]
    assert pinned, [g.reason for g in dg.groups]


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))).mean((2, 3))


def test_conv2d_channels():
    dg = groups_of(Convs(), torch.randn(2, 3, 6, 6))
    g = find(dg, "c1.weight", 0)
    assert members(g) == {("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 1)} and g.prunable


class StackPairs(nn.Module):
    """GPT-J's rotate_every_two: stack (-x2, x1) on a new last dim, flatten it back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)  # (batch, 6)
        pairs = torch.stack((-h, h * 2), dim=0)  # (2, batch, 6): the 6 channels pass through
        return self.b(pairs.sum(0))


class RepeatInterleave(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(12, 2)
        self.c = nn.Linear(4, 3)

    def forward(self, x):
        wide = torch.repeat_interleave(self.a(x), 2, dim=-1)  # 6 channels -> 12
        rows = torch.repeat_interleave(self.c(x), 2, dim=0)  # batch repeated: channels pass through
        return self.b(wide).sum() + rows.sum()


def test_stack_passes_the_stacked_tensors_dims_through():
    dg = groups_of(StackPairs(), torch.randn(2, 4))
    g = find(dg, "a.weight", 0)
    assert g.prunable and ("b.weight", 1) in members(g) and g.units == 6
    assert not dg.unknown_ops


def test_repeat_interleave_pins_the_repeated_dim_only():
    dg = groups_of(RepeatInterleave(), torch.randn(2, 4))
    g = find(dg, "a.weight", 0)
    assert not g.prunable and "repeat_interleave" in g.reason
    assert find(dg, "c.weight", 0).prunable  # repeated over the batch, its channels are free
    assert not dg.unknown_ops


class SmallCNN(nn.Module):
    """conv-BN-ReLU, max pool, a residual block, adaptive average pool, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.inner = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.back = nn.Sequential(nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.back(self.inner(h)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _randomize_bn(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def test_batch_norm_and_pooling_keep_conv_channels_prunable():
    dg = groups_of(_randomize_bn(SmallCNN()), torch.randn(2, 3, 8, 8))
    inner = find(dg, "inner.0.weight", 0)
    assert inner.prunable and not inner.inexact and inner.units == 12
    assert {("inner.1.weight", 0), ("inner.1.bias", 0), ("back.0.weight", 1)} <= members(inner)
    assert any(m.param == "inner.1.running_mean" for m in inner.members)  # statistics go with the channel
    stream = find(dg, "stem.0.weight", 0)  # the residual stream: stem conv, BN, back conv, head columns
    assert stream.prunable and {("back.1.weight", 0), ("head.weight", 1)} <= members(stream)
    kernel = find(dg, "inner.0.weight", 2)
    assert not kernel.prunable and "kernel size" in kernel.reason
    assert not dg.unknown_ops


def test_pruned_cnn_equals_masked_and_batch_norm_shrinks():
    from fxprune.passes.rewrite import apply_plan, masked_copy
    from fxprune.plan import Plan

    model = _randomize_bn(SmallCNN())
    program = fxprune.capture(model, torch.randn(2, 3, 8, 8))
    dg = fxprune.dependency_graph(program)
    inner, stream = find(dg, "inner.0.weight", 0), find(dg, "stem.0.weight", 0)
    plan = Plan({inner.id: [0, 2, 3, 7, 11], stream.id: [1, 2, 4, 5, 6]})
    rw = apply_plan(program, dg, plan)
    x = torch.randn(3, 3, 8, 8)
    ref = masked_copy(program, dg, plan)(x)
    assert (rw.model(x) - ref).abs().max() < 1e-5
    assert rw.model.inner[1].num_features == 5 and rw.model.inner[1].running_var.shape == (5,)


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)
        self.c = nn.Linear(4, 3)
        self.d = nn.Linear(4, 2)

    def forward(self, x):  # x: (batch, seq, 4)
        h = F.pad(self.a(x), (0, 0, 1, 2))  # the sequence padded, not the channels
        g = F.pad(self.c(x), (1, 0))  # the channels padded: 3 -> 4
        return self.b(h).mean(1) + self.d(g).mean(1)


def test_pad_passes_unpadded_dims_and_pins_padded_ones():
    dg = groups_of(Padded(), torch.randn(2, 5, 4))
    assert find(dg, "a.weight", 0).prunable  # channels were not padded
    padded = find(dg, "c.weight", 0)
    assert not padded.prunable and "padded dim" in padded.reason
    assert not dg.unknown_ops


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))  # no rule for cumsum


def test_unknown_op_pins_its_dims_and_is_named():
    dg = groups_of(Unknown(), torch.randn(2, 4))
    g = find(dg, "a.weight", 0)
    assert not g.prunable and "cumsum" in g.reason
    assert any("cumsum" in u for u in dg.unknown_ops)


def test_tied_embedding_is_one_member_with_alias():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    dg = groups_of(LlamaForCausalLM(cfg), {"input_ids": torch.randint(0, 32, (2, 5))})
    hidden = [g for g in dg.groups if g.kind == "hidden"]
    assert len(hidden) == 1
    names = [m.param for m in hidden[0].members]
    emb = [m for m in hidden[0].members if "embed_tokens" in m.param or "lm_head" in m.param]
    assert len(emb) == 1 and emb[0].aliases  # one parameter, two roles
    assert "model.norm.weight" in names


@pytest.mark.parametrize("batch", [1])
def test_batch_of_one_is_refused(batch):
    with pytest.raises(fxprune.FxpruneError, match="batch"):
        fxprune.capture(nn.Linear(2, 2), torch.randn(batch, 2))


class VectorNorm(nn.Module):
    """L2 normalisation written three ways: linalg_vector_norm takes (x, ord, dim, keepdim)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        if self.how == "normalize":
            h = F.normalize(h, dim=-1)
        elif self.how == "norm_keepdim":
            h = h / h.norm(dim=-1, keepdim=True)
        else:
            h = h * torch.linalg.vector_norm(h, dim=-1)[..., None]
        return self.b(h)


@pytest.mark.parametrize("how", ["normalize", "norm_keepdim", "vector_norm"])
def test_vector_norm_reads_its_dim_after_ord(how):
    # regression (fuzz): ord was read as the dim -> TypeError / IndexError / a wrongly coupled dim
    dg = groups_of(VectorNorm(how), torch.randn(2, 4))
    g = find(dg, "a.weight", 0)
    assert members(g) == {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)}
    assert g.prunable and g.inexact  # normalised over the channels: removal is not masking


class SoftmaxOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        return self.b(self.a(x).softmax(-1))


def test_softmax_over_channels_is_inexact():
    # regression (fuzz): softmax renormalises over its dim, so zeroing a channel != removing it
    g = find(groups_of(SoftmaxOverChannels(), torch.randn(2, 4)), "a.weight", 0)
    assert g.prunable and g.inexact
    heads = find(groups_of(Heads(), torch.randn(2, 5, 8)), "o.weight", 1)  # softmax over keys only
    assert not heads.inexact


class L2QkNorm(Gqa):
    """GQA whose q and k are L2-normalised over head_dim: F.normalize uses norm.expand_as(x)."""

    def qk(self, q, k):
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1)


def test_expand_as_broadcast_is_not_mistaken_for_gqa_query_heads():
    # regression (fuzz): expand_as marked head_dim as a GQA broadcast factor, making a bogus
    # "heads" group over (query head x head_dim) whose pruning broke the graph's expand sizes
    dg = groups_of(L2QkNorm(), torch.randn(2, 5, 16))
    heads = [g for g in dg.groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].units == 4 and heads[0].block == 2
    assert find(dg, "k.weight", 0).kind == "kv_heads"
    hd = [g for g in dg.groups if g.kind == "other" and any(m.param == "q.weight" for m in g.members)]
    assert hd and not any(g.prunable for g in hd)  # head_dim stays pinned
    res = fxprune.prune(L2QkNorm().eval(), torch.randn(2, 5, 16), ratio=0.2, targets=("heads", "kv_heads"))
    x = torch.randn(3, 7, 16)
    assert (res.graph_module(x) - res.model(x)).abs().max() < 1e-5


class OneHeadSdpa(nn.Module):
    """One attention head: the view to (b, 1, s, d) has no heads x head_dim product to pin."""

    def __init__(self, d=8, hd=4):
        super().__init__()
        self.hd = hd
        self.q, self.k, self.v = nn.Linear(d, hd), nn.Linear(d, hd), nn.Linear(d, hd)
        self.o = nn.Linear(hd, d)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, self.hd))


def test_sdpa_default_scale_pins_query_key_channels():
    # regression (fuzz): with one head, q/k channels became an "mlp" group; removing them changed
    # SDPA's 1/sqrt(head_dim) scale, so the pruned model differed from the masked one
    dg = groups_of(OneHeadSdpa(), torch.randn(2, 5, 8))
    qk = find(dg, "q.weight", 0)
    assert ("k.weight", 0) in members(qk) and not qk.prunable and "scale" in qk.reason
    assert find(dg, "v.weight", 0).prunable  # v / o channels do not enter the scale


class PoolOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 2)

    def forward(self, x):  # (batch, seq, 4) -> 8 channels pooled pairwise -> 4
        return self.b(F.max_pool1d(self.a(x), 2))


def test_pooling_over_channels_pins_them():
    dg = groups_of(PoolOverChannels(), torch.randn(2, 3, 4))
    g = find(dg, "a.weight", 0)
    assert not g.prunable and "pooled dim" in g.reason


class MinMax(nn.Module):
    """xIELU-style activation: an elementwise min with a tensor, expm1; then a reduction max."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, reduce: bool = False):
        h = self.a(x)
        h = torch.where(h > 0, h, torch.expm1(torch.min(h, torch.zeros_like(h))))
        if reduce:
            h = h - torch.max(h, dim=-1, keepdim=True).values  # a reduction over the channels
        return self.b(torch.maximum(h, -torch.ones_like(h)))


def test_min_of_two_tensors_and_expm1_are_elementwise():
    dg = groups_of(MinMax(), torch.randn(2, 4))
    g = find(dg, "a.weight", 0)
    assert g.prunable and ("b.weight", 1) in members(g)
    assert not dg.unknown_ops


def test_max_over_a_dim_is_a_reduction():
    dg = groups_of(MinMax(), torch.randn(2, 4), True)
    g = find(dg, "a.weight", 0)
    assert g.prunable and g.inexact and not dg.unknown_ops  # max over the channels: values change
    heads = find(groups_of(SinkHeads(), torch.randn(2, 5, 8)), "o.weight", 1)
    assert heads.prunable and not heads.inexact  # max over the keys (attention sinks) only


class SinkHeads(nn.Module):
    """Attention with a learned sink logit per head, stabilised by a max over the keys (GPT-OSS)."""

    def __init__(self, d=8, h=2):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.sinks = nn.Parameter(torch.randn(h))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.h, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        logits = q @ k.transpose(-1, -2)
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, 1)
        both = torch.cat([logits, sinks], dim=-1)
        both = both - both.max(dim=-1, keepdim=True).values
        probs = both.softmax(-1)[..., :-1]
        return self.o((probs @ v).transpose(1, 2).reshape(b, s, d))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, depthwise 3x3 (groups = channels), 1x1 project; plus a
    grouped conv with two channels per group, which stays pinned."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(4, 12, 1), nn.BatchNorm2d(12), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU6())
        self.project = nn.Conv2d(12, 4, 1)
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.head(torch.relu(self.grouped(x))).mean((2, 3))


def test_depthwise_conv_keeps_its_channels_prunable():
    dg = groups_of(_randomize_bn(InvertedResidual()), torch.randn(2, 4, 6, 6))
    g = find(dg, "expand.0.weight", 0)
    assert g.prunable and not g.inexact and g.units == 12
    assert {("depthwise.0.weight", 0), ("depthwise.0.bias", 0), ("depthwise.1.weight", 0),
            ("project.weight", 1)} <= members(g)
    assert not any(("depthwise.0.weight", 1) in members(h) for h in dg.prunable)  # one input channel per group
    assert not find(dg, "grouped.weight", 0).prunable and "grouped convolution" in find(dg, "grouped.weight", 0).reason


def test_pruned_depthwise_conv_equals_masked_and_exports(tmp_path):
    from fxprune.passes.rewrite import apply_plan, masked_copy
    from fxprune.plan import Plan

    model = _randomize_bn(InvertedResidual()).eval()
    program = fxprune.capture(model, torch.randn(2, 4, 6, 6))
    dg = fxprune.dependency_graph(program)
    g = find(dg, "expand.0.weight", 0)
    plan = Plan({g.id: [0, 3, 4, 8, 10]})
    rw = apply_plan(program, dg, plan)
    x = torch.randn(3, 4, 6, 6)
    ref = masked_copy(program, dg, plan)(x)
    assert (rw.model(x) - ref).abs().max() < 1e-5 and (rw.graph_module(x) - ref).abs().max() < 1e-5
    conv = rw.model.depthwise[0]
    assert conv.groups == conv.in_channels == conv.out_channels == 5 and conv.weight.shape == (5, 1, 3, 3)
    res = fxprune.prune(model, torch.randn(2, 4, 6, 6), plan=plan)
    assert fxprune.export_onnx(res, tmp_path / "m.onnx")["max_abs_diff"] <= 1e-4


class OneHead(nn.Module):
    """Attention whose head count is written -1 and comes out 1, as SegFormer's first stage."""

    def __init__(self, d=8):
        super().__init__()
        self.head_dim = d
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-1, -2) * 0.5).softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(b, s, -1))


def test_single_inferred_head_pins_its_channels():
    dg = groups_of(OneHead(), torch.randn(2, 5, 8))
    g = find(dg, "q.weight", 0)
    assert not g.prunable and "single head" in g.reason


class Filled(nn.Module):
    """Channels meet tensors made with a constant size: filled ones (zeros / ones / full / new_*)
    shrink with the channels; arange has a different value at each position, so it pins them."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        if self.op == "zeros":
            h = h + torch.zeros(1, 6)
        elif self.op == "full":
            h = h * torch.full((6,), 0.5)
        elif self.op == "new_ones":
            h = h - x.new_ones((x.shape[0], 6))
        else:
            h = h + torch.arange(6, dtype=h.dtype)
        return self.b(torch.relu(h))


@pytest.mark.parametrize("op", ["zeros", "full", "new_ones"])
def test_filled_tensor_sizes_shrink_with_the_channels(op):
    from fxprune.passes.rewrite import apply_plan, masked_copy
    from fxprune.plan import Plan

    model, x = Filled(op).eval(), torch.randn(2, 4)
    program = fxprune.capture(model, x)
    dg = fxprune.dependency_graph(program)
    g = find(dg, "a.weight", 0)
    assert g.prunable and not g.inexact and ("b.weight", 1) in members(g) and not dg.unknown_ops
    plan = Plan({g.id: [0, 2, 5]})
    pruned = apply_plan(program, dg, plan)
    assert pruned.model.a.weight.shape[0] == 3
    x2 = torch.randn(3, 4)
    ref = masked_copy(program, dg, plan)(x2)
    assert torch.allclose(pruned.graph_module(x2), ref, atol=1e-6)


def test_arange_of_the_channel_count_pins_it():
    g = find(groups_of(Filled("arange"), torch.randn(2, 4)), "a.weight", 0)
    assert not g.prunable and "constant size" in g.reason


class Interleaved(nn.Module):
    """GPT-OSS-style fused gate/up with interleaved channels, a per-expert bias gathered by id, and
    a top-k over router logits."""

    def __init__(self, step_slice: bool = True):
        super().__init__()
        self.step_slice = step_slice
        self.a, self.b, self.router = nn.Linear(4, 12), nn.Linear(6, 3), nn.Linear(4, 3)
        self.bias = nn.Parameter(torch.randn(3, 12))

    def forward(self, x):
        ids = torch.topk(self.router(x), 1, dim=-1).indices[..., 0]
        h = self.a(x) + self.bias[ids]
        if self.step_slice:
            gate, up = h[..., ::2], h[..., 1::2]
        else:  # a strided slice of part of the dim: which channels it takes depends on the bounds
            gate, up = h[..., 0:11:2], h[..., 1:12:2]
        return self.b(F.silu(gate) * up)


def test_interleaved_channels_prune_in_pairs_and_gathered_dims_pin():
    from fxprune.passes.rewrite import apply_plan, masked_copy
    from fxprune.plan import Plan

    model, x = Interleaved().eval(), torch.randn(2, 4)
    program = fxprune.capture(model, x)
    dg = fxprune.dependency_graph(program)
    g = find(dg, "b.weight", 1)
    assert g.kind == "mlp" and g.prunable and not g.inexact and g.units == 6 and not dg.unknown_ops
    assert {("a.weight", 0), ("a.bias", 0), ("bias", 1)} <= members(g)
    rows = {m.param: m.unit_of for m in g.members}["a.weight"]
    assert rows.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # channel c is rows 2c (gate) and 2c+1 (up)
    assert "gathered by index" in find(dg, "bias", 0).reason
    assert "sorted by value" in find(dg, "router.weight", 0).reason
    plan = Plan({g.id: [0, 2, 5]})
    pruned = apply_plan(program, dg, plan)
    assert pruned.model.a.weight.shape[0] == 6 and pruned.model.bias.shape == (3, 6)
    x2 = torch.randn(5, 4)
    ref = masked_copy(program, dg, plan)(x2)
    assert torch.allclose(pruned.model(x2), ref, atol=1e-6) and torch.allclose(pruned.graph_module(x2), ref, atol=1e-6)


def test_strided_slice_of_part_of_a_dim_pins_it():
    g = find(groups_of(Interleaved(step_slice=False), torch.randn(2, 4)), "a.weight", 0)
    assert not g.prunable and "strided" in g.reason


class SortChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.a(x).sort(-1).values)


def test_sort_over_the_channels_pins_them_on_both_sides():
    dg = groups_of(SortChannels(), torch.randn(2, 4))
    for param, dim in (("a.weight", 0), ("b.weight", 1)):
        g = find(dg, param, dim)
        assert not g.prunable and "sorted by value" in g.reason
