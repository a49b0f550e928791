"""Browser-facing defences: the Content-Security-Policy of every HTTP answer, and the
Origin check of WebSocket upgrades (docs/security.md lists what each one stops).

The page's own inline blocks (static/verify.html has one script and one style) are allowed
by their SHA-256, computed when the app is built, so the policy never needs
``'unsafe-inline'``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server.wslink import Receive, Send

ASGIApp = Any
_INLINE = re.compile(r"<(script|style)(?:\s[^>]*)?>(.*?)</\1>", re.DOTALL | re.IGNORECASE)


def inline_hashes(pages: Iterable[Path]) -> dict[str, list[str]]:
    """``'sha256-…'`` of every inline ``<script>`` and ``<style>`` body, by tag."""
    found: dict[str, list[str]] = {"script": [], "style": []}
    for page in pages:
        for tag, body in _INLINE.findall(page.read_text()):
            if not body.strip():
                continue  # <script src=...></script>: no inline code
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            found[tag.lower()].append(f"'sha256-{digest}'")
    return found


def content_security_policy(static: Path) -> str:
    hashes = inline_hashes(sorted(static.glob("*.html")))
    return "; ".join([
        "default-src 'self'",
        " ".join(["script-src 'self'", *hashes["script"]]),
        " ".join(["style-src 'self'", *hashes["style"]]),
        "img-src 'self' data:",
        # 'self' covers ws:// and wss:// of the page's own host (CSP level 3).
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])


class SecurityHeaders:
    """ASGI middleware: the policy and its companions on every HTTP response."""

    def __init__(self, app: ASGIApp, policy: str) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", policy.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *self.headers]
            await send(message)

        await self.app(scope, receive, with_headers)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def origin_allowed(scope: dict[str, Any], allowed: Iterable[str]) -> bool:
    """Whether a WebSocket upgrade may go on: no Origin header (not a browser), the page's
    own origin (the host the request was sent to), or one of ``allowed`` ("*": any)."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    extra = set(allowed)
    if "*" in extra or origin in extra:
        return True
    host = _header(scope, b"host")
    parts = urlsplit(origin)
    return (
        host is not None and parts.scheme in ("http", "https")
        and parts.netloc.lower() == host.lower()
    )


def origin_checked(endpoint: ASGIApp) -> ASGIApp:
    """``endpoint`` behind the Origin check: a refused upgrade gets HTTP 403 and never
    reaches the endpoint."""

    async def guarded(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        settings = scope["app"].state.services.settings
        if not origin_allowed(scope, settings.allowed_origins):
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        await endpoint(scope, receive, send)

    return guarded
