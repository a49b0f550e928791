"""The shared core: the bet event format, a batch's commissions, the lease, the runner."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import NoScriptError, ResponseError

from plumbing import events, scripts
from plumbing.lease import Lease

I64 = st.integers(min_value=0, max_value=2**63 - 1)
TEXT = st.text(min_size=1, max_size=20)


@given(
    bet_id=TEXT, user_id=I64, pair_id=I64, currency=TEXT,
    amount=st.integers(min_value=1, max_value=2**63 - 1), payout=I64,
    roll=st.integers(min_value=0, max_value=10000),
    target=st.integers(min_value=1, max_value=9999), direction=st.sampled_from(["under", "over"]),
    nonce=I64, multiplier=st.integers(min_value=0, max_value=2**31 - 1), seed_hash=TEXT,
    client_seed=TEXT, ts=I64, balance=I64,
    client_id=st.none() | st.builds(
        events.client_ref,
        st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(min_size=1, max_size=64)),
)
def test_a_bet_the_wallet_encodes_is_the_row_the_persister_decodes(
    bet_id: str, user_id: int, pair_id: int, currency: str, amount: int, payout: int,
    roll: int, target: int, direction: str, nonce: int, multiplier: int, seed_hash: str,
    client_seed: str, ts: int, balance: int, client_id: str | None,
) -> None:
    values = (bet_id, user_id, pair_id, currency, amount, payout, roll, target, direction,
              nonce, multiplier, seed_hash, client_seed, ts, client_id)
    blob = events.encode_bet(*values)
    fields = {b"k": b"bet", b"e": blob, b"b": str(balance).encode()}
    expected = {**dict(zip(events.BET_FIELDS, values, strict=True)), "balance_after": balance}
    row = tuple(expected[name] for name in events.BET_COLUMNS)
    assert events.bet_row(fields) == row
    assert events.row_of(events.parse(fields)) == row  # type: ignore[arg-type]
    assert events.unpack_bet(blob) == dict(zip(events.BET_FIELDS, values, strict=True))


def test_a_bet_event_without_its_client_id_still_decodes() -> None:
    """Events written before the client's bet id travelled with them (14 fields)."""
    values = ("1-1", 7, 1, "USDT", 100, 0, 1234, 5000, "under", 1, 19800, "ab", "cs", 5)
    fields = {b"k": b"bet", b"e": msgpack.packb(list(values)), b"b": b"900"}
    row = (*values[:13], 900, 5, None)
    assert events.bet_row(fields) == row
    assert events.row_of(events.parse(fields)) == row  # type: ignore[arg-type]
    assert events.unpack_bet(msgpack.packb(list(values)))["client_id"] is None


def test_a_deposit_the_wallet_encodes_is_the_event_the_persister_decodes() -> None:
    blob = events.encode_deposit("key-1", 7, "USDT", 1000, 1_700_000_000_000)
    event = events.parse({b"k": b"deposit", b"e": blob, b"b": b"1500"})
    assert event == events.DepositEvent("key-1", 7, "USDT", 1000, 1_700_000_000_000, 1500)


@pytest.mark.parametrize("blob", [
    b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb({"bet_id": "1-1"}), msgpack.packb(5),
])
def test_unpack_bet_refuses_what_is_not_a_bet_blob(blob: bytes) -> None:
    with pytest.raises(events.Malformed):
        events.unpack_bet(blob)


async def test_a_lease_is_held_by_one_and_only_its_holder_renews_or_releases_it(
    redis: aioredis.Redis,
) -> None:
    key = f"lease-test:{uuid.uuid4().hex}"
    first, second = Lease(redis, key, 5000), Lease(redis, key, 5000)
    assert await first.acquire() and not await second.acquire()
    await second.release()  # not held: touches nothing
    assert await redis.exists(key)
    assert await first.renew() and 4000 < await redis.pttl(key) <= 5000
    await first.release()
    assert not first.held and not await redis.exists(key)
    assert await second.acquire()
    # An expired holder never renews nor deletes its successor's lease.
    await redis.set(key, "someone-else")
    assert not await second.renew() and not second.held
    await second.release()
    assert await redis.get(key) == b"someone-else"
    await redis.delete(key)


async def test_a_kept_lease_is_renewed_until_stopped(redis: aioredis.Redis) -> None:
    key = f"lease-test:{uuid.uuid4().hex}"
    lease = Lease(redis, key, 300)
    assert await lease.acquire()
    keeper = asyncio.create_task(lease.keep(every_s=0.05))
    await asyncio.sleep(0.6)  # twice the lease's life: only renewals keep it
    assert lease.held and await redis.exists(key)
    lease.stop_keeping()
    await asyncio.wait_for(keeper, 1)
    await lease.release()
    assert not await redis.exists(key)


async def test_the_runner_loads_a_script_redis_forgot(redis: aioredis.Redis) -> None:
    key = f"lease-test:{uuid.uuid4().hex}"
    await redis.set(key, "t")
    await redis.script_flush()
    replies: list[Any] = await scripts.run(redis, [
        (scripts.LEASE, [key], ["renew", "t", 1000]),
        (scripts.LEASE, [key], ["renew", "other", 1000]),
    ])
    assert replies == [1, 0]
    assert await scripts.run_one(redis, scripts.LEASE, [key], ["release", "t", 0]) == 1
    assert not await redis.exists(key)


async def test_only_the_calls_redis_answered_noscript_are_sent_again_after_one_load() -> None:
    sent: list[list[str]] = []
    loads: list[list[str]] = []
    loaded = False

    async def send(calls: Sequence[str]) -> list[Any]:
        sent.append(list(calls))
        return [NoScriptError("NOSCRIPT") if c.startswith("new") and not loaded
                else ResponseError("ERR") if c == "bad" else f"{c}:ok" for c in calls]

    async def load(calls: Sequence[str]) -> None:
        nonlocal loaded
        loads.append(list(calls))
        loaded = True

    replies = await scripts.send_loading_once(send, ["old", "new1", "bad", "new2"], load)
    assert replies[0] == "old:ok" and replies[1] == "new1:ok" and replies[3] == "new2:ok"
    assert isinstance(replies[2], ResponseError)  # another error stands, never resent
    assert loads == [["new1", "new2"]]
    assert sent == [["old", "new1", "bad", "new2"], ["new1", "new2"]]
    assert await scripts.send_loading_once(send, ["old"], load) == ["old:ok"]
    assert len(loads) == 1  # nothing missing: no load
