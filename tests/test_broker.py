"""The broker setting (workers/broker.py): the workers on RabbitMQ end to end, and their
refusal to put Dramatiq's broker on a Redis Cluster node.

RabbitMQ must answer at ``TEST_AMQP_URL`` (default: the local server, guest/guest, vhost
``/``; ``make test`` starts it through scripts/devenv.sh). A run keeps to queues of its own
(``<KEY_PREFIX>.stakepro`` and Dramatiq's ``.DQ``/``.XQ`` beside it) and deletes them at
the end. When RabbitMQ does not answer, these tests fail and say so: they are never skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pika
import pytest
import pytest_asyncio
import redis

from plumbing.settings import Settings
from tests.conftest import free_port
from tests.helpers import Api
from tests.workerprocs import (
    ROOT,
    Stack,
    bet_counts,
    betting_tree,
    paid_exactly,
    persisted_once,
    persisted_stakes,
)
from workers.broker import BrokerSettingError, broker_url, queue_name

pytestmark = pytest.mark.timeout(120)

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _amqp() -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    except pika.exceptions.AMQPError as exc:
        pytest.fail(f"RabbitMQ does not answer at {AMQP_URL} ({exc!r}): start it with "
                    "`scripts/devenv.sh rabbitmq` (or `rabbitmq-server -detached`), or "
                    "point TEST_AMQP_URL at one", pytrace=False)


def _queues(settings: Settings) -> list[str]:
    name = queue_name(settings)
    return [name, f"{name}.DQ", f"{name}.XQ"]


def _queue_exists(name: str) -> bool:
    connection = _amqp()
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:  # 404 NOT_FOUND
        return False
    finally:
        if connection.is_open:
            connection.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The conftest ``stack`` with its workers on RabbitMQ: its own queues, deleted after."""
    _amqp().close()
    s = await Stack.create(tmp_path_factory.mktemp("stack"), broker_url=AMQP_URL)
    try:
        yield s
    finally:
        await s.close()
        connection = _amqp()
        try:
            channel = connection.channel()
            for name in _queues(s.settings):
                channel.queue_delete(name)
        finally:
            connection.close()


async def test_workers_on_rabbitmq_persist_and_pay(
    stack_api: Api, stack: Stack, stack_pool: asyncpg.Pool
) -> None:
    pool = stack_pool
    tree, ids, stakes = await betting_tree(stack_api, players=3, bets=10)
    assert await bet_counts(pool, ids) == {}
    worker, scheduler = stack.worker(), stack.scheduler()
    try:
        await persisted_once(stack, pool, ids, drained=True)
        await paid_exactly(pool, stack, tree, stakes)
        assert worker.alive() and scheduler.alive(), stack.logs()
    finally:
        assert scheduler.stop() == 0, stack.logs()
        assert worker.stop() == 0, stack.logs()
    # The jobs went through RabbitMQ: its queue exists, and Redis holds no broker keys
    # (REDIS_URL's database 1 would have been the Redis broker's).
    assert _queue_exists(queue_name(stack.settings))
    broker_db = redis.Redis.from_url(stack.settings.redis_url.rsplit("/", 1)[0] + "/1")
    try:
        assert broker_db.dbsize() == 0
    finally:
        broker_db.close()
    stack.assert_audit_passes()


async def test_retry_after_commit_on_rabbitmq(
    stack_api: Api, stack: Stack, stack_pool: asyncpg.Pool
) -> None:
    """Dramatiq's retry on RabbitMQ goes through its delay queue: the job that failed after
    COMMIT runs again and completes the batch, stored once and paid once."""
    pool = stack_pool
    tree, ids, stakes = await betting_tree(stack_api, players=2, bets=8)
    worker = stack.worker(fault="persist_after_commit:raise")
    try:
        stack.send("persist_outbox", 0)
        await persisted_once(stack, pool, ids, drained=True)
        log = worker.log.read_text()
        assert "fault injected at persist_after_commit" in log, stack.logs()
        assert "Retrying message" in log, stack.logs()
        await paid_exactly(pool, stack, tree, stakes,
                           nudge=lambda: stack.send("flush_commissions"))
        assert sorted(await persisted_stakes(pool, [u for u, _ in tree.players])) == sorted(
            stakes)
    finally:
        assert worker.stop() == 0, stack.logs()
    stack.assert_audit_passes()


# -- the setting -----------------------------------------------------------------------------


def test_broker_url_picks_the_broker() -> None:
    def plain(_: str) -> bool:
        return False

    def cluster(_: str) -> bool:
        return True

    amqp = "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert broker_url(Settings(broker_url=amqp), is_cluster=cluster) == amqp
    assert broker_url(Settings(redis_url="redis://h:7000/0"), is_cluster=plain) == (
        "redis://h:7000/1")
    with pytest.raises(BrokerSettingError, match="BROKER_URL"):
        broker_url(Settings(redis_url="redis://h:7000/0"), is_cluster=cluster)
    with pytest.raises(BrokerSettingError, match="BROKER_URL"):
        broker_url(Settings(broker_url="kafka://h:9092"), is_cluster=plain)
    assert queue_name(Settings(key_prefix="t1")) == "t1.stakepro"


@pytest.fixture
def cluster_node() -> Iterator[str]:
    """One redis-server in cluster mode (no slots needed: INFO cluster says enabled)."""
    # The cluster bus needs a port of its own: given explicitly (the default, port + 10000,
    # is past 65535 for half of the free ports).
    port, bus = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="stakepro-cluster-"))
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work),
         "--cluster-enabled", "yes", "--cluster-config-file", str(work / "nodes.conf"),
         "--cluster-port", str(bus)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    try:
        for _ in range(400):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                proc.poll()
                assert proc.returncode is None, "redis-server (cluster mode) exited"
                client.connection_pool.disconnect()
                time.sleep(0.025)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.kill()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("argv", [
    ["-m", "dramatiq", "workers.actors", "--processes", "1", "--threads", "1"],
    ["-m", "workers.scheduler"],
])
def test_workers_refuse_a_cluster_without_broker_url(cluster_node: str,
                                                     argv: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "REDIS_URL")}
    env["REDIS_URL"] = cluster_node
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "BrokerSettingError" in done.stderr and "set BROKER_URL" in done.stderr, (
        done.stderr[-2000:])
