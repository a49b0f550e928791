"""What a browser is told and checked for (server/security.py): the page's
Content-Security-Policy, and the Origin of WebSocket upgrades against an allow-list."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from plumbing.settings import Settings
from tests.conftest import serve
from tests.helpers import Api


def _directives(policy: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (x.strip() for x in policy.split(";")) if d}


@pytest.mark.parametrize("path", ["/", "/verify.html", "/api/limits"])
async def test_every_answer_carries_a_strict_policy(api: Api, path: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://{api.address}") as http:
        r = await http.get(path)
    assert r.status_code == 200
    policy = r.headers["content-security-policy"]
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "*" not in policy
    d = _directives(policy)
    assert d["default-src"] == ["'self'"] and d["object-src"] == ["'none'"]
    assert d["frame-ancestors"] == ["'none'"] and d["connect-src"] == ["'self'"]
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_the_policy_allows_exactly_the_pages_inline_blocks(api: Api) -> None:
    async with httpx.AsyncClient(base_url=f"http://{api.address}") as http:
        r = await http.get("/verify.html")
    d = _directives(r.headers["content-security-policy"])
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", r.text, re.DOTALL)
        assert bodies, f"verify.html has an inline {tag}"
        for body in bodies:
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in d[directive]
    # A changed block would not run: its hash is not in the policy.
    changed = base64.b64encode(hashlib.sha256(b"alert(1)").digest()).decode()
    assert f"'sha256-{changed}'" not in d["script-src"]


async def _opens(url: str, origin: str | None) -> bool:
    headers = {"Origin": origin} if origin is not None else {}
    try:
        async with connect(url, additional_headers=headers, compression=None):
            return True
    except InvalidStatus as refused:
        assert refused.response.status_code == 403
        return False


@pytest.mark.parametrize("path", ["/ws/play", "/ws/feed"])
async def test_websocket_upgrades_check_the_origin(api: Api, path: str) -> None:
    url = f"ws://{api.address}{path}"
    assert await _opens(url, None)  # not a browser: no Origin to check
    assert await _opens(url, f"http://{api.address}")  # the page's own origin
    assert await _opens(url, f"https://{api.address}")  # the same host behind TLS
    for foreign in ("http://evil.example", f"http://{api.address}.evil.example",
                    "null", f"ftp://{api.address}", "http://127.0.0.1:1"):
        assert not await _opens(url, foreign), foreign


async def test_the_allow_list_adds_origins(settings: Settings) -> None:
    own = settings.model_copy(update={"key_prefix": f"o{uuid.uuid4().hex[:6]}",
                                      "allowed_origins": ["https://play.example"]})
    async with serve(own) as served:
        address = served.address
        url = f"ws://{address}/ws/play"
        assert await _opens(url, "https://play.example")
        assert not await _opens(url, "https://other.example")
        assert await _opens(url, f"http://{address}")
