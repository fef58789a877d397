"""Running the app from Python (the demo, tests, benchmarks), writing Serve config files, the serve check.

``serve run cluster/serve/<name>.yaml`` is the way to deploy; this module is the same
thing in process: it reads a Serve config's first application, swaps in other model
folders when asked, validates the file with Serve's own schema, and runs it.
:func:`run_serve_check` (``jobs/serve_check.py``, the demo's serve stage) deploys one and
asks every endpoint once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve.schema import ServeDeploySchema

from ray_med.data import read_records
from ray_med.data.config import resolve_path
from ray_med.errors import ConfigError
from ray_med.runtime import RunContext, embedded_ray, free_port, init_ray
from ray_med.serving.app import app_config, build_app
from ray_med.serving.client import demo_requests, print_serve_check
from ray_med.serving.config import ServeCheckConfig, ServeCheckOutputs
from ray_med.serving.guards import read_api_key
from ray_med.tasks import get_task, task_data


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
    http["port"] = port or free_port()
    logging_config = config.get("logging_config") or {}
    if "log_level" in logging_config:
        logging.getLogger("ray.serve").setLevel(logging_config["log_level"])
    serve.start(http_options=http, logging_config=logging_config or None)
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


def run_serve_check(cfg: ServeCheckConfig, ctx: RunContext) -> ServeCheckOutputs:
    """Deploy ``cfg.serve_config`` with ``cfg.args`` in, ask every endpoint once, print the answers."""
    config = with_args(read_serve_config(cfg.serve_config), **cfg.args)
    data = cfg.data_path if Path(cfg.data_path).is_absolute() else str(Path(cfg.data_root) / cfg.data_path)
    # A real PubMedQA item: its question and abstract for QA, question + conclusion to classify.
    records = read_records("pubmedqa", resolve_path(data)).records
    item = records[0]
    rf = task_data(get_task("pubmedqa_rf"), records[:1])
    args = config["applications"][0].get("args", {})
    classifiers, adapters = args.get("classifiers") or {}, args.get("adapters") or {}
    app_cfg = app_config(args)
    # The check is a client too: it sends the key the gateway will ask for.
    api_key = read_api_key(app_cfg.auth, env={**os.environ, **app_cfg.gateway.env})
    init_ray(cfg.run)
    with running(config, port=cfg.port or None) as url:
        rows = demo_requests(url, question=item.question, context=item.context, classify_text=rf.texts[0],
                             classify_pair=rf.pairs[0] if rf.pairs else None,
                             classifier=next(iter(classifiers), ""), adapter=next(iter(adapters), None),
                             api_key=api_key)
    written = None
    target = cfg.write_config or (os.path.join(cfg.run.storage, "serve_tiny.yaml") if "://" not in cfg.run.storage
                                  else None)
    if target:
        written = str(write_serve_config(config, target))
    out = ServeCheckOutputs(run_dir=ctx.dir, url=url, rows=rows, serve_config=written,
                            item={"id": item.id, "question": item.question, "answer": item.answer})
    print_serve_check(out)
    return out
