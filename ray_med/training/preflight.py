"""Checks the driver runs before any Train worker starts, so a user's mistake costs one line, not a worker group.

Everything here runs on the driver, in seconds, with no weights: the model is built on
PyTorch's ``meta`` device from its config (a 70B model's module tree costs no memory),
and the adapter is injected into it exactly as a worker would inject it. What cannot
be checked here (a mistake only a worker can see) is caught by
:func:`ray_med.training.trainer.user_errors_fail_once`.

* :func:`check_adapter` -- the method suits the stage (a method with a job of its own,
  M3OE, is refused by finetune's stages), and ``target_modules`` name modules the model
  has (PEFT would otherwise raise inside every worker);
* :func:`check_batches` -- the data gives every worker at least one full batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_med.adapters.registry import METHODS, get_method
from ray_med.errors import ConfigError, DataError

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig
    from ray_med.models.config import ModelConfig


def meta_model(model: ModelConfig, *, vocab_size: int | None = None, causal_lm: bool = True) -> Any:
    """The model's module tree on the meta device (names and shapes, no weights)."""
    # lazy: torch and transformers load only when a job checks a model, not when its config parses
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from ray_med.models import build_model, load_config

    if not model.path:
        assert model.preset is not None  # ModelConfig guarantees a preset when there is no path
        return build_model(model.preset, vocab_size=model.vocab_size or vocab_size, device="meta")
    config = load_config(model.path)
    decoder = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = AutoModelForCausalLM if (causal_lm and decoder) else AutoModel
    with torch.device("meta"):
        return auto.from_config(config)


def _linear_names(model: Any) -> list[str]:
    import torch  # lazy: see meta_model

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_adapter(model: Any, adapter: AdapterConfig, *, key: str = "adapter",
                  task_type: str | None = "CAUSAL_LM", stage: str | None = None) -> None:
    """ConfigError unless ``adapter`` can be injected into ``model`` (a meta model) as a worker would.

    ``stage="downstream"`` also requires a method that can carry a classifier (prompt
    learning prepends virtual tokens, so it cannot). A method trained by a job of its own
    (``trained_by``: M3OE and ``jobs/inject.py``) is refused at any stage: this check
    serves finetune's domain and downstream stages, which train PEFT adapters.
    """
    method = get_method(adapter.method)
    own_job = getattr(method, "trained_by", None)
    if own_job:
        usable = ", ".join(m.name for m in METHODS.values() if not getattr(m, "trained_by", None)
                           and (stage != "downstream" or m.stackable))
        raise ConfigError(f"{key}.method={adapter.method} is trained by {own_job}, not by finetune's domain or "
                          f"downstream stages; train it with {own_job}, or use {usable} here")
    if stage == "downstream" and not method.stackable:
        usable = ", ".join(m.name for m in METHODS.values() if m.stackable)
        raise ConfigError(f"{key}.method={adapter.method}: a classifier's adapter cannot be prompt learning "
                          f"(it prepends virtual tokens); use {usable}")
    if method.name == "lora":
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in adapter.target_modules if t not in names]
        if missing:
            raise ConfigError(f"{key}.target_modules: {', '.join(missing)} match no module of the model; "
                              f"its linear layers are: {', '.join(_linear_names(model))}")
    try:
        method.inject(model, adapter, task_type=task_type)
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}.method={adapter.method} does not fit this model: {first}") from None


def check_batches(items: int, *, batch_size: int, workers: int, what: str, unit: str, fix: str) -> None:
    """DataError unless ``items`` give each of ``workers`` at least one full batch of ``batch_size``."""
    need = batch_size * max(1, workers)
    if items < need:
        raise DataError(f"{what} has {items} {unit}, fewer than one batch of {batch_size} for each of "
                        f"{max(1, workers)} worker(s) ({need}); {fix}")
