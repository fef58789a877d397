"""The ``engine: vllm`` edges: the :class:`VLLMServer` deployment over Ray Serve LLM's LLMServer, and offline QA
on a ``ray.data.llm`` processor.

Everything that imports Ray or vLLM lives here; the translations (config, requests,
streams, QA rows and votes) are the plain functions of :mod:`ray_med.serving.vllm`,
tested without vLLM or a GPU. ``ray.serve.llm`` raises ImportError without vLLM, so
each import of it is inside a function that runs only with ``engine: vllm``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray
from ray import serve

from ray_med.errors import ConfigError
from ray_med.evaluation.config import QAConfig
from ray_med.evaluation.qa import QAResult
from ray_med.generation.spec import Delta, Done, GenSpec
from ray_med.models import load_config, load_tokenizer
from ray_med.serving.config import ServeAppConfig, VLLMConfig
from ray_med.serving.engines import Generation
from ray_med.serving.errors import HTTPError
from ray_med.serving.vllm import (
    StreamState,
    generation,
    llm_config_kwargs,
    lora_model_id,
    openai_request,
    qa_postprocess,
    qa_processor_kwargs,
    qa_results,
    qa_rows,
    require_vllm,
    sse_payloads,
)
from ray_med.tasks.prompts import fit_prompt, select_shots


def build_llm_app(cfg: ServeAppConfig) -> Any:
    """The bound LLMServer deployment (a Serve Application) of ``cfg``; needs vLLM."""
    from ray.serve.llm import LLMConfig, build_llm_deployment  # lazy: ImportError without vLLM

    try:  # pydantic's ValidationError is a ValueError, as is vLLM's "Unknown engine argument"
        return build_llm_deployment(LLMConfig(**llm_config_kwargs(cfg)))
    except ValueError as exc:
        raise ConfigError(f"vllm: Ray Serve LLM refused the config: {exc}") from None


# --------------------------------------------------------------------------- the deployment


@serve.deployment(name="VLLMServer")
class VLLMServer:
    """LMServer's generation interface over a Ray Serve LLM ``LLMServer`` (vLLM) deployment handle."""

    def __init__(self, cfg: ServeAppConfig, llm: Any) -> None:
        # lazy: vLLM's request types; this replica's node has the vllm extra, the driver's import did not need it
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        self.cfg, self.base, self.llm = cfg, cfg.base_name, llm
        self.requests = {"chat": ChatCompletionRequest, "completions": CompletionRequest}
        self.stats = {"requests": 0, "active": 0, "cancelled": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def _adapter(self) -> str | None:
        name = serve.get_multiplexed_model_id() or None
        if name and name not in self.cfg.adapters:  # the gateway refuses it first; this guards direct handle calls
            raise HTTPError(404, f"unknown adapter {name!r}; available: {sorted(self.cfg.adapters) or 'none'}",
                            "unknown_adapter")
        return name

    async def generate_stream(self, spec: GenSpec) -> AsyncIterator[Delta | Done]:
        """The generation of ``spec`` as :class:`Delta` events, then one :class:`Done`."""
        adapter = self._adapter()
        model = lora_model_id(self.base, adapter)
        method, body = openai_request(spec, model)
        # A base-model request carries no multiplexed id, so Serve balances it over every
        # replica; an adapter's goes where ``base:adapter`` is loaded (Ray's own ingress does the same).
        handle = self.llm.options(stream=True, multiplexed_model_id=model if adapter else "")
        stream = getattr(handle, method).remote(self.requests[method](**body))
        state = StreamState()
        self.stats["requests"] += 1
        self.stats["active"] += 1
        try:
            async for item in stream:
                for payload in sse_payloads(item):
                    text = state.feed(payload)
                    if text:
                        yield Delta(text)
        except BaseException as exc:
            # The client left (Serve cancels this coroutine), or an error: stop vLLM decoding for nobody.
            # Serve propagates a cancellation downstream too; cancelling again is harmless.
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                self.stats["cancelled"] += 1
            stream.cancel()
            raise
        finally:
            self.stats["active"] -= 1
        done = state.done()
        self.stats["prompt_tokens"] += done.prompt_tokens
        self.stats["completion_tokens"] += done.completion_tokens
        yield done

    async def generate_text(self, spec: GenSpec) -> Generation:
        """The whole generation of ``spec`` (the stream, gathered)."""
        parts: list[str] = []
        async for event in self.generate_stream(spec):
            if isinstance(event, Delta):
                parts.append(event.text)
            else:
                return generation("".join(parts), event)
        raise RuntimeError("the stream ended without Done")  # generate_stream always ends with one

    async def decode_stats(self) -> dict[str, Any]:
        """This replica's request and token counters; vLLM's own scheduler metrics are in Ray's Prometheus export."""
        return {"engine": "vllm", "model": self.base, **self.stats}

    async def qa(self, req: Any) -> Any:
        raise HTTPError(422, "/v1/qa runs on engine hf (top-token QA scores logits); this server's engine is vllm: "
                        "use /v1/generate or chat", "unsupported")



# --------------------------------------------------------------------------- offline QA (ray.data.llm)


def vllm_qa_processor(model: str, v: VLLMConfig, *, adapter: str | None = None, batch_size: int = 16,
                      concurrency: int = 1) -> Any:
    """A ``ray.data.llm`` processor generating :func:`qa_rows`' rows on vLLM (GPU workers); needs vLLM."""
    require_vllm()
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # lazy: the batch stages load vLLM

    config = vLLMEngineProcessorConfig(**qa_processor_kwargs(model, v, adapter=adapter, batch_size=batch_size,
                                                             concurrency=concurrency))
    return build_processor(config, postprocess=qa_postprocess)


def answer_items_vllm(model: str, items: Sequence[Any], cfg: QAConfig, v: VLLMConfig, *, pool: Sequence[Any] = (),
                      adapter: str | None = None, batch_size: int = 16, concurrency: int = 1) -> list[QAResult]:
    """:func:`ray_med.evaluation.qa.answer_items` for cot and sc_cot on vLLM: the same prompts, exemplars and votes.

    ``model`` and a local ``adapter`` must be readable on the GPU nodes (a shared mount);
    the samples differ from the transformers path's (another sampler), the method does not.
    """
    tokenizer = load_tokenizer(model)
    context = v.max_model_len or int(getattr(load_config(model), "max_position_embeddings", 2048))
    limit = cfg.max_prompt_tokens or context - cfg.max_new_tokens
    prompts = [fit_prompt(tokenizer, it, select_shots(list(pool), cfg.shots, cfg.seed, it), cfg.mode, limit)
               for it in items]
    rows = qa_rows(prompts, [tokenizer.decode(p) for p in prompts], cfg, adapter=adapter)
    processor = vllm_qa_processor(model, v, adapter=adapter, batch_size=batch_size, concurrency=concurrency)
    return qa_results(processor(ray.data.from_items(rows)).take_all(), [it.choices for it in items])

