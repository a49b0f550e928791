"""Every Redis key and pub/sub channel name, built in one place.

Cluster layout: a user belongs to one of ``buckets`` buckets, and every key that one Lua call
touches carries that bucket's hash tag ``{bN}``: the user's balances, seed pair, idempotency
records, and the bucket's outbox stream. So a bet is one single-slot script call on a Redis
Cluster too, and workers drain the ``buckets`` outbox streams.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def bucket_of(user_id: int, buckets: int) -> int:
    """The user's bucket: stable across processes (crc32, not Python's salted hash)."""
    return zlib.crc32(str(user_id).encode()) % buckets


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str
    buckets: int

    def tag(self, user_id: int) -> str:
        return f"{{b{bucket_of(user_id, self.buckets)}}}"

    def balances(self, user_id: int) -> str:
        """Hash: currency -> balance in minor units."""
        return f"{self.prefix}:bal:{self.tag(user_id)}:{user_id}"

    def seed(self, user_id: int) -> str:
        """Hash of the active seed pair: pid, ss, sh, cs, n (see lua/bet-n.lua)."""
        return f"{self.prefix}:seed:{self.tag(user_id)}:{user_id}"

    def bet_idem(self, user_id: int, client_id: int | str) -> str:
        """Idempotency record of one client bet id (``1`` and ``"1"`` differ)."""
        return bet_idem_key(self.bet_idem_prefix(user_id), client_id)

    def bet_idem_prefix(self, user_id: int) -> str:
        """What every :meth:`bet_idem` key of ``user_id`` starts with (see bet_idem_key)."""
        return f"{self.prefix}:idem:{self.tag(user_id)}:{user_id}:"

    def deposit_idem(self, user_id: int, idempotency_key: str) -> str:
        return f"{self.prefix}:dep:{self.tag(user_id)}:{user_id}:{idempotency_key}"

    def healed(self, user_id: int) -> str:
        """String: the Redis run id under which the user's state was last made equal to the
        ledger (lua/heal-n.lua); every money script of the user refuses while it differs."""
        return f"{self.prefix}:healed:{self.tag(user_id)}:{user_id}"

    def outbox_for(self, user_id: int) -> str:
        return self.outbox(bucket_of(user_id, self.buckets))

    def outbox(self, bucket: int) -> str:
        """Stream of settled events (bet, deposit, reveal) of one bucket."""
        return f"{self.prefix}:outbox:{{b{bucket}}}"

    def all_outboxes(self) -> list[str]:
        return [self.outbox(b) for b in range(self.buckets)]

    def user_channel(self, user_id: int) -> str:
        """Pub/sub channel of balance pushes for one user (every server instance)."""
        return f"{self.prefix}:push:{self.tag(user_id)}:{user_id}"

    def feed_channel(self) -> str:
        return f"{self.prefix}:feed"

    def outbox_dead(self) -> str:
        """Stream of outbox entries that could not be persisted, kept for a person."""
        return f"{self.prefix}:outbox-dead"

    def persist_lease(self, shard: int, shards: int) -> str:
        """The lease of persist shard ``shard`` of ``shards`` (workers/actors.py)."""
        return f"{self.prefix}:plock:{shard}/{shards}"

    def heartbeat(self) -> str:
        """Pub/sub channel the server's hub pings to notice a dead subscription."""
        return f"{self.prefix}:heartbeat"

    # -- commissions (workers/commissions.py) ----------------------------------------------

    def credit_marker(self, flush_id: str, user_id: int) -> str:
        """Marker: the commission flush ``flush_id`` was credited to ``user_id``'s balance.

        Set by lua/commission-credit-n.lua in the same call that credits, on the user's
        bucket, and lives :data:`CREDIT_MARKER_TTL_S`. The ledger rows of that credit are
        :func:`commission_entry_id` ``(flush_id, user_id, currency)``: whoever sets a
        balance from the ledger sets these markers too, so the credit is not added again.
        """
        return f"{self.prefix}:ccred:{self.tag(user_id)}:{flush_id}:{user_id}"

    def commission_confirmed(self) -> str:
        """Set of flush ids whose credits Redis took, not yet recorded in PostgreSQL
        (``commission_flushes.credited_at``); the next flush statement records them."""
        return f"{self.prefix}:cconfirmed"

    def worker_stats(self) -> str:
        """Hash of counters the workers add to and the server's /metrics exports (one key:
        telemetry, read once per scrape)."""
        return f"{self.prefix}:stats:workers"

    def commission_lease(self) -> str:
        """The flush lease: held by the one flusher of the current window."""
        return f"{self.prefix}:cflush"

    def scan_match(self, kind: str) -> str:
        """SCAN pattern of every key of one ``kind`` (the name part after the prefix:
        ``bal``, ``ccred``, ...), for the operator commands that walk them."""
        return f"{self.prefix}:{kind}:*"

    # -- limits and tokens (server/limits.py, server/tokens.py) -----------------------------

    def rate(self, limit: str, subject: str) -> str:
        """GCRA state of one rate limit for one subject (an address, a user id)."""
        return f"{self.prefix}:rate:{limit}:{subject}"

    def user_sockets(self, user_id: int) -> str:
        """Sorted set of the user's open sockets on every instance (lua/hold-1.lua)."""
        return f"{self.prefix}:socks:{self.tag(user_id)}:{user_id}"

    def token(self, token_hash_hex: str) -> str:
        """Cached sign-in answer for one token hash (server/tokens.py)."""
        return f"{self.prefix}:tok:{token_hash_hex}"

    def epoch(self) -> str:
        """Redis incarnation marker: set once; if missing, Redis lost data (see docs)."""
        return f"{self.prefix}:epoch"


#: Lifetime of a :meth:`Keys.credit_marker`, seconds. A flush whose credit is still not
#: recorded as done this close to it is no longer credited by the workers (the marker may be
#: gone): it needs the heal or a person (workers/commissions.py).
CREDIT_MARKER_TTL_S = 7 * 24 * 3600
#: How far back a commission flush checks whether Redis lost credits it recorded as made
#: (workers/commissions.py); a heal sets the markers of credits this recent.
COMMISSION_RECHECK_S = 3600.0


def commission_entry_id(flush_id: str, user_id: int, currency: str) -> str:
    """The ledger entry (PostgreSQL) of what flush ``flush_id`` paid ``user_id`` in
    ``currency``; its Redis credit is marked by :meth:`Keys.credit_marker`."""
    return f"com:{flush_id}:{user_id}:{currency}"


def parse_commission_entry(entry_id: str) -> tuple[str, int, str] | None:
    """``(flush_id, user_id, currency)`` of a :func:`commission_entry_id`, else None."""
    kind, _, rest = entry_id.partition(":")
    flush_id, _, rest = rest.partition(":")
    user, _, currency = rest.partition(":")
    if kind != "com" or not flush_id or not user.isdigit() or not currency:
        return None
    return flush_id, int(user), currency


def bet_idem_key(prefix: str, client_id: int | str) -> str:
    """:meth:`Keys.bet_idem` from its user's :meth:`Keys.bet_idem_prefix`."""
    return f"{prefix}{'i' if isinstance(client_id, int) else 's'}:{client_id}"
