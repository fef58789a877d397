"""Errors of the HTTP API, and the one place that maps every exception to an HTTP status.

Replicas raise library errors (:class:`~ray_med.errors.RayMedError`) as exceptions; they
cross the Ray hop as themselves (Ray's ``RayTaskError`` is an instance of the original
class), and the gateway's exception handlers call :func:`http_status` to answer with
JSON ``{"error": ..., "type": ...}`` and the right 4xx/5xx. No Ray import here.

What a client reads names adapters, fields and limits, never the server's folders or
Python objects: a model that fails to load (its message names a folder) is a generic
500 whose details go to the replica's log, and object reprs (``<... object at 0x...>``)
are cut from every message.
"""

from __future__ import annotations

import re

from ray_med.errors import ConfigError, DataError, ModelError, RayMedError
from ray_med.tasks.prompts import PromptTooLong


class HTTPError(RayMedError):
    """An error with the HTTP status the client should see."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def __reduce__(self) -> tuple:  # raised in replicas too: it must survive pickling
        return (HTTPError, (self.status, self.message, self.kind))


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
