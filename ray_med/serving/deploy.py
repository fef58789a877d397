"""Running the app from Python (the demo, tests, benchmarks), writing Serve config files, the serve check.

``serve run cluster/serve/<name>.yaml`` is the way to deploy; this module is the same
thing in process: it reads a Serve config's first application, swaps in other model
folders when asked, validates the file with Serve's own schema, and runs it.
:func:`run_serve_check` (``jobs/serve_check.py``, the demo's serve stages) deploys one and
asks every endpoint once: a PubMedQA item for a causal LM, a real chest X-ray for a
multimodal model (:func:`multimodal_requests`).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve.schema import ServeDeploySchema

from ray_med.data import read_records
from ray_med.data.config import resolve_path
from ray_med.data.records import Record
from ray_med.errors import ConfigError
from ray_med.models.vlm import IMAGE_TOKEN
from ray_med.runtime import RunContext, embedded_ray, free_port, init_ray
from ray_med.serving.app import app_config, build_app
from ray_med.serving.client import call, demo_requests, print_serve_check, summarize
from ray_med.serving.config import ServeCheckConfig, ServeCheckOutputs
from ray_med.serving.engines import image_classification_tasks
from ray_med.serving.guards import read_api_key
from ray_med.tasks import get_multimodal_task, get_task, task_data
from ray_med.tasks.instructions import make_example


def read_serve_config(path: str | Path) -> dict[str, Any]:
    """A Serve config file, checked with ``ServeDeploySchema`` (the check KubeRay's serveConfigV2 gets)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Serve config {path} does not exist")
    data = yaml.safe_load(p.read_text())
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path} is not a valid Serve config: {exc.errors()[0]['msg']} "
                          f"at {'.'.join(str(x) for x in exc.errors()[0]['loc'])}") from None
    return data


def with_args(config: dict[str, Any], **args: Any) -> dict[str, Any]:
    """A copy of a Serve config whose first application's args have ``args`` replaced."""
    out = copy.deepcopy(config)
    out["applications"][0]["args"] = {**out["applications"][0].get("args", {}), **args}
    return out


def write_serve_config(config: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(config, sort_keys=False))
    read_serve_config(p)  # what we write must pass the same check
    return p


_embedded_serve: dict[str, int] = {}
"""The HTTP port Serve listens on, by the GCS address of the embedded Ray this process started it on."""


@contextlib.contextmanager
def running(config: dict[str, Any], *, port: int | None = None) -> Iterator[str]:
    """Run a Serve config's first application on the connected Ray; yield its base URL, then stop it.

    The config's ``logging_config`` (Serve's own setting) applies to Serve's controller and
    proxy and to the Serve logger of this process. When this process started the Ray it
    uses, Serve is left to end with it: ``serve.shutdown()`` makes Serve's controller kill
    itself mid-task, which Ray reports as a failed task.
    """
    app_cfg = config["applications"][0]
    http = dict(config.get("http_options") or {})
    http["host"] = "127.0.0.1"
    gcs = ray.get_runtime_context().gcs_address if embedded_ray() else None
    if gcs in _embedded_serve:
        # Serve is still up on this process's Ray (only the app was deleted) and keeps the
        # port it started with: serve.start ignores new HTTP options (a pipeline serves twice).
        if port and port != _embedded_serve[gcs]:
            print(f"serve: already listening on port {_embedded_serve[gcs]} in this process; port {port} is ignored")
        http["port"] = _embedded_serve[gcs]
    else:
        http["port"] = port or free_port()
    logging_config = config.get("logging_config") or {}
    if "log_level" in logging_config:
        logging.getLogger("ray.serve").setLevel(logging_config["log_level"])
    # The config's proxy_location (e.g. HeadOnly): Serve's default puts a proxy on every
    # node, and on one machine those proxies would share the port.
    serve.start(proxy_location=config.get("proxy_location"), http_options=http, logging_config=logging_config or None)
    if gcs:
        _embedded_serve[gcs] = http["port"]
    name = app_cfg.get("name", "ray_med")
    try:
        serve.run(build_app(app_cfg.get("args", {})), name=name, route_prefix=app_cfg.get("route_prefix", "/"),
                  logging_config=logging_config or None)
        yield f"http://127.0.0.1:{http['port']}"
    finally:
        if embedded_ray():
            serve.delete(name)
        else:
            serve.shutdown()


def _data_file(cfg: ServeCheckConfig, path: str) -> str:
    return resolve_path(path if Path(path).is_absolute() else str(Path(cfg.data_root) / path))


def xray_record(cfg: ServeCheckConfig) -> Record:
    """The chest X-ray the multimodal check sends: ``image_split[image_index]`` of ``image_path`` (MedMNIST)."""
    path = _data_file(cfg, cfg.image_path)
    records = read_records("medmnist", path, options={"splits": [cfg.image_split]}).records
    if not 0 <= cfg.image_index < len(records):
        raise ConfigError(f"image_index {cfg.image_index}: the {cfg.image_split} split of {path} has "
                          f"{len(records)} images")
    return records[cfg.image_index]


def multimodal_requests(url: str, record: Record, task_name: str, *,
                        api_key: str | None = None) -> list[dict[str, Any]]:
    """The X-ray to /v1/generate (the task's prompt), to chat (an image_url data URL) and to /v1/classify (the task).

    Each row: endpoint, request (the image elided), status, response.
    """
    task = get_multimodal_task(task_name)
    if task.name not in image_classification_tasks():
        raise ConfigError(f"image_task {task_name!r} is not an image classification task; use one of "
                          f"{', '.join(image_classification_tasks())}")
    assert record.image is not None
    b64 = base64.b64encode(record.image).decode()
    prompt = make_example(task, record).prompt  # Instructions, the text-only exemplar, then the X-ray's turn
    before, _, after = prompt.partition(IMAGE_TOKEN)
    chat_parts = [{"type": "text", "text": before},
                  {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
                  {"type": "text", "text": after}]
    calls: list[tuple[str, dict[str, Any] | None]] = [
        ("/healthz", None),
        ("/v1/models", None),
        ("/v1/generate", {"prompt": prompt, "image": b64, "max_new_tokens": 8}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": chat_parts}], "max_tokens": 8}),
        ("/v1/classify", {"image": b64, "task": task.name}),
    ]
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    rows = []
    for path, body in calls:
        status, response = call(url, path, body, headers=headers)
        rows.append({"endpoint": path, "request": _elide_image(body), "status": status, "response": response})
    return rows


def _elide_image(body: Any) -> Any:
    """``body`` with its base64 images shortened (the outputs keep the request's shape, not the pixels)."""
    if isinstance(body, dict):
        return {k: (f"<{len(v)} base64 chars>" if k in ("image", "url") and isinstance(v, str) and len(v) > 64
                    else _elide_image(v)) for k, v in body.items()}
    if isinstance(body, list):
        return [_elide_image(v) for v in body]
    return body


def summarize_multimodal(row: dict[str, Any]) -> str:
    """One line for a multimodal check's response."""
    r = row["response"]
    if row["status"] == 200 and row["endpoint"] == "/v1/classify":
        return f"task {r['task']}: {r['label']} {r['probabilities']}"
    return summarize(row)


def print_multimodal_check(out: ServeCheckOutputs, *, cached: bool = False) -> None:
    """Where the app was served, the X-ray sent (and its gold label), one line per endpoint, the config written."""
    item = out.item
    when = "served earlier (not running now)" if cached else "served"
    print(f"{when} at {out.url} (chest X-ray {item['id']}, task {item['task']}: {item['question']!r}, "
          f"gold label {item['answer']})")
    for row in out.rows:
        print(f"  {row['endpoint']:<22} {summarize_multimodal(row)}")
    if out.serve_config:
        print(f"serve config: {out.serve_config}  (run it: serve run {out.serve_config})")


def run_serve_check(cfg: ServeCheckConfig, ctx: RunContext) -> ServeCheckOutputs:
    """Deploy ``cfg.serve_config`` with ``cfg.args`` in, ask every endpoint once, print the answers.

    A causal LM is asked a PubMedQA item (``data_path``); a multimodal model is sent a
    chest X-ray (``image_path``, ``image_split``, ``image_index``) under ``image_task``.
    """
    config = with_args(read_serve_config(cfg.serve_config), **cfg.args)
    args = config["applications"][0].get("args", {})
    classifiers, adapters = args.get("classifiers") or {}, args.get("adapters") or {}
    app_cfg = app_config(args)
    multimodal = app_cfg.model_multimodal()
    if multimodal:  # a real chest X-ray, asked as the task's multiple-choice question
        record = xray_record(cfg)
        task = get_multimodal_task(cfg.image_task)
        item = {"id": record.id, "question": task.instruction.question if task.instruction else None,
                "answer": record.label, "task": task.name}
    else:
        # A real PubMedQA item: its question and abstract for QA, question + conclusion to classify.
        records = read_records("pubmedqa", _data_file(cfg, cfg.data_path)).records
        qa = records[0]
        rf = task_data(get_task("pubmedqa_rf"), records[:1])
        item = {"id": qa.id, "question": qa.question, "answer": qa.answer}
    # The check is a client too: it sends the key the gateway will ask for.
    api_key = read_api_key(app_cfg.auth, env={**os.environ, **app_cfg.gateway.env})
    init_ray(cfg.run)
    with running(config, port=cfg.port or None) as url:
        if multimodal:
            rows = multimodal_requests(url, record, cfg.image_task, api_key=api_key)
        else:
            rows = demo_requests(url, question=qa.question, context=qa.context, classify_text=rf.texts[0],
                                 classify_pair=rf.pairs[0] if rf.pairs else None,
                                 classifiers=list(classifiers), adapter=next(iter(adapters), None),
                                 api_key=api_key)
    written = None
    name = f"serve_{Path(cfg.serve_config).stem}.yaml"
    target = cfg.write_config or (os.path.join(cfg.run.storage, name) if "://" not in cfg.run.storage else None)
    if target:
        written = str(write_serve_config(config, target))
    out = ServeCheckOutputs(run_dir=ctx.dir, url=url, rows=rows, serve_config=written, item=item,
                            multimodal=multimodal)
    if multimodal:
        print_multimodal_check(out)
    else:
        print_serve_check(out)
    return out
