"""LoRA (Hu et al. 2021): low-rank updates ``(alpha / r) B A`` beside the target linear layers.

Served many-per-base (``host="shared"``): a LoRA adds its own small matrices next to the
base weights, so one replica holds one base and switches adapters per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_med.adapters.method import AdapterMethod

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig


def _peft_config(cfg: AdapterConfig, task_type: str | None, model_config: Any) -> Any:
    import peft  # lazy: peft imports torch and transformers; configs parse without them

    return peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        bias="none", task_type=task_type,
    )


METHOD = AdapterMethod(
    name="lora",
    title="LoRA",
    peft_type="LORA",
    peft_config=_peft_config,
    host="shared",
    description="LoRA on target_modules (r, alpha, dropout)",
)
