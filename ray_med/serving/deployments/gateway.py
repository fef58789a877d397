"""The HTTP ingress: a FastAPI app that validates requests, resolves adapters and maps every error to JSON.

Endpoints: ``/v1/qa``, ``/v1/classify``, ``/v1/generate``, ``/v1/chat/completions``,
``/v1/models`` and ``/healthz``. Request bodies are the pydantic schemas of
:mod:`ray_med.serving.schemas`, passed to the model deployments as they are. The adapter
comes from the ``adapter`` field or the ``serve_multiplexed_model_id`` header. Every
exception, raised here or in a model replica, becomes ``{"error": ..., "type": ...}``
with the status :func:`ray_med.serving.errors.http_status` gives it, in one handler.
"""

# No `from __future__ import annotations` here: Serve's ingress rebuilds the endpoints
# from their signatures without evaluating string annotations, and FastAPI would then
# take `request: Request` for a query parameter.

import base64
import binascii
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_med.data.records import decode_image
from ray_med.errors import DataError
from ray_med.serving.config import ServeAppConfig
from ray_med.serving.deployments.classifier import Classifiers
from ray_med.serving.errors import HTTPError, http_status
from ray_med.serving.schemas import (
    ChatRequest,
    ClassifyRequest,
    ClassifyResponse,
    GenerateRequest,
    GenerateResponse,
    QARequest,
    QAResponse,
)

HEADER = "serve_multiplexed_model_id"
log = logging.getLogger("ray_med.serving")

api = FastAPI(title="ray_med", description="Medical QA, classification and generation on Ray Serve.")


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"error": "the request body is not valid JSON", "type": "invalid_json"}, status_code=400)
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    return JSONResponse({"error": "; ".join(parts), "type": "invalid_request"}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own 404/405 ("detail") in the API's error shape.
    return JSONResponse({"error": str(exc.detail), "type": "not_found" if exc.status_code == 404 else "invalid_request"},
                        status_code=exc.status_code)


@api.exception_handler(Exception)
async def _error(request: Request, exc: Exception) -> JSONResponse:
    """Every other exception, from this replica or a model replica, as JSON with its status."""
    if isinstance(exc, BackPressureError):
        exc = HTTPError(503, "the server is at capacity; retry later", "overloaded")
    status, kind, message = http_status(exc)
    if kind == "internal":
        # A bug, not bad input: the details (which may hold paths and remote tracebacks)
        # go to the replica's log, not to the client, and the replica keeps serving.
        log.error("internal error on %s", request.url.path, exc_info=exc)
    return JSONResponse({"error": message, "type": kind}, status_code=status)


def _check_image(data: str, limit: int) -> None:
    """A 400 for bad base64, a 415 for bytes that are not an image, a 413 when too big."""
    if len(data) > limit:
        raise HTTPError(413, f"image is {len(data)} base64 characters; the limit is {limit}", "input_too_long")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "image is not valid base64", "invalid_base64") from None
    try:
        decode_image(raw, what="image")
    except DataError as exc:
        too_big = "too large" in str(exc)  # a decompression bomb, not a non-image
        raise HTTPError(413 if too_big else 415, str(exc), "input_too_long" if too_big else "not_an_image") from None


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, cfg: ServeAppConfig, lm: DeploymentHandle | None, classifier: DeploymentHandle | None) -> None:
        self.cfg = cfg
        self.lm = lm
        self.classifier = classifier
        self.started = time.time()
        self.local = Classifiers(cfg) if cfg.classifiers and cfg.classify_in_gateway else None

    # ---- helpers

    def _adapter(self, request: Request, field_value: str | None, known: dict[str, str], what: str) -> str | None:
        header = request.headers.get(HEADER) or None
        if field_value and header and field_value != header:
            raise HTTPError(400, f"adapter {field_value!r} in the body and {header!r} in the {HEADER} header differ")
        name = field_value or header
        if name and name not in known:
            raise HTTPError(404, f"unknown {what} {name!r}; available: {sorted(known) or 'none'}", "unknown_adapter")
        return name

    def _check_length(self, **fields: str | None) -> None:
        for key, value in fields.items():
            if value is not None and len(value) > self.cfg.max_input_chars:
                raise HTTPError(413, f"{key} is {len(value)} characters; the limit is {self.cfg.max_input_chars}",
                                "input_too_long")

    def _lm(self, adapter: str | None) -> DeploymentHandle:
        if self.lm is None:
            raise HTTPError(404, "this server has no language model (set model in its config)", "not_deployed")
        return self.lm.options(multiplexed_model_id=adapter or "")

    def _max_new(self, n: int) -> None:
        if n > self.cfg.max_new_tokens:
            raise HTTPError(422, f"max_new_tokens {n} exceeds this server's limit of {self.cfg.max_new_tokens}")

    # ---- endpoints

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1)}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        data = []
        if self.cfg.model:
            data.append({"id": self.cfg.base_name, "object": "model", "owned_by": "ray_med", "kind": "base",
                         "path": self.cfg.model})
        data += [{"id": n, "object": "model", "owned_by": "ray_med", "kind": "lora", "parent": self.cfg.base_name,
                  "path": p} for n, p in self.cfg.adapters.items()]
        data += [{"id": n, "object": "model", "owned_by": "ray_med", "kind": "classifier", "path": p}
                 for n, p in self.cfg.classifiers.items()]
        return {"object": "list", "data": data}

    @api.post("/v1/qa", response_model=QAResponse, response_model_exclude_unset=True)
    async def qa(self, body: QARequest, request: Request) -> dict[str, Any]:
        self._check_length(question=body.question, context=body.context,
                           options="".join((body.options or {}).values()))
        adapter = self._adapter(request, body.adapter, self.cfg.adapters, "adapter")
        result = await self._lm(adapter).qa.remote(body)
        return {**result.to_dict(), "adapter": adapter}

    @api.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_unset=True)
    async def classify(self, body: ClassifyRequest, request: Request) -> dict[str, Any]:
        if self.classifier is None and self.local is None:
            raise HTTPError(404, "this server has no classifiers (set classifiers in its config)", "not_deployed")
        if body.text is None:
            raise HTTPError(422, "text is required (text_pair is the optional second segment)")
        self._check_length(text=body.text, text_pair=body.text_pair)
        name = self._adapter(request, body.adapter, self.cfg.classifiers, "classifier")
        if name is None:
            if len(self.cfg.classifiers) != 1:
                raise HTTPError(422, f"name a classifier in adapter; available: {sorted(self.cfg.classifiers)}")
            name = next(iter(self.cfg.classifiers))
        if self.local is not None:
            out = await self.local.classify(name, body)
        else:
            out = await self.classifier.options(multiplexed_model_id=name).classify.remote(body)
        return {**out, "adapter": name}

    @api.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_unset=True)
    async def generate(self, body: GenerateRequest, request: Request) -> dict[str, Any]:
        self._check_length(prompt=body.prompt)
        self._max_new(body.max_new_tokens)
        self._lm(None)  # a 404 first when there is no LM at all
        if body.image is not None:
            _check_image(body.image, self.cfg.max_input_chars * 10)
            raise HTTPError(422, "the served model is text-only; images need a multimodal model", "unsupported")
        adapter = self._adapter(request, body.adapter, self.cfg.adapters, "adapter")
        out = await self._lm(adapter).generate.remote(body)
        return {"text": out.text, "adapter": adapter}

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request) -> dict[str, Any]:
        self._lm(None)  # a 404 first when there is no LM at all
        if body.stream:
            raise HTTPError(422, "stream=true is not supported; send stream=false", "unsupported")
        for m in body.messages:
            self._check_length(content=m.content)
        adapter = None
        if body.model and body.model != self.cfg.base_name:
            adapter = self._adapter(request, body.model, self.cfg.adapters, "model")
        adapter = adapter or self._adapter(request, None, self.cfg.adapters, "adapter")
        max_new = body.max_completion_tokens or body.max_tokens or 64
        self._max_new(max_new)
        out = await self._lm(adapter).chat.remote(body, max_new)
        finish = "length" if out.completion_tokens >= max_new else "stop"
        return {
            "id": f"chatcmpl-{time.time_ns():x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": adapter or self.cfg.base_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
        }
