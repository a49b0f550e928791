"""Balance pushes: every change of a user's balance reaches each of that user's sockets on
every server instance, except the socket whose own bet caused it.

The Lua scripts publish ``reason|origin|currency|balance`` on the user's channel in the same
atomic call that changes the balance; each instance subscribes to the channels of the users
connected to it and fans the message out locally. The same channel carries ``revoke``
(server/tokens.py): every socket of that user is closed.
"""

from __future__ import annotations

from typing import Protocol

from plumbing.keys import Keys
from server.pubsub import Hub


class Sink(Protocol):
    socket_id: str

    def push_balance(self, reason: str, currency: str, balance: int) -> None: ...

    def revoked(self) -> None: ...


class Pushes:
    def __init__(self, hub: Hub, keys: Keys) -> None:
        self._hub = hub
        self._keys = keys
        self._sinks: dict[int, set[Sink]] = {}

    async def add(self, user_id: int, sink: Sink) -> None:
        sinks = self._sinks.setdefault(user_id, set())
        sinks.add(sink)
        if len(sinks) == 1:
            await self._hub.subscribe(
                self._keys.user_channel(user_id), lambda data: self._deliver(user_id, data)
            )

    async def remove(self, user_id: int, sink: Sink) -> None:
        sinks = self._sinks.get(user_id)
        if sinks is None:
            return
        sinks.discard(sink)
        if not sinks:
            del self._sinks[user_id]
            await self._hub.unsubscribe(self._keys.user_channel(user_id))

    def local_count(self, user_id: int) -> int:
        """How many sockets of this user are connected to this instance."""
        return len(self._sinks.get(user_id, ()))

    def _deliver(self, user_id: int, data: bytes) -> None:
        reason, origin, currency, balance = data.decode().split("|")
        if reason == "revoke":  # the user's token was revoked (server/tokens.py)
            for sink in tuple(self._sinks.get(user_id, ())):
                sink.revoked()
            return
        for sink in tuple(self._sinks.get(user_id, ())):
            if sink.socket_id != origin:
                sink.push_balance(reason, currency, int(balance))
