"""``python -m loadtest sockets``: hold many authenticated idle player sockets; server memory
per socket.

Creates ``players`` players (default 1: every socket signs in with the same player's token,
which the protocol allows; ``--players N`` spreads them), samples the server's RSS, opens
``count`` sockets (at most ``connect_concurrency`` handshakes at a time), each signed in
(``auth`` -> ``welcome``), samples RSS again once all are open, holds them idle for ``hold``
seconds, then pings every socket (``ping`` -> ``pong``) to prove it is still held, samples
RSS a third time and closes them. Measure on a freshly started server: Python keeps the
memory it freed, so a server that already held many sockets barely grows a second time.

The server process is ``--server-pid``, or found from the URL's port (``/proc/net/tcp`` and
``/proc/*/fd``) when the server runs on this machine; without either the command refuses to
run. This process's RLIMIT_NOFILE is raised to fit ``count`` (up to the hard limit). One
client address has about 28,000 ephemeral ports towards one server address, so on loopback
sockets are spread over 127.0.0.1, 127.0.0.2, ... (one address per 20,000 sockets, or
``--source-addresses``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

from loadtest import common
from loadtest.client import Socket, authenticate, open_socket
from loadtest.options import ServerOptions
from loadtest.players import Admin, Player, SetupError

SOCKETS_PER_ADDRESS = 20_000


@dataclass
class SocketsOptions(ServerOptions):
    count: int = 1000
    players: int = 1
    hold: float = 10.0
    connect_concurrency: int = 200
    #: Client addresses on loopback (127.0.0.1 ...); None: one per 20,000 sockets.
    source_addresses: int | None = None
    settle: float = 1.0
    progress: TextIO | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "count": self.count, "players": self.players,
                "hold_s": self.hold, "encoding": self.encoding, "client": self.client}


@dataclass
class SocketsReport:
    options: SocketsOptions
    opened: int
    alive: int
    failures: dict[str, int]
    server_pids: list[int]
    server_in_client: bool
    rss_before: int | None
    rss_open: int | None
    rss_after: int | None
    client_rss_before: int
    client_rss_open: int
    nofile: tuple[int, int]
    open_s: float
    source_addresses: int
    client_cpu_s: float
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.opened == self.options.count and self.alive == self.options.count

    def per_socket(self, rss: int | None) -> float | None:
        if rss is None or self.rss_before is None or not self.opened:
            return None
        return (rss - self.rss_before) / self.opened

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "sockets", "options": self.options.public(), "ok": self.ok,
            "opened": self.opened, "held": self.alive, "failures": self.failures,
            "token": "one player's token for every socket" if self.options.players == 1
            else f"{self.options.players} players, sockets spread over them",
            "open_s": round(self.open_s, 3), "source_addresses": self.source_addresses,
            "server": {
                "pids": self.server_pids, "in_client_process": self.server_in_client,
                "rss_bytes": {"before": self.rss_before, "all_open": self.rss_open,
                              "after_hold": self.rss_after},
                "rss_bytes_per_socket": {"all_open": common.r3(self.per_socket(self.rss_open)),
                                         "after_hold": common.r3(
                                             self.per_socket(self.rss_after))},
            },
            "client": {
                "cpu_s": round(self.client_cpu_s, 3),
                "rss_bytes_per_socket": round((self.client_rss_open - self.client_rss_before)
                                              / max(1, self.opened), 1),
                "nofile": list(self.nofile),
            },
            "wall_s": round(self.wall_s, 3),
        }

    def table(self) -> str:
        o = self.options

        def mib(v: int | None) -> str:
            return "-" if v is None else f"{v / 2**20:,.1f} MiB"

        def per(v: float | None) -> str:
            return "-" if v is None else f"{v / 1024:,.1f} KiB"

        who = ("server (in this process: the client's memory is included)"
               if self.server_in_client else f"server pid {','.join(map(str, self.server_pids))}")
        client_per = (self.client_rss_open - self.client_rss_before) / max(1, self.opened)
        rows = [
            ("sockets", f"{self.opened:,} of {o.count:,} opened in {self.open_s:.1f} s,"
                        f" {self.alive:,} answered a ping after {o.hold:g} s idle;"
                        f" failures {self.failures or 'none'}"),
            ("players", "one player's token for every socket" if o.players == 1
             else f"{o.players:,} players, sockets spread over them"),
            (who.split(" (")[0], f"RSS {mib(self.rss_before)} before, {mib(self.rss_open)} all"
                                 f" open, {mib(self.rss_after)} after the hold"),
            ("per socket", f"{per(self.per_socket(self.rss_open))} when all open,"
                           f" {per(self.per_socket(self.rss_after))} after the hold"
                           + (" (server and client together)" if self.server_in_client
                              else "")),
            ("client", f"CPU {self.client_cpu_s:.2f} s, RSS {per(client_per)} per socket,"
                       f" RLIMIT_NOFILE {self.nofile[0]:,}/{self.nofile[1]:,},"
                       f" {self.source_addresses} source address(es)"),
            ("result", "OK" if self.ok else "FAIL"),
        ]
        return common.table(rows)


async def _hold_one(options: SocketsOptions, url: str, player: Player, local: str | None,
                    gate: asyncio.Semaphore, failures: Counter[str]) -> Socket | None:
    async with gate:
        try:
            sock = await open_socket(url, options.encoding, options.connect_timeout,
                                     options.client, local)
        except Exception as exc:
            failures[f"CONNECT_{type(exc).__name__}"] += 1
            return None
        try:
            reply = await authenticate(sock, player.token, options.connect_timeout)
            if reply.get("type") == "welcome":
                return sock
            failures[f"AUTH_{reply.get('code')}"] += 1
        except Exception as exc:
            failures[f"AUTH_{type(exc).__name__}"] += 1
        await sock.close()
        return None


async def _ping(sock: Socket, wait_s: float) -> bool:
    try:
        await sock.send({"type": "ping", "id": "held"})
        async with asyncio.timeout(wait_s):
            while True:
                message = await sock.recv()
                if message.get("type") == "pong":
                    return True
    except Exception:
        return False


async def run_sockets(options: SocketsOptions) -> SocketsReport:
    if options.count < 1 or options.players < 1:
        raise ValueError("count and players must be positive")
    clock = common.CpuClock()
    nofile = common.raise_nofile(options.count + 512)
    if nofile[0] < options.count + 64:
        raise SetupError(f"RLIMIT_NOFILE is {nofile[0]} (hard {nofile[1]}): too low for"
                         f" {options.count} sockets")
    pids, in_client = common.server_pids(options.url, options.server_pid)
    if not pids and not in_client:
        raise SetupError("cannot find the server process: pass --server-pid")
    measured = pids if pids else []

    def server_rss() -> int | None:
        if in_client and not pids:
            return common.own_rss()
        return common.process_totals(measured)[1]

    host = urlsplit(options.url).hostname or ""
    addresses = 1
    if host.startswith("127."):
        addresses = options.source_addresses or max(
            1, math.ceil(options.count / SOCKETS_PER_ADDRESS))
    locals_ = [f"127.0.0.{1 + i}" for i in range(addresses)] if addresses > 1 else [None]

    async with Admin(options.http_url, options.admin_token) as admin:
        players = list(await asyncio.gather(*(
            admin.create_user("player", f"sockets-{admin.run}-{i}")
            for i in range(options.players))))
    url = options.play_url
    failures: Counter[str] = Counter()
    rss_before = server_rss()
    client_before = common.own_rss()
    gate = asyncio.Semaphore(options.connect_concurrency)
    started = time.perf_counter()
    held: list[Socket] = []
    try:
        tasks = [asyncio.create_task(_hold_one(options, url, players[i % len(players)],
                                               locals_[i % len(locals_)], gate, failures))
                 for i in range(options.count)]
        reporter = None
        if options.progress is not None:
            reporter = asyncio.create_task(_progress(tasks, options.progress))
        try:
            opened = await asyncio.gather(*tasks)
        finally:
            if reporter is not None:
                reporter.cancel()
        held = [s for s in opened if s is not None]
        open_s = time.perf_counter() - started
        await asyncio.sleep(options.settle)
        rss_open = server_rss()
        client_open = common.own_rss()
        if options.progress is not None:
            print(f"{len(held):,} sockets open in {open_s:.1f} s; holding {options.hold:g} s",
                  file=options.progress, flush=True)
        await asyncio.sleep(options.hold)
        pings = asyncio.Semaphore(options.connect_concurrency * 5)

        async def ping(sock: Socket) -> bool:
            async with pings:
                return await _ping(sock, options.connect_timeout)

        alive = sum(await asyncio.gather(*(ping(s) for s in held)))
        rss_after = server_rss()
    finally:
        closing = asyncio.Semaphore(options.connect_concurrency * 5)

        async def close(sock: Socket) -> None:
            async with closing:
                with contextlib.suppress(Exception):
                    await sock.close()

        await asyncio.gather(*(close(s) for s in held))
    return SocketsReport(
        options=options, opened=len(held), alive=alive, failures=dict(failures),
        server_pids=pids, server_in_client=in_client, rss_before=rss_before,
        rss_open=rss_open, rss_after=rss_after, client_rss_before=client_before,
        client_rss_open=client_open, nofile=nofile, open_s=open_s,
        source_addresses=addresses, client_cpu_s=clock.cpu_s(), wall_s=clock.wall_s(),
    )


async def _progress(tasks: list[asyncio.Task[Socket | None]], out: TextIO) -> None:
    while True:
        await asyncio.sleep(1.0)
        done = sum(1 for t in tasks if t.done())
        print(f"  {done:,}/{len(tasks):,} sockets handled", file=out, flush=True)

