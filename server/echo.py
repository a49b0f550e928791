"""``/debug/echo/ws/play``: the player protocol's shape with no work behind it.

Only mounted with ``DEBUG_ECHO=true``. It answers ``auth`` with a fixed welcome and every
``bet`` with a fixed ``bet_result`` of the same size and shape as a real one, in the frame's
encoding, through the same uvicorn, starlette and codec as /ws/play. The load tester runs
the same bets against it (``--url ws://HOST:PORT/debug/echo``) to measure the ceiling the
socket layer alone allows; the real bet path's throughput is reported as a ratio of it.
"""

from __future__ import annotations

from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from server import codec
from server.codec import Encoding

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


async def echo_endpoint(ws: WebSocket) -> None:
    await ws.accept()
    nonce = 0
    try:
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                return
            data = frame.get("text")
            encoding: Encoding = "json"
            if data is None:
                data, encoding = frame.get("bytes") or b"", "msgpack"
            message = codec.decode(data)
            kind = message.get("type")
            if kind == "auth":
                reply = {**_WELCOME, "id": message.get("id")}
            elif kind == "bet":
                nonce += 1
                reply = _result(message.get("id"), nonce)
            else:
                reply = {"type": "pong", "id": message.get("id")}
            out = codec.encode(reply, encoding)
            if isinstance(out, str):
                await ws.send_text(out)
            else:
                await ws.send_bytes(out)
    except WebSocketDisconnect:
        return
