"""Prefix tuning (Li & Liang 2021): learned key/value prefixes in every layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_med.adapters.method import AdapterMethod

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig


def _peft_config(cfg: AdapterConfig, task_type: str | None, model_config: Any) -> Any:
    import peft  # lazy: peft imports torch and transformers; configs parse without them

    return peft.PrefixTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size, task_type=task_type,
    )


METHOD = AdapterMethod(
    name="prefix",
    title="prefix tuning",
    peft_type="PREFIX_TUNING",
    peft_config=_peft_config,
    prompt_learning=True,
    description="prefix tuning (num_virtual_tokens, prefix_projection)",
)
