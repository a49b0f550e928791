"""Hostile frames for the player socket: hypothesis strategies, a corpus built from them, a
raw pipelining client, and a collector of error-level log lines.

Hypothesis draws about 300 µs per frame, too slow for the 100,000 frames a test run sends,
so it draws a corpus (derandomised: the same corpus every run) and :func:`expand` stretches
it to any length with seeded byte-level mutations (truncation, a flipped byte, a splice of
two frames), which reach the states a well-formed value cannot: half a map, a string cut in
the middle of a UTF-8 sequence, a length prefix that lies.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import msgpack
import structlog
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Close
from websockets.protocol import State
from websockets.uri import parse_uri

#: Every error code of PROTOCOL.md.
PROTOCOL_CODES = frozenset({
    "BAD_MESSAGE", "UNAUTHORIZED", "INVALID_AMOUNT", "INVALID_TARGET", "UNKNOWN_CURRENCY",
    "INSUFFICIENT_FUNDS", "BET_LIMIT", "INVALID_SEED", "RATE_LIMITED", "IDEMPOTENCY_CONFLICT",
    "UNAVAILABLE",
})
#: Replies that are not errors and that a zero-balance player may legitimately get.
LEGITIMATE = frozenset({"pong", "seed_rotated"})
#: Frames stay under the server's 64 KiB limit (the 1009 close has its own test).
MAX_FRAME = 60_000

_plain = st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=24)
_json_scalars = _plain | st.integers()
#: msgpack carries integers from -2**63 to 2**64 - 1 (past int64 is past what ids accept)
_msgpack_scalars = _plain | st.integers(-(2**63), 2**64 - 1)
_fields = st.sampled_from(
    ["type", "id", "token", "currency", "amount", "target", "direction", "client_seed"]
)
_plausible = st.sampled_from(
    ["bet", "ping", "rotate_seed", "auth", "USDT", "BTC", "EUR", "1.00", "0.01", "50", "50.00",
     "98.01", "-1", "1e3", "under", "over", "seed-1", "", "NaN", "0", "10000.01"]
)


def _json_values() -> st.SearchStrategy[Any]:
    return st.recursive(
        _json_scalars | _plausible,
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(_fields | st.text(max_size=8), inner, max_size=5),
        max_leaves=12,
    )


def _msgpack_values() -> st.SearchStrategy[Any]:
    keys = (
        _fields | st.text(max_size=8) | st.integers(-(2**63), 2**63) | st.binary(max_size=8)
        | st.none() | st.booleans() | st.floats(allow_nan=False)
    )
    extras = (
        st.binary(max_size=24)
        | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
        | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999))
    )
    return st.recursive(
        _msgpack_scalars | _plausible | extras,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
        max_leaves=12,
    )


_decimal = st.from_regex(r"-?[0-9]{1,7}(\.[0-9]{0,10})?", fullmatch=True)
#: Per field, values a client that meant well might send (or nearly).
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "id": st.integers(-(2**63), 2**63 - 1) | st.text(min_size=1, max_size=64),
    "token": st.text(max_size=44),
    "currency": st.sampled_from(["USDT", "BTC", "EUR", "usdt", ""]),
    "amount": _decimal | st.sampled_from(["0.01", "1.00", "0.00000001", "1e3", "NaN"]),
    "target": _decimal | st.sampled_from(["50", "50.00", "98.00", "98.01", "0.01", "1.999"]),
    "direction": st.sampled_from(["under", "over", "sideways"]),
    "client_seed": st.from_regex(r"[A-Za-z0-9._ -]{0,70}", fullmatch=True),
}


def _messages(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Maps shaped like requests: a plausible type, and fields that are mostly plausible
    and sometimes anything at all."""
    kinds = st.sampled_from(["bet", "bet", "bet", "ping", "rotate_seed", "auth"])
    return st.fixed_dictionaries(
        {"type": kinds | _plausible | values},
        optional={name: plausible | plausible | values
                  for name, plausible in _FIELD_VALUES.items()},
    )


def _bets(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Bets with every field, most of them plausible: these reach the checks past the
    envelope (currency, amount, target, limits, funds)."""
    fields = ("id", "currency", "amount", "target", "direction")
    return st.fixed_dictionaries({
        "type": st.just("bet"),
        **{name: _FIELD_VALUES[name] | _FIELD_VALUES[name] | _FIELD_VALUES[name] | values
           for name in fields},
    })


def _nested(n: int, text: bool) -> str | bytes:
    if text:
        return "[" * n + "]" * n
    return b"\x91" * n + b"\xc0"


frames: st.SearchStrategy[str | bytes] = st.one_of(
    _messages(_json_values()).map(json.dumps),
    _bets(_json_values()).map(json.dumps),
    _bets(_msgpack_values()).map(msgpack.packb),
    _json_values().map(json.dumps),
    _messages(_msgpack_values()).map(msgpack.packb),
    _msgpack_values().map(msgpack.packb),
    st.text(max_size=64),
    st.binary(max_size=64),
    st.builds(_nested, st.integers(1, 30_000), st.booleans()),
).filter(lambda frame: len(frame) <= MAX_FRAME)


@functools.cache
def corpus(size: int) -> list[str | bytes]:
    """``size`` frames drawn by hypothesis, the same ones every run."""
    drawn: list[str | bytes] = []

    @settings(max_examples=size, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(frames)
    def draw(frame: str | bytes) -> None:
        drawn.append(frame)

    draw()
    return drawn


def _mutate(rng: random.Random, frame: str | bytes, other: str | bytes) -> str | bytes:
    raw = frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame
    choice = rng.randrange(4)
    if choice == 0 or not raw:
        return frame
    if choice == 1:
        raw = raw[: rng.randrange(len(raw))]
    elif choice == 2:
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes((raw[i] ^ (1 << rng.randrange(8)),)) + raw[i + 1:]
    else:
        tail = other.encode("utf-8", "surrogatepass") if isinstance(other, str) else other
        raw = (raw + tail)[:MAX_FRAME]
    # A text frame must be UTF-8 (else the socket is rightly failed with 1007, which the
    # conformance suite covers): a mutation that broke it goes out as a binary frame.
    if isinstance(frame, str):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return raw
    return raw


def expand(base: list[str | bytes], count: int, seed: int) -> Iterator[str | bytes]:
    """``count`` frames: the corpus, then seeded mutations of it."""
    rng = random.Random(seed)
    for i in range(count):
        frame = base[i % len(base)]
        if i >= len(base):
            frame = _mutate(rng, frame, base[rng.randrange(len(base))])
        yield frame


class RawClient:
    """A player socket driven through websockets' sans-I/O client protocol: frames are
    masked and framed without awaiting, so thousands can be pipelined per write."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: ClientProtocol) -> None:
        self.reader, self.writer, self.protocol = reader, writer, protocol
        self.messages: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.close_code: int | None = None
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, address: str, path: str = "/ws/play") -> RawClient:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        protocol = ClientProtocol(parse_uri(f"ws://{address}{path}"), max_size=2**20)
        protocol.send_request(protocol.connect())
        writer.write(b"".join(protocol.data_to_send()))
        while protocol.handshake_exc is None and protocol.state is State.CONNECTING:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            protocol.receive_data(data)
            protocol.events_received()  # the handshake response
        if protocol.handshake_exc is not None:
            raise protocol.handshake_exc
        return cls(reader, writer, protocol)

    def send(self, frames: list[str | bytes]) -> None:
        for frame in frames:
            if isinstance(frame, str):
                self.protocol.send_text(frame.encode("utf-8", "surrogatepass"))
            else:
                self.protocol.send_binary(frame)
        self.writer.write(b"".join(self.protocol.data_to_send()))

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    self.protocol.receive_eof()
                else:
                    self.protocol.receive_data(data)
                for event in self.protocol.events_received():
                    if event.opcode.value in (1, 2):
                        self.messages.put_nowait(
                            event.data.decode() if event.opcode.value == 1 else event.data)
                    elif event.opcode.value == 8:
                        self.close_code = Close.parse(event.data).code if event.data else 1005
                pending = self.protocol.data_to_send()
                if pending and not self.writer.is_closing():
                    self.writer.write(b"".join(pending))
                if not data or self.protocol.state is State.CLOSED:
                    return
        finally:
            self.messages.put_nowait(None)

    async def recv(self) -> dict[str, Any] | None:
        """The next message, decoded; None once the socket is closed."""
        frame = await self.messages.get()
        if frame is None:
            self.messages.put_nowait(None)
            return None
        decoded = json.loads(frame) if isinstance(frame, str) else msgpack.unpackb(frame)
        assert isinstance(decoded, dict), decoded
        return decoded

    async def close(self) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self.writer.write(b"".join(self.protocol.data_to_send()))
        try:
            await asyncio.wait_for(self._task, 5)
        finally:
            self.writer.close()


class ErrorLog:
    """Every log line at error level or above while it is installed: structlog's (a
    processor added in front of the configured ones, which cached loggers share) and the
    standard library's (uvicorn's "Exception in ASGI application", asyncio's "Exception in
    callback")."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._handler = logging.Handler(logging.ERROR)
        self._handler.emit = lambda record: self.lines.append(record.getMessage())  # type: ignore[method-assign]
        self._loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "asyncio")]

    def _processor(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if method in ("error", "exception", "critical", "fatal"):
            self.lines.append(f"{method}: {event.get('event')}")
        return event

    def __enter__(self) -> ErrorLog:
        structlog.get_config()["processors"].insert(0, self._processor)
        for logger in self._loggers:
            logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        structlog.get_config()["processors"].remove(self._processor)
        for logger in self._loggers:
            logger.removeHandler(self._handler)
