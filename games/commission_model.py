"""A pure reference of the commission path, from the outbox to the ancestors' balances.

:class:`CommissionModel` is plain Python, no I/O: it holds what the outbox streams, the
persister (``workers/outbox.py``), the flush (``workers/commissions.py``) and the credit
script (``lua/commission-credit-n.lua``) keep in Redis and in PostgreSQL, and one worker
process's memory between its steps. Each method is one step that the real code takes as one
atomic call (a script, a transaction), so a crash or a Redis rollback can fall between any
two of them. The property test ``tests/test_commission_model.py`` runs the real steps on a
real Redis and a real PostgreSQL beside this model and demands the same state after every
step; so whatever this model guarantees, the real path guarantees too.

The two stores
==============

* **Redis** (:class:`RedisSide`, what a rollback takes back to an earlier copy): the outbox
  entries still in the streams, which of them the persist group has delivered and not
  acknowledged, the ancestors' balances, the credit markers (flush, ancestor) and the set
  of flush ids Redis confirmed credited.
* **PostgreSQL** (:class:`PgSide`, never rolled back): the bets with the chain each
  recorded and the flush that paid it, the ledger's commission rows, ``commission_totals``,
  and each flush's credit plan with whether it is recorded as credited.
* **The worker's memory** (:class:`Memory`, lost by a crash): the batch read from the
  streams, and the plans a flush has paid and not yet credited or confirmed.

Invariants (:meth:`CommissionModel.violations` checks them)
===========================================================

1. **Paid once.** A bet's flush never changes once set; the ledger rows of a flush are
   exactly the per-(ancestor, currency) sums of ``floor(amount * bps / 10000)`` over the
   bets it marked, at each bet's recorded rates; ``commission_totals`` is their sum.
2. **Never credited beyond what is paid.** Each ancestor's Redis balance is at most what
   the ledger paid it, whatever was replayed, retried, crashed or rolled back.
3. **A credited plan has its marker**, and a marker's credit is in the balance: Redis
   credits a (flush, ancestor) at most once while its marker lives.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

from games.commission import commission
from games.types import Minor

__all__ = ["Bet", "CommissionModel", "Memory", "PgSide", "Plan", "RedisSide", "StoredBet"]

#: (ancestor, rate) nearest first, rates > 0 only.
Chain = tuple[tuple[int, int], ...]
#: (ancestor, currency) -> minor units.
Plan = dict[tuple[int, str], int]


@dataclass(frozen=True, slots=True)
class Bet:
    """A settled bet as its outbox entry carries it (what commissions need of it)."""

    bet_id: str
    player: int
    currency: str
    amount: int


@dataclass(slots=True)
class StoredBet:
    bet: Bet
    chain: Chain  # () : owes nothing (commission_to NULL)
    flush: str | None = None


@dataclass(slots=True)
class RedisSide:
    #: entry number -> bet, for the entries still in the streams (the number orders them)
    stream: dict[int, Bet] = field(default_factory=dict)
    #: entries the persist group delivered and nobody acknowledged
    pending: set[int] = field(default_factory=set)
    #: the group's last delivered entry number
    delivered: int = 0
    balances: Counter[tuple[int, str]] = field(default_factory=Counter)
    markers: set[tuple[str, int]] = field(default_factory=set)
    confirmed: set[str] = field(default_factory=set)


@dataclass(slots=True)
class PgSide:
    bets: dict[str, StoredBet] = field(default_factory=dict)
    ledger: dict[tuple[str, int, str], int] = field(default_factory=dict)
    totals: Counter[tuple[int, str]] = field(default_factory=Counter)
    #: flush id -> (plan, credited), in the order the flushes were paid
    flushes: dict[str, tuple[Plan, bool]] = field(default_factory=dict)
    #: flush id -> number of the statement that recorded it as credited
    recorded: dict[str, int] = field(default_factory=dict)
    statements: int = 0


@dataclass(slots=True)
class Memory:
    batch: list[tuple[int, Bet]] | None = None  # entries read, not yet acknowledged
    written: bool = False
    plans: list[tuple[str, Plan]] | None = None  # paid, to credit
    credited: bool = False


@dataclass
class CommissionModel:
    """The commission path of one deployment; ``rates`` are the users' current chains."""

    chains: dict[int, Chain]
    redis: RedisSide = field(default_factory=RedisSide)
    pg: PgSide = field(default_factory=PgSide)
    memory: Memory = field(default_factory=Memory)
    _next_entry: int = 0

    # -- the bet script ---------------------------------------------------------------------

    def settle(self, bet: Bet) -> int:
        """The bet script appends the bet to its outbox stream; returns its entry number."""
        self._next_entry += 1
        self.redis.stream[self._next_entry] = bet
        return self._next_entry

    # -- the persister: read, write (one transaction), ack (one script) ---------------------

    def read(self, pending: bool) -> list[Bet]:
        """XREADGROUP: the new entries (``>``), or the group's own pending ones (``0``)."""
        if pending:
            numbers = sorted(self.redis.pending)
        else:
            numbers = sorted(n for n in self.redis.stream if n > self.redis.delivered)
            if numbers:
                self.redis.delivered = numbers[-1]
            self.redis.pending.update(numbers)
        self.memory.batch = [(n, self.redis.stream[n]) for n in numbers]
        self.memory.written = False
        return [bet for _, bet in self.memory.batch]

    def write(self) -> None:
        """The batch's transaction (what was read, even if Redis has since forgotten it): a
        bet not stored yet is inserted with the chain that applies to its player now; a
        stored one is left as it is."""
        assert self.memory.batch is not None
        for _, bet in self.memory.batch:
            if bet.bet_id not in self.pg.bets:
                self.pg.bets[bet.bet_id] = StoredBet(bet, self.chains.get(bet.player, ()))
        self.memory.written = True

    def ack(self) -> int:
        """XACK + XDEL of the batch; returns how many were still pending."""
        assert self.memory.batch is not None
        acked = 0
        for n, _ in self.memory.batch:
            if n in self.redis.pending:
                acked += 1
                self.redis.pending.discard(n)
            self.redis.stream.pop(n, None)
        self.memory.batch = None
        return acked

    # -- the flush: pay (one statement), credit (one script per ancestor), confirm ----------

    def pay(self, flush_id: str, newest: int = 3
            ) -> tuple[int, Plan | None, list[str], list[tuple[str, int]]]:
        """Take the confirmed ids, then the statement. Returns (bets paid, this flush's
        plan, the other flushes still not recorded as credited, the ``newest`` flushes
        last recorded as credited before it with their first ancestor)."""
        last = sorted(self.pg.recorded, key=lambda f: (self.pg.recorded[f], f),
                      reverse=True)[:newest]
        checks = [(f, min(a for a, _ in self.pg.flushes[f][0])) for f in last]
        confirmed, self.redis.confirmed = self.redis.confirmed, set()
        self.pg.statements += 1
        for fid in confirmed:
            if fid in self.pg.flushes and not self.pg.flushes[fid][1]:
                self.pg.flushes[fid] = (self.pg.flushes[fid][0], True)
                self.pg.recorded[fid] = self.pg.statements
        plan: Plan = Counter()
        paid = 0
        for stored in self.pg.bets.values():
            if stored.flush is None and stored.chain:
                stored.flush = flush_id
                paid += 1
                for ancestor, bps in stored.chain:
                    plan[(ancestor, stored.bet.currency)] += commission(
                        Minor(stored.bet.amount), bps)
        plan = {k: v for k, v in plan.items() if v > 0}
        older = [fid for fid, (_, credited) in self.pg.flushes.items()
                 if not credited and fid not in confirmed]
        todo = [(fid, self.pg.flushes[fid][0]) for fid in older]
        if plan:
            self.pg.flushes[flush_id] = (plan, False)
            for (ancestor, currency), amount in plan.items():
                self.pg.ledger[(flush_id, ancestor, currency)] = amount
                self.pg.totals[(ancestor, currency)] += amount
            todo.insert(0, (flush_id, plan))
        self.memory.plans, self.memory.credited = todo, False
        return paid, plan or None, older, checks

    def lost_plans(self, checks: list[tuple[str, int]]) -> list[str]:
        """If Redis lost the marker of one of ``checks`` (a rollback): every flush recorded
        as credited is credited again, by marker. Returns their ids."""
        if all(check in self.redis.markers for check in checks):
            return []
        again = list(self.pg.recorded)
        assert self.memory.plans is not None
        self.memory.plans += [(fid, self.pg.flushes[fid][0]) for fid in again]
        return again

    def credit(self) -> int:
        """The credit calls for the plans in memory; returns the ancestors credited now."""
        assert self.memory.plans is not None
        credited: set[int] = set()
        for flush_id, plan in self.memory.plans:
            for ancestor in sorted({a for a, _ in plan}):
                if (flush_id, ancestor) in self.redis.markers:
                    continue
                self.redis.markers.add((flush_id, ancestor))
                for (a, currency), amount in plan.items():
                    if a == ancestor:
                        self.redis.balances[(a, currency)] += amount
                        credited.add(a)
        self.memory.credited = True
        return len(credited)

    def confirm(self) -> None:
        assert self.memory.plans is not None
        self.redis.confirmed.update(fid for fid, _ in self.memory.plans)
        self.memory.plans = None

    # -- what can happen between two steps --------------------------------------------------

    def crash(self) -> None:
        self.memory = Memory()

    def snapshot(self) -> RedisSide:
        return copy.deepcopy(self.redis)

    def rollback(self, to: RedisSide) -> None:
        self.redis = copy.deepcopy(to)

    # -- invariants -------------------------------------------------------------------------

    def owed(self) -> dict[tuple[str, int, str], int]:
        """Ledger rows recomputed from the stored bets and their recorded rates."""
        out: Counter[tuple[str, int, str]] = Counter()
        for stored in self.pg.bets.values():
            if stored.flush is not None:
                for ancestor, bps in stored.chain:
                    out[(stored.flush, ancestor, stored.bet.currency)] += commission(
                        Minor(stored.bet.amount), bps)
        return {k: v for k, v in out.items() if v}

    def violations(self) -> list[str]:
        out: list[str] = []
        if self.owed() != self.pg.ledger:
            out.append("ledger rows differ from the bets they pay")
        totals: Counter[tuple[int, str]] = Counter()
        for (_, ancestor, currency), amount in self.pg.ledger.items():
            totals[(ancestor, currency)] += amount
        if +totals != +self.pg.totals:
            out.append("commission_totals differ from the ledger")
        for key, balance in self.redis.balances.items():
            if balance > totals[key]:
                out.append(f"{key}: Redis credited {balance}, PostgreSQL paid {totals[key]}")
        for flush_id, ancestor in self.redis.markers:
            if flush_id not in self.pg.flushes:
                out.append(f"marker of an unpaid flush {flush_id}")
            elif ancestor not in {a for a, _ in self.pg.flushes[flush_id][0]}:
                out.append(f"marker of {ancestor}, who is not in flush {flush_id}")
        return out
