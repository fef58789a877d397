"""The Ray Serve application: a FastAPI gateway over an LM deployment and a classifier deployment.

    serve run cluster/serve/tiny.yaml        # import_path: ray_med.serving.app:build_app

``build_app(args)`` reads ``args`` into :class:`~ray_med.serving.config.ServeAppConfig`
(strict keys), checks every folder, and binds:

* ``Gateway``: the HTTP API (``/v1/qa``, ``/v1/classify``, ``/v1/generate``,
  ``/v1/chat/completions``, ``/v1/models``, ``/healthz``). It validates requests with
  the pydantic schemas, resolves the adapter (``adapter`` field or the
  ``serve_multiplexed_model_id`` header), and turns every failure into a JSON 4xx/503.
* ``LMServer``: the causal LM and its LoRA adapters. Top-token QA is dynamically batched;
  CoT, SC-CoT and generation run one request at a time.
* ``ClassifierServer``: the stage-2 classifiers, dynamically batched.

Adapters are chosen per request with ``@serve.multiplexed`` (a bounded LRU per replica;
requests are routed to replicas that already hold the adapter). Each model replica runs
its forwards on one dedicated thread: the event loop stays free to accept and batch
requests while a batch computes, and the adapter switch (global state of the model)
can never race with a forward.
"""


import asyncio
import base64
import binascii
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_med.config import from_dict, to_dict
from ray_med.errors import ConfigError, DataError, ModelError, RayMedError
from ray_med.serving.config import DeploymentConfig, ServeAppConfig
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


class HTTPError(Exception):
    """An error with the HTTP status the client should see."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _status(exc: RayMedError) -> tuple[int, str]:
    """The HTTP status of a library error raised while serving a request."""
    from ray_med.evaluation.qa import PromptTooLong

    if isinstance(exc, PromptTooLong):
        return 413, "input_too_long"
    if isinstance(exc, (DataError, ConfigError)):
        return 422, "invalid_request"
    if isinstance(exc, ModelError):
        return 500, "model_error"  # a server-side folder that fails to load
    return 400, "invalid_request"


class _Worker:
    """A model replica's shared machinery: one compute thread, and errors returned as values.

    Library errors (a prompt too long, an adapter that fails to load) come back as
    ``{"error": ..., "status": ...}`` instead of an exception, so the gateway can answer
    with the right 4xx without unpicking a RayTaskError.
    """

    def _start(self, part: DeploymentConfig) -> None:
        from ray_med.serving.engines import set_threads

        threads = part.torch_threads or max(1, math.ceil(part.num_cpus))
        # The thread count must be set *in* the compute thread: OpenMP keeps it per
        # thread, and a new thread starts from OMP_NUM_THREADS, which Ray sets to the
        # actor's CPU count (1 for a fractional actor): measured 1.5x slower forwards.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model",
                                        initializer=set_threads, initargs=(threads,))

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _unload_hook(self, unload: Any, name: str) -> Any:
        """The object @serve.multiplexed caches; evicting it unloads the adapter on the compute thread."""

        class Loaded:
            def __repr__(self) -> str:
                return f"<adapter {name}>"

        ref = Loaded()

        async def release() -> None:
            await self._run(unload, name)

        # An instance attribute, not a method: Serve awaits it on eviction, and garbage
        # collection never calls it (it looks __del__ up on the type).
        ref.__del__ = release
        return ref

    @staticmethod
    def _error(exc: RayMedError) -> dict[str, Any]:
        status, kind = _status(exc)
        return {"error": str(exc), "status": status, "type": kind}


def _lm_deployment(cfg: ServeAppConfig) -> Any:
    part = cfg.lm

    @serve.deployment(name="LMServer")
    class LMServer(_Worker):
        def __init__(self, args: dict[str, Any]) -> None:
            from ray_med.serving.engines import LMEngine

            self.cfg = from_dict(ServeAppConfig, args)
            self._start(self.cfg.lm)
            self.engine = LMEngine(self.cfg.model, self.cfg.adapters, qa=self.cfg.qa, shots=_shots(self.cfg))

        @serve.multiplexed(max_num_models_per_replica=part.max_adapters)
        async def get_adapter(self, name: str) -> Any:
            await self._run(self.engine.load_adapter, name)
            return self._unload_hook(self.engine.unload_adapter, name)

        async def _adapter(self) -> str | None:
            name = serve.get_multiplexed_model_id() or None
            if name:
                await self.get_adapter(name)
            return name

        @serve.batch(max_batch_size=part.max_batch_size, batch_wait_timeout_s=part.batch_wait_timeout_s,
                     max_concurrent_batches=part.max_concurrent_batches)
        async def _top_token(self, prompts: list[list[int]], choices: list[list[str]]) -> list[Any]:
            # Serve splits batches by multiplexed model id: one adapter per batch.
            adapter = await self._adapter()
            return await self._run(self.engine.top_token, prompts, choices, adapter)

        async def qa(self, req: dict[str, Any]) -> dict[str, Any]:
            from ray_med.evaluation.qa import QAItem

            try:
                cfg = self.engine.qa_config(mode=req["mode"], n=req.get("n"), temperature=req.get("temperature"),
                                            seed=req.get("seed"))
                item = QAItem(id="request", question=req["question"], context=req.get("context"),
                              options=req.get("options"))
                prompt = (await self._run(self.engine.qa_prompts, [item], cfg))[0]
                if cfg.mode == "top_token":
                    result = await self._top_token(prompt, item.choices)
                else:
                    adapter = await self._adapter()
                    result = await self._run(self.engine.chain_of_thought, prompt, item.choices, cfg, adapter)
            except RayMedError as exc:
                return self._error(exc)
            return result.to_dict()

        async def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> dict[str, Any]:
            try:
                adapter = await self._adapter()
                ids = await self._run(self.engine.encode_prompt, prompt, max_new_tokens)
                text = await self._run(self.engine.generate, ids, max_new_tokens=max_new_tokens,
                                       temperature=temperature, seed=seed, adapter=adapter)
            except RayMedError as exc:
                return self._error(exc)
            return {"text": text, "prompt_tokens": len(ids),
                    "completion_tokens": len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])}

        async def chat_prompt(self, messages: list[dict[str, str]]) -> Any:
            try:
                return self.engine.chat_prompt(messages)
            except RayMedError as exc:
                return self._error(exc)

    return LMServer.options(**_options(part, cfg))


def _classifier_deployment(cfg: ServeAppConfig) -> Any:
    part = cfg.classifier

    @serve.deployment(name="ClassifierServer")
    class ClassifierServer(_Worker):
        def __init__(self, args: dict[str, Any]) -> None:
            from ray_med.serving.engines import ClassifierEngine

            self.cfg = from_dict(ServeAppConfig, args)
            self._start(self.cfg.classifier)
            self.engine = ClassifierEngine(self.cfg.classifiers, max_length=self.cfg.classify_max_length)

        @serve.multiplexed(max_num_models_per_replica=part.max_adapters)
        async def get_adapter(self, name: str) -> Any:
            await self._run(self.engine.load, name)
            return self._unload_hook(self.engine.unload, name)

        @serve.batch(max_batch_size=part.max_batch_size, batch_wait_timeout_s=part.batch_wait_timeout_s,
                     max_concurrent_batches=part.max_concurrent_batches)
        async def classify(self, texts: list[str], pairs: list[str | None]) -> list[dict[str, Any]]:
            name = serve.get_multiplexed_model_id()
            try:
                await self.get_adapter(name)
                return await self._run(self.engine.classify, name, texts, pairs)
            except RayMedError as exc:
                return [self._error(exc)] * len(texts)

    return ClassifierServer.options(**_options(part, cfg))


def _options(part: DeploymentConfig, cfg: ServeAppConfig, *, hosts: DeploymentConfig | None = None) -> dict[str, Any]:
    """Deployment options; ``hosts``: the part whose model runs inside this deployment too."""
    cpus, gpus, env = part.num_cpus, part.num_gpus, dict(part.env)
    if hosts is not None:
        cpus, gpus, env = max(cpus, hosts.num_cpus), max(gpus, hosts.num_gpus), {**env, **hosts.env}
    # Serve reads this flag when the replica process imports it: it must be in the env.
    env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "1" if part.user_code_thread else "0"
    opts: dict[str, Any] = {
        "max_ongoing_requests": part.max_ongoing_requests,
        "max_queued_requests": part.max_queued_requests,
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {"env_vars": env}},
        # One access-log line per request per hop costs CPU on a small box; off by default.
        "logging_config": {"enable_access_log": cfg.access_log, "log_level": cfg.log_level},
    }
    if part.max_replicas > part.min_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": part.min_replicas,
            "max_replicas": part.max_replicas,
            "target_ongoing_requests": part.target_ongoing_requests,
        }
    else:  # a fixed size: no autoscaling metrics pushed to the controller on every request
        opts["num_replicas"] = part.min_replicas
    return opts


def _shots(cfg: ServeAppConfig) -> list[Any]:
    if cfg.qa.shots <= 0:
        return []
    from ray_med.data import read_records
    from ray_med.evaluation.qa import item_from_record

    return [item_from_record(r) for r in read_records(cfg.shots_format, cfg.shots_file).records]


# --------------------------------------------------------------------------- the HTTP gateway

async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"error": "the request body is not valid JSON", "type": "invalid_json"}, status_code=400)
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    return JSONResponse({"error": "; ".join(parts), "type": "invalid_request"}, status_code=422)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: still JSON, and the replica stays up. The details (which may
    # hold paths and remote tracebacks) go to the replica's log, not to the client.
    log.exception("internal error on %s", request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log", "type": "internal"},
                        status_code=500)


async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own 404/405 ("detail") in the API's error shape.
    return JSONResponse({"error": str(exc.detail), "type": "not_found" if exc.status_code == 404 else "invalid_request"},
                        status_code=exc.status_code)


async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "type": exc.kind}, status_code=exc.status)


def _check_image(data: str, limit: int) -> None:
    """A 400 for bad base64, a 415 for bytes that are not an image, a 413 when too big."""
    from ray_med.data.records import decode_image

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


def _gateway_deployment(cfg: ServeAppConfig) -> Any:
    """The FastAPI ingress; with ``classify_in_gateway`` it also runs the classifiers itself."""
    api = FastAPI(title="ray_med", description="Medical QA, classification and generation on Ray Serve.")
    api.add_exception_handler(RequestValidationError, _invalid)
    api.add_exception_handler(HTTPError, _http_error)
    api.add_exception_handler(Exception, _unexpected)
    api.add_exception_handler(StarletteHTTPException, _starlette_error)
    part = cfg.classifier

    @serve.deployment(name="Gateway")
    @serve.ingress(api)
    class Gateway(_Worker):
        def __init__(self, args: dict[str, Any], lm: DeploymentHandle | None, classifier: DeploymentHandle | None):
            self.cfg = from_dict(ServeAppConfig, args)
            self.lm = lm
            self.classifier = classifier
            self.started = time.time()
            self.local = None
            if self.cfg.classifiers and self.cfg.classify_in_gateway:
                from ray_med.serving.engines import ClassifierEngine

                self._start(self.cfg.classifier)
                self.local = ClassifierEngine(self.cfg.classifiers, max_length=self.cfg.classify_max_length)

        @serve.multiplexed(max_num_models_per_replica=part.max_adapters)
        async def get_classifier(self, name: str) -> Any:
            await self._run(self.local.load, name)
            return self._unload_hook(self.local.unload, name)

        @serve.batch(max_batch_size=part.max_batch_size, batch_wait_timeout_s=part.batch_wait_timeout_s,
                     max_concurrent_batches=part.max_concurrent_batches)
        async def _classify_local(self, names: list[str], texts: list[str], pairs: list[str | None]) -> list[Any]:
            # The adapter can come from the body, so one batch may mix classifiers: group them.
            out: list[Any] = [None] * len(texts)
            for name in dict.fromkeys(names):
                idx = [i for i, n in enumerate(names) if n == name]
                try:
                    await self.get_classifier(name)
                    rows = await self._run(self.local.classify, name, [texts[i] for i in idx],
                                           [pairs[i] for i in idx])
                except RayMedError as exc:
                    rows = [self._error(exc)] * len(idx)
                for i, row in zip(idx, rows, strict=True):
                    out[i] = row
            return out

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

        def _need_lm(self) -> DeploymentHandle:
            if self.lm is None:
                raise HTTPError(404, "this server has no language model (set model in its config)", "not_deployed")
            return self.lm

        @staticmethod
        async def _call(method: Any, *args: Any) -> Any:
            try:
                out = await method.remote(*args)
            except BackPressureError:
                raise HTTPError(503, "the server is at capacity; retry later", "overloaded") from None
            if isinstance(out, dict) and "error" in out and "status" in out:
                raise HTTPError(out["status"], out["error"], out.get("type", "invalid_request"))
            return out

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
            lm = self._need_lm()
            self._check_length(question=body.question, context=body.context,
                               options="".join((body.options or {}).values()))
            adapter = self._adapter(request, body.adapter, self.cfg.adapters, "adapter")
            out = await self._call(lm.options(multiplexed_model_id=adapter or "").qa, body.model_dump())
            return {**out, "adapter": adapter}

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
                out = await self._classify_local(name, body.text, body.text_pair)
                if "error" in out:
                    raise HTTPError(out["status"], out["error"], out["type"])
            else:
                out = await self._call(self.classifier.options(multiplexed_model_id=name).classify, body.text,
                                       body.text_pair)
            return {**out, "adapter": name}

        @api.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_unset=True)
        async def generate(self, body: GenerateRequest, request: Request) -> dict[str, Any]:
            lm = self._need_lm()
            self._check_length(prompt=body.prompt)
            self._max_new(body.max_new_tokens)
            if body.image is not None:
                _check_image(body.image, self.cfg.max_input_chars * 10)
                raise HTTPError(422, "the served model is text-only; images need a multimodal model", "unsupported")
            adapter = self._adapter(request, body.adapter, self.cfg.adapters, "adapter")
            out = await self._call(lm.options(multiplexed_model_id=adapter or "").generate, body.prompt,
                                   body.max_new_tokens, body.temperature, body.seed)
            return {"text": out["text"], "adapter": adapter}

        @api.post("/v1/chat/completions")
        async def chat(self, body: ChatRequest, request: Request) -> dict[str, Any]:
            lm = self._need_lm()
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
            prompt = await self._call(lm.chat_prompt, [m.model_dump() for m in body.messages])
            out = await self._call(lm.options(multiplexed_model_id=adapter or "").generate, prompt, max_new,
                                   body.temperature, body.seed or 0)
            finish = "length" if out["completion_tokens"] >= max_new else "stop"
            return {
                "id": f"chatcmpl-{time.time_ns():x}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": adapter or self.cfg.base_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                          "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
            }

    local = bool(cfg.classifiers and cfg.classify_in_gateway)
    return Gateway.options(**_options(cfg.gateway, cfg, hosts=cfg.classifier if local else None))


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for ``args`` (a ServeAppConfig as a dict; ``overrides``: key=value list)."""
    from ray_med.config import apply_overrides

    args = dict(args or {})
    overrides = args.pop("overrides", []) or []
    cfg = from_dict(ServeAppConfig, apply_overrides(ServeAppConfig, args, overrides), where="serve args")
    cfg.check()
    plain = to_dict(cfg)
    lm = _lm_deployment(cfg).bind(plain) if cfg.model else None
    remote = cfg.classifiers and not cfg.classify_in_gateway
    classifier = _classifier_deployment(cfg).bind(plain) if remote else None
    return _gateway_deployment(cfg).bind(plain, lm, classifier)
