"""Start-up against a Redis that is still loading its data."""

from __future__ import annotations

import pytest
from redis.exceptions import BusyLoadingError, ConnectionError

from server import services


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
