"""Outages under load (issue 12): PostgreSQL unreachable for 30 s, then a worker SIGKILLed
and replaced, while players keep betting. Afterwards every acknowledged bet is in
PostgreSQL exactly once, every balance equals the ledger, and ``python -m ops.audit``
passes.

The shared PostgreSQL server must not be stopped (other test sessions use it), so the stack
reaches it through a TCP gate of this test's own on a loopback port: closing the gate
refuses new connections and cuts the open ones, which is what the stack sees when
PostgreSQL stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio

from tests.conftest import ADMIN_TOKEN, free_port, started
from tests.helpers import Api, bet_settled
from tests.workerprocs import DIFF, Stack, Tree, bet_counts, eventually, ledger_equals_redis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

OUTAGE_S = 30.0
PACE_S = 0.02  # between two bets of one player


async def keep_betting(api: Api, uid: int, token: str, stop: asyncio.Event,
                       told: dict[str, str]) -> None:
    """One player, one bet at a time until ``stop``; every result's bet id goes to
    ``told`` (a bet answered UNAVAILABLE is resent with its id until it is answered)."""
    async with api.play(token) as p:
        n = 0
        while not stop.is_set():
            message = {"type": "bet", "id": f"{uid}-{n}", "currency": "USDT",
                       "amount": "0.25", "target": "50.00",
                       "direction": "under" if n % 2 else "over"}
            told[message["id"]] = (await bet_settled(p, message))["bet_id"]
            n += 1
            await asyncio.sleep(PACE_S)


class Gate:
    """A TCP forwarder 127.0.0.1:port -> PostgreSQL that can be closed and opened again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.port = free_port()
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._links -= {writer, up_writer}


@pytest_asyncio.fixture(loop_scope="session")
async def gated(tmp_path: Path) -> AsyncIterator[tuple[Stack, Gate]]:
    stack = await Stack.create(tmp_path, appendonly=True)
    direct = stack.settings.database_url
    host_port = direct.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    gate = Gate(host, int(port or 5432))
    await gate.open()
    stack.settings = stack.settings.model_copy(update={
        "database_url": direct.replace(host_port, f"127.0.0.1:{gate.port}", 1),
        "redis_durability": "always"})
    yield stack, gate
    await gate.open()
    await stack.close()
    await gate.close()


async def test_postgres_down_30s_then_a_worker_killed_under_load(
    gated: tuple[Stack, Gate],
) -> None:
    stack, gate = gated
    server, task, address = await started(stack.settings)
    procs = [stack.scheduler(), stack.worker()]
    stop = asyncio.Event()
    pool: asyncpg.Pool | None = None
    try:
        async with Api(address, ADMIN_TOKEN) as api:
            tree = await Tree.create(api, players=3, deposit="500.00")
            told: dict[str, str] = {}
            load = [asyncio.create_task(keep_betting(api, uid, token, stop, told))
                    for uid, token in tree.players]
            await asyncio.sleep(2.0)

            await gate.close()
            down_at = time.monotonic()
            async with httpx.AsyncClient() as http:
                async def unhealthy() -> bool:
                    r = await http.get(f"http://{address}/healthz")
                    return r.status_code == 503 and r.json()["postgres"] == "error"

                await eventually(unhealthy, within=10)
            during = len(told)
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            assert len(told) > during, "bets stopped with PostgreSQL"
            await gate.open()

            await asyncio.sleep(3.0)
            worker = procs.pop()
            worker.kill()
            await asyncio.sleep(3.0)
            procs.append(stack.worker())
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*load)

            pool = await asyncpg.create_pool(stack.settings.database_url, min_size=1,
                                             max_size=2)
            ids = list(told.values())
            assert len(ids) == len(set(ids))

            async def all_in() -> bool:
                assert pool is not None
                return await bet_counts(pool, ids) == dict.fromkeys(ids, 1)

            await eventually(all_in, within=60)
            await eventually(lambda: stack.commissions_idle(), within=60)
            users = [uid for uid, _ in tree.players] + [int(u) for u, _ in tree.chain]
            try:
                await eventually(lambda: ledger_equals_redis(stack, pool, users), within=30)
            except AssertionError:
                raise AssertionError(f"Redis != ledger: {DIFF}\n{stack.logs()}") from None
            print(f"\n{len(ids)} bets acknowledged, PostgreSQL down {OUTAGE_S:.0f} s")
        audit = await asyncio.to_thread(stack.audit)
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        stop.set()
        for proc in reversed(procs):
            proc.kill()
        if pool is not None:
            await pool.close()
        server.should_exit = True
        await task
