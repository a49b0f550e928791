"""The Python side of the money scripts: bets, seed rotation, deposits, balances.

Every balance change happens inside one Lua call (lua/*.lua); this module prepares its
arguments with the pure rules of :mod:`games` and turns its reply codes into results or
domain errors.

How the roll meets the nonce (docs/decisions.md): the process keeps each connected user's
active seed pair and its nonce. A bet computes the roll for ``nonce + 1`` here and hands the
outcome to bet-n.lua together with the pair id and the nonce it assumed; the script settles
only if both still hold, else answers STALE and the bet is recomputed for the nonce that is
current. So one round trip settles a bet, a roll is never applied to another nonce than its
own, and two server instances serving one user stay correct (they just retry).

Batching (:meth:`Wallet.submit`): the bets that arrive during one loop tick wait in their
user's queue; at the end of the tick every user that has no pipeline in flight sends all its
queued bets (up to MAX_USER_BATCH) at consecutive predicted nonces ``n+1, n+2, ...``, and all
users' calls leave together in one Redis pipeline; each call's reply is handled by a
callback as soon as it arrives (:meth:`FastConnection.send_now`): no task, lock or future
per bet. Redis runs a call's bets in order, so when every prediction holds they all settle;
when one does not advance the nonce (insufficient funds, a replayed id), the later ones of
that user come back STALE, without having changed anything, and are recomputed in the next
pipeline. Only a STALE that no earlier bet of the batch explains counts as an
attempt against MAX_ATTEMPTS.

Healing (:mod:`plumbing.heal`, docs/durability.md): after Redis restarted, every money
script of a user answers HEAL until the user's state has been made equal to the ledger
again. The user's next bet, deposit, rotation or sign-in heals it first (one heal per user
and process at a time; a heal another process made meanwhile is found and kept), then goes
on; users Redis has healed already never wait for anyone else's heal.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgpack
import structlog
from redis.exceptions import NoScriptError

from games import dice, seeds
from games.bets import BetSpec, fingerprint, settle
from games.codes import BetCode, DepositCode, RotateCode
from games.errors import IdempotencyConflict, InsufficientFunds, StakeProError, Unavailable
from games.money import Currency
from games.types import Hundredths, Minor, MultiplierBp
from plumbing import events, heal, scripts
from plumbing.keys import Keys
from server.redisbatch import Arg, Batcher
from server.redisconn import RUN_ID
from server.resp import Command

log = structlog.get_logger(__name__)

_encode_bet = events.encode_bet
_client_ref = events.client_ref

#: Seconds after which an unrevealed pair that is not active in Redis can never become
#: active (see Wallet._reveal_orphans).
ORPHAN_AFTER_S = 60.0
#: A bet recomputed this many times in a row (other instances betting for the same user,
#: or rotating under it) gives up with UNAVAILABLE; nothing was changed.
MAX_ATTEMPTS = 8
#: Most bets of one user sent in one pipeline (at consecutive predicted nonces).
MAX_USER_BATCH = 64


@dataclass(slots=True)
class Pair:
    """The active seed pair as this process last saw it. ``server_seed`` never leaves it."""

    pid: str
    server_seed: str
    server_seed_hash: str
    client_seed: str
    nonce: int


_NO_ROLL, _NO_PAYOUT = Hundredths(0), Minor(0)


@dataclass(slots=True, eq=False)
class PendingBet:
    """One validated bet on its way through :meth:`Wallet.submit`."""

    client_id: int | str
    spec: BetSpec
    #: Id of the socket that placed it (its own balance push skips that socket).
    origin: str
    #: How many other sockets of the user this process holds (they get the push).
    local_others: int
    on_done: Callable[[PendingBet, BetResult | StakeProError], None]
    #: The caller's own context (the session keeps the encoding and receive time here).
    tag: Any = None
    #: fingerprint(spec), when the caller has it already.
    fp: str = ""
    attempts: int = 0
    rotated: Rotation | None = None
    # The prediction it was last sent with.
    nonce: int = 0
    roll: Hundredths = _NO_ROLL
    win: bool = False
    payout: Minor = _NO_PAYOUT
    bet_id: str = ""


def _replayed(balance: Minor, blob: bytes) -> BetResult:
    """The result a replay answers with, from the blob of the bet's idempotency record: its
    outbox event (:func:`plumbing.events.encode_bet`), or a result list of 8 fields (the
    earlier record format: docs/decisions.md, "Formats still read")."""
    fields = msgpack.unpackb(blob)
    if len(fields) == 8:
        b_id, r, w, m, p, n, sh, cs = fields
        return BetResult(b_id, r, w, m, p, balance, n, sh, cs, True)
    e = events.unpack_bet(blob)
    r = e["roll"]
    return BetResult(e["bet_id"], r, dice.is_win(r, e["target"], e["direction"]),
                     e["multiplier"], e["payout"], balance, e["nonce"], e["server_seed_hash"],
                     e["client_seed"], True)


@dataclass(slots=True, weakref_slot=True, eq=False)
class UserState:
    """Shared by every socket of one user in this process.

    Bets wait in ``queue``; at most one pipeline of them is in flight per user
    (``inflight``), and ``lock`` is held by the slow operations (reading the pair again,
    rotating it), during which no bet of the user is sent.
    """

    user_id: int
    #: balances, seed pair, outbox, push channel and heal marker keys (plumbing/keys.py).
    keys: tuple[str, str, str, str, str] = ("", "", "", "", "")
    #: Keys.bet_idem_prefix of the user.
    idem_prefix: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pair: Pair | None = None
    queue: deque[PendingBet] = field(default_factory=deque)
    ready: bool = False
    inflight: bool = False
    #: Set while no pipeline of this user is in flight.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: Redis restarted since the pair was installed (EPOCH): rotate before the next bet.
    needs_rotation: bool = False
    #: Redis restarted since the user was last healed (HEAL): heal before the next bet.
    needs_heal: bool = False
    #: The active pair's prepared HMAC key, and the pair id it was prepared for.
    key: dice.SeedKey | None = None
    key_pid: str = ""

    def seed_key(self, pair: Pair) -> dice.SeedKey:
        if self.key is None or self.key_pid != pair.pid:
            self.key, self.key_pid = dice.SeedKey(pair.server_seed), pair.pid
        return self.key


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is twice as slow
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
        outbox_max_len: int = 0,
    ) -> None:
        self._batcher = batcher
        #: The outbox length past which bets and deposits are refused (0: no limit).
        self._outbox_cap = str(outbox_max_len)
        self._pool = pool
        self._keys = keys
        self._currencies = currencies
        self._window_ms = str(idempotency_window_s * 1000)
        self._window_s = idempotency_window_s
        self._users: weakref.WeakValueDictionary[int, UserState] = weakref.WeakValueDictionary()
        #: Users with bets for the next pipeline, and whether its tick is scheduled.
        self._ready: list[UserState] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Users whose bets wait for the scripts to be loaded again (one load for all).
        self._after_reload: list[UserState] | None = None
        #: Bets submitted and not answered yet, and loop.time() of the last answer (or of
        #: the submit that found none waiting): see unanswered_for.
        self._unanswered = 0
        self._progress = 0.0
        #: Heals in progress in this process, by user: a second caller waits for the first.
        self._heals: dict[int, asyncio.Future[None]] = {}

    def user(self, user_id: int) -> UserState:
        """The shared state of a user; kept alive by the sockets holding it."""
        state = self._users.get(user_id)
        if state is None:
            k = self._keys
            state = UserState(user_id, (
                k.balances(user_id), k.seed(user_id), k.outbox_for(user_id),
                k.user_channel(user_id), k.healed(user_id),
            ), k.bet_idem_prefix(user_id))
            state.idle.set()
            self._users[user_id] = state
        return state

    # -- healing ----------------------------------------------------------------------

    async def heal(self, user_id: int) -> None:
        """Heal the user (a script answered HEAL): once per process at a time, the others
        wait for that one. Raises what the heal raised (PostgreSQL or Redis down)."""
        running = self._heals.get(user_id)
        if running is not None:
            await asyncio.shield(running)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._heals[user_id] = future
        try:
            await heal.heal(self._batcher.client, self._pool, self._keys, user_id,
                            self._window_s * 1000)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a caller that waits re-raises it
            raise
        finally:
            del self._heals[user_id]

    async def mark_new(self, user_id: int) -> None:
        """A user just created: Redis holds all of its (empty) state, so it is healed."""
        await heal.mark_new(self._batcher.client, self._keys, user_id)

    async def ensure_healed(self, user_id: int) -> None:
        """Heal the user now if Redis restarted since its last heal (before its balances
        are shown: a sign-in, the admin view)."""
        if not await heal.is_healed(self._batcher.client, self._keys, user_id):
            await self.heal(user_id)

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
            if reply[0] == RotateCode.HEAL:
                await self.heal(state.user_id)
        raise Unavailable("could not install a seed pair")

    async def rotate(self, state: UserState, client_seed: str) -> Rotation:
        """Reveal the active pair and start a new one with ``client_seed`` at nonce 0."""
        try:
            async with state.lock:
                await state.idle.wait()
                return await self._rotate_locked(state, client_seed)
        finally:
            self._wake(state)

    async def _rotate_locked(self, state: UserState, client_seed: str | None) -> Rotation:
        """Rotate (the caller holds the user's lock); ``None`` keeps the client seed."""
        for _ in range(MAX_ATTEMPTS):
            old = await self.pair(state)
            new = await self._new_pair(
                state.user_id, old.client_seed if client_seed is None else client_seed
            )
            reply = await self._rotate_script(state.user_id, old.pid, new)
            if reply[0] == RotateCode.HEAL:
                await self.heal(state.user_id)
                continue
            if reply[0] == RotateCode.STALE:
                state.pair = None
                continue
            _, pid, ss, sh, cs, n = (_text(x) for x in reply)
            state.pair = new
            async with self._pool.acquire() as conn:
                # Redis may have rolled back the pair's nonce while PostgreSQL holds bets
                # past it: the final nonce revealed is the highest either store knows.
                final = await conn.fetchval(
                    "UPDATE seed_pairs SET revealed_at = now(), final_nonce = GREATEST($2,"
                    " (SELECT COALESCE(max(nonce), 0) FROM bets WHERE pair_id = $1))"
                    " WHERE pair_id = $1 AND revealed_at IS NULL RETURNING final_nonce",
                    int(pid),
                    int(n),
                )
                if final is None:  # revealed before (a rotation Redis forgot): as it was
                    final = await conn.fetchval(
                        "SELECT final_nonce FROM seed_pairs WHERE pair_id = $1", int(pid))
            revealed = Pair(pid, ss, sh, cs, max(int(n), int(final or 0)))
            return Rotation(revealed, new)
        raise Unavailable("the seed pair kept changing; try again")

    async def _reveal_orphans(self, user_id: int, active: int) -> None:
        """After a Redis rollback (EPOCH): the user's pairs PostgreSQL holds unrevealed, other
        than the one just installed, were installed in the history Redis lost (a rotation
        it forgot) or never installed at all. No bet can reach them again (a bet goes only
        to the pair active in Redis), so they are revealed, with the highest nonce
        PostgreSQL holds for them, and the bets made on them can be verified. A pair is
        installed within one Redis round trip of its insert, so one older than
        :data:`ORPHAN_AFTER_S` that is not active now never will be: younger ones wait
        for the next rotation."""
        async with self._pool.acquire() as conn:
            revealed = await conn.fetch(
                "UPDATE seed_pairs AS p SET revealed_at = now(), final_nonce ="
                " (SELECT COALESCE(max(nonce), 0) FROM bets WHERE pair_id = p.pair_id)"
                " WHERE user_id = $1 AND revealed_at IS NULL AND pair_id <> $2"
                " AND created_at < now() - make_interval(secs => $3) RETURNING pair_id",
                user_id, active, float(ORPHAN_AFTER_S),
            )
        if revealed:
            log.warning("orphan_pairs_revealed", user_id=user_id,
                        pairs=[int(r["pair_id"]) for r in revealed])

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
        keys = (self._keys.seed(user_id), self._keys.outbox_for(user_id),
                self._keys.healed(user_id))
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

    def submit(self, state: UserState, bet: PendingBet) -> None:
        """Queue ``bet``; ``bet.on_done(bet, result or error)`` is called once it is settled,
        replayed or refused (IdempotencyConflict, InsufficientFunds or Unavailable; none of
        them changed anything). Never raises, never blocks."""
        if not self._unanswered:
            self._progress = asyncio.get_running_loop().time()
        self._unanswered += 1
        state.queue.append(bet)
        self._wake(state)

    def unanswered_for(self) -> float:
        """Seconds since any bet was answered while some wait (0 when none wait): bets
        that stop being answered, for whatever reason, show here (/healthz)."""
        if not self._unanswered:
            return 0.0
        return max(0.0, asyncio.get_running_loop().time() - self._progress)

    def _deliver(self, bet: PendingBet, outcome: BetResult | StakeProError) -> None:
        self._unanswered -= 1
        self._progress = asyncio.get_running_loop().time()
        try:
            bet.on_done(bet, outcome)
        except Exception:  # one caller's bug must not stop the other bets of the batch
            log.exception("bet_callback_failed")

    async def bet(
        self, state: UserState, client_id: int | str, spec: BetSpec, origin: str,
        local_others: int = 0,
    ) -> BetResult:
        """:meth:`submit` as a coroutine: the result, or raises the error."""
        future: asyncio.Future[BetResult] = asyncio.get_running_loop().create_future()

        def done(_: PendingBet, outcome: BetResult | StakeProError) -> None:
            if future.done():
                return
            if isinstance(outcome, StakeProError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.submit(state, PendingBet(client_id, spec, origin, local_others, done))
        return await future

    def _wake(self, state: UserState) -> None:
        """Put ``state`` on the next tick's batch if it has bets and nothing in the way."""
        if state.ready or state.inflight or state.lock.locked() or not state.queue:
            return
        state.ready = True
        self._ready.append(state)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """One loop tick's bets, every user's queued bets at consecutive predicted nonces,
        in one pipeline."""
        self._scheduled = False
        ready, self._ready = self._ready, []
        fast = self._batcher.fast
        run_id = fast.ready_run_id()
        if run_id is None:
            for state in ready:
                state.ready = False
            self._spawn(self._reconnect(ready))
            return
        commands: list[Command] = []
        groups: list[tuple[UserState, Pair, list[PendingBet]]] = []
        sha = scripts.BET.sha
        window, ts = self._window_ms, int(time.time() * 1000)
        for state in ready:
            state.ready = False
            if state.inflight or state.lock.locked() or not state.queue:
                continue
            pair = state.pair
            if pair is None or state.needs_rotation or state.needs_heal:
                self._spawn(self._prepare(state))
                continue
            queue = state.queue
            bets = [queue.popleft() for _ in range(min(len(queue), MAX_USER_BATCH))]
            uid = state.user_id
            balances, seed, outbox, channel, healed = state.keys
            key = state.seed_key(pair)
            pid, pid_int, cs, sh = pair.pid, int(pair.pid), pair.client_seed, pair.server_seed_hash
            nonce = pair.nonce
            idem_keys: list[Arg] = []
            args: list[Arg] = [pid, run_id, window, str(max(b.local_others for b in bets))]
            try:
                for bet in bets:
                    spec = bet.spec
                    expected, nonce = nonce, nonce + 1
                    roll = key.roll(cs, nonce)
                    outcome = settle(spec, roll)
                    bet_id = f"{pid}-{nonce}"
                    bet.nonce, bet.roll, bet.win, bet.payout, bet.bet_id = (
                        nonce, roll, outcome.win, outcome.payout, bet_id
                    )
                    if not bet.fp:
                        bet.fp = fingerprint(spec)
                    # The idempotency record keeps the outbox event too, for replays.
                    ref = _client_ref(bet.client_id)
                    event = _encode_bet(
                        bet_id, uid, pid_int, spec.currency.code, spec.amount, outcome.payout,
                        roll, spec.target, spec.direction, nonce, spec.multiplier, sh, cs, ts, ref
                    )
                    idem_keys.append(state.idem_prefix + ref)
                    args += (
                        spec.currency.code, str(spec.amount), str(outcome.payout - spec.amount),
                        str(expected), bet.fp, event, bet.origin,
                    )
            except ValueError as exc:  # an id msgpack cannot encode (a lone surrogate):
                # this user's call alone fails, as an unsendable command does
                log.error("bet_not_encodable", user_id=uid, error=repr(exc))
                for bet in bets:
                    self._deliver(bet, Unavailable("bet not settled: it could not be encoded"))
                self._wake(state)
                continue
            commands.append(
                ("EVALSHA", sha, 5 + len(bets), balances, seed, outbox, channel, healed,
                 *idem_keys, *args, self._outbox_cap)
            )
            state.inflight = True
            state.idle.clear()
            groups.append((state, pair, bets))
        if commands:
            try:
                fast.send_now(commands, lambda i, reply: self._settled(*groups[i], reply))
            except Exception as exc:  # nothing was queued: every group gets the error
                log.error("bet_pipeline_not_sent", error=repr(exc))
                for group in groups:
                    self._settled(*group, exc)

    def _settled(
        self, state: UserState, pair: Pair, bets: list[PendingBet], group: Any
    ) -> None:
        """Hand every bet of one user's call its outcome; requeue the ones to recompute.
        ``group`` is the call's reply (one reply per bet) or the error that failed it."""
        state.inflight = False
        state.idle.set()
        retry: list[PendingBet] = []
        # False once a bet of this group did not advance the nonce: the later ones were
        # predicted on top of it and come back STALE without any contention.
        chained = True
        reload_scripts = False
        for i, bet in enumerate(bets):
            reply: Any = group if isinstance(group, Exception) else group[i]
            outcome: BetResult | StakeProError | None
            if isinstance(reply, Exception):
                chained = False
                if isinstance(reply, NoScriptError):
                    reload_scripts = True
                    retry.append(bet)
                    continue
                outcome = Unavailable(f"bet not settled: {type(reply).__name__}")
            else:
                code = reply[0]
                if code == BetCode.SETTLED:
                    if state.pair is pair and pair.nonce < bet.nonce:
                        pair.nonce = bet.nonce
                    outcome = BetResult(
                        bet.bet_id, bet.roll, bet.win, bet.spec.multiplier, bet.payout,
                        Minor(int(reply[1])), bet.nonce, pair.server_seed_hash,
                        pair.client_seed, rotated=bet.rotated,
                    )
                else:
                    outcome = self._refused(state, pair, code, reply)
                    if outcome is None:
                        if chained:
                            bet.attempts += 1
                        chained = False
                        if bet.attempts < MAX_ATTEMPTS:
                            retry.append(bet)
                            continue
                        outcome = Unavailable(
                            "the seed pair kept changing under this bet; resend it"
                        )
                    chained = False
            self._deliver(bet, outcome)
        if retry:
            state.queue.extendleft(reversed(retry))
        if reload_scripts:
            self._reload_scripts_for(state)
        else:
            self._wake(state)

    @staticmethod
    def _refused(
        state: UserState, pair: Pair, code: int, reply: list[Any]
    ) -> BetResult | StakeProError | None:
        """The outcome of a reply other than SETTLED; None: recompute and send again."""
        if code == BetCode.REPLAY:
            try:
                return _replayed(Minor(int(reply[1])), reply[2])
            except (ValueError, TypeError) as exc:  # msgpack's unpack errors are ValueErrors
                # A record this version cannot read (a later version's format, say): this
                # bet gets an error, and the rest of the call its own outcomes.
                log.error("bet_record_unreadable", user_id=state.user_id, error=repr(exc))
                return Unavailable("the stored result of this bet id could not be read")
        if code == BetCode.CONFLICT:
            return IdempotencyConflict("this bet id was already used with other fields")
        if code == BetCode.INSUFFICIENT_FUNDS:
            return InsufficientFunds(f"balance {_text(reply[1])} minor units is below the stake")
        if code == BetCode.OUTBOX_FULL:
            return Unavailable("bet not settled: events wait to be stored; retry later")
        if code == BetCode.REFUSED:
            log.error("bet_refused_by_redis", user_id=state.user_id, error=_text(reply[1]))
            return Unavailable("bet not settled: the balance change was refused")
        if code == BetCode.HEAL:
            state.needs_heal = True
            return None
        if state.pair is pair:
            state.pair = None  # STALE or NO_SEED: read the pair again
        if code == BetCode.EPOCH:
            state.needs_rotation = True
        return None

    async def _prepare(self, state: UserState) -> None:
        """Heal the user after a Redis restart (HEAL), read its pair again, or rotate it
        after a Redis restart (EPOCH), then let its queued bets go."""
        try:
            async with state.lock:
                if state.needs_heal:
                    await self.heal(state.user_id)
                    state.needs_heal = False
                    state.pair = None  # read it again: the rollback may have changed it
                if state.needs_rotation:
                    state.pair = None
                    rotation = await self._rotate_locked(state, None)
                    state.needs_rotation = False
                    await self._reveal_orphans(state.user_id, int(rotation.current.pid))
                    if state.queue:  # that bet's socket learns of the rotation first
                        state.queue[0].rotated = rotation
                else:
                    await self.pair(state)
        except Exception as exc:
            self._fail_queue(state, exc)
        self._wake(state)

    async def _reconnect(self, states: list[UserState]) -> None:
        try:
            await self._batcher.fast.connect()
        except Exception as exc:
            for state in states:
                self._fail_queue(state, exc)
        for state in states:
            self._wake(state)

    def _reload_scripts_for(self, state: UserState) -> None:
        """NOSCRIPT (a Redis restarted without its scripts): every user that met it in the
        meantime waits for one SCRIPT LOAD, then its bets go again."""
        if self._after_reload is not None:
            self._after_reload.append(state)
            return
        self._after_reload = [state]
        self._spawn(self._reload_scripts())

    async def _reload_scripts(self) -> None:
        failed: Exception | None = None
        try:
            await self._batcher.load_scripts()
        except Exception as exc:
            failed = exc
        states, self._after_reload = self._after_reload or [], None
        for state in states:
            if failed is not None:
                self._fail_queue(state, failed)
            self._wake(state)

    def _fail_queue(self, state: UserState, exc: Exception) -> None:
        log.warning("bets_not_settled", user_id=state.user_id, error=repr(exc))
        while state.queue:
            bet = state.queue.popleft()
            self._deliver(bet, Unavailable(f"bet not settled: {type(exc).__name__}"))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        event = events.encode_deposit(
            idempotency_key, user_id, currency.code, amount, int(time.time() * 1000)
        )
        keys = (
            self._keys.balances(user_id),
            self._keys.deposit_idem(user_id, idempotency_key),
            self._keys.outbox_for(user_id),
            self._keys.user_channel(user_id),
            self._keys.healed(user_id),
        )
        for _ in range(MAX_ATTEMPTS):
            reply = await self._batcher.run(
                scripts.DEPOSIT, keys,
                (currency.code, str(amount), fp, event, RUN_ID, self._outbox_cap),
            )
            if reply[0] != DepositCode.HEAL:
                break
            # The heal credits this deposit itself when neither store holds its credit
            # (its row is in PostgreSQL): the retry then answers REPLAY.
            await self.heal(user_id)
        else:
            raise Unavailable("Redis kept restarting; retry the deposit with the same key")
        if reply[0] == DepositCode.OUTBOX_FULL:
            raise Unavailable("deposit not credited: events wait to be stored; retry later")
        if reply[0] == DepositCode.CONFLICT:
            raise IdempotencyConflict("this idempotency key was already used with other fields")
        return Minor(int(reply[1]))

    async def outbox_lengths(self) -> list[int]:
        """Entries in each bucket's outbox (XLEN is O(1)), in bucket order."""
        async with self._batcher.client.pipeline(transaction=False) as pipe:
            for key in self._keys.all_outboxes():
                pipe.xlen(key)
            return [int(n) for n in await pipe.execute()]

    async def balances(self, user_id: int) -> dict[str, Minor]:
        """Every configured currency's balance, zero where empty (healed first, if Redis
        restarted since the user's last heal)."""
        await self.ensure_healed(user_id)
        raw = await self._batcher.client.hgetall(self._keys.balances(user_id))
        have = {_text(k): Minor(int(v)) for k, v in raw.items()}
        return {code: have.get(code, Minor(0)) for code in self._currencies}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pair_from_hash(raw: dict[Any, Any]) -> Pair:
    h = {_text(k): _text(v) for k, v in raw.items()}
    return Pair(h["pid"], h["ss"], h["sh"], h["cs"], int(h["n"]))
