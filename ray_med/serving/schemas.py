"""Request and response bodies of the HTTP API (pydantic), shared by the app and its clients.

Limits that protect a replica (input length, sample counts, token budgets) are part of
the schema, so an oversized request is refused with a 4xx before it reaches a model.
``MAX_CHARS`` is a hard ceiling (the gateway answers a text past it with 413, like one
past its configured ``max_input_chars``). A ``seed`` makes sampling repeatable; without
one every sampled request draws a fresh seed.

Images travel as base64 (``image`` fields) or, in chat messages, as OpenAI
``image_url`` parts holding a ``data:`` URL. The gateway checks each one (:func:`ray_med.serving.guards.check_image`: base64, an
image, within ``max_input_chars`` x 10 characters and ``max_image_pixels``) before it
reaches a model. :func:`data_url_base64` reads such a URL: the server fetches
nothing, so any other URL is refused.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic_core import PydanticCustomError

from ray_med.errors import DataError

MAX_CHARS = 100_000  # hard ceiling; the app's max_input_chars is the working limit
MAX_PARTS = 64  # content parts of one chat message


def _seed() -> object:
    # torch.manual_seed's range; none: a random seed per request
    return Field(default=None, ge=0, lt=2**63, description="sampling seed, for repeatable samples; default: random")


class _Strict(BaseModel):
    # A misspelt field ("temprature") is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")


class QARequest(_Strict):
    question: str = Field(min_length=1, max_length=MAX_CHARS)
    context: str | None = Field(default=None, max_length=MAX_CHARS)
    options: dict[str, str] | None = Field(default=None, description="answer options by letter; none means yes/no/maybe")
    mode: Literal["top_token", "cot", "sc_cot"] | None = Field(default=None, description="default: the server's qa.mode")
    n: int | None = Field(default=None, ge=1, le=32, description="samples for sc_cot")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    seed: int | None = _seed()
    adapter: str | None = None

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if not 2 <= len(v) <= 26:
            raise ValueError("needs between 2 and 26 options")
        if any(not k.strip() or len(k) > 16 for k in v):
            raise ValueError("option keys must be 1-16 characters (e.g. letters)")
        if any(len(t) > MAX_CHARS for t in v.values()):  # an over-long input: 413, as for every text field
            raise PydanticCustomError("string_too_long", "an option is longer than {limit} characters",
                                      {"limit": MAX_CHARS})
        return v


class QAResponse(BaseModel):
    answer: str | None
    abstained: bool
    scores: dict[str, float] | None = None
    logprobs: dict[str, float] | None = None
    votes: dict[str, int] | None = None
    invalid: int | None = None
    rationale: str | None = None
    adapter: str | None = None


class ClassifyRequest(_Strict):
    """Text classification by a stage-2 classifier (``text``, ``text_pair``, ``adapter``), or, with ``image``
    and ``task``, image classification by the multimodal model (``text``: the question, for a task without
    a fixed one)."""

    text: str | None = Field(default=None, min_length=1, max_length=MAX_CHARS)
    text_pair: str | None = Field(default=None, max_length=MAX_CHARS)
    adapter: str | None = None
    image: str | None = Field(default=None, description="base64 PNG/JPEG; with task: the multimodal model classifies it")
    task: str | None = Field(default=None, max_length=64,
                             description="a multimodal image task (e.g. pneumonia), with image; or a task of the "
                                         "injected model (seen or unseen)")
    modality: str | None = Field(default=None, max_length=32,
                                 description="injected model: the input's modality (image, tabular, text, signal); "
                                             "default: the task's")
    features: list[float] | None = Field(default=None, max_length=100_000,
                                         description="injected model: a tabular row or a signal, as numbers")


class ClassifyResponse(BaseModel):
    label: str
    probabilities: dict[str, float]
    labels: list[str] | None = None
    adapter: str | None = None
    task: str | None = None
    modality: str | None = None
    gate: str | None = None
    """Injected model: live (M3OE's gate computed for the request) or folded (the task's folded LoRA)."""


class GenerateRequest(_Strict):
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_CHARS,
                               description="required, except for an injected model's image, tabular and signal "
                                           "tasks (its text tasks: the note)")
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = _seed()
    image: str | None = Field(default=None, description="base64 PNG/JPEG, for multimodal models")
    adapter: str | None = None
    task: str | None = Field(default=None, max_length=64, description="injected model: the task whose question "
                                                                        "is answered (seen or unseen)")
    modality: str | None = Field(default=None, max_length=32, description="injected model: the input's modality")
    features: list[float] | None = Field(default=None, max_length=100_000,
                                         description="injected model: a tabular row or a signal")


class GenerateResponse(BaseModel):
    text: str
    adapter: str | None = None
    task: str | None = None
    modality: str | None = None
    gate: str | None = None


class TextPart(_Strict):
    """An OpenAI text content part."""

    type: Literal["text"]
    text: str = Field(max_length=MAX_CHARS)


class ImageURL(_Strict):
    url: str = Field(description="data:image/png;base64,... (the server fetches no other URL)")
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's; one resolution here, so unused


class ImagePart(_Strict):
    """An OpenAI image content part; the image must be inline, as a ``data:`` URL."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Annotated[
        Annotated[Annotated[str, Field(max_length=MAX_CHARS)], Tag("text")]
        | Annotated[Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_PARTS)], Tag("parts")],
        # a string or a list of parts: an error names the one that was sent, not both
        Discriminator(lambda v: "parts" if isinstance(v, list) else "text"),
    ] = Field(description="a string, or OpenAI content parts (text and image_url)")

    def text(self) -> str:
        """The message's text: its text parts joined (image parts are not text)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        """The URLs of its image parts, in order."""
        if isinstance(self.content, str):
            return []
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)]


class ChatRequest(BaseModel):
    # OpenAI clients send fields this subset ignores (stream=false, top_p=1, ...): allow them.
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = _seed()
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False


def data_url_base64(url: str) -> str:
    """The base64 payload of a ``data:<type>;base64,<data>`` URL; a DataError (HTTP 422) for anything else."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if ":" in url else "no scheme"
        raise DataError(f"image_url: only data: URLs (data:image/png;base64,...) are accepted, got {scheme!r}; "
                        "the server fetches nothing")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise DataError("image_url: a data: URL must carry base64 data (data:image/png;base64,...)")
    return payload


def image_bytes(data: str, what: str = "image") -> bytes:
    """The bytes of a base64 image field; a DataError (HTTP 422) when it is not base64.

    The gateway has already answered bad base64 with 400 (``check_image``); this is the
    replica's own check, for callers that skip the gateway.
    """
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{what} is not valid base64") from None
