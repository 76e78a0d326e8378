"""Architecture sweep: the Hugging Face families users bring, as tiny random models.

For each: removing whole MLP channels / heads / kv groups equals zero-masking them (where the
dependency graph calls the group exact), a 20% prune runs and its graph agrees with its module,
the pruned model exports to ONNX that onnxruntime runs like torch, and it saves and reloads as its
own class. test_rewrite.py covers Llama, BERT, GPT-2, Qwen3 and Phi-3 the same way.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fxprune
from fxprune.api import run_model
from fxprune.passes.rewrite import apply_plan, masked_copy
from fxprune.plan import Plan

VOCAB = 64


def tiny(name: str) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    c = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    gqa = dict(num_attention_heads=4, num_key_value_heads=2)
    configs = {
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**c, **gqa)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**c, **gqa)),  # q/k/v biases
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**c, **gqa, head_dim=8)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**c, **gqa, head_dim=8)),  # soft-capping, 4 norms
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**c, **gqa, num_local_experts=4,
                                                                num_experts_per_tok=2)),  # experts: grouped_mm
        "olmo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**c, **gqa, eos_token_id=0, pad_token_id=0)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**c, num_attention_heads=4)),  # fused qkv
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, num_kv_heads=2,
                                                             new_decoder_architecture=True)),
        # rotary on part of each head: stack, repeat_interleave
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                                    num_attention_heads=4, word_embed_proj_dim=32,
                                                    max_position_embeddings=64)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=48, n_layers=2,
                                                                   n_heads=4, max_position_embeddings=64)),
        "t5_encoder": lambda: T.T5EncoderModel(T.T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, d_kv=8, num_layers=2,
                                                          num_heads=4)),
        "mobilebert": lambda: T.MobileBertModel(T.MobileBertConfig(vocab_size=VOCAB, hidden_size=32, embedding_size=16,
                                                                   intermediate_size=48, num_hidden_layers=2,
                                                                   num_attention_heads=4, intra_bottleneck_size=16,
                                                                   true_hidden_size=16)),  # pad
        "resnet": lambda: T.ResNetModel(T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                       depths=[1, 1], layer_type="basic")),  # batch norm, pooling
        "whisper": lambda: T.WhisperForAudioClassification(T.WhisperConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
            max_source_positions=16)),  # (batch, mel bins, frames): only the batch may change
        # a config without head_dim: Phi-3's rotary embedding derives it from the head count each forward
        "phimoe": lambda: T.PhimoeForCausalLM(T.PhimoeConfig(**c, **gqa, num_local_experts=4, num_experts_per_tok=2)),
        # multi-query attention split at ``embed_dim``, which there is the query width
        "gpt_bigcode": lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                                          n_positions=64, multi_query=True)),
        # one relative position bias shared by every layer: all layers' heads are one group
        "mpnet": lambda: T.MPNetModel(T.MPNetConfig(**c, num_attention_heads=4, max_position_embeddings=64)),
        # xIELU activation (min of two tensors, expm1)
        "apertus": lambda: T.ApertusForCausalLM(T.ApertusConfig(**c, **gqa, pad_token_id=0)),
        # attention sinks (a learned logit per head, max over the keys); experts' biases gathered by
        # expert id (index), gate and up interleaved in one projection (x[..., ::2], x[..., 1::2])
        "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(**c, **gqa, head_dim=8, num_local_experts=4,
                                                              num_experts_per_tok=2, pad_token_id=0)),
        # encoder-decoder: self- and cross-attention in one decoder layer, relative bias shared by layers
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, d_kv=8, num_layers=2,
                                                               num_heads=4, decoder_start_token_id=0)),
        # sinusoidal position tables that save_pretrained leaves out
        "marian": lambda: T.MarianMTModel(T.MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                                         encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                                                         pad_token_id=1, decoder_start_token_id=1)),
        # attention-pooling head: nn.MultiheadAttention splits its packed in_proj parameter
        "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                                   num_attention_heads=4, image_size=16, patch_size=4)),
        # short convolutions between attention layers; the MAC count once failed on them
        "lfm2": lambda: T.Lfm2ForCausalLM(T.Lfm2Config(**c, **gqa, pad_token_id=0, layer_types=["conv", "full_attention"])),
        # multi-head latent attention (low-rank q / kv bottlenecks with an RMSNorm: kind "rank"), a
        # dense first layer, then routed + shared experts
        "deepseek_v3": lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            **{**c, "num_hidden_layers": 3}, num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=16,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
            v_head_dim=8, pad_token_id=0)),
        "vit": lambda: T.ViTModel(T.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=16, patch_size=4, num_channels=3)),
    }
    return configs[name]().eval()


ARCHS = ["mistral", "mixtral", "qwen2", "gemma", "gemma2", "olmo2", "gpt_neox", "falcon", "gptj", "bloom", "opt",
         "distilbert", "t5_encoder", "mobilebert", "resnet", "whisper", "vit", "phimoe", "gpt_bigcode", "mpnet",
         "apertus", "t5", "marian", "siglip", "lfm2", "deepseek_v3", "gpt_oss"]


def inputs(name: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "whisper":
        return {"input_features": torch.randn(batch, 8, 32, generator=g)}
    if name in ("t5", "marian"):
        ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
        return {"input_ids": ids, "decoder_input_ids": ids[:, : max(1, seq - 2)].flip(1)}
    if name in ("vit", "resnet", "siglip"):
        side = 32 if name == "resnet" else 16
        return {"pixel_values": torch.randn(batch, 3, side, side, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def exact_plan(dg, seed: int = 0) -> Plan:
    """Half of each exact MLP group, one head (or kv group) of each exact attention group."""
    rng = np.random.default_rng(seed)
    keep = {}
    for g in dg.prunable:
        if g.inexact or g.units < 2:
            continue
        if g.kind == "mlp":
            keep[g.id] = sorted(rng.choice(g.units, g.units // 2, replace=False).tolist())
        elif g.kind == "heads" and g.block > 1:  # GQA: the same number of query heads per kv group
            keep[g.id] = [b * g.block + int(e) for b in range(g.units // g.block)
                          for e in sorted(rng.choice(g.block, g.block - 1, replace=False))]
        elif g.kind in ("heads", "kv_heads"):
            keep[g.id] = sorted(rng.choice(g.units, g.units - 1, replace=False).tolist())
    return Plan(keep)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_equals_masked(arch):
    model = tiny(arch)
    before = copy.deepcopy(model.state_dict())
    program = fxprune.capture(model, inputs(arch))
    dg = fxprune.dependency_graph(program)
    plan = exact_plan(dg)
    assert any(g.kind == "mlp" for g in dg.prunable if g.id in plan.keep)
    rw = apply_plan(program, dg, plan)
    x = inputs(arch, 3, 11, seed=2)
    ref = run_model(masked_copy(program, dg, plan), x)
    assert (run_model(rw.model, x) - ref).abs().max() < 1e-5
    assert (run_model(rw.graph_module, x) - ref).abs().max() < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched


def test_cross_head_norm_marks_heads_inexact():
    """OLMo2 normalises q and k over all heads at once: removing a head changes the others' scale,
    so its head groups must not be called exact (masking would not predict the pruned model)."""
    dg = fxprune.dependency_graph(fxprune.capture(tiny("olmo2"), inputs("olmo2")))
    attention = [g for g in dg.prunable if g.kind in ("heads", "kv_heads")]
    assert attention and all(g.inexact for g in attention)
    assert not any(g.inexact for g in dg.prunable if g.kind == "mlp")


def test_gptj_heads_are_prunable():
    """GPT-J's rotary embedding (stack, repeat_interleave over the rotary dims) pins head_dim only."""
    dg = fxprune.dependency_graph(fxprune.capture(tiny("gptj"), inputs("gptj")))
    heads = [g for g in dg.groups if g.kind == "heads"]
    assert heads and all(g.prunable and not g.inexact for g in heads)
    assert not dg.unknown_ops


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_and_export_onnx(arch, tmp_path):
    model = tiny(arch)
    res = fxprune.prune(model, inputs(arch), ratio=0.2, targets=("heads", "kv_heads", "mlp"))
    assert res.report["removed_fraction"] >= 0.2 - 1e-9
    assert type(res.model) is type(model), res.report["notes"]  # the eager module runs, not only the graph
    x = inputs(arch, 3, 13, seed=3)
    assert (run_model(res.model, x) - run_model(res.graph_module, x)).abs().max() < 1e-5
    rep = fxprune.export_onnx(res, tmp_path / f"{arch}.onnx")
    assert rep["max_abs_diff"] is not None and rep["max_abs_diff"] <= 1e-4
    if arch == "whisper":  # its mel bins are fixed: the check fed 23 of them before
        assert rep["inputs"][0]["shape"][1:] == [8, 32] and rep["verified_on"]["input_features"][1:] == [8, 32]


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload(arch, tmp_path):
    """The saved directory rebuilds the pruned model exactly, for families whose attention derives
    head_dim from hidden_size // heads (Qwen2, OPT, OLMo 2), refuses a head count that does not
    divide hidden_size (GPT-J, BLOOM) or saves a weight under its hub name (GPT-NeoX's embed_out)."""
    model = tiny(arch)
    res = fxprune.prune(model, inputs(arch), ratio=0.25, targets=("heads", "kv_heads", "mlp"))
    fxprune.save(res, tmp_path / arch)
    back, _ = fxprune.load_model(str(tmp_path / arch))
    assert type(back) is type(model)
    x = inputs(arch, 3, 9, seed=5)
    assert torch.equal(run_model(back, x), run_model(res.model, x))
    assert sum(p.numel() for p in back.parameters()) == res.report["params_after"]


def test_attention_sinks_prune_with_their_heads(tmp_path):
    """GPT-OSS: each head's sink logit goes with the head; the max over the keys that stabilises the
    softmax is a reduction, not an unknown op, and its unused indices pin nothing."""
    model = tiny("gpt_oss")
    program = fxprune.capture(model, inputs("gpt_oss"))
    dg = fxprune.dependency_graph(program)
    heads = [g for g in dg.groups if g.kind == "heads"]
    assert heads and all(g.prunable and not g.inexact for g in heads)
    assert all(any(m.param.endswith("self_attn.sinks") for m in g.members) for g in heads)
    plan = exact_plan(dg)
    x = inputs("gpt_oss", 3, 11, seed=2)
    ref = run_model(masked_copy(program, dg, plan), x)
    assert (run_model(apply_plan(program, dg, plan).model, x) - ref).abs().max() < 1e-5
    res = fxprune.prune(model, inputs("gpt_oss"), ratio=0.05, targets=("heads", "kv_heads"))
    assert type(res.model) is type(model) and res.model.model.layers[0].self_attn.sinks.numel() < 4
    fxprune.save(res, tmp_path / "m")
    assert torch.equal(run_model(fxprune.load_model(str(tmp_path / "m"))[0], x), run_model(res.model, x))
    assert fxprune.export_onnx(res, tmp_path / "m.onnx")["max_abs_diff"] <= 1e-4


def test_self_and_cross_attention_keep_their_own_head_counts(tmp_path):
    """T5's attention modules read n_heads: in one decoder layer the self-attention, the
    cross-attention and the encoder layer of the same index may keep different numbers of heads."""
    model = tiny("t5")
    program = fxprune.capture(model, inputs("t5"))
    dg = fxprune.dependency_graph(program)
    heads = [g for g in dg.prunable if g.kind == "heads" and not g.inexact]
    mlp = [g for g in dg.prunable if g.kind == "mlp"]
    # decoder self-attention, cross-attention (zero position bias: torch.zeros((1, n_heads, q, k)))
    # and encoder self-attention, each tied across its stack by the shared position bias
    assert len(heads) == 3 and any("EncDecAttention" in g.id for g in heads) and mlp
    plan = Plan({**{g.id: list(range(g.units - 1 - i % 2)) for i, g in enumerate(heads)},  # 3, 2, 3: no broadcasting
                 **{g.id: list(range(8 + 4 * i)) for i, g in enumerate(mlp)}})
    x = inputs("t5", 3, 9, seed=4)
    ref = run_model(masked_copy(program, dg, plan), x)
    assert (run_model(apply_plan(program, dg, plan).model, x) - ref).abs().max() < 1e-5
    res = fxprune.prune(model, inputs("t5"), plan=plan)
    assert type(res.model) is type(model)
    assert res.model.decoder.block[1].layer[1].EncDecAttention.n_heads == 2
    assert (run_model(res.model, x) - ref).abs().max() < 1e-5
    fxprune.save(res, tmp_path / "t5")
    back, _ = fxprune.load_model(str(tmp_path / "t5"))
    assert torch.equal(run_model(back, x), run_model(res.model, x))


@pytest.mark.parametrize("arch", ["mamba", "recurrent_gemma"])
def test_recurrent_stacks_prune_exactly_and_reload(arch, tmp_path):
    """Mamba's dt-rank channels (x_proj rows -> dt_proj columns) are split off at the mixer's
    time_step_rank; RecurrentGemma's only rotary buffer lives in its second (attention) layer, which
    a one-layer reference instance lacks. Both export with a static sequence length: same-shape inputs."""
    import transformers as T

    torch.manual_seed(0)
    if arch == "mamba":
        model = T.MambaForCausalLM(T.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8,
                                                 expand=2, conv_kernel=4, pad_token_id=0)).eval()
    else:
        model = T.RecurrentGemmaForCausalLM(T.RecurrentGemmaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, lru_width=32, attention_window_size=16, block_types=["recurrent", "attention"],
            pad_token_id=0)).eval()
    x = inputs(arch)
    program = fxprune.capture(model, x)
    dg = fxprune.dependency_graph(program)
    plan = exact_plan(dg)
    assert plan.keep
    ref = run_model(masked_copy(program, dg, plan), x)
    assert (run_model(apply_plan(program, dg, plan).model, x) - ref).abs().max() < 1e-5
    res = fxprune.prune(model, x, plan=plan)
    assert type(res.model) is type(model)
    fxprune.save(res, tmp_path / arch)
    back, _ = fxprune.load_model(str(tmp_path / arch))
    assert torch.equal(run_model(back, x), run_model(res.model, x))


def test_pinned_heads_leave_the_config_alone():
    """BLOOM's heads stay pinned (its attention merges heads with the batch): the layer's
    split-dim group of 3 once overwrote the head count, and the saved config said n_head=3."""
    res = fxprune.prune(tiny("bloom"), inputs("bloom"), ratio=0.2, targets=("heads", "mlp"))
    assert res.model.config.n_head == 4
    assert all(e["q_heads"] == 4 for e in res.model.fxprune_layers.values())


def test_plain_cnn_prunes_saves_reloads_and_exports(tmp_path):
    """A user's own conv-BN network (no Hugging Face config): saved as torch.export's program,
    which load_model returns without the eval() it refuses."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    res = fxprune.prune(model, torch.randn(2, 3, 8, 8), ratio=0.3, targets=("mlp",))
    assert res.model[1].num_features < 16 and res.report["removed_fraction"] >= 0.3
    fxprune.save(res, tmp_path / "cnn")
    back, tok = fxprune.load_model(str(tmp_path / "cnn"))
    x = torch.randn(5, 3, 8, 8)
    assert tok is None and torch.equal(back(x), res.model(x))
    assert fxprune.export_onnx(res, tmp_path / "cnn.onnx")["max_abs_diff"] <= 1e-4


def test_config_that_refuses_the_head_count_says_how_to_prune(tmp_path):
    """CLIP's config needs hidden_size divisible by the head count: 3 of 4 heads cannot be saved,
    and the error names the way out, which works."""
    import transformers as T

    from fxprune.errors import FxpruneError

    torch.manual_seed(0)
    model = T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=16, patch_size=4)).eval()
    x = {"pixel_values": torch.randn(2, 3, 16, 16)}
    res = fxprune.prune(model, x, ratio=0.1, targets=("heads",))
    with pytest.raises(FxpruneError, match=r"not a multiple of the number of attention heads \(3\).*--round-to N"):
        fxprune.save(res, tmp_path / "odd")
    assert not (tmp_path / "odd").exists()
    res = fxprune.prune(model, x, ratio=0.1, targets=("heads",), round_to=2)
    fxprune.save(res, tmp_path / "even")
    back, _ = fxprune.load_model(str(tmp_path / "even"))
    assert torch.equal(run_model(back, x), run_model(res.model, x))


def test_mixture_of_experts_channels_go_from_every_expert_together():
    dg = fxprune.dependency_graph(fxprune.capture(tiny("mixtral"), inputs("mixtral")))
    experts = [g for g in dg.prunable if g.kind == "mlp" and g.layer == 0]
    assert len(experts) == 1 and experts[0].units == 48  # intermediate_size, shared by the 4 experts
    assert experts[0].align == 4  # torch's grouped matmul: rows of 16 bytes, 4 float32 channels
    params = {(m.param, m.dim) for m in experts[0].members}
    assert ("model.layers.0.mlp.experts.down_proj", 2) in params
    assert any(p == "model.layers.0.mlp.experts.gate_up_proj" for p, _ in params)  # gate and up halves


def _ragged_experts_plan(model, x, kept: int):
    """A plan keeping ``kept`` channels of every layer's experts (and everything else)."""
    from fxprune.plan import Plan

    dg = fxprune.dependency_graph(fxprune.capture(model, x))
    return Plan({g.id: list(range(kept)) for g in dg.prunable if g.kind == "mlp" and "experts" in g.id})


def _qwen2_moe():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=24, shared_expert_intermediate_size=48)
    return T.Qwen2MoeForCausalLM(cfg).eval()


def test_expert_widths_stay_grouped_matmul_aligned():
    """torch's grouped matmul (Qwen2-MoE's experts in eager mode) needs rows of 16 bytes: selection
    keeps expert widths in multiples of 4 float32 channels, so the model class keeps running."""
    model = _qwen2_moe()
    res = fxprune.prune(model, inputs("qwen2"), ratio=0.2, targets=("mlp",))
    assert type(res.model).__name__ == "Qwen2MoeForCausalLM" and res.report["removed_fraction"] >= 0.2
    kept = [g["kept"] for g in res.report["groups"] if "experts" in g["id"]]
    assert kept and all(k % 4 == 0 and k < 24 for k in kept)
    x = inputs("qwen2", 3, 9, seed=5)
    assert (run_model(res.model, x) - run_model(res.graph_module, x)).abs().max() < 1e-5
    # a plan that ignores it (17 of 24) leaves the graph module, and the note says how to avoid that
    ragged = fxprune.prune(model, inputs("qwen2"), plan=_ragged_experts_plan(model, inputs("qwen2"), 17))
    assert isinstance(ragged.model, torch.fx.GraphModule)
    assert any("--round-to 8" in n for n in ragged.report["notes"])


def test_graph_module_result_saves_and_reloads(tmp_path):
    """A plan with ragged expert widths leaves Mixtral's eager module unable to run, so prune returns
    the graph module; saving it captured it by keyword (refused) and called eval() on it (refused)."""
    model = tiny("mixtral")
    res = fxprune.prune(model, inputs("mixtral"), plan=_ragged_experts_plan(model, inputs("mixtral"), 37))
    assert isinstance(res.model, torch.fx.GraphModule)
    fxprune.save(res, tmp_path / "gm")
    back, _ = fxprune.load_model(str(tmp_path / "gm"))
    x = inputs("mixtral", 3, 9, seed=5)
    assert torch.equal(run_model(back, x), run_model(res.model, x))


def test_saved_directory_loads_in_plain_transformers():
    """Weights are saved under the model's own names (GPT-NeoX's head is lm_head, not the hub's
    embed_out), which transformers 5 reads as they are."""
    import tempfile

    from transformers import AutoModelForCausalLM

    res = fxprune.prune(tiny("gpt_neox"), inputs("gpt_neox"), ratio=0.2, targets=("mlp",))
    with tempfile.TemporaryDirectory() as d:
        fxprune.save(res, f"{d}/neox")
        hf = AutoModelForCausalLM.from_pretrained(f"{d}/neox").eval()
        x = inputs("gpt_neox", 3, 9, seed=5)
        assert torch.equal(hf(**x).logits, res.model(**x).logits)


def test_manifest_without_attributes_still_loads(tmp_path):
    """Directories saved before the manifest recorded the rewrite's attribute changes rebuild their
    modules from the per-layer counts, as they did."""
    import json

    res = fxprune.prune(tiny("qwen2"), inputs("qwen2"), ratio=0.25, targets=("heads", "kv_heads", "mlp"))
    fxprune.save(res, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "fxprune.json").read_text())
    assert manifest.pop("attributes")
    (tmp_path / "m" / "fxprune.json").write_text(json.dumps(manifest))
    back, _ = fxprune.load_model(str(tmp_path / "m"))
    x = inputs("qwen2", 3, 9, seed=5)
    assert torch.equal(run_model(back, x), run_model(res.model, x))


def test_sharded_save_reloads_and_loads_in_plain_transformers(tmp_path):
    """``max_shard_size`` splits the weights as save_pretrained does (transformers shards above 50GB
    by default); load reads the shards through their index, and ragged layers rebuild from them."""
    from transformers import AutoModelForCausalLM

    res = fxprune.prune(tiny("qwen2"), inputs("qwen2"), ratio=0.25, targets=("heads", "kv_heads", "mlp"))
    fxprune.save(res, tmp_path / "m", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    x = inputs("qwen2", 3, 9, seed=5)
    back, _ = fxprune.load_model(str(tmp_path / "m"))
    assert torch.equal(run_model(back, x), run_model(res.model, x))
    uniform = fxprune.prune(tiny("qwen2"), inputs("qwen2"), ratio=0.2, targets=("mlp",))
    fxprune.save(uniform, tmp_path / "u", max_shard_size="20KB")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "u")).eval()
    assert torch.equal(hf(**x).logits, uniform.model(**x).logits)
    shard = next(p for p in (tmp_path / "m").iterdir() if p.name.startswith("model-0000"))
    shard.unlink()
    with pytest.raises(fxprune.FxpruneError, match=f"{shard.name} is missing"):
        fxprune.load_model(str(tmp_path / "m"))


def test_latent_attention_ranks_prune_by_name(tmp_path):
    """DeepSeek's q / kv bottlenecks (q_a_proj -> q_a_layernorm -> q_b_proj) feed the attention's
    head projections: kind ``rank``, left alone by ``mlp``; pruned by name, the module's
    q_lora_rank / kv_lora_rank and the config follow, and the directory loads in plain transformers."""
    from transformers import AutoModelForCausalLM

    model = tiny("deepseek_v3")
    dg = fxprune.dependency_graph(fxprune.capture(model, inputs("deepseek_v3")))
    ranks = [g for g in dg.prunable if g.kind == "rank"]
    assert len(ranks) == 6 and all(g.units == 16 for g in ranks)
    assert all(any(m.param.endswith(("q_a_layernorm.weight", "kv_a_layernorm.weight")) for m in g.members) for g in ranks)
    mlp_only = fxprune.prune(model, inputs("deepseek_v3"), ratio=0.1, targets=("mlp",))
    rows = [g for g in mlp_only.report["groups"] if g["kind"] == "rank"]
    assert len(rows) == 6 and all(g["kept"] == g["units"] for g in rows) and mlp_only.report["removed_fraction"] >= 0.1
    res = fxprune.prune(model, inputs("deepseek_v3"), ratio=0.1, targets=("rank",))
    attn = res.model.model.layers[2].self_attn
    assert type(res.model) is type(model) and attn.kv_lora_rank < 16 and attn.q_lora_rank < 16
    assert res.model.config.kv_lora_rank == attn.kv_lora_rank == attn.kv_a_layernorm.weight.numel()
    x = inputs("deepseek_v3", 3, 9, seed=5)
    assert (run_model(res.model, x) - run_model(res.graph_module, x)).abs().max() < 1e-5
    fxprune.save(res, tmp_path / "ds")
    assert torch.equal(run_model(fxprune.load_model(str(tmp_path / "ds"))[0], x), run_model(res.model, x))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ds")).eval()
    assert torch.equal(plain(**x).logits, res.model(**x).logits)
