"""Request and response bodies of the HTTP API (pydantic), shared by the app and its clients.

Limits that protect a replica (input length, sample counts, token budgets) are part of
the schema, so an oversized request is refused with a 4xx before it reaches a model.
``MAX_CHARS`` is a hard ceiling (the gateway answers a text past it with 413, like one
past its configured ``max_input_chars``). A ``seed`` makes sampling repeatable; without
one every sampled request draws a fresh seed.

The OpenAI-compatible bodies (:class:`ChatRequest`, :class:`CompletionRequest`) accept
and ignore the OpenAI fields this server has no use for (``user``, ``frequency_penalty``,
a message's ``name``, a part's ``cache_control``, ...), so the official SDKs, LangChain
and LiteLLM work unchanged; what they cannot honour (``n`` > 1, ``logprobs``, ``echo``,
``best_of``, tools) and out-of-range values are refused with 422. Our own bodies
(``/v1/qa``, ``/v1/classify``, ``/v1/generate``) stay strict: a misspelt field is an error.
``stop`` (a string or up to 4) and ``top_p`` apply to chat, completions and generate.

Images travel as base64 (``image`` fields) or, in chat messages, as OpenAI
``image_url`` parts holding a ``data:`` URL. The gateway checks each one (:func:`ray_med.serving.guards.check_image`: base64, an
image, within ``max_input_chars`` x 10 characters and ``max_image_pixels``) before it
reaches a model. :func:`data_url_base64` reads such a URL: the server fetches
nothing, so any other URL is refused.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ray_med.errors import DataError

MAX_CHARS = 100_000  # hard ceiling; the app's max_input_chars is the working limit
MAX_PARTS = 64  # content parts of one chat message
MAX_STOP = 4  # stop strings, as OpenAI allows


def _seed() -> object:
    # torch.manual_seed's range; none: a random seed per request
    return Field(default=None, ge=0, lt=2**63, description="sampling seed, for repeatable samples; default: random")


def _top_p() -> object:
    return Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling: the smallest set of tokens whose "
                                                          "probability reaches top_p (1: all)")


def _one_or_list(text: Any) -> Any:
    """A string or a non-empty list of them; an error names the form that was sent, not both.

    The list's length is checked by the model's validator: pydantic's own ``too_long``
    error reads, to the gateway, as an over-long input (413), and too many stop strings is a 422.
    """
    return Annotated[
        Annotated[text, Tag("one")] | Annotated[list[text], Field(min_length=1), Tag("list")],
        Discriminator(lambda v: "list" if isinstance(v, list) else "one"),
    ]


def _at_most(v: Any, n: int, what: str) -> Any:
    if isinstance(v, list) and len(v) > n:
        raise ValueError(f"at most {n} {what}, not {len(v)}")
    return v


# Each non-empty: an empty stop string would end every text before it starts.
Stop = _one_or_list(Annotated[str, Field(min_length=1, max_length=1000)]) | None


def stop_list(stop: str | list[str] | None) -> list[str]:
    """A ``stop`` field as the list a :class:`~ray_med.generation.spec.GenSpec` takes."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


class _Strict(BaseModel):
    # A misspelt field ("temprature") is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")


class _OpenAI(BaseModel):
    # OpenAI clients send fields this server does not use (user, frequency_penalty, a
    # message's name, a part's cache_control, ...): accepted and dropped, so an SDK
    # request is not a 422. What would change the answer if ignored is refused by name.
    model_config = ConfigDict(extra="ignore")


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
    top_p: float = _top_p()
    seed: int | None = _seed()
    stop: Stop = Field(default=None, description="a string, or up to 4, that ends the text (not included)")
    stream: bool = Field(default=False, description="Server-Sent Events: {text} deltas, then {done, finish_reason, "
                                                    "usage}, then [DONE]")
    image: str | None = Field(default=None, description="base64 PNG/JPEG, for multimodal models")
    _stop = field_validator("stop")(lambda v: _at_most(v, MAX_STOP, "stop strings"))
    adapter: str | None = None
    task: str | None = Field(default=None, max_length=64, description="injected model: the task whose question "
                                                                        "is answered (seen or unseen)")
    modality: str | None = Field(default=None, max_length=32, description="injected model: the input's modality")
    features: list[float] | None = Field(default=None, max_length=100_000,
                                         description="injected model: a tabular row or a signal")


class GenerateResponse(BaseModel):
    text: str
    adapter: str | None = None
    finish_reason: str | None = None
    """``stop`` (end of text or a stop string) or ``length`` (max_new_tokens)."""
    usage: dict[str, int] | None = None
    task: str | None = None
    modality: str | None = None
    gate: str | None = None


class TextPart(_OpenAI):
    """An OpenAI text content part."""

    type: Literal["text"]
    text: str = Field(max_length=MAX_CHARS)


class ImageURL(_OpenAI):
    url: str = Field(description="data:image/png;base64,... (the server fetches no other URL)")
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's; one resolution here, so unused


class ImagePart(_OpenAI):
    """An OpenAI image content part; the image must be inline, as a ``data:`` URL."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_OpenAI):
    # "developer" is what newer OpenAI SDKs call the system message; chat templates know
    # only "system", so it is read as one. Tool turns are refused: this server calls no tools.
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[
        Annotated[Annotated[str, Field(max_length=MAX_CHARS)], Tag("text")]
        | Annotated[Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_PARTS)], Tag("parts")],
        # a string or a list of parts: an error names the one that was sent, not both
        Discriminator(lambda v: "parts" if isinstance(v, list) else "text"),
    ] = Field(description="a string, or OpenAI content parts (text and image_url)")

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        return "system" if v == "developer" else v

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


def _unsupported(v: object, info: ValidationInfo) -> object:
    """A field this server does not honour: its SDK default (None, False, 0, empty) passes, anything else is a 422."""
    if v:
        raise ValueError(f"{info.field_name} is not supported; leave it unset")
    return v


class StreamOptions(_OpenAI):
    include_usage: bool = False
    """A last chunk with the token counts (and no choices), before ``[DONE]``."""


class _Sampling(_OpenAI):
    """What chat and completions share: the model (base or adapter), sampling, stop strings and streaming."""

    model: str | None = Field(default=None, description="the base model or one of its adapters (see /v1/models)")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = _top_p()
    seed: int | None = _seed()
    stop: Stop = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = Field(default=None, description="not supported")

    _stop = field_validator("stop")(lambda v: _at_most(v, MAX_STOP, "stop strings"))
    _no_logprobs = field_validator("logprobs")(_unsupported)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = Field(default=None, description="not supported")
    tools: list[dict] | None = Field(default=None, description="not supported")

    # Ignored tools would read as "the model chose not to call one": refused instead.
    _no_tools = field_validator("top_logprobs", "tools")(_unsupported)


class CompletionRequest(_Sampling):
    """OpenAI's legacy ``/v1/completions``: one prompt continued, one choice."""

    prompt: _one_or_list(Annotated[str, Field(min_length=1, max_length=MAX_CHARS)]) = Field(
        description="one prompt (a list of one string is accepted too)")
    max_tokens: int = Field(default=16, ge=1, description="OpenAI's default: 16")
    echo: bool = Field(default=False, description="not supported")
    best_of: int | None = Field(default=None, ge=1, le=1, description="not supported (1 only)")
    suffix: str | None = Field(default=None, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        return _at_most(v, 1, "prompt (one per request)")[0] if isinstance(v, list) else v  # a batch of one

    _no_echo = field_validator("echo", "suffix")(_unsupported)


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
