"""How a player socket's frames reach its session, and its replies reach the wire.

A session (:class:`server.play.PlaySession`, the echo of :mod:`server.echo`) sees its socket
as a :class:`Link`: it is handed every incoming data frame through ``on_frame`` (a plain
call, no await) and writes a list of frames with :meth:`Link.write`, one call per loop tick,
so the replies of many bets answered together leave in one ``write`` system call.

Two links implement it:

- :class:`DirectLink`, when the server runs :class:`DirectProtocol` (the launcher and the
  tests do): uvicorn's sans-I/O WebSocket protocol, except that once the endpoint attaches,
  each data frame is handed to the session straight from ``data_received`` instead of going
  through the ASGI receive queue, and outgoing frames are framed here and written together.
  Through plain ASGI every frame costs a queue hop, an await, a pause and a resume of the
  socket's reading, and one ``write`` per reply; the profile of the bet path showed that
  layer as the largest single cost (docs/benchmarks.md).
- :class:`AsgiLink`, under any other ASGI server: the same interface over ``receive`` and
  ``send`` (one reader task, one writer task).

Either way the endpoint learns of the disconnect through ASGI ``receive``, and closes the
socket through ASGI ``send``, so the handshake and the close follow uvicorn's own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.protocol import OPEN

try:  # websockets' C helper, as its own frame parser uses
    from websockets.speedups import apply_mask as _unmask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask as _unmask

log = structlog.get_logger(__name__)

#: The ASGI scope extension through which :class:`DirectProtocol` offers itself.
EXTENSION = "stakepro.direct"
#: Bytes a client may leave unread before it is dropped (1008).
WRITE_LIMIT = 512 * 1024
#: Frames the ASGI link's writer may hold before the client is dropped (1008).
ASGI_QUEUE_FRAMES = 1024

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Session(Protocol):
    def on_frame(self, data: str | bytes) -> None: ...


class Link(Protocol):
    def write(self, frames: list[str | bytes]) -> bool:
        """Send ``frames`` in order; False if the client was too slow and is being dropped."""
        ...

    def write_prepared(self, payload: str | bytes, wire: bytes) -> int:
        """Send one frame whose wire form (:func:`framed`) was built once for many sockets;
        returns how many bytes now wait for this client."""
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def frame_header(opcode: int, length: int) -> bytes:
    """The header of a final, unmasked server frame carrying ``length`` payload bytes."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


_TEXT, _BINARY = 0x1, 0x2


def framed(payload: str | bytes) -> bytes:
    """``payload`` as one whole server frame (text for str, binary for bytes)."""
    if isinstance(payload, str):
        data = payload.encode()
        return frame_header(_TEXT, len(data)) + data
    return frame_header(_BINARY, len(payload)) + payload


class DirectProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, with the :data:`EXTENSION` offered in the
    scope (pass it as ``ws=`` to ``uvicorn.Config``; :func:`stakepro.run.uvicorn_config` does).
    Endpoints that do not attach are served exactly as by uvicorn."""

    session: Session | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the handshake was accepted by the protocol layer
            scope["extensions"][EXTENSION] = {"attach": self._attach}

    def _attach(self, session: Session) -> DirectLink:
        self.session = session
        return DirectLink(self)

    def data_received(self, data: bytes) -> None:
        """Whole unfragmented data frames go straight to the session; anything else (a
        control frame, a fragment, a frame cut by the read, a large or malformed one) goes
        through websockets' own parser, from that frame on."""
        session = self.session
        conn = self.conn
        if (
            session is None or self.close_sent or conn.state is not OPEN
            or conn.current_size is not None or conn.reader.buffer or conn.extensions
            or conn.parser_exc is not None
        ):
            super().data_received(data)
            return
        limit = conn.max_message_size or 0
        pos, end = 0, len(data)
        while pos + 6 <= end:
            first, second = data[pos], data[pos + 1]
            # FIN, no RSV bits, text or binary; masked (every client frame must be).
            if (first != 0x81 and first != 0x82) or second < 0x80:
                break
            length = second & 0x7F
            start = pos + 6
            if length == 126:
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 8
            elif length == 127:
                break
            stop = start + length
            if stop > end or length > limit:
                break  # cut by the read, or too large: websockets reports it (1009)
            pos = stop
            if not self._deliver(session, _unmask(data[start:stop], data[start - 4:start]),
                                 first == 0x81):
                return
            if self.close_sent or self.transport.is_closing():
                return
        if pos < end:
            super().data_received(data[pos:] if pos else data)

    def _deliver(self, session: Session, data: bytes, text: bool) -> bool:
        """Hand one whole message to the session; False if it was text that is not UTF-8
        (the connection is then failed with 1007)."""
        if not text:
            session.on_frame(data)
            return True
        try:
            decoded = data.decode()
        except UnicodeDecodeError:
            self.conn.send_close(1007)
            self.handle_parser_exception()
            return False
        session.on_frame(decoded)
        return True

    def handle_text(self, event: Frame) -> None:
        if self.session is None or not event.fin:
            super().handle_text(event)
        elif not self.close_sent:
            self._deliver(self.session, bytes(event.data), True)

    def handle_bytes(self, event: Frame) -> None:
        if self.session is None or not event.fin:
            super().handle_bytes(event)
        elif not self.close_sent:
            self._deliver(self.session, bytes(event.data), False)

    def send_receive_event_to_app(self) -> None:
        # A fragmented message completed (handle_cont): deliver it like a whole frame.
        if self.session is None:
            super().send_receive_event_to_app()
            return
        data = b"".join(self.frames)
        self.frames = []
        if not self.close_sent:
            self._deliver(self.session, data, self.curr_msg_data_type == "text")


class TickWriter:
    """The frames a session sends during one loop tick, written to its link together at the
    end of the tick: the replies of all the bets one read brought leave in one write."""

    def __init__(self, on_too_slow: Callable[[], None] | None = None) -> None:
        self.link: Link | None = None
        self._frames: list[str | bytes] = []
        self._loop = asyncio.get_running_loop()
        self._on_too_slow = on_too_slow
        self._stopped = False

    def add(self, frame: str | bytes) -> None:
        if self._stopped:
            return
        self._frames.append(frame)
        if len(self._frames) == 1:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        frames, self._frames = self._frames, []
        if self._stopped or self.link is None or not frames:
            return
        if not self.link.write(frames) and self._on_too_slow is not None:
            self._on_too_slow()

    def stop(self, flush: bool = True) -> None:
        """Write what is queued (unless ``flush`` is False); ignore every later frame."""
        if flush:
            self.flush()
        self._stopped = True


class DirectLink:
    """A :class:`Link` writing straight to the transport of a :class:`DirectProtocol`."""

    def __init__(self, protocol: DirectProtocol) -> None:
        self._protocol = protocol
        self._paused = False

    def write(self, frames: list[str | bytes]) -> bool:
        protocol = self._protocol
        transport = protocol.transport
        if protocol.close_sent or transport.is_closing():
            return True
        parts: list[bytes] = []
        # Anything the protocol itself queued (a pong, say) goes first.
        parts.extend(protocol.conn.data_to_send())
        for frame in frames:
            if isinstance(frame, str):
                payload = frame.encode()
                parts.append(frame_header(_TEXT, len(payload)))
            else:
                payload = frame
                parts.append(frame_header(_BINARY, len(payload)))
            parts.append(payload)
        transport.write(b"".join(parts))
        return transport.get_write_buffer_size() <= WRITE_LIMIT

    def write_prepared(self, payload: str | bytes, wire: bytes) -> int:
        protocol = self._protocol
        transport = protocol.transport
        if protocol.close_sent or transport.is_closing():
            return 0
        pending = protocol.conn.data_to_send()
        if pending:
            transport.write(b"".join(pending))
        transport.write(wire)
        return int(transport.get_write_buffer_size())

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            with contextlib.suppress(RuntimeError):  # already closing
                self._protocol.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            transport = self._protocol.transport
            if not transport.is_closing():
                transport.resume_reading()


class AsgiLink:
    """A :class:`Link` over plain ASGI: a reader task feeds ``on_frame``, a writer task sends
    queued frames one ASGI message each."""

    def __init__(self, session: Session, receive: Receive, send: Send) -> None:
        self._session = session
        self._receive = receive
        self._send = send
        self._readable = asyncio.Event()
        self._readable.set()
        self._out: asyncio.Queue[str | bytes] = asyncio.Queue(ASGI_QUEUE_FRAMES)
        self._queued_bytes = 0
        self._writer = asyncio.create_task(self._write_loop())

    async def read_until_disconnect(self) -> None:
        while True:
            await self._readable.wait()
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("text")
            self._session.on_frame(data if data is not None else message.get("bytes") or b"")

    def write(self, frames: list[str | bytes]) -> bool:
        for frame in frames:
            try:
                self._out.put_nowait(frame)
            except asyncio.QueueFull:
                return False
            self._queued_bytes += len(frame)
        return True

    def write_prepared(self, payload: str | bytes, wire: bytes) -> int:
        if not self.write([payload]):
            return 1 << 62
        return self._queued_bytes

    async def drain(self) -> None:
        """Wait until every queued frame was handed to the server."""
        await self._out.join()

    def pause_reading(self) -> None:
        self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    async def _write_loop(self) -> None:
        while True:
            frame = await self._out.get()
            try:
                if isinstance(frame, str):
                    await self._send({"type": "websocket.send", "text": frame})
                else:
                    await self._send({"type": "websocket.send", "bytes": frame})
            except Exception:  # the client is gone: the reader sees the disconnect
                return
            finally:
                self._queued_bytes -= len(frame)
                self._out.task_done()

    async def close(self) -> None:
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._writer


class Endpoint:
    """Accept the socket, attach a session to the best link the server offers, and run
    until the client disconnects.

    ``session_factory(link, close)`` builds the session; ``close(code)`` (a coroutine
    function) sends the close frame after every frame written so far.
    """

    def __init__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.asgi_link: AsgiLink | None = None
        self.link: Link | None = None
        self.closed = False

    async def accept(self) -> bool:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            return False
        await self._send({"type": "websocket.accept"})
        return True

    def attach(self, session: Session) -> Link:
        direct = self.scope.get("extensions", {}).get(EXTENSION)
        if direct is not None:
            self.link = direct["attach"](session)
        else:
            self.link = self.asgi_link = AsgiLink(session, self._receive, self._send)
        return self.link

    async def until_disconnect(self) -> None:
        if self.asgi_link is not None:
            await self.asgi_link.read_until_disconnect()
            return
        while (await self._receive())["type"] != "websocket.disconnect":
            pass

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self.link is not None:
            # Read again if the session had paused: the client's close frame must be seen
            # (later frames are dropped by the session, or by the protocol once closing).
            self.link.resume_reading()
        if self.asgi_link is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.asgi_link.drain(), 5.0)
        with contextlib.suppress(Exception):  # already gone
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def finish(self) -> None:
        if self.asgi_link is not None:
            await self.asgi_link.close()


class RawAsgi:
    """Marks ``app`` as a plain ASGI app for starlette's routes, which would otherwise
    wrap a function in its ``WebSocket`` session (one more layer per frame)."""

    def __init__(self, app: Callable[[dict[str, Any], Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
