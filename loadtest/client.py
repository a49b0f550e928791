"""The load tester's socket client, kept small so another implementation (picows) can be
swapped in: a :class:`Socket` sends and receives decoded message maps, nothing more."""

from __future__ import annotations

import json
from typing import Any, Literal, Protocol

import msgpack
from websockets.asyncio.client import ClientConnection, connect

Encoding = Literal["json", "msgpack"]


class Socket(Protocol):
    """One open WebSocket carrying StakePro messages in one encoding."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def recv(self) -> dict[str, Any]:
        """The next message; raises ``ConnectionError`` once the socket is closed."""
        ...

    async def close(self) -> None: ...


class WebsocketsSocket:
    """:class:`Socket` over the ``websockets`` asyncio client (no compression)."""

    def __init__(self, ws: ClientConnection, encoding: Encoding) -> None:
        self.ws = ws
        self.binary = encoding == "msgpack"

    async def send(self, message: dict[str, Any]) -> None:
        frame: str | bytes = msgpack.packb(message) if self.binary else json.dumps(message)
        try:
            await self.ws.send(frame)
        except Exception as exc:  # websockets.ConnectionClosed and transport errors
            raise ConnectionError(str(exc)) from exc

    async def recv(self) -> dict[str, Any]:
        try:
            frame = await self.ws.recv()
        except Exception as exc:
            raise ConnectionError(str(exc)) from exc
        decoded = msgpack.unpackb(frame) if isinstance(frame, bytes) else json.loads(frame)
        if not isinstance(decoded, dict):
            raise ValueError(f"a frame that is not a map: {decoded!r:.80}")
        return decoded

    async def close(self) -> None:
        try:
            await self.ws.close()
        except Exception:
            pass


async def open_socket(url: str, encoding: Encoding, open_timeout: float = 10.0) -> Socket:
    """Open ``url`` (a ws:// address with its path)."""
    ws = await connect(
        url, compression=None, max_size=2**20, open_timeout=open_timeout, close_timeout=2,
        ping_interval=None,
    )
    return WebsocketsSocket(ws, encoding)
