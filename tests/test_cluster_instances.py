"""Many game server processes on one Redis Cluster share nothing but Redis and PostgreSQL
(issue 13).

``python -m stakepro serve`` with ``SERVER_PROCESSES=2`` is started as a subprocess on
``cluster_settings`` (one port, two uvicorn processes accepting on it). Which process
holds a socket is read from the kernel (``ss``: the process owning the server's end of
the connection), so the test knows its sockets landed on both. Then:

- one player's sockets on both processes: a bet on any socket reaches every other socket
  of the player as a balance push, in order, whichever process holds either end;
- spectators on both processes: every bet settled on either process is on every
  spectator's feed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect

from plumbing.settings import Settings
from tests.conftest import ADMIN_TOKEN, TEST_SETTINGS, free_port
from tests.helpers import ROOT, Api, Player, eventually, json_or_msgpack
from tests.supervised import children_of, healthz

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROCESSES = 2
#: Sockets opened at most while looking for one on each process (the kernel hands a new
#: connection to whichever process accepts first: usually both get some within a few).
MAX_SOCKETS = 64


def server_env(settings: Settings, port: int, processes: int) -> dict[str, str]:
    """The environment of ``python -m stakepro serve`` on these settings: nothing inherited
    that could name another Redis, database or prefix."""
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in names and not k.startswith("STAKEPRO_FAULT")}
    env.update({
        "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url,
        "KEY_PREFIX": settings.key_prefix, "ADMIN_TOKEN": ADMIN_TOKEN,
        "HOST": "127.0.0.1", "PORT": str(port), "SERVER_PROCESSES": str(processes),
        "REDIS_DURABILITY": settings.redis_durability, "LOG_LEVEL": "warning",
        "PYTHONUNBUFFERED": "1",
        **{k.upper(): str(v).lower() if isinstance(v, bool) else str(v)
           for k, v in TEST_SETTINGS.items() if k != "admin_token"},
    })
    return env


@dataclass
class Instances:
    """The launcher's process, its port and its output."""

    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def assert_no_error_logged(self) -> None:
        """No line of an error (a CROSSSLOT, a MOVED not followed, a failing persister)."""
        bad = [line for line in self.output().splitlines()
               if "[error" in line or "CROSSSLOT" in line or "MOVED" in line]
        assert not bad, "\n".join(bad[:20])

    def children(self) -> set[int]:
        return set(children_of(self.popen.pid))

    def owners(self) -> dict[int, int]:
        """Client port -> pid of the server process holding the connection's server end."""
        done = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( sport = :{self.port} )"],
            capture_output=True, text=True, timeout=10, check=True)
        found = {}
        for line in done.stdout.splitlines():
            fields = line.split()
            # Recv-Q Send-Q Local:Port Peer:Port users:(("python",pid=N,fd=M))
            if "pid=" not in line:
                continue
            peer = int(fields[3].rsplit(":", 1)[1])
            found[peer] = int(line.split("pid=")[1].split(",")[0])
        return found


def launch(settings: Settings, tmp_path: Path, processes: int) -> Instances:
    """``python -m stakepro serve`` on ``settings`` and a free port, its output in a file."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "stakepro", "serve"], cwd=ROOT,
            env=server_env(settings, port, processes), stdout=out, stderr=subprocess.STDOUT)
    return Instances(popen, port, log)


@pytest_asyncio.fixture
async def instances(cluster_settings: Settings, tmp_path: Path) -> AsyncIterator[Instances]:
    running = launch(cluster_settings, tmp_path, PROCESSES)
    popen = running.popen
    try:
        async def up() -> bool:
            assert popen.poll() is None, running.output()
            return (await healthz(running.address))[0] == 200 and (
                len(running.children()) >= PROCESSES)

        await eventually(up, within=60)
        yield running
    finally:
        popen.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(popen.wait, 30)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        print(running.output())


def local_port(ws: ClientConnection) -> int:
    return int(ws.local_address[1])


async def on_every_process(instances: Instances, stack: AsyncExitStack,
                           open_one: Any) -> tuple[list[Any], dict[int, list[Any]]]:
    """Open sockets (``open_one()`` -> (socket, its ClientConnection)) until each server
    process holds at least one: (all of them, pid -> those it holds)."""
    opened: list[tuple[Any, ClientConnection]] = []
    by_pid: dict[int, list[Any]] = {}
    while len(by_pid) < PROCESSES:
        assert len(opened) < MAX_SOCKETS, (
            f"{len(opened)} sockets, all on {sorted(by_pid)}: the processes "
            f"{sorted(instances.children())} did not share them")
        opened.append(await open_one(stack))
        owners = instances.owners()
        by_pid = {}
        for item, ws in opened:
            by_pid.setdefault(owners[local_port(ws)], []).append(item)
    assert set(by_pid) <= instances.children(), (by_pid, instances.children())
    return [item for item, _ in opened], by_pid


async def test_a_players_sockets_on_both_processes_get_every_push(
    instances: Instances,
) -> None:
    async with Api(instances.address, ADMIN_TOKEN) as api, AsyncExitStack() as stack:
        _, token = await api.player(deposit="1000.00")

        async def open_player(s: AsyncExitStack) -> tuple[Player, ClientConnection]:
            p = await s.enter_async_context(api.play(token))
            assert p.ws is not None
            return p, p.ws

        sockets, by_pid = await on_every_process(instances, stack, open_player)
        # A few more, so that each process holds more than one of them most of the time.
        for _ in range(2):
            p, _ = await open_player(stack)
            sockets.append(p)
        # Every socket bets in turn, one bet at a time: the order of balances is known.
        told: list[tuple[int, str]] = []  # (socket index, balance after the bet)
        for rounds in range(2):
            for i, p in enumerate(sockets):
                target, direction = ("50.00", "under") if (i + rounds) % 2 else ("30.00", "over")
                reply = await p.bet("1.37", target, direction)
                assert reply["type"] == "bet_result", reply
                told.append((i, reply["balance"]))

        async def every_push_arrived() -> bool:
            for j, p in enumerate(sockets):
                want = [balance for i, balance in told if i != j]
                while len(p.pushes) < len(want):
                    try:
                        message = await asyncio.wait_for(p.recv_any(), 0.05)
                    except TimeoutError:
                        return False
                    if message.get("type") == "balance":
                        p.pushes.append(message)
            return True

        try:
            await eventually(every_push_arrived, within=15)
        except AssertionError:
            pass  # the assertion below says what is missing
        for j, p in enumerate(sockets):
            got = [push["balance"] for push in p.pushes if push["reason"] == "bet"]
            want = [balance for i, balance in told if i != j]
            assert got == want, (j, {pid: len(v) for pid, v in by_pid.items()}, got, want)
    instances.assert_no_error_logged()


async def test_spectators_on_both_processes_see_every_bet(instances: Instances) -> None:
    async with Api(instances.address, ADMIN_TOKEN) as api, AsyncExitStack() as stack:

        async def open_spectator(
            s: AsyncExitStack,
        ) -> tuple[ClientConnection, ClientConnection]:
            ws = await s.enter_async_context(connect(
                f"ws://{instances.address}/ws/feed", compression=None, max_size=2**22))
            return ws, ws

        spectators, by_pid = await on_every_process(instances, stack, open_spectator)
        await api.feed_is_live(*spectators)
        # Players whose sockets land on both processes too, betting at once.
        players = [await api.player(deposit="100.00") for _ in range(4)]

        async def open_player(s: AsyncExitStack) -> tuple[Player, ClientConnection]:
            _, token = players[len(opened) % len(players)]
            p = await s.enter_async_context(api.play(token))
            assert p.ws is not None
            opened.append(p)
            return p, p.ws

        opened: list[Player] = []
        betting, _ = await on_every_process(instances, stack, open_player)

        async def bets_of(p: Player) -> list[str]:
            ids = []
            for _ in range(5):
                reply = await p.bet("0.50", "50.00")
                assert reply["type"] == "bet_result", reply
                ids.append(str(reply["bet_id"]))
            return ids

        placed = {bet_id for ids in await asyncio.gather(*map(bets_of, betting))
                  for bet_id in ids}

        async def sees_all(ws: ClientConnection) -> set[str]:
            seen: set[str] = set()
            try:
                async with asyncio.timeout(15):
                    while not placed <= seen:
                        message = json_or_msgpack(await ws.recv())
                        seen.update(str(b["bet_id"]) for b in message["bets"])
            except TimeoutError:
                pass
            return seen & placed

        seen = await asyncio.gather(*map(sees_all, spectators))
        missing = {i: len(placed - s) for i, s in enumerate(seen) if s != placed}
        assert not missing, (missing, len(placed), {p: len(v) for p, v in by_pid.items()})
    instances.assert_no_error_logged()

