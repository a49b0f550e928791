"""``make run``: migrate, then start and watch the game server, the workers, the scheduler.

``python -m stakepro`` (the supervisor; ``make run``):

1. checks that the workers' broker can work (``BROKER_URL``, required when ``REDIS_URL``
   names a Redis Cluster node: workers/brokerurl.py) and stops with exit code 2 if not,
   then migrates the database (creating it if needed);
2. starts, each as a child process in its own process group (so Ctrl-C reaches only this
   supervisor, which then stops them in order):
   - the game server, ``python -m stakepro serve`` (uvicorn, :func:`uvicorn_config`) with
     ``INPROCESS_PERSISTER=false``: the workers persist the outbox and pay commissions;
   - the Dramatiq workers, ``python -m dramatiq workers.actors --processes 1``, one such
     child per worker process (``WORKER_PROCESSES``, default 1; ``--threads`` from
     ``WORKER_THREADS``, default 4), so that one killed worker stops no other;
   - the scheduler, ``python -m workers.scheduler``;
3. prints the page URL once ``/healthz`` answers 200;
4. restarts a child that dies on its own, with backoff and one log line per death and per
   restart, while the others keep running (:mod:`stakepro.supervisor`);
5. on Ctrl-C or SIGTERM stops the scheduler, then the server (open sockets are closed, bets
   in hand settle), then the workers (they finish their batch and flush commissions), and
   exits 0.

Children are also asked (PR_SET_PDEATHSIG) to receive SIGTERM should the supervisor itself
be killed, so none is left running behind it.

``python -m stakepro serve`` runs the game server alone, in this process, with the
settings of the environment (as the supervisor's child, or by hand next to workers started
elsewhere). :func:`uvicorn_config` is the one uvicorn configuration (tests and the load test
use it too).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from plumbing import durability
from plumbing.settings import Settings
from server.db import migrate
from server.wslink import DirectProtocol
from stakepro.app import create_app
from stakepro.supervisor import STOP_TIMEOUT_S, Children, Spec
from workers.brokerurl import BrokerSettingError, broker_url

#: Seconds the game server gets to answer /healthz after it started.
START_TIMEOUT_S = 60.0


def uvicorn_config(settings: Settings, **overrides: object) -> uvicorn.Config:
    """The one uvicorn configuration: uvloop, httptools, sans-I/O websockets, no deflate."""
    return uvicorn.Config(create_app(settings), **_options(settings, overrides))


def _options(settings: Settings, overrides: dict[str, object]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "ws": DirectProtocol,
        "ws_max_size": settings.max_frame_bytes,
        "ws_per_message_deflate": False,
        "lifespan": "on",
        "log_level": "warning",
        "access_log": False,
    }
    options.update(overrides)
    return options


def banner(settings: Settings) -> list[str]:
    """What a deployment must know at start: whether the admin API and demo mode are on."""
    return [
        "admin API: " + ("open (ADMIN_TOKEN is set)" if settings.admin_open
                         else "closed (set ADMIN_TOKEN to open it)"),
        "demo mode: " + ("on (DEMO_MODE=true: POST /api/demo gives out credited players)"
                         if settings.demo_mode else "off (DEMO_MODE=true turns it on)"),
    ]


def serve(settings: Settings) -> int:
    """Run the game server in this process until SIGINT / SIGTERM (uvicorn's handlers);
    first print :func:`banner` (under the supervisor too: it is the server's child)."""
    import uvloop

    for line in banner(settings):
        print(line, flush=True)

    if settings.server_processes > 1:
        # uvicorn's process manager: one listening socket, N processes accepting on it,
        # each building its own app from the environment (create_app reads Settings()).
        uvicorn.run("stakepro.app:create_app", factory=True,
                    workers=settings.server_processes, **_options(settings, {}))
        return 0
    server = uvicorn.Server(uvicorn_config(settings))
    uvloop.run(server.serve())
    return 0 if server.started else 1


# -- the supervisor --------------------------------------------------------------------------


def _healthy(settings: Settings) -> bool:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.port}/healthz", timeout=1) as r:
            return int(r.status) == 200
    except Exception:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    settings = Settings()
    if args[:1] == ["serve"]:
        return serve(settings)
    if args:
        print("usage: python -m stakepro [serve]", file=sys.stderr)
        return 2

    text = os.environ.get("WORKER_PROCESSES", "1")
    processes = int(text) if text.isascii() and text.isdigit() else 0
    if not 1 <= processes <= 64:
        print(f"WORKER_PROCESSES must be a whole number from 1 to 64, got {text!r}",
              file=sys.stderr)
        return 2
    try:
        # Checked here, not only by the workers: a worker that refuses its broker would be
        # restarted with backoff forever, one line every 30 s, while the rest looked up.
        broker_url(settings)
    except BrokerSettingError as exc:
        print(str(exc), file=sys.stderr)
        return 2

    applied = asyncio.run(migrate(settings.database_url))
    if applied:
        print(f"migrated: {', '.join(applied)}")
    weak = asyncio.run(durability.check_url(settings.redis_url, settings.redis_durability))
    if weak:
        print(f"ERROR: {weak}", flush=True)

    stop_requested: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    env = dict(os.environ)
    py = sys.executable
    workers = [
        Spec("workers" if processes == 1 else f"workers-{n + 1}",
             [py, "-m", "dramatiq", "workers.actors", "--processes", "1",
              "--threads", os.environ.get("WORKER_THREADS", "4"),
              "--worker-shutdown-timeout", str(int(STOP_TIMEOUT_S * 1000) - 2000)],
             env)
        for n in range(processes)
    ]
    children = Children([
        *workers,
        Spec("server", [py, "-m", "stakepro", "serve"], {**env, "INPROCESS_PERSISTER": "false"}),
        Spec("scheduler", [py, "-m", "workers.scheduler"], env),
    ], say=lambda line: print(line, flush=True))
    code = 0
    announced = False
    started = time.monotonic()
    while not stop_requested:
        children.poll()
        if not announced:
            if _healthy(settings):
                announced = True
                print(f"StakePro is up: http://{settings.host}:{settings.port}/  (demo mode: "
                      f"{'on' if settings.demo_mode else 'off'}; admin API: "
                      f"{'open' if settings.admin_open else 'closed'}; workers and scheduler "
                      f"running; Ctrl-C stops it)", flush=True)
            elif time.monotonic() - started > START_TIMEOUT_S:
                print(f"the server did not answer /healthz within {START_TIMEOUT_S:.0f}s: "
                      "stopping", flush=True)
                code = 1
                break
        time.sleep(0.2)

    # Ticks first, then no new bets, then the workers persist what was settled and stop.
    children.stop(("scheduler", "server", "workers"))
    print("stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
