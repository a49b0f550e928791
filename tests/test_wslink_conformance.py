"""The socket layer's frame handling ends every case as websockets' own parser does.

Modelled on Autobahn's cases: each case is raw client bytes sent after the handshake. The
reference outcome comes from websockets' sans-I/O protocol fed the same bytes (messages it
delivers, the close code it sends); the server is driven through both links (DirectLink,
whose fast path parses whole frames itself, and AsgiLink) on the echo endpoint, which
answers each delivered message with one frame. Both must deliver as many messages and close
with the same code (or not close).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from websockets.frames import Close, Opcode
from websockets.protocol import SERVER, Protocol, State
from websockets.utils import apply_mask

from plumbing.settings import Settings
from tests.conftest import serve
from tests.fuzzframes import RawClient

OP_TEXT, OP_BINARY, OP_CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
OP_PING, OP_CLOSE = Opcode.PING, Opcode.CLOSE

MAX = 64 * 1024
PING = b'{"type":"ping","id":1}'


def frame(opcode: int, data: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    """A masked client frame, built by hand: websockets refuses to serialise invalid ones."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | int(opcode)
    n = len(data)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = b"\x11\x22\x33\x44"
    return head + mask + apply_mask(data, mask)


def unmasked(opcode: int, data: bytes) -> bytes:
    return bytes((0x80 | opcode, len(data))) + data


def header64(opcode: int, length: int) -> bytes:
    return struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length) + b"\0\0\0\0"


SNOWMAN = "☃".encode()
CASES: dict[str, bytes] = {
    "text": frame(OP_TEXT, PING),
    "binary": frame(OP_BINARY, b"\x80"),
    "two frames in one write": frame(OP_TEXT, PING) * 2,
    "fragmented text": frame(OP_TEXT, PING[:5], fin=False) + frame(OP_CONT, PING[5:]),
    "ping between fragments": frame(OP_TEXT, PING[:5], fin=False) + frame(OP_PING, b"x")
    + frame(OP_CONT, PING[5:]),
    "utf-8 split across fragments": frame(OP_TEXT, b'"' + SNOWMAN[:1], fin=False)
    + frame(OP_CONT, SNOWMAN[1:] + b'"'),
    "invalid utf-8 split across fragments": frame(OP_TEXT, b'"\xce', fin=False)
    + frame(OP_CONT, b'\xbd\xed\xa0\x80"'),
    "invalid utf-8 whole": frame(OP_TEXT, b"\xff\xfe"),
    "continuation without a start": frame(OP_CONT, PING),
    "text inside a fragmented message": frame(OP_TEXT, b"[", fin=False) + frame(OP_TEXT, b"]"),
    "fragmented ping": frame(OP_PING, b"x", fin=False),
    "rsv1 without an extension": frame(OP_TEXT, PING, rsv1=True),
    "rsv2": bytes((0xA1,)) + frame(OP_TEXT, PING)[1:],
    "unmasked client frame": unmasked(OP_TEXT, PING),
    "reserved data opcode 3": bytes((0x83,)) + frame(OP_TEXT, PING)[1:],
    "reserved control opcode 11": bytes((0x8B,)) + frame(OP_TEXT, PING)[1:],
    "64-bit length past the limit": header64(OP_BINARY, 2**40),
    "64-bit length with the top bit": header64(OP_BINARY, 2**63),
    "64-bit length of a small frame": struct.pack("!BBQ", 0x82, 0xFF, 1) + b"\0\0\0\0x",
    "control frame over 125 bytes": frame(OP_PING, b"x" * 126),
    "close 1000": frame(OP_CLOSE, Close(1000, "").serialize()),
    "close with reserved code 1004": frame(OP_CLOSE, struct.pack("!H", 1004)),
    "close with code 999": frame(OP_CLOSE, struct.pack("!H", 999)),
    "close with a 1-byte payload": frame(OP_CLOSE, b"\x03"),
    "close with invalid utf-8 reason": frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"),
    "close then text": frame(OP_CLOSE, Close(1000, "").serialize()) + frame(OP_TEXT, PING),
    "close after close": frame(OP_CLOSE, Close(1000, "").serialize()) * 2,
}


def reference(data: bytes) -> tuple[int, int | None]:
    """(messages delivered, close code sent) by websockets: its sans-I/O server protocol
    parses the frames; its connection layer then decodes each whole text message and fails
    the connection with 1007 if it is not UTF-8 (websockets.asyncio.connection.recv)."""
    protocol = Protocol(SERVER, state=State.OPEN, max_size=MAX)
    protocol.receive_data(data)
    messages = 0
    text: bytes | None = None
    for event in protocol.events_received():
        if event.opcode in (OP_TEXT, OP_BINARY):
            text = bytes(event.data) if event.opcode == OP_TEXT else None
        elif event.opcode == OP_CONT and text is not None:
            text += bytes(event.data)
        if event.opcode in (OP_TEXT, OP_BINARY, OP_CONT) and event.fin:
            if text is not None:
                try:
                    text.decode()
                except UnicodeDecodeError:
                    if protocol.close_sent is None:
                        protocol.fail(1007)
                    break
            messages += 1
    sent = protocol.close_sent
    return messages, sent.code if sent is not None else None


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["direct", "asgi"])
async def echo(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[str]:
    own = settings.model_copy(update={"debug_echo": True, "inprocess_persister": False})
    ws: Any = "websockets-sansio" if request.param == "asgi" else None
    async with serve(own, ws=ws) if ws else serve(own) as served:
        yield served.address


async def observe(address: str, data: bytes) -> tuple[int, int | None]:
    """(messages answered, close code received) for ``data`` sent to the echo socket; a
    socket left open is closed with 1000 after a ping round trip proves it is still read."""
    client = await RawClient.connect(address, "/debug/echo/ws/play")
    client.writer.write(data)
    replies = 0
    probe_sent = False
    while True:
        try:
            frame = await asyncio.wait_for(client.messages.get(), 0.3 if not probe_sent else 5)
        except TimeoutError:
            if client.close_code is not None or probe_sent:
                break
            client.send(['{"type":"ping","id":"probe"}'])
            probe_sent = True
            continue
        if frame is None:
            break
        if isinstance(frame, str) and '"probe"' in frame:
            break
        replies += 1
    code = client.close_code
    await client.close()
    return replies, code


@pytest.mark.parametrize("name", list(CASES))
async def test_frames_end_as_websockets_ends_them(echo: str, name: str) -> None:
    data = CASES[name]
    expected = reference(data)
    assert await observe(echo, data) == expected, name
