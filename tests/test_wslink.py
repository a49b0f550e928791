"""server/wslink.py's frame fast path, driven byte by byte over a raw socket.

DirectProtocol hands whole, unfragmented, masked data frames to the session itself and
leaves everything else to websockets' parser. These tests mix both kinds in one TCP write,
cut frames across writes, and send what must be refused, and check the answers are exactly
what the protocol promises.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from typing import Any

import msgpack

from tests.helpers import Api


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


class Raw:
    """A blocking WebSocket client on a plain socket (run in a thread)."""

    def __init__(self, address: str, path: str = "/ws/play") -> None:
        host, port = address.split(":")
        self.s = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.s.recv(4096)
            assert chunk, "closed during the handshake"
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _need(self, n: int) -> None:
        while len(self.buffer) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk

    def read(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload)."""
        self._need(2)
        opcode, n = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
        head = 2
        if n == 126:
            self._need(4)
            n, head = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, head = struct.unpack("!Q", self.buffer[2:10])[0], 10
        self._need(head + n)
        payload, self.buffer = self.buffer[head:head + n], self.buffer[head + n:]
        return opcode, payload

    def message(self) -> dict[str, Any]:
        while True:
            opcode, payload = self.read()
            if opcode == 0x1:
                decoded: dict[str, Any] = json.loads(payload)
                return decoded
            assert opcode in (0x9, 0xA), (opcode, payload)  # a ping or pong in between

    def close_code(self) -> int:
        while True:
            opcode, payload = self.read()
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0])


def bet(i: int) -> dict[str, Any]:
    return {"type": "bet", "id": i, "currency": "USDT", "amount": "0.01", "target": "50.00",
            "direction": "under"}


async def test_mixed_frames_in_one_write_are_all_answered_in_order(api: Api) -> None:
    _, token = await api.player(deposit="10.00")

    def run() -> list[dict[str, Any]]:
        c = Raw(api.address)
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

    def run(bad: bytes) -> int:
        c = Raw(api.address)
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

    def run() -> int:
        c = Raw(api.address)
        c.s.sendall(text({"type": "auth", "token": token}))
        assert c.message()["type"] == "welcome"
        c.s.sendall(frame(b"a" * (64 * 1024 + 1)))
        code = c.close_code()
        c.s.close()
        return code

    assert await asyncio.to_thread(run) == 1009
