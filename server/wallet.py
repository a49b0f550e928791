"""The Python side of the money scripts: bets, seed rotation, deposits, balances.

Every balance change happens inside one Lua call (lua/*.lua); this module prepares its
arguments with the pure rules of :mod:`games` and turns its reply codes into results or
domain errors.

How the roll meets the nonce (docs/decisions.md): the process keeps each connected user's
active seed pair and its nonce. A bet computes the roll for ``nonce + 1`` here and hands the
outcome to bet-5.lua together with the pair id and the nonce it assumed; the script settles
only if both still hold, else answers STALE and the bet is recomputed for the nonce that is
current. So one round trip settles a bet, a roll is never applied to another nonce than its
own, and two server instances serving one user stay correct (they just retry). Bets of one
user are serialised in this process by a per-user lock; bets of different users share one
Redis pipeline per loop tick (:mod:`server.redisbatch`).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgpack

from games import dice, seeds
from games.bets import BetSpec, fingerprint, settle
from games.errors import IdempotencyConflict, InsufficientFunds, Unavailable
from games.money import Currency
from games.types import Hundredths, Minor, MultiplierBp
from server import scripts
from server.keys import Keys
from server.redisbatch import Batcher
from server.redisconn import RUN_ID
from server.scripts import BetCode, DepositCode, RotateCode

#: A bet recomputed this many times in a row (other instances betting for the same user,
#: or rotating under it) gives up with UNAVAILABLE; nothing was changed.
MAX_ATTEMPTS = 8


@dataclass(slots=True)
class Pair:
    """The active seed pair as this process last saw it. ``server_seed`` never leaves it."""

    pid: str
    server_seed: str
    server_seed_hash: str
    client_seed: str
    nonce: int


@dataclass(slots=True, weakref_slot=True)
class UserState:
    """Shared by every socket of one user in this process."""

    user_id: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pair: Pair | None = None
    #: The active pair's prepared HMAC key, and the pair id it was prepared for.
    key: dice.SeedKey | None = None
    key_pid: str = ""

    def seed_key(self, pair: Pair) -> dice.SeedKey:
        if self.key is None or self.key_pid != pair.pid:
            self.key, self.key_pid = dice.SeedKey(pair.server_seed), pair.pid
        return self.key


@dataclass(frozen=True, slots=True)
class BetResult:
    bet_id: str
    roll: Hundredths
    win: bool
    multiplier: MultiplierBp
    payout: Minor
    balance: Minor
    nonce: int
    server_seed_hash: str
    client_seed: str
    replay: bool = False
    #: Set when the pair had to be rotated first (Redis restarted since it was installed).
    rotated: Rotation | None = None


@dataclass(frozen=True, slots=True)
class Rotation:
    revealed: Pair
    current: Pair


class Wallet:
    def __init__(
        self,
        batcher: Batcher,
        pool: asyncpg.Pool,
        keys: Keys,
        currencies: dict[str, Currency],
        idempotency_window_s: int,
    ) -> None:
        self._batcher = batcher
        self._pool = pool
        self._keys = keys
        self._currencies = currencies
        self._window_ms = str(idempotency_window_s * 1000)
        self._users: weakref.WeakValueDictionary[int, UserState] = weakref.WeakValueDictionary()

    def user(self, user_id: int) -> UserState:
        """The shared state of a user; kept alive by the sockets holding it."""
        state = self._users.get(user_id)
        if state is None:
            state = UserState(user_id)
            self._users[user_id] = state
        return state

    # -- seed pairs -------------------------------------------------------------------

    async def pair(self, state: UserState) -> Pair:
        """The active pair, read from Redis, or a first one installed when there is none."""
        if state.pair is not None:
            return state.pair
        for _ in range(MAX_ATTEMPTS):
            raw = await self._batcher.client.hgetall(self._keys.seed(state.user_id))
            if raw:
                state.pair = _pair_from_hash(raw)
                return state.pair
            new = await self._new_pair(state.user_id, seeds.new_client_seed())
            reply = await self._rotate_script(state.user_id, "", new)
            if reply[0] == RotateCode.ROTATED:
                state.pair = new
                return new
        raise Unavailable("could not install a seed pair")

    async def rotate(self, state: UserState, client_seed: str) -> Rotation:
        """Reveal the active pair and start a new one with ``client_seed`` at nonce 0."""
        async with state.lock:
            return await self._rotate_locked(state, client_seed)

    async def _rotate_locked(self, state: UserState, client_seed: str | None) -> Rotation:
        """Rotate (the caller holds the user's lock); ``None`` keeps the client seed."""
        for _ in range(MAX_ATTEMPTS):
            old = await self.pair(state)
            new = await self._new_pair(
                state.user_id, old.client_seed if client_seed is None else client_seed
            )
            reply = await self._rotate_script(state.user_id, old.pid, new)
            if reply[0] == RotateCode.STALE:
                state.pair = None
                continue
            _, pid, ss, sh, cs, n = (_text(x) for x in reply)
            revealed = Pair(pid, ss, sh, cs, int(n))
            state.pair = new
            async with self._pool.acquire() as conn:
                await conn.execute(
                    "UPDATE seed_pairs SET revealed_at = now(), final_nonce = GREATEST($2,"
                    " (SELECT COALESCE(max(nonce), 0) FROM bets WHERE pair_id = $1))"
                    " WHERE pair_id = $1 AND revealed_at IS NULL",
                    int(pid),
                    revealed.nonce,
                )
            return Rotation(revealed, new)
        raise Unavailable("the seed pair kept changing; try again")

    async def _new_pair(self, user_id: int, client_seed: str) -> Pair:
        server_seed = seeds.new_server_seed()
        seed_hash = seeds.server_seed_hash(server_seed)
        async with self._pool.acquire() as conn:
            pid = await conn.fetchval(
                "INSERT INTO seed_pairs (user_id, server_seed, server_seed_hash, client_seed)"
                " VALUES ($1, $2, $3, $4) RETURNING pair_id",
                user_id,
                server_seed,
                seed_hash,
                client_seed,
            )
        return Pair(str(pid), server_seed, seed_hash, client_seed, 0)

    async def _rotate_script(self, user_id: int, expected: str, new: Pair) -> list[Any]:
        keys = (self._keys.seed(user_id), self._keys.outbox_for(user_id))
        args = (
            expected,
            new.pid,
            new.server_seed,
            new.server_seed_hash,
            new.client_seed,
            int(time.time() * 1000),
            RUN_ID,
        )
        return list(await self._batcher.run(scripts.ROTATE, keys, args))

    # -- bets -------------------------------------------------------------------------

    async def bet(
        self, state: UserState, client_id: int | str, spec: BetSpec, origin: str,
        local_others: int = 0,
    ) -> BetResult:
        """Settle one bet, or replay the one already settled under ``client_id``.

        ``local_others`` is how many other sockets of the user this process holds (they get
        the balance push; other instances are found by the script itself).

        Raises IdempotencyConflict, InsufficientFunds or Unavailable; none changed anything.
        """
        uid = state.user_id
        keys = (
            self._keys.balances(uid),
            self._keys.seed(uid),
            self._keys.bet_idem(uid, client_id),
            self._keys.outbox_for(uid),
            self._keys.user_channel(uid),
        )
        fp = fingerprint(spec)
        rotated: Rotation | None = None
        async with state.lock:
            for _ in range(MAX_ATTEMPTS):
                pair = await self.pair(state)
                nonce = pair.nonce + 1
                roll = state.seed_key(pair).roll(pair.client_seed, nonce)
                outcome = settle(spec, roll)
                bet_id = f"{pair.pid}-{nonce}"
                stored = msgpack.packb(
                    [bet_id, roll, outcome.win, spec.multiplier, outcome.payout, nonce,
                     pair.server_seed_hash, pair.client_seed]
                )
                event = msgpack.packb(
                    {
                        "bet_id": bet_id, "user_id": uid, "pair_id": int(pair.pid),
                        "currency": spec.currency.code, "amount": spec.amount,
                        "payout": outcome.payout, "roll": roll, "target": spec.target,
                        "direction": spec.direction, "nonce": nonce,
                        "multiplier": spec.multiplier, "server_seed_hash": pair.server_seed_hash,
                        "client_seed": pair.client_seed, "ts": int(time.time() * 1000),
                    }
                )
                args = (
                    spec.currency.code, str(spec.amount), str(outcome.payout - spec.amount),
                    pair.pid, str(pair.nonce), fp, self._window_ms, stored, event, origin,
                    RUN_ID, str(local_others),
                )
                reply = await self._batcher.run(scripts.BET, keys, args)
                code = reply[0]
                if code == BetCode.SETTLED:
                    pair.nonce = nonce
                    return BetResult(
                        bet_id, roll, outcome.win, spec.multiplier, outcome.payout,
                        Minor(int(reply[1])), nonce, pair.server_seed_hash, pair.client_seed,
                        rotated=rotated,
                    )
                if code == BetCode.REPLAY:
                    b_id, r, w, m, p, n, sh, cs = msgpack.unpackb(reply[2])
                    return BetResult(b_id, r, w, m, p, Minor(int(reply[1])), n, sh, cs, True)
                if code == BetCode.CONFLICT:
                    raise IdempotencyConflict(
                        "this bet id was already used with other fields"
                    )
                if code == BetCode.INSUFFICIENT_FUNDS:
                    raise InsufficientFunds(
                        f"balance {_text(reply[1])} minor units is below the stake"
                    )
                if code == BetCode.EPOCH:
                    state.pair = None
                    rotated = await self._rotate_locked(state, None)
                    continue
                state.pair = None  # STALE or NO_SEED: read the pair again and recompute
        raise Unavailable("the seed pair kept changing under this bet; resend it")

    # -- deposits and balances --------------------------------------------------------

    async def deposit(
        self, user_id: int, currency: Currency, amount: Minor, idempotency_key: str
    ) -> Minor:
        """Credit once per key; the same key with other fields is IdempotencyConflict."""
        async with self._pool.acquire() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO deposits (idempotency_key, user_id, currency, amount)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (idempotency_key) DO NOTHING"
                " RETURNING 1",
                idempotency_key, user_id, currency.code, amount,
            )
            if not inserted:
                row = await conn.fetchrow(
                    "SELECT user_id, currency, amount FROM deposits WHERE idempotency_key = $1",
                    idempotency_key,
                )
                if row is None or tuple(row) != (user_id, currency.code, amount):
                    raise IdempotencyConflict(
                        "this idempotency key was already used with other fields"
                    )
        fp = f"{user_id}|{currency.code}|{amount}"
        event = msgpack.packb(
            {"key": idempotency_key, "user_id": user_id, "currency": currency.code,
             "amount": amount, "ts": int(time.time() * 1000)}
        )
        keys = (
            self._keys.balances(user_id),
            self._keys.deposit_idem(user_id, idempotency_key),
            self._keys.outbox_for(user_id),
            self._keys.user_channel(user_id),
        )
        reply = await self._batcher.run(
            scripts.DEPOSIT, keys, (currency.code, str(amount), fp, event)
        )
        if reply[0] == DepositCode.CONFLICT:
            raise IdempotencyConflict("this idempotency key was already used with other fields")
        return Minor(int(reply[1]))

    async def balances(self, user_id: int) -> dict[str, Minor]:
        """Every configured currency's balance, zero where empty."""
        raw = await self._batcher.client.hgetall(self._keys.balances(user_id))
        have = {_text(k): Minor(int(v)) for k, v in raw.items()}
        return {code: have.get(code, Minor(0)) for code in self._currencies}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pair_from_hash(raw: dict[Any, Any]) -> Pair:
    h = {_text(k): _text(v) for k, v in raw.items()}
    return Pair(h["pid"], h["ss"], h["sh"], h["cs"], int(h["n"]))
