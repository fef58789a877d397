"""What one generation request asks for, as the gateway hands it to a model replica.

Plain data (no torch, no Ray): the gateway builds a :class:`GenSpec` from an HTTP body
(``/v1/generate``, ``/v1/completions``, ``/v1/chat/completions``), the model replica
turns it into token ids and decodes it in the shared batch. Streaming replies are
:class:`Delta` events (text as it is decoded) ending with one :class:`Done`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenSpec:
    """One generation: a prompt or chat messages, and how to decode it."""

    prompt: str | None = None
    """Plain text to continue (``/v1/generate``, ``/v1/completions``)."""
    messages: list[dict[str, Any]] | None = None
    """Chat messages (``role``, ``content``: a string or OpenAI parts), rendered by the model's chat template."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    """Sampling seed; None: a random one."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the generation (not included in the text)."""
    image: str | None = None
    """Base64 image, for a multimodal model (``/v1/generate``'s ``image``; chat carries its own as parts)."""


@dataclass
class Delta:
    """Text decoded since the last event."""

    text: str


@dataclass
class Done:
    """The end of a generation: why it stopped and its token counts."""

    finish_reason: str
    """``stop`` (end of sequence or a stop string), ``length`` (max_new_tokens) or ``cancelled``."""
    prompt_tokens: int
    completion_tokens: int
