"""``engine: vllm`` offline: config, checks, Ray Serve LLM / Ray Data LLM configs and the request/stream translation.

No GPU, no vLLM and no Ray cluster here (vLLM is the optional ``.[vllm]`` extra): what is
tested is everything up to vLLM. The configs built for Ray are validated by Ray 2.60's own
pydantic models (``LLMConfig`` from its internal module: the public ``ray.serve.llm`` raises
ImportError without vLLM; ``ray.data.llm``'s processor config imports fine), and
:class:`VLLMServer` runs against a fake LLMServer handle that streams what Ray's does.
The model folders are plain files: every check here reads config files, never weights.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ray_med.config import from_dict
from ray_med.errors import ConfigError, DataError
from ray_med.evaluation.config import QAConfig
from ray_med.generation.spec import Delta, Done, GenSpec
from ray_med.serving import vllm as V
from ray_med.serving.config import ServeAppConfig, VLLMConfig
from ray_med.serving.deploy import read_serve_config
from ray_med.serving.deployments import vllm as D
from ray_med.serving.errors import HTTPError

REPO = Path(__file__).resolve().parents[2]
LORA_DIR = "s3://ray-med-test/adapters"
NAMES = ("hospital_a", "hospital_b")


def _write(path: Path, name: str, data: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(data))
    return path


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """A causal LM, a LLaVA and an injected model folder, a classifier, and two LoRA adapters as the
    driver's localized copies of <lora_dir>/<name> (their folder name is the served name)."""
    out = {
        "lm": _write(tmp_path / "lm", "config.json", {"model_type": "llama"}),
        "vlm": _write(tmp_path / "vlm", "config.json", {"model_type": "llava"}),
        "injected": _write(tmp_path / "inj", "injected_config.json", {"tasks": {}}),
        "clf": _write(tmp_path / "clf", "classifier.json", {}),
    }
    for i, name in enumerate(NAMES):
        out[name] = _write(tmp_path / f"cache{i}" / name, "adapter_config.json", {"peft_type": "LORA", "r": 8})
    return out


def _args(folders: dict[str, Path], **extra: Any) -> dict[str, Any]:
    """The args as written: the adapters are the remote folders <lora_dir>/<name>."""
    return {"engine": "vllm", "model": str(folders["lm"]), "model_name": "tiny-med",
            "adapters": {n: f"{LORA_DIR}/{n}" for n in NAMES},
            "vllm": {"lora_dir": LORA_DIR + "/", "max_model_len": 2048, "dtype": "bfloat16", "tensor_parallel_size": 2,
                     "gpu_memory_utilization": 0.8, "max_lora_rank": 8, "accelerator_type": "L4",
                     "engine_kwargs": {"enable_prefix_caching": True}},
            "lm": {"min_replicas": 1, "max_replicas": 3, "max_ongoing_requests": 24, "max_queued_requests": 48,
                   "max_batch_size": 4, "max_adapters": 4, "num_cpus": 2, "env": {"HF_HOME": "/cache/hf"}},
            **extra}


def _localized(cfg: ServeAppConfig, folders: dict[str, Path]) -> ServeAppConfig:
    """What ``cfg.localized()`` gives on the driver: the adapters' local copies."""
    return replace(cfg, adapters={n: str(folders[n]) for n in NAMES})


def _ray_llm_config(kwargs: dict[str, Any]) -> Any:
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig  # ray.serve.llm's, without vLLM

    return LLMConfig(**kwargs)


# --------------------------------------------------------------------------- LLMConfig


def test_llm_config_of_a_model_with_two_adapters(folders):
    cfg = from_dict(ServeAppConfig, _args(folders))
    kwargs = V.llm_config_kwargs(cfg)
    assert kwargs["model_loading_config"] == {"model_id": "tiny-med", "model_source": str(folders["lm"])}
    assert kwargs["lora_config"] == {"dynamic_lora_loading_path": LORA_DIR, "max_num_adapters_per_replica": 4}
    assert kwargs["engine_kwargs"] == {"dtype": "bfloat16", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8,
                                       "max_model_len": 2048, "enable_lora": True, "max_lora_rank": 8,
                                       "max_loras": 2, "enable_prefix_caching": True}
    dep = kwargs["deployment_config"]
    assert dep["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16.0}
    assert "num_replicas" not in dep and dep["max_ongoing_requests"] == 24 and dep["max_queued_requests"] == 48
    assert dep["ray_actor_options"] == {"num_cpus": 2}  # no GPU: Ray's placement group holds the engine's
    assert kwargs["accelerator_type"] == "L4" and kwargs["runtime_env"] == {"env_vars": {"HF_HOME": "/cache/hf"}}

    llm = _ray_llm_config(kwargs)  # Ray's own validation, Serve's DeploymentConfig included
    assert llm.model_id == "tiny-med" and llm.max_request_context_length == 2048
    assert llm.lora_config.dynamic_lora_loading_path == LORA_DIR
    assert llm.multiplex_config().max_num_models_per_replica == 4


def test_llm_config_of_a_model_without_adapters(folders):
    args = _args(folders, adapters={}, lm={"min_replicas": 2, "max_replicas": 2})
    args["vllm"] = {"max_loras": 3}
    kwargs = V.llm_config_kwargs(from_dict(ServeAppConfig, args))
    assert "lora_config" not in kwargs and "accelerator_type" not in kwargs and "runtime_env" not in kwargs
    assert kwargs["engine_kwargs"] == {"dtype": "auto", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9}
    assert kwargs["deployment_config"]["num_replicas"] == 2 and "autoscaling_config" not in kwargs["deployment_config"]
    assert _ray_llm_config(kwargs).lora_config is None


def test_adapters_must_be_the_folders_of_lora_dir(folders):
    args = _args(folders)
    args["adapters"]["hospital_b"] = "s3://elsewhere/hospital_b"
    with pytest.raises(ConfigError, match=r"adapters.hospital_b: .*s3://ray-med-test/adapters/hospital_b"):
        V.llm_config_kwargs(from_dict(ServeAppConfig, args))
    args = _args(folders)
    args["adapters"]["hospital_a"] = str(folders["hospital_a"])  # a local folder: Ray Serve LLM cannot load it
    with pytest.raises(ConfigError, match="adapters.hospital_a"):
        V.llm_config_kwargs(from_dict(ServeAppConfig, args))


def test_the_example_serve_config_builds_a_valid_llm_config():
    (app,) = read_serve_config(REPO / "cluster/serve/llama_1b_vllm.yaml")["applications"]
    cfg = from_dict(ServeAppConfig, app["args"], where="llama_1b_vllm.yaml")
    assert cfg.engine == "vllm"
    llm = _ray_llm_config(V.llm_config_kwargs(cfg))
    assert llm.lora_config.dynamic_lora_loading_path == cfg.vllm.lora_dir
    assert llm.engine_kwargs["enable_lora"] and llm.accelerator_type == "L4"


def test_the_proxy_mirrors_the_lm_capacity_without_gpus(folders):
    cfg = from_dict(ServeAppConfig, _args(folders, lm={"num_gpus": 1, "resources": {"gpu_pool": 1},
                                                         "max_ongoing_requests": 24, "max_replicas": 3}))
    part = V.proxy_part(cfg)
    assert (part.num_gpus, part.resources, part.num_cpus) == (0.0, {}, 0.5)
    assert (part.max_ongoing_requests, part.min_replicas, part.max_replicas) == (24, 1, 3)


# --------------------------------------------------------------------------- the config and its check


def test_an_engine_typo_names_the_valid_engines(folders):
    with pytest.raises(ConfigError, match=r"'engine' must be one of 'hf', 'vllm', got 'vlm'"):
        from_dict(ServeAppConfig, {"model": str(folders["lm"]), "engine": "vlm"})
    with pytest.raises(ConfigError, match="engine must be one of hf, vllm, got 'tgi'"):
        replace(from_dict(ServeAppConfig, {"model": str(folders["lm"])}), engine="tgi").check()
    with pytest.raises(ConfigError, match="vllm.lora_dirr"):  # the nested section is strict too
        from_dict(ServeAppConfig, {"vllm": {"lora_dirr": LORA_DIR}})


def test_a_valid_vllm_config_passes_check(folders):
    cfg = _localized(from_dict(ServeAppConfig, _args(folders)), folders)
    cfg.check()
    assert from_dict(ServeAppConfig, {"model": str(folders["lm"])}).engine == "hf"


@pytest.mark.parametrize("case, args, error", [
    ("multimodal", {"model": "vlm", "adapters": {}}, "multimodal"),
    ("injected", {"model": "injected", "adapters": {}}, "injected"),
    ("classifier-only", {"model": "", "adapters": {}, "classifiers": {"triage": "clf"}}, "set model"),
    ("colon", {"model_name": "tiny:med"}, "without ':'"),
    ("no-lora-dir", {"vllm": {"lora_dir": ""}}, "need vllm.lora_dir"),
    ("local-lora-dir", {"vllm": {"lora_dir": "/mnt/adapters"}}, "need vllm.lora_dir"),
    ("rank", {"vllm": {"lora_dir": LORA_DIR, "max_lora_rank": 4}}, "rank 8 exceeds vllm.max_lora_rank"),
    ("clash", {"vllm": {"lora_dir": LORA_DIR, "engine_kwargs": {"max_model_len": 9}}}, "set by vllm"),
    ("tp", {"vllm": {"lora_dir": LORA_DIR, "tensor_parallel_size": 0}}, "tensor_parallel_size"),
])
def test_check_refuses_what_vllm_cannot_serve(folders, case, args, error):
    merged = {**_args(folders), **args}
    for key in ("model",):
        if merged[key] in folders:
            merged[key] = str(folders[merged[key]])
    merged["classifiers"] = {n: str(folders[p]) for n, p in merged.get("classifiers", {}).items()}
    cfg = from_dict(ServeAppConfig, merged)
    if cfg.adapters:
        cfg = _localized(cfg, folders)
    with pytest.raises(ConfigError, match=error):
        cfg.check()
    if case in ("multimodal", "injected", "classifier-only"):
        replace(cfg, engine="hf").check()  # the same folders serve on engine hf


def test_check_refuses_an_adapter_not_named_by_its_folder(folders):
    cfg = from_dict(ServeAppConfig, _args(folders))
    cfg = replace(cfg, adapters={"hospital_a": str(folders["hospital_a"]), "hospital_b": str(folders["hospital_a"])})
    with pytest.raises(ConfigError, match="adapters.hospital_b"):
        cfg.check()


# --------------------------------------------------------------------------- build_app


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_build_app_without_vllm_is_one_clear_line(folders):
    from ray_med.serving.app import build_app

    with pytest.raises(ConfigError) as err:
        build_app(_args(folders))
    assert str(err.value) == "engine=vllm needs vLLM: pip install .[vllm] on a GPU node"
    # engine hf needs no vLLM: the same model binds to LMServer (nothing is deployed)
    app = build_app({"model": str(folders["lm"])})
    assert type(app).__name__ == "Application"


# --------------------------------------------------------------------------- requests


def test_a_prompt_becomes_a_completion_request_for_the_adapter():
    spec = GenSpec(prompt="Fever and cough:", max_new_tokens=40, temperature=0.7, top_p=0.9, seed=7,
                   stop=["\n\n", "Question:"])
    method, body = V.openai_request(spec, V.lora_model_id("tiny-med", "hospital_a"))
    assert method == "completions"
    assert body == {"model": "tiny-med:hospital_a", "prompt": "Fever and cough:", "max_tokens": 40,
                    "temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["\n\n", "Question:"], "stream": True,
                    "stream_options": {"include_usage": True}}


def test_messages_become_a_chat_request_on_the_base():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Dose of amoxicillin?"}]}]
    method, body = V.openai_request(GenSpec(messages=messages, max_new_tokens=12), V.lora_model_id("tiny-med", None))
    assert method == "chat" and body["model"] == "tiny-med" and body["messages"] == messages
    assert body["max_completion_tokens"] == 12 and "max_tokens" not in body
    assert "seed" not in body and "stop" not in body  # unseeded: vLLM draws one; no stop strings
    assert (body["temperature"], body["top_p"]) == (0.0, 1.0)


def test_lora_model_ids_are_rays():
    from ray.llm._internal.common.utils.lora_utils import get_base_model_id, get_lora_id

    model = V.lora_model_id("tiny-med", "hospital_a")
    assert (get_base_model_id(model), get_lora_id(model)) == ("tiny-med", "hospital_a")


@pytest.mark.parametrize("spec", [
    GenSpec(prompt="x", image="aGVsbG8="),
    GenSpec(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]),
    GenSpec(),
])
def test_images_and_empty_specs_are_refused(spec):
    with pytest.raises(HTTPError) as err:
        V.openai_request(spec, "tiny-med")
    assert err.value.status == 422


# --------------------------------------------------------------------------- streams


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _completion_chunks() -> list[Any]:
    """A completion stream as LLMServer yields it: batches (lists) of SSE strings, usage last, then [DONE]."""
    chunk = {"id": "c", "object": "text_completion", "model": "tiny-med:hospital_a"}
    return [
        [_sse({**chunk, "choices": [{"index": 0, "text": "Hel", "finish_reason": None}]}),
         _sse({**chunk, "choices": [{"index": 0, "text": "lo", "finish_reason": None}]})],
        [_sse({**chunk, "choices": [{"index": 0, "text": "!", "finish_reason": "length"}]})
         + _sse({**chunk, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
         + "data: [DONE]\n\n"],
    ]


def _read(items: list[Any]) -> list[Delta | Done]:
    state, out = V.StreamState(), []
    for item in items:
        for payload in V.sse_payloads(item):
            text = state.feed(payload)
            if text:
                out.append(Delta(text))
    return [*out, state.done()]


def test_a_completion_stream_becomes_deltas_and_done():
    assert _read(_completion_chunks()) == [Delta("Hel"), Delta("lo"), Delta("!"),
                                           Done(finish_reason="length", prompt_tokens=5, completion_tokens=3)]


def test_a_chat_stream_becomes_deltas_and_done():
    chunk = {"id": "c", "object": "chat.completion.chunk"}
    items = [[_sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
              _sse({**chunk, "choices": [{"index": 0, "delta": {"content": "Take "}}]})],
             [_sse({**chunk, "choices": [{"index": 0, "delta": {"content": "500 mg."}, "finish_reason": "stop"}]}),
              _sse({**chunk, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}),
              "data: [DONE]\n\n"]]
    assert _read(items) == [Delta("Take "), Delta("500 mg."), Done("stop", 9, 4)]


def test_finish_reasons_map_to_ours():
    for raw, ours in (("abort", "cancelled"), ("stop", "stop"), (None, "stop"), ("length", "length")):
        state = V.StreamState()
        state.feed({"choices": [{"index": 0, "text": "x", "finish_reason": raw}]})
        assert state.done().finish_reason == ours


def test_an_error_in_the_stream_is_an_http_error():
    class ErrorResponse:  # Ray's pydantic ErrorResponse, as LLMServer yields it before any text
        def model_dump(self) -> dict[str, Any]:
            return {"error": {"message": "maximum context length is 2048 tokens", "type": "BadRequestError",
                              "code": 400}}

    with pytest.raises(HTTPError) as err:
        _read([ErrorResponse()])
    assert err.value.status == 400 and "maximum context length" in err.value.message
    with pytest.raises(HTTPError) as err:  # vLLM's flat shape, mid-stream, with no usable code
        _read([[_sse({"object": "error", "message": "engine died", "code": "boom"})]])
    assert err.value.status == 500


def test_generation_carries_text_counts_and_finish_reason_when_it_has_one():
    gen = V.generation("Hello!", Done("length", 5, 3))
    assert (gen.text, gen.prompt_tokens, gen.completion_tokens) == ("Hello!", 5, 3)
    assert getattr(gen, "finish_reason", "length") == "length"


# --------------------------------------------------------------------------- VLLMServer on a fake LLMServer


class _Stream:
    def __init__(self, items: list[Any]) -> None:
        self.items, self.cancelled = items, False

    def __aiter__(self) -> Any:
        return self._gen()

    async def _gen(self) -> Any:
        for item in self.items:
            await asyncio.sleep(0)
            yield item

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """What VLLMServer calls: ``llm.options(stream=..., multiplexed_model_id=...).<method>.remote(request)``."""

    def __init__(self, items: list[Any]) -> None:
        self.items, self.calls, self.streams = items, [], []

    def options(self, **opts: Any) -> Any:
        handle = self

        class Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, request: Any) -> _Stream:
                handle.calls.append((self.name, opts, request))
                handle.streams.append(_Stream(handle.items))
                return handle.streams[-1]

        class Bound:
            chat = Method("chat")
            completions = Method("completions")

        return Bound()


def _server(handle: _Handle, folders: dict[str, Path]) -> Any:
    server = object.__new__(D.VLLMServer.func_or_class)  # __init__ imports vLLM's request types
    cfg = from_dict(ServeAppConfig, _args(folders))
    server.cfg, server.base, server.llm = cfg, cfg.base_name, handle
    server.requests = {"chat": dict, "completions": dict}  # the request body, as vLLM's pydantic type takes it
    server.stats = {"requests": 0, "active": 0, "cancelled": 0, "prompt_tokens": 0, "completion_tokens": 0}
    return server


def test_vllm_server_routes_an_adapter_request_and_streams_back(folders, monkeypatch):
    from ray import serve

    handle = _Handle(_completion_chunks())
    server = _server(handle, folders)
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "hospital_a")

    async def run() -> tuple[list[Any], Any]:
        events = [e async for e in server.generate_stream(GenSpec(prompt="Hi", max_new_tokens=3))]
        return events, await server.generate_text(GenSpec(prompt="Hi", max_new_tokens=3))

    events, gen = asyncio.run(run())
    assert events == [Delta("Hel"), Delta("lo"), Delta("!"), Done("length", 5, 3)]
    assert (gen.text, gen.completion_tokens) == ("Hello!", 3)
    method, opts, request = handle.calls[0]
    assert method == "completions" and request["model"] == "tiny-med:hospital_a"
    assert opts == {"stream": True, "multiplexed_model_id": "tiny-med:hospital_a"}
    stats = asyncio.run(server.decode_stats())
    assert stats["requests"] == 2 and stats["active"] == 0 and stats["completion_tokens"] == 6

    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "")
    asyncio.run(server.generate_text(GenSpec(messages=[{"role": "user", "content": "Hi"}])))
    method, opts, request = handle.calls[-1]
    assert method == "chat" and request["model"] == "tiny-med" and opts["multiplexed_model_id"] == ""


def test_vllm_server_cancels_the_llm_stream_when_its_client_leaves(folders, monkeypatch):
    from ray import serve

    handle = _Handle(_completion_chunks())
    server = _server(handle, folders)
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "")

    async def first_then_leave() -> None:
        stream = server.generate_stream(GenSpec(prompt="Hi"))
        assert await stream.__anext__() == Delta("Hel")
        await stream.aclose()  # what Serve does to a cancelled request's generator

    asyncio.run(first_then_leave())
    assert handle.streams[0].cancelled and server.stats["cancelled"] == 1 and server.stats["active"] == 0

    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "hospital_z")
    with pytest.raises(HTTPError, match="unknown adapter 'hospital_z'"):
        asyncio.run(server.generate_text(GenSpec(prompt="Hi")))
    with pytest.raises(HTTPError, match="engine hf"):
        asyncio.run(server.qa(None))


# --------------------------------------------------------------------------- offline QA (ray.data.llm)


def test_qa_processor_config_for_a_remote_adapter():
    from ray.data.llm import vLLMEngineProcessorConfig

    v = VLLMConfig(max_model_len=4096, max_lora_rank=16, accelerator_type="A10G")
    kwargs = V.qa_processor_kwargs("/mnt/models/llama", v, adapter="s3://b/adapters/hospital_a/", batch_size=32,
                                   concurrency=2)
    assert kwargs == {"model_source": "/mnt/models/llama", "batch_size": 32, "concurrency": 2,
                      "engine_kwargs": {"dtype": "auto", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
                                        "max_model_len": 4096, "enable_lora": True, "max_lora_rank": 16,
                                        "max_loras": 1},
                      "chat_template_stage": False, "tokenize_stage": False, "detokenize_stage": False,
                      "dynamic_lora_loading_path": "s3://b/adapters", "accelerator_type": "A10G"}
    config = vLLMEngineProcessorConfig(**kwargs)  # Ray's validation
    assert config.dynamic_lora_loading_path == "s3://b/adapters" and config.engine_kwargs["task_type"] == "generate"
    local = V.qa_processor_kwargs("/mnt/models/llama", VLLMConfig(), adapter="/mnt/adapters/hospital_a")
    assert "dynamic_lora_loading_path" not in local and "accelerator_type" not in local
    assert "enable_lora" not in V.qa_processor_kwargs("/m", VLLMConfig())["engine_kwargs"]


def test_qa_rows_cot_is_greedy_and_sc_cot_is_n_seeded_samples():
    prompts, texts = [[1, 2, 3], [4, 5]], ["Q1 Answer:", "Q2 Answer:"]
    cot = V.qa_rows(prompts, texts, QAConfig(mode="cot", max_new_tokens=64), adapter="s3://b/adapters/hospital_a")
    assert [(r["item"], r["sample"]) for r in cot] == [(0, 0), (1, 0)]
    assert cot[1] == {"item": 1, "sample": 0, "prompt": "Q2 Answer:", "tokenized_prompt": [4, 5],
                      "sampling_params": {"max_tokens": 64, "temperature": 0.0}, "model": "hospital_a"}
    sc = V.qa_rows(prompts, texts, QAConfig(mode="sc_cot", n=3, temperature=0.8, seed=1))
    assert len(sc) == 6 and "model" not in sc[0]
    assert {r["sampling_params"]["temperature"] for r in sc} == {0.8}
    seeds = [r["sampling_params"]["seed"] for r in sc]
    assert len(set(seeds)) == 6
    other = [r["sampling_params"]["seed"] for r in V.qa_rows(prompts, texts, QAConfig(mode="sc_cot", n=3, seed=2))]
    assert not set(seeds) & set(other)  # two runs' seeds share no sample
    assert V.qa_rows(prompts, texts, QAConfig(mode="cot"), adapter="/mnt/a/x")[0]["model"] == "/mnt/a/x"
    with pytest.raises(DataError, match="top_token"):
        V.qa_rows(prompts, texts, QAConfig(mode="top_token"))
    with pytest.raises(DataError, match="temperature must be > 0"):
        V.qa_rows(prompts, texts, QAConfig(mode="sc_cot", temperature=0.0))


def test_qa_results_vote_over_each_items_samples_in_order():
    rows = [{"item": 1, "sample": 0, "text": "It is no."},
            {"item": 0, "sample": 2, "text": "Hard to say."},
            {"item": 0, "sample": 1, "text": "Clearly, the answer is C."},
            {"item": 0, "sample": 0, "text": "First, B fits. The answer is B.\nQuestion: next"},
            {"item": 0, "sample": 3, "text": "the answer is B"}]
    first, second = V.qa_results(rows, [["A", "B", "C", "D"], ["yes", "no", "maybe"]])
    assert (first.answer, first.votes, first.invalid) == ("B", {"B": 2, "C": 1}, 1)
    assert first.rationale == "First, B fits. The answer is B." and first.samples[1] == "Clearly, the answer is C."
    assert second.abstained and second.answer is None and second.invalid == 1
    with pytest.raises(DataError, match="item 1 has no generation"):
        V.qa_results(rows[1:4], [["A", "B"], ["A", "B"]])


def test_the_processor_needs_vllm():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ConfigError, match=r"pip install \.\[vllm\]"):
        D.vllm_qa_processor("/mnt/models/llama", VLLMConfig())
