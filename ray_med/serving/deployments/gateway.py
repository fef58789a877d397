"""The HTTP ingress: a FastAPI app that checks requests, resolves adapters, streams and maps every error to JSON.

Endpoints: ``/v1/qa``, ``/v1/classify``, ``/v1/generate``, and OpenAI's
``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, plus ``/healthz``. The
OpenAI ones answer the official SDKs (and LangChain, LiteLLM, chat UIs): ``model`` names
the base model or one of its LoRA adapters, which is all ``/v1/models`` lists under
``data`` (the classifiers are under ``classifiers``); an unknown one is a 404 naming them.

Generation goes to the LM replica as a :class:`~ray_med.generation.spec.GenSpec`
(``generate_text``, or ``generate_stream`` for ``stream: true``). A stream is Server-Sent
Events: OpenAI's ``chat.completion.chunk`` / ``text_completion`` chunks, or on
``/v1/generate`` ``{"text"}`` deltas and a final ``{"done", "finish_reason", "usage"}``;
then ``data: [DONE]``. Its first event is read before the response starts, so a request
the replica refuses (a prompt past the context: 413) is a plain HTTP error; an error
after that is one ``data: {"error": ...}`` event that ends the stream. A client that
disconnects cancels the replica's generator, which stops decoding its request.

When the served model is multimodal (a LLaVA folder, read from its config at start-up,
never loaded here), ``/v1/generate`` takes an ``image``, chat messages take OpenAI
``image_url`` parts (``data:`` URLs), and ``/v1/classify`` with ``image`` + ``task`` asks
it an image classification task; every image is checked here first
(:func:`~ray_med.serving.guards.check_image`). A text-only model answers an image with
422. Request bodies are the pydantic schemas of :mod:`ray_med.serving.schemas`. The
adapter comes from the ``adapter`` field (``model`` in the OpenAI endpoints) or the
``serve_multiplexed_model_id`` header. Every exception, raised here or in a model
replica, and every refused body or API key, becomes OpenAI's error shape
(:func:`ray_med.serving.errors.error_body`) with the status
:func:`ray_med.serving.errors.http_status` gives it.

Each replica builds its FastAPI app from its config at start-up (Serve's
``__serve_build_asgi_app__``): the API key check (:mod:`ray_med.serving.guards`) and the
``/docs`` page exist only when the config asks for them. :func:`make_api` builds it from
any object with the endpoint methods, so it runs in process without Serve.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# to know what is a body and what is the request.

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_med.errors import RayMedError
from ray_med.generation.spec import Delta, Done, GenSpec
from ray_med.serving.config import ServeAppConfig
from ray_med.serving.deployments.classifier import Classifiers
from ray_med.serving.engines import image_classification_tasks
from ray_med.serving.errors import HTTPError, error_body, exception_body
from ray_med.serving.guards import BearerAuth, check_image, read_api_key
from ray_med.serving.schemas import (
    ChatRequest,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    QARequest,
    QAResponse,
    data_url_base64,
    stop_list,
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
    ("POST", "/v1/completions", "completions", {}),
]
CHAT_MAX_TOKENS = 64  # chat's default budget when the request sets none (OpenAI's: the context's rest)
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
            return _error(400, "invalid_json", "the request body is not valid JSON")
        too_long = [e for e in errors if e.get("type") in TOO_LONG]
        if too_long:  # past the schema's hard ceiling: the same 413 as past the configured limit
            e = too_long[0]
            where, value = _where(e), e.get("input")
            message = (f"{where} is {len(value)} characters; the limit is {cfg.max_input_chars}"
                       if isinstance(value, str) else f"{where}: {e.get('msg')}")
            return _error(413, "input_too_long", message, where)
        parts = [f"{_where(e)}: {str(e.get('msg')).removeprefix('Value error, ')}" for e in errors]
        return _error(422, "invalid_request", "; ".join(parts), _where(errors[0]) if errors else None)

    async def starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 404/405 ("detail") in the API's error shape.
        kind = "not_found" if exc.status_code == 404 else "invalid_request"
        return _error(exc.status_code, kind, str(exc.detail))

    async def error(request: Request, exc: Exception) -> JSONResponse:
        """Every other exception, from this replica or a model replica, as JSON with its status."""
        status, body = _exception_body(exc, request.url.path)
        return JSONResponse(body, status_code=status)

    api.add_exception_handler(RequestValidationError, invalid)
    api.add_exception_handler(StarletteHTTPException, starlette_error)
    # Library errors (raised here or in a model replica) and backpressure are answered where
    # they are raised; `Exception` is Starlette's last resort, which answers and re-raises.
    for kind in (RayMedError, BackPressureError, Exception):
        api.add_exception_handler(kind, error)
    if api_key is not None:
        api.add_middleware(BearerAuth, key=api_key)
    return api


def _error(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, kind, message, param), status_code=status)


def _exception_body(exc: BaseException, path: str) -> tuple[int, dict[str, Any]]:
    """(status, body) of an exception, logged when it is the server's fault rather than the request's."""
    if isinstance(exc, BackPressureError):
        exc = HTTPError(503, "the server is at capacity; retry later", "overloaded")
    status, body = exception_body(exc)
    if body["error"]["type"] in ("internal", "model_error"):
        # A bug or a broken model folder, not bad input: the details (paths, remote
        # tracebacks) go to the replica's log, not to the client; the replica keeps serving.
        log.error("%s on %s", body["error"]["type"], path, exc_info=exc)
    return status, body


def _where(e: dict[str, Any]) -> str:
    return ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"


# ---- streaming

class _EventStream(StreamingResponse):
    """Server-Sent Events whose generator is closed however the response ends.

    Starlette stops iterating when the client goes (it cancels the task, or a send
    fails), but leaves a generator paused at a ``yield`` to the garbage collector;
    closing it here cancels the replica's generator at once.
    """

    def __init__(self, events: AsyncIterator[str]) -> None:
        # no-cache, and no proxy buffering (nginx): each event as soon as it is decoded
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _replica_events(gen: Any, first: Delta | Done) -> AsyncIterator[Delta | Done]:
    """``first`` then the rest of a replica's stream; a stream left early (the client went) is cancelled."""
    finished = False
    try:
        yield first
        async for event in gen:
            yield event
        finished = True
    finally:
        if not finished:
            gen.cancel()  # Serve cancels the replica's generator: its request leaves the decoding batch


async def _sse_events(events: AsyncIterator[Delta | Done], render: Callable[[Delta | Done], list[dict[str, Any]]],
                      path: str) -> AsyncIterator[str]:
    """The events as SSE lines, then ``[DONE]``; an error mid-stream is one error event, and the end."""
    try:
        async for event in events:
            for payload in render(event):
                yield _sse(payload)
    except Exception as exc:  # the status line is sent: the error travels as an event (code: its status)
        yield _sse(_exception_body(exc, path)[1])
        return
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    yield _sse("[DONE]")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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
            raise HTTPError(400, f"adapter {field_value!r} in the body and {header!r} in the {HEADER} header differ",
                            param="adapter")
        name = field_value or header
        if name and name not in known:
            raise HTTPError(404, f"unknown {what} {name!r}; available: {sorted(known) or 'none'}", "unknown_adapter",
                            "adapter")
        return name

    def _model(self, request: Request, model: str | None) -> str | None:
        """The adapter an OpenAI ``model`` names (None: the base model); 404 naming what this server serves."""
        self._lm(None)  # a 404 first when there is no LM at all
        if self.injected:
            raise HTTPError(422, "the served model is an injected model: it answers tasks on /v1/generate and "
                            "/v1/classify, not chat or completions", "unsupported")
        if model and model != self.cfg.base_name and model not in self.cfg.adapters:
            adapters = f"its adapters {', '.join(sorted(self.cfg.adapters))}" if self.cfg.adapters else "no adapters"
            raise HTTPError(404, f"model {model!r} does not exist; this server serves the base model "
                            f"{self.cfg.base_name!r} and {adapters}", "model_not_found", "model")
        adapter = model if model and model != self.cfg.base_name else None
        return self._adapter(request, adapter, self.cfg.adapters, "adapter")

    def _check_length(self, **fields: str | None) -> None:
        for key, value in fields.items():
            if value is not None and len(value) > self.cfg.max_input_chars:
                raise HTTPError(413, f"{key} is {len(value)} characters; the limit is {self.cfg.max_input_chars}",
                                "input_too_long", key)

    def _lm(self, adapter: str | None) -> DeploymentHandle:
        if self.lm is None:
            raise HTTPError(404, "this server has no language model (set model in its config)", "not_deployed")
        return self.lm.options(multiplexed_model_id=adapter or "")

    def _max_new(self, n: int, param: str = "max_new_tokens") -> None:
        if n > self.cfg.max_new_tokens:
            raise HTTPError(422, f"{param} {n} exceeds this server's limit of {self.cfg.max_new_tokens}", param=param)

    async def _generate(self, adapter: str | None, spec: GenSpec) -> Any:
        """The replica's :class:`~ray_med.serving.engines.Generation` of ``spec``."""
        return await self._lm(adapter).generate_text.remote(spec)

    async def _stream(self, adapter: str | None, spec: GenSpec) -> AsyncIterator[Delta | Done]:
        """The replica's events for ``spec``, its first already read: an error before decoding starts raises here,
        before the response does, and is answered with its own status."""
        self._lm(None)
        gen = self.lm.options(multiplexed_model_id=adapter or "", stream=True).generate_stream.remote(spec)
        try:
            first = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        return _replica_events(gen, first)

    def _completion_id(self, prefix: str) -> tuple[str, int]:
        return f"{prefix}-{time.time_ns():x}", int(time.time())

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
        # Only what `model` may name in chat and completions is under `data` (chat UIs offer
        # every entry as a chat model); the classifiers, for /v1/classify's adapter, apart.
        classifiers = [{"id": n, "object": "model", "owned_by": "ray_med", "kind": "classifier"}
                       for n in self.cfg.classifiers]
        return {"object": "list", "data": data, "classifiers": classifiers}

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

    async def generate(self, body: GenerateRequest, request: Request) -> Any:
        self._check_length(prompt=body.prompt)
        self._max_new(body.max_new_tokens)
        self._lm(None)  # a 404 first when there is no LM at all
        if self.injected:
            if body.stream:
                raise HTTPError(422, "stream is not supported for an injected model's tasks", "unsupported", "stream")
            task = self._injected_task(body.task, body.modality)
            if body.image is not None:
                await asyncio.to_thread(check_image, body.image, max_chars=-(-self.cfg.max_image_bytes * 4 // 3) + 4,
                                        max_pixels=self.cfg.max_image_pixels)
            return await self._injected_handle(task).generate_injected.remote(body)
        if body.task is not None or body.modality is not None or body.features is not None:
            raise HTTPError(422, "task, modality and features are for an injected model (jobs/inject.py)")
        if body.prompt is None:
            raise HTTPError(422, "prompt is required", param="prompt")
        if body.image is not None:
            await self._check_images([body.image], "image")
        adapter = self._adapter(request, body.adapter, self.cfg.adapters, "adapter")
        spec = GenSpec(prompt=body.prompt, max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                       top_p=body.top_p, seed=body.seed, stop=stop_list(body.stop), image=body.image)
        if body.stream:
            def render(event: Delta | Done) -> list[dict[str, Any]]:
                if isinstance(event, Delta):
                    return [{"text": event.text}] if event.text else []
                return [{"done": True, "finish_reason": event.finish_reason, "adapter": adapter,
                         "usage": _usage(event.prompt_tokens, event.completion_tokens)}]

            return _EventStream(_sse_events(await self._stream(adapter, spec), render, request.url.path))
        out = await self._generate(adapter, spec)
        return {"text": out.text, "adapter": adapter, "finish_reason": out.finish_reason,
                "usage": _usage(out.prompt_tokens, out.completion_tokens)}

    async def chat(self, body: ChatRequest, request: Request) -> Any:
        adapter = self._model(request, body.model)
        for m in body.messages:
            self._check_length(content=m.text())
        # data: URLs only (422 otherwise: the server fetches nothing), each image checked
        images = [data_url_base64(url) for m in body.messages for url in m.image_urls()]
        await self._check_images(images, "image_url parts")
        max_new = body.max_completion_tokens or body.max_tokens or min(CHAT_MAX_TOKENS, self.cfg.max_new_tokens)
        self._max_new(max_new, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        # Plain dicts (content: a string or part dicts, OpenAI's unused fields dropped): the
        # replica renders its chat template and takes an image part for a multimodal model.
        spec = GenSpec(messages=[m.model_dump(exclude_none=True) for m in body.messages], max_new_tokens=max_new,
                       temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop_list(body.stop))
        cid, created = self._completion_id("chatcmpl")
        model = adapter or self.cfg.base_name
        if body.stream:
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
            usage = body.stream_options is not None and body.stream_options.include_usage

            def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
                out = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                return {**out, "usage": None} if usage else out  # OpenAI: null on all but the last, when asked

            opened = False

            def render(event: Delta | Done) -> list[dict[str, Any]]:
                nonlocal opened
                out = [] if opened else [chunk({"role": "assistant", "content": ""})]  # OpenAI's first chunk
                opened = True
                if isinstance(event, Delta):
                    return out + [chunk({"content": event.text})] if event.text else out
                out.append(chunk({}, event.finish_reason))
                if usage:
                    out.append({**head, "choices": [], "usage": _usage(event.prompt_tokens, event.completion_tokens)})
                return out

            return _EventStream(_sse_events(await self._stream(adapter, spec), render, request.url.path))
        out = await self._generate(adapter, spec)
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                         "finish_reason": out.finish_reason}],
            "usage": _usage(out.prompt_tokens, out.completion_tokens),
        }

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        """OpenAI's legacy completions: ``prompt`` continued as plain text (no chat template)."""
        adapter = self._model(request, body.model)
        self._check_length(prompt=body.prompt)
        self._max_new(body.max_tokens, "max_tokens")
        spec = GenSpec(prompt=body.prompt, max_new_tokens=body.max_tokens, temperature=body.temperature,
                       top_p=body.top_p, seed=body.seed, stop=stop_list(body.stop))
        cid, created = self._completion_id("cmpl")
        head = {"id": cid, "object": "text_completion", "created": created, "model": adapter or self.cfg.base_name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage

            def render(event: Delta | Done) -> list[dict[str, Any]]:
                if isinstance(event, Delta):
                    if not event.text:
                        return []
                    return [{**head, "choices": [{"text": event.text, "index": 0, "logprobs": None,
                                                  "finish_reason": None}]}]
                last = [{**head, "choices": [{"text": "", "index": 0, "logprobs": None,
                                              "finish_reason": event.finish_reason}]}]
                if usage:
                    last.append({**head, "choices": [], "usage": _usage(event.prompt_tokens, event.completion_tokens)})
                return last

            return _EventStream(_sse_events(await self._stream(adapter, spec), render, request.url.path))
        out = await self._generate(adapter, spec)
        return {**head, "choices": [{"text": out.text, "index": 0, "logprobs": None,
                                     "finish_reason": out.finish_reason}],
                "usage": _usage(out.prompt_tokens, out.completion_tokens)}


Gateway = serve.deployment(name="Gateway")(serve.ingress()(GatewayEndpoints))
