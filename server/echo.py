"""``/debug/echo/ws/play``: the player protocol's shape with no work behind it.

Only mounted with ``DEBUG_ECHO=true``. It answers ``auth`` with a fixed welcome and every
``bet`` with a fixed ``bet_result`` of the same size and shape as a real one, in the frame's
encoding, through the same uvicorn protocol, socket layer (server/wslink.py: frames handed
over by a plain call, the replies of one loop tick written together) and codec as /ws/play.
The load tester runs the same bets against it (``--url ws://HOST:PORT/debug/echo``) to
measure the ceiling the socket layer alone allows; the real bet path's throughput is
reported as a ratio of it.
"""

from __future__ import annotations

from typing import Any

from games.errors import BadMessage
from server import codec
from server.codec import Encoding
from server.wslink import Endpoint, Receive, Send, TickWriter

_WELCOME: dict[str, Any] = {
    "type": "welcome", "user_id": 0, "balances": {"USDT": "1000000.00", "BTC": "0.00000000"},
    "seed": {"server_seed_hash": "0" * 64, "client_seed": "echo", "nonce": 0},
}


def _result(request_id: Any, nonce: int) -> dict[str, Any]:
    return {
        "type": "bet_result", "id": request_id, "bet_id": f"1-{nonce}", "roll": "50.00",
        "win": False, "multiplier": "1.9800", "payout": "0.00", "balance": "1000000.00",
        "nonce": nonce, "server_seed_hash": "0" * 64, "client_seed": "echo",
    }


class EchoReplies:
    """The replies of one echo socket: a fixed welcome, a fixed ``bet_result`` per bet
    (the nonce counts up), ``pong`` for anything else, each in the frame's encoding."""

    def __init__(self) -> None:
        self.nonce = 0

    def reply(self, data: str | bytes) -> str | bytes:
        encoding: Encoding = "json" if isinstance(data, str) else "msgpack"
        try:
            message = codec.decode(data)
        except BadMessage as exc:
            reply = codec.error(exc.code, exc.message, None)
        else:
            kind = message.get("type")
            if kind == "auth":
                reply = {**_WELCOME, "id": message.get("id")}
            elif kind == "bet":
                self.nonce += 1
                reply = _result(message.get("id"), self.nonce)
            else:
                reply = {"type": "pong", "id": message.get("id")}
        return codec.encode(reply, encoding)


class EchoSession:
    def __init__(self) -> None:
        self.out = TickWriter()
        self.replies = EchoReplies()

    def on_frame(self, data: str | bytes) -> None:
        self.out.add(self.replies.reply(data))


async def echo_endpoint(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    endpoint = Endpoint(scope, receive, send)
    if not await endpoint.accept():
        return
    session = EchoSession()
    session.out.link = endpoint.attach(session)
    try:
        await endpoint.until_disconnect()
    finally:
        await endpoint.finish()
