"""Start-up against a Redis that is still loading its data."""

from __future__ import annotations

import pytest
from redis.exceptions import BusyLoadingError, ConnectionError

from server import services
from tests.helpers import Api


async def test_start_waits_while_redis_is_loading() -> None:
    calls = 0

    async def load() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise BusyLoadingError("Redis is loading the dataset in memory")

    await services._when_loaded(load)
    assert calls == 3


async def test_start_fails_at_once_when_redis_is_down() -> None:
    calls = 0

    async def load() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        await services._when_loaded(load)
    assert calls == 1


async def test_the_objects_built_at_start_are_frozen_out_of_the_collector(api: Api) -> None:
    """server/app.py freezes what start-up built (gc.freeze), so the bet path's full
    collections do not walk it: without it p99.9 showed ~90 ms spikes every few seconds."""
    import gc

    assert gc.get_freeze_count() > 10_000
