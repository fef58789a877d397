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

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray_med.adapters.stacking import check_adapter_dir
from ray_med.errors import ModelError


def adapter_type(folder: str | Path) -> str:
    """The PEFT type of an adapter folder (``LORA``, ``ADAPTION_PROMPT``, ...)."""
    check_adapter_dir(str(folder))
    try:
        return str(json.loads((Path(folder) / "adapter_config.json").read_text()).get("peft_type", "")).upper()
    except json.JSONDecodeError as exc:
        raise ModelError(f"{folder}/adapter_config.json is not valid JSON ({exc.msg})") from None


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
        """Load ``folders`` (LoRA adapters, applied together) as the served adapter ``name``."""
        import peft

        if name in self._sets:
            return
        names: list[str] = []
        try:
            for folder in folders:
                kind = adapter_type(folder)
                if kind != "LORA":
                    raise ModelError(f"{folder} is a {kind} adapter; one shared base serves LoRA adapters only")
                # Private names: served names may hold characters PEFT module keys cannot.
                pname = f"served{self._count}"
                self._count += 1
                try:
                    if self._peft is None:
                        self._peft = peft.PeftModel.from_pretrained(self.model, str(folder), adapter_name=pname)
                    else:
                        self._peft.load_adapter(str(folder), adapter_name=pname)
                except (OSError, ValueError, KeyError, RuntimeError) as exc:
                    raise ModelError(f"cannot load adapter {folder} onto the base model: {exc}") from None
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
