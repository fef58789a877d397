"""Errors of the HTTP API: the one place that maps every exception to an HTTP status, and the one error body.

Replicas raise library errors (:class:`~ray_med.errors.RayMedError`) as exceptions; they
cross the Ray hop as themselves (Ray's ``RayTaskError`` is an instance of the original
class), and the gateway's exception handlers call :func:`http_status` to answer with the
right 4xx/5xx and :func:`error_body`, OpenAI's shape, on every endpoint::

    {"error": {"message": "...", "type": "unknown_adapter", "code": 404, "param": "adapter"}}

``type`` is ours (``invalid_request``, ``unknown_adapter``, ``model_not_found``,
``input_too_long``, ``overloaded``, ...), the machine-readable kind. ``code`` is the HTTP
status: the ``type`` already names the kind, and the status is what a body loses when it
travels without its response line, above all as the error event of a stream that
had already answered 200. ``param`` names the request field at fault, when one is.
OpenAI's SDKs read ``message`` into their exceptions. No Ray import here.

What a client reads names adapters, fields and limits, never the server's folders or
Python objects: a model that fails to load (its message names a folder) is a generic
500 whose details go to the replica's log, and object reprs (``<... object at 0x...>``)
are cut from every message.
"""

from __future__ import annotations

import re
from typing import Any

from ray_med.errors import ConfigError, DataError, ModelError, RayMedError
from ray_med.tasks.prompts import PromptTooLong


class HTTPError(RayMedError):
    """An error with the HTTP status the client should see."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def __reduce__(self) -> tuple:  # raised in replicas too: it must survive pickling
        return (HTTPError, (self.status, self.message, self.kind, self.param))


def error_body(status: int, kind: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The API's one error body (OpenAI's shape); ``code`` is the HTTP status."""
    return {"error": {"message": message, "type": kind, "code": status, "param": param}}


def exception_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, error body) for an exception raised while serving a request."""
    status, kind, message = http_status(exc)
    cause = getattr(exc, "cause", None)  # a RayTaskError: the replica's HTTPError carries the param
    param = getattr(exc, "param", None) or getattr(cause, "param", None)
    return status, error_body(status, kind, message, param if isinstance(param, str) else None)


def http_status(exc: BaseException) -> tuple[int, str, str]:
    """(status, error type, message) for an exception raised while serving a request."""
    if isinstance(exc, HTTPError):
        return exc.status, exc.kind, _REPR.sub("<object>", exc.message)
    message = _message(exc)
    if isinstance(exc, PromptTooLong):
        return 413, "input_too_long", message
    if isinstance(exc, (DataError, ConfigError)):
        return 422, "invalid_request", message
    if isinstance(exc, ModelError):  # a server-side folder that fails to load: its message names the folder
        return 500, "model_error", "a model failed to load on the server; see the server log"
    if isinstance(exc, RayMedError):
        return 400, "invalid_request", message
    return 500, "internal", f"internal error ({type(exc).__name__}); see the server log"


_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


def _message(exc: BaseException) -> str:
    # A RayTaskError that is an instance of the cause's class carries the remote traceback
    # in its str(); the cause's own message is what the client should read.
    cause = getattr(exc, "cause", None)
    return _REPR.sub("<object>", str(cause if isinstance(cause, BaseException) else exc))
