"""Running the app from Python (the demo, tests, benchmarks) and writing Serve config files.

``serve run cluster/serve/<name>.yaml`` is the way to deploy; this module is the same
thing in process: it reads a Serve config's first application, swaps in other model
folders when asked, validates the file with Serve's own schema, and runs it.
"""

from __future__ import annotations

import contextlib
import copy
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ray_med.errors import ConfigError


def read_serve_config(path: str | Path) -> dict[str, Any]:
    """A Serve config file, checked with ``ServeDeploySchema`` (the check KubeRay's serveConfigV2 gets)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(config: dict[str, Any], *, port: int | None = None) -> Iterator[str]:
    """Run a Serve config's first application on the connected Ray; yield its base URL, then shut Serve down."""
    from ray import serve

    from ray_med.serving.app import build_app

    app_cfg = config["applications"][0]
    http = dict(config.get("http_options") or {})
    http["host"] = "127.0.0.1"
    http["port"] = port or free_port()
    serve.start(http_options=http)
    try:
        serve.run(build_app(app_cfg.get("args", {})), name=app_cfg.get("name", "ray_med"),
                  route_prefix=app_cfg.get("route_prefix", "/"))
        yield f"http://127.0.0.1:{http['port']}"
    finally:
        serve.shutdown()
