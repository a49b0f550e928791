"""The ``bets`` load over picows, driven from picows' frame callback: no coroutine, future
or task per bet (``--client picows``, the default when picows is installed).

One :class:`BetListener` per socket. After the welcome, every received frame is handled in
``on_ws_frame`` as it is parsed:

- a ``bet_result`` is recognised by its first bytes (``type`` then ``id``, as the server
  writes them; anything else is decoded whole and handled like the generic client does),
  its id taken from its fixed offset, its latency tallied (:meth:`loadtest.tally.Tally.reply`);
- closed loop: each answered bet makes one more bet due, and the due bets are written when
  the frame is the last one of the bytes read (``frame.last_in_buffer``), all in one write:
  several replies read at once cost one ``send`` system call, not several;
- paced (``--rate``): one :class:`Pacer` for all sockets wakes every ``tick`` (1 to 10
  ms) and has each socket send the bets due on it by then, in one write (the loop would
  otherwise wake for every bet); a full socket (``inflight`` unanswered) sends at the
  first tick after a reply frees a slot.

Bet frames are built here, not by picows: the bet's bytes are the template's with the id
spliced in, masked with the socket's mask key (one random key per socket, not per frame:
this is a load generator, the server only unmasks), so that several can go out in one
write. Latency is per bet, from the write that carried it to the reply's frame callback.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack
import picows  # type: ignore[import-not-found,unused-ignore]

from loadtest.options import BetsOptions
from loadtest.tally import Tally, take_reply
from loadtest.wire import decode

BINARY = picows.WSMsgType.BINARY
TEXT = picows.WSMsgType.TEXT
CLOSE = picows.WSMsgType.CLOSE
#: Stands for the id in the template; ids are ``(socket + 1) << 32 | serial``: always
#: msgpack uint64 (``0xcf`` and 8 bytes).
_PLACEHOLDER = 2**64 - 1
#: How a msgpack ``bet_result`` of the server starts after its map header, up to the id's
#: 8 bytes; and a compact JSON one, up to the id's digits.
_MSGPACK_RESULT = b"\xa4type\xaabet_result\xa2id\xcf"
_MSGPACK_ID_AT = 1 + len(_MSGPACK_RESULT)
_JSON_RESULT = b'{"type":"bet_result","id":'
_JSON_ID_AT = len(_JSON_RESULT)


def _decode(payload: bytes, binary: bool) -> dict[str, Any]:
    """A frame's payload (picows gives bytes for both kinds) as a message map."""
    return decode(payload if binary else payload.decode())


class BetTemplate:
    """The run's bet frame payload, split around the id."""

    def __init__(self, options: BetsOptions) -> None:
        self.binary = options.encoding == "msgpack"
        message = {
            "type": "bet", "id": _PLACEHOLDER, "currency": options.currency,
            "amount": options.amount, "target": options.target,
            "direction": options.direction,
        }
        if self.binary:
            raw, marker = msgpack.packb(message), b"\xcf" + _PLACEHOLDER.to_bytes(8, "big")
        else:
            raw = json.dumps(message, separators=(",", ":")).encode()
            marker = str(_PLACEHOLDER).encode()
        self.prefix, self.suffix = raw.split(marker)
        if self.binary:
            self.prefix += b"\xcf"
        self.opcode = 0x82 if self.binary else 0x81

    def id_bytes(self, bet_id: int) -> bytes:
        return bet_id.to_bytes(8, "big") if self.binary else b"%d" % bet_id

    def payload(self, bet_id: int) -> bytes:
        return self.prefix + self.id_bytes(bet_id) + self.suffix


def mask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """``data`` XOR the repeated 4-byte ``key``, ``data`` starting at ``offset`` of the
    payload (RFC 6455 5.3)."""
    n = len(data)
    repeated = (key * ((offset + n) // 4 + 1))[offset:offset + n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


class Masker:
    """Client frames of one socket's bets (RFC 6455 5.2: FIN and opcode, masked length,
    key, masked payload) under one mask key. The header, key and masked template around
    the id are kept per id length, so a frame is three pieces of which only the id's
    (one integer XOR) is computed per bet."""

    def __init__(self, template: BetTemplate) -> None:
        self.template = template
        self.key = os.urandom(4)
        #: id length -> (header + key + masked prefix, the id's key as an int, masked suffix)
        self._by_length: dict[int, tuple[bytes, int, bytes]] = {}

    def pieces(self, bet_id: int) -> tuple[bytes, bytes, bytes]:
        raw = self.template.id_bytes(bet_id)
        n = len(raw)
        known = self._by_length.get(n)
        if known is None:
            known = self._by_length[n] = self._prepare(n)
        head, key, tail = known
        return head, (int.from_bytes(raw, "big") ^ key).to_bytes(n, "big"), tail

    def frame(self, bet_id: int) -> bytes:
        return b"".join(self.pieces(bet_id))

    def _prepare(self, id_length: int) -> tuple[bytes, int, bytes]:
        t = self.template
        n = len(t.prefix) + id_length + len(t.suffix)
        if n < 126:
            head = bytes((t.opcode, 0x80 | n))
        elif n < 1 << 16:
            head = bytes((t.opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((t.opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        at = len(t.prefix)
        id_key = int.from_bytes(mask(bytes(id_length), self.key, at), "big")
        return (head + self.key + mask(t.prefix, self.key),
                id_key, mask(t.suffix, self.key, at + id_length))


class BetListener(picows.WSListener):  # type: ignore[misc,unused-ignore]
    """One player socket of the run: the welcome, then bets from the frame callback."""

    def __init__(self, index: int, options: BetsOptions, tally: Tally,
                 template: BetTemplate, pacer: Pacer | None = None) -> None:
        self.options = options
        self.tally = tally
        self.template = template
        self.masker = Masker(template)
        self.base = (index + 1) << 32
        self.serial = 0
        self.pending: dict[int, int] = {}
        self.inflight = options.inflight
        self.stop_ns = int(tally.stop_at * 1e9)
        self.on_result: Callable[[dict[str, Any], int], None] | None = options.on_result
        self.transport: Any = None
        self.write: Callable[[bytes], None] | None = None
        loop = asyncio.get_running_loop()
        self.loop = loop
        #: The welcome (or the refusal) to the ``auth`` frame.
        self.welcome: asyncio.Future[dict[str, Any]] = loop.create_future()
        #: Set when the run of this socket is over (or failed: ConnectionError, ValueError).
        self.done: asyncio.Future[None] = loop.create_future()
        self.started = False
        self.finished = False
        self.due = 0
        # Paced mode.
        self.pacer = pacer
        self.paced = pacer is not None
        self.interval = pacer.interval if pacer is not None else 0.0
        self.next_at = 0.0
        self.pacing_over = not self.paced

    # -- picows callbacks --------------------------------------------------------------

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport
        self.write = transport.underlying_transport.write

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        kind = frame.msg_type
        if kind != BINARY and kind != TEXT:
            if kind == CLOSE:
                transport.disconnect()
            return
        payload: bytes = frame.get_payload_as_bytes()
        if not self.started:
            self._before_start(payload)
            return
        now = time.perf_counter_ns()
        bet_id = -1
        if self.template.binary:
            if payload.startswith(_MSGPACK_RESULT, 1) and payload[0] & 0xF0 == 0x80:
                bet_id = int.from_bytes(payload[_MSGPACK_ID_AT:_MSGPACK_ID_AT + 8], "big")
        elif payload.startswith(_JSON_RESULT):
            end = payload.find(b",", _JSON_ID_AT)
            if end > 0:
                try:
                    bet_id = int(payload[_JSON_ID_AT:end])
                except ValueError:
                    bet_id = -1
        if bet_id >= 0:
            sent = self.pending.pop(bet_id, None)
            if sent is None:
                self.tally.errors["UNKNOWN_ID"] += 1
                answered = False
            else:
                self.tally.reply(sent, now)
                if self.on_result is not None:
                    self.on_result(_decode(payload, self.template.binary), time.time_ns())
                answered = True
        else:
            answered = self._other(payload, now)
        if answered and not self.paced and now < self.stop_ns:
            self.due += 1
        if frame.last_in_buffer:
            if self.due:
                self._send(self.due)
                self.due = 0
            if not self.pending and self.pacing_over:
                self._finish(None)

    def on_ws_disconnected(self, transport: Any) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("socket closed"))
        self._finish(ConnectionError("socket closed"))

    # -- the bets ------------------------------------------------------------------------

    def start(self) -> None:
        """Send the first bets (closed loop) or join the run's pacer."""
        self.started = True
        if self.pacer is None:
            self._send(self.inflight)
            return
        self.next_at = self.loop.time()
        self.pacer.add(self)

    def _send(self, count: int) -> None:
        write = self.write
        if self.finished or write is None:
            return
        now = time.perf_counter_ns()
        base, pending, pieces = self.base, self.pending, self.masker.pieces
        serial = self.serial
        if count == 1:
            serial += 1
            pending[base + serial] = now
            data = b"".join(pieces(base + serial))
        else:
            parts: list[bytes] = []
            for _ in range(count):
                serial += 1
                pending[base + serial] = now
                parts.extend(pieces(base + serial))
            data = b"".join(parts)
        self.serial = serial
        write(data)

    def pace(self, now: float, stop: float) -> bool:
        """Send the bets due by ``now`` (loop time) in one write; False once this socket's
        pacing is over (``stop`` reached, or the socket finished)."""
        if self.finished:
            return False
        if now >= stop or self.next_at >= stop:
            self.pacing_over = True
            if not self.pending:
                self._finish(None)
            return False
        count, room, next_at, interval = 0, self.inflight - len(self.pending), self.next_at, \
            self.interval
        while next_at <= now and count < room and next_at < stop:
            count += 1
            next_at = max(next_at + interval, now - interval)  # no catch-up burst
        if count:
            self.next_at = next_at
            self._send(count)
        return True

    def _other(self, payload: bytes, now: int) -> bool:
        """A frame that is not a plain ``bet_result``: decoded whole."""
        try:
            message = _decode(payload, self.template.binary)
        except ValueError as exc:
            self._finish(exc)
            if self.transport is not None:
                self.transport.disconnect()
            return False
        return take_reply(message, now, self.pending, self.tally, self.options)

    def _before_start(self, payload: bytes) -> None:
        """The answer to ``auth``: a balance push (another socket of the same player
        betting) can arrive before the welcome; frames after it wait for :meth:`start`."""
        if self.welcome.done():
            return
        try:
            message = _decode(payload, self.template.binary)
        except ValueError as exc:
            self.welcome.set_exception(exc)
            return
        if message.get("type") != "balance":
            self.welcome.set_result(message)

    def _finish(self, failure: BaseException | None) -> None:
        if self.finished:
            return
        self.finished = True
        if not self.done.done():
            if failure is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(failure)


class Pacer:
    """The ``--rate`` clock of one run: every ``tick`` seconds each paced socket sends the
    bets due on it (``rate / connections`` a second each, never more than ``inflight``
    unanswered, no catch-up burst after a stall), until the end of the measured window.
    A bet waits at most one tick past its time; the rate holds on average."""

    def __init__(self, options: BetsOptions, stop_at: float) -> None:
        assert options.rate
        self.interval = options.connections / options.rate
        self.tick = min(max(self.interval / 8, 0.001), 0.01)
        loop = asyncio.get_running_loop()
        self.loop = loop
        #: ``stop_at`` (perf_counter) on the loop's clock.
        self.stop = loop.time() + (stop_at - time.perf_counter())
        self.sockets: list[BetListener] = []
        self.timer: asyncio.TimerHandle | None = None

    def add(self, socket: BetListener) -> None:
        self.sockets.append(socket)
        socket.pace(self.loop.time(), self.stop)
        if self.timer is None:
            self.timer = self.loop.call_later(self.tick, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        stop = self.stop
        self.sockets = [s for s in self.sockets if s.pace(now, stop)]
        self.timer = self.loop.call_at(now + self.tick, self._tick) if self.sockets else None


async def drive_picows(
    index: int, player: Any, options: BetsOptions, tally: Tally, start_at: float,
    template: BetTemplate, pacer: Pacer | None = None,
) -> None:
    """One socket of :func:`loadtest.bets.run_bets` over picows: sign in, bet until
    ``tally.stop_at``, drain; errors counted like the generic driver does."""
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    if time.perf_counter() >= tally.stop_at:
        return
    try:
        transport, listener = await asyncio.wait_for(
            picows.ws_connect(lambda *_: BetListener(index, options, tally, template, pacer),
                              options.play_url,
                              websocket_handshake_timeout=options.connect_timeout,
                              max_frame_size=2**20),
            options.connect_timeout,
        )
    except Exception:
        tally.errors["CONNECT"] += 1
        return
    assert isinstance(listener, BetListener)
    tally.pending.append(listener.pending)
    opened = False
    try:
        auth = {"type": "auth", "token": player.token}
        if template.binary:
            transport.send(BINARY, msgpack.packb(auth))
        else:
            transport.send(TEXT, json.dumps(auth).encode())
        welcome = await asyncio.wait_for(listener.welcome, options.connect_timeout)
        if welcome.get("type") != "welcome":
            tally.errors[f"AUTH_{welcome.get('code', welcome.get('type'))}"] += 1
            return
        tally.open_sockets += 1
        opened = True
        loop = asyncio.get_running_loop()
        drain_deadline = (loop.time() + (tally.stop_at - time.perf_counter())
                          + options.drain_timeout)
        listener.start()
        try:
            async with asyncio.timeout_at(drain_deadline):
                await listener.done
        except TimeoutError:
            tally.errors["UNANSWERED"] += len(listener.pending)
            listener.pending.clear()
    except (ConnectionError, TimeoutError, ValueError):
        tally.errors["CLOSED"] += 1
    finally:
        listener._finish(None)
        if opened:
            tally.open_sockets -= 1
        try:
            if not transport.is_disconnected:
                transport.send_close(picows.WSCloseCode.OK)
                transport.disconnect()
            await asyncio.wait_for(transport.wait_disconnected(), 2)
        except Exception:
            pass
