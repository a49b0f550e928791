""":class:`loadtest.client.Socket` over picows (optional: ``pip install picows``).

picows hands every frame to a callback; the adapter keeps them in a deque and wakes one
waiting ``recv``. Decoding stays in Python (msgpack / json) as with the default client, so
the difference measured is the WebSocket layer alone.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
import picows  # type: ignore[import-not-found,unused-ignore]

from loadtest.wire import Encoding, decode


class _Listener(picows.WSListener):  # type: ignore[misc,unused-ignore]
    def __init__(self) -> None:
        self.frames: deque[str | bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        kind = frame.msg_type
        if kind == picows.WSMsgType.BINARY:
            self.frames.append(frame.get_payload_as_bytes())
        elif kind == picows.WSMsgType.TEXT:
            self.frames.append(frame.get_payload_as_utf8_text())
        elif kind == picows.WSMsgType.CLOSE:
            self.closed = True
            transport.disconnect()
        else:
            return
        self._wake()

    def on_ws_disconnected(self, transport: Any) -> None:
        self.closed = True
        self._wake()


class PicowsSocket:
    def __init__(self, transport: Any, listener: _Listener, encoding: Encoding) -> None:
        self.transport = transport
        self.listener = listener
        self.binary = encoding == "msgpack"

    async def send(self, message: dict[str, Any]) -> None:
        if self.listener.closed:
            raise ConnectionError("socket closed")
        if self.binary:
            self.transport.send(picows.WSMsgType.BINARY, msgpack.packb(message))
        else:
            self.transport.send(picows.WSMsgType.TEXT, json.dumps(message).encode())

    async def recv(self) -> dict[str, Any]:
        listener = self.listener
        while not listener.frames:
            if listener.closed:
                raise ConnectionError("socket closed")
            listener.waiter = asyncio.get_running_loop().create_future()
            await listener.waiter
            listener.waiter = None
        return decode(listener.frames.popleft())

    async def close(self) -> None:
        try:
            if not self.listener.closed:
                self.transport.send_close(picows.WSCloseCode.OK)
                self.transport.disconnect()
            await asyncio.wait_for(self.transport.wait_disconnected(), 2)
        except Exception:
            pass


class FrameListener(picows.WSListener):  # type: ignore[misc,unused-ignore]
    """Hands every data frame to ``on_frame(msg_type, payload)`` from picows' callback (the
    payload is a memoryview into picows' read buffer, valid during the call only), and the
    end of the connection to ``on_closed(reason)``; ``gone`` is then done."""

    def __init__(self, on_frame: Callable[[Any, memoryview], None],
                 on_closed: Callable[[str], None]) -> None:
        self.on_frame = on_frame
        self.on_closed = on_closed
        self.close_code: int | None = None
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        kind = frame.msg_type
        if kind == picows.WSMsgType.BINARY or kind == picows.WSMsgType.TEXT:
            self.on_frame(kind, frame.get_payload_as_memoryview())
        elif kind == picows.WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        self.on_closed("DISCONNECTED" if self.close_code is None
                       else f"CLOSED_{self.close_code}")
        if not self.gone.done():
            self.gone.set_result(None)


async def open_picows(
    url: str, encoding: Encoding, open_timeout: float, local_host: str | None
) -> PicowsSocket:
    extra: dict[str, Any] = {}
    if local_host is not None:
        extra["local_addr"] = (local_host, 0)
    try:
        transport, listener = await asyncio.wait_for(
            picows.ws_connect(_Listener, url, websocket_handshake_timeout=open_timeout,
                              max_frame_size=2**20, **extra),
            open_timeout,
        )
    except picows.WSError as exc:
        raise ConnectionError(str(exc)) from exc
    assert isinstance(listener, _Listener)
    return PicowsSocket(transport, listener, encoding)
