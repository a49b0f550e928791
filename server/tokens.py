"""Player tokens: sign-in without a PostgreSQL query per attempt, expiry and revocation.

A sign-in reads the token's hash from a Redis cache (:meth:`Keys.token`) and asks
PostgreSQL only on a miss; the answer is cached for :data:`CACHE_S` at most, and never past
the token's expiry. A token that PostgreSQL does not accept (unknown, expired, revoked) is
cached as refused too, so repeating a bad token costs no query either.

Revocation must beat the cache. :meth:`Tokens.revoke` (and :meth:`Tokens.reissue`, which
revokes the old token) writes PostgreSQL first, then overwrites the cache entry with a
refusal, and the cache is only ever filled with ``SET NX``: a sign-in that read PostgreSQL
before the revocation and fills the cache after it finds the refusal in place and changes
nothing, and one that filled it before is overwritten. Then it publishes ``revoke`` on the
user's push channel, and every instance closes that user's sockets (server/pushes.py). If
Redis fails after PostgreSQL was written, the admin call answers 503 and repeating it
(idempotent) finishes the job.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import asyncpg

from games.errors import NotFound, Unauthorized
from plumbing.keys import Keys
from plumbing.redisclient import Client
from server.auth import new_token, token_hash
from server.users import User

#: Seconds a sign-in answer stays in the Redis cache.
CACHE_S = 300
_REFUSED = b"-"
#: What the user channel carries to close a user's sockets (see server/pushes.py).
REVOKE_MESSAGE = "revoke|-|-|0"


@dataclass(frozen=True, slots=True)
class SignedIn:
    user: User
    #: When the token expires (seconds since the epoch), or None.
    expires_at: float | None


class Tokens:
    def __init__(
        self, redis: Client, pool: asyncpg.Pool, keys: Keys, ttl_s: int
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._ttl_s = ttl_s

    async def sign_in(self, token: str) -> SignedIn:
        """The token's user, or Unauthorized (unknown, expired or revoked)."""
        digest = token_hash(token)
        key = self._keys.token(digest.hex())
        cached = await self._redis.get(key)
        now = time.time()
        if cached == _REFUSED:
            raise Unauthorized("unknown, expired or revoked token")
        if cached is not None:
            fields, expires_at = json.loads(cached)
            if expires_at is not None and expires_at <= now:
                raise Unauthorized("this token has expired")
            return SignedIn(User(*fields), expires_at)
        row = await self._pool.fetchrow(
            "SELECT user_id, role, name, parent_id, commission_bps,"
            " extract(epoch FROM token_issued_at)::float8 AS issued,"
            " token_revoked_at IS NOT NULL AS revoked FROM users WHERE token_hash = $1",
            digest,
        )
        expires_at = (
            None if row is None or not self._ttl_s else float(row["issued"]) + self._ttl_s
        )
        if row is None or row["revoked"] or (expires_at is not None and expires_at <= now):
            await self._redis.set(key, _REFUSED, px=CACHE_S * 1000, nx=True)
            raise Unauthorized("unknown, expired or revoked token")
        user = User(*tuple(row)[:5])
        cache_ms = CACHE_S * 1000
        if expires_at is not None:
            cache_ms = max(1, min(cache_ms, math.floor((expires_at - now) * 1000)))
        await self._redis.set(key, json.dumps([list(tuple(row)[:5]), expires_at]),
                              px=cache_ms, nx=True)
        return SignedIn(user, expires_at)

    async def revoke(self, user_id: int) -> None:
        """Revoke the user's token (NotFound if there is no such user); idempotent."""
        old = await self._pool.fetchval(
            "UPDATE users SET token_revoked_at = COALESCE(token_revoked_at, now())"
            " WHERE user_id = $1 RETURNING token_hash",
            user_id,
        )
        if old is None:
            raise NotFound(f"no user {user_id}")
        await self._forget(user_id, bytes(old))

    async def reissue(self, user_id: int) -> str:
        """A new token for the user (shown once); the old one stops working."""
        token = new_token()
        async with self._pool.acquire() as conn, conn.transaction():
            old = await conn.fetchval(
                "SELECT token_hash FROM users WHERE user_id = $1 FOR UPDATE", user_id
            )
            if old is None:
                raise NotFound(f"no user {user_id}")
            await conn.execute(
                "UPDATE users SET token_hash = $2, token_issued_at = now(),"
                " token_revoked_at = NULL WHERE user_id = $1",
                user_id, token_hash(token),
            )
        await self._forget(user_id, bytes(old))
        return token

    async def _forget(self, user_id: int, old_hash: bytes) -> None:
        # Two calls, in this order: the token's cache key and the user's channel live on
        # different slots of a cluster, and the refusal must be in place before the sockets
        # are closed (one that reconnects at once is refused).
        await self._redis.set(self._keys.token(old_hash.hex()), _REFUSED, px=CACHE_S * 1000)
        await self._redis.spublish(self._keys.user_channel(user_id), REVOKE_MESSAGE)
