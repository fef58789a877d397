"""Serving the multimodal model: the engine in process, the gateway's image checks, and the app over real HTTP.

One Serve app on the tiny LLaVA folder serves every HTTP test of the module (a Serve app
costs seconds to start on 2 cores). The engine tests check that a served answer is the
one :mod:`ray_med.evaluation.multimodal` computes offline: the same tokens, pixels, scores.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np
import pytest
import requests

from ray_med.errors import ConfigError, DataError
from ray_med.tasks.prompts import PromptTooLong

XRAY_FILE = "pneumoniamnist/pneumoniamnist_trainval.npz"
ray = pytest.mark.ray


def picture(seed: int) -> bytes:
    """A 28 x 28 grey PNG of noise: distinct images for distinct seeds."""
    from ray_med.data.records import encode_png

    return encode_png(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return f"data:image/png;base64,{b64(data)}"


def image_msg(text: str, *urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def engine(vlm_dir):
    from ray_med.serving.engines import VLMEngine

    return VLMEngine(str(vlm_dir))


@pytest.fixture(scope="module")
def xray(shared_data):
    """(PNG bytes, label) of PneumoniaMNIST's val_images[0], a real paediatric chest X-ray."""
    from ray_med.data.records import encode_png

    path = shared_data / XRAY_FILE
    if not path.is_file():
        pytest.skip(f"{XRAY_FILE} not found under {shared_data}")
    with np.load(path) as npz:
        image, label = npz["val_images"][0], int(npz["val_labels"][0][0])
    return encode_png(image), ("normal", "pneumonia")[label]


# ------------------------------------------------------------------ the engine, in process


def test_engine_greedy_answer_is_generate_texts(engine):
    from ray_med.evaluation.multimodal import Pixels, generate_texts, prepare
    from ray_med.tasks.instructions import Example

    for seed in (1, 2):  # two images in a row: nothing of the first is reused for the second
        png = picture(seed)
        got = engine.complete("Describe the chest X-ray.", png, max_new_tokens=8, temperature=0.0, seed=None)
        ex = Example(id="x", prompt="<image>\nDescribe the chest X-ray.", target="", image=png, task="t")
        p = prepare(engine.tokenizer, ex, engine.geo, 512, with_target=False)
        (text, n), = generate_texts(engine.model, engine.tokenizer, [p], Pixels(engine.geo.spec), max_new_tokens=8)
        assert (got.text, got.completion_tokens, got.prompt_tokens) == (text, n, len(p.input_ids))
        assert got.prompt_tokens > engine.geo.n_image_tokens  # the image's tokens are in the prompt
    # A marker already in the text is where the image goes; nothing is put in front.
    at_end = engine.complete("Describe <image>", picture(1), max_new_tokens=4, temperature=0.0, seed=None)
    assert at_end.prompt_tokens == engine.encode("Describe <image>", picture(1)).prompt_len


def test_engine_classify_probabilities_are_choice_probs(engine):
    from ray_med.data.records import Record
    from ray_med.evaluation.multimodal import Pixels, choice_probs, prepare
    from ray_med.tasks import get_multimodal_task
    from ray_med.tasks.instructions import make_example

    task = get_multimodal_task("pneumonia")
    results = []
    for seed in (3, 4):
        png = picture(seed)
        got = engine.classify_image("pneumonia", png)
        ex = make_example(task, Record(id=f"img{seed}", source="t", image=png, label="pneumonia"))
        want = choice_probs(engine.model, [prepare(engine.tokenizer, ex, engine.geo, 512, with_target=False)],
                            Pixels(engine.geo.spec), engine.pad_id)[0]
        assert list(got["probabilities"]) == ["normal", "pneumonia"]
        np.testing.assert_allclose(list(got["probabilities"].values()), want, atol=1e-5)
        assert got["label"] == ["normal", "pneumonia"][int(want.argmax())]
        results.append(got["probabilities"]["normal"])
    assert results[0] != results[1]  # each request scores its own image


def test_engine_chat_puts_image_parts_in_place(engine):
    png = picture(5)
    prompt, image = engine.chat_prompt([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": [
                                            {"type": "text", "text": "Look: "},
                                            {"type": "image_url", "image_url": {"url": data_url(png)}},
                                            {"type": "text", "text": " What is it?"}]}])
    assert image == png
    assert prompt == "System: Be brief.\nUser: Look: <image> What is it?\nAssistant:"
    assert engine.chat_prompt([{"role": "user", "content": "Hi"}]) == ("User: Hi\nAssistant:", None)


@pytest.mark.parametrize("call,error,needle", [
    (lambda e: e.complete("<image> and <image>", picture(1), max_new_tokens=4, temperature=0.0, seed=None),
     DataError, "2 <image> marker(s) and one image"),
    (lambda e: e.complete("What is <image>?", None, max_new_tokens=4, temperature=0.0, seed=None),
     DataError, "1 <image> marker(s) and no image"),
    (lambda e: e.complete("x " * 600, picture(1), max_new_tokens=4, temperature=0.0, seed=None),
     PromptTooLong, "512-token context"),
    (lambda e: e.chat_prompt([image_msg("two", data_url(picture(1)), data_url(picture(2)))]),
     DataError, "one image per prompt"),
    (lambda e: e.chat_prompt([image_msg("web", "https://example.org/cxr.png")]), DataError, "only data: URLs"),
    (lambda e: e.chat_prompt([image_msg("raw", "data:image/png,abc")]), DataError, "base64"),
    (lambda e: e.classify_image("pneumonai", picture(1)), ConfigError, "Did you mean 'pneumonia'"),
    (lambda e: e.classify_image("vqa_rad", picture(1)), DataError, "image classification tasks: pneumonia"),
    (lambda e: e.classify_image("pneumonia", picture(1), "Is it?"), DataError, "asks its own question"),
    (lambda e: e.classify_image("pneumonia", b"not an image"), DataError, "not a readable image"),
])
def test_engine_refuses_bad_requests_clearly(engine, call, error, needle):
    with pytest.raises(error) as info:
        call(engine)
    assert needle in str(info.value)


# ------------------------------------------------- the gateway's checks, in process (no model)


class _NoModel:
    """A stand-in LM handle: the requests below are refused before any model call."""

    def options(self, **kwargs):
        return self

    def __getattr__(self, name):
        raise AssertionError(f"the gateway called the model ({name}) for a request it should refuse")


class _Request:
    headers: dict = {}


def _gateway(tmp_path: Path, model_type: str):
    from ray_med.serving.config import ServeAppConfig
    from ray_med.serving.deployments.gateway import GatewayEndpoints

    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return GatewayEndpoints(ServeAppConfig(model=str(folder), max_input_chars=2000), _NoModel(), None)


def _status(coro) -> tuple[int, str]:
    from ray_med.serving.errors import http_status

    try:
        asyncio.run(coro)
    except Exception as exc:  # noqa: BLE001 - the status of whatever it raised
        status, _, message = http_status(exc)
        return status, message
    raise AssertionError("the request was not refused")


def test_a_text_only_model_refuses_images_on_every_endpoint(tmp_path):
    from ray_med.serving.schemas import ChatRequest, ClassifyRequest, GenerateRequest

    gw = _gateway(tmp_path, "llama")
    assert not gw.multimodal
    png = b64(picture(1))
    for coro in (gw.generate(GenerateRequest(prompt="Describe", image=png), _Request()),
                 gw.chat(ChatRequest(messages=[image_msg("Describe", data_url(picture(1)))]), _Request()),
                 gw.classify(ClassifyRequest(image=png, task="pneumonia"), _Request())):
        status, message = _status(coro)
        assert status == 422 and "text-only" in message
    # The image is still checked first: bad base64 is a 400 whatever the model.
    status, _ = _status(gw.chat(ChatRequest(messages=[image_msg("x", "data:image/png;base64,***")]), _Request()))
    assert status == 400


def test_the_gateway_knows_a_multimodal_model_from_its_config(tmp_path):
    from ray_med.serving.schemas import QARequest

    gw = _gateway(tmp_path, "llava")
    assert gw.multimodal
    models = asyncio.run(gw.models())["data"]
    assert models[0]["modalities"] == ["text", "image"]
    status, message = _status(gw.qa(QARequest(question="Is it?"), _Request()))
    assert status == 422 and "multimodal" in message


def test_a_multimodal_model_takes_no_lora_adapters(vlm_dir, tmp_path):
    from ray_med.serving.config import ServeAppConfig

    cfg = ServeAppConfig(model=str(vlm_dir), adapters={"a": str(tmp_path)})
    assert cfg.model_multimodal()
    with pytest.raises(ConfigError, match="multimodal"):
        cfg.check()
    ServeAppConfig(model=str(vlm_dir)).check()


# ----------------------------------------------------------------- the app over real HTTP


@pytest.fixture(scope="module")
def url(ray_session, vlm_dir):
    from ray import serve

    from ray_med.runtime import free_port
    from ray_med.serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(vlm_dir), "model_name": "tiny-vlm", "max_input_chars": 2000,
                         "max_new_tokens": 64}), name="vlm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=120)


@ray
def test_generate_with_an_image(url, engine):
    png = picture(6)
    r = post(url, "/v1/generate", {"prompt": "Describe the chest X-ray.", "image": b64(png), "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    local = engine.complete("Describe the chest X-ray.", png, max_new_tokens=8, temperature=0.0, seed=None)
    assert r.json()["text"] == local.text  # greedy: the replica answers as the engine in process does
    models = requests.get(url + "/v1/models", timeout=30).json()["data"]
    assert models == [{"id": "tiny-vlm", "object": "model", "owned_by": "ray_med", "kind": "base",
                       "modalities": ["text", "image"]}]


@ray
def test_chat_with_an_image_url(url):
    r = post(url, "/v1/chat/completions", {"messages": [image_msg("What does the X-ray show?",
                                                                  data_url(picture(7)))],
                                           "max_tokens": 6, "top_p": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-vlm"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] <= 6 < body["usage"]["prompt_tokens"]


@ray
def test_classify_an_image(url, engine):
    png = picture(8)
    r = post(url, "/v1/classify", {"image": b64(png), "task": "pneumonia"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["probabilities"]) == {"normal", "pneumonia"} and body["task"] == "pneumonia"
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4 and "adapter" not in body
    assert body == {**engine.classify_image("pneumonia", png), "task": "pneumonia"}


@ray
def test_a_real_chest_xray_as_the_serve_check_sends_it(url, xray, shared_data, capsys):
    """The demo's serve_vlm check (ray_med.serving.deploy) on PneumoniaMNIST's val_images[0]."""
    from ray_med.serving.config import ServeCheckConfig, ServeCheckOutputs
    from ray_med.serving.deploy import multimodal_requests, print_multimodal_check, xray_record

    png, label = xray
    record = xray_record(ServeCheckConfig(data_root=str(shared_data)))
    assert record.image == png and record.label == label
    rows = multimodal_requests(url, record, "pneumonia")
    assert [(r["endpoint"], r["status"]) for r in rows] == [
        ("/healthz", 200), ("/v1/models", 200), ("/v1/generate", 200), ("/v1/chat/completions", 200),
        ("/v1/classify", 200)]
    assert set(rows[-1]["response"]["probabilities"]) == {"normal", "pneumonia"}
    assert "base64 chars>" in json.dumps(rows[2]["request"])  # the outputs keep no pixels
    out = ServeCheckOutputs(run_dir="x", url=url, rows=rows, multimodal=True,
                            item={"id": record.id, "question": "Which finding?", "answer": label,
                                  "task": "pneumonia"})
    print_multimodal_check(out)
    printed = capsys.readouterr().out
    assert f"gold label {label}" in printed and "task pneumonia: " in printed


NOT_AN_IMAGE = b64(b"plain text, not a PNG")


@ray
@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/generate", {"prompt": "x", "image": NOT_AN_IMAGE}, 415, "not an image"),
    ("/v1/generate", {"prompt": "x", "image": "***not base64***"}, 400, "base64"),
    ("/v1/classify", {"task": "pneumonia", "image": NOT_AN_IMAGE}, 415, "not an image"),
    ("/v1/classify", {"task": "pneumonia", "image": "***"}, 400, "base64"),
    ("/v1/classify", {"task": "chest_ct", "image": b64(picture(1))}, 422, "pneumonia"),
    ("/v1/classify", {"task": "vqa_rad", "image": b64(picture(1))}, 422, "image classification tasks: pneumonia"),
    ("/v1/classify", {"image": b64(picture(1))}, 422, "both image"),
    ("/v1/classify", {"text": "Chest pain."}, 404, "no classifiers"),
    ("/v1/generate", {"prompt": "<image> vs <image>", "image": b64(picture(1))}, 422, "2 <image> marker"),
    ("/v1/generate", {"prompt": "What is <image>?"}, 422, "no image"),
    ("/v1/generate", {"prompt": "x " * 600, "image": b64(picture(1))}, 413, "context"),
    ("/v1/chat/completions", {"messages": [image_msg("x", "https://example.org/cxr.png")]}, 422, "only data: URLs"),
    ("/v1/chat/completions", {"messages": [image_msg("x", data_url(picture(1)), data_url(picture(2)))]}, 422,
     "one image per prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 422,
     "video"),
    ("/v1/qa", {"question": "Is it?"}, 422, "multimodal"),
])
def test_bad_image_requests_are_a_json_4xx(url, path, body, status, needle):
    r = post(url, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "code", "param"}
    assert needle in error["message"] and error["code"] == status
    assert "Traceback" not in r.text and "object at 0x" not in r.text
