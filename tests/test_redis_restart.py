"""Redis SIGKILLed under load and restarted, with its AOF (appendfsync always, the default).

Ten players bet on sockets of their own, a few bets in flight each, against a server with
its in-process persister; Redis is SIGKILLed mid-load and started again on the same port and
directory, so it reloads its AOF. Each client behaves as docs/protocol.md says a client does:
a bet answered UNAVAILABLE, or caught by a lost socket, is resent with the same id (with
backoff) until a ``bet_result`` comes back. Half the players keep their socket through the
restart (their bets in flight get UNAVAILABLE and are resent on it); the other half lose
their socket with bets in flight shortly before the kill and reconnect only after the
restart, so their resends must be answered from the idempotency records the AOF kept.
Afterwards, with the outbox drained and the server stopped:

1. every acknowledged bet is in ``bets`` exactly once, with the roll, payout, nonce, pair
   and balance the player was shown (zero acknowledged bets missing: with ``always`` no
   acknowledged write is lost, docs/durability.md), and nothing else is there;
2. no (server seed hash, nonce) was acknowledged under two bet ids, nor one settled bet to
   two client ids; a resend across the restart gets the original result back;
3. every player who bet after the restart had the pair rotated first: a new commitment, a
   low nonce, and a ``seed_rotated`` push with reason ``redis_restart`` that reveals the old
   pair;
4. ``python -m ops.audit`` passes, and still passes after ``python -m ops.rebuild``
   (``make rebuild-balances``, servers stopped), which must not change any balance.

A system of its own: its own redis-server, database and key prefix, so the audit and the
rebuild run unscoped, exactly as ``make audit`` / ``make rebuild-balances`` would.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from plumbing.keys import Keys
from plumbing.settings import Settings
from tests.conftest import ADMIN_TOKEN, RedisServer, serve
from tests.helpers import Api, eventually, minor, outbox_drained, tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PLAYERS = 10
IN_FLIGHT = 4  # bets in flight per socket
#: Half the players lose their socket at a random moment in this window (the seed of the
#: ``seeded`` fixture), the kill follows once the server settled their bets in flight.
LOAD_BEFORE_S = (1.5, 2.5)
LOAD_AFTER_S = 3.0  # load continues this long after Redis answers again
RESOLVE_S = 20.0  # a bet still unanswered this long after the load stopped is given up
REPLY_TIMEOUT_S = 10.0  # no reply on a live socket this long: resend
BETS = [("0.10", "50.00", "under"), ("0.25", "30.00", "over"), ("1.00", "49.50", "under"),
        ("0.05", "90.00", "under"), ("0.50", "75.00", "over")]


class Lost(Exception):
    """The socket went away (or never came) while a request waited on it."""


@dataclass(frozen=True, slots=True)
class Ack:
    """One ``bet_result`` as the client recorded it."""

    client_id: str
    user_id: int
    amount: str
    bet_id: str
    nonce: int
    server_seed_hash: str
    roll: str
    payout: str
    balance: str
    first_sent: float  # monotonic time the bet loop first tried to send the id
    written: float  # monotonic time a frame with the id was first written to a socket
    received: float  # monotonic time the result arrived
    seq: int  # position among the frames this client received
    attempts: int  # sends of this id (1 = no resend)


@dataclass(slots=True)
class Bettor:
    """One player: one socket (reconnected with backoff when lost), IN_FLIGHT bet loops."""

    address: str
    user_id: int
    token: str
    rng: random.Random
    acks: list[Ack] = field(default_factory=list)
    #: (seq, frame) of every seed_rotated push received.
    rotations: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    #: Results that came on a socket the client had already given up (see drop()).
    orphans: int = 0
    unresolved: list[str] = field(default_factory=list)
    unavailable: int = 0
    reconnects: int = 0
    ws: ClientConnection | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    #: client id -> when a frame with it was first written to a socket.
    written: dict[str, float] = field(default_factory=dict)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    closing: bool = False
    #: Cleared by drop(): the client stays away until the test sets it again.
    may_connect: asyncio.Event = field(default_factory=asyncio.Event)
    dropped_at: float = float("inf")
    #: Client ids written to the socket and unanswered when it was dropped.
    in_flight_at_drop: list[str] = field(default_factory=list)
    #: No new bet from this moment on (moved by the test); pending ones are given up at
    #: ``stop_at + RESOLVE_S``.
    stop_at: float = float("inf")

    async def keep_connected(self) -> None:
        delay = 0.05
        self.may_connect.set()
        while not self.closing:
            await self.may_connect.wait()
            ws: ClientConnection | None = None
            try:
                ws = await connect(f"ws://{self.address}/ws/play", compression=None,
                                   max_size=2**20, open_timeout=3)
                await ws.send(json.dumps({"type": "auth", "token": self.token}))
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if welcome.get("code") == "UNAVAILABLE":  # Redis is still coming back:
                    raise Lost(str(welcome))              # sign in again, as a client does
                if welcome.get("type") != "welcome":
                    self.unexpected.append(welcome)
                    raise Lost(str(welcome))
                if not self.may_connect.is_set():  # dropped while connecting
                    raise Lost("dropped")
                self.ws = ws
                self.ready.set()
                delay = 0.05
                async for frame in ws:
                    self._dispatch(json.loads(frame))
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError, Lost):
                pass
            finally:
                self.ready.clear()
                self.ws = None
                for future in self.waiting.values():
                    if not future.done():
                        future.set_exception(Lost("socket closed"))
                self.waiting.clear()
                if ws is not None:
                    await ws.close()
            if not self.closing:
                self.reconnects += 1
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    def _dispatch(self, message: dict[str, Any]) -> None:
        message["_seq"] = next(self.seq)
        message["_t"] = time.monotonic()
        kind = message.get("type")
        future = self.waiting.pop(str(message.get("id")), None) \
            if kind in ("bet_result", "error") else None
        if future is not None:
            if not future.done():
                future.set_result(message)
        elif kind in ("bet_result", "error"):
            self.orphans += 1
        elif kind == "seed_rotated":
            self.rotations.append((message["_seq"], message))
        elif kind != "balance":
            self.unexpected.append(message)

    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        await asyncio.wait_for(self.ready.wait(), 5)
        ws = self.ws
        if ws is None:
            raise Lost("not connected")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[message["id"]] = future
        try:
            await ws.send(json.dumps(message))
            self.written.setdefault(message["id"], time.monotonic())
            return await asyncio.wait_for(future, REPLY_TIMEOUT_S)
        except ConnectionClosed as exc:
            raise Lost(str(exc)) from exc
        finally:
            if self.waiting.get(message["id"]) is future:
                del self.waiting[message["id"]]

    async def bet_loop(self, loop_no: int) -> None:
        """A closed loop: one bet at a time, each resent until it gets its result."""
        for n in itertools.count(1):
            if time.monotonic() >= self.stop_at:
                return
            client_id = f"{self.user_id}-{loop_no}-{n}-{uuid.uuid4().hex[:8]}"
            amount, target, direction = self.rng.choice(BETS)
            message = {"type": "bet", "id": client_id, "currency": "USDT", "amount": amount,
                       "target": target, "direction": direction}
            first_sent = time.monotonic()
            delay = 0.02
            for attempt in itertools.count(1):
                if time.monotonic() > self.stop_at + RESOLVE_S:
                    self.unresolved.append(client_id)
                    return
                try:
                    r = await self._request(message)
                except (Lost, TimeoutError):
                    await asyncio.sleep(delay)
                    delay = min(0.5, delay * 2)
                    continue
                if r["type"] == "bet_result":
                    self.acks.append(Ack(
                        client_id, self.user_id, amount, r["bet_id"], r["nonce"],
                        r["server_seed_hash"], r["roll"], r["payout"], r["balance"],
                        first_sent, self.written[client_id], r["_t"], r["_seq"], attempt,
                    ))
                    break
                if r.get("code") == "UNAVAILABLE":
                    self.unavailable += 1
                    await asyncio.sleep(delay)
                    delay = min(0.5, delay * 2)
                    continue
                self.unexpected.append(r)  # anything else is a failure of the test
                return

    async def drop(self) -> None:
        """Lose the socket with bets in flight: their replies, if any, are never read, so
        the bet loops resend them once the client may connect again."""
        # With a fast server a socket's replies often arrive together and, for a moment,
        # nothing is in flight: wait (briefly) for a bet that was written and not answered.
        for _ in range(10_000):  # at most ~2 s
            if any(cid in self.written for cid in self.waiting):
                break
            await asyncio.sleep(0.0002)
        self.dropped_at = time.monotonic()
        self.in_flight_at_drop = [cid for cid in self.waiting if cid in self.written]
        self.may_connect.clear()
        self.ready.clear()
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(Lost("dropped"))
        self.waiting.clear()
        if self.ws is not None:
            await self.ws.close()

    async def close(self) -> None:
        self.closing = True
        self.may_connect.set()
        if self.ws is not None:
            await self.ws.close()


async def settled(client: aioredis.Redis, keys: Keys, bettors: list[Bettor]) -> bool:
    """Whether the server settled every bet these bettors had in flight when they dropped
    their socket: bet-n.lua writes a bet's idempotency record in the call that settles it."""
    names = [keys.bet_idem(b.user_id, cid) for b in bettors for cid in b.in_flight_at_drop]
    return not names or await client.exists(*names) == len(names)


async def test_redis_killed_under_load_keeps_acknowledged_bets_and_rotates_pairs(
    aof_redis: RedisServer, own_database: str, settings: Settings, seeded: random.Random
) -> None:
    own = settings.model_copy(update={
        "redis_url": aof_redis.url, "database_url": own_database,
        "key_prefix": f"rr{uuid.uuid4().hex[:6]}", "redis_durability": "always",
    })
    keys = Keys(own.key_prefix, own.buckets)
    rng = seeded  # the moment of the kill and every player's bets
    bettors: list[Bettor] = []
    async with serve(own) as served:
        address = served.address
        tasks: list[asyncio.Task[None]] = []
        client = aioredis.Redis.from_url(own.redis_url)
        try:
            async with Api(address, ADMIN_TOKEN) as api:
                master, _ = await api.create_user("master", commission_bps=20)
                agent, _ = await api.create_user("agent", parent_id=master, commission_bps=40)
                for i in range(PLAYERS):
                    uid, token = await api.player(deposit="500.00", parent_id=agent)
                    bettors.append(Bettor(address, uid, token, random.Random(rng.random() + i)))

            connections = [asyncio.create_task(b.keep_connected()) for b in bettors]
            loops = [asyncio.create_task(b.bet_loop(n)) for b in bettors for n in range(IN_FLIGHT)]
            tasks = connections + loops
            await asyncio.sleep(rng.uniform(*LOAD_BEFORE_S))
            dropped = bettors[::2]
            await asyncio.gather(*(b.drop() for b in dropped))
            await eventually(lambda: settled(client, keys, dropped))
            # Non-zero would mean a write() was postponed: a kill could then lose acked bets.
            delayed = (await client.info("persistence"))["aof_delayed_fsync"]
            killed = time.monotonic()
            await asyncio.to_thread(aof_redis.stop, True)
            dead = time.monotonic()  # the old Redis can settle nothing from here on
            await asyncio.to_thread(aof_redis.start)  # same port and dir: reloads the AOF
            back = time.monotonic()
            await client.aclose()  # its pooled connection went with the old Redis
            client = aioredis.Redis.from_url(own.redis_url)
            for b in bettors:
                b.stop_at = back + LOAD_AFTER_S
                b.may_connect.set()
            await asyncio.gather(*loops)
            for b in bettors:
                await b.close()
            await asyncio.gather(*connections)
            await outbox_drained(client, keys, 20.0)
        finally:
            for b in bettors:
                b.closing = True
                await b.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
    # The server has stopped: its persister drained what was left and paid the last
    # commissions.

    acks = [a for b in bettors for a in b.acks]
    players = [b.user_id for b in bettors]
    assert not [(b.user_id, m) for b in bettors for m in b.unexpected], "unexpected frames"
    assert not [c for b in bettors for c in b.unresolved], "bets never answered"
    before = [a for a in acks if a.received < killed]
    after = [a for a in acks if a.first_sent >= dead]
    assert {a.user_id for a in before} == set(players), "not every player bet before the kill"
    assert {a.user_id for a in after} == set(players), "not every player bet after the restart"
    print(f"\n{len(acks)} bets acknowledged ({len(before)} before the kill, {len(after)} "
          f"sent after it); Redis down {back - killed:.2f} s; "
          f"{sum(b.unavailable for b in bettors)} UNAVAILABLE answers, "
          f"{sum(a.attempts > 1 for a in acks)} bets resent, "
          f"{sum(b.reconnects for b in bettors)} socket reconnects, "
          f"{sum(b.orphans for b in bettors)} results on dropped sockets")

    # (2) one bet per (commitment, nonce), one bet id per client id and vice versa.
    by_slot: dict[tuple[str, int], set[str]] = defaultdict(set)
    by_bet_id: dict[str, set[str]] = defaultdict(set)
    for a in acks:
        by_slot[(a.server_seed_hash, a.nonce)].add(a.bet_id)
        by_bet_id[a.bet_id].add(a.client_id)
    assert not {k: v for k, v in by_slot.items() if len(v) > 1}, "a nonce acknowledged twice"
    assert not {k: v for k, v in by_bet_id.items() if len(v) > 1}, \
        "two client bets acknowledged as one settled bet"
    assert len({a.client_id for a in acks}) == len(acks)

    # (1) every acknowledged bet is in PostgreSQL exactly once, as the player saw it, and
    # nothing the players were not shown is there.
    conn = await asyncpg.connect(own.database_url)
    try:
        rows = await conn.fetch(
            "SELECT bet_id, user_id, amount, payout, roll, nonce, server_seed_hash,"
            " balance_after FROM bets WHERE user_id = ANY($1::bigint[])", players)
        stored = {r["bet_id"]: r for r in rows}
        missing = [a for a in acks if a.bet_id not in stored]
        assert not missing, (
            f"{len(missing)} acknowledged bets are not in PostgreSQL "
            f"(e.g. {missing[:3]}); {sum(a.received < killed for a in missing)} of them "
            f"were acknowledged before the kill; aof_delayed_fsync was {delayed}")
        mismatched = [
            (a, dict(stored[a.bet_id])) for a in acks
            if (stored[a.bet_id]["user_id"], stored[a.bet_id]["amount"],
                stored[a.bet_id]["payout"], stored[a.bet_id]["roll"],
                stored[a.bet_id]["nonce"], stored[a.bet_id]["server_seed_hash"],
                stored[a.bet_id]["balance_after"])
            != (a.user_id, minor(a.amount), minor(a.payout), minor(a.roll), a.nonce,
                a.server_seed_hash, minor(a.balance))
        ]
        assert not mismatched, f"{len(mismatched)} bets differ from PostgreSQL: {mismatched[:3]}"
        extra = set(stored) - {a.bet_id for a in acks}
        assert not extra, f"{len(extra)} bets in PostgreSQL were never acknowledged: {extra}"

        # (3) every player bet after the restart, on a new pair, rotated first.
        final: dict[int, Ack] = {}  # each player's last settled bet
        replayed = 0
        for b in bettors:
            mine = sorted(b.acks, key=lambda a: a.seq)
            old = {a.server_seed_hash for a in mine if a.received < killed}
            last_old = max((a for a in mine if a.received < killed), key=lambda a: a.nonce)
            later = [a for a in mine if a.first_sent >= dead]
            new = {a.server_seed_hash for a in later}
            assert len(new) == 1 and not new & old, (b.user_id, old, new)
            new_hash = new.pop()
            # (How many bets settle on the new pair before the first one *sent* after the
            # restart depends on each loop's backoff: only the contiguity below is asserted.)
            final[b.user_id] = max((a for a in mine if a.server_seed_hash == new_hash),
                                   key=lambda a: a.nonce)
            # Resent across the restart and answered from the idempotency record the AOF
            # kept (the old pair's result), not settled again.
            replays = [a for a in mine if a.first_sent < dead and a.received > back
                       and a.server_seed_hash != new_hash]
            assert all(a.server_seed_hash == last_old.server_seed_hash for a in replays)
            replayed += len(replays)
            if b in dropped:
                # Their bets in flight at the drop were settled before the kill: every one
                # resent after the restart must come back as it was settled then.
                unread = [a for a in mine if a.written < b.dropped_at < a.received]
                timeline = [(a.client_id, round(a.written - b.dropped_at, 3),
                             round(a.received - back, 3), a.server_seed_hash[:8], a.nonce)
                            for a in unread]
                assert unread and all(a.received > back for a in unread), (b.user_id, timeline)
                assert all(a in replays for a in unread), (b.user_id, timeline, new_hash[:8])
            on_new = sorted(a.nonce for a in mine if a.server_seed_hash == new_hash)
            assert on_new == list(range(1, len(on_new) + 1)), (b.user_id, on_new[:10])
            restarts = [m for _, m in b.rotations if m.get("reason") == "redis_restart"]
            assert len(restarts) == len(b.rotations) == 1, (b.user_id, b.rotations)
            push_seq, push = b.rotations[0]
            revealed, current = push["revealed"], push["current"]
            assert current["server_seed_hash"] == new_hash
            assert revealed["server_seed_hash"] == last_old.server_seed_hash
            assert hashlib.sha256(revealed["server_seed"].encode()).hexdigest() == \
                revealed["server_seed_hash"]
            # The push comes before the result of the bet that used the new pair's nonce 1.
            nonce_one = next(a for a in mine if (a.server_seed_hash, a.nonce) == (new_hash, 1))
            assert push_seq < nonce_one.seq, (push_seq, nonce_one)
            # PostgreSQL has the old pair revealed, with the seed the push revealed, and
            # every stored bet of it within its final nonce.
            pair = await conn.fetchrow(
                "SELECT server_seed, revealed_at, final_nonce, (SELECT max(nonce) FROM bets"
                " WHERE bets.pair_id = s.pair_id) AS top FROM seed_pairs s"
                " WHERE server_seed_hash = $1", revealed["server_seed_hash"])
            assert pair is not None and pair["revealed_at"] is not None
            assert pair["server_seed"] == revealed["server_seed"]
            assert pair["final_nonce"] >= (pair["top"] or 0) >= last_old.nonce
        print(f"{replayed} bets resent across the restart were replays of pre-kill bets")
    finally:
        await conn.close()

    # (4) the audit, then the rebuild (servers stopped, outbox empty), then the audit again.
    first_audit = await asyncio.to_thread(tool, own, "ops.audit", "--retries", "0")
    assert first_audit.returncode == 0, first_audit.stdout + first_audit.stderr
    assert f"bets checked      {len(acks)} " in first_audit.stdout, first_audit.stdout
    client = aioredis.Redis.from_url(own.redis_url)
    try:
        balances_before = {u: await client.hgetall(keys.balances(u)) for u in players}
        rebuilt = await asyncio.to_thread(tool, own, "ops.rebuild")
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        balances_after = {u: await client.hgetall(keys.balances(u)) for u in players}
    finally:
        await client.aclose()
    assert balances_after == balances_before, "the rebuild changed balances Redis had right"
    shown = {u: int(balances_after[u].get(b"USDT", 0)) for u in players}
    assert shown == {u: minor(a.balance) for u, a in final.items()}, \
        "a balance is not the one its player was last shown"
    second_audit = await asyncio.to_thread(tool, own, "ops.audit", "--retries", "0")
    assert second_audit.returncode == 0, second_audit.stdout + second_audit.stderr
    assert "AUDIT OK" in second_audit.stdout
