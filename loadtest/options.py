"""The options every load command shares: where the server is, how to sign in to its admin
API, and which sockets to open. Each command's options class adds its own fields; the
command line (``loadtest/__main__.py``) fills them from the flags of the same name.
:class:`BetsOptions` lives here rather than in loadtest/bets.py because its two socket
drivers and the spectators' bets load all take it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

from loadtest.client import DEFAULT_CLIENT, ClientKind
from loadtest.wire import Encoding

DEFAULT_URL = "ws://127.0.0.1:8000"


@dataclass
class ServerOptions:
    url: str = DEFAULT_URL
    #: HTTP base of the admin API and /metrics; None derives it from ``url``.
    http: str | None = None
    admin_token: str = "dev-admin-token"
    #: The server's pid for its CPU and RSS; None: found from the port when it is local.
    server_pid: int | None = None
    encoding: Encoding = "msgpack"
    #: Socket implementation (loadtest/client.py): picows when it is installed.
    client: ClientKind = DEFAULT_CLIENT
    connect_timeout: float = 10.0

    @property
    def http_url(self) -> str:
        """The HTTP base of the admin API and /metrics: ``http`` if given, else from ``url``."""
        if self.http:
            return self.http.rstrip("/")
        parts = urlsplit(self.url)
        scheme = "https" if parts.scheme == "wss" else "http"
        return f"{scheme}://{parts.netloc}"

    @property
    def play_url(self) -> str:
        return self.ws_url("/ws/play")

    def ws_url(self, path: str) -> str:
        """``url`` with its path set to ``path`` (``/ws/play`` or ``/ws/feed``)."""
        parts = urlsplit(self.url)
        base = parts.path.rstrip("/")
        for known in ("/ws/play", "/ws/feed"):
            if base.endswith(known):
                base = base[: -len(known)]
        return f"{parts.scheme}://{parts.netloc}{base}{path}"


@dataclass
class BetOptions(ServerOptions):
    """A server command whose players bet: what each bet names besides its stake."""

    currency: str = "USDT"
    target: str = "50.00"
    direction: str = "under"


@dataclass
class BetsOptions(BetOptions):
    """``python -m loadtest bets`` (and the bets load that ``spectators`` runs)."""

    connections: int = 100
    inflight: int = 4
    duration: float = 10.0
    ramp_up: float = 1.0
    amount: str = "0.01"
    #: Distinct players; None means one per socket.
    players: int | None = None
    max_error_rate: float = 0.01
    #: Credited to every player before the run (in the run's currency).
    deposit: str = "1000000"
    drain_timeout: float = 5.0
    #: Bets per second over all sockets (paced, a ceiling); None: closed loop.
    rate: float | None = None
    #: Where the per-second progress line goes (None: nowhere).
    progress: TextIO | None = field(default=None, repr=False)
    #: Display names of the run's players start with this (None: ``load-<random>-``).
    name_prefix: str | None = None
    #: Called with every ``bet_result`` and its receive time (``time.time_ns()``).
    on_result: Callable[[dict[str, Any], int], None] | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """The options as they go into the JSON report (no token)."""
        return {
            "url": self.url, "http": self.http_url, "connections": self.connections,
            "inflight": self.inflight, "duration_s": self.duration, "ramp_up_s": self.ramp_up,
            "currency": self.currency, "amount": self.amount, "target": self.target,
            "direction": self.direction, "players": self.players or self.connections,
            "encoding": self.encoding, "max_error_rate": self.max_error_rate,
            "client": self.client, "rate": self.rate,
        }
