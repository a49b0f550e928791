"""A minimal pipelining Redis connection for the bet path, on hiredis.

redis-py spends more Python per command than the whole rest of a bet's Redis work
(encoders, retry wrappers, response callbacks). The bet path only ever sends a batch of
EVALSHA calls and waits for their replies in order, so this connection does just that:
``hiredis.pack_command`` encodes, one ``transport.write`` sends the batch, and a
``hiredis.Reader`` parses replies as bytes arrive, resolving one future per command.

On connecting it reads the server's ``run_id`` (see :mod:`server.redisconn`) before any
command is sent. A lost connection fails every command in flight with
``redis.exceptions.ConnectionError`` (the caller answers UNAVAILABLE; every money script
is idempotent, so the client's resend is safe) and the next batch reconnects.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from server.redisconn import RUN_ID, RunId

log = structlog.get_logger(__name__)

Command = tuple[str | bytes | int, ...]


def _error(reply: hiredis.ReplyError) -> ResponseError:
    text = str(reply)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


OnReply = Callable[[int, Any], None]


class _Batch:
    """The commands of one :meth:`FastConnection.send_now`: each reply goes to ``on_reply``
    with the command's index as soon as it arrives."""

    __slots__ = ("next", "on_reply")

    def __init__(self, on_reply: OnReply) -> None:
        self.on_reply = on_reply
        self.next = 0


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(notEnoughData=False)
        #: One entry per command awaiting its reply: a future, or the batch it belongs to.
        self.waiting: deque[asyncio.Future[Any] | _Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                reply = _error(reply)
            entry = waiting.popleft()
            if isinstance(entry, _Batch):
                index = entry.next
                entry.next = index + 1
                _call(entry.on_reply, index, reply)
            elif not entry.done():
                entry.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = RedisConnectionError(f"Redis connection lost: {exc or 'closed'}")
        while self.waiting:
            entry = self.waiting.popleft()
            if isinstance(entry, _Batch):
                index = entry.next
                entry.next = index + 1
                _call(entry.on_reply, index, self.lost)
            elif not entry.done():
                entry.set_exception(self.lost)


def _call(on_reply: OnReply, index: int, reply: Any) -> None:
    try:
        on_reply(index, reply)
    except Exception:  # a callback's bug must not break the connection's other callers
        log.exception("redis_batch_callback_failed")


class FastConnection:
    """One connection, pipelined: ``await execute(commands)`` -> replies in order.

    Error replies come back as ResponseError / NoScriptError instances in the list, not
    raised (like redis-py's ``raise_on_error=False``).
    """

    def __init__(self, url: str, run_id: RunId, connect_timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._db = int(parts.path.lstrip("/") or 0)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._run_id = run_id
        self._timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and protocol.lost is None:
                return protocol
            loop = asyncio.get_running_loop()
            try:
                _, fresh = await asyncio.wait_for(
                    loop.create_connection(_Protocol, self._host, self._port), self._timeout
                )
            except (OSError, TimeoutError) as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
            hello: list[Command] = []
            if self._password is not None:
                auth: Command = ("AUTH", self._password)
                if self._username is not None:
                    auth = ("AUTH", self._username, self._password)
                hello.append(auth)
            if self._db:
                hello.append(("SELECT", self._db))
            hello.append(("INFO", "server"))
            replies = await self._send(fresh, hello)
            for reply in replies:
                if isinstance(reply, ResponseError):
                    if fresh.transport is not None:
                        fresh.transport.close()
                    raise RedisConnectionError(f"Redis refused the connection: {reply}")
            self._run_id.update(replies[-1].decode())
            self._protocol = fresh
            return fresh

    @staticmethod
    async def _send(protocol: _Protocol, commands: list[Command]) -> list[Any]:
        if protocol.lost is not None or protocol.transport is None:
            raise protocol.lost or RedisConnectionError("not connected")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        protocol.waiting.extend(futures)
        # hiredis's stub types the argument as a 1-tuple; any tuple of args is accepted.
        packed = [hiredis.pack_command(c) for c in commands]  # type: ignore[arg-type]
        protocol.transport.write(b"".join(packed))
        return [await f for f in futures]

    async def execute(self, commands: list[Command]) -> list[Any]:
        """Send ``commands`` in order, :data:`RUN_ID` arguments replaced by the run id of
        the server this connection reached (read when it connected)."""
        protocol = await self._connected()
        run_id = self._run_id.value
        return await self._send(
            protocol, [tuple(run_id if a is RUN_ID else a for a in c) for c in commands]
        )

    def ready_run_id(self) -> str | None:
        """The run id of the server this connection reached, or None when it is not
        connected (then call :meth:`connect` first)."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None or protocol.transport is None:
            return None
        return self._run_id.value

    async def connect(self) -> None:
        await self._connected()

    def send_now(self, commands: list[Command], on_reply: OnReply) -> None:
        """Write ``commands`` now (the caller checked :meth:`ready_run_id` in the same
        step and filled the run id in itself); ``on_reply(i, reply)`` is called for each
        command as its reply arrives, in order. The reply is a ResponseError /
        NoScriptError for an error reply, and the connection's error for every command
        still unanswered when the connection is lost.

        Replies are handed over one by one because Redis answers a long pipeline in chunks
        (it reads about 16 KB of commands per turn of its loop): the caller works on the
        first replies while Redis runs the rest."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.lost is not None:
            raise RedisConnectionError("not connected")
        batch = _Batch(on_reply)
        protocol.waiting.extend([batch] * len(commands))
        # hiredis's stub types the argument as a 1-tuple; any tuple of args is accepted.
        protocol.transport.write(
            b"".join([hiredis.pack_command(c) for c in commands])  # type: ignore[arg-type]
        )

    async def close(self) -> None:
        protocol = self._protocol
        self._protocol = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
