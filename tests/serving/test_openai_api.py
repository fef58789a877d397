"""The OpenAI-compatible API and streaming: the official ``openai`` client against the gateway.

Two halves. In process (no Ray): the gateway's FastAPI app over a fake LM handle, driven
by ``openai.AsyncOpenAI`` through an ASGI transport: the error shape, the schemas'
tolerance of OpenAI's extra fields, completions' parameters, SSE framing, errors before
and after a stream starts. Live (``ray``): one Serve app with the tiny Llama and its two
adapters, driven by the sync client over HTTP: plain, streaming, parts, images, unknown
models, bad parameters, ``/v1/generate``'s SSE, a disconnect that stops decoding, and a
bad request amid a decoding batch that fails alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the transport of openai>=3

BASE, ADAPTERS = "tiny-med", ("hospital_a", "hospital_b")


# ================================================================ in process: a fake LM handle


class _Ref:
    """What ``handle.method.remote()`` returns: awaited for the result."""

    def __init__(self, fn):
        self.fn = fn

    def __await__(self):
        async def run():
            return self.fn()
        return run().__await__()


class _Stream:
    """A stand-in for Serve's DeploymentResponseGenerator: async-iterable, cancellable."""

    def __init__(self, agen, log):
        self.agen, self.log = agen, log

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self):
        self.log.append("cancelled")


class FakeLM:
    """The LM deployment's handle: "w0 w1 ..." up to max_new_tokens words, in one piece or word by word.

    A prompt ``too long`` raises PromptTooLong before any event; ``boom`` fails after two words.
    """

    def __init__(self):
        self.specs, self.log = [], []

    def options(self, multiplexed_model_id="", stream=False):
        return _Bound(self, multiplexed_model_id, stream)


class _Bound:
    def __init__(self, lm, adapter, stream):
        self.lm, self.adapter, self.stream = lm, adapter, stream

    def options(self, **kw):
        return _Bound(self.lm, kw.get("multiplexed_model_id", self.adapter), kw.get("stream", self.stream))

    def _words(self, spec):
        self.lm.specs.append((self.adapter, spec))
        text = spec.prompt if spec.prompt is not None else json.dumps(spec.messages)
        if "too long" in text:
            from ray_med.tasks.prompts import PromptTooLong
            raise PromptTooLong("the prompt is 9999 tokens; the model's context is 512")
        return [f" w{i}" for i in range(spec.max_new_tokens)]

    @property
    def generate_text(self):
        from ray_med.serving.engines import Generation

        def run(spec):
            words = self._words(spec)
            return Generation("".join(words), 5, len(words), "length")
        return type("M", (), {"remote": staticmethod(lambda spec: _Ref(lambda: run(spec)))})

    @property
    def generate_stream(self):
        from ray_med.generation.spec import Delta, Done

        async def events(spec):
            words = self._words(spec)
            for i, w in enumerate(words):
                if i == 2 and "boom" in (spec.prompt or ""):
                    raise RuntimeError("decoding failed")
                yield Delta(w)
            yield Done("length", 5, len(words))

        assert self.stream, "generate_stream is called on a stream=True handle"
        return type("M", (), {"remote": staticmethod(lambda spec: _Stream(events(spec), self.lm.log))})


def fake_app(lm: FakeLM | None = None, **cfg):
    from ray_med.serving.config import ServeAppConfig
    from ray_med.serving.deployments.gateway import GatewayEndpoints, make_api

    config = ServeAppConfig(model="/srv/models/lm", model_name=BASE, max_new_tokens=32,
                            adapters={a: f"/srv/models/{a}" for a in ADAPTERS}, **cfg)
    return make_api(GatewayEndpoints(config, lm or FakeLM(), None), config)


def run_client(api, fn):
    """``fn(client)`` with an AsyncOpenAI client on ``api`` (an in-process ASGI app)."""
    async def main():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test")
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
        try:
            return await fn(client, http)
        finally:
            await http.aclose()
    return asyncio.run(main())


def test_error_shape_everywhere():
    """Validation, unknown routes, unknown models and adapters, bad JSON: one OpenAI-shaped body."""
    async def go(client, http):
        out = {}
        for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": 5}),
                           ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
                           ("/v1/qa", {"question": "x", "adapter": "nope"}),
                           ("/v1/nothing", {}),
                           ("/v1/completions", b"{not json")]:
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = await http.post(path, **kw)
            out[path, str(body)[:30]] = (r.status_code, r.json())
        return out

    got = list(run_client(fake_app(), go).values())
    for status, body in got:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
        assert body["error"]["code"] == status and isinstance(body["error"]["message"], str)
    (s1, temp), (s2, model), (s3, adapter), (s4, route), (s5, bad_json) = got
    assert s1 == 422 and temp["error"]["param"] == "temperature" and "less than or equal to 2" in temp["error"]["message"]
    assert s2 == 404 and model["error"]["type"] == "model_not_found" and model["error"]["param"] == "model"
    assert all(name in model["error"]["message"] for name in (BASE, *ADAPTERS))
    assert s3 == 404 and adapter["error"]["type"] == "unknown_adapter"
    assert s4 == 404 and route["error"]["type"] == "not_found"
    assert s5 == 400 and bad_json["error"]["type"] == "invalid_json"


def test_sdk_reads_our_messages():
    async def go(client, http):
        errors = []
        for kwargs in ({"model": "gpt-4"}, {"model": BASE, "temperature": 5}, {"model": BASE, "max_tokens": 999}):
            with pytest.raises(openai.APIStatusError) as err:
                await client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kwargs)
            errors.append(err.value)
        return errors

    unknown, temperature, budget = run_client(fake_app(), go)
    assert isinstance(unknown, openai.NotFoundError) and "hospital_b" in unknown.message and BASE in unknown.message
    # code is the HTTP status (an int in the body; the SDK types code as a string)
    assert unknown.code == "404" and unknown.type == "model_not_found" and unknown.param == "model"
    assert isinstance(temperature, openai.UnprocessableEntityError) and "temperature" in temperature.message
    assert budget.status_code == 422 and "limit of 32" in budget.message and budget.param == "max_tokens"


def test_chat_accepts_openai_fields_and_parts():
    """What SDKs, LangChain and LiteLLM send: parts with cache_control, names, developer role, unused options."""
    lm = FakeLM()

    async def go(client, http):
        return await client.chat.completions.create(
            model="hospital_a", max_tokens=3, user="u1", frequency_penalty=0, presence_penalty=0, logprobs=False,
            top_p=0.9, stop=["\n\n", "###"], seed=7,
            messages=[{"role": "developer", "content": "Be brief."},
                      {"role": "user", "name": "dr_x",
                       "content": [{"type": "text", "text": "Dose of ", "cache_control": {"type": "ephemeral"}},
                                   {"type": "text", "text": "amoxicillin?"}]}])

    out = run_client(fake_app(lm), go)
    assert out.choices[0].message.content == " w0 w1 w2" and out.model == "hospital_a"
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    adapter, spec = lm.specs[-1]
    assert adapter == "hospital_a" and spec.top_p == 0.9 and spec.stop == ["\n\n", "###"] and spec.seed == 7
    assert spec.messages == [{"role": "system", "content": "Be brief."},  # developer read as system; extras dropped
                             {"role": "user", "content": [{"type": "text", "text": "Dose of "},
                                                          {"type": "text", "text": "amoxicillin?"}]}]


@pytest.mark.parametrize("body,needle", [
    ({"n": 2}, "n: Input should be less than or equal to 1"),
    ({"echo": True}, "echo is not supported"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 2}, "logprobs is not supported"),
    ({"suffix": "x"}, "suffix is not supported"),
    ({"prompt": ["a", "b"]}, "at most 1 prompt"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_completions_refuses_what_it_cannot_honour(body, needle):
    async def go(client, http):
        return await http.post("/v1/completions", json={"prompt": "Chest X-ray shows", **body})

    r = run_client(fake_app(), go)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"]


def test_completions_plain_and_streaming():
    lm = FakeLM()

    async def go(client, http):
        plain = await client.completions.create(model=BASE, prompt=["Chest X-ray shows"], stop="\n")
        stream = await client.completions.create(model="hospital_b", prompt="Chest X-ray shows", max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        return plain, chunks

    plain, chunks = run_client(fake_app(lm), go)
    assert plain.object == "text_completion" and plain.choices[0].text == "".join(f" w{i}" for i in range(16))
    assert lm.specs[0][1].max_new_tokens == 16 and lm.specs[0][1].stop == ["\n"]  # OpenAI's default max_tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " w0 w1 w2 w3"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert lm.specs[1][0] == "hospital_b" and lm.log == []  # read to the end: nothing cancelled


def test_chat_stream_framing():
    async def go(client, http):
        async with http.stream("POST", "/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                     "stream": True}) as r:
            return r.status_code, r.headers["content-type"], await r.aread()

    status, ctype, raw = run_client(fake_app(), go)
    assert status == 200 and ctype.startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == BASE for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == [" w0", " w1"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert len({c["id"] for c in chunks}) == 1 and "usage" not in chunks[0]


def test_stream_errors_before_and_after_the_first_event():
    """Refused before decoding: a plain 413. Failed mid-stream: one error event, then the end (no [DONE])."""
    lm = FakeLM()

    async def go(client, http):
        before = await http.post("/v1/generate", json={"prompt": "too long", "stream": True, "max_new_tokens": 4})
        async with http.stream("POST", "/v1/generate", json={"prompt": "boom", "stream": True,
                                                             "max_new_tokens": 5}) as r:
            after = (r.status_code, (await r.aread()).decode())
        with pytest.raises(openai.APIError) as err:
            async for _ in await client.completions.create(model=BASE, prompt="boom", stream=True):
                pass
        return before, after, err.value

    before, (status, raw), sdk_error = run_client(fake_app(lm), go)
    assert before.status_code == 413 and before.json()["error"]["type"] == "input_too_long", before.text
    assert status == 200
    events = [json.loads(e[6:]) for e in raw.split("\n\n") if e]
    assert events[:2] == [{"text": " w0"}, {"text": " w1"}] and "[DONE]" not in raw
    assert events[-1]["error"]["type"] == "internal" and events[-1]["error"]["code"] == 500
    assert "decoding failed" not in raw  # internal details stay in the server log
    assert "internal error" in sdk_error.message
    assert lm.log == ["cancelled", "cancelled", "cancelled"]  # each stream left early was cancelled


def test_generate_stream_and_plain():
    async def go(client, http):
        plain = await http.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 3, "adapter": "hospital_a"})
        async with http.stream("POST", "/v1/generate", json={"prompt": "x", "max_new_tokens": 3,
                                                             "stream": True}) as r:
            raw = (await r.aread()).decode()
        return plain.json(), raw

    plain, raw = run_client(fake_app(), go)
    assert plain == {"text": " w0 w1 w2", "adapter": "hospital_a", "finish_reason": "length",
                     "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    events = [e[6:] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    done = json.loads(events[-2])
    assert [json.loads(e)["text"] for e in events[:-2]] == [" w0", " w1", " w2"]
    assert done == {"done": True, "finish_reason": "length", "adapter": None,
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def test_models_lists_chat_models_and_classifiers_apart(tmp_path):
    from ray_med.serving.config import ServeAppConfig
    from ray_med.serving.deployments.gateway import GatewayEndpoints

    cfg = ServeAppConfig(model="/srv/models/lm", model_name=BASE, adapters={"hospital_a": "/srv/a"},
                         classifiers={"triage": "/srv/t"}, classify_in_gateway=False)
    out = asyncio.run(GatewayEndpoints(cfg, FakeLM(), None).models())
    assert [(m["id"], m["kind"]) for m in out["data"]] == [(BASE, "base"), ("hospital_a", "lora")]
    assert [(m["id"], m["kind"]) for m in out["classifiers"]] == [("triage", "classifier")]


# ================================================================ live: one Serve app, real HTTP

live = pytest.mark.ray
APP = "openai_api"
CHAT = [{"role": "user", "content": "First-line treatment for community-acquired pneumonia?"}]


@pytest.fixture(scope="module")
def url(ray_session, serve_models):
    from ray import serve

    from ray_med.runtime import free_port
    from ray_med.serving.app import build_app

    args = {"model": str(serve_models["lm"]), "model_name": BASE,
            "adapters": {a: str(serve_models[f"lora_{a[-1]}"]) for a in ADAPTERS},
            "max_new_tokens": 480, "max_input_chars": 4000,
            # room for the batch test's requests in one decoding batch
            "lm": {"max_batch_size": 8, "max_ongoing_requests": 16, "max_queued_requests": 32}}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


def decode_stats() -> dict[str, int]:
    from ray import serve

    return serve.get_deployment_handle("LMServer", app_name=APP).decode_stats.remote().result()


@live
def test_chat_plain_streaming_and_parts(client):
    plain = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=8)
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.model == BASE and text
    assert plain.usage.completion_tokens <= 8 and plain.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text  # greedy: the same text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    parts = client.chat.completions.create(
        model="hospital_a", max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"][:20]},
                                               {"type": "text", "text": CHAT[0]["content"][20:]}]}])
    adapter = client.chat.completions.create(model="hospital_a", messages=CHAT, max_tokens=8)
    assert parts.model == "hospital_a" and parts.choices[0].message.content == adapter.choices[0].message.content


@live
def test_sdk_errors_carry_our_messages(client, png):
    import base64

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png(8, 8)).decode()}}
    with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)) as err:
        client.chat.completions.create(model=BASE, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Describe"}, image]}])
    assert "text-only" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert all(name in err.value.message for name in (BASE, *ADAPTERS)) and "gpt-4o" in err.value.message
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model=BASE, messages=CHAT, temperature=5)
    assert "temperature" in err.value.message and err.value.param == "temperature"


@live
def test_completions_and_models(client, url):
    plain = client.completions.create(model=BASE, prompt="Chest X-ray shows", max_tokens=6)
    assert plain.object == "text_completion" and plain.usage.completion_tokens <= 6
    chunks = list(client.completions.create(model=BASE, prompt="Chest X-ray shows", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert [m.id for m in client.models.list().data] == [BASE, *ADAPTERS]
    assert requests.get(url + "/v1/models", timeout=30).json()["classifiers"] == []


def sse(response: requests.Response):
    """The data of each event of a streaming response, decoded (``[DONE]`` as is)."""
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            data = line[6:].decode()
            yield data if data == "[DONE]" else json.loads(data)


@live
def test_generate_streams_sse(url):
    body = {"prompt": "Chest X-ray shows", "max_new_tokens": 8, "adapter": "hospital_b"}
    plain = requests.post(url + "/v1/generate", json=body, timeout=120).json()
    with requests.post(url + "/v1/generate", json={**body, "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse(r))
    assert events[-1] == "[DONE]" and events[-2]["done"] is True
    assert "".join(e["text"] for e in events[:-2]) == plain["text"]
    assert events[-2]["finish_reason"] == plain["finish_reason"] and events[-2]["usage"] == plain["usage"]


@live
def test_a_disconnect_stops_decoding(url):
    before = decode_stats()
    session = requests.Session()
    r = session.post(url + "/v1/generate", json={"prompt": "Chest X-ray shows", "max_new_tokens": 480,
                                                 "temperature": 1.0, "seed": 1, "stream": True},
                     stream=True, timeout=120)
    assert r.status_code == 200
    first = next(e for e in sse(r) if isinstance(e, dict))
    assert "text" in first
    r.close()  # the client goes away after one event
    session.close()
    deadline = time.time() + 30
    while (stats := decode_stats())["active"] and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    after = decode_stats()
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)
    assert after["generated_tokens"] == stats["generated_tokens"]  # nothing decoded after it left
    assert after["generated_tokens"] - before["generated_tokens"] < 400


@live
def test_a_bad_request_amid_a_batch_fails_alone(url):
    good = {"prompt": "Chest X-ray shows", "max_new_tokens": 200, "temperature": 0.8, "seed": 3}
    bad = [({"prompt": "x " * 600, "max_new_tokens": 8}, 413),  # past the context: refused by the replica
           ({"prompt": "x", "max_new_tokens": 100_000}, 422),
           ({"prompt": "x", "temperature": 5}, 422),
           ({"prompt": "x", "adapter": "hospital_z"}, 404)]

    def post(body):
        return requests.post(url + "/v1/generate", json=body, timeout=120)

    with ThreadPoolExecutor(10) as pool:
        goods = [pool.submit(post, good) for _ in range(6)]
        deadline = time.time() + 30
        while not decode_stats()["active"] and time.time() < deadline:  # the good ones are decoding
            time.sleep(0.05)
        bads = [(pool.submit(post, body), status) for body, status in bad]
        for fut, status in bads:
            r = fut.result()
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == status and r.json()["error"]["message"]
        assert decode_stats()["active"]  # answered while the others were still decoding
        for fut in goods:
            r = fut.result()
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
