"""The HTTP API over a real server, Redis and PostgreSQL (PROTOCOL.md, "HTTP")."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from games import dice, seeds
from plumbing.settings import Settings
from server.api import operator_network
from tests import vectors as known_answers
from tests.conftest import ADMIN_TOKEN, RedisServer, serve
from tests.helpers import Api

ZERO = {"USDT": "0.00", "BTC": "0.00000000"}


@pytest_asyncio.fixture(scope="module")
async def anon(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """A client without the admin header."""
    async with httpx.AsyncClient(base_url=api.http.base_url) as client:
        yield client


@pytest_asyncio.fixture(scope="module")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


def ok(r: httpx.Response) -> Any:
    """The body of a 200 answer."""
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"code", "message"}, body
    assert isinstance(body["message"], str) and body["message"]
    return str(body["code"])


async def user_count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM users"))


# -- demo ---------------------------------------------------------------------------------


async def test_demo_player_is_credited_playable_and_under_the_demo_chain(
    api: Api, anon: httpx.AsyncClient, settings: Settings
) -> None:
    body = ok(await anon.post("/api/demo"))
    assert set(body) == {"user_id", "token"}
    view = await api.user(body["user_id"])
    assert view["role"] == "player"
    assert view["balances"] == settings.demo_credit
    assert view["name"] and view["name"] != "demo-agent"

    chain = []
    parent = view["parent_id"]
    while parent is not None:
        up = await api.user(parent)
        chain.append((up["role"], up["name"], up["commission_bps"]))
        parent = up["parent_id"]
    assert chain == [
        ("agent", "demo-agent", 50),
        ("master", "demo-master", 30),
        ("super_master", "demo-super-master", 20),
    ]

    async with api.play(body["token"]) as p:
        assert p.welcome["balances"] == settings.demo_credit
        result = await p.bet("1.00", "50.00", id="demo-1")
        assert result["type"] == "bet_result", result


async def test_concurrent_demos_share_one_chain(api: Api, anon: httpx.AsyncClient) -> None:
    replies = await asyncio.gather(*(anon.post("/api/demo") for _ in range(8)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    ids = {r.json()["user_id"] for r in replies}
    assert len(ids) == 8
    parents = {(await api.user(uid))["parent_id"] for uid in ids}
    assert len(parents) == 1


async def test_wrong_method_and_unknown_api_path(anon: httpx.AsyncClient) -> None:
    r = await anon.get("/api/demo")
    assert r.status_code == 405 and error_of(r) == "BAD_MESSAGE"
    r = await anon.get("/api/nothing-here")
    assert r.status_code == 404 and error_of(r) == "NOT_FOUND"


# -- admin auth and user creation -----------------------------------------------------------


async def test_admin_routes_need_the_admin_token(
    api: Api, anon: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    before = await user_count(db)
    uid, _ = await api.player()
    deposit = {"user_id": uid, "currency": "USDT", "amount": "1.00", "idempotency_key": "a"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
        r = await anon.post("/api/admin/users", json={"role": "player"}, headers=headers)
        assert r.status_code == 401 and error_of(r) == "UNAUTHORIZED"
        r = await anon.post("/api/admin/deposits", json=deposit, headers=headers)
        assert r.status_code == 401 and error_of(r) == "UNAUTHORIZED"
        r = await anon.get(f"/api/admin/users/{uid}", headers=headers)
        assert r.status_code == 401 and error_of(r) == "UNAUTHORIZED"
    assert await user_count(db) == before + 1
    assert (await api.user(uid))["balances"] == ZERO


async def test_create_a_full_chain(api: Api) -> None:
    sm, _ = await api.create_user("super_master", commission_bps=20, name="Top Dog")
    m, _ = await api.create_user("master", parent_id=sm, commission_bps=30)
    a, _ = await api.create_user("agent", parent_id=m, commission_bps=10000)
    p, token = await api.create_user("player", parent_id=a)
    lone, _ = await api.create_user("player", parent_id=None)
    views = [await api.user(u) for u in (sm, m, a, p, lone)]
    assert [(v["role"], v["parent_id"]) for v in views] == [
        ("super_master", None), ("master", sm), ("agent", m), ("player", a), ("player", None),
    ]
    assert views[0]["name"] == "Top Dog" and views[3]["name"].startswith("player-")
    assert [v["commission_bps"] for v in views] == [20, 30, 10000, 0, 0]
    assert len(token) >= 32


#: Bodies refused with BAD_MESSAGE, given a master's and a super master's ids.
BAD_USERS: list[Callable[[int, int], dict[str, Any]]] = [
    lambda m, s: {},
    lambda m, s: {"role": "admin"},
    lambda m, s: {"role": 1},
    lambda m, s: {"role": "Player"},
    lambda m, s: {"role": "player", "parent_id": m},
    lambda m, s: {"role": "agent", "parent_id": s},
    lambda m, s: {"role": "super_master", "parent_id": s},
    lambda m, s: {"role": "player", "parent_id": True},
    lambda m, s: {"role": "player", "parent_id": str(m)},
    lambda m, s: {"role": "player", "parent_id": float(m)},
    lambda m, s: {"role": "player", "parent_id": 2**62},
    lambda m, s: {"role": "player", "parent_id": 2**70},
    lambda m, s: {"role": "player", "parent_id": -1},
    lambda m, s: {"role": "agent", "commission_bps": 10001},
    lambda m, s: {"role": "agent", "commission_bps": -1},
    lambda m, s: {"role": "agent", "commission_bps": 1.5},
    lambda m, s: {"role": "agent", "commission_bps": "5"},
    lambda m, s: {"role": "agent", "commission_bps": False},
    lambda m, s: {"role": "player", "name": "x" * 65},
    lambda m, s: {"role": "player", "name": ""},
    lambda m, s: {"role": "player", "name": "tab\there"},
    lambda m, s: {"role": "player", "name": 7},
]


@pytest.mark.parametrize("make_body", BAD_USERS)
async def test_user_creation_is_validated_strictly(
    api: Api, db: asyncpg.Connection, make_body: Callable[[int, int], dict[str, Any]]
) -> None:
    master, _ = await api.create_user("master")
    sm, _ = await api.create_user("super_master")
    before = await user_count(db)
    r = await api.http.post("/api/admin/users", json=make_body(master, sm))
    assert r.status_code == 400, r.text
    assert error_of(r) == "BAD_MESSAGE"
    assert await user_count(db) == before


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (b'"player"', 400),
        (b'{"role": NaN}', 400),
        (b"\xff\xfe", 400),
        (b"", 400),
        (b'{"role": "player", "name": "' + b"x" * (65 * 1024) + b'"}', 413),
    ],
)
async def test_bodies_must_be_small_json_objects(
    api: Api, db: asyncpg.Connection, content: bytes, status: int
) -> None:
    before = await user_count(db)
    r = await api.http.post(
        "/api/admin/users", content=content, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert error_of(r) == "BAD_MESSAGE"
    assert await user_count(db) == before


# -- deposits and the user view -------------------------------------------------------------


async def test_deposit_credits_once_per_key(api: Api) -> None:
    uid, _ = await api.player()
    key = uuid.uuid4().hex
    body = {"user_id": uid, "currency": "USDT", "amount": "10.5", "idempotency_key": key}
    first = await api.http.post("/api/admin/deposits", json=body)
    again = await api.http.post("/api/admin/deposits", json=body)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.json() == again.json() == {"balance": "10.50"}

    for other in ({"amount": "11.00"}, {"currency": "BTC", "amount": "10.5"}):
        r = await api.http.post("/api/admin/deposits", json={**body, **other})
        assert r.status_code == 409 and error_of(r) == "IDEMPOTENCY_CONFLICT"
    other_user, _ = await api.player()
    r = await api.http.post("/api/admin/deposits", json={**body, "user_id": other_user})
    assert r.status_code == 409 and error_of(r) == "IDEMPOTENCY_CONFLICT"

    assert await api.deposit(uid, "0.00000005", "BTC") == "0.00000005"
    assert (await api.user(uid))["balances"] == {"USDT": "10.50", "BTC": "0.00000005"}
    assert (await api.user(other_user))["balances"] == ZERO


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"user_id": 2**62}, 404, "NOT_FOUND"),
        ({"user_id": 2**70}, 404, "NOT_FOUND"),
        ({"user_id": True}, 400, "BAD_MESSAGE"),
        ({"user_id": "USER"}, 400, "BAD_MESSAGE"),
        ({"user_id": None}, 400, "BAD_MESSAGE"),
        ({"currency": "DOGE"}, 400, "UNKNOWN_CURRENCY"),
        ({"currency": "usdt"}, 400, "UNKNOWN_CURRENCY"),
        ({"currency": None}, 400, "BAD_MESSAGE"),
        ({"amount": "1.001"}, 400, "INVALID_AMOUNT"),
        ({"amount": "0"}, 400, "INVALID_AMOUNT"),
        ({"amount": "-1.00"}, 400, "INVALID_AMOUNT"),
        ({"amount": "1e3"}, 400, "INVALID_AMOUNT"),
        ({"amount": "99999999999999999999"}, 400, "INVALID_AMOUNT"),
        ({"amount": 1.5}, 400, "BAD_MESSAGE"),
        ({"amount": 2}, 400, "BAD_MESSAGE"),
        ({"amount": 1.5, "currency": "DOGE"}, 400, "BAD_MESSAGE"),
        ({"idempotency_key": ""}, 400, "BAD_MESSAGE"),
        ({"idempotency_key": "k" * 129}, 400, "BAD_MESSAGE"),
        ({"idempotency_key": "nul\x00"}, 400, "BAD_MESSAGE"),
        ({"idempotency_key": 5}, 400, "BAD_MESSAGE"),
        ({"idempotency_key": None}, 400, "BAD_MESSAGE"),
    ],
)
async def test_deposit_errors_change_nothing(
    api: Api, fields: dict[str, Any], status: int, code: str
) -> None:
    uid, _ = await api.player()
    body = {"user_id": uid, "currency": "USDT", "amount": "1.00",
            "idempotency_key": uuid.uuid4().hex, **fields}
    if body["user_id"] == "USER":
        body["user_id"] = str(uid)
    r = await api.http.post("/api/admin/deposits", json=body)
    assert r.status_code == status, r.text
    assert error_of(r) == code
    assert (await api.user(uid))["balances"] == ZERO


async def test_user_view_lists_every_currency(api: Api) -> None:
    uid, _ = await api.create_user("agent", name="Empty Agent")
    view = await api.user(uid)
    assert view == {
        "user_id": uid, "role": "agent", "name": "Empty Agent", "parent_id": None,
        "commission_bps": 0, "balances": ZERO, "commission_earned": ZERO,
    }


@pytest.mark.parametrize("path", ["0", "-1", "abc", "1.0", str(2**63), "99999999999999"])
async def test_user_view_of_nobody_is_404(api: Api, path: str) -> None:
    r = await api.http.get(f"/api/admin/users/{path}")
    assert r.status_code == 404 and error_of(r) == "NOT_FOUND"


async def test_commission_earned_sums_commission_rows_only(
    api: Api, db: asyncpg.Connection
) -> None:
    uid, _ = await api.create_user("agent")
    tag = uuid.uuid4().hex
    rows = [("USDT", 5, "commission"), ("USDT", 7, "commission"), ("BTC", 3, "commission"),
            ("USDT", 1000, "deposit")]
    await db.executemany(
        "INSERT INTO ledger (entry_id, user_id, currency, delta, kind) VALUES ($1, $2, $3, $4, $5)",
        [(f"test-{tag}-{i}", uid, c, d, k) for i, (c, d, k) in enumerate(rows)],
    )
    try:
        view = await api.user(uid)
        assert view["commission_earned"] == {"USDT": "0.12", "BTC": "0.00000003"}
    finally:
        await db.execute("DELETE FROM ledger WHERE entry_id LIKE $1", f"test-{tag}-%")


# -- bets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bet_id", ["no-such-bet", "0-0", "x" * 200, "%00"])
async def test_unknown_bet_is_404(anon: httpx.AsyncClient, bet_id: str) -> None:
    r = await anon.get(f"/api/bets/{bet_id}")
    assert r.status_code == 404 and error_of(r) == "NOT_FOUND"


async def test_bet_view_shows_the_server_seed_only_after_reveal(
    api: Api, anon: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A row written here directly, so the view is checked apart from the persister."""
    uid, _ = await api.player(name="Viewed Player")
    server_seed = seeds.new_server_seed()
    pair_id = await db.fetchval(
        "INSERT INTO seed_pairs (user_id, server_seed, server_seed_hash, client_seed)"
        " VALUES ($1, $2, $3, 'my-seed') RETURNING pair_id",
        uid, server_seed, seeds.server_seed_hash(server_seed),
    )
    roll = dice.roll(server_seed, "my-seed", 7)
    win = roll < 5000
    bet_id = f"test-{uuid.uuid4().hex}"
    await db.execute(
        "INSERT INTO bets (bet_id, user_id, pair_id, currency, amount, payout, roll, target,"
        " direction, nonce, multiplier, server_seed_hash, client_seed, balance_after,"
        " created_at) VALUES ($1, $2, $3, 'USDT', 250, $4, $5, 5000, 'under', 7, 19801, $6,"
        " 'my-seed', 1000, to_timestamp(1700000000.123))",
        bet_id, uid, pair_id, 495 if win else 0, roll, seeds.server_seed_hash(server_seed),
    )
    try:
        r = await anon.get(f"/api/bets/{bet_id}")
        assert ok(r) == {
            "bet_id": bet_id, "player": "Viewed Player", "currency": "USDT",
            "amount": "2.50", "payout": "4.95" if win else "0.00",
            "roll": dice.format_hundredths(roll), "target": "50.00", "direction": "under",
            "win": win, "multiplier": "1.9801", "nonce": 7,
            "server_seed_hash": seeds.server_seed_hash(server_seed), "client_seed": "my-seed",
            "created_at": 1700000000123,
        }
        assert server_seed not in r.text

        await db.execute("UPDATE seed_pairs SET revealed_at = now() WHERE pair_id = $1", pair_id)
        revealed = (await anon.get(f"/api/bets/{bet_id}")).json()
        assert revealed["server_seed"] == server_seed
        assert dice.format_hundredths(dice.roll(server_seed, "my-seed", 7)) == revealed["roll"]
    finally:
        await db.execute("DELETE FROM bets WHERE bet_id = $1", bet_id)
        await db.execute("DELETE FROM seed_pairs WHERE pair_id = $1", pair_id)


async def poll(client: httpx.AsyncClient, path: str, ready: Callable[[Any], bool]) -> Any:
    """GET ``path`` until it answers 200 with a body ``ready`` accepts (10 s at most)."""
    async with asyncio.timeout(10):
        while True:
            r = await client.get(path)
            if r.status_code == 200 and ready(r.json()):
                return r.json()
            await asyncio.sleep(0.1)


async def test_a_played_bet_is_stored_then_revealed(api: Api, anon: httpx.AsyncClient) -> None:
    _, token = await api.player(deposit="50.00")
    async with api.play(token) as p:
        result = await p.bet("20.00", "50.00", "over", id="stored")
        bet_id = result["bet_id"]
        stored = await poll(anon, f"/api/bets/{bet_id}", lambda b: True)
        assert "server_seed" not in stored
        for key in ("roll", "win", "multiplier", "payout", "nonce", "server_seed_hash",
                    "client_seed"):
            assert stored[key] == result[key], key
        assert "user_id" not in stored and stored["amount"] == "20.00"
        assert stored["target"] == "50.00" and stored["direction"] == "over"
        rotated = await p.request({"type": "rotate_seed", "id": "r", "client_seed": "next"})
    seed = rotated["revealed"]["server_seed"]
    shown = await poll(anon, f"/api/bets/{bet_id}", lambda b: "server_seed" in b)
    assert shown["server_seed"] == seed


# -- limits -----------------------------------------------------------------------------------


async def test_limits_are_the_ones_bets_are_held_to(
    api: Api, anon: httpx.AsyncClient, settings: Settings
) -> None:
    body = ok(await anon.get("/api/limits"))
    assert set(body["currencies"]) == set(settings.currencies)
    assert body["currencies"]["USDT"] == {"decimals": 2, "min_bet": "0.01",
                                          "max_bet": "10000.00", "max_profit": "100000.00"}
    assert body["currencies"]["BTC"]["max_bet"] == "1.00000000"
    usdt = body["currencies"]["USDT"]
    _, token = await api.player(deposit="20000.00")
    async with api.play(token) as p:
        at_max = await p.bet(usdt["max_bet"], "50.00")
        over = await p.bet("10000.01", "50.00")
    assert at_max["type"] == "bet_result"
    assert over["type"] == "error" and over["code"] == "BET_LIMIT"


# -- verify -----------------------------------------------------------------------------------


VECTOR_ROLLS = known_answers.load()["rolls"]


@pytest.mark.parametrize("vector", VECTOR_ROLLS, ids=[str(v["nonce"]) for v in VECTOR_ROLLS])
async def test_verify_reproduces_the_shared_vectors(
    anon: httpx.AsyncClient, vector: dict[str, Any]
) -> None:
    body = ok(await anon.get("/api/verify", params={
        "server_seed": vector["server_seed"], "client_seed": vector["client_seed"],
        "nonce": str(vector["nonce"]),
    }))
    assert body["roll"] == vector["roll"] and body["hmac"] == vector["hmac"]
    assert body["windows"] == vector["windows_tried"]


def test_the_vectors_include_three_windows() -> None:
    assert any(v["nonce"] == 60559 and len(v["windows_tried"]) == 3 for v in VECTOR_ROLLS)


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"client_seed": "c", "nonce": "1"}, "BAD_MESSAGE"),
        ({"server_seed": "s", "nonce": "1"}, "BAD_MESSAGE"),
        ({"server_seed": "s", "client_seed": "c"}, "BAD_MESSAGE"),
        ({"server_seed": "s", "client_seed": "c", "nonce": "-1"}, "BAD_MESSAGE"),
        ({"server_seed": "s", "client_seed": "c", "nonce": "1.0"}, "BAD_MESSAGE"),
        ({"server_seed": "s", "client_seed": "c", "nonce": "x"}, "BAD_MESSAGE"),
        ({"server_seed": "s", "client_seed": "c", "nonce": str(2**63)}, "BAD_MESSAGE"),
        ({"server_seed": "s", "client_seed": "c", "nonce": ""}, "BAD_MESSAGE"),
        ({"server_seed": "", "client_seed": "c", "nonce": "1"}, "INVALID_SEED"),
        ({"server_seed": "s" * 129, "client_seed": "c", "nonce": "1"}, "INVALID_SEED"),
        ({"server_seed": "s", "client_seed": "", "nonce": "1"}, "INVALID_SEED"),
        ({"server_seed": "s", "client_seed": "a b", "nonce": "1"}, "INVALID_SEED"),
        ({"server_seed": "s", "client_seed": "c" * 65, "nonce": "1"}, "INVALID_SEED"),
    ],
)
async def test_verify_validation(
    anon: httpx.AsyncClient, params: dict[str, str], code: str
) -> None:
    r = await anon.get("/api/verify", params=params)
    assert r.status_code == 400, r.text
    assert error_of(r) == code


async def test_verify_accepts_the_largest_nonce(anon: httpx.AsyncClient) -> None:
    nonce = 2**63 - 1
    r = await anon.get("/api/verify",
                       params={"server_seed": "s", "client_seed": "c", "nonce": str(nonce)})
    assert r.status_code == 200
    assert r.json()["hmac"] == dice.hmac_hex("s", "c", nonce)


# -- health and metrics -------------------------------------------------------------------------


async def test_healthz(anon: httpx.AsyncClient) -> None:
    r = await anon.get("/healthz")
    assert r.status_code == 200 and r.json() == {"redis": "ok", "postgres": "ok"}


async def test_metrics_from_loopback(anon: httpx.AsyncClient) -> None:
    async def not_found_errors() -> float:
        r = await anon.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        for name in ("stakepro_bets_total", "stakepro_errors_total", "stakepro_bet_seconds",
                     "stakepro_open_sockets"):
            assert name in r.text
        found = [line.rsplit(" ", 1)[1] for line in r.text.splitlines()
                 if line.startswith('stakepro_errors_total{code="NOT_FOUND"}')]
        return float(found[0]) if found else 0.0

    before = await not_found_errors()
    assert (await anon.get("/api/bets/none")).status_code == 404
    assert await not_found_errors() == before + 1  # this request's error, counted once


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("10.1.2.3", True),
        ("172.16.0.1", True), ("172.31.255.255", True), ("192.168.1.1", True),
        ("::ffff:10.0.0.1", True), ("172.32.0.1", False), ("8.8.8.8", False),
        ("2001:db8::1", False), ("169.254.1.1", False), ("testclient", False), (None, False),
    ],
)
def test_metrics_are_for_the_operator_network(host: str | None, allowed: bool) -> None:
    assert operator_network(host) is allowed


# -- a server of its own: demo off, dependencies down ------------------------------------------


async def test_demo_off_and_unavailable_dependencies(
    settings: Settings, own_redis: RedisServer
) -> None:
    redis = own_redis
    own = settings.model_copy(update={"redis_url": redis.url, "demo_mode": False})
    async with serve(own) as served:
        async with Api(served.address, ADMIN_TOKEN) as api:
            r = await api.http.post("/api/demo")
            assert r.status_code == 404 and error_of(r) == "NOT_FOUND"
            uid, _ = await api.player()
            assert (await api.http.get("/healthz")).status_code == 200

            redis.stop(kill=True)
            r = await api.http.get("/healthz")
            assert r.status_code == 503
            assert r.json()["redis"] == "error" and r.json()["postgres"] == "ok"
            assert r.json()["code"] == "UNAVAILABLE"
            deposit = {"user_id": uid, "currency": "USDT", "amount": "2.00",
                       "idempotency_key": uuid.uuid4().hex}
            r = await api.http.post("/api/admin/deposits", json=deposit)
            assert r.status_code == 503 and error_of(r) == "UNAVAILABLE"
            r = await api.http.get(f"/api/admin/users/{uid}")
            assert r.status_code == 503 and error_of(r) == "UNAVAILABLE"

            redis.start()
            # Nothing was credited; resending the same key completes the deposit once Redis
            # answers again (a first attempt may still meet a connection of the old Redis).
            async with asyncio.timeout(10):
                while True:
                    r = await api.http.post("/api/admin/deposits", json=deposit)
                    if r.status_code == 200:
                        break
                    assert r.status_code == 503 and error_of(r) == "UNAVAILABLE"
                    await asyncio.sleep(0.1)
            assert r.json() == {"balance": "2.00"}
            assert (await api.user(uid))["balances"]["USDT"] == "2.00"
