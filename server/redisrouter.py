"""The bet path's connection to a Redis Cluster: slot routing over one FastConnection per
master (docs/decisions.md, section 6).

It offers what :class:`server.resp.FastConnection` offers (``execute``, ``send_now``,
``ready_run_id``, ``stalled_for``, ``connect``, ``close``), so the Batcher and the wallet
can use either. How a call finds its node:

- **The slot map** comes from ``CLUSTER SHARDS`` (Redis 7.0 and later), asked of any node
  that answers: the one in ``REDIS_URL`` first, then every node known from an earlier map.
  Each master gets a FastConnection with the URL's scheme, credentials and TLS options and
  the same connect and read timeouts, so each reads its own server's run id on connecting.
- **A batch** (``send_now``) is split by the slot of each command's first key (every
  script's keys share one ``{bN}`` tag, so the first key names the slot of all); each
  master's part is written in one write, and replies are handed over as they arrive.
- **The run id is per node**: ``ready_run_id`` returns :data:`server.redisconn.RUN_ID`
  itself, and each node's part gets that node's run id in its place when it is written,
  also when a redirect sends the command to another node.
- **MOVED** (the slot has another master: a failover, or a resharding finished): the map
  is asked again and the command is sent to the named node. **ASK** (the slot is being
  migrated and the key is already on the target): ``ASKING`` then the command, to the
  named node, once, without changing the map. After :data:`MAX_REDIRECTS` redirects of
  one command its last error reply is its answer. **TRYAGAIN** (a call whose keys are
  split between the two ends of a migration) is resent after a short pause, through the
  map again, for up to the read timeout. A resend is safe because every money
  script is idempotent by the request's id.
- **A lost connection** (a master killed, a failover) fails the calls in flight on it with
  the connection's error, as one connection does (the callers answer UNAVAILABLE), and
  makes ``ready_run_id`` None, so the next batch first calls ``connect``, which reads the
  map again and connects to the masters it names.

A command with no key goes to one master; ``execute`` sends a batch of ``SCRIPT``
commands (``SCRIPT LOAD``) to every master.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from server.redisconn import RUN_ID, RunId
from server.resp import Command, FastConnection, OnReply

log = structlog.get_logger(__name__)

SLOTS = 16384
#: Redirects one command may follow before its error reply is its answer.
MAX_REDIRECTS = 5
#: TRYAGAIN (a multi-key call on a slot in migration) is resent after this pause, for as
#: long as the read timeout, then the error is its answer (the caller answers UNAVAILABLE).
TRYAGAIN_DELAY_S = 0.05

Address = tuple[str, int]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return {_text(k): v for k, v in zip(flat[::2], flat[1::2], strict=True)}


def slot_of(command: Command) -> int | None:
    """The slot of an EVALSHA/EVAL command's first key (None when it names no key)."""
    if len(command) < 4 or _text(command[0]).upper() not in ("EVALSHA", "EVAL"):
        return None
    if int(command[2]) == 0:
        return None
    key = command[3]
    return int(key_slot(key if isinstance(key, bytes) else str(key).encode()))


def redirect_of(reply: Any) -> tuple[str, Address] | None:
    """("MOVED" or "ASK", node address) of a redirect error reply, ("TRYAGAIN", ("", 0))
    for TRYAGAIN, else None."""
    if not isinstance(reply, ResponseError):
        return None
    words = str(reply).split()
    if words and words[0] == "TRYAGAIN":
        return "TRYAGAIN", ("", 0)
    if len(words) != 3 or words[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = words[2].rpartition(":")
    return words[0], (host, int(port))


def _fill(command: Command, run_id: str) -> Command:
    return tuple(run_id if a is RUN_ID else a for a in command)


class ClusterConnection:
    """The bet path's connection when ``REDIS_URL`` names a node of a cluster."""

    def __init__(
        self, url: str, connect_timeout: float = 5.0, read_timeout: float = 5.0
    ) -> None:
        # Validates the URL (scheme, options) exactly as the one-node connection does.
        FastConnection(url, RunId(), connect_timeout, read_timeout)
        self._url = urlsplit(url)
        first = (self._url.hostname or "127.0.0.1", self._url.port or 6379)
        self._known: list[Address] = [first]
        self._timeouts = (connect_timeout, read_timeout)
        self._nodes: dict[Address, FastConnection] = {}
        self._owner: list[Address] = []
        #: The distinct addresses of ``_owner``, kept with it: the set of a 16,384-slot
        #: map costs about a millisecond, and every tick asks for the masters twice.
        self._master_addresses: tuple[Address, ...] = ()
        self._connecting = asyncio.Lock()
        #: Redirects followed (MOVED, ASK), TRYAGAIN resends and map reads.
        self.moved = 0
        self.asked = 0
        self.retried = 0
        self.refreshes = 0

    # -- the map --------------------------------------------------------------------------

    def _node_url(self, address: Address) -> str:
        netloc = f"{address[0]}:{address[1]}"
        if "@" in self._url.netloc:
            netloc = self._url.netloc.rsplit("@", 1)[0] + "@" + netloc
        return urlunsplit((self._url.scheme, netloc, "/0", self._url.query, ""))

    def _node(self, address: Address) -> FastConnection:
        node = self._nodes.get(address)
        if node is None:
            node = FastConnection(self._node_url(address), RunId(), *self._timeouts)
            self._nodes[address] = node
        return node

    async def _read_map(self) -> list[Address]:
        errors = []
        for address in list(self._known):
            probe = self._node(address)
            try:
                (shards,) = await probe.execute([("CLUSTER", "SHARDS")])
            except RedisError as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            if isinstance(shards, RedisError):
                errors.append(f"{address[0]}:{address[1]}: {shards}")
                continue
            return self._owners(shards)
        raise RedisConnectionError(f"no cluster node gave its slot map ({'; '.join(errors)})")

    def _owners(self, shards: list[Any]) -> list[Address]:
        owner: list[Address | None] = [None] * SLOTS
        for shard in shards:
            fields = _pairs(shard)
            for node in (_pairs(n) for n in fields["nodes"]):
                address = (_text(node["ip"]), int(node["port"]))
                if address not in self._known:
                    self._known.append(address)
                if _text(node["role"]) != "master" or _text(node.get("health")) != "online":
                    continue
                ranges = fields["slots"]
                for start, end in zip(ranges[::2], ranges[1::2], strict=True):
                    for slot in range(int(start), int(end) + 1):
                        owner[slot] = address
        missing = owner.count(None)
        if missing:
            raise RedisConnectionError(f"{missing} slots have no master in the cluster's map")
        return [a for a in owner if a is not None]

    async def _refresh(self) -> None:
        """Read the map again and connect to every master it names."""
        async with self._connecting:
            owner = await self._read_map()
            self.refreshes += 1
            for address in set(owner):
                await self._node(address).connect()
            self._owner = owner
            self._master_addresses = tuple(dict.fromkeys(owner))

    async def connect(self) -> None:
        if self.ready_run_id() is None:
            await self._refresh()

    def _masters(self) -> Iterable[FastConnection]:
        return (self._nodes[a] for a in self._master_addresses)

    def ready_run_id(self) -> str | None:
        """:data:`RUN_ID` (each node's part gets its own server's run id) when the map is
        known and every master is connected; else None (call :meth:`connect`)."""
        if not self._owner or any(n.ready_run_id() is None for n in self._masters()):
            return None
        return RUN_ID

    def stalled_for(self) -> float:
        return max((n.stalled_for() for n in self._nodes.values()), default=0.0)

    # -- sending ------------------------------------------------------------------------

    def send_now(self, commands: list[Command], on_reply: OnReply) -> None:
        """As :meth:`FastConnection.send_now`: each node's part in one write, ``on_reply``
        once per command (after redirects were followed). Raises ConnectionError, having
        sent nothing, when a master is not connected."""
        if self.ready_run_id() is None:
            raise RedisConnectionError("not connected to every master of the cluster")
        parts: dict[Address, tuple[list[Command], list[int]]] = {}
        first = self._owner[0]
        for i, command in enumerate(commands):
            slot = slot_of(command)
            address = first if slot is None else self._owner[slot]
            part = parts.setdefault(address, ([], []))
            part[0].append(command)
            part[1].append(i)
        for address, (cmds, index) in parts.items():
            node = self._nodes[address]
            run_id = node.ready_run_id() or ""
            node.send_now([_fill(c, run_id) for c in cmds],
                          self._answer(cmds, index, on_reply))

    def _answer(self, part: list[Command], index: list[int], on_reply: OnReply,
                redirects: int = 0, tries: int = 0) -> OnReply:
        """The reply handler of ``part``: redirects and TRYAGAIN are followed (within
        their budgets, ``redirects`` and ``tries`` being what this command has used),
        every other reply goes to ``on_reply`` under the command's index."""
        def answer(j: int, reply: Any) -> None:
            redirect = redirect_of(reply)
            if redirect is None or (
                tries * TRYAGAIN_DELAY_S >= self._timeouts[1] if redirect[0] == "TRYAGAIN"
                else redirects >= MAX_REDIRECTS
            ):
                on_reply(index[j], reply)
                return
            task = asyncio.get_running_loop().create_task(
                self._follow(redirect, part[j], index[j], on_reply, redirects, tries)
            )
            _FOLLOWING.add(task)
            task.add_done_callback(_FOLLOWING.discard)

        return answer

    async def _follow(self, redirect: tuple[str, Address], command: Command, i: int,
                      on_reply: OnReply, redirects: int, tries: int) -> None:
        kind, address = redirect
        try:
            if kind == "TRYAGAIN":
                self.retried += 1
                tries += 1
                await asyncio.sleep(TRYAGAIN_DELAY_S)
                slot = slot_of(command)
                address = self._owner[0 if slot is None else slot]
            else:
                redirects += 1
                if address not in self._known:
                    self._known.append(address)
            if kind == "MOVED":
                self.moved += 1
                slot = slot_of(command)
                # One map read serves every call redirected by the same change.
                if slot is None or self._owner[slot] != address:
                    await self._refresh()
            elif kind == "ASK":
                self.asked += 1
            node = self._node(address)
            await node.connect()
            run_id = node.ready_run_id() or ""
            answer = self._answer([command], [i], on_reply, redirects, tries)
            if kind == "ASK":
                # ASKING's own reply (OK) is dropped; the command's is the answer.
                def after_asking(k: int, reply: Any) -> None:
                    if k == 1:
                        answer(0, reply)

                node.send_now([("ASKING",), _fill(command, run_id)], after_asking)
            else:
                node.send_now([_fill(command, run_id)], answer)
        except Exception as exc:  # RedisError while reconnecting, or a bug: still answered
            on_reply(i, exc if isinstance(exc, RedisError) else RedisConnectionError(repr(exc)))

    async def execute(self, commands: list[Command]) -> list[Any]:
        """Send ``commands`` and wait for their replies, in order (error replies in the
        list, as :meth:`FastConnection.execute`). A batch of ``SCRIPT`` commands goes to
        every master and answers with the first master's replies.

        Raises:
            ValueError: ``SCRIPT`` commands mixed with others in one batch.
        """
        await self.connect()
        is_script = [_text(c[0]).upper() == "SCRIPT" for c in commands]
        if any(is_script):
            if not all(is_script):
                raise ValueError("SCRIPT commands go to every master: send them apart")
            replies: list[Any] | None = None
            for node in self._masters():
                answered = await node.execute(commands)
                replies = answered if replies is None else replies
            return replies or []
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]

        def on_reply(i: int, reply: Any) -> None:
            if not futures[i].done():
                futures[i].set_result(reply)

        self.send_now(commands, on_reply)
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        nodes, self._nodes, self._owner = list(self._nodes.values()), {}, []
        self._master_addresses = ()
        for node in nodes:
            await node.close()


#: Redirects being followed (a task must be referenced until it ends).
_FOLLOWING: set[asyncio.Task[None]] = set()
