"""Errors of the HTTP API, and the one place that maps every exception to an HTTP status.

Replicas raise library errors (:class:`~ray_med.errors.RayMedError`) as exceptions; they
cross the Ray hop as themselves (Ray's ``RayTaskError`` is an instance of the original
class), and the gateway's exception handlers call :func:`http_status` to answer with
JSON ``{"error": ..., "type": ...}`` and the right 4xx/5xx. No Ray import here.
"""

from __future__ import annotations

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
        return exc.status, exc.kind, exc.message
    message = _message(exc)
    if isinstance(exc, PromptTooLong):
        return 413, "input_too_long", message
    if isinstance(exc, (DataError, ConfigError)):
        return 422, "invalid_request", message
    if isinstance(exc, ModelError):
        return 500, "model_error", message  # a server-side folder that fails to load
    if isinstance(exc, RayMedError):
        return 400, "invalid_request", message
    return 500, "internal", f"internal error ({type(exc).__name__}); see the server log"


def _message(exc: BaseException) -> str:
    # A RayTaskError that is an instance of the cause's class carries the remote traceback
    # in its str(); the cause's own message is what the client should read.
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)
