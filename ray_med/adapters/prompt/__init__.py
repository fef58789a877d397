"""Prompt tuning (Lester et al. 2021): learned soft-prompt embeddings before the input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_med.adapters.method import AdapterMethod

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig


def _peft_config(cfg: AdapterConfig, task_type: str | None, model_config: Any) -> Any:
    import peft  # lazy: peft imports torch and transformers; configs parse without them

    return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task_type)


METHOD = AdapterMethod(
    name="prompt",
    title="prompt tuning",
    peft_type="PROMPT_TUNING",
    peft_config=_peft_config,
    prompt_learning=True,
    description="prompt tuning (num_virtual_tokens)",
)
