"""Request and response bodies of the HTTP API (pydantic), shared by the app and its clients.

Limits that protect a replica (input length, sample counts, token budgets) are part of
the schema, so an oversized request is refused with a 4xx before it reaches a model.
``MAX_CHARS`` is a hard ceiling (the gateway answers a text past it with 413, like one
past its configured ``max_input_chars``). A ``seed`` makes sampling repeatable; without
one every sampled request draws a fresh seed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_CHARS = 100_000  # hard ceiling; the app's max_input_chars is the working limit


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
    text: str | None = Field(default=None, min_length=1, max_length=MAX_CHARS)
    text_pair: str | None = Field(default=None, max_length=MAX_CHARS)
    adapter: str | None = None


class ClassifyResponse(BaseModel):
    label: str
    probabilities: dict[str, float]
    labels: list[str] | None = None
    adapter: str


class GenerateRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=MAX_CHARS)
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = _seed()
    image: str | None = Field(default=None, description="base64 PNG/JPEG, for multimodal models")
    adapter: str | None = None


class GenerateResponse(BaseModel):
    text: str
    adapter: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CHARS)


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
