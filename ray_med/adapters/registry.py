"""The adapter registry: method name -> how it is configured, injected, loaded and served.

Each method lives in its own folder (``ray_med/adapters/<method>/``, PEFT's shape) and
exposes one :class:`~ray_med.adapters.method.AdapterMethod`; :data:`METHODS` below lists
them. Adding a method is a new folder plus one line here. The five methods of Clinical
LLaMA-LoRA wrap the ``peft`` library, so the folders they save are plain PEFT folders
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel`` loads.
``m3oe`` (FedKIM's mixture of LoRA experts gated by task and modality text) has its own
layers: no PEFT config, its ``inject``/``load`` return an
:class:`~ray_med.adapters.m3oe.M3OE`, its folders say ``peft_type: M3OE``, and
``jobs/inject.py`` trains it.

What the rest of ray_med asks a method:

* ``peft_config(cfg, task_type, model_config)``: its ``peft`` config for an
  :class:`~ray_med.adapters.config.AdapterConfig`;
* ``inject`` / ``load``: put a new or a saved adapter into a model, as a named adapter,
  so several can be stacked;
* ``prompt_learning``: it prepends virtual tokens (it cannot be stacked or carry a
  classifier, and its logits include the virtual positions);
* ``host``: ``shared`` methods are served many-per-base by
  :class:`~ray_med.adapters.host.AdapterHost`; ``own`` methods get their own copy of the
  base in a serving replica.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_med.adapters import adaption_prompt, lora, m3oe, prefix, prompt, ptuning
from ray_med.adapters.method import AdapterMethod
from ray_med.config import lookup
from ray_med.errors import ModelError

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig

CONFIG_FILE = "adapter_config.json"

METHODS: dict[str, AdapterMethod] = {
    m.name: m for m in (lora.METHOD, adaption_prompt.METHOD, prefix.METHOD, prompt.METHOD, ptuning.METHOD,
                        m3oe.METHOD)
}


def get_method(name: str) -> AdapterMethod:
    """The method called ``name``, or a clear error listing the valid ones."""
    return lookup(METHODS, name, "adapter method")


def peft_config(cfg: AdapterConfig, *, task_type: str | None = "CAUSAL_LM", model_config: Any = None) -> Any:
    """The ``peft`` config of ``cfg``'s method.

    ``model_config`` (the base model's HF config) lets a method fit itself to the base,
    e.g. LLaMA-Adapter clamps its layer count to the model's depth.
    """
    return get_method(cfg.method).peft_config(cfg, task_type, model_config)


def check_adapter_dir(path: str | Path) -> None:
    """A clear error unless ``path`` is an adapter folder (PEFT layout)."""
    if not (Path(path) / CONFIG_FILE).is_file():
        raise ModelError(f"{path} is not a PEFT adapter folder (no {CONFIG_FILE})")


def adapter_type(folder: str | Path) -> str:
    """The PEFT type of an adapter folder (``LORA``, ``ADAPTION_PROMPT``, ...)."""
    check_adapter_dir(folder)
    try:
        return str(json.loads((Path(folder) / CONFIG_FILE).read_text()).get("peft_type", "")).upper()
    except json.JSONDecodeError as exc:
        raise ModelError(f"{folder}/{CONFIG_FILE} is not valid JSON ({exc.msg})") from None


def method_of_folder(folder: str | Path) -> AdapterMethod | None:
    """The registered method that saved ``folder``, or None for an adapter type ray_med does not know."""
    kind = adapter_type(folder)
    return next((m for m in METHODS.values() if m.peft_type == kind), None)
