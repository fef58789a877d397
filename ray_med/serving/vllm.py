"""``engine: vllm``: generation on Ray Serve LLM's vLLM LLMServer, and offline QA through ``ray.data.llm``.

This module owns the vLLM engine option end to end:

* :func:`llm_config_kwargs`: the ``ray.serve.llm.LLMConfig`` of a :class:`ServeAppConfig`
  (model id and source, LoRA folder, vLLM engine arguments, Serve deployment options);
* :class:`~ray_med.serving.deployments.vllm.VLLMServer` (Ray: its own module): a thin deployment with :class:`~ray_med.serving.deployments.lm.LMServer`'s
  generation interface (``generate_text``, ``generate_stream``, ``decode_stats``) that turns
  each :class:`~ray_med.generation.spec.GenSpec` into an OpenAI request to its LLMServer child
  and the child's stream back into :class:`Delta` events and one :class:`Done`; the gateway
  and the schemas stay the same for both engines;
* :func:`~ray_med.serving.deployments.vllm.vllm_qa_processor` and ``answer_items_vllm`` (Ray too): ``evaluate.py qa``'s cot and
  sc_cot prompts (the same token ids as the transformers path) on a ``ray.data.llm`` processor.

vLLM is an optional extra (``pip install .[vllm]``) that CPU machines never install:
``ray.serve.llm`` raises ImportError on import without it, so every import of it (and of
``ray.data.llm``'s processor builder) is inside the functions that run only with
``engine: vllm``. The translations between ray_med's types and Ray's OpenAI-shaped ones are
pure functions of plain data, tested without vLLM or a GPU.

Ray Serve LLM's multi-LoRA naming: the model id of adapter ``a`` of base ``b`` is ``b:a``;
its weights are downloaded from ``<lora_config.dynamic_lora_loading_path>/a`` (a remote
folder: s3://, gs://, abfss://), and a request reaches the replica that has it loaded by
carrying ``b:a`` both as its ``model`` and as Serve's multiplexed model id.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from ray_med.errors import ConfigError, DataError
from ray_med.evaluation import qa_eval
from ray_med.evaluation.config import QAConfig
from ray_med.evaluation.qa import QAResult, cot_result
from ray_med.generation.spec import Done, GenSpec
from ray_med.serving.config import DeploymentConfig, ServeAppConfig, VLLMConfig, lora_path
from ray_med.serving.engines import Generation
from ray_med.serving.errors import HTTPError

VLLM_MISSING = "engine=vllm needs vLLM: pip install .[vllm] on a GPU node"
REMOTE_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
"""What Ray's LLM code treats as remote storage (``is_remote_path``); anything else is a local path or HF id."""


def require_vllm() -> None:
    """Raise the one-line :class:`ConfigError` unless vLLM is installed here."""
    # find_spec, not an import: importing vLLM takes seconds and initialises CUDA state.
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(VLLM_MISSING)


# --------------------------------------------------------------------------- configs (pure)


def engine_kwargs(v: VLLMConfig, *, loras: int = 0) -> dict[str, Any]:
    """vLLM engine arguments of ``v``; ``loras``: adapters in one GPU batch (0: no LoRA)."""
    out: dict[str, Any] = {"dtype": v.dtype, "tensor_parallel_size": v.tensor_parallel_size,
                           "gpu_memory_utilization": v.gpu_memory_utilization}
    if v.max_model_len:
        out["max_model_len"] = v.max_model_len
    if loras:
        out.update(enable_lora=True, max_lora_rank=v.max_lora_rank, max_loras=loras)
    return {**out, **v.engine_kwargs}


def llm_config_kwargs(cfg: ServeAppConfig) -> dict[str, Any]:
    """Keyword arguments of ``ray.serve.llm.LLMConfig`` serving ``cfg``'s model and its LoRA adapters.

    Call it on the config as written (not a localized copy): the adapters must be the
    remote folders ``<vllm.lora_dir>/<name>``, which Ray Serve LLM downloads itself.
    """
    v, lm = cfg.vllm, cfg.lm
    if not cfg.model:
        raise ConfigError("engine vllm serves a text causal LM: set model")
    for name, path in cfg.adapters.items():
        if path.rstrip("/") != lora_path(cfg, name) or not v.lora_dir.startswith(REMOTE_SCHEMES):
            raise ConfigError(f"adapters.{name}: with engine vllm it must be {lora_path(cfg, name)} (vllm.lora_dir/"
                              f"<name>, a remote folder), got {path}")
    deployment: dict[str, Any] = {
        "max_ongoing_requests": lm.max_ongoing_requests,
        "max_queued_requests": lm.max_queued_requests,
        # GPUs are not asked here: Ray builds the replica's placement group from
        # tensor_parallel_size (one GPU bundle per engine worker).
        "ray_actor_options": {"num_cpus": lm.num_cpus, **({"resources": dict(lm.resources)} if lm.resources else {})},
        "logging_config": {"enable_access_log": cfg.access_log, "log_level": cfg.log_level},
    }
    if lm.max_replicas > lm.min_replicas:
        deployment["autoscaling_config"] = {"min_replicas": lm.min_replicas, "max_replicas": lm.max_replicas,
                                            "target_ongoing_requests": lm.target_ongoing_requests}
    else:
        deployment["num_replicas"] = lm.min_replicas
    loras = (v.max_loras or min(len(cfg.adapters), lm.max_adapters)) if cfg.adapters else 0
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.base_name, "model_source": cfg.model},
        "engine_kwargs": engine_kwargs(v, loras=loras),
        "deployment_config": deployment,
    }
    if cfg.adapters:
        out["lora_config"] = {"dynamic_lora_loading_path": v.lora_dir.rstrip("/"),
                              "max_num_adapters_per_replica": lm.max_adapters}
    if v.accelerator_type:
        out["accelerator_type"] = v.accelerator_type
    if lm.env:  # the replica and its engine workers
        out["runtime_env"] = {"env_vars": dict(lm.env)}
    return out


def proxy_part(cfg: ServeAppConfig) -> DeploymentConfig:
    """The :class:`VLLMServer` deployment's settings: ``lm``'s replicas and capacity, no GPU, half a CPU.

    It only forwards requests, so it mirrors the LLMServer's replica counts and
    per-replica capacity: overload is refused at this hop, where the gateway already
    answers Serve's backpressure with 503.
    """
    return replace(cfg.lm, num_cpus=0.5, num_gpus=0.0, resources={}, max_replicas_per_node=0)


# --------------------------------------------------------------------------- requests and streams (pure)


def lora_model_id(base: str, adapter: str | None) -> str:
    """Ray Serve LLM's model id: the base's, or ``base:adapter`` for a LoRA adapter."""
    return f"{base}:{adapter}" if adapter else base


def openai_request(spec: GenSpec, model: str) -> tuple[str, dict[str, Any]]:
    """(LLMServer method, OpenAI request body) of ``spec``: ``completions`` for a prompt, ``chat`` for messages.

    Always a stream with usage: :class:`VLLMServer` reads the text as it comes and the
    token counts from the last chunk, for streamed and whole replies alike.
    """
    if spec.image is not None or any(isinstance(m.get("content"), list) and any(
            isinstance(p, dict) and p.get("type") != "text" for p in m["content"]) for m in spec.messages or []):
        raise HTTPError(422, "the served model is text-only; images need a multimodal model (engine hf)",
                        "unsupported")
    body: dict[str, Any] = {"model": model, "temperature": spec.temperature, "top_p": spec.top_p, "stream": True,
                            "stream_options": {"include_usage": True}}
    if spec.seed is not None:
        body["seed"] = spec.seed
    if spec.stop:
        body["stop"] = list(spec.stop)
    if spec.messages is not None:
        return "chat", {**body, "messages": spec.messages, "max_completion_tokens": spec.max_new_tokens}
    if spec.prompt is None:
        raise HTTPError(422, "a generation needs a prompt or messages")
    return "completions", {**body, "prompt": spec.prompt, "max_tokens": spec.max_new_tokens}


def sse_payloads(item: Any) -> list[dict[str, Any]]:
    """The JSON payloads in one item of an LLMServer stream.

    LLMServer batches a stream: an item is a list of ``"data: {json}\\n\\n"`` strings (or
    one such string, possibly several events joined), ends with ``data: [DONE]``, and an
    error may come as a pydantic ``ErrorResponse`` instead.
    """
    if isinstance(item, list):
        return [p for part in item for p in sse_payloads(part)]
    if hasattr(item, "model_dump"):
        return [item.model_dump()]
    if isinstance(item, dict):
        return [item]
    out = []
    for event in str(item).split("\n\n"):
        data = event.strip()
        if not data.startswith("data:"):
            continue
        data = data[len("data:"):].strip()
        if data and data != "[DONE]":
            out.append(json.loads(data))
    return out


FINISH = {"length": "length", "abort": "cancelled"}
"""vLLM's finish reasons as ray_med's (``stop`` for the rest: end of sequence, a stop string)."""


class StreamState:
    """Reads an OpenAI completion or chat stream: the text of each chunk, then the :class:`Done`."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def feed(self, payload: dict[str, Any]) -> str:
        """The text ``payload`` adds (raises the error it carries as an :class:`HTTPError`)."""
        error = payload.get("error")
        if error is None and payload.get("object") == "error":  # vLLM's older, flat error shape
            error = payload
        if error is not None:
            info = error if isinstance(error, dict) else {"message": str(error)}
            code = info.get("code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            raise HTTPError(status, f"vLLM: {info.get('message', 'generation failed')}",
                            "invalid_request" if status < 500 else "internal")
        usage = payload.get("usage")
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
        text = ""
        for choice in payload.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            # completions: text; chat chunks: delta.content; a whole chat reply: message.content
            part = choice.get("text")
            if part is None:
                part = (choice.get("delta") or choice.get("message") or {}).get("content")
            text += part or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return text

    def done(self) -> Done:
        return Done(finish_reason=FINISH.get(self.finish_reason or "stop", "stop"), prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion_tokens)


def generation(text: str, done: Done) -> Generation:
    """A :class:`Generation` of the text and its :class:`Done`."""
    return Generation(text, done.prompt_tokens, done.completion_tokens, done.finish_reason)


# --------------------------------------------------------------------------- offline QA (ray.data.llm)


def adapter_route(adapter: str) -> tuple[str | None, str]:
    """(``dynamic_lora_loading_path``, the rows' ``model``) that make ray.data.llm's vLLM stage load ``adapter``.

    A remote adapter folder is downloaded by Ray from its parent as ``<parent>/<name>``;
    a local one (on every GPU node, e.g. a shared mount) is handed to vLLM as its path.
    """
    adapter = adapter.rstrip("/")
    if adapter.startswith(REMOTE_SCHEMES):
        parent, name = adapter.rsplit("/", 1)
        return parent, name
    return None, adapter


def qa_processor_kwargs(model: str, v: VLLMConfig, *, adapter: str | None = None, batch_size: int = 16,
                        concurrency: int = 1) -> dict[str, Any]:
    """Keyword arguments of ``ray.data.llm.vLLMEngineProcessorConfig`` for :func:`qa_rows`' rows."""
    out: dict[str, Any] = {
        "model_source": model, "engine_kwargs": engine_kwargs(v, loras=1 if adapter else 0),
        "batch_size": batch_size, "concurrency": concurrency,
        # The rows carry ray_med's own prompt token ids (fit_prompt: the ids the transformers
        # path decodes from) and vLLM detokenizes its output: Ray's template, tokenizer and
        # detokenizer stages would only redo that work, or change the prompt.
        "chat_template_stage": False, "tokenize_stage": False, "detokenize_stage": False,
    }
    if adapter:
        path, _ = adapter_route(adapter)
        if path:
            out["dynamic_lora_loading_path"] = path
    if v.accelerator_type:
        out["accelerator_type"] = v.accelerator_type
    return out


def qa_rows(prompts: Sequence[list[int]], texts: Sequence[str], cfg: QAConfig, *,
            adapter: str | None = None) -> list[dict[str, Any]]:
    """One row per generation: a cot item's one greedy rationale, an sc_cot item's ``cfg.n`` samples.

    vLLM's processor keeps only the first output of a request, so the ``n`` samples are
    ``n`` rows, each with its own seed (``cfg.seed`` and its index: a run is repeatable,
    and two seeds share no sample). ``texts`` are the prompts as text (carried along, as
    Ray's tokenizer stage would leave them).
    """
    if cfg.mode == "top_token":
        raise DataError("the vLLM path answers cot and sc_cot; top_token scores logits (run it on the hf path)")
    if cfg.mode == "sc_cot" and cfg.temperature <= 0:
        raise DataError("sc_cot samples its rationales: temperature must be > 0 (use cot for greedy)")
    model = adapter_route(adapter)[1] if adapter else None
    rows = []
    for i, (ids, text) in enumerate(zip(prompts, texts, strict=True)):
        for k in range(1 if cfg.mode == "cot" else cfg.n):
            params: dict[str, Any] = {"max_tokens": cfg.max_new_tokens, "temperature": 0.0}
            if cfg.mode == "sc_cot":
                params.update(temperature=cfg.temperature, top_p=1.0, seed=(cfg.seed << 32) + i * cfg.n + k)
            row = {"item": i, "sample": k, "prompt": text, "tokenized_prompt": list(ids), "sampling_params": params}
            if model is not None:
                row["model"] = model
            rows.append(row)
    return rows


def qa_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {"item": row["item"], "sample": row["sample"], "text": row["generated_text"],
            "prompt_tokens": row["num_input_tokens"], "completion_tokens": row["num_generated_tokens"]}


def qa_results(rows: Iterable[dict[str, Any]], choices: Sequence[Sequence[str]]) -> list[QAResult]:
    """Each item's answer from its rows' texts, as :func:`ray_med.evaluation.qa.chain_of_thought` decides it."""
    texts: list[list[tuple[int, str]]] = [[] for _ in choices]
    for row in rows:
        texts[row["item"]].append((row["sample"], row["text"]))
    out = []
    for i, (got, item_choices) in enumerate(zip(texts, choices, strict=True)):
        if not got:
            raise DataError(f"item {i} has no generation")
        samples = [t for _, t in sorted(got)]  # Ray Data returns rows in any order
        out.append(cot_result(samples, item_choices))
    return out


def qa_task(cfg: Any) -> Any:
    """``evaluate.py qa``: engine hf answers in process; engine vllm on a ray.data.llm processor (cot, sc_cot)."""
    if cfg.engine != "vllm":
        return qa_eval.qa_task(cfg)
    if cfg.qa.mode == "top_token":
        raise ConfigError("engine=vllm generates: use qa.mode=cot or sc_cot (top_token scores logits in process)")
    require_vllm()
    # lazy: the Ray edge (Ray Data, vLLM), for engine vllm only; engine hf loads no Ray
    from ray_med.serving.deployments.vllm import answer_items_vllm

    return qa_eval.qa_task(cfg, answer=lambda items, pool: answer_items_vllm(cfg.model, items, cfg.qa, VLLMConfig(), pool=pool,
                                                                 adapter=cfg.adapter))
