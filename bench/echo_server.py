"""The load-test issue's reference echo: a bare WebSocket echo on stock uvicorn.

The issue measured its prototypes against "a bare WebSocket echo of the same frames,
uvicorn ``--ws websockets-sansio``" (58,000 messages/s on its machine) and asks for the real
bet path's throughput as a ratio of such an echo. ``/debug/echo`` (server/echo.py) answers
the same frames but runs on the game server's own socket layer (server/wslink.py), which is
several times faster than stock uvicorn; this script is the stock one: a bare ASGI app (no
framework), each frame received through ASGI and answered by its own send, on
uvicorn with uvloop, httptools, websockets-sansio and per-message deflate off (the game
server's settings apart from its socket layer). The replies are /debug/echo's
(:class:`server.echo.EchoReplies`): a welcome to ``auth``, a ``bet_result`` of the real
size and shape to every ``bet``.

It has no admin API: point the load tester's ``--http`` at a game server to make the
players (their tokens are not checked here)::

    python -m bench.echo_server --port 8031 &
    python -m loadtest bets --url ws://127.0.0.1:8031 --http http://127.0.0.1:8030 \\
        --connections 100 --inflight 4 --duration 60

Loopback only by default; it stops on SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from server.echo import EchoReplies
from server.wslink import Receive, Send


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The whole ASGI app: ``/ws/play`` only, no framework in between."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "websocket" or scope["path"] != "/ws/play":
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        return
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    replies = EchoReplies()
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        data = message.get("bytes")
        if data is None:
            await send({"type": "websocket.send", "text": replies.reply(message["text"])})
        else:
            await send({"type": "websocket.send", "bytes": replies.reply(data)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8031)
    options = parser.parse_args(argv)
    uvicorn.run(app, host=options.host, port=options.port, loop="uvloop", http="httptools",
                ws="websockets-sansio", ws_per_message_deflate=False, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
