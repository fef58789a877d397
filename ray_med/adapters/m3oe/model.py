"""An LLM with M3OE layers (:class:`M3OE`): injection, the gate, saving and loading, folding to LoRA, merging.

:meth:`M3OE.inject` replaces the target linear layers of the LLM, in place, with
:class:`~ray_med.adapters.m3oe.layer.M3OELinear`; the layers stay registered in the LLM
(its ``state_dict`` and ``parameters()`` include them) and :class:`M3OE` keeps plain
references to them, beside its one registered submodule, the
:class:`~ray_med.adapters.m3oe.router.Router`. A forward pass of the LLM needs a gate on
every layer: :meth:`M3OE.compute_gate` makes one per sample from the task and modality
texts, and :meth:`M3OE.gate_context` sets it for a block.

Folder formats:

* :meth:`M3OE.save`: ``adapter_config.json`` (``peft_type: M3OE``, the config, the
  hidden size) and ``adapter_model.safetensors`` (``router.*``, ``<module
  path>.lora_A`` / ``.lora_B``), read back by :meth:`M3OE.load`;
* :meth:`M3OE.fold_to_lora`: for one fixed gate, a standard PEFT LoRA folder that plain
  ``PeftModel.from_pretrained`` loads, with exactly the same outputs (and so every LoRA
  tool of ray_med: the shared serving host, stacking, merging).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ray_med.adapters.m3oe.config import PEFT_TYPE, M3OEConfig
from ray_med.adapters.m3oe.layer import M3OELinear
from ray_med.adapters.m3oe.router import GateOutput, Router
from ray_med.errors import ConfigError, ModelError, RayMedError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _hidden_size(llm: nn.Module) -> int:
    get = getattr(llm, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return emb.embedding_dim
    config = getattr(llm, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "hidden_size", None):
        return int(text.hidden_size)
    raise ModelError(f"cannot tell the hidden size of {type(llm).__name__} (no input embeddings, no config)")


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _gate_vector(gate: torch.Tensor, experts: int) -> torch.Tensor:
    gate = torch.as_tensor(gate).detach()
    if gate.shape != (experts,):
        raise ValueError(f"a fixed M3OE gate has shape ({experts},), got {tuple(gate.shape)}")
    return gate


class M3OE(nn.Module):
    """The router and references to the M3OE layers injected into ``llm`` (which is changed in place)."""

    def __init__(self, llm: nn.Module, cfg: M3OEConfig, router: Router, layers: dict[str, M3OELinear],
                 hidden_size: int) -> None:
        super().__init__()
        self.router = router
        self.cfg = cfg
        self.hidden_size = hidden_size
        # Not registered: the LLM and its layers are the LLM's, not double-counted in ours.
        object.__setattr__(self, "llm", llm)
        object.__setattr__(self, "layers", layers)

    # ------------------------------------------------------------------ injection

    @classmethod
    def inject(cls, llm: nn.Module, cfg: M3OEConfig) -> M3OE:
        """Put E LoRA experts into every linear layer of ``llm`` named in ``cfg.target_modules`` (in place).

        Every weight of ``llm`` is frozen; the experts and the router train. The experts
        take the device and dtype of the layer they sit in, the router those of the
        input embeddings.
        """
        if any(isinstance(m, M3OELinear) for m in llm.modules()):
            raise ModelError("this model already has M3OE layers; inject into a fresh copy of the base")
        targets = set(cfg.target_modules)
        found = [(name, m) for name, m in llm.named_modules()
                 if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
        if not found:
            linears = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"m3oe target_modules {', '.join(cfg.target_modules)} match no linear layer of the "
                              f"model; its linear layers are: {', '.join(linears)}")
        hidden = _hidden_size(llm)
        llm.requires_grad_(False)
        layers: dict[str, M3OELinear] = {}
        for name, base in found:
            layer = M3OELinear(base, experts=cfg.experts, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
            layer.train(base.training)
            _set_module(llm, name, layer)
            layers[name] = layer
        get = getattr(llm, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        ref = emb.weight if isinstance(emb, nn.Embedding) else found[0][1].weight
        router = Router(hidden, cfg.experts, gate_dim=cfg.gate_dim, top_k=cfg.top_k, gate_inputs=cfg.gate_inputs,
                        device=ref.device, dtype=ref.dtype)
        return cls(llm, cfg, router, layers, hidden)

    # ---------------------------------------------------------------------- gate

    def compute_gate(self, embeddings: nn.Module, modality_ids: torch.Tensor, modality_mask: torch.Tensor | None,
                     task_ids: torch.Tensor, task_mask: torch.Tensor | None) -> GateOutput:
        """The gate of each sample from its tokenized modality and task texts ((B, L) ids and masks).

        ``embeddings`` is the LLM's input-embedding module (``llm.get_input_embeddings()``);
        no gradient flows into its table, only into the router.
        """
        with torch.no_grad():
            modality, task = embeddings(modality_ids), embeddings(task_ids)
        return self.router(modality, modality_mask, task, task_mask)

    def set_gate(self, weights: torch.Tensor | GateOutput | None) -> None:
        """Put ``weights`` ((B, E) per sample, or (E,) for all; None clears) on every layer."""
        gate = weights.weights if isinstance(weights, GateOutput) else weights
        for layer in self.layers.values():
            layer.gate = gate

    @contextmanager
    def gate_context(self, weights: torch.Tensor | GateOutput) -> Iterator[M3OE]:
        """Run the block with ``weights`` on every layer; the gate is cleared afterwards.

        With activation checkpointing the layers run again during ``backward()``, so call
        ``backward()`` inside the block too.
        """
        self.set_gate(weights)
        try:
            yield self
        finally:
            self.set_gate(None)

    def forward(self, *args: Any, gate: torch.Tensor | GateOutput | None = None, **kwargs: Any) -> Any:
        """The LLM's forward pass with ``gate`` set for it (None: the gate already set)."""
        if gate is None:
            return self.llm(*args, **kwargs)
        with self.gate_context(gate):
            return self.llm(*args, **kwargs)

    # ------------------------------------------------------------------ weights

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The router's weights and every layer's ``lora_A`` and ``lora_B`` (the base stays frozen)."""
        params = list(self.router.parameters())
        for layer in self.layers.values():
            params += [layer.lora_A, layer.lora_B]
        return params

    def state_dict_adapter(self) -> dict[str, torch.Tensor]:
        """The adapter's weights only: ``router.*`` and ``<module path>.lora_A`` / ``.lora_B``."""
        out = {f"router.{k}": v.detach() for k, v in self.router.state_dict().items()}
        for path, layer in self.layers.items():
            out[f"{path}.lora_A"] = layer.lora_A.detach()
            out[f"{path}.lora_B"] = layer.lora_B.detach()
        return out

    def _params_by_key(self) -> dict[str, nn.Parameter]:
        out = {f"router.{k}": v for k, v in self.router.named_parameters()}
        for path, layer in self.layers.items():
            out[f"{path}.lora_A"], out[f"{path}.lora_B"] = layer.lora_A, layer.lora_B
        return out

    def save(self, folder: str | Path) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``folder``; returns it."""
        from safetensors.torch import save_file  # lazy: only saving needs safetensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**self.cfg.to_dict(), "hidden_size": self.hidden_size}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.contiguous().cpu() for k, v in self.state_dict_adapter().items()}, str(folder / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        return folder

    @classmethod
    def load(cls, llm: nn.Module, folder: str | Path, *, trainable: bool = False) -> M3OE:
        """The M3OE adapter saved in ``folder``, injected into ``llm`` (in place).

        Strict: a key missing or extra, or a weight of the wrong shape, is a ModelError
        and leaves ``llm`` as it was. ``trainable=False`` freezes the adapter too.
        """
        from safetensors.torch import load_file  # lazy: only loading needs safetensors

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ModelError(f"{folder} is not an adapter folder (no {CONFIG_FILE})")
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{folder}/{CONFIG_FILE} is not valid JSON ({exc.msg})") from None
        if str(meta.get("peft_type", "")).upper() != PEFT_TYPE:
            raise ModelError(f"{folder} holds a {meta.get('peft_type')} adapter, not an M3OE one")
        try:
            cfg = M3OEConfig.from_dict(meta)
        except (ConfigError, TypeError) as exc:
            raise ModelError(f"{folder}/{CONFIG_FILE}: {exc}") from None
        if not (folder / WEIGHTS_FILE).is_file():
            raise ModelError(f"{folder} has no {WEIGHTS_FILE}")
        hidden = _hidden_size(llm)
        if meta.get("hidden_size") not in (None, hidden):
            raise ModelError(f"{folder} was trained on a model of hidden size {meta['hidden_size']}, this one has "
                             f"{hidden}")
        try:
            saved = load_file(str(folder / WEIGHTS_FILE))
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ModelError(f"cannot read {folder}/{WEIGHTS_FILE}: {exc}") from None
        model = cls.inject(llm, cfg)
        try:
            model._load_weights(saved, folder)
        except RayMedError:
            model._unwrap()
            raise
        for p in model.trainable_parameters():
            p.requires_grad_(trainable)
        return model

    def load_weights(self, folder: str | Path) -> None:
        """Copy a saved adapter's weights into this one (the same config and model), e.g. to continue training."""
        from safetensors.torch import load_file  # lazy: only loading needs safetensors

        folder = Path(folder)
        if not (folder / WEIGHTS_FILE).is_file():
            raise ModelError(f"{folder} has no {WEIGHTS_FILE}")
        self._load_weights(load_file(str(folder / WEIGHTS_FILE)), folder)

    def _load_weights(self, saved: dict[str, torch.Tensor], folder: Path) -> None:
        params = self._params_by_key()
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            parts = [f"{what} {len(keys)} key(s), e.g. {keys[0]}"
                     for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
            raise ModelError(f"{folder}/{WEIGHTS_FILE} does not fit this model: {'; '.join(parts)}")
        for key, param in params.items():
            if tuple(saved[key].shape) != tuple(param.shape):
                raise ModelError(f"{folder}/{WEIGHTS_FILE}: {key} has shape {tuple(saved[key].shape)}, this model "
                                 f"needs {tuple(param.shape)}")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(saved[key])

    def _unwrap(self) -> nn.Module:
        """Put the plain base layers back (the experts are dropped, not merged)."""
        for path, layer in self.layers.items():
            _set_module(self.llm, path, layer.base)
        self.layers.clear()
        return self.llm

    # -------------------------------------------------------- fixed-gate exports

    def fold_to_lora(self, gate: torch.Tensor, folder: str | Path, *, base_model_name_or_path: str | None = None,
                     task_type: str | None = "CAUSAL_LM") -> Path:
        """Write the adapter under one fixed ``gate`` (E,) as a standard PEFT LoRA folder; returns it.

        Exact, not an approximation: the experts with a nonzero gate are concatenated,
        ``A' = [A_e1; A_e2; ...]`` (rank E' r) and ``B' = [g_e1 (alpha/r) B_e1, ...]``, so
        ``B' A' = sum_e g_e (alpha/r) B_e A_e``, and ``lora_alpha = r' = E' r`` makes PEFT's
        own scaling 1. The router is not part of it: the gate is baked in.
        """
        # lazy: peft and safetensors import transformers; only exporting needs them
        import peft
        from safetensors.torch import save_file

        g = _gate_vector(gate, self.cfg.experts)
        chosen = torch.nonzero(g).flatten().tolist()
        if not chosen:
            raise ValueError("the M3OE gate is all zeros: there is no expert to fold")
        rank = len(chosen) * self.cfg.r
        weights = {}
        for path, layer in self.layers.items():
            idx = torch.tensor(chosen, device=layer.lora_A.device)
            a = layer.lora_A.detach()[idx].reshape(rank, layer.in_features)
            ge = (g.to(device=layer.lora_B.device, dtype=layer.lora_B.dtype)[idx] * layer.scaling)
            b = (layer.lora_B.detach()[idx] * ge[:, None, None]).permute(1, 0, 2).reshape(layer.out_features, rank)
            weights[f"base_model.model.{path}.lora_A.weight"] = a.contiguous().cpu()
            weights[f"base_model.model.{path}.lora_B.weight"] = b.contiguous().cpu()
        lcfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=self.cfg.dropout,
                               target_modules=list(self.cfg.target_modules), bias="none", task_type=task_type,
                               base_model_name_or_path=base_model_name_or_path)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lcfg.save_pretrained(str(folder))
        save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        return folder

    def merge(self, gate: torch.Tensor) -> nn.Module:
        """Add the experts under one fixed ``gate`` (E,) into the base weights and put the plain layers back.

        Returns the LLM, now a plain model with no M3OE code (its weights stay frozen);
        this M3OE object has no layers left afterwards.
        """
        g = _gate_vector(gate, self.cfg.experts)
        with torch.no_grad():
            for layer in self.layers.values():
                base = layer.base.weight
                base += layer.delta_weight(g).to(device=base.device, dtype=base.dtype)
        return self._unwrap()
