"""The supervisor (``python -m stakepro``, what ``make run`` starts) keeps the stack up.

With real processes on a stack of their own (Redis, database, free port), each SIGKILLed
from outside: a Dramatiq worker process under load (bets keep being answered on the open
sockets, the workers child comes back, persistence catches up, the audit passes); the
scheduler; the game server (a new socket works after its restart). Each death is one log
line and each restart another, and the other children keep their pids. SIGTERM to the
supervisor stops everything and exits 0, and restarts in a row wait longer each time
(:class:`stakepro.supervisor.Backoff`, checked on its own below).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from stakepro.supervisor import Backoff, ending
from tests.conftest import ADMIN_TOKEN, free_port
from tests.helpers import Api
from tests.supervised import Bettor, Supervised, audit, children_of, cmdline, running, tree
from tests.workerprocs import Stack, Tree, bet_counts, eventually, paid_exactly

# -- the backoff, pure -------------------------------------------------------------------------


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=60))
def test_backoff_doubles_up_to_the_cap_and_resets_after_a_stable_run(
    uptimes: list[float],
) -> None:
    backoff = Backoff(first=0.5, cap=30.0, stable=30.0)
    in_a_row = 0  # the model: quick deaths since the last stable run
    for uptime in uptimes:
        in_a_row = 0 if uptime >= 30.0 else in_a_row
        assert backoff.delay(uptime) == min(30.0, 0.5 * 2 ** min(in_a_row, 10))
        in_a_row += 1


def test_backoff_survives_endless_quick_deaths() -> None:
    backoff = Backoff(first=0.5, cap=30.0, stable=30.0)
    delays = [backoff.delay(0.1) for _ in range(5000)]
    assert delays[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert set(delays[6:]) == {30.0}
    assert backoff.delay(30.0) == 0.5


@pytest.mark.parametrize(("first", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_backoff_refuses_nonsense(first: float, cap: float) -> None:
    with pytest.raises(ValueError, match="first"):
        Backoff(first=first, cap=cap)


def test_ending_says_how() -> None:
    assert ending(-signal.SIGKILL) == "was killed by SIGKILL"
    assert ending(1) == "exited with code 1"
    assert ending(0) == "exited with code 0"


# -- the real thing ----------------------------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    s = await Stack.create(tmp_path_factory.mktemp("supervisor"))
    yield s
    await s.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def supervised(stack: Stack) -> AsyncIterator[Supervised]:
    sup = Supervised.start(stack)
    await sup.up()
    yield sup
    if sup.proc.alive():
        assert await sup.terminate() == 0, sup.output()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=2)
    yield p
    await p.close()


async def persisted(stack: Stack, pool: asyncpg.Pool, ids: list[str],
                    within: float = 30.0) -> float:
    """Wait until every bet id is in ``bets`` exactly once and the outbox is empty; the
    seconds it took."""
    started = time.monotonic()

    async def all_in() -> bool:
        return await bet_counts(pool, ids) == dict.fromkeys(ids, 1) and (
            await stack.pending() == 0)

    await eventually(all_in, within)
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_worker_process_killed_under_load(
    supervised: Supervised, stack: Stack, pool: asyncpg.Pool
) -> None:
    before = await supervised.pids()
    async with Api(supervised.address, ADMIN_TOKEN) as api:
        agents = await Tree.create(api, players=3, deposit="5000.00")
    bettors = [Bettor(supervised.address, uid, token) for uid, token in agents.players]
    stop = asyncio.Event()
    runs = [asyncio.create_task(b.run(stop)) for b in bettors]
    try:
        async def busy() -> bool:
            return all(len(b.acks) >= 20 for b in bettors)

        await eventually(busy, 20.0)
        os.kill(before.worker, signal.SIGKILL)
        killed = time.monotonic()

        after = await supervised.pids(lambda p: p.worker != before.worker)
        assert after.dramatiq != before.dramatiq
        assert (after.server, after.scheduler) == (before.server, before.scheduler)

        async def still_answered() -> bool:  # on the same sockets, well after the kill
            return all(b.acked_after(killed + 1.0) >= 20 for b in bettors)

        await eventually(still_answered, 20.0)
    finally:
        stop.set()
        await asyncio.gather(*runs)
    for b in bettors:
        assert b.closes == [] and b.unexpected == [] and b.unresolved == [], b
    await supervised.logged(f"workers restarted (pid {after.dramatiq}, restart 1)")
    deaths = supervised.lines(f"workers (pid {before.dramatiq}) exited with code 1")
    assert len(deaths) == 1 and "restarting in 0.5s" in deaths[0], supervised.output()
    assert not running(before.worker) and not running(before.dramatiq)

    ids = [bet_id for b in bettors for bet_id in b.bet_ids()]
    assert len(set(ids)) == len(ids)
    await persisted(stack, pool, ids)
    stakes = [500] * len(ids)
    await paid_exactly(pool, stack, agents, stakes)
    result = audit(stack)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_scheduler_killed_is_restarted(
    supervised: Supervised, stack: Stack, pool: asyncpg.Pool
) -> None:
    before = await supervised.pids()
    os.kill(before.scheduler, signal.SIGKILL)
    after = await supervised.pids(lambda p: p.scheduler != before.scheduler)
    assert (after.server, after.dramatiq, after.worker) == (
        before.server, before.dramatiq, before.worker)
    await supervised.logged(f"scheduler restarted (pid {after.scheduler}")
    assert len(supervised.lines(f"scheduler (pid {before.scheduler}) was killed by SIGKILL")) == 1
    # Jobs are scheduled again: bets settled now reach PostgreSQL.
    async with Api(supervised.address, ADMIN_TOKEN) as api:
        _, token = await api.player(deposit="10.00")
        async with api.play(token) as p:
            ids = [str((await p.bet(amount="0.10"))["bet_id"]) for _ in range(5)]
    await persisted(stack, pool, ids)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_game_server_killed_is_restarted(
    supervised: Supervised, stack: Stack, pool: asyncpg.Pool
) -> None:
    before = await supervised.pids()
    async with Api(supervised.address, ADMIN_TOKEN) as api:
        _, token = await api.player(deposit="10.00")
        async with api.play(token) as p:
            first = await p.bet(amount="0.10")
            assert first["type"] == "bet_result"
            os.kill(before.server, signal.SIGKILL)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(p.bet(amount="0.10"), 10)
        after = await supervised.pids(lambda p: p.server != before.server)
        assert (after.scheduler, after.dramatiq, after.worker) == (
            before.scheduler, before.dramatiq, before.worker)
        await supervised.logged(f"server restarted (pid {after.server}")
        assert len(supervised.lines(f"server (pid {before.server}) was killed by SIGKILL")) == 1

        async def new_socket_bets() -> str | None:  # the new server may still be starting
            try:
                async with api.play(token) as p:
                    reply = await p.bet(amount="0.10")
            except Exception:
                return None
            assert reply["type"] == "bet_result", reply
            return str(reply["bet_id"])

        second = await eventually(new_socket_bets, 30.0, every=0.2)
    await persisted(stack, pool, [str(first["bet_id"]), second])


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_sigterm_stops_everything_and_restarts_back_off(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    stack = await Stack.create(tmp_path_factory.mktemp("sigterm"))
    try:
        sup = Supervised.start(stack)
        await sup.up()
        pids = await sup.pids()
        # Two quick deaths in a row: the second waits twice as long.
        os.kill(pids.scheduler, signal.SIGKILL)
        second = await sup.pids(lambda p: p.scheduler != pids.scheduler)
        os.kill(second.scheduler, signal.SIGKILL)
        await sup.pids(lambda p: p.scheduler != second.scheduler)
        delays = [re.search(r"restarting in ([0-9.]+)s", line)
                  for line in sup.lines("scheduler (pid")]
        assert [m.group(1) for m in delays if m] == ["0.5", "1.0"], sup.output()

        everything = tree(sup.proc.popen.pid)
        assert len(everything) == 5  # supervisor, server, scheduler, dramatiq, its worker
        assert await sup.terminate() == 0, sup.output()
        assert sup.output().rstrip().endswith("stopped"), sup.output()

        async def all_gone() -> bool:
            return not any(running(pid) for pid in everything)

        await eventually(all_gone, 10.0)
        deaths = [line for line in sup.output().splitlines()
                  if " exited with code " in line or " was killed by " in line]
        assert len(deaths) == 2, sup.output()  # the two kills: stopping is no death
    finally:
        await stack.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_dramatiq_main_killed_leaves_no_orphan_worker(
    supervised: Supervised, stack: Stack, pool: asyncpg.Pool
) -> None:
    """Its worker process outlives it (no parent-death signal there): the supervisor stops
    what is left in the child's process group before starting the child again."""
    before = await supervised.pids()
    os.kill(before.dramatiq, signal.SIGKILL)
    after = await supervised.pids(lambda p: p.dramatiq != before.dramatiq)
    assert not running(before.worker), "the old worker process still runs beside the new"
    assert (after.server, after.scheduler) == (before.server, before.scheduler)
    await supervised.logged(f"workers (pid {before.dramatiq}) was killed by SIGKILL")
    async with Api(supervised.address, ADMIN_TOKEN) as api:
        _, token = await api.player(deposit="10.00")
        async with api.play(token) as p:
            ids = [str((await p.bet(amount="0.10"))["bet_id"]) for _ in range(5)]
    await persisted(stack, pool, ids)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_supervisor_killed_takes_its_children_along(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SIGKILL leaves the supervisor no say: the children's parent-death signal (SIGTERM)
    stops them, and Dramatiq's main process stops its worker process."""
    stack = await Stack.create(tmp_path_factory.mktemp("sigkill"))
    try:
        sup = Supervised.start(stack)
        await sup.up()
        await sup.pids()  # every child and the Dramatiq worker process run
        everything = tree(sup.proc.popen.pid)
        assert len(everything) == 5
        sup.proc.kill()

        async def all_gone() -> bool:
            return not any(running(pid) for pid in everything)

        await eventually(all_gone, 30.0)
    finally:
        await stack.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_one_worker_process_of_two_killed_stops_only_its_own(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    stack = await Stack.create(tmp_path_factory.mktemp("two"))
    try:
        sup = Supervised.start(stack, WORKER_PROCESSES="2")
        await sup.up()

        async def dramatiqs() -> dict[int, int] | None:
            """Each dramatiq child of the supervisor -> its one worker process."""
            mains = [p for p in children_of(sup.proc.popen.pid) if "dramatiq" in cmdline(p)]
            workers = {m: children_of(m) for m in mains}
            if len(mains) != 2 or any(len(w) != 1 for w in workers.values()):
                return None
            return {m: w[0] for m, w in workers.items()}

        before = await eventually(dramatiqs)
        victim, survivor = sorted(before)
        os.kill(before[victim], signal.SIGKILL)

        async def replaced() -> dict[int, int] | None:
            now = await dramatiqs()
            return now if now is not None and victim not in now else None

        after = await eventually(replaced, 30.0)
        assert after[survivor] == before[survivor]  # the sibling never stopped
        deaths = [line for line in sup.output().splitlines()
                  if f"(pid {victim}) exited with code 1" in line]
        assert len(deaths) == 1 and deaths[0].startswith("workers-"), sup.output()
        assert await sup.terminate() == 0, sup.output()
    finally:
        await stack.close()


@pytest.mark.parametrize("value", ["0", "65", "two", "٢"])
def test_bad_worker_processes_is_refused_before_anything_starts(value: str) -> None:
    env = {**os.environ, "WORKER_PROCESSES": value,
           # Nothing answers here: reaching the migration would fail differently.
           "DATABASE_URL": f"postgresql://root@127.0.0.1:{free_port()}/none"}
    done = subprocess.run([sys.executable, "-m", "stakepro"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"WORKER_PROCESSES must be a whole number from 1 to 64, got {value!r}" in (
        done.stderr), done.stderr
    assert done.stdout == ""
