"""The load tester's socket client, kept small so another implementation can be swapped in:
a :class:`Socket` sends and receives decoded message maps, nothing more.

Two implementations: ``websockets`` (pure asyncio) and ``picows`` (a Cython WebSocket
client, in the dev extras; see loadtest/picows_client.py). ``bets`` and ``spectators`` use
picows when it is installed (:data:`DEFAULT_CLIENT`), and drive it from its frame callback
rather than through :class:`Socket` (loadtest/picows_bets.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal, Protocol

import msgpack
from websockets.asyncio.client import ClientConnection, connect

from loadtest.wire import Encoding, decode

ClientKind = Literal["websockets", "picows"]
CLIENTS: tuple[ClientKind, ...] = ("websockets", "picows")


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
        return decode(frame)

    async def close(self) -> None:
        try:
            await self.ws.close()
        except Exception:
            pass


async def open_socket(
    url: str, encoding: Encoding, open_timeout: float = 10.0,
    client: ClientKind = "websockets", local_host: str | None = None,
) -> Socket:
    """Open ``url`` (a ws:// address with its path). ``local_host`` binds the client end to
    that address (more than ~28,000 sockets to one server address need several, e.g.
    127.0.0.2, 127.0.0.3 ... on loopback)."""
    if client == "picows":
        from loadtest.picows_client import open_picows

        return await open_picows(url, encoding, open_timeout, local_host)
    extra: dict[str, Any] = {}
    if local_host is not None:
        extra["local_addr"] = (local_host, 0)
    ws = await connect(
        url, compression=None, max_size=2**20, open_timeout=open_timeout, close_timeout=2,
        ping_interval=None, **extra,
    )
    return WebsocketsSocket(ws, encoding)


async def authenticate(sock: Socket, token: str, within_s: float) -> dict[str, Any]:
    """Send ``auth`` with ``token`` and return its answer: the ``welcome``, or the ``error``
    that refuses it (other frames before it, such as balance pushes, are skipped).

    Raises:
        TimeoutError: no answer within ``within_s`` seconds.
        ConnectionError: the socket closed first.
    """
    await sock.send({"type": "auth", "token": token})
    async with asyncio.timeout(within_s):
        while True:
            message = await sock.recv()
            if message.get("type") in ("welcome", "error"):
                return message


def picows_available() -> bool:
    try:
        import picows  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


#: The ``bets`` and ``spectators`` commands' client: picows when it is installed (about a
#: third of the CPU per bet, see loadtest/picows_bets.py), else websockets.
DEFAULT_CLIENT: ClientKind = "picows" if picows_available() else "websockets"
