"""The HTTP API of PROTOCOL.md ("HTTP"): public routes here, admin ones in server/admin.py.

Every route answers errors as ``{"code", "message"}`` (server/rest.py); an unknown path
under ``/api/`` is 404 ``NOT_FOUND`` rather than the static mount's plain-text 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from games import dice, seeds
from games.errors import BadMessage, Forbidden, InvalidSeed, NotFound
from games.money import format_amount, parse_amount
from plumbing.settings import Settings
from server import admin, users
from server.limits import Rate
from server.rest import ALL_METHODS, MAX_BIGINT, endpoint, per_address, services_of
from server.services import Services

log = structlog.get_logger(__name__)

#: The demo chain above every demo player, head first: (role, name, commission_bps).
DEMO_CHAIN = (
    ("super_master", "demo-super-master", 20),
    ("master", "demo-master", 30),
    ("agent", "demo-agent", 50),
)
#: pg_advisory_xact_lock key serialising creation of the demo chain ("DEMO").
DEMO_LOCK = 0x44454D4F
MAX_SERVER_SEED = 128
MAX_BET_ID = 128
HEALTH_TIMEOUT_S = 1.0
#: How long /metrics waits for the workers' counters in Redis.
WORKER_STATS_TIMEOUT_S = 0.5
#: Who may read /metrics: loopback and the RFC 1918 private ranges.
OPERATOR_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NONCE = re.compile(r"[0-9]{1,19}", re.ASCII)


@endpoint("/api/demo", "POST")
async def demo(request: Request) -> Response:
    services = services_of(request)
    settings = services.settings
    if not settings.demo_mode:
        raise NotFound("demo mode is off")
    await per_address(request, Rate("demo", settings.demo_per_minute / 60, settings.demo_burst),
                      "demo players from this address")
    credits = [
        (currency, parse_amount(text, currency))
        for code, text in settings.demo_credit.items()
        if (currency := settings.currencies.get(code)) is not None
    ]
    async with services.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", DEMO_LOCK)
        parent_id: int | None = None
        for role, name, bps in DEMO_CHAIN:
            found = await conn.fetchval(
                "SELECT user_id FROM users WHERE role = $1 AND name = $2"
                " AND parent_id IS NOT DISTINCT FROM $3 ORDER BY user_id LIMIT 1",
                role,
                name,
                parent_id,
            )
            if found is None:
                # users.create is typed for Connection | Pool; a pool's proxy behaves alike.
                db = cast(asyncpg.Connection, conn)
                found = (await users.create(db, role, name, parent_id, bps))[0].user_id
            parent_id = int(found)
    player, token = await users.create(services.pool, "player", None, parent_id, 0)
    await services.wallet.mark_new(player.user_id)
    for currency, amount in credits:
        await services.wallet.deposit(
            player.user_id, currency, amount, f"demo:{player.user_id}:{currency.code}"
        )
    return JSONResponse({"user_id": player.user_id, "token": token})


@endpoint("/api/bets/{bet_id}", "GET")
async def bet_view(request: Request) -> Response:
    services = services_of(request)
    bet_id = request.path_params["bet_id"]
    if not 1 <= len(bet_id) <= MAX_BET_ID or not bet_id.isprintable():
        raise NotFound("no such bet")
    row = await services.pool.fetchrow(
        "SELECT b.bet_id, u.name, b.currency, b.amount, b.payout, b.roll,"
        " b.target, b.direction, b.multiplier, b.nonce, b.server_seed_hash, b.client_seed,"
        " b.created_at, CASE WHEN p.revealed_at IS NOT NULL THEN p.server_seed END AS seed"
        " FROM bets b LEFT JOIN users u ON u.user_id = b.user_id"
        " LEFT JOIN seed_pairs p ON p.pair_id = b.pair_id WHERE b.bet_id = $1",
        bet_id,
    )
    if row is None:
        raise NotFound("no such bet (yet: a settled bet is stored within a few seconds)")
    spec = services.settings.currencies.get(row["currency"])

    def money(minor: int) -> str:
        return format_amount(minor, spec) if spec is not None else str(minor)

    view: dict[str, Any] = {
        "bet_id": row["bet_id"],
        # Public: the display name only, as in the feed (never the user id).
        "player": row["name"],
        "currency": row["currency"],
        "amount": money(row["amount"]),
        "payout": money(row["payout"]),
        "roll": dice.format_hundredths(row["roll"]),
        "target": dice.format_hundredths(row["target"]),
        "direction": row["direction"],
        "win": row["payout"] > 0,
        "multiplier": dice.format_multiplier(row["multiplier"]),
        "nonce": row["nonce"],
        "server_seed_hash": row["server_seed_hash"],
        "client_seed": row["client_seed"],
        "created_at": (row["created_at"] - _EPOCH) // timedelta(milliseconds=1),
    }
    if row["seed"] is not None:
        view["server_seed"] = row["seed"]
    return JSONResponse(view)


@endpoint("/api/limits", "GET")
async def limits(request: Request) -> Response:
    """Every currency's decimals and per-bet limits, as amounts (public: the page shows them
    and checks a bet against them before sending it)."""
    currencies = services_of(request).settings.currencies
    return JSONResponse({"currencies": {
        code: {"decimals": c.decimals, "min_bet": format_amount(c.min_bet, c),
               "max_bet": format_amount(c.max_bet, c),
               "max_profit": format_amount(c.max_profit, c)}
        for code, c in currencies.items()
    }})


@endpoint("/api/verify", "GET")
async def verify(request: Request) -> Response:
    query = request.query_params
    server_seed = query.get("server_seed")
    client_seed = query.get("client_seed")
    nonce_text = query.get("nonce")
    if server_seed is None or client_seed is None or nonce_text is None:
        raise BadMessage("server_seed, client_seed and nonce are required")
    if _NONCE.fullmatch(nonce_text) is None or int(nonce_text) > MAX_BIGINT:
        raise BadMessage(f"nonce must be a decimal integer from 0 to {MAX_BIGINT}")
    if not 1 <= len(server_seed) <= MAX_SERVER_SEED:
        raise InvalidSeed(f"server_seed must be 1 to {MAX_SERVER_SEED} characters")
    seeds.parse_client_seed(client_seed)
    h = dice.hmac_hex(server_seed, client_seed, int(nonce_text))
    roll, windows = dice.roll_from_hmac(h)
    return JSONResponse(
        {
            "roll": dice.format_hundredths(roll),
            "hmac": h,
            "windows": windows,
            "server_seed_hash": seeds.server_seed_hash(server_seed),
        }
    )


async def _probe(name: str, check: Callable[[], Awaitable[Any]]) -> str:
    try:
        await asyncio.wait_for(check(), HEALTH_TIMEOUT_S)
    except Exception as exc:  # any failure, timeout included, means "not healthy"
        log.warning("health_check_failed", dependency=name, error=repr(exc))
        return "error"
    return "ok"


@endpoint("/healthz", "GET")
async def healthz(request: Request) -> Response:
    services = services_of(request)

    async def redis() -> None:
        await services.redis.ping()

    async def postgres() -> None:
        await services.pool.fetchval("SELECT 1")

    full: list[int] = []

    async def outbox() -> None:
        full.extend(await outbox_full(services))

    r, p, _ = await asyncio.gather(
        _probe("redis", redis), _probe("postgres", postgres), _probe("outbox", outbox)
    )
    # A ping can pass while bets go unanswered (a stuck pipeline, a hung connection of the
    # bet path): what players see is the truth.
    stalled = max(services.wallet.unanswered_for(), services.batcher.fast.stalled_for())
    body = {"redis": r, "postgres": p}
    if full:
        body["outbox"] = "full"
    if services.durability:  # reported, not failed: the deployment may accept it on purpose
        body["redis_durability"] = services.durability
    if stalled >= services.settings.health_stall_s:
        body["bets"] = "stalled"
    elif r == p == "ok" and not full:
        return JSONResponse(body)
    services.metrics.errors.labels("UNAVAILABLE").inc()
    failed = [f"{n} did not answer" for n, s in (("Redis", r), ("PostgreSQL", p)) if s != "ok"]
    if full:
        failed.append(f"the outbox of buckets {full} is at its limit: bets there are refused")
    if "bets" in body:
        failed.append(f"no bet or Redis call answered for {stalled:.1f}s")
    return JSONResponse(
        {**body, "code": "UNAVAILABLE", "message": "; ".join(failed)},
        status_code=503,
    )


async def outbox_full(services: Services) -> list[int]:
    """The buckets whose outbox is at OUTBOX_MAX_LEN (bets there are refused); sets the
    outbox gauges of /metrics on the way."""
    lengths = await services.wallet.outbox_lengths()
    cap = services.settings.outbox_max_len
    services.metrics.outbox_longest.set(max(lengths, default=0))
    full = [b for b, n in enumerate(lengths) if cap and n >= cap]
    services.metrics.outbox_full.set(len(full))
    return full


def operator_network(host: str | None) -> bool:
    """Whether a client address is loopback or RFC 1918 private (IPv4-mapped too)."""
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in OPERATOR_NETWORKS)


@endpoint("/metrics", "GET")
async def metrics(request: Request) -> Response:
    if not operator_network(request.client.host if request.client else None):
        raise Forbidden("/metrics is served to the operator network only")
    services = services_of(request)
    try:  # the workers' counters (telemetry: on failure the last ones read are shown)
        async with asyncio.timeout(WORKER_STATS_TIMEOUT_S):
            raw = await services.redis.hgetall(services.keys.worker_stats())
        services.metrics.worker_stats.update(raw)
    except (TimeoutError, RedisError, OSError):
        pass
    with contextlib.suppress(TimeoutError, RedisError, OSError):
        async with asyncio.timeout(WORKER_STATS_TIMEOUT_S):
            await outbox_full(services)
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@endpoint("/api/{rest:path}", *ALL_METHODS)
async def unknown(request: Request) -> Response:
    raise NotFound(f"no route {request.url.path}")


def routes(settings: Settings) -> list[BaseRoute]:
    """Every HTTP route; ``settings`` is read per request (services.settings) instead."""
    del settings
    return [demo, bet_view, limits, verify, healthz, metrics, *admin.ROUTES, unknown]
