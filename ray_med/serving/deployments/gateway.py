"""The HTTP ingress: a FastAPI app that checks requests, resolves adapters and maps every error to JSON.

Endpoints: ``/v1/qa``, ``/v1/classify``, ``/v1/generate``, ``/v1/chat/completions``,
``/v1/models`` and ``/healthz``. When the served model is multimodal (a LLaVA folder,
read from its config at start-up, never loaded here), ``/v1/generate`` takes an
``image``, chat messages take OpenAI ``image_url`` parts (``data:`` URLs), and
``/v1/classify`` with ``image`` + ``task`` asks it an image classification task; every
image is checked here first (:func:`~ray_med.serving.guards.check_image`). A text-only
model answers an image with 422. Request bodies are the pydantic schemas of
:mod:`ray_med.serving.schemas`, passed to the model deployments as they are. The adapter
comes from the ``adapter`` field or the ``serve_multiplexed_model_id`` header. Every
exception, raised here or in a model replica, becomes ``{"error": ..., "type": ...}``
with the status :func:`ray_med.serving.errors.http_status` gives it, in one handler.

Each replica builds its FastAPI app from its config at start-up (Serve's
``__serve_build_asgi_app__``): the API key check (:mod:`ray_med.serving.guards`) and the
``/docs`` page exist only when the config asks for them. :func:`make_api` builds it from
any object with the endpoint methods, so it runs in process without Serve.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# to know what is a body and what is the request.

import asyncio
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

from ray_med.errors import RayMedError
from ray_med.serving.config import ServeAppConfig
from ray_med.serving.deployments.classifier import Classifiers
from ray_med.serving.engines import image_classification_tasks
from ray_med.serving.errors import HTTPError, http_status
from ray_med.serving.guards import BearerAuth, check_image, read_api_key
from ray_med.serving.schemas import (
    ChatRequest,
    ClassifyRequest,
    ClassifyResponse,
    GenerateRequest,
    GenerateResponse,
    QARequest,
    QAResponse,
    data_url_base64,
)
from ray_med.tasks.registry import get_multimodal_task

HEADER = "serve_multiplexed_model_id"
log = logging.getLogger("ray_med.serving")

# (method, path, endpoint method name, route options)
ROUTES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("GET", "/healthz", "healthz", {}),
    ("GET", "/v1/models", "models", {}),
    ("POST", "/v1/qa", "qa", {"response_model": QAResponse, "response_model_exclude_unset": True}),
    ("POST", "/v1/classify", "classify", {"response_model": ClassifyResponse, "response_model_exclude_unset": True}),
    ("POST", "/v1/generate", "generate", {"response_model": GenerateResponse, "response_model_exclude_unset": True}),
    ("POST", "/v1/chat/completions", "chat", {}),
]
TOO_LONG = ("string_too_long", "too_long")  # pydantic's error types for a text or list past its max_length


def make_api(endpoints: Any, cfg: ServeAppConfig, api_key: str | None = None) -> FastAPI:
    """The FastAPI app of ``endpoints`` (an object with the ROUTES' methods) under ``cfg``'s exposure settings."""
    api = FastAPI(title="ray_med", description="Medical QA, classification and generation on Ray Serve.",
                  docs_url="/docs" if cfg.docs else None, redoc_url=None)
    for method, path, name, options in ROUTES:
        api.add_api_route(path, getattr(endpoints, name), methods=[method], **options)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"error": "the request body is not valid JSON", "type": "invalid_json"},
                                status_code=400)
        too_long = [e for e in errors if e.get("type") in TOO_LONG]
        if too_long:  # past the schema's hard ceiling: the same 413 as past the configured limit
            e = too_long[0]
            where, value = _where(e), e.get("input")
            message = (f"{where} is {len(value)} characters; the limit is {cfg.max_input_chars}"
                       if isinstance(value, str) else f"{where}: {e.get('msg')}")
            return JSONResponse({"error": message, "type": "input_too_long"}, status_code=413)
        parts = [f"{_where(e)}: {e.get('msg')}" for e in errors]
        return JSONResponse({"error": "; ".join(parts), "type": "invalid_request"}, status_code=422)

    async def starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 404/405 ("detail") in the API's error shape.
        kind = "not_found" if exc.status_code == 404 else "invalid_request"
        return JSONResponse({"error": str(exc.detail), "type": kind}, status_code=exc.status_code)

    async def error(request: Request, exc: Exception) -> JSONResponse:
        """Every other exception, from this replica or a model replica, as JSON with its status."""
        if isinstance(exc, BackPressureError):
            exc = HTTPError(503, "the server is at capacity; retry later", "overloaded")
        status, kind, message = http_status(exc)
        if kind in ("internal", "model_error"):
            # A bug or a broken model folder, not bad input: the details (paths, remote
            # tracebacks) go to the replica's log, not to the client; the replica keeps serving.
            log.error("%s on %s", kind, request.url.path, exc_info=exc)
        return JSONResponse({"error": message, "type": kind}, status_code=status)

    api.add_exception_handler(RequestValidationError, invalid)
    api.add_exception_handler(StarletteHTTPException, starlette_error)
    # Library errors (raised here or in a model replica) and backpressure are answered where
    # they are raised; `Exception` is Starlette's last resort, which answers and re-raises.
    for kind in (RayMedError, BackPressureError, Exception):
        api.add_exception_handler(kind, error)
    if api_key is not None:
        api.add_middleware(BearerAuth, key=api_key)
    return api


def _where(e: dict[str, Any]) -> str:
    return ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"


class GatewayEndpoints:
    """The gateway's endpoints (plain methods; :class:`Gateway` is this class as a Serve ingress)."""

    def __init__(self, cfg: ServeAppConfig, lm: DeploymentHandle | None, classifier: DeploymentHandle | None) -> None:
        self.cfg = cfg
        self.lm = lm
        self.classifier = classifier
        self.started = time.time()
        # Read here, in the replica: the key lives in its environment or a mounted file,
        # never in the config that travels through Ray. A missing one fails the start.
        self.api_key = read_api_key(cfg.auth)
        self.local = Classifiers(cfg) if cfg.classifiers and cfg.classify_in_gateway else None
        # From the model's config.json alone (a remote folder is not downloaded): which
        # requests may carry images, and which endpoints the model answers.
        self.multimodal = cfg.model_multimodal()
        self.injected = cfg.model_injected()
        self.injected_tasks = cfg.injected_tasks() if self.injected else {}

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self, self.cfg, self.api_key)

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

    async def _check_images(self, images: list[str], where: str) -> None:
        """Each base64 image checked (400/415/413; off the event loop), then 422 unless the model takes them."""
        for data in images:  # the header is checked before the decode
            await asyncio.to_thread(check_image, data, max_chars=-(-self.cfg.max_image_bytes * 4 // 3) + 4,
                                    max_pixels=self.cfg.max_image_pixels)
        if images and not self.multimodal:
            served = "the served model is text-only" if self.cfg.model else "this server has no model"
            raise HTTPError(422, f"{served}; images ({where}) need a multimodal model", "unsupported")
        if len(images) > 1:
            raise HTTPError(422, f"{len(images)} images ({where}); this model takes one image per prompt")

    # ---- endpoints

    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1)}

    async def models(self) -> dict[str, Any]:
        # Names only: the folders they were loaded from are the server's business.
        data = []
        if self.cfg.model:
            data.append({"id": self.cfg.base_name, "object": "model", "owned_by": "ray_med", "kind": "base"})
            if self.multimodal:
                data[-1]["modalities"] = ["text", "image"]
            if self.injected:
                data[-1]["kind"] = "injected"
                data[-1]["tasks"] = {n: {"modality": t["modality"], "seen": t["seen"]}
                                     for n, t in self.injected_tasks.items()}
        data += [{"id": n, "object": "model", "owned_by": "ray_med", "kind": "lora", "parent": self.cfg.base_name}
                 for n in self.cfg.adapters]
        data += [{"id": n, "object": "model", "owned_by": "ray_med", "kind": "classifier"}
                 for n in self.cfg.classifiers]
        return {"object": "list", "data": data}

    async def qa(self, body: QARequest, request: Request) -> dict[str, Any]:
        if self.multimodal:
            raise HTTPError(422, "/v1/qa needs a causal LM; the served model is multimodal (use /v1/generate, "
                            "chat, or /v1/classify with image and task)", "unsupported")
        self._check_length(question=body.question, context=body.context,
                           options="".join((body.options or {}).values()))
        adapter = self._adapter(request, body.adapter, self.cfg.adapters, "adapter")
        result = await self._lm(adapter).qa.remote(body)
        return {**result.to_dict(), "adapter": adapter}

    def _injected_task(self, task: str | None, modality: str | None) -> str:
        if not task:
            raise HTTPError(422, f"the injected model answers a task: send task (one of {sorted(self.injected_tasks)})")
        if task not in self.injected_tasks:
            raise HTTPError(404, f"unknown task {task!r}; the injected model knows {sorted(self.injected_tasks)}",
                            "unknown_task")
        want = self.injected_tasks[task]["modality"]
        if modality is not None and modality != want:
            raise HTTPError(422, f"task {task} reads {want} inputs, not {modality}")
        return task

    def _injected_handle(self, task: str) -> DeploymentHandle:
        # gate folded: the task is the multiplexed adapter id, so its LoRA stays cached on the replicas that use it
        return self._lm(task if self.cfg.gate == "folded" else None)

    async def classify_injected(self, body: ClassifyRequest) -> dict[str, Any]:
        """/v1/classify on an injected model: its task's question about an image, a row of numbers or a note."""
        task = self._injected_task(body.task, body.modality)
        if body.text_pair is not None or body.adapter is not None:
            raise HTTPError(422, "text_pair and adapter belong to the text classifiers; an injected model takes task, "
                            "modality and image, features or text")
        self._check_length(text=body.text)
        if body.image is not None:
            await asyncio.to_thread(check_image, body.image, max_chars=-(-self.cfg.max_image_bytes * 4 // 3) + 4,
                                    max_pixels=self.cfg.max_image_pixels)
        return await self._injected_handle(task).classify_injected.remote(body)

    async def classify(self, body: ClassifyRequest, request: Request) -> dict[str, Any]:
        if self.injected:
            return await self.classify_injected(body)
        if body.image is not None or body.task is not None:
            return await self.classify_image(body)
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

    async def classify_image(self, body: ClassifyRequest) -> dict[str, Any]:
        """/v1/classify with image and task: the multimodal model answers the task's multiple-choice question."""
        if body.image is None or body.task is None:
            raise HTTPError(422, "image classification needs both image (base64) and task (e.g. pneumonia)")
        if body.text_pair is not None or body.adapter is not None:
            raise HTTPError(422, "text_pair and adapter belong to the text classifiers; with image and task send "
                            "neither (text: the question, for a task without its own)")
        self._check_length(text=body.text)
        task = get_multimodal_task(body.task).name  # unknown: 422 listing the tasks, before any image work
        if task not in image_classification_tasks():
            raise HTTPError(422, f"task {task!r} does not classify an image; image classification tasks: "
                            f"{', '.join(image_classification_tasks())}")
        await self._check_images([body.image], "image")
        out = await self._lm(None).classify_image.remote(body)
        return {**out, "task": task}

    async def generate(self, body: GenerateRequest, request: Request) -> dict[str, Any]:
        self._check_length(prompt=body.prompt)
        self._max_new(body.max_new_tokens)
        self._lm(None)  # a 404 first when there is no LM at all
        if self.injected:
            task = self._injected_task(body.task, body.modality)
            if body.image is not None:
                await asyncio.to_thread(check_image, body.image, max_chars=-(-self.cfg.max_image_bytes * 4 // 3) + 4,
                                        max_pixels=self.cfg.max_image_pixels)
            return await self._injected_handle(task).generate_injected.remote(body)
        if body.task is not None or body.modality is not None or body.features is not None:
            raise HTTPError(422, "task, modality and features are for an injected model (jobs/inject.py)")
        if body.prompt is None:
            raise HTTPError(422, "prompt is required")
        if body.image is not None:
            await self._check_images([body.image], "image")
        adapter = self._adapter(request, body.adapter, self.cfg.adapters, "adapter")
        out = await self._lm(adapter).generate.remote(body)
        return {"text": out.text, "adapter": adapter}

    async def chat(self, body: ChatRequest, request: Request) -> dict[str, Any]:
        self._lm(None)  # a 404 first when there is no LM at all
        if body.stream:
            raise HTTPError(422, "stream=true is not supported; send stream=false", "unsupported")
        for m in body.messages:
            self._check_length(content=m.text())
        # data: URLs only (422 otherwise: the server fetches nothing), each image checked
        images = [data_url_base64(url) for m in body.messages for url in m.image_urls()]
        await self._check_images(images, "image_url parts")
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


Gateway = serve.deployment(name="Gateway")(serve.ingress()(GatewayEndpoints))
