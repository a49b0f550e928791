"""Hostile strings in every field, over real sockets: lone surrogates, NUL and control
characters get a clear error code of PROTOCOL.md, change nothing, and stop no one else.

Issue 10: one player's bet with the id ``"\\ud800"`` (valid JSON) used to reach the Redis
batch, break it, and leave every other player's bets on that process unanswered.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import Api, Player

BET = {"type": "bet", "currency": "USDT", "amount": "1.00", "target": "50.00",
       "direction": "under"}
#: The issue's frame, byte for byte: JSON's escape for a lone surrogate.
ATTACK = '{"type":"bet","id":"\\ud800","currency":"USDT","amount":"1.00","target":"50.00",' \
         '"direction":"under"}'


async def _usdt(api: Api, uid: int) -> str:
    return str((await api.user(uid))["balances"]["USDT"])


async def test_a_lone_surrogate_id_stops_no_one(api: Api) -> None:
    """The attack from the issue, interleaved with another player's bets in flight."""
    victim_id, victim_token = await api.player(deposit="100.00")
    attacker_id, attacker_token = await api.player(deposit="10.00")
    async with api.play(victim_token) as victim, api.play(attacker_token) as attacker:
        ids = [f"v{i}" for i in range(40)]
        for bet_id in ids[:20]:
            await victim.send({**BET, "id": bet_id, "amount": "0.01"})
        await attacker.send_raw(ATTACK)
        for bet_id in ids[20:]:
            await victim.send({**BET, "id": bet_id, "amount": "0.01"})
        async with asyncio.timeout(10):  # answered, not timed out
            refused = await attacker.recv()
            replies = [await victim.recv() for _ in ids]
        assert refused["type"] == "error" and refused["code"] == "BAD_MESSAGE", refused
        assert refused["id"] is None  # an error about the id itself echoes null
        assert [r["type"] for r in replies] == ["bet_result"] * len(ids), replies
        assert sorted(r["id"] for r in replies) == sorted(ids)
        assert sorted(r["nonce"] for r in replies) == list(range(1, len(ids) + 1))
        # The attacker's socket still works, and the refused bet used no nonce.
        after = await attacker.bet("1.00", id="fine")
        assert after["type"] == "bet_result" and after["nonce"] == 1
        # Both players keep being answered.
        assert (await victim.bet("0.01", id="v-after"))["type"] == "bet_result"
    balance = await _usdt(api, attacker_id)
    assert balance == after["balance"]  # only the valid bet moved money
    assert await _usdt(api, victim_id) != "100.00"


#: (field, value, code) for one hostile string in a bet or rotate_seed; the reply echoes the
#: id 7 unless the id itself is bad.
CONTROL = ["\x00", "\x1b[2J", "\x7f", "\x85", "\r\n"]
CASES: list[tuple[str, str, str]] = [
    *[("id", f"a{c}b", "BAD_MESSAGE") for c in CONTROL],
    *[("currency", f"USDT{c}", "UNKNOWN_CURRENCY") for c in CONTROL],
    *[("amount", f"1.00{c}", "INVALID_AMOUNT") for c in CONTROL],
    *[("target", f"50.00{c}", "INVALID_TARGET") for c in CONTROL],
    *[("direction", f"under{c}", "BAD_MESSAGE") for c in CONTROL],
    *[("client_seed", f"seed{c}", "INVALID_SEED") for c in CONTROL],
    *[("type", f"bet{c}", "BAD_MESSAGE") for c in CONTROL],
    ("amount", "١٠", "INVALID_AMOUNT"),  # digits, but not ASCII ones
]
#: The same with a lone surrogate: JSON only (msgpack strings are UTF-8, which has none).
SURROGATE_CASES: list[tuple[str, str, str]] = [
    ("id", "\ud800", "BAD_MESSAGE"), ("id", "x\udfffy", "BAD_MESSAGE"),
    ("currency", "\ud800", "UNKNOWN_CURRENCY"), ("amount", "1\ud800", "INVALID_AMOUNT"),
    ("target", "\udc00", "INVALID_TARGET"), ("direction", "\ud800", "BAD_MESSAGE"),
    ("client_seed", "s\ud800", "INVALID_SEED"), ("type", "\ud800", "BAD_MESSAGE"),
]


def _message(field: str, value: str) -> dict[str, Any]:
    if field == "client_seed":
        return {"type": "rotate_seed", "id": 7, "client_seed": value}
    return {**BET, "id": 7, field: value}


async def _refused_and_nothing_changed(
    api: Api, p: Player, uid: int, send: Any, field: str, code: str
) -> None:
    before = await _usdt(api, uid)
    await send()
    reply = await asyncio.wait_for(p.recv(), 10)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["id"] == (None if field == "id" else 7), reply
    assert await _usdt(api, uid) == before
    # The socket stays open, and the refused request used no nonce.
    ok = await p.bet("1.00", id="after")
    assert ok["type"] == "bet_result" and ok["nonce"] == 1, ok


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
@pytest.mark.parametrize(("field", "value", "code"), CASES)
async def test_a_control_character_in_any_field(
    api: Api, encoding: str, field: str, value: str, code: str
) -> None:
    uid, token = await api.player(deposit="5.00")
    async with api.play(token, msgpack_frames=encoding == "msgpack") as p:
        message = _message(field, value)
        await _refused_and_nothing_changed(
            api, p, uid, lambda: p.send(message), field, code
        )


@pytest.mark.parametrize(("field", "value", "code"), SURROGATE_CASES)
async def test_a_lone_surrogate_in_any_field(
    api: Api, field: str, value: str, code: str
) -> None:
    uid, token = await api.player(deposit="5.00")
    async with api.play(token) as p:
        frame = json.dumps(_message(field, value))  # ensure_ascii: "\ud800" as an escape
        assert "\\ud" in frame
        await _refused_and_nothing_changed(
            api, p, uid, lambda: p.send_raw(frame), field, code
        )


def _msgpack_str_raw(utf8: bytes) -> bytes:
    """A msgpack str header over arbitrary bytes (packb would refuse invalid UTF-8)."""
    assert len(utf8) < 32
    return bytes([0xA0 | len(utf8)]) + utf8


@pytest.mark.parametrize(
    "frame",
    [
        # {"type": "bet", "id": <str holding the UTF-8 bytes of U+D800>}: invalid UTF-8
        b"\x82" + msgpack.packb("type") + msgpack.packb("bet")
        + msgpack.packb("id") + _msgpack_str_raw(b"\xed\xa0\x80"),
        # the id as msgpack bin (bytes), not str
        msgpack.packb({**BET, "id": b"\xed\xa0\x80"}, use_bin_type=True),
        # the id as an ext type
        msgpack.packb({**BET, "id": msgpack.ExtType(5, b"x")}),
    ],
    ids=["invalid-utf8-str", "bin", "ext"],
)
async def test_msgpack_ids_that_are_not_text(api: Api, frame: bytes) -> None:
    uid, token = await api.player(deposit="5.00")
    async with api.play(token, msgpack_frames=True) as p:
        await _refused_and_nothing_changed(
            api, p, uid, lambda: p.send_raw(frame), "id", "BAD_MESSAGE"
        )


@pytest.mark.parametrize("token", ["\\ud800", "tok\\u0000en", "\\u001b", "t\\u0085"])
async def test_a_hostile_token_is_unauthorized(api: Api, token: str) -> None:
    async with connect(f"ws://{api.address}/ws/play") as ws:
        await ws.send('{"type":"auth","id":1,"token":"' + token + '"}')
        err = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert err["type"] == "error" and err["code"] == "UNAUTHORIZED", err
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


# -- HTTP ------------------------------------------------------------------------------------

HOSTILE_TEXT = ["a\\u0000b", "\\ud800", "x\\u001by", "\\u009f", "line\\nbreak"]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
async def test_a_hostile_name_creates_no_user(api: Api, text: str) -> None:
    body = '{"role":"player","name":"' + text + '"}'
    r = await api.http.post("/api/admin/users", content=body,
                            headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "BAD_MESSAGE", r.text


@pytest.mark.parametrize(
    ("field", "text", "code"),
    [
        *[("idempotency_key", t, "BAD_MESSAGE") for t in HOSTILE_TEXT],
        *[("currency", "USDT" + t, "UNKNOWN_CURRENCY") for t in HOSTILE_TEXT],
        *[("amount", "1.00" + t, "INVALID_AMOUNT") for t in HOSTILE_TEXT],
    ],
)
async def test_a_hostile_deposit_field_credits_nothing(
    api: Api, field: str, text: str, code: str
) -> None:
    uid, _ = await api.player(deposit="1.00")
    fields = {"user_id": uid, "currency": "USDT", "amount": "2.00", "idempotency_key": "k"}
    body = json.dumps({k: v for k, v in fields.items() if k != field})
    body = body[:-1] + f', "{field}": "{text}"' + "}"
    r = await api.http.post("/api/admin/deposits", content=body,
                            headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == code, r.text
    assert await _usdt(api, uid) == "1.00"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/bets/a%00b", 404, "NOT_FOUND"),
        ("/api/bets/%ED%A0%80", 404, "NOT_FOUND"),
        ("/api/bets/x%1Bb", 404, "NOT_FOUND"),
        ("/api/admin/users/1%00", 404, "NOT_FOUND"),
        ("/api/verify?server_seed=ab&client_seed=a%00b&nonce=1", 400, "INVALID_SEED"),
        ("/api/verify?server_seed=ab&client_seed=%ED%A0%80&nonce=1", 400, "INVALID_SEED"),
        ("/api/verify?server_seed=ab&client_seed=ab&nonce=1%00", 400, "BAD_MESSAGE"),
    ],
)
async def test_hostile_paths_and_queries(api: Api, path: str, status: int, code: str) -> None:
    r = await api.http.get(path)
    assert r.status_code == status and r.json()["code"] == code, r.text
