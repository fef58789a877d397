"""Many LoRA adapters on one base model, switched per call: what multi-adapter serving needs.

Each served adapter (a hospital's or a task's) is one or more PEFT LoRA folders, e.g. a
stacked classifier's stage-1 domain adapter and its downstream adapter. All of them are
loaded onto the same base weights under private PEFT names, and :meth:`AdapterHost.use`
activates one served adapter's set for the duration of a forward pass. The base is in
memory once however many adapters are loaded; loading or dropping one is a few
milliseconds for a LoRA, not a model load.

The host is not thread-safe: the active set is global state of the model. Callers run
every forward of a host on one thread (the Serve deployments use a one-thread executor).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_med.adapters.registry import METHODS, adapter_type, method_of_folder
from ray_med.errors import ModelError
from ray_med.models import inference_device, load_causal_lm, load_tokenizer


def _shared_titles() -> str:
    return ", ".join(m.title for m in METHODS.values() if m.host == "shared")


class AdapterHost:
    """One base model (its modules get LoRA layers in place) and named sets of adapters."""

    def __init__(self, base: Any) -> None:
        self.model = base
        """The transformers model; call it directly, the active adapters run inside it."""
        self._peft: Any = None
        self._sets: dict[str, list[str]] = {}
        self._count = 0

    @property
    def loaded(self) -> list[str]:
        return list(self._sets)

    def load(self, name: str, folders: Sequence[str | Path]) -> None:
        """Load ``folders`` (adapters of a ``shared`` method, applied together) as the served adapter ``name``."""
        if name in self._sets:
            return
        names: list[str] = []
        try:
            for folder in folders:
                method = method_of_folder(folder)
                if method is None or method.host != "shared":
                    raise ModelError(f"{folder} is a {adapter_type(folder)} adapter; one shared base serves "
                                     f"{_shared_titles()} adapters only")
                # Private names: served names may hold characters PEFT module keys cannot.
                pname = f"served{self._count}"
                self._count += 1
                self._peft = method.load(self._peft or self.model, folder, adapter_name=pname)
                names.append(pname)
        except ModelError:
            for pname in names:
                self._peft.delete_adapter(pname)
            raise
        self._sets[name] = names

    def unload(self, name: str) -> None:
        """Drop a served adapter's weights (the base is untouched)."""
        for pname in self._sets.pop(name, []):
            self._peft.delete_adapter(pname)

    @contextmanager
    def use(self, name: str | None) -> Iterator[Any]:
        """Run the block with ``name``'s adapters active (``None``: the bare base model)."""
        if name is not None and name not in self._sets:
            raise ModelError(f"adapter {name!r} is not loaded")
        if self._peft is None:
            yield self.model
            return
        lora = self._peft.base_model
        if name is None or not self._sets[name]:
            lora.disable_adapter_layers()
            try:
                yield self.model
            finally:
                lora.enable_adapter_layers()
        else:
            lora.set_adapter(self._sets[name])
            yield self.model


@dataclass
class HostedLM:
    """A causal LM, its tokenizer and named LoRA adapters on one copy of its weights.

    What ``evaluate.py qa`` and the LM deployment both answer with (:func:`load_lm`), so
    they load the same weights the same way and give the same answers.
    """

    model: Any
    tokenizer: Any
    host: AdapterHost
    adapters: dict[str, str] = field(default_factory=dict)
    """Adapter folders by served name; loaded on first use."""

    def load_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ModelError(f"unknown adapter {name!r}; this server has {sorted(self.adapters) or 'none'}")
        self.host.load(name, [self.adapters[name]])

    def unload_adapter(self, name: str) -> None:
        self.host.unload(name)

    def use(self, adapter: str | None) -> Any:
        """A context with ``adapter`` (loaded on demand) active; None: the bare model."""
        if adapter:
            self.load_adapter(adapter)
        return self.host.use(adapter)


def load_lm(model_path: str, adapters: dict[str, str] | None = None) -> HostedLM:
    """The causal LM in ``model_path`` on this machine's inference device, ready for adapters."""
    device, dtype = inference_device()
    model = load_causal_lm(model_path, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return HostedLM(model, tokenizer, AdapterHost(model), dict(adapters or {}))
