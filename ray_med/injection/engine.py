"""Serving an injected model: one request's task, modality and input -> answer probabilities, or generated text. No Ray.

Two ways to apply the adapter, chosen per server (``gate`` in the Serve config):

* ``live``: the M3OE adapter; each request's gate is computed from its modality text and
  its task text, so a task the model was never trained on (a new description) is
  answered too;
* ``folded``: each known task's gate folded into a plain PEFT LoRA (``jobs/inject.py``'s
  ``folded/<task>/``), loaded on demand onto one copy of the LLM by this project's
  multi-adapter host (:class:`~ray_med.adapters.host.AdapterHost`): no M3OE code runs,
  and the Serve deployment keeps them in its multiplexed adapter cache.

For a FedPlug or FedPlugL model ``live`` is the only mode (there is no gate to fold).
The deployment calls an engine from one compute thread (the adapter switch is model state).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_med.adapters.host import AdapterHost
from ray_med.errors import ConfigError, DataError, ModelError
from ray_med.federated.data import to_inputs
from ray_med.injection.model import (
    CONFIG_FILE,
    Encoder,
    TaskSpec,
    choice_probs,
    collate,
    load_injected,
    read_injected_config,
)

GATES = ("live", "folded")


class InjectedEngine:
    """An injected model with its adapter (live gate) or its folded per-task LoRAs (folded)."""

    def __init__(self, model_dir: str, adapter: str = "", *, gate: str = "live", folded_dir: str = "") -> None:
        if gate not in GATES:
            raise ConfigError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
        self.gate = gate
        self.folded_dir = folded_dir
        cfg = read_injected_config(model_dir)
        if gate == "live":
            self.model, self.tokenizer, self.tasks = load_injected(model_dir, adapter or None)
            self.host = None
        else:
            self.model, self.tokenizer, self.tasks = load_injected(model_dir)
            self.host = AdapterHost(self.model.llm)
        self._enc_cfg = {m: json.loads((Path(model_dir) / "encoders" / m / "config.json").read_text())
                         for m in cfg["modalities"]}
        self.encoder = Encoder(self.tokenizer, self.tasks, self.model.modality_texts, self.model.n_tokens)

    # ------------------------------------------------------------------ adapters (folded mode)

    def load_adapter(self, task: str) -> None:
        if self.host is None:
            return
        folder = Path(self.folded_dir) / task
        if not folder.is_dir():
            raise ModelError(f"no folded LoRA for task {task!r} in {self.folded_dir}")
        self.host.load(task, [folder])

    def unload_adapter(self, task: str) -> None:
        if self.host is not None:
            self.host.unload(task)

    # ------------------------------------------------------------------ requests

    def task(self, name: str | None, modality: str | None) -> TaskSpec:
        """The request's task, checked against its modality (both names come from the client)."""
        if not name:
            raise DataError(f"an injected model needs a task; it knows {sorted(self.tasks)}")
        if name not in self.tasks:
            raise DataError(f"unknown task {name!r}; the injected model knows {sorted(self.tasks)}")
        task = self.tasks[name]
        if modality is not None and modality != task.modality:
            raise DataError(f"task {name} reads {task.modality} inputs, not {modality}")
        return task

    def inputs(self, task: TaskSpec, *, image: bytes | None = None, features: list[float] | None = None,
               text: str | None = None) -> np.ndarray:
        """One row of the task's encoder input from the request's image, features or text."""
        mod, spec = task.modality, self._enc_cfg[task.modality]
        given = {"image": image is not None, "features": features is not None, "text": text is not None}
        need = {"image": "image", "tabular": "features", "signal": "features", "text": "text"}[mod]
        if not given[need]:
            raise DataError(f"task {task.name} reads {mod} inputs: send {need}")
        if mod == "image":
            return to_inputs([image], "image", image_size=int(spec.get("image_size", 28)))[0]
        if mod == "text":
            return to_inputs([text], "text", max_length=int(spec.get("max_length", 128)))[0]
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 1 or x.shape[0] != int(spec.get("in_features", 0)):
            raise DataError(f"task {task.name}: features must be {spec.get('in_features')} numbers, got "
                            f"{x.shape[0] if x.ndim == 1 else x.shape}")
        return x

    def _active(self, task: str) -> Any:
        if self.host is None:
            return nullcontext()
        self.load_adapter(task)
        return self.host.use(task)

    def classify(self, task_name: str, modality: str | None = None, **inputs: Any) -> dict[str, Any]:
        """The answer word and the probability of each for one input."""
        task = self.task(task_name, modality)
        item = self.encoder.item(task.name, self.inputs(task, **inputs), 0)
        with self._active(task.name):
            probs = choice_probs(self.model, [item], self.encoder.pad)[0]
        options = task.options
        return {"label": options[int(probs.argmax())], "labels": options, "task": task.name,
                "modality": task.modality, "gate": self.gate,
                "probabilities": {o: round(float(p), 6) for o, p in zip(options, probs, strict=True)}}

    @torch.no_grad()
    def generate(self, task_name: str, modality: str | None = None, *, max_new_tokens: int = 16,
                 **inputs: Any) -> dict[str, Any]:
        """Greedy text after the task's prompt (its answer, in words), with the gate of (task, modality)."""
        task = self.task(task_name, modality)
        item = self.encoder.item(task.name, self.inputs(task, **inputs), 0)
        device = next(self.model.llm.parameters()).device
        b = collate([item], self.encoder.pad)
        ids, x = b["input_ids"].to(device), {m: v.to(device) for m, v in b["inputs"].items()}
        eos, pad = self.tokenizer.eos_token_id, self.encoder.pad
        with self._active(task.name):
            gate = self.model.gate({k: v.to(device) for k, v in b["gate_text"].items()}).weights \
                if self.model.m3oe is not None else None
            with self.model.m3oe.gate_context(gate) if gate is not None else nullcontext():
                emb = self.model.embed(ids, x)
                # From embeddings, transformers returns only the new tokens.
                new = self.model.llm.generate(inputs_embeds=emb, attention_mask=b["attention_mask"].to(device),
                                              max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                                              temperature=None, pad_token_id=pad, eos_token_id=eos)
        out = [t for t in new[0].tolist() if t not in (eos, pad)]
        return {"text": self.tokenizer.decode(out, skip_special_tokens=True).strip(), "task": task.name,
                "modality": task.modality, "gate": self.gate, "tokens": len(out)}


def is_injected(model_dir: str) -> bool:
    return (Path(model_dir) / CONFIG_FILE).is_file()
