"""The whole stack as ``make run`` starts it, for the supervisor and fault tests.

:class:`Supervised` runs ``python -m stakepro`` (the supervisor, on a :class:`Stack`'s own
Redis, database and free port) and finds its processes through /proc, so a test can SIGKILL
exactly one of them. :class:`Bettor` is a player with a few bets in flight on one socket,
resending (same id) what came back UNAVAILABLE, as docs/protocol.md tells clients to.
:class:`PostgresCluster` is a PostgreSQL of the test's own (initdb on a free port), which a
test may stop without touching the shared server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.conftest import free_port
from tests.workerprocs import ROOT, Proc, Stack, eventually

# -- processes, through /proc ----------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant."""
    out = [pid]
    for child in children_of(pid):
        out.extend(tree(child))
    return out


@dataclass(frozen=True)
class Pids:
    """The supervisor's children, and the worker process each Dramatiq child forked."""

    server: int
    scheduler: int
    dramatiq: int
    worker: int


@dataclass
class Supervised:
    """``python -m stakepro`` on a stack of its own; its output is kept in a file."""

    stack: Stack
    proc: Proc

    @classmethod
    def start(cls, stack: Stack, **extra: str) -> Supervised:
        return cls(stack, stack.spawn("supervisor", ["-m", "stakepro"], **extra))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.stack.settings.port}"

    def output(self) -> str:
        return self.proc.log.read_text(errors="replace") if self.proc.log.exists() else ""

    def lines(self, text: str) -> list[str]:
        return [line for line in self.output().splitlines() if text in line]

    async def logged(self, text: str, within: float = 10.0) -> list[str]:
        """The log lines holding ``text``, once there is one (the supervisor writes a
        restart's line after the new child's pid can already be seen)."""
        async def found() -> list[str] | None:
            return self.lines(text) or None

        return await eventually(found, within)

    async def up(self, within: float = 60.0) -> None:
        """Wait for the banner (the server answers /healthz)."""
        async def banner() -> bool:
            assert self.proc.alive(), self.output()
            return bool(self.lines("StakePro is up"))

        await eventually(banner, within)

    async def pids(self, until: Callable[[Pids], bool] = lambda p: True,
                   within: float = 30.0) -> Pids:
        """The children once all of them run and ``until`` holds (e.g. a new pid)."""
        async def found() -> Pids | None:
            kids = {pid: cmdline(pid) for pid in children_of(self.proc.popen.pid)}
            server = [p for p, c in kids.items() if "stakepro serve" in c]
            scheduler = [p for p, c in kids.items() if "workers.scheduler" in c]
            dramatiq = [p for p, c in kids.items() if "dramatiq" in c]
            if not (len(server) == len(scheduler) == len(dramatiq) == 1):
                return None
            workers = children_of(dramatiq[0])
            if len(workers) != 1:  # --processes 1 (forked; its cmdline is the parent's)
                return None
            pids = Pids(server[0], scheduler[0], dramatiq[0], workers[0])
            return pids if until(pids) else None

        return await eventually(found, within)

    async def terminate(self, within: float = 60.0) -> int:
        self.proc.popen.send_signal(signal.SIGTERM)
        return await self.proc.exited(within)


async def healthz(address: str) -> tuple[int, dict[str, Any]]:
    """``/healthz``: (status, body); (0, {}) when nothing answers."""
    async with httpx.AsyncClient(timeout=2.0) as http:
        try:
            r = await http.get(f"http://{address}/healthz")
        except httpx.HTTPError:
            return 0, {}
        return r.status_code, dict(r.json())


# -- a player under load ---------------------------------------------------------------------


@dataclass
class Bettor:
    """One player betting on one socket, ``window`` bets in flight, one every ``pace`` s.

    A bet answered UNAVAILABLE is sent again with the same id after a short backoff; with
    ``reconnect`` a lost socket is opened again and every unanswered bet resent (same ids),
    else the run ends when the socket closes. Every answer is timed (``time.monotonic``).
    """

    address: str
    user_id: int
    token: str
    window: int = 4
    pace: float = 0.01
    reconnect: bool = False
    #: The stake of every bet (large enough for every ancestor's commission to be > 0).
    amount: str = "5.00"
    #: client id -> (received at, bet_result)
    acks: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    unavailable: list[float] = field(default_factory=list)
    closes: list[float] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    sent: int = 0

    def acked_after(self, moment: float) -> int:
        return sum(1 for at, _ in self.acks.values() if at > moment)

    def bet_ids(self) -> list[str]:
        return [str(r["bet_id"]) for _, r in self.acks.values()]

    def _message(self, client_id: str) -> dict[str, Any]:
        return {"type": "bet", "id": client_id, "currency": "USDT", "amount": self.amount,
                "target": "50.00", "direction": "under" if self.sent % 2 else "over"}

    async def run(self, stop: asyncio.Event, give_up_after: float = 30.0) -> None:
        """Bet until ``stop``, then wait for the bets in flight (at most ``give_up_after``
        seconds), resending and reconnecting as needed."""
        pending: dict[str, dict[str, Any]] = {}  # client id -> message, unanswered
        due: dict[str, float] = {}  # client id -> when to resend it
        stopped_at: float | None = None
        next_bet_at = 0.0
        delay = 0.05
        while True:
            try:
                async with connect(f"ws://{self.address}/ws/play", compression=None,
                                   open_timeout=5) as ws:
                    await ws.send(json.dumps({"type": "auth", "token": self.token}))
                    welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if welcome.get("type") != "welcome":
                        raise ConnectionError(f"no welcome: {welcome}")
                    delay = 0.05
                    due.update(dict.fromkeys(pending, 0.0))  # resend all on a new socket
                    while True:
                        now = time.monotonic()
                        if stop.is_set() and stopped_at is None:
                            stopped_at = now
                        if stopped_at is not None and not pending:
                            return
                        if stopped_at is not None and now - stopped_at > give_up_after:
                            self.unresolved.extend(pending)
                            return
                        for cid in [c for c, at in due.items() if at <= now]:
                            del due[cid]
                            await ws.send(json.dumps(pending[cid]))
                        if (stopped_at is None and len(pending) < self.window
                                and now >= next_bet_at):
                            next_bet_at = now + self.pace
                            cid = f"{self.user_id}-{self.sent}"
                            pending[cid] = self._message(cid)
                            self.sent += 1
                            await ws.send(json.dumps(pending[cid]))
                        try:
                            frame = await asyncio.wait_for(ws.recv(), self.pace)
                        except TimeoutError:
                            continue
                        self._answer(json.loads(frame), pending, due)
            except (ConnectionClosed, OSError, InvalidHandshake, TimeoutError,
                    ConnectionError):
                self.closes.append(time.monotonic())
                if not self.reconnect:
                    self.unresolved.extend(pending)
                    return
                if stopped_at is not None and time.monotonic() - stopped_at > give_up_after:
                    self.unresolved.extend(pending)
                    return
                await asyncio.sleep(delay)
                delay = min(0.5, delay * 2)

    def _answer(self, reply: dict[str, Any], pending: dict[str, dict[str, Any]],
                due: dict[str, float]) -> None:
        kind, cid = reply.get("type"), reply.get("id")
        if kind == "bet_result" and cid in pending:
            del pending[cid]
            self.acks[cid] = (time.monotonic(), reply)
        elif kind == "error" and reply.get("code") == "UNAVAILABLE" and cid in pending:
            self.unavailable.append(time.monotonic())
            due[cid] = time.monotonic() + 0.1
        elif kind in ("balance", "seed_rotated"):
            pass
        else:
            self.unexpected.append(reply)
            pending.pop(str(cid), None)


# -- a PostgreSQL of the test's own ----------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin with initdb and pg_ctl (as scripts/devenv.sh)."""
    found = None
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0):
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            found = d
    return found


class PostgresCluster:
    """initdb into a temporary directory, served on a free loopback port, user ``root``
    with trust auth; run as the ``postgres`` OS user when we are root (initdb refuses
    root). Stop and start it at will; :meth:`cleanup` removes it."""

    def __init__(self, bindir: Path) -> None:
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="stakepro-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.running = False

    def url(self, database: str) -> str:
        return f"postgresql://root@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> None:
        command = [str(a) for a in argv]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.dir.chmod(0o700)
        self._run(self.bin / "initdb", "-D", self.data, "--auth=trust", "-U", "root",
                  "-E", "UTF8", "--no-locale")

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port}"
                   f" -c unix_socket_directories={self.dir} -c fsync=off")
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options,
                  "-w", "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def cleanup(self) -> None:
        if self.running:
            try:
                self.stop("immediate")
            except RuntimeError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def audit(stack: Stack) -> subprocess.CompletedProcess[str]:
    """``python -m ops.audit --retries 0`` on the stack (servers stopped, outbox drained)."""
    return subprocess.run([sys.executable, "-m", "ops.audit", "--retries", "0"], cwd=ROOT,
                          env=stack.env(), capture_output=True, text=True, timeout=120)
