"""A small HTTP client for the ray_med API (standard library only): what the demo sends, and how it prints the answers.

Error bodies are the API's one shape, OpenAI's ``{"error": {"message", "type", "code", "param"}}``;
:func:`call` gives a plain-text answer (Serve's proxy answers 503/408 so) the same shape.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def call(url: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 120.0,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a GET (no body) or POST request; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if body is None else "POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"{}")
        except json.JSONDecodeError:  # Serve's proxy answers 503/408 in plain text
            return exc.code, {"error": {"message": raw.decode(errors="replace").strip(), "type": "http_error",
                                        "code": exc.code, "param": None}}


def error_message(body: dict[str, Any]) -> str:
    """The message of an error body (``type: message``)."""
    error = body.get("error")
    if isinstance(error, dict):
        return f"{error.get('type')}: {error.get('message')}"
    return str(error)


def demo_requests(url: str, *, question: str, context: str | None, classify_text: str,
                  classify_pair: str | None, classifiers: list[str], adapter: str | None,
                  api_key: str | None = None) -> list[dict[str, Any]]:
    """One request to every endpoint (each QA mode once, each classifier once); each row: endpoint, request,
    status, response.

    ``api_key``: sent as ``Authorization: Bearer <key>`` when the server asks for one.
    """
    qa = {"question": question, "context": context}
    calls: list[tuple[str, dict[str, Any] | None]] = [
        ("/healthz", None),
        ("/v1/models", None),
        ("/v1/qa", {**qa, "mode": "top_token"}),
        ("/v1/qa", {**qa, "mode": "cot", "adapter": adapter}),
        ("/v1/qa", {**qa, "mode": "sc_cot", "n": 5, "temperature": 0.8, "seed": 0}),  # seeded: the same log each run
        *(("/v1/classify", {"text": classify_text, "text_pair": classify_pair, "adapter": name})
          for name in classifiers or [""]),
        ("/v1/generate", {"prompt": "Chest X-ray shows", "max_new_tokens": 24, "adapter": adapter}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "First-line treatment for "
                                                "community-acquired pneumonia?"}], "max_tokens": 24}),
        ("/v1/completions", {"prompt": "Assessment and plan:", "max_tokens": 16, "stop": ["\n\n"]}),
    ]
    rows = []
    for path, body in calls:
        status, response = call(url, path, body, headers={"authorization": f"Bearer {api_key}"} if api_key else None)
        rows.append({"endpoint": path, "request": body, "status": status, "response": response})
    return rows


def summarize(row: dict[str, Any]) -> str:
    """One line for a demo response."""
    r, path = row["response"], row["endpoint"]
    if row["status"] != 200:
        return f"HTTP {row['status']}: {error_message(r)}"
    if path == "/v1/models":
        return ", ".join(f"{m['id']} ({m['kind']})" for m in r["data"] + r.get("classifiers", []))
    if path == "/v1/qa":
        detail = r.get("scores") or r.get("votes")
        return f"{row['request']['mode']}: answer={r['answer']} abstained={r['abstained']} {detail}"
    if path == "/v1/classify":
        return f"{r['adapter']}: {r['label']} {r['probabilities']}"
    if path == "/v1/chat/completions":
        return repr(r["choices"][0]["message"]["content"][:80])
    if path == "/v1/generate":
        return repr(r["text"][:80])
    if path == "/v1/completions":
        return repr(r["choices"][0]["text"][:80])
    return json.dumps(r)


def print_serve_check(out: Any, *, cached: bool = False) -> None:
    """Where the app was served, the item asked, one line per endpoint, and the Serve config written."""
    item = out.item
    when = "served earlier (not running now)" if cached else "served"
    print(f"{when} at {out.url} (PubMedQA {item['id']}: {item['question']!r}, gold answer {item['answer']})")
    for row in out.rows:
        print(f"  {row['endpoint']:<22} {summarize(row)}")
    if out.serve_config:
        print(f"serve config: {out.serve_config}  (run it: serve run {out.serve_config})")
