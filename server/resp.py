"""A minimal pipelining Redis connection for the bet path, on hiredis.

redis-py spends more Python per command than the whole rest of a bet's Redis work
(encoders, retry wrappers, response callbacks). The bet path only ever sends a batch of
EVALSHA calls and waits for their replies in order, so this connection does just that:
``hiredis.pack_command`` encodes, one ``transport.write`` sends the batch, and a
``hiredis.Reader`` parses replies as bytes arrive, resolving one future per command.

Replies are matched to callers by position alone, so the connection keeps one rule: a
reply slot exists exactly for each command whose bytes were written. Hence

- every command is encoded before its slot is queued; a command that cannot be encoded
  (a lone surrogate in an argument, say) gets :class:`CommandEncodeError` as its own reply
  and is never written, and the other commands of its batch go on;
- any other fault that could put the slots out of step with the stream (a write that
  raises, a reply hiredis cannot parse, a reply nobody waits for, no byte for
  ``read_timeout`` seconds while calls are pending) drops the connection and fails every
  call in flight on it with a ``redis.exceptions.ConnectionError`` (``TimeoutError`` for
  the read timeout). No reply is ever shifted onto another caller; the callers answer
  UNAVAILABLE (every money script is idempotent by the request's id, so a resend is safe)
  and the next batch reconnects.

On connecting it reads the server's ``run_id`` (see :mod:`server.redisconn`) before any
command is sent. ``redis://`` is cleartext; ``rediss://`` is TLS (certificate and host
name checked unless ``ssl_cert_reqs=none``); any other scheme or URL option is refused
when the connection is built, so a setting is never silently ignored.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.redisconn import RUN_ID, RunId

log = structlog.get_logger(__name__)

Command = tuple[str | bytes | int, ...]

#: The options a ``rediss://`` URL may carry (redis-py's names for them).
TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs")


class CommandEncodeError(DataError):
    """A command's arguments cannot be sent (e.g. a string that is not valid UTF-8); the
    command was not written."""


def _error(reply: hiredis.ReplyError) -> ResponseError:
    text = str(reply)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


def _pack(command: Command) -> bytes | CommandEncodeError:
    try:
        # hiredis's stub types the argument as a 1-tuple; any tuple of args is accepted.
        packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
        return packed
    except Exception as exc:  # UnicodeEncodeError, TypeError for an unsupported type
        name = command[0] if command and isinstance(command[0], str) else "?"
        return CommandEncodeError(f"{name} not sent: an argument cannot be encoded ({exc})")


OnReply = Callable[[int, Any], None]


class _Batch:
    """The written commands of one :meth:`FastConnection.send_now`: each reply goes to
    ``on_reply`` with the command's index (``indices[k]`` for the k-th written command, or
    k itself when every command was written) as soon as it arrives."""

    __slots__ = ("indices", "next", "on_reply")

    def __init__(self, on_reply: OnReply, indices: list[int] | None) -> None:
        self.on_reply = on_reply
        self.indices = indices
        self.next = 0

    def answer(self, reply: Any) -> None:
        k = self.next
        self.next = k + 1
        _call(self.on_reply, k if self.indices is None else self.indices[k], reply)


class _Protocol(asyncio.Protocol):
    def __init__(self, read_timeout: float) -> None:
        self.reader = hiredis.Reader(notEnoughData=False)
        #: One entry per written command awaiting its reply: a future, or its batch.
        self.waiting: deque[asyncio.Future[Any] | _Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self._loop = asyncio.get_running_loop()
        self._read_timeout = read_timeout
        self._timer: asyncio.TimerHandle | None = None
        #: loop.time() of the last bytes received, or of the first call queued while none
        #: was pending: calls are stalled when this is older than the read timeout.
        self.progress = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def expect(self, entries: list[asyncio.Future[Any]] | list[_Batch]) -> None:
        """Queue the reply slots of commands about to be written."""
        if not self.waiting:
            self.progress = self._loop.time()
        self.waiting.extend(entries)
        if self._timer is None:
            self._timer = self._loop.call_at(self.progress + self._read_timeout, self._check)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.transport.write(data)
        except Exception as exc:  # what was written of it is unknown: the stream is lost
            self.fail(RedisConnectionError(f"Redis write failed: {exc!r}"))

    def stalled_for(self) -> float:
        """Seconds without a byte from Redis while calls wait on it (0 when none wait)."""
        if not self.waiting or self.lost is not None:
            return 0.0
        return max(0.0, self._loop.time() - self.progress)

    def _check(self) -> None:
        self._timer = None
        if not self.waiting or self.lost is not None:
            return
        idle = self._loop.time() - self.progress
        if idle >= self._read_timeout:
            self.fail(RedisTimeoutError(
                f"Redis sent nothing for {idle:.1f}s while {len(self.waiting)} calls waited"
            ))
        else:
            self._timer = self._loop.call_at(self.progress + self._read_timeout, self._check)

    def data_received(self, data: bytes) -> None:
        if self.lost is not None:  # dropped: its calls are being failed, not answered
            return
        self.progress = self._loop.time()
        waiting = self.waiting
        try:
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    reply = _error(reply)
                if not waiting:
                    raise RedisConnectionError("Redis sent a reply no call was waiting for")
                entry = waiting.popleft()
                if isinstance(entry, _Batch):
                    entry.answer(reply)
                elif not entry.done():
                    entry.set_result(reply)
        except Exception as exc:  # hiredis.ProtocolError, or a reply nobody expects
            log.error("redis_stream_broken", error=repr(exc), pending=len(waiting))
            self.fail(RedisConnectionError(f"Redis connection dropped: {exc!r}"))

    def fail(self, exc: Exception) -> None:
        """Drop the connection: no call is sent on it again, and every call in flight gets
        ``exc`` (on the next loop turn, never inside the caller's own call)."""
        if self.lost is None:
            self.lost = exc
        if self.transport is not None:
            self.transport.abort()
        self._loop.call_soon(self._fail_waiting)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = RedisConnectionError(f"Redis connection lost: {exc or 'closed'}")
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lost = self.lost
        while self.waiting:
            entry = self.waiting.popleft()
            if isinstance(entry, _Batch):
                entry.answer(lost)
            elif not entry.done():
                entry.set_exception(cast(Exception, lost))


def _call(on_reply: OnReply, index: int, reply: Any) -> None:
    try:
        on_reply(index, reply)
    except Exception:  # a callback's bug must not break the connection's other callers
        log.exception("redis_batch_callback_failed")


def _tls_context(url: str, query: dict[str, list[str]]) -> ssl.SSLContext:
    ca = query.get("ssl_ca_certs", [None])[-1]
    context = ssl.create_default_context(cafile=ca)
    reqs = query.get("ssl_cert_reqs", ["required"])[-1].lower()
    if reqs in ("none", "optional"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE if reqs == "none" else ssl.CERT_OPTIONAL
    elif reqs != "required":
        raise ValueError(f"ssl_cert_reqs must be none, optional or required in {url!r}")
    return context


class FastConnection:
    """One connection, pipelined: ``await execute(commands)`` -> replies in order.

    Error replies come back as ResponseError / NoScriptError instances in the list, not
    raised (like redis-py's ``raise_on_error=False``), and so does the CommandEncodeError
    of a command that could not be sent.

    Raises:
        ValueError: ``url`` is not ``redis://`` or ``rediss://``, or has an option this
            connection does not apply.
    """

    def __init__(
        self, url: str, run_id: RunId, connect_timeout: float = 5.0, read_timeout: float = 5.0
    ) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(
                f"REDIS_URL scheme {parts.scheme!r} is not supported: use redis:// (cleartext)"
                " or rediss:// (TLS)"
            )
        allowed = TLS_OPTIONS if parts.scheme == "rediss" else ()
        unknown = sorted(set(query) - set(allowed))
        if unknown:
            raise ValueError(
                f"REDIS_URL option(s) {', '.join(unknown)} not supported by the bet path's"
                f" connection (a {parts.scheme}:// URL takes"
                f" {', '.join(allowed) or 'no options'}); the database goes in the path"
            )
        self._tls = _tls_context(url, query) if parts.scheme == "rediss" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._db = int(parts.path.lstrip("/") or 0)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._run_id = run_id
        self._timeout = connect_timeout
        self._read_timeout = read_timeout
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
                    loop.create_connection(
                        lambda: _Protocol(self._read_timeout), self._host, self._port,
                        ssl=self._tls, server_hostname=self._host if self._tls else None,
                    ),
                    self._timeout,
                )
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
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
                if isinstance(reply, RedisError):
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
        packed = [_pack(c) for c in commands]
        loop = asyncio.get_running_loop()
        results: list[Any] = []
        futures: list[asyncio.Future[Any]] = []
        for p in packed:
            if isinstance(p, CommandEncodeError):
                results.append(p)
            else:
                future = loop.create_future()
                futures.append(future)
                results.append(future)
        if not futures:
            return results
        protocol.expect(futures)
        protocol.write(b"".join(p for p in packed if isinstance(p, bytes)))
        # gather: when the connection fails them all, their errors count as retrieved.
        replies = iter(await asyncio.gather(*futures))
        return [next(replies) if isinstance(r, asyncio.Future) else r for r in results]

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

    def stalled_for(self) -> float:
        """Seconds the calls in flight have waited without a byte from Redis (0 when none
        wait): what /healthz reads to tell a Redis that stopped answering."""
        protocol = self._protocol
        return 0.0 if protocol is None else protocol.stalled_for()

    async def connect(self) -> None:
        await self._connected()

    def send_now(self, commands: list[Command], on_reply: OnReply) -> None:
        """Write ``commands`` now (the caller checked :meth:`ready_run_id` in the same
        step and filled the run id in itself); ``on_reply(i, reply)`` is called once for
        each command: with its reply as it arrives, in order; a ResponseError /
        NoScriptError for an error reply; a CommandEncodeError (next loop turn) for a
        command that could not be encoded; and the connection's error for every command
        still unanswered when the connection is dropped. Never calls ``on_reply`` before
        it returns.

        Replies are handed over one by one because Redis answers a long pipeline in chunks
        (it reads about 16 KB of commands per turn of its loop): the caller works on the
        first replies while Redis runs the rest."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.lost is not None:
            raise RedisConnectionError("not connected")
        packed = [_pack(c) for c in commands]
        written: list[bytes] = []
        indices: list[int] | None = None
        for i, p in enumerate(packed):
            if isinstance(p, bytes):
                written.append(p)
                if indices is not None:
                    indices.append(i)
            else:
                if indices is None:
                    indices = list(range(i))
                asyncio.get_running_loop().call_soon(_call, on_reply, i, p)
        if written:
            batch = _Batch(on_reply, indices)
            protocol.expect([batch] * len(written))
            protocol.write(b"".join(written))

    async def close(self) -> None:
        protocol = self._protocol
        self._protocol = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
