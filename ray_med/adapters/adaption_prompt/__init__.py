"""LLaMA-Adapter (Zhang et al. 2023): learned adaption prompts with zero-init gates in the top layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_med.adapters.method import AdapterMethod

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig


def _peft_config(cfg: AdapterConfig, task_type: str | None, model_config: Any) -> Any:
    import peft  # lazy: peft imports torch and transformers; configs parse without them

    # Clamped to the base's depth, so a config written for Llama-2-7B (30 layers) still
    # works on a tiny model.
    layers = cfg.adapter_layers
    if model_config is not None:
        layers = min(layers, model_config.num_hidden_layers)
    return peft.AdaptionPromptConfig(adapter_len=cfg.adapter_len, adapter_layers=layers, task_type=task_type)


METHOD = AdapterMethod(
    name="adaption_prompt",
    title="LLaMA-Adapter",
    peft_type="ADAPTION_PROMPT",
    peft_config=_peft_config,
    description="LLaMA-Adapter (adapter_len, adapter_layers)",
)
