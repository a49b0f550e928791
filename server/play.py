"""The player socket, ``/ws/play``: sign-in, bets, seed rotation, pings and pushes.

A session answers each request in the encoding of the frame that carried it and pushes in
the encoding of the client's latest frame. Bets run concurrently (up to
``max_inflight_per_socket``; past that the socket is simply not read until one finishes), so
one client can keep several bets in flight; every outgoing frame goes through one bounded
queue and one writer task, so a client that stops reading is disconnected instead of
growing the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from games import seeds
from games.bets import validate_bet
from games.dice import format_hundredths, format_multiplier
from games.errors import BadMessage, RateLimited, StakeProError, Unauthorized, Unavailable
from games.money import format_amount
from server import codec, users
from server.codec import ClientId, Encoding
from server.feed import bet_entry
from server.services import Services
from server.wallet import BetResult, Pair, Rotation, UserState

log = structlog.get_logger(__name__)

#: Frames waiting for the writer; a client this far behind is disconnected (1008).
OUT_QUEUE = 1024
_socket_numbers = itertools.count(1)


def _pair_view(pair: Pair) -> dict[str, Any]:
    return {
        "server_seed_hash": pair.server_seed_hash,
        "client_seed": pair.client_seed,
        "nonce": pair.nonce,
    }


class PlaySession:
    def __init__(self, ws: WebSocket, services: Services) -> None:
        self.ws = ws
        self.services = services
        self.socket_id = f"{services.instance}:{next(_socket_numbers)}"
        self.encoding: Encoding = "json"
        self.user: users.User | None = None
        self.state: UserState | None = None
        #: Frames to send; an int is a close code and ends the writer.
        self._out: asyncio.Queue[str | bytes | int] = asyncio.Queue(OUT_QUEUE)
        self._writer_task: asyncio.Task[None] | None = None
        self._inflight = asyncio.Semaphore(services.settings.max_inflight_per_socket)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        #: Pushes that arrived before the welcome was sent: currency -> reason.
        self._held: dict[str, str] | None = {}
        self._tokens = float(services.settings.rate_burst)
        self._refilled = time.monotonic()

    # -- outgoing ---------------------------------------------------------------------

    def send(self, message: dict[str, Any], encoding: Encoding) -> None:
        if self._closing:
            return
        try:
            self._out.put_nowait(codec.encode(message, encoding))
        except asyncio.QueueFull:
            log.warning("slow_client_dropped", socket=self.socket_id)
            self._closing = True
            self._close_soon(1008)

    def send_error(self, exc: StakeProError, request_id: ClientId, encoding: Encoding) -> None:
        self.services.metrics.errors.labels(exc.code).inc()
        self.send(codec.error(exc.code, exc.message, request_id), encoding)

    def push_balance(self, reason: str, currency: str, balance: int) -> None:
        spec = self.services.settings.currencies.get(currency)
        if spec is None:
            return
        if self._held is not None:  # not welcomed yet: see _authenticate
            self._held[currency] = reason
            return
        self.send(
            {"type": "balance", "currency": currency,
             "balance": format_amount(balance, spec), "reason": reason},
            self.encoding,
        )

    def _close_soon(self, code: int) -> None:
        """Ask the writer to close after the frames already queued (or at once if full)."""
        try:
            self._out.put_nowait(code)
        except asyncio.QueueFull:
            if self._writer_task is not None:
                self._writer_task.cancel()
            self._spawn(self.ws.close(code))

    async def _writer(self) -> None:
        while True:
            frame = await self._out.get()
            if isinstance(frame, int):
                await self.ws.close(frame)
                return
            if isinstance(frame, str):
                await self.ws.send_text(frame)
            else:
                await self.ws.send_bytes(frame)

    # -- incoming ---------------------------------------------------------------------

    async def _receive(self) -> tuple[dict[str, Any] | None, Encoding, StakeProError | None]:
        """One frame: (message, its encoding, decoding error)."""
        frame = await self.ws.receive()
        if frame["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(frame.get("code", 1000))
        data = frame.get("text")
        encoding: Encoding = "json"
        if data is None:
            data, encoding = frame.get("bytes") or b"", "msgpack"
        self.encoding = encoding
        try:
            return codec.decode(data), encoding, None
        except BadMessage as exc:
            return None, encoding, exc

    async def run(self) -> None:
        metrics = self.services.metrics
        metrics.sockets.labels("play").inc()
        writer = self._writer_task = asyncio.create_task(self._writer())
        try:
            if await self._authenticate():
                await self._loop()
        except WebSocketDisconnect:
            pass
        finally:
            metrics.sockets.labels("play").dec()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.user is not None:
                with contextlib.suppress(Exception):  # best effort, like Hub.unsubscribe
                    await self.services.pushes.remove(self.user.user_id, self)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    async def _flush_and_close(self, code: int) -> None:
        self._closing = True
        self._close_soon(code)
        if self._writer_task is not None:
            with contextlib.suppress(Exception):
                await self._writer_task

    async def _authenticate(self) -> bool:
        try:
            message, encoding, error = await asyncio.wait_for(
                self._receive(), self.services.settings.auth_timeout_s
            )
        except TimeoutError:
            await self._flush_and_close(1008)
            return False
        request_id: ClientId = None
        try:
            if error is not None:
                raise Unauthorized("the first frame must be an auth message")
            assert message is not None
            with contextlib.suppress(BadMessage):
                request_id = codec.client_id(message)
            token = message.get("token")
            if message.get("type") != "auth" or not isinstance(token, str):
                raise Unauthorized("the first frame must be {\"type\": \"auth\", \"token\": ...}")
            user = await users.by_token(self.services.pool, token)
            if user is None:
                raise Unauthorized("unknown token")
            self.user = user
            self.state = self.services.wallet.user(user.user_id)
            await self.services.pushes.add(user.user_id, self)
            pair = await self.services.wallet.pair(self.state)
            balances = await self.services.wallet.balances(user.user_id)
        except StakeProError as exc:
            self.send_error(exc, request_id, encoding)
            await self._flush_and_close(1013 if isinstance(exc, Unavailable) else 1008)
            return False
        except Exception as exc:  # PostgreSQL or Redis failed: nothing was changed
            log.warning("sign_in_failed", error=repr(exc))
            self.send_error(Unavailable("sign-in failed: a dependency is unavailable; retry"),
                            request_id, encoding)
            await self._flush_and_close(1013)
            return False
        currencies = self.services.settings.currencies
        self.send(
            {"type": "welcome", "id": request_id, "user_id": user.user_id,
             "balances": {c: format_amount(v, currencies[c]) for c, v in balances.items()},
             "seed": _pair_view(pair)},
            encoding,
        )
        # A push that raced the welcome may be older or newer than the balances it shows:
        # send the balance as it is now for each currency such a push was about.
        held, self._held = self._held or {}, None
        if held:
            now = await self.services.wallet.balances(user.user_id)
            for currency, reason in held.items():
                self.push_balance(reason, currency, now[currency])
        return True

    async def _loop(self) -> None:
        while not self._closing:
            message, encoding, error = await self._receive()
            received = time.perf_counter()
            if error is not None:
                self.send_error(error, None, encoding)
                continue
            assert message is not None
            try:
                request_id = codec.client_id(message)
            except BadMessage as exc:
                self.send_error(exc, None, encoding)
                continue
            try:
                self._take_token()
                kind = codec.message_type(message)
                if kind == "bet":
                    if request_id is None:
                        raise BadMessage("a bet must carry an id")
                    await self._inflight.acquire()
                    self._spawn(self._bet(message, request_id, encoding, received))
                elif kind == "ping":
                    self.send({"type": "pong", "id": request_id}, encoding)
                elif kind == "rotate_seed":
                    self._spawn(self._rotate(message, request_id, encoding))
                elif kind == "auth":
                    raise BadMessage("already signed in")
                else:
                    raise BadMessage(f"unknown message type {kind!r}")
            except StakeProError as exc:
                self.send_error(exc, request_id, encoding)

    def _take_token(self) -> None:
        """Token bucket: ``rate_per_socket`` messages a second, bursts of ``rate_burst``."""
        settings = self.services.settings
        now = time.monotonic()
        self._tokens = min(
            float(settings.rate_burst),
            self._tokens + (now - self._refilled) * settings.rate_per_socket,
        )
        self._refilled = now
        if self._tokens < 1:
            raise RateLimited("too many messages on this socket; slow down")
        self._tokens -= 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests ---------------------------------------------------------------------

    async def _bet(
        self, message: dict[str, Any], request_id: int | str, encoding: Encoding, received: float
    ) -> None:
        services = self.services
        assert self.state is not None
        try:
            spec = validate_bet(
                message.get("currency"), message.get("amount"), message.get("target"),
                message.get("direction"), services.settings.currencies,
                services.settings.house_edge_bp,
            )
            result = await services.wallet.bet(
                self.state, request_id, spec, self.socket_id,
                services.pushes.local_count(self.state.user_id) - 1,
            )
        except StakeProError as exc:
            self.send_error(exc, request_id, encoding)
            return
        except Exception as exc:
            log.exception("bet_failed", socket=self.socket_id)
            self.send_error(Unavailable(f"bet not settled: {type(exc).__name__}"),
                            request_id, encoding)
            return
        finally:
            self._inflight.release()
        if result.rotated is not None:
            # Redis restarted since the pair was installed: it was rotated before this bet.
            self._send_rotation(result.rotated, None, encoding, reason="redis_restart")
        reply = self._bet_reply(result, request_id, spec.currency)
        self.send(reply, encoding)
        services.metrics.bet_latency.observe(time.perf_counter() - received)
        if not result.replay:
            services.metrics.bets.labels(spec.currency.code, "win" if result.win else "loss").inc()
            services.feed.add(bet_entry(self.user.name if self.user else "", spec, reply))

    @staticmethod
    def _bet_reply(result: BetResult, request_id: int | str, currency: Any) -> dict[str, Any]:
        return {
            "type": "bet_result", "id": request_id, "bet_id": result.bet_id,
            "roll": format_hundredths(result.roll), "win": result.win,
            "multiplier": format_multiplier(result.multiplier),
            "payout": format_amount(result.payout, currency),
            "balance": format_amount(result.balance, currency), "nonce": result.nonce,
            "server_seed_hash": result.server_seed_hash, "client_seed": result.client_seed,
        }

    async def _rotate(
        self, message: dict[str, Any], request_id: ClientId, encoding: Encoding
    ) -> None:
        assert self.state is not None
        try:
            client_seed = seeds.parse_client_seed(message.get("client_seed"))
            rotation = await self.services.wallet.rotate(self.state, client_seed)
        except StakeProError as exc:
            self.send_error(exc, request_id, encoding)
            return
        except Exception as exc:
            log.exception("rotate_failed", socket=self.socket_id)
            self.send_error(Unavailable(f"seed not rotated: {type(exc).__name__}"),
                            request_id, encoding)
            return
        self._send_rotation(rotation, request_id, encoding)

    def _send_rotation(
        self, rotation: Rotation, request_id: ClientId, encoding: Encoding,
        reason: str | None = None,
    ) -> None:
        old = rotation.revealed
        message: dict[str, Any] = {
            "type": "seed_rotated", "id": request_id,
            "revealed": {"server_seed": old.server_seed, **_pair_view(old)},
            "current": _pair_view(rotation.current),
        }
        if reason is not None:
            message["reason"] = reason
        self.send(message, encoding)


async def play_endpoint(ws: WebSocket) -> None:
    services: Services = ws.app.state.services
    await ws.accept()
    await PlaySession(ws, services).run()
