"""What every command shares: signing a socket in, the server process, exact quantiles of
small samples, the event loop, and the common exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx

from loadtest import serverstats
from loadtest.client import Socket, authenticate, open_socket
from loadtest.options import ServerOptions
from loadtest.players import SetupError

T = TypeVar("T")


async def signed_in(options: ServerOptions, token: str) -> Socket:
    """A player socket to ``options.play_url``, signed in with ``token``.

    Raises:
        SetupError: the server refused the token.
    """
    sock = await open_socket(options.play_url, options.encoding, options.connect_timeout,
                             options.client)
    try:
        reply = await authenticate(sock, token, options.connect_timeout)
    except BaseException:
        await sock.close()
        raise
    if reply.get("type") != "welcome":
        await sock.close()
        raise SetupError(f"auth refused: {reply}")
    return sock


def server_pids(url: str, server_pid: int | None) -> tuple[list[int], bool]:
    """(pids of the server other than this process, whether this process serves ``url``).
    The pid is ``server_pid`` when given, else found from the port when ``url`` is local."""
    if server_pid is not None:
        pids = [server_pid]
    else:
        parts = urlsplit(url)
        if parts.hostname is None or not serverstats.is_loopback(parts.hostname):
            return [], False
        pids = serverstats.find_listening_pids(parts.port or (443 if parts.scheme == "wss"
                                                              else 80))
    me = os.getpid()
    return [p for p in pids if p != me], me in pids


def process_totals(pids: Sequence[int]) -> tuple[float | None, int | None]:
    """(CPU seconds, RSS bytes) summed over ``pids``; None when none is readable."""
    samples = [s for s in map(serverstats.sample_process, pids) if s is not None]
    if not samples:
        return None, None
    return sum(s.cpu_s for s in samples), sum(s.rss_bytes for s in samples)


def own_rss() -> int:
    sample = serverstats.sample_process(os.getpid())
    return sample.rss_bytes if sample is not None else 0


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile of an already sorted sample (exact for small samples)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted`` (at most the hard
    limit); returns the (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Report(Protocol):
    @property
    def ok(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...

    def table(self) -> str: ...


R = TypeVar("R", bound=Report)


def run_loop(factory: Callable[[], Awaitable[T]]) -> T:
    """Run ``factory()`` to completion on uvloop when installed, else asyncio."""

    async def go() -> T:
        return await factory()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(go())
    return uvloop.run(go())


def cli_main(factory: Callable[[], Awaitable[R]], as_json: bool,
             done: Callable[[R], None] | None = None) -> int:
    """Run a command, hand its report to ``done`` (when given), print its table (or one
    JSON object) on stdout: exit 0 when it passed, 1 when it failed, 2 when setup failed or
    the server cannot be reached."""
    import json

    try:
        report = run_loop(factory)
    except SetupError as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    except (OSError, httpx.HTTPError) as exc:
        print(f"cannot reach the server: {exc}", file=sys.stderr)
        return 2
    if done is not None:
        done(report)
    print(json.dumps(report.to_dict()) if as_json else report.table())
    return 0 if report.ok else 1


def table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


class CpuClock:
    """The client's own CPU time (``time.process_time``) and wall time since creation."""

    def __init__(self) -> None:
        self.cpu0 = time.process_time()
        self.wall0 = time.perf_counter()

    def cpu_s(self) -> float:
        return time.process_time() - self.cpu0

    def wall_s(self) -> float:
        return time.perf_counter() - self.wall0


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def r3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
