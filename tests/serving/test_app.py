"""The Serve app end to end: ``serve.run`` on the session's local Ray and real HTTP requests.

One app serves the whole module (a Serve app costs ~25 s to start on 2 cores): the tiny
Llama with two LoRA adapters, and two MiniLM classifiers sharing one base.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ray_med.runtime import free_port

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
KEY = "split-app-key"  # the /split app asks for it; the main app is open
MCQ = {"question": "Which enzyme is deficient in classic phenylketonuria?",
       "options": {"A": "Tyrosinase", "B": "Homogentisate oxidase", "C": "Phenylalanine hydroxylase"}}


@pytest.fixture(scope="module")
def app_args(serve_models):
    return {
        "model": str(serve_models["lm"]),
        "model_name": "tiny-med",
        "adapters": {"hospital_a": str(serve_models["lora_a"]), "hospital_b": str(serve_models["lora_b"])},
        "classifiers": {"triage": str(serve_models["triage"]), "urgency": str(serve_models["urgency"])},
        "qa": {"max_new_tokens": 24, "n": 3},
        "max_input_chars": 2000,
        "max_new_tokens": 64,
        # Small queues so the backpressure test can overflow them with a few requests, and
        # room for one adapter, so switching between the two evicts and reloads.
        "lm": {"max_ongoing_requests": 4, "max_queued_requests": 4, "max_batch_size": 2, "max_adapters": 1},
        "classifier": {"max_batch_size": 8, "max_ongoing_requests": 16},
    }


@pytest.fixture(scope="module")
def url(ray_session, app_args, tmp_path_factory):
    from ray import serve

    from ray_med.serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="ray_med", route_prefix="/")
    # The same classifiers in their own deployment (classify_in_gateway=false), at /split,
    # behind an API key (from a file, as a mounted secret) and with the /docs page on.
    key_file = tmp_path_factory.mktemp("auth") / "api_key"
    key_file.write_text(KEY + "\n")
    split = {"classifiers": app_args["classifiers"], "classify_in_gateway": False,
             "classifier": {"max_batch_size": 8, "max_ongoing_requests": 16},
             "auth": {"api_key_file": str(key_file)}, "docs": True}
    serve.run(build_app(split), name="split", route_prefix="/split")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(params=["in_gateway", "split"])
def classify_url(request, url):
    """Both ways classifiers are deployed: inside the gateway, and as their own deployment."""
    return url if request.param == "in_gateway" else url + "/split"


def post(url: str, path: str, body, headers: dict[str, str] | None = None) -> requests.Response:
    """A POST with the /split app's key (the main app ignores it)."""
    headers = {"authorization": f"Bearer {KEY}", **(headers or {})}
    if isinstance(body, (dict, list)):
        return requests.post(url + path, json=body, timeout=120, headers=headers)
    return requests.post(url + path, data=body, timeout=120, headers={"content-type": "application/json", **headers})


def test_health_and_models(url, serve_models):
    assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
    r = requests.get(url + "/v1/models", timeout=30)
    # data: what chat's `model` may name; the classifiers apart, not offered as chat models
    models = {m["id"]: m["kind"] for m in r.json()["data"]}
    assert models == {"tiny-med": "base", "hospital_a": "lora", "hospital_b": "lora"}
    assert {m["id"]: m["kind"] for m in r.json()["classifiers"]} == {"triage": "classifier", "urgency": "classifier"}
    assert str(serve_models["lm"].parent) not in r.text  # names, not the server's folders


def test_qa_top_token_and_adapter_switching(url):
    outs = {}
    for adapter in (None, "hospital_a", "hospital_b"):
        r = post(url, "/v1/qa", {**MCQ, "mode": "top_token", "adapter": adapter})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["scores"]) == {"A", "B", "C"} and body["answer"] in "ABC" and body["abstained"] is False
        assert abs(sum(body["scores"].values()) - 1) < 1e-4
        outs[adapter] = body["logprobs"]
    # Each adapter changes the model's scores; the header selects an adapter like the field does.
    assert outs[None] != outs["hospital_a"] != outs["hospital_b"] != outs[None]
    by_header = post(url, "/v1/qa", {**MCQ, "mode": "top_token"}, headers={"serve_multiplexed_model_id": "hospital_b"})
    assert by_header.json()["logprobs"] == outs["hospital_b"]


def test_qa_top_token_batched_equals_single(url):
    """Concurrent requests are batched (padded) and still get each one's own answer."""
    questions = [{**MCQ, "question": MCQ["question"] + " " + "x" * i, "mode": "top_token"} for i in range(6)]
    single = [post(url, "/v1/qa", q).json()["logprobs"] for q in questions]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda q: post(url, "/v1/qa", q).json()["logprobs"], questions))
    for a, b in zip(single, together, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-3 for k in a)


@pytest.mark.parametrize("mode", ["cot", "sc_cot"])
def test_qa_reasoning_modes(url, mode):
    body = post(url, "/v1/qa", {"question": "Does aspirin reduce adenoma recurrence?", "context": "Trial of aspirin.",
                                "mode": mode, "seed": 3}).json()
    assert "votes" in body and "rationale" in body
    n = 1 if mode == "cot" else 3
    assert sum(body["votes"].values()) + body["invalid"] == n
    assert body["abstained"] == (body["answer"] is None) == (not body["votes"])
    again = post(url, "/v1/qa", {"question": "Does aspirin reduce adenoma recurrence?", "context": "Trial of aspirin.",
                                 "mode": mode, "seed": 3}).json()
    assert again == body  # seeded sampling is reproducible


def test_classify_switches_adapters(classify_url):
    url = classify_url
    text = "Crushing chest pain radiating to the left arm for two hours."
    a = post(url, "/v1/classify", {"text": text, "adapter": "triage"}).json()
    b = post(url, "/v1/classify", {"text": text, "adapter": "urgency"}).json()
    assert set(a["probabilities"]) == {"yes", "no", "maybe"} and a["label"] in a["probabilities"]
    assert set(b["probabilities"]) == {"low", "high"}
    pair = post(url, "/v1/classify", {"text": "Is this urgent?", "text_pair": text},
                headers={"serve_multiplexed_model_id": "urgency"}).json()
    assert pair["adapter"] == "urgency" and pair["probabilities"] != b["probabilities"]


def test_classify_matches_in_process(classify_url, serve_models):
    """The endpoint gives the probabilities the evaluate job's code computes."""
    from ray_med.serving.engines import ClassifierEngine

    texts = ["Fever and productive cough for three days.", "Routine follow-up, no complaints."]
    engine = ClassifierEngine({"triage": str(serve_models["triage"])})
    expected = engine.classify("triage", texts)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda t: post(classify_url, "/v1/classify", {"text": t, "adapter": "triage"}).json(),
                            texts))
    for e, g in zip(expected, got, strict=True):
        assert e["label"] == g["label"]
        assert all(abs(e["probabilities"][k] - g["probabilities"][k]) < 1e-4 for k in e["probabilities"])


def test_generate_and_chat(url):
    gen = post(url, "/v1/generate", {"prompt": "Chest X-ray shows", "max_new_tokens": 8}).json()
    assert isinstance(gen["text"], str) and gen["text"]
    with_adapter = post(url, "/v1/generate", {"prompt": "Chest X-ray shows", "max_new_tokens": 8,
                                              "adapter": "hospital_a"}).json()
    assert with_adapter["text"] != gen["text"]
    chat = post(url, "/v1/chat/completions", {"model": "hospital_b", "max_tokens": 6, "top_p": 1,
                                              "messages": [{"role": "user", "content": "Dose of amoxicillin?"}]})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["object"] == "chat.completion" and body["model"] == "hospital_b"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 6


def test_generate_accepts_an_image_field_but_the_model_is_text_only(url, png):
    r = post(url, "/v1/generate", {"prompt": "Describe", "image": base64.b64encode(png(8, 8)).decode()})
    assert r.status_code == 422 and "text-only" in r.json()["error"]["message"]
    # A small file whose header claims 7000 x 7000 pixels: refused from its header.
    bomb = base64.b64encode(png(8, 8, claim=(7000, 7000))).decode()
    r = post(url, "/v1/generate", {"prompt": "Describe", "image": bomb})
    assert r.status_code == 413 and "7000x7000" in r.json()["error"]["message"]


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/qa", b"{not json", 400, "not valid JSON"),
    ("/v1/qa", {"question": "x", "mode": "beam"}, 422, "mode"),
    ("/v1/qa", {"question": "x", "temprature": 0.5}, 422, "temprature"),
    ("/v1/qa", {**MCQ, "adapter": "hospital_z"}, 404, "hospital_z"),
    ("/v1/qa", {"question": "x", "options": {"A": "only one"}}, 422, "between 2 and 26 options"),
    ("/v1/qa", {"question": "x", "mode": "sc_cot", "temperature": 0}, 422, "temperature must be > 0"),
    ("/v1/qa", {"question": "x", "seed": 2**64}, 422, "seed"),
    ("/v1/nothing", {"question": "x"}, 404, "Not Found"),
    ("/v1/qa", {"question": "x" * 2001}, 413, "limit is 2000"),
    ("/v1/qa", {"question": "x" * 200_000}, 413, "limit is 2000"),  # past the schema's ceiling too
    ("/v1/qa", {"question": "x " * 900, "context": "y"}, 413, "tokens"),
    ("/v1/classify", {"text": "x", "adapter": "nope"}, 404, "nope"),
    ("/split/v1/classify", {"text": "x", "adapter": "nope"}, 404, "nope"),
    ("/split/v1/qa", {"question": "x"}, 404, "no language model"),
    ("/v1/classify", {"text": "x"}, 422, "name a classifier"),
    ("/v1/classify", {"text_pair": "x", "adapter": "triage"}, 422, "text is required"),
    ("/v1/generate", {"prompt": "x", "image": "***not base64***"}, 400, "base64"),
    ("/v1/generate", {"prompt": "x", "image": base64.b64encode(b"plain text, not a PNG").decode()}, 415, "image"),
    ("/v1/generate", {"prompt": "x", "max_new_tokens": 100000}, 422, "limit"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-4"),
])
def test_bad_input_is_a_json_4xx(url, path, body, status, needle):
    r = post(url, path, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"] and r.json()["error"]["code"] == status
    assert "object at 0x" not in r.text
    assert requests.get(url + "/healthz", timeout=30).status_code == 200  # the replica survived


def test_sampling_is_random_unless_seeded(url):
    body = {"prompt": "Chest X-ray shows", "max_new_tokens": 8, "temperature": 1.0}
    assert len({post(url, "/v1/generate", body).json()["text"] for _ in range(4)}) > 1
    seeded = [post(url, "/v1/generate", {**body, "seed": 11}).json()["text"] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_api_key_and_docs(url):
    """/split asks for a key (Authorization: Bearer) and serves /docs; the main app is open, without /docs."""
    assert requests.get(url + "/docs", timeout=30).status_code == 404
    assert requests.get(url + "/openapi.json", timeout=30).status_code == 200
    body = {"text": "Chest pain.", "adapter": "triage"}
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = requests.post(url + "/split/v1/classify", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert requests.get(url + "/split/v1/models", timeout=30).status_code == 401
    assert requests.get(url + "/split/healthz", timeout=30).status_code == 200  # probes need no key
    assert post(url, "/split/v1/classify", body).status_code == 200
    docs = requests.get(url + "/split/docs", headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_overload_is_503_not_a_crash(url):
    """More concurrent generations than the LM deployment's ongoing + queued limits."""
    body = {"prompt": "Chest X-ray shows", "max_new_tokens": 64, "temperature": 0.8}
    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda _: post(url, "/v1/generate", body).status_code, range(24)))
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    r = post(url, "/v1/generate", {"prompt": "still alive?", "max_new_tokens": 2})
    assert r.status_code == 200


def test_evaluate_qa_matches_endpoint(url, serve_models, app_args, tmp_path):
    """`jobs/evaluate.py qa` and /v1/qa give the same answers on the same items."""
    data = REPO / "tests" / "fixtures" / "medqa.jsonl"
    preds = tmp_path / "preds.jsonl"
    for mode in ("top_token", "sc_cot"):
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "evaluate.py"), "qa", "--model", str(serve_models["lm"]),
             "--adapter", str(serve_models["lora_a"]), "--data", str(data), "--format", "medqa", "--mode", mode,
             "--n", "3", "--max-new-tokens", "24", "--predictions", str(preds)],
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = [json.loads(line) for line in preds.read_text().splitlines()]
        assert metrics["n"] == len(rows) > 0
        for row in rows:
            # Seed 0, the job's default: unseeded requests sample with a random seed.
            served = post(url, "/v1/qa", {"question": row["question"], "options": row["options"], "mode": mode,
                                          "adapter": "hospital_a", "seed": 0}).json()
            assert served["answer"] == row["answer"] and served["abstained"] == row["abstained"]
            if mode == "top_token":
                assert all(abs(served["logprobs"][k] - row["logprobs"][k]) < 1e-3 for k in row["logprobs"])
            else:
                assert served["votes"] == row["votes"]
