"""The bet path's Redis connection (server/resp.py) under faults: every caller gets its own
reply or an error, never another caller's reply, and never no answer at all.

Against a real redis-server of this module's own (the tests kill its clients), plus a fake
server on loopback for the byte streams a real Redis never sends.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.redisconn import RunId
from server.resp import Command, CommandEncodeError, FastConnection
from tests.conftest import RedisServer, free_port
from tests.helpers import eventually

#: Read timeout of the connections under test: short, so a stalled call fails quickly.
READ_TIMEOUT = 0.15
#: BLPOP on an empty list blocks this long on the server: a stall past READ_TIMEOUT.
STALL_S = 1


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async def probe() -> bool:
        return condition()

    await eventually(probe, within, every=0.005)


def _fast(url: str, read_timeout: float = READ_TIMEOUT) -> FastConnection:
    return FastConnection(url, RunId(), connect_timeout=2.0, read_timeout=read_timeout)


# -- one bad command among good ones ---------------------------------------------------------


async def test_an_unencodable_command_fails_alone(own_redis: RedisServer) -> None:
    """The issue's fault: a lone surrogate in one command of a batch. That command is
    refused before it has a reply slot; the others, and every later batch, get their own
    replies."""
    fast = _fast(own_redis.url)
    await fast.connect()
    replies: dict[int, Any] = {}
    fast.send_now(
        [("ECHO", "a"), ("ECHO", "\ud800"), ("ECHO", "c"), ("ECHO", "x\x00y")],
        replies.__setitem__,
    )
    assert replies == {}  # never answered inside send_now
    await until(lambda: len(replies) == 4)
    assert replies[0] == b"a" and replies[2] == b"c"
    assert isinstance(replies[1], CommandEncodeError)
    assert replies[3] == b"x\x00y"  # NUL is a valid byte for Redis; only encoding fails
    got = await fast.execute([("ECHO", "d"), ("ECHO", "\udfff"), ("ECHO", "e")])
    assert got[0] == b"d" and isinstance(got[1], CommandEncodeError) and got[2] == b"e"
    assert await fast.execute([("ECHO", "after")]) == [b"after"]
    await fast.close()


async def test_a_wholly_unencodable_batch_writes_nothing(own_redis: RedisServer) -> None:
    fast = _fast(own_redis.url)
    got = await fast.execute([("ECHO", "\ud800")])
    assert isinstance(got[0], CommandEncodeError)
    assert await fast.execute([("ECHO", "ok")]) == [b"ok"]
    await fast.close()


# -- the read timeout ------------------------------------------------------------------------


async def test_a_stalled_call_times_out_and_the_next_call_reconnects(
    own_redis: RedisServer,
) -> None:
    fast = _fast(own_redis.url)
    await fast.connect()
    stalled = asyncio.create_task(
        fast.execute([("BLPOP", "resp-test:never", str(STALL_S)), ("ECHO", "behind")])
    )
    await until(lambda: fast.stalled_for() > READ_TIMEOUT / 2)  # what /healthz reads
    with pytest.raises(RedisTimeoutError):
        async with asyncio.timeout(STALL_S * 0.8):  # well before BLPOP would answer
            await stalled
    assert fast.stalled_for() == 0.0
    assert await fast.execute([("ECHO", "again")]) == [b"again"]
    await fast.close()


async def test_an_idle_connection_never_times_out(own_redis: RedisServer) -> None:
    fast = _fast(own_redis.url, read_timeout=0.05)
    await fast.connect()
    run_id = fast.ready_run_id()
    await asyncio.sleep(0.3)  # idle for six read timeouts: the passing of time is the test
    assert fast.ready_run_id() == run_id is not None  # still the same, live connection
    assert fast.stalled_for() == 0.0
    assert await fast.execute([("ECHO", "still")]) == [b"still"]
    await fast.close()


async def test_a_slow_but_steady_pipeline_does_not_time_out(own_redis: RedisServer) -> None:
    """The timeout counts silence, not the age of the oldest call: a long pipeline that
    keeps answering is never cut."""
    fast = _fast(own_redis.url, read_timeout=0.5)
    commands: list[Command] = [("ECHO", str(i)) for i in range(20000)]
    got = await fast.execute(commands)
    assert got == [str(i).encode() for i in range(20000)]
    await fast.close()


# -- byte streams a real Redis never sends ---------------------------------------------------


@dataclass
class FakeRedis:
    """Answers INFO like Redis and ECHO x with x, except: ECHO garbage gets bytes no RESP
    parser accepts, ECHO twice gets two replies."""

    port: int = 0
    connections: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                name, *args = command
                if name.upper() == b"INFO":
                    text = b"run_id:fake%d\r\n" % self.connections
                    writer.write(b"$%d\r\n%s\r\n" % (len(text), text))
                elif args == [b"garbage"]:
                    writer.write(b"?this is not RESP\r\n")
                elif args == [b"twice"]:
                    writer.write(b"+one\r\n+two\r\n")
                else:
                    writer.write(b"$%d\r\n%s\r\n" % (len(args[0]), args[0]))
        writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{self.port}/0"

    async def stop(self) -> None:
        assert self.server is not None
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[tuple[FakeRedis, str]]:
    server = FakeRedis()
    url = await server.start()
    yield server, url
    await server.stop()


async def test_a_reply_hiredis_cannot_parse_fails_every_pending_call_and_reconnects(
    fake: tuple[FakeRedis, str],
) -> None:
    """hiredis.ProtocolError: the connection is dropped and every call in flight on it
    fails, the one before the bad bytes excepted; none gets a shifted reply."""
    _, url = fake
    fast = _fast(url, read_timeout=2.0)
    await fast.connect()
    assert fast.ready_run_id() == "fake1"
    replies: dict[int, Any] = {}
    fast.send_now([("ECHO", "first"), ("ECHO", "garbage")], replies.__setitem__)
    later: dict[int, Any] = {}
    fast.send_now([("ECHO", "c1")], later.__setitem__)
    behind = asyncio.create_task(fast.execute([("ECHO", "b1"), ("ECHO", "b2")]))
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(behind, 5)
    await until(lambda: len(replies) == 2 and bool(later))
    assert replies[0] == b"first"
    assert isinstance(replies[1], RedisConnectionError)
    assert isinstance(later[0], RedisConnectionError)
    assert fast.ready_run_id() is None
    assert await fast.execute([("ECHO", "fresh")]) == [b"fresh"]
    assert fast.ready_run_id() == "fake2"  # a new connection, and its run id read first
    await fast.close()


async def test_a_reply_nobody_waits_for_drops_the_connection(
    fake: tuple[FakeRedis, str],
) -> None:
    """Two replies to one command: the second can only be out of step, so the connection
    is not used again."""
    _, url = fake
    fast = _fast(url, read_timeout=2.0)
    got = await fast.execute([("ECHO", "twice")])
    assert got in ([b"one"], ["one"])
    await until(lambda: fast.ready_run_id() is None)
    assert await fast.execute([("ECHO", "fresh")]) == [b"fresh"]
    assert fast.ready_run_id() == "fake2"
    await fast.close()


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "unix:///tmp/redis.sock",
        "http://127.0.0.1:6379",
        "redis+sentinel://127.0.0.1:26379",
        "redis://127.0.0.1:6379?db=3",  # redis-py would use db 3: never silently ignored
        "redis://127.0.0.1:6379/0?ssl_cert_reqs=none",  # a TLS option on a cleartext URL
        "rediss://127.0.0.1:6379/0?socket_timeout=1",
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=sometimes",
    ],
)
def test_urls_the_connection_cannot_honour_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"REDIS_URL|ssl_cert_reqs"):
        FastConnection(url, RunId())


async def test_the_server_refuses_to_start_on_such_a_url(settings: Any) -> None:
    from server.services import Services

    with pytest.raises(ValueError, match="scheme 'unix'"):
        await Services.start(settings.model_copy(update={"redis_url": "unix:///tmp/r.sock"}))


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[int, Path]]:
    """A redis-server speaking only TLS, with a self-signed certificate for 127.0.0.1;
    yields (its port, the certificate to trust)."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the TLS test needs the openssl command"
    workdir = Path(tempfile.mkdtemp(prefix="stakepro-tls-"))
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(workdir / "key.pem"), "-out", str(workdir / "cert.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(workdir / "cert.pem"), "--tls-key-file", str(workdir / "key.pem"),
         "--tls-ca-cert-file", str(workdir / "cert.pem"), "--tls-auth-clients", "no",
         "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield port, workdir / "cert.pem"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


async def _until_listening(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return


async def test_rediss_speaks_tls_and_checks_the_certificate(
    tls_redis: tuple[int, Path], own_redis: RedisServer
) -> None:
    port, ca = tls_redis
    await _until_listening(port)
    fast = _fast(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}", read_timeout=2.0)
    assert await fast.execute([("ECHO", "over tls")]) == [b"over tls"]
    await fast.close()
    # redis-py agrees on the same URL (the server's general client).
    client = aioredis.Redis.from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    assert await client.echo("py") == b"py"
    await client.aclose()
    # An unknown certificate is refused, not trusted.
    untrusted = _fast(f"rediss://127.0.0.1:{port}/0", read_timeout=2.0)
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await untrusted.connect()
    # rediss:// to a cleartext Redis fails; it never falls back to cleartext.
    plain = _fast(f"rediss://127.0.0.1:{own_redis.port}/0?ssl_cert_reqs=none", read_timeout=2.0)
    with pytest.raises(RedisError):
        await plain.connect()
    await plain.close()


# -- the property: random batches, failures and drops on a real Redis -------------------------

KINDS = ["echo"] * 6 + ["unencodable", "error", "quit", "stall"]


@dataclass
class Call:
    kind: str
    token: str
    api: str
    answers: list[Any] = field(default_factory=list)


def _command(call: Call) -> Command:
    if call.kind == "echo":
        return ("ECHO", call.token)
    if call.kind == "unencodable":
        return ("ECHO", call.token + "\ud800")
    if call.kind == "error":
        return ("NOSUCHCOMMAND", call.token)
    if call.kind == "quit":
        return ("QUIT",)
    return ("BLPOP", f"resp-test:empty:{call.token}", str(STALL_S))


steps = st.lists(
    st.one_of(
        st.tuples(st.just("batch"), st.sampled_from(["now", "execute"]),
                  st.lists(st.sampled_from(KINDS), min_size=1, max_size=12)),
        st.tuples(st.just("kill")),
        st.tuples(st.just("turn")),
    ),
    min_size=1,
    max_size=14,
)


async def _run(url: str, plan: list[tuple[Any, ...]], example: int) -> list[Call]:
    fast = _fast(url)
    admin = aioredis.Redis.from_url(url)
    calls: list[Call] = []
    tasks: list[tuple[asyncio.Task[list[Any]], list[Call]]] = []
    try:
        for n, step in enumerate(plan):
            if step[0] == "kill":
                await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                continue
            if step[0] == "turn":
                await asyncio.sleep(0)
                continue
            _, api, kinds = step
            batch = [Call(k, f"{example}.{n}.{i}", api) for i, k in enumerate(kinds)]
            calls += batch
            commands = [_command(c) for c in batch]
            if api == "execute":
                tasks.append((asyncio.create_task(fast.execute(commands)), batch))
                continue
            if fast.ready_run_id() is None:
                try:
                    await fast.connect()
                except RedisError as exc:
                    for c in batch:
                        c.answers.append(exc)
                    continue
            fast.send_now(commands, lambda i, reply, b=batch: b[i].answers.append(reply))
        for task, batch in tasks:
            try:
                replies = await asyncio.wait_for(task, 10)
            except RedisError as exc:
                replies = [exc] * len(batch)
            assert len(replies) == len(batch)
            for c, reply in zip(batch, replies, strict=True):
                c.answers.append(reply)
        await until(lambda: all(c.answers for c in calls), 10)  # every caller is answered
        # Whatever happened, the connection serves the next call correctly. A drop still in
        # progress (QUIT answered, or a kill, whose close has not reached us yet) may fail one
        # call with a connection error, never with another caller's reply; the next call
        # reconnects.
        try:
            after = await fast.execute([("ECHO", f"{example}.after")])
        except RedisConnectionError:
            after = await fast.execute([("ECHO", f"{example}.after")])
        assert after == [f"{example}.after".encode()]
    finally:
        await fast.close()
        await admin.aclose()
    return calls


_examples = iter(range(10**9))


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps)
def test_every_caller_gets_its_own_reply_or_an_error(
    own_redis: RedisServer, plan: list[tuple[Any, ...]]
) -> None:
    calls = asyncio.run(_run(own_redis.url, plan, next(_examples)))
    for call in calls:
        assert len(call.answers) == 1, call  # exactly one answer each
        answer = call.answers[0]
        if call.kind == "echo":
            assert answer == call.token.encode() or isinstance(answer, RedisError), call
        elif call.kind == "unencodable":  # execute() raises when its batch's connection fails
            assert isinstance(answer, CommandEncodeError) or (
                call.api == "execute" and isinstance(answer, RedisError)
            ), call
        elif call.kind == "error":
            assert isinstance(answer, RedisError), call
        elif call.kind == "quit":
            assert answer == b"OK" or isinstance(answer, RedisError), call
        else:  # a stall outlives the read timeout: it never gets its (nil) reply
            assert isinstance(answer, RedisError), call
