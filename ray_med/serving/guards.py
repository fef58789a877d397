"""What the gateway checks before a request reaches a model: the API key and images (no Ray).

* :func:`read_api_key` and :class:`BearerAuth`: the optional API key (``auth`` in the
  app config), sent as ``Authorization: Bearer <key>`` like OpenAI clients send it and
  compared in constant time. ``/healthz`` stays open, so load balancers and Kubernetes
  probes need no key.
* :func:`check_image`: a base64 image is decoded only after its header says it is small
  enough: PIL's ``Image.open`` reads the header and nothing more, so a decompression
  bomb (a small file that claims, and would decode to, gigabytes) is refused for the
  price of its header. The gateway runs it off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.responses import JSONResponse

from ray_med.errors import ConfigError
from ray_med.serving.config import AuthConfig
from ray_med.serving.errors import HTTPError, error_body

OPEN_PATHS = frozenset({"/healthz"})


def read_api_key(auth: AuthConfig, env: Mapping[str, str] | None = None) -> str | None:
    """The key ``auth`` names (None when auth is off); a clear error when its source is missing or empty.

    ``env``: where to look up ``api_key_env`` (default: this process's environment).
    """
    if auth.api_key_env:
        key = (os.environ if env is None else env).get(auth.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"auth.api_key_env: the environment variable {auth.api_key_env} is not set "
                              "(or empty) in the gateway's environment")
        return key
    if auth.api_key_file:
        path = Path(auth.api_key_file)
        if not path.is_file():
            raise ConfigError(f"auth.api_key_file: {path} does not exist")
        key = path.read_text().strip()
        if not key:
            raise ConfigError(f"auth.api_key_file: {path} is empty")
        return key
    return None


class BearerAuth:
    """ASGI middleware: a 401 JSON error (the API's one error shape) unless the request carries ``Authorization: Bearer <key>``.

    A plain ASGI class (not Starlette's ``BaseHTTPMiddleware``): it adds one header
    comparison per request and nothing else. It guards every path, unknown ones and
    ``/openapi.json`` included, except :data:`OPEN_PATHS`.
    """

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self._key = key.encode()

    def allowed(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        # compare_digest takes as long for a near miss as for a wild guess
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self._key)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _route(scope) in OPEN_PATHS or self.allowed(dict(scope["headers"])):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(error_body(401, "unauthorized", "missing or wrong API key: send the header "
                                                                "'Authorization: Bearer <key>'"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _route(scope: dict[str, Any]) -> str:
    """The path inside the app: Serve passes the app's route prefix as ``root_path``."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def check_image(data: str, *, max_chars: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) of a base64 image: 400 bad base64, 415 not an image, 413 too large (checked before decoding)."""
    if len(data) > max_chars:
        raise HTTPError(413, f"image is about {len(data) * 3 // 4} bytes ({len(data)} base64 characters); the limit "
                             f"is {max_chars * 3 // 4} bytes", "input_too_long")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "image is not valid base64", "invalid_base64") from None
    not_an_image = HTTPError(415, "image is not an image PIL can read (send PNG or JPEG bytes, base64)",
                             "not_an_image")
    try:
        img = Image.open(io.BytesIO(raw))  # reads the header only
    except Image.DecompressionBombError:  # PIL's own ceiling, far above ours
        raise HTTPError(413, f"image is larger than the limit of {max_pixels} pixels", "input_too_long") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise not_an_image from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise HTTPError(413, f"image is {width}x{height} pixels; the limit is {max_pixels}", "input_too_long")
        try:
            img.load()
        except (OSError, ValueError, Image.DecompressionBombError):  # truncated or corrupt pixel data
            raise not_an_image from None
    return width, height
