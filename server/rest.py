"""Plumbing shared by the HTTP routes: one error funnel, admin auth, bounded JSON bodies.

Every handler is wrapped by :func:`endpoint`, the one place where a :class:`StakeProError`
becomes a ``{"code", "message"}`` body with its status, and where a Redis or PostgreSQL
failure becomes 503 ``UNAVAILABLE``. Routes accept every method and refuse the wrong ones
here, so even a 405 carries a protocol body instead of Starlette's plain text.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

import asyncpg
import structlog
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from games.errors import (
    BadMessage,
    Forbidden,
    NotFound,
    RateLimited,
    StakeProError,
    Unauthorized,
    Unavailable,
)
from server.auth import admin_ok
from server.limits import Rate, client_address, retry_after_header
from server.services import Services

log = structlog.get_logger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

MAX_BODY = 64 * 1024
#: Largest PostgreSQL bigint: ids past it cannot exist.
MAX_BIGINT = 2**63 - 1
ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

#: What a lost or failing dependency raises. asyncpg errors include SQL errors too: those
#: are bugs, logged with their traceback, and the request changed nothing either way.
DEPENDENCY_ERRORS = (
    RedisError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

_DECIMAL_ID = re.compile(r"[0-9]{1,19}", re.ASCII)


class BodyTooLarge(BadMessage):
    http_status = 413


class MethodNotAllowed(BadMessage):
    http_status = 405


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def error_response(request: Request, exc: StakeProError) -> JSONResponse:
    services_of(request).metrics.errors.labels(exc.code).inc()
    headers = retry_after_header(exc) if isinstance(exc, RateLimited) else None
    return JSONResponse({"code": exc.code, "message": exc.message}, status_code=exc.http_status,
                        headers=headers)


async def per_address(request: Request, rate: Rate, what: str) -> None:
    """Take one request of ``rate`` for the client's address, or raise RateLimited."""
    await services_of(request).limits.check(rate, client_address(request.scope), what)


def endpoint(path: str, *methods: str, admin: bool = False) -> Callable[[Handler], Route]:
    """Make a Route of a handler; it answers protocol errors and 503s itself."""
    allowed = {*methods, "HEAD"} if "GET" in methods else set(methods)

    def wrap(handler: Handler) -> Route:
        @functools.wraps(handler)
        async def handle(request: Request) -> Response:
            try:
                if request.method not in allowed:
                    raise MethodNotAllowed(f"{path} takes {' or '.join(methods)}")
                if admin:
                    settings = services_of(request).settings
                    if not settings.admin_open:
                        raise Forbidden("the admin API is closed: ADMIN_TOKEN is not set")
                    # Before the token check: guessing tokens is limited too.
                    await per_address(request, Rate(
                        "admin", settings.admin_per_minute / 60, settings.admin_burst,
                    ), "admin requests from this address")
                    if not admin_ok(request.headers.get("authorization"), settings.admin_token):
                        raise Unauthorized("this route needs Authorization: Bearer <ADMIN_TOKEN>")
                return await handler(request)
            except StakeProError as exc:
                return error_response(request, exc)
            except DEPENDENCY_ERRORS as exc:
                log.warning("http_dependency_failed", path=request.url.path, exc_info=exc)
                return error_response(
                    request, Unavailable("a dependency (Redis or PostgreSQL) is unavailable")
                )

        return Route(path, handle, methods=ALL_METHODS)

    return wrap


async def read_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, at most :data:`MAX_BODY` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise BodyTooLarge(f"the body is larger than {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BodyTooLarge(f"the body is larger than {MAX_BODY} bytes")
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BadMessage("the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise BadMessage("the body must be a JSON object")
    return value


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def json_int(body: Mapping[str, Any], key: str) -> int | None:
    """An optional integer field (``null`` is absent); ``true`` is not an integer."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadMessage(f"{key} must be an integer")
    return value


def json_text(body: Mapping[str, Any], key: str, max_len: int) -> str | None:
    """An optional string field of 1 to ``max_len`` printable characters."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadMessage(f"{key} must be a string")
    if not 1 <= len(value) <= max_len or not value.isprintable():
        raise BadMessage(f"{key} must be 1 to {max_len} printable characters")
    return value


def path_id(request: Request, name: str) -> int:
    """A decimal id from the path; anything else names nothing (404)."""
    text = request.path_params[name]
    if not isinstance(text, str) or _DECIMAL_ID.fullmatch(text) is None:
        raise NotFound(f"no such {name}")
    value = int(text)
    if not 1 <= value <= MAX_BIGINT:
        raise NotFound(f"no such {name}")
    return value
