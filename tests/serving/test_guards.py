"""The gateway's exposure settings and request guards, in process (no Ray, no model).

The gateway's FastAPI app is built by ``make_api`` from the real endpoint class with no
model deployments behind it, and called as an ASGI app: the API key, the docs switch,
413 at every input size, image checks and what error texts reveal.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import pytest

from ray_med.config import from_dict
from ray_med.errors import ConfigError, ModelError
from ray_med.serving.config import AuthConfig, DeploymentConfig, ServeAppConfig
from ray_med.serving.errors import HTTPError, http_status
from ray_med.serving.guards import check_image, read_api_key

SECRET_DIR = "/srv/secret-models"
KEY = "k3y-for-tests"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class _StubLM:
    """Stands in for the LM deployment handle; the requests tested here never reach it."""

    def options(self, **_):
        return self


def app(**cfg):
    from ray_med.serving.deployments.gateway import GatewayEndpoints, make_api

    config = ServeAppConfig(model=f"{SECRET_DIR}/lm", model_name="tiny-med",
                            adapters={"hospital_a": f"{SECRET_DIR}/lora_a"}, max_input_chars=2000, **cfg)
    endpoints = GatewayEndpoints(config, _StubLM(), None)
    return make_api(endpoints, config, endpoints.api_key)


def call(api, method: str, path: str, body=None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request through the ASGI app: (status, body bytes)."""
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "server": ("test", 80), "client": ("client", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
             + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(api(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def error(status_body: tuple[int, bytes]) -> tuple[int, dict]:
    status, raw = status_body
    return status, json.loads(raw)


# ---------------------------------------------------------------- docs, models, error texts


def test_docs_are_off_by_default_and_on_when_configured():
    assert call(app(), "GET", "/docs")[0] == 404
    assert call(app(), "GET", "/openapi.json")[0] == 200  # the schema is harmless and needs no CDN
    status, page = call(app(docs=True), "GET", "/docs")
    assert status == 200 and b"swagger" in page.lower()


def test_models_and_errors_name_adapters_not_folders():
    status, raw = call(app(), "GET", "/v1/models")
    assert status == 200 and SECRET_DIR.encode() not in raw
    assert {m["id"] for m in json.loads(raw)["data"]} == {"tiny-med", "hospital_a"}
    status, body = error(call(app(), "POST", "/v1/qa", {"question": "x", "adapter": "hospital_z"}))
    assert status == 404 and "hospital_z" in body["error"]["message"] and SECRET_DIR not in json.dumps(body)
    # A model that fails to load in a replica: its message names the folder; the client's does not.
    status, kind, message = http_status(ModelError(f"{SECRET_DIR}/lora_a is not a PEFT adapter folder"))
    assert (status, kind) == (500, "model_error") and SECRET_DIR not in message


def test_error_texts_carry_no_object_reprs():
    status, body = error(call(app(), "POST", "/v1/generate", {"prompt": "x", "image": b64(b"plain text")}))
    assert status == 415 and body["error"]["type"] == "not_an_image"
    assert "object at 0x" not in body["error"]["message"]
    _, _, message = http_status(ValueError("bad <_io.BytesIO object at 0x7f00deadbeef>"))
    assert "0x" not in message
    _, _, message = http_status(HTTPError(415, "cannot identify image file <_io.BytesIO object at 0x7f00deadbeef>"))
    assert "object at 0x" not in message


@pytest.mark.parametrize("size", [30_000, 200_000])
@pytest.mark.parametrize("path,field", [("/v1/qa", "question"), ("/v1/generate", "prompt")])
def test_over_long_input_is_413_at_every_size(path, field, size):
    """Past the configured limit (2000 here) and past the schema's hard ceiling (100k): both 413."""
    status, body = error(call(app(), "POST", path, {field: "x" * size}))
    assert status == 413 and body["error"]["type"] == "input_too_long" and body["error"]["param"] == field
    assert f"{field} is {size} characters; the limit is 2000" in body["error"]["message"]


def test_over_long_option_and_message_are_413():
    options = {"A": "x" * 200_000, "B": "no"}
    assert call(app(), "POST", "/v1/qa", {"question": "q", "options": options})[0] == 413
    messages = [{"role": "user", "content": "x" * 200_000}]
    assert call(app(), "POST", "/v1/chat/completions", {"messages": messages})[0] == 413


# ---------------------------------------------------------------- images


def test_a_decompression_bomb_is_413_from_its_header(png):
    # 8x8 pixels of data under a header that claims 7000 x 7000 (49 megapixels: under PIL's
    # own bomb limit, so PIL alone would go on to decode it).
    bomb = b64(png(8, 8, claim=(7000, 7000)))
    with pytest.raises(HTTPError) as err:
        check_image(bomb, max_chars=20_000, max_pixels=25_000_000)
    assert err.value.status == 413 and "7000x7000" in err.value.message
    status, body = error(call(app(), "POST", "/v1/generate", {"prompt": "x", "image": bomb}))
    assert status == 413 and body["error"]["type"] == "input_too_long"


def test_check_image_accepts_a_real_image_and_refuses_bad_ones(png):
    assert check_image(b64(png(8, 6)), max_chars=20_000, max_pixels=100) == (8, 6)
    for data, status in [(b64(png(20, 20)), 413), ("***", 400), (b64(b"not an image"), 415),
                         (b64(png(8, 8, claim=(9, 9))), 415), ("A" * 40_000, 413)]:
        with pytest.raises(HTTPError) as err:
            check_image(data, max_chars=20_000, max_pixels=100)
        assert err.value.status == status, data[:20]
    # A valid image under the limit reaches the model, which is text-only.
    status, body = error(call(app(), "POST", "/v1/generate", {"prompt": "x", "image": b64(png(8, 8))}))
    assert status == 422 and "text-only" in body["error"]["message"]


# ---------------------------------------------------------------- API key


def test_api_key_is_required_everywhere_but_healthz(tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")
    api = app(auth=AuthConfig(api_key_file=str(tmp_path / "key")))
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/openapi.json"), ("GET", "/nowhere")):
            status, body = error(call(api, method, path, headers=headers))
            assert status == 401 and body["error"]["type"] == "unauthorized", (headers, path)
            assert KEY not in json.dumps(body) and body["error"]["code"] == 401
    assert call(api, "GET", "/healthz")[0] == 200
    ok = {"Authorization": f"Bearer {KEY}"}
    assert call(api, "GET", "/v1/models", headers=ok)[0] == 200
    assert call(api, "GET", "/v1/models", headers={"authorization": f"bearer {KEY}"})[0] == 200
    assert call(app(), "GET", "/v1/models")[0] == 200  # no auth configured: open


def test_read_api_key_from_env_or_file(tmp_path, monkeypatch):
    assert read_api_key(AuthConfig()) is None
    monkeypatch.setenv("RAY_MED_TEST_KEY", f" {KEY} ")
    assert read_api_key(AuthConfig(api_key_env="RAY_MED_TEST_KEY")) == KEY
    assert read_api_key(AuthConfig(api_key_env="OTHER"), env={"OTHER": "x"}) == "x"
    (tmp_path / "empty").write_text("\n")
    for auth, message in [(AuthConfig(api_key_env="RAY_MED_UNSET_KEY"), "RAY_MED_UNSET_KEY is not set"),
                          (AuthConfig(api_key_file=str(tmp_path / "missing")), "does not exist"),
                          (AuthConfig(api_key_file=str(tmp_path / "empty")), "is empty")]:
        with pytest.raises(ConfigError, match=message):
            read_api_key(auth)


def test_app_config_checks_auth_and_limits(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text("{}")
    ok = {"model": str(tmp_path / "lm")}
    from_dict(ServeAppConfig, {**ok, "auth": {"api_key_env": "RAY_MED_UNSET_KEY"}}).check()  # read by the replica
    for extra, message in [({"auth": {"api_key_env": "A", "api_key_file": "/x"}}, "not both"),
                           ({"auth": {"api_key_file": str(tmp_path / "nope")}}, "does not exist"),
                           ({"max_input_chars": 500_000}, "between 1 and 100000")]:
        with pytest.raises(ConfigError, match=message):
            from_dict(ServeAppConfig, {**ok, **extra}).check()


# ---------------------------------------------------------------- cancellation


def test_a_cancelled_call_sets_the_flag_its_work_checks():
    """What a replica does when Serve cancels a request (client gone, or past its timeout)."""
    from ray_med.serving.deployments.replica import ComputeThread

    thread = ComputeThread(DeploymentConfig(torch_threads=1))
    started, seen = threading.Event(), {}

    def work(*, cancel: threading.Event) -> str:
        started.set()
        seen["cancelled"] = cancel.wait(timeout=120)  # a safety net: the test needs no timing
        return "finished"

    async def main() -> None:
        task = asyncio.create_task(thread.run_cancellable(work))
        await asyncio.to_thread(started.wait, 120)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    thread._pool.shutdown(wait=True)
    assert seen["cancelled"] is True
