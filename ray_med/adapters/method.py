"""What an adapter method is: :class:`AdapterMethod`, the interface every ``adapters/<method>/`` folder exposes.

The five methods of Clinical LLaMA-LoRA wrap the ``peft`` library, so this base gives
them PEFT's injection and loading; a method with its own layers (M3OE) overrides
:meth:`AdapterMethod.inject` and :meth:`AdapterMethod.load`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ray_med.errors import ModelError

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter method: its config mapping, capabilities and serving host."""

    name: str
    title: str
    """How people write it ("LoRA", "LLaMA-Adapter")."""
    peft_type: str
    """PEFT's name for it in ``adapter_config.json`` (``LORA``, ``PREFIX_TUNING``, ...)."""
    peft_config: Callable[[AdapterConfig, str | None, Any], Any]
    """(adapter config, PEFT task type or None, the base's HF config or None) -> the peft config."""
    prompt_learning: bool = False
    """It prepends virtual tokens rather than changing weights."""
    host: Literal["shared", "own"] = "own"
    """shared: many adapters on one base in a serving replica; own: a copy of the base each."""
    description: str = ""

    @property
    def stackable(self) -> bool:
        """Can it sit under or over another adapter (stage-1 domain + stage-2 downstream)?"""
        return not self.prompt_learning

    def inject(self, model: Any, cfg: AdapterConfig, *, task_type: str | None = "CAUSAL_LM",
               adapter_name: str = "default") -> Any:
        """``model`` with a new, trainable adapter ``adapter_name`` (a PeftModel)."""
        import peft  # lazy: peft imports torch and transformers; configs parse without them

        pcfg = self.peft_config(cfg, task_type, getattr(model, "config", None))
        with _peft_quietly():
            if isinstance(model, peft.PeftModel):
                model.add_adapter(adapter_name, pcfg)
                return model
            return peft.get_peft_model(model, pcfg, adapter_name=adapter_name)

    def load(self, model: Any, folder: str | Path, *, adapter_name: str = "default", trainable: bool = False) -> Any:
        """``model`` with the adapter saved in ``folder`` added as ``adapter_name``."""
        import peft  # lazy: peft imports torch and transformers; configs parse without them

        try:
            with _peft_quietly():
                if isinstance(model, peft.PeftModel):
                    model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=trainable)
                    return model
                return peft.PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name,
                                                      is_trainable=trainable)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"cannot load adapter {folder} onto the base model: {exc}") from None


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` (a version mismatch between
    the two libraries, not a problem of ours): silence that one warning, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
