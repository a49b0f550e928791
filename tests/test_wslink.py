"""server/wslink.py's frame fast path, driven byte by byte over a raw socket.

DirectProtocol hands whole, unfragmented, masked data frames to the session itself and
leaves everything else to websockets' parser. These tests mix both kinds in one TCP write,
cut frames across writes, and send what must be refused, and check the answers are exactly
what the protocol promises.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from typing import Any

import msgpack

from tests.helpers import Api, RawSocket


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True, mask: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, (0x80 if mask else 0) | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(message: dict[str, Any]) -> bytes:
    return frame(json.dumps(message).encode())


def bet(i: int) -> dict[str, Any]:
    return {"type": "bet", "id": i, "currency": "USDT", "amount": "0.01", "target": "50.00",
            "direction": "under"}


async def test_mixed_frames_in_one_write_are_all_answered_in_order(api: Api) -> None:
    _, token = await api.player(deposit="10.00")

    def run() -> list[dict[str, Any]]:
        c = RawSocket(api.address)
        c.s.sendall(text({"type": "auth", "token": token}))
        assert c.message()["type"] == "welcome"
        big_id = "x" * 60
        long_bet = {**bet(0), "id": big_id, "pad": "p" * 200}  # a 2-byte length frame
        fragmented = json.dumps({"type": "ping", "id": "frag"}).encode()
        burst = b"".join([
            text(bet(1)),
            frame(b"are you there", opcode=0x9),  # a ping between data frames
            text(long_bet),
            frame(fragmented[:5], fin=False), frame(fragmented[5:], opcode=0x0),
            frame(json.dumps(bet(2)).encode()),
            frame(msgpack.packb(bet(3)), opcode=0x2),
        ])
        cut = text(bet(4))
        c.s.sendall(burst + cut[:7])  # the last frame cut in two writes
        c.s.sendall(cut[7:])
        replies: list[dict[str, Any]] = []
        control_pong = False
        while len(replies) < 6 or not control_pong:  # 5 bets, the fragmented ping; a pong
            opcode, payload = c.read()
            if opcode == 0xA:
                control_pong = payload == b"are you there"
            elif opcode == 0x1:
                replies.append(json.loads(payload))
            else:
                assert opcode == 0x2, (opcode, payload)
                replies.append({**msgpack.unpackb(payload), "binary": True})
        c.s.close()
        return replies

    replies = await asyncio.to_thread(run)
    settled = {r["id"]: r for r in replies if r["type"] == "bet_result"}
    assert set(settled) == {1, "x" * 60, 2, 3, 4}, replies
    assert settled[3].get("binary") and not settled[1].get("binary")  # each in its encoding
    assert sorted(r["nonce"] for r in settled.values()) == [1, 2, 3, 4, 5]
    assert [r for r in replies if r["type"] == "pong"] == [{"type": "pong", "id": "frag"}]


async def test_invalid_utf8_closes_1007_and_unmasked_frames_close_1002(api: Api) -> None:
    _, token = await api.player(deposit="1.00")

    def run(bad: bytes) -> int | None:
        c = RawSocket(api.address)
        c.s.sendall(text({"type": "auth", "token": token}))
        assert c.message()["type"] == "welcome"
        c.s.sendall(text({"type": "ping", "id": 1}))
        assert c.message() == {"type": "pong", "id": 1}
        c.s.sendall(text({"type": "ping", "id": 2}) + bad)  # the ping's answer may not come
        code = c.close_code()
        c.s.close()
        return code

    assert await asyncio.to_thread(run, frame(b"\xff\xfe bad")) == 1007
    assert await asyncio.to_thread(run, frame(b'{"type":"ping"}', mask=False)) == 1002


async def test_a_frame_over_the_size_limit_closes_1009_even_when_whole(api: Api) -> None:
    _, token = await api.player(deposit="1.00")

    def run() -> int | None:
        c = RawSocket(api.address)
        c.s.sendall(text({"type": "auth", "token": token}))
        assert c.message()["type"] == "welcome"
        c.s.sendall(frame(b"a" * (64 * 1024 + 1)))
        code = c.close_code()
        c.s.close()
        return code

    assert await asyncio.to_thread(run) == 1009
