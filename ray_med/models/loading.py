"""Loading and saving Hugging Face models: the only module that calls ``from_pretrained``.

Jobs name a model by preset or by ``path``: a local folder written by
``save_pretrained``, or a hub id. Folders are checked before transformers sees them, so
a typo gives "folder not found" rather than a hub lookup error, and a hub id fails with
a message saying what to pass instead when the hub is offline (as in tests and on
air-gapped clusters). Everything a job produces goes out through
:func:`save_pretrained`, so any later stage, or a user with plain transformers, loads
it back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ray_med.errors import ModelError
from ray_med.models.config import ModelConfig
from ray_med.models.presets import build_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRUE = {"1", "true", "yes", "on"}
_MODEL_FILES = ("config.json",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config's dtype name (float32, bfloat16, float16)."""
    if name not in _DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _offline_setting() -> str | None:
    """The environment setting that keeps the hub offline (``HF_HUB_OFFLINE=1``), if any."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var, "").strip()
        if value.lower() in _TRUE:
            return f"{var}={value}"
    return None


def _looks_local(path_or_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything with more parts, or starting with a
    # path marker, can only be meant as a folder, so a typo in it gets "not found"
    # instead of a confusing hub error.
    return (
        path_or_id.startswith((".", "/", "~"))
        or path_or_id.count("/") > 1
        or Path(path_or_id).expanduser().exists()
    )


def _check_folder(path_or_id: str | Path, *, need: tuple[str, ...], what: str) -> str:
    """Validate a local folder and return the string transformers should get; hub ids pass through."""
    if not isinstance(path_or_id, (str, os.PathLike)) or not str(path_or_id).strip():
        raise ModelError(f"{what} path must be a folder or hub id, got {path_or_id!r}")
    path_or_id = str(path_or_id)
    if not _looks_local(path_or_id):
        return path_or_id
    path = Path(path_or_id).expanduser()
    if not path.exists():
        raise ModelError(f"{what} folder not found: {path}")
    if not path.is_dir():
        raise ModelError(f"{what} path {path} is a file; give the folder written by save_pretrained")
    if not any((path / name).is_file() for name in need):
        found = sorted(p.name for p in path.iterdir())
        listing = ", ".join(found[:10]) + (", ..." if len(found) > 10 else "") if found else "nothing"
        raise ModelError(
            f"{path} is not a Hugging Face {what} folder: it has no {' or '.join(need)} "
            f"(found: {listing}). Give a folder written by save_pretrained."
        )
    return str(path)


def _from_pretrained(loader: Any, path_or_id: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with its load errors turned into a one-line ModelError."""
    try:
        return loader.from_pretrained(path_or_id, **kwargs)
    except (OSError, ValueError) as exc:
        offline = _offline_setting()
        if offline and not Path(path_or_id).exists():
            raise ModelError(
                f"cannot load {what} '{path_or_id}': no such local folder, and as a hub id it cannot be "
                f"fetched because the hub is offline ({offline}). Pass a local folder written by "
                "save_pretrained."
            ) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {what} '{path_or_id}': {first_line}") from None


def load_pretrained(loader: Any, path_or_id: str | Path, what: str, **kwargs: Any) -> Any:
    """Any transformers class's ``from_pretrained`` on a checked folder (or hub id), errors as one line."""
    src = _check_folder(path_or_id, need=_MODEL_FILES, what=what)
    return _from_pretrained(loader, src, what, **{k: v for k, v in kwargs.items() if v is not None})


def load_config(path_or_id: str | Path) -> PreTrainedConfig:
    """The transformers config of a model folder or hub id, without loading weights."""
    src = _check_folder(path_or_id, need=_MODEL_FILES, what="model")
    return _from_pretrained(AutoConfig, src, "model config")


def load_causal_lm(path_or_id: str | Path, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM (``AutoModelForCausalLM``) from a folder or hub id."""
    src = _check_folder(path_or_id, need=_MODEL_FILES, what="model")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, info = _from_pretrained(AutoModelForCausalLM, src, "causal LM", output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        # transformers fills missing weights with random init and only logs it; training
        # or evaluating such a model (say a BERT encoder under a fresh LM head) would
        # quietly waste the run.
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelError(
            f"'{path_or_id}' is not a complete causal LM checkpoint ({type(model).__name__}): "
            f"{len(missing)} weights missing ({shown})"
        )
    return model


def load_encoder(path_or_id: str | Path, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """An encoder (BERT-family, ViT, ...) from a folder or hub id, without a task head (``AutoModel``)."""
    src = _check_folder(path_or_id, need=_MODEL_FILES, what="model")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return _from_pretrained(AutoModel, src, "encoder", **kwargs)


def load_base_model(path_or_id: str | Path, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM if the folder's config says it is one (``*ForCausalLM``), else an encoder."""
    decoder = any(a.endswith("ForCausalLM") for a in (load_config(path_or_id).architectures or []))
    return load_causal_lm(path_or_id, dtype=dtype) if decoder else load_encoder(path_or_id, dtype=dtype)


def load_tokenizer(path_or_id: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer (``AutoTokenizer``) from a folder or hub id."""
    src = _check_folder(path_or_id, need=_TOKENIZER_FILES, what="tokenizer")
    return _from_pretrained(AutoTokenizer, src, "tokenizer")


def inference_device() -> tuple[str, torch.dtype | None]:
    """Where a model answers requests: the GPU in bfloat16 when there is one, else the CPU in the folder's dtype."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", None


def build_or_load(cfg: ModelConfig, *, vocab_size: int | None = None, device: str = "cpu") -> PreTrainedModel:
    """``cfg.path`` loaded as a causal LM, else ``cfg.preset`` built with random init.

    ``vocab_size`` is the tokenizer's size: a preset takes it unless ``cfg.vocab_size``
    overrides it, and either way the embedding must hold every token id the tokenizer
    can produce.
    """
    dtype = resolve_dtype(cfg.dtype)
    if cfg.path:
        model = load_causal_lm(cfg.path, dtype=dtype)
        n_embed = model.get_input_embeddings().num_embeddings
        if vocab_size is not None and vocab_size > n_embed:
            raise ModelError(
                f"the tokenizer has {vocab_size} tokens but the model at {cfg.path} embeds only {n_embed}; "
                "use the tokenizer saved with that model"
            )
        return model.to(device)
    if cfg.vocab_size is not None and vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ModelError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            "token ids past it would index outside the embedding"
        )
    assert cfg.preset is not None  # ModelConfig guarantees a preset when there is no path
    return build_model(cfg.preset, vocab_size=cfg.vocab_size or vocab_size, device=device, dtype=dtype)


def save_pretrained(model: Any, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a model (safetensors) and its tokenizer as a Hugging Face folder; return the folder.

    A model wrapped by DDP or DeepSpeed is unwrapped (``.module``) first.
    """
    inner = model
    while not hasattr(inner, "save_pretrained") and hasattr(inner, "module"):
        inner = inner.module
    if not hasattr(inner, "save_pretrained"):
        raise ModelError(f"cannot save a {type(model).__name__}: it is not a Hugging Face model")
    if any(p.device.type == "meta" for p in inner.parameters()):
        raise ModelError("cannot save a model built on the meta device: it has shapes but no weights")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # transformers 5 always writes safetensors (the safe_serialization switch is gone).
    inner.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
