"""Settings: the only reader of the environment.

Everything else receives a :class:`Settings` instance (the app factory, the workers, the
command-line tools), so tests build their own without touching ``os.environ``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from games.money import DEFAULT_CURRENCIES, Currency


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8000
    #: Game server processes (uvicorn workers on one listening socket). Each holds its own
    #: sockets and Redis connections; a user's sockets on two processes stay correct (the
    #: scripts check the nonce; pushes cross processes through Redis).
    server_processes: int = Field(default=1, ge=1, le=64)
    #: Bearer token of the admin API. Empty (the default): the admin API is closed and
    #: every admin route answers 403. ``make run`` sets the development token.
    admin_token: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://root@127.0.0.1:5432/stakepro"
    #: Seconds the bet path's Redis connection waits for a byte while calls are pending
    #: before it drops the connection and fails them (UNAVAILABLE); idle connections never
    #: time out.
    redis_read_timeout_s: float = Field(default=5.0, gt=0)
    #: /healthz answers 503 once bets (or Redis calls) have waited this many seconds
    #: without any being answered.
    health_stall_s: float = Field(default=3.0, gt=0)

    #: What the ledger Redis must keep on a crash (plumbing/durability.py): ``always``
    #: (AOF, appendfsync always: no acknowledged bet lost), ``everysec`` (accepts losing about
    #: a second on a machine crash) or ``none`` (accepts AOF off). A Redis that keeps less is
    #: reported at start, in the logs and in /healthz's body.
    redis_durability: Literal["always", "everysec", "none"] = "always"
    #: Number of Redis hash-tag buckets; a user's keys and its bucket's outbox share one slot.
    #: Changing it on a live system moves every key: it is fixed at deployment.
    buckets: int = Field(default=64, ge=1, le=16384)
    house_edge_bp: int = Field(default=100, ge=0, le=5000)
    idempotency_window_s: int = Field(default=300, ge=60)
    max_frame_bytes: int = Field(default=64 * 1024, ge=16 * 1024)
    auth_timeout_s: float = 10.0
    #: ``POST /api/demo`` hands out credited players to anyone: off unless asked for
    #: (``make run`` turns it on).
    demo_mode: bool = False
    demo_credit: dict[str, str] = {"USDT": "1000.00", "BTC": "0.01000000"}
    #: Prefix of every Redis key and pub/sub channel, so tests can share a server safely.
    key_prefix: str = "sp"
    #: Persist outbox events to PostgreSQL from inside the server process (stakepro.app);
    #: off where the Dramatiq workers do it (make run).
    inprocess_persister: bool = True
    #: Seconds between two commission flushes (one PostgreSQL statement per window).
    commission_flush_s: float = Field(default=2.0, gt=0)
    #: Dramatiq's broker (workers/broker.py). Empty: the Redis server of REDIS_URL, database 1
    #: (Dramatiq builds key names inside its scripts, so it never runs on the Redis Cluster).
    broker_url: str = ""
    #: Shards of the outbox persistence (workers/actors.py): shard s of n drains the buckets
    #: b with b % n == s, one worker at a time per shard (a lease).
    persist_shards: int = Field(default=1, ge=1, le=16384)
    #: Seconds one persist_outbox job drains its shard before it returns.
    persist_run_s: float = Field(default=5.0, gt=0)
    #: Seconds between two persist_outbox jobs the scheduler enqueues per shard.
    persist_every_s: float = Field(default=0.5, gt=0)
    #: Serve /debug/echo/ws/play (server/echo.py) for the load tester's ratio measurement.
    debug_echo: bool = False
    log_level: str = "info"
    log_json: bool = False
    feed_interval_s: float = Field(default=0.1, ge=0.1)
    feed_queue_batches: int = Field(default=20, ge=1)
    max_inflight_per_socket: int = Field(default=64, ge=1)
    #: Per-socket message rate (token bucket): sustained messages/s and burst size.
    rate_per_socket: float = Field(default=2000.0, gt=0)
    rate_burst: int = Field(default=4000, ge=1)
    #: Per client address (server/limits.py): requests a minute and burst of POST /api/demo,
    #: of sign-in attempts (the first frame of /ws/play) and of admin API requests.
    demo_per_minute: float = Field(default=10.0, gt=0)
    demo_burst: int = Field(default=5, ge=1)
    signin_per_minute: float = Field(default=60.0, gt=0)
    signin_burst: int = Field(default=20, ge=1)
    admin_per_minute: float = Field(default=600.0, gt=0)
    admin_burst: int = Field(default=100, ge=1)
    #: Per user, across all of a user's sockets on every instance: sockets open at once,
    #: bets a second and messages a second (each a rate with its burst).
    user_max_sockets: int = Field(default=16, ge=1)
    user_bets_per_s: float = Field(default=500.0, gt=0)
    user_bets_burst: int = Field(default=1000, ge=1)
    user_messages_per_s: float = Field(default=1000.0, gt=0)
    user_messages_burst: int = Field(default=2000, ge=1)
    #: Seconds a player token stays valid after it was issued (0: no expiry).
    token_ttl_s: int = Field(default=30 * 24 * 3600, ge=0)
    #: Origins a browser may open the sockets from, besides the page's own (the Host the
    #: request was sent to); "*" allows any. Clients that send no Origin (not browsers)
    #: are not affected.
    allowed_origins: list[str] = []
    #: Entries an outbox stream may hold (events not yet persisted): past it bets and
    #: deposits of that bucket answer UNAVAILABLE, and /healthz says "outbox": "full".
    #: 0 turns the limit off.
    outbox_max_len: int = Field(default=200_000, ge=0)

    @property
    def currencies(self) -> dict[str, Currency]:
        return dict(DEFAULT_CURRENCIES)

    @property
    def admin_open(self) -> bool:
        """Whether the admin API answers at all (ADMIN_TOKEN is set)."""
        return bool(self.admin_token)
