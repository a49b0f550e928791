"""The player socket, ``/ws/play``: sign-in, bets, seed rotation, pings and pushes.

A session answers each request in the encoding of the frame that carried it and pushes in
the encoding of the client's latest frame. Bets run concurrently (up to
``max_inflight_per_socket``; past that the socket is simply not read until one finishes), so
one client can keep several bets in flight. Nothing here awaits per frame: a frame is
handled by a plain call, a bet is queued for the next Redis pipeline (:meth:`Wallet.submit`)
and answered from its callback, and the replies of one loop tick leave in one write. A
client that stops reading is disconnected (1008) once half a megabyte waits for it
(server/wslink.py), instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from typing import Any

import structlog

from games import seeds
from games.bets import Checked
from games.dice import OUTCOMES, format_hundredths, format_multiplier
from games.errors import BadMessage, RateLimited, StakeProError, Unauthorized, Unavailable
from games.money import format_amount
from server import codec, users
from server.codec import ClientId, Encoding
from server.feed import bet_entry
from server.limits import SOCKET_HOLD_MS, Rate, client_address
from server.services import Services
from server.throttle import LogThrottle
from server.wallet import BetResult, Pair, PendingBet, Rotation, UserState
from server.wslink import Endpoint, Link, Receive, Send, TickWriter

log = structlog.get_logger(__name__)
#: Bad frames are the client's doing and come as fast as it likes: warn at a bounded rate.
_frame_warnings = LogThrottle(log)

_socket_numbers = itertools.count(1)
#: Every roll's text, "0.00" ... "100.00".
_ROLL_TEXT = tuple(format_hundredths(h) for h in range(OUTCOMES))


def _pair_view(pair: Pair) -> dict[str, Any]:
    return {
        "server_seed_hash": pair.server_seed_hash,
        "client_seed": pair.client_seed,
        "nonce": pair.nonce,
    }


class PlaySession:
    """One player socket. Frames arrive through ``on_frame`` (a plain call from the socket
    layer, :mod:`server.wslink`); replies are collected and written once per loop tick."""

    def __init__(self, endpoint: Endpoint, services: Services) -> None:
        self.endpoint = endpoint
        self.services = services
        self.socket_id = f"{services.instance}:{next(_socket_numbers)}"
        self.encoding: Encoding = "json"
        self.user: users.User | None = None
        self.state: UserState | None = None
        self.link: Link | None = None
        self._loop = asyncio.get_running_loop()
        #: Frames to write at the end of this tick.
        self._out = TickWriter(self._too_slow)
        #: Frames received but not handled yet: during sign-in, or past the in-flight limit.
        self._backlog: deque[str | bytes] = deque()
        self._inflight = 0
        self._max_inflight = services.settings.max_inflight_per_socket
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._signing_in = False
        #: Pushes that arrived before the welcome was sent: currency -> reason.
        self._held: dict[str, str] | None = {}
        self._tokens = float(services.settings.rate_burst)
        self._refilled = time.perf_counter()
        self._bet_stats = services.metrics.bet_stats
        self._meter = services.meter
        #: Timers of the signed-in socket: its token's expiry, and the next renewal of its
        #: place among the user's sockets (server/limits.py).
        self._expiry: asyncio.TimerHandle | None = None
        self._renewal: asyncio.TimerHandle | None = None
        self._holds_place = False

    # -- outgoing ---------------------------------------------------------------------

    def send(self, message: dict[str, Any], encoding: Encoding) -> None:
        self._out.add(codec.encode(message, encoding))

    def _too_slow(self) -> None:
        log.warning("slow_client_dropped", socket=self.socket_id)
        self.close(1008)

    def send_error(self, exc: StakeProError, request_id: ClientId, encoding: Encoding) -> None:
        self.services.metrics.errors.labels(exc.code).inc()
        self.send(codec.error(exc.code, exc.message, request_id), encoding)

    def push_balance(self, reason: str, currency: str, balance: int) -> None:
        spec = self.services.settings.currencies.get(currency)
        if spec is None:
            return
        if self._held is not None:  # not welcomed yet: see _sign_in
            self._held[currency] = reason
            return
        self.send(
            {"type": "balance", "currency": currency,
             "balance": format_amount(balance, spec), "reason": reason},
            self.encoding,
        )

    def revoked(self) -> None:
        """The user's token was revoked (server/tokens.py): this socket is closed."""
        self.send_error(Unauthorized("this token was revoked"), None, self.encoding)
        self.close(1008)

    def _expired(self) -> None:
        self.send_error(Unauthorized("this token has expired"), None, self.encoding)
        self.close(1008)

    def _renew_place(self) -> None:
        user = self.user
        if user is None or self._closing:
            return
        self._spawn(self._hold_place(user.user_id))
        self._renewal = self._loop.call_later(SOCKET_HOLD_MS / 3000, self._renew_place)

    async def _hold_place(self, user_id: int) -> None:
        with contextlib.suppress(Exception):  # a failed renewal is retried at the next one
            await self.services.limits.hold_socket(
                user_id, self.socket_id, self.services.settings.user_max_sockets
            )

    def close(self, code: int) -> None:
        """Write what is queued, then close with ``code``; later frames are ignored."""
        if self._closing:
            return
        self._out.stop()
        self._closing = True
        self._spawn(self.endpoint.close(code))

    # -- the socket's life ------------------------------------------------------------

    async def run(self) -> None:
        metrics = self.services.metrics
        metrics.sockets.labels("play").inc()
        self.link = self._out.link = self.endpoint.attach(self)
        timer = self._loop.call_later(self.services.settings.auth_timeout_s, self._auth_timeout)
        try:
            await self.endpoint.until_disconnect()
        finally:
            self._closing = True
            self._out.stop(flush=False)
            timer.cancel()
            for handle in (self._expiry, self._renewal):
                if handle is not None:
                    handle.cancel()
            metrics.sockets.labels("play").dec()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.user is not None:
                with contextlib.suppress(Exception):  # best effort, like Hub.unsubscribe
                    await self.services.pushes.remove(self.user.user_id, self)
            if self._holds_place and self.user is not None:
                with contextlib.suppress(Exception):  # else it expires (SOCKET_HOLD_MS)
                    await self.services.limits.release_socket(self.user.user_id, self.socket_id)
            await self.endpoint.finish()

    def _auth_timeout(self) -> None:
        if self.user is None and not self._signing_in:
            self.close(1008)

    def on_frame(self, data: str | bytes) -> None:
        if self._closing:
            return
        if self.user is None or self._backlog or self._inflight >= self._max_inflight:
            if self.user is None and not self._signing_in:
                self._signing_in = True
                self._pause()
                self._spawn(self._sign_in(data))
                return
            self._backlog.append(data)
            self._pause()
            return
        self._handle(data)

    def _pause(self) -> None:
        if self.link is not None:
            self.link.pause_reading()

    def _drain_backlog(self) -> None:
        """Handle held frames while the in-flight limit allows, then read again."""
        backlog = self._backlog
        while backlog and self._inflight < self._max_inflight and not self._closing:
            self._handle(backlog.popleft())
        if not backlog and self._inflight < self._max_inflight and self.link is not None:
            self.link.resume_reading()

    def _decode(self, data: str | bytes) -> tuple[dict[str, Any] | None, Encoding]:
        encoding: Encoding = "json" if isinstance(data, str) else "msgpack"
        self.encoding = encoding
        try:
            return codec.decode(data), encoding
        except BadMessage as exc:
            _frame_warnings.warning("bad_frame", socket=self.socket_id, error=exc.message[:200])
            self.send_error(exc, None, encoding)
            return None, encoding

    async def _sign_in(self, data: str | bytes) -> None:
        encoding: Encoding = "json" if isinstance(data, str) else "msgpack"
        self.encoding = encoding
        request_id: ClientId = None
        try:
            try:
                message = codec.decode(data)
            except BadMessage:
                raise Unauthorized("the first frame must be an auth message") from None
            with contextlib.suppress(BadMessage):
                request_id = codec.client_id(message)
            token = message.get("token")
            if message.get("type") != "auth" or not isinstance(token, str):
                raise Unauthorized("the first frame must be {\"type\": \"auth\", \"token\": ...}")
            services = self.services
            settings = services.settings
            await services.limits.check(
                Rate("signin", settings.signin_per_minute / 60, settings.signin_burst),
                client_address(self.endpoint.scope), "sign-in attempts from this address",
            )
            if not (token.isascii() and token.isprintable()):  # never a token we issued
                raise Unauthorized("unknown token")
            signed = await services.tokens.sign_in(token)
            user = signed.user
            await services.limits.hold_socket(user.user_id, self.socket_id,
                                              settings.user_max_sockets)
            self._holds_place = True
            self.user = user
            state = services.wallet.user(user.user_id)
            await services.pushes.add(user.user_id, self)
            # A revocation published before the subscription above would be missed.
            await services.tokens.sign_in(token)
            self.state = state
            pair = await self.services.wallet.pair(state)
            balances = await self.services.wallet.balances(user.user_id)
        except StakeProError as exc:
            self.send_error(exc, request_id, encoding)
            self.close(1013 if isinstance(exc, Unavailable | RateLimited) else 1008)
            return
        except Exception as exc:  # PostgreSQL or Redis failed: nothing was changed
            log.warning("sign_in_failed", error=repr(exc))
            self.send_error(Unavailable("sign-in failed: a dependency is unavailable; retry"),
                            request_id, encoding)
            self.close(1013)
            return
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
            with contextlib.suppress(Exception):
                now = await self.services.wallet.balances(user.user_id)
                for currency, reason in held.items():
                    self.push_balance(reason, currency, now[currency])
        if signed.expires_at is not None:
            self._expiry = self._loop.call_later(
                max(0.0, signed.expires_at - time.time()), self._expired
            )
        self._renewal = self._loop.call_later(SOCKET_HOLD_MS / 3000, self._renew_place)
        self._signing_in = False
        self._drain_backlog()

    def _handle(self, data: str | bytes) -> None:
        received = time.perf_counter()
        message, encoding = self._decode(data)
        if message is None:
            return
        try:
            request_id = codec.client_id(message)
        except BadMessage as exc:
            self.send_error(exc, None, encoding)
            return
        try:
            self._take_token(received)
            uid = self.user.user_id if self.user is not None else 0
            self._meter.take("messages", uid)
            kind = codec.message_type(message)
            if kind == "bet":
                if request_id is None:
                    raise BadMessage("a bet must carry an id")
                self._meter.take("bets", uid)
                self._bet(message, request_id, encoding, received)
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
        except Exception as exc:
            # A shape no check foresaw: refuse the frame (nothing was submitted, since
            # submitting is the last step) and keep the socket, rather than let the
            # exception reach the socket layer, which would drop it with a traceback.
            _frame_warnings.warning("frame_not_handled", socket=self.socket_id,
                                    error=repr(exc)[:200])
            self.send_error(BadMessage(f"message could not be handled: {type(exc).__name__}"),
                            request_id, encoding)

    def _take_token(self, now: float) -> None:
        """Token bucket: ``rate_per_socket`` messages a second, bursts of ``rate_burst``
        (``now``: time.perf_counter() of the frame)."""
        settings = self.services.settings
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

    def _bet(
        self, message: dict[str, Any], request_id: int | str, encoding: Encoding, received: float
    ) -> None:
        services = self.services
        state = self.state
        assert state is not None
        checked = services.checker.check(
            message.get("currency"), message.get("amount"), message.get("target"),
            message.get("direction"),
        )
        self._inflight += 1
        # Wallet.submit never raises: _bet_done gives the slot back.
        services.wallet.submit(state, PendingBet(
            request_id, checked.spec, self.socket_id,
            services.pushes.local_count(state.user_id) - 1, self._bet_done,
            (encoding, received, checked), checked.fingerprint,
        ))
        if self._inflight >= self._max_inflight:
            self._pause()

    def _bet_done(self, bet: PendingBet, outcome: BetResult | StakeProError) -> None:
        self._inflight -= 1
        encoding, received, checked = bet.tag
        if isinstance(outcome, StakeProError):
            self.send_error(outcome, bet.client_id, encoding)
        else:
            if outcome.rotated is not None:
                # Redis restarted since the pair was installed: it was rotated first.
                self._send_rotation(outcome.rotated, None, encoding, reason="redis_restart")
            spec = bet.spec
            reply = self._bet_reply(outcome, bet.client_id, spec.currency, checked)
            self.send(reply, encoding)
            self._bet_stats.observe(time.perf_counter() - received)
            if not outcome.replay:
                self._bet_stats.settled(spec.currency.code, outcome.win)
                self.services.feed.add(
                    bet_entry(self.user.name if self.user else "", checked, reply)
                )
        if self._backlog or self._inflight == self._max_inflight - 1:
            self._drain_backlog()

    @staticmethod
    def _bet_reply(
        result: BetResult, request_id: int | str, currency: Any, checked: Checked
    ) -> dict[str, Any]:
        multiplier = (
            checked.multiplier_text if result.multiplier == checked.spec.multiplier
            else format_multiplier(result.multiplier)  # a replay from another house edge
        )
        return {
            "type": "bet_result", "id": request_id, "bet_id": result.bet_id,
            "roll": _ROLL_TEXT[result.roll], "win": result.win, "multiplier": multiplier,
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


async def play_endpoint(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The ASGI app of ``/ws/play`` (a plain ASGI callable, so that frames skip starlette's
    per-message wrappers; see :mod:`server.wslink`)."""
    services: Services = scope["app"].state.services
    endpoint = Endpoint(scope, receive, send)
    if await endpoint.accept():
        await PlaySession(endpoint, services).run()
