"""The model and tokenizer sections of a job config.

:class:`ModelConfig` names the model a job builds (a preset) or loads (a Hugging Face
folder or hub id); :class:`TokenizerConfig` sizes the BPE tokenizer trained for tiny
presets. Both check their values on construction, so a bad dtype or an unknown preset
fails while the config is parsed, not minutes into a job.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_med.errors import ModelError
from ray_med.models.presets import get_preset

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Which model a job builds or loads."""

    preset: str | None = "tiny-llama"
    """A preset name (see ray_med.models.list_presets), or null when model.path is used."""
    path: str | None = None
    """A Hugging Face model folder (written by save_pretrained) or hub id; wins over preset."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    vocab_size: int | None = None
    """Override the preset's vocabulary size (tiny presets take the trained tokenizer's)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ModelError(f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.preset and not self.path:
            raise ModelError("model: set either model.preset or model.path")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ModelError(f"model.vocab_size must be a positive integer, got {self.vocab_size}")
        if self.path:
            if self.vocab_size is not None:
                # A checkpoint's embedding matrix fixes its vocabulary; silently ignoring
                # the override would train with a size the user did not ask for.
                raise ModelError(
                    "model.vocab_size applies to presets only; the checkpoint at model.path keeps its own"
                )
        elif self.preset is not None:
            get_preset(self.preset)


@dataclass
class TokenizerConfig:
    """The byte-level BPE tokenizer trained for tiny presets (checkpoints bring their own)."""

    vocab_size: int = 2048
    """Vocabulary size, special tokens included."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    path: str | None = None
    """An HF tokenizer folder to use instead of training one (the pipeline passes the one its data stage trained)."""
    sample_documents: int = 1_000_000
    """Train on at most this many documents: a seeded sample of the training split, streamed to one Ray task."""
