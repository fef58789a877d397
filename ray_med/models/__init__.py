"""Models: presets, tokenizer training, and the one place that loads and saves HF checkpoints.

Core package: no Ray, no DeepSpeed. Tiny presets build with random init for the demo
and tests; real-size presets build on the meta device for parameter counts and memory
planning (:mod:`~ray_med.models.presets`). :mod:`~ray_med.models.tokenizer` trains the
tiny presets' byte-level BPE tokenizer. :mod:`~ray_med.models.loading` is the only
module that calls ``from_pretrained`` and the way every job writes its models.
:mod:`~ray_med.models.config` holds the model and tokenizer sections of job configs.

The names below are re-exported lazily (PEP 562): parsing a job config imports
``ray_med.models.config`` and with it this package, and that should not cost the
seconds it takes to import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray_med.models.config import ModelConfig, TokenizerConfig
    from ray_med.models.loading import (
        build_or_load,
        inference_device,
        load_base_model,
        load_causal_lm,
        load_config,
        load_encoder,
        load_tokenizer,
        resolve_dtype,
        save_pretrained,
    )
    from ray_med.models.presets import (
        PRESETS,
        Preset,
        build_model,
        count_parameters,
        get_preset,
        list_presets,
        memory_plan,
        preset_config,
    )
    from ray_med.models.tokenizer import train_bpe_tokenizer

_EXPORTS = {
    "ModelConfig": "config",
    "TokenizerConfig": "config",
    "build_or_load": "loading",
    "inference_device": "loading",
    "load_base_model": "loading",
    "load_causal_lm": "loading",
    "load_config": "loading",
    "load_encoder": "loading",
    "load_tokenizer": "loading",
    "resolve_dtype": "loading",
    "save_pretrained": "loading",
    "PRESETS": "presets",
    "Preset": "presets",
    "build_model": "presets",
    "count_parameters": "presets",
    "get_preset": "presets",
    "list_presets": "presets",
    "memory_plan": "presets",
    "preset_config": "presets",
    "train_bpe_tokenizer": "tokenizer",
}

__all__ = [
    "ModelConfig",
    "PRESETS",
    "Preset",
    "TokenizerConfig",
    "build_model",
    "build_or_load",
    "inference_device",
    "load_base_model",
    "count_parameters",
    "get_preset",
    "list_presets",
    "load_causal_lm",
    "load_config",
    "load_encoder",
    "load_tokenizer",
    "memory_plan",
    "preset_config",
    "resolve_dtype",
    "save_pretrained",
    "train_bpe_tokenizer",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_med.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ray_med.models.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
