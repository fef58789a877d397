"""P-tuning (Liu et al. 2021): soft prompts produced by a small prompt encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_med.adapters.method import AdapterMethod

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig


def _peft_config(cfg: AdapterConfig, task_type: str | None, model_config: Any) -> Any:
    import peft  # lazy: peft imports torch and transformers; configs parse without them

    return peft.PromptEncoderConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size, task_type=task_type
    )


METHOD = AdapterMethod(
    name="ptuning",
    title="P-tuning",
    peft_type="P_TUNING",
    peft_config=_peft_config,
    prompt_learning=True,
    description="P-tuning (num_virtual_tokens, encoder_hidden_size)",
)
