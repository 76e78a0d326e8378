"""Save and reload pruned models: ``model.safetensors`` (or shards) + ``fxprune.json`` (+ tokenizer files).

HF models are written with ``save_pretrained``, so where every layer has the same shapes the
directory also loads with plain ``AutoModel*.from_pretrained``. Layers of different widths are
rebuilt by :func:`load` from the per-parameter shapes in the manifest. Other modules are stored
as a ``torch.export`` program (``model.pt2``) beside the weights.
Writes go to a temporary directory that is moved into place only when complete.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn

from .errors import FxpruneError, ModelLoadError
from .passes.rewrite import (CONFIG_KEYS, _apply_config, _fix_standard_module, pin_head_dim, set_count_attributes,
                             write_head_dim)
from .depgraph import layer_of
from .plan import Plan

MANIFEST = "fxprune.json"
# tensors the model class leaves out of save_pretrained (Marian's sinusoidal position table, which
# transformers recomputes at full width on load: a pruned residual width would not match it)
UNSAVED = "fxprune_unsaved.safetensors"
SHARD_INDEX = "model.safetensors.index.json"  # save_pretrained's map of weight -> shard file
FORMAT_VERSION = 1

log = logging.getLogger(__name__)


def save(result: Any, directory: str | os.PathLike, *, force: bool = False, extra: dict | None = None,
         also: Callable[[Path], None] | None = None, max_shard_size: int | str | None = None) -> Path:
    """Write the pruned model of ``result`` (a PruneResult) to ``directory``, atomically.

    An existing non-empty ``directory`` is an error unless ``force`` is set. ``also(tmp)`` may
    write more files (ONNX, report) into the temporary directory before it is moved into place,
    so an interrupted or failed run leaves neither a half-written ``directory`` nor a temp dir.
    ``max_shard_size`` (e.g. ``"5GB"``) splits a Hugging Face model's weights into shards plus
    ``model.safetensors.index.json``, as ``save_pretrained`` does (its default: 50GB).
    """
    with staging(directory, force=force) as tmp:
        _write(result, tmp, extra or {}, max_shard_size)
        if also is not None:
            also(tmp)
    return Path(directory)


def check_destination(directory: str | os.PathLike, force: bool = False) -> Path:
    """``directory`` as a Path; an existing non-empty one is an error unless ``force``."""
    dest = Path(directory)
    if dest.exists() and not dest.is_dir():
        raise FxpruneError(f"output path {dest} is a file; give a directory path for --out")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise FxpruneError(f"output directory {dest} exists and is not empty; pass --force to replace it "
                           f"or choose another --out")
    return dest


@contextmanager
def staging(directory: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``directory``; on success it replaces ``directory``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and
    ``directory`` is left as it was.
    """
    dest = check_destination(directory, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the output private to this user
        yield tmp
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        tmp.rename(dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
    old.rmdir()  # a unique free name for the old directory
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)  # put the user's directory back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write(result: Any, out: Path, extra: dict, max_shard_size: int | str | None = None) -> None:
    model = result.model
    manifest: dict[str, Any] = {
        "format": "fxprune", "version": FORMAT_VERSION,
        "shapes": {n: list(p.shape) for n, p in model.state_dict().items()},
        "layers": {str(k): v for k, v in getattr(model, "fxprune_layers", {}).items()},
        # module path -> the count attributes / private config values the rewrite changed
        "attributes": getattr(model, "fxprune_attributes", {}),
        "plan": result.plan.to_json(),
        "report": {k: result.report.get(k) for k in ("params_before", "params_after", "removed_fraction")},
        **extra,
    }
    if hasattr(model, "save_pretrained") and not isinstance(model, fx.GraphModule):
        _save_pretrained(model, out, max_shard_size)
        _save_unsaved(model, out)
        manifest["kind"] = "hf"
        manifest["class"] = type(model).__name__
        base = getattr(result, "base_model", None)
        if base is not None and getattr(base, "config", None) is not None:
            manifest["base_config"] = base.config.to_dict()
        manifest["uniform"] = _uniform(manifest["layers"])
    else:
        from safetensors.torch import save_model

        from .capture import capture_as_called

        save_model(model, str(out / "model.safetensors"))
        program = capture_as_called(model, result.example_inputs)
        torch.export.save(program.exported, str(out / "model.pt2"))
        manifest["kind"] = "module"
    tok = getattr(result, "tokenizer", None)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))


def _save_pretrained(model: nn.Module, out: Path, max_shard_size: int | str | None = None) -> None:
    """``save_pretrained``; a config that transformers refuses to validate becomes a user error."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older hub: configs are not validated on save
        StrictDataclassError = ()  # noqa: N806
    # the model's own weight names (not the hub layout transformers converts from on load: fused
    # MoE experts saved back as one tensor per expert, GPT-NeoX's lm_head as embed_out), which
    # load() and transformers 5's from_pretrained both read as they are
    native = ({"save_original_format": False}
              if "save_original_format" in inspect.signature(model.save_pretrained).parameters else {})
    if max_shard_size is not None:
        native["max_shard_size"] = max_shard_size
    try:
        model.save_pretrained(out, safe_serialization=True, **native)
    except StrictDataclassError as exc:
        why = str(exc.__cause__ or exc).strip().splitlines()[-1].strip().rstrip(".")
        raise FxpruneError(f"transformers refuses the pruned config ({why}); prune to counts it accepts "
                           f"(--round-to N keeps units in multiples of N) or leave the kind it names "
                           f"(heads, hidden) out of --targets") from exc


def _save_unsaved(model: nn.Module, out: Path) -> None:
    """The tensors ``save_pretrained`` skips (``_keys_to_ignore_on_save``), beside it in :data:`UNSAVED`."""
    patterns = getattr(model, "_keys_to_ignore_on_save", None) or []
    skipped = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if any(re.search(p, k) for p in patterns)}
    if skipped:
        from safetensors.torch import save_file

        save_file(skipped, str(out / UNSAVED))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _uniform(layers: dict[str, dict[str, int]]) -> bool:
    return all(len({e.get(k) for e in layers.values()}) <= 1 for k in ("q_heads", "kv_heads", "mlp"))


def load(directory: str | os.PathLike) -> tuple[nn.Module, Any]:
    """Rebuild a model written by :func:`save`; returns ``(model, tokenizer or None)``."""
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{d} is not an fxprune output directory (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {d / MANIFEST}: {exc}") from exc
    state = _read_weights(d)
    if manifest.get("kind") == "module":
        try:
            ep = torch.export.load(str(d / "model.pt2"))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {d / 'model.pt2'}: {exc}") from exc
        model = ep.module()
        return model, None
    model = _build_hf(d, manifest, state)
    tokenizer = None
    if (d / "tokenizer_config.json").exists() or (d / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return model, tokenizer


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved directory: ``model.safetensors``, or the shards its index names."""
    from safetensors.torch import load_file

    index = d / SHARD_INDEX
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read the shard index {index}: {exc}") from exc
        files = [d / name for name in sorted(set(weight_map.values()))]
    else:
        raise ModelLoadError(f"{d / 'model.safetensors'} is missing (and there is no {SHARD_INDEX})")
    if (d / UNSAVED).is_file():
        files.append(d / UNSAVED)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f} is missing (named by {index.name})")
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"{f} is corrupt or unreadable: {exc}") from exc
    return state


def origin(directory: str | os.PathLike) -> tuple[nn.Module, Plan] | None:
    """``(unpruned model on the meta device, plan)`` a saved HF model was pruned with, or None.

    No weights are read: the unpruned architecture comes from the manifest's ``base_config``. It is
    what :func:`fxprune.export_onnx` needs (``origin=``) to export the loaded model the fast,
    stitched way. None for saved plain modules, manifests without a base config, or any failure.
    """
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        if manifest.get("kind") != "hf" or "base_config" not in manifest:
            return None
        import transformers

        cls = getattr(transformers, manifest["class"])
        config = cls.config_class.from_dict(manifest["base_config"])
        with torch.device("meta"):
            base = cls(config).eval()
        return base, Plan.from_json(manifest["plan"])
    except Exception as exc:  # noqa: BLE001 -- no origin only means the slower export
        log.debug("no origin for %s: %s: %s", d, type(exc).__name__, exc)
        return None


def _build_hf(d: Path, manifest: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(d), local_files_only=True)
    cls = getattr(transformers, manifest.get("class", ""), None)
    if cls is None:
        raise ModelLoadError(f"{d}: unknown model class {manifest.get('class')!r}")
    # Build the unpruned architecture and shrink it as the rewrite did: many attention classes
    # derive head_dim as hidden_size // heads (Qwen2, OPT, OLMo 2) or refuse a head count that does
    # not divide hidden_size (GPT-J, BLOOM), so the pruned config alone builds the wrong model.
    base = cls.config_class.from_dict(manifest["base_config"]) if "base_config" in manifest else None
    arch = base if base is not None else config  # what the modules are built from (and their buffers)
    with torch.device("meta"):
        model = cls(copy.deepcopy(arch))  # the copy takes the pruned sizes below; arch stays as built
    shapes = manifest["shapes"]
    for name, shape in shapes.items():
        path, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        try:
            owner = model.get_submodule(path)
        except AttributeError:
            continue
        cur = getattr(owner, leaf, None)
        if isinstance(cur, torch.Tensor) and list(cur.shape) != shape:
            new = torch.empty(shape, dtype=cur.dtype, device="meta")
            if isinstance(cur, nn.Parameter):
                setattr(owner, leaf, nn.Parameter(new, requires_grad=cur.requires_grad))
            else:
                owner.register_buffer(leaf, new)
    if base is not None and "attributes" in manifest:
        _adopt_config(model.config, config)
        _replay_attributes(model, manifest["attributes"])
    elif base is not None:  # manifests written before "attributes": per-layer counts
        _set_layer_attributes(model, base, manifest.get("layers", {}), hidden=_hidden_counts(base, config))
        _adopt_config(model.config, config)
    else:  # manifests written before base_config: the pruned config builds the model
        _set_layer_attributes(model, config, manifest.get("layers", {}))
    state = _hf_names(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ModelLoadError(
            f"the weights in {d} do not match the manifest "
            f"(missing {still_meta[:3]}, unexpected {list(unexpected)[:3]})"
        )
    missing = [name for name, buf in model.named_buffers() if buf.is_meta]
    fresh = _fresh_buffers(cls, arch, missing) if missing else {}
    for name in missing:  # non-persistent buffers (rotary inv_freq) are recomputed by the module
        if name not in fresh:
            raise ModelLoadError(f"cannot rebuild buffer {name}")
        path, leaf = name.rsplit(".", 1)
        model.get_submodule(path).register_buffer(leaf, fresh[name], persistent=False)
    model.eval()
    return model


def _fresh_buffers(cls: type, config: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """Non-persistent buffers from a small CPU instance of the same class: one layer, or as many as
    the deepest missing buffer's layer needs (a hybrid stack's first attention layer may be its
    second: RecurrentGemma). A buffer is matched by its full name, else by owner and leaf name."""
    found: dict[str, torch.Tensor] = {}
    deepest = max((layer_of(n) or 0 for n in names), default=0)
    for depth in sorted({1, deepest + 1}):
        ref_cfg = copy.deepcopy(config)
        for key in ("num_hidden_layers", "n_layer"):
            if hasattr(ref_cfg, key):
                setattr(ref_cfg, key, min(depth, getattr(ref_cfg, key)))
        try:
            with torch.device("cpu"):
                ref = cls(ref_cfg)
        except Exception:  # noqa: BLE001 -- a config that cannot shrink this way: the caller names the buffer
            continue
        bufs = {n: b for n, b in ref.named_buffers() if not b.is_meta}
        for name in names:
            if name in found:
                continue
            path, leaf = name.rsplit(".", 1)
            tail = f"{path.split('.')[-1]}.{leaf}"
            match = bufs.get(name) if name in bufs else next((b for n, b in bufs.items() if n.endswith(tail)), None)
            if match is not None:
                found[name] = match
        if len(found) == len(names):
            break
    return found


# the config keys that hold each size, in the order families use them
_SIZE_KEYS = {"q_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
              "kv_heads": ("num_key_value_heads", "num_kv_heads"),
              "mlp": ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim", "d_ff"),
              "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
              "head_dim": ("head_dim",)}


def _config_size(config: Any, kind: str) -> int | None:
    """The first integer ``config`` holds under a key of ``kind`` (lists, e.g. Swin's per-stage
    head counts, are not one size)."""
    return next((v for v in (getattr(config, k, None) for k in _SIZE_KEYS[kind]) if isinstance(v, int)), None)


def _hidden_counts(base: Any, pruned: Any) -> tuple[int, int] | None:
    """(unpruned, pruned) residual width, where the prune changed it."""
    old, new = _config_size(base, "hidden"), _config_size(pruned, "hidden")
    return (old, new) if old is not None and new is not None and old != new else None


def _adopt_config(shared: Any, pruned: Any) -> None:
    """The saved (pruned) config's sizes on the shared config object the modules were built with,
    as the rewrite leaves it in memory."""
    for key in CONFIG_KEYS:
        if hasattr(shared, key) and hasattr(pruned, key):
            setattr(shared, key, getattr(pruned, key))
    write_head_dim(shared, getattr(pruned, "head_dim", None))  # where the rewrite wrote one down


def _hf_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the key renamings transformers applies when it loads a checkpoint
    (``save_pretrained`` writes some weights under their hub names: GPT-NeoX's ``embed_out`` is
    the model's ``lm_head``). Keys the model already has, or any failure of those internals, keep
    their names."""
    own = set(model.state_dict())
    if set(state) <= own:
        return state
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        renamed = {(k if k in own else rename_source_key(k, renamings, [])[0]): v for k, v in state.items()}
    except Exception as exc:  # noqa: BLE001 -- transformers internals; the mismatch is reported after
        log.debug("no checkpoint renaming: %s: %s", type(exc).__name__, exc)
        return state
    return renamed if len(renamed) == len(state) else state


def _replay_attributes(model: nn.Module, record: dict[str, dict[str, dict[str, int]]]) -> None:
    """The rewrite's attribute and private-config changes (``model.fxprune_attributes`` as saved), on a
    model built unpruned whose shared config already holds the pruned sizes."""
    for _, mod in model.named_modules():
        _fix_standard_module(mod)
    for path, change in record.items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise ModelLoadError(f"the manifest names module {path}, which {type(model).__name__} does not have") from None
        for attr, value in change.get("attributes", {}).items():
            setattr(mod, attr, value)
        if change.get("config") and getattr(mod, "config", None) is not None:
            private = copy.copy(mod.config)
            for key, value in change["config"].items():
                setattr(private, key, value)
            mod.config = private


def _set_layer_attributes(model: nn.Module, config: Any, layers: dict[str, dict[str, int]],
                          hidden: tuple[int, int] | None = None) -> None:
    """Per-layer head counts and widths (and the residual width ``hidden``, (old, new)) on the
    modules of a model built with ``config``, where they differ from its values."""
    cfg_vals = {k: _config_size(config, k) for k in ("q_heads", "kv_heads", "mlp")}
    hidden_size = _config_size(config, "hidden")
    head_dim = _config_size(config, "head_dim") or (  # per-stage head lists (Swin) give none
        hidden_size // cfg_vals["q_heads"] if hidden_size and cfg_vals["q_heads"] else None)
    for path, mod in model.named_modules():
        _fix_standard_module(mod)
        layer = layer_of(path)
        entry = layers.get(str(layer)) if layer is not None else None
        counts = {k: (cfg_vals[k], v) for k, v in (entry or {}).items() if cfg_vals.get(k) is not None}
        if hidden is not None:
            counts["hidden"] = hidden
        if not counts:
            continue
        if "q_heads" in counts and "kv_heads" in counts and counts["kv_heads"][1]:
            counts["kv_groups"] = (counts["q_heads"][0] // counts["kv_heads"][0],
                                   counts["q_heads"][1] // counts["kv_heads"][1])
        elif "q_heads" in counts:  # one shared kv head (multi-query): every query head is a group member
            counts["kv_groups"] = counts["q_heads"]
        if "q_heads" in counts and head_dim:
            counts["q_width"] = (counts["q_heads"][0] * head_dim, counts["q_heads"][1] * head_dim)
        set_count_attributes(mod, counts)
        if getattr(mod, "config", None) is not None and layer is not None and path.count(".") > 0:
            private = copy.copy(mod.config)
            _apply_config(private, counts)
            pin_head_dim(private, counts, head_dim)
            mod.config = private
