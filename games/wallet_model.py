"""A pure reference of what the money scripts do to one user's state (STYLE.md, point 2).

:class:`WalletModel` is plain Python, no I/O: it holds what ``lua/bet-n.lua``,
``lua/deposit-5.lua``, ``lua/rotate-3.lua`` and ``lua/heal-n.lua`` keep in Redis for one
user, and its methods :meth:`~WalletModel.bet`, :meth:`~WalletModel.deposit`,
:meth:`~WalletModel.rotate` and :meth:`~WalletModel.heal` follow those scripts' header
contracts, answering the same flat reply with the same RESP
types (``int`` for an integer reply, ``str``/``bytes`` for a bulk string). The property test
``tests/test_wallet_model.py`` runs the real scripts on a real Redis next to this model and
demands identical replies and identical Redis state after every step; so whatever this
model guarantees, the scripts guarantee too.

State of one user
=================

* ``balances``: currency -> minor units; a currency appears once a script has touched it
  (HINCRBY creates the field), and stays at ``0`` when spent.
* ``pair``: the active seed pair (pid, server seed, its hash, client seed, nonce) or none.
* ``bets``: bet id -> :class:`BetRecord` (fingerprint, balance after, event blob). Redis
  expires these after the idempotency window; the model drops one only on an explicit
  :meth:`~WalletModel.expire`, after which the id settles as a new bet.
* ``deposits``: idempotency key -> :class:`DepositRecord` (kept forever).
* ``outbox``: the events appended to the bucket's outbox stream, each with the exact field
  list the script gives to XADD; ``pushes``: the messages PUBLISHed on the user's channel.
* ``healed``: the heal marker, the run id under which the user was last healed; every
  money script answers HEAL while it differs from the caller's run id (a bet with a record
  under its id still answers REPLAY or CONFLICT: the record is the truth).

Invariants (:meth:`~WalletModel.violations` checks them)
========================================================

1. **No negative balance.** A bet settles only when ``balance >= stake`` (an exact integer
   comparison, at any magnitude) and its ``delta = payout - stake >= -stake``.
2. **Balance = deposits + settled deltas**, per currency: only a credited deposit and a
   settled bet move money, once each.
3. **Nonces contiguous per pair.** The settled bets of a pair used nonces ``1, 2, ..., n``
   and the pair's stored nonce is ``n``; a rotation starts the new pair at ``0`` and the
   reveal event carries the old pair's ``n``.
4. **A refused bet uses no nonce** (conflict, insufficient funds, stale, no seed): follows
   from 3, as only settling appends to the ledger.
5. **A replay moves no money**: a bet id or deposit key seen with the same fingerprint
   answers the stored balance-after (and the bet's event) and changes nothing; with another
   fingerprint it is a conflict and changes nothing.
6. **One outbox event per settled bet, credited deposit and reveal**, in order, and one
   push per credited deposit and per settled bet that another socket can receive (a
   reveal is not pushed).

Preconditions the scripts trust their caller with (the model raises :class:`ValueError`):
a stake or deposit amount is positive, ``delta >= -stake``, a new pair id is not empty (and,
for invariant 3, never reused; PostgreSQL's serial guarantees that). The
scripts leave balances to Redis's signed 64-bit HINCRBY; the model's integers are exact, so
the test keeps balances inside that range.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from games.codes import BetCode, DepositCode, HealCode, RotateCode
from games.types import Minor

__all__ = [
    "BetRecord",
    "DepositRecord",
    "Event",
    "Reply",
    "SeedPair",
    "Settlement",
    "WalletModel",
]

Reply = tuple[int | str | bytes, ...]
"""A script's flat reply: ``int`` where Redis answers an integer, ``str``/``bytes`` where it
answers a bulk string (``bytes`` for the opaque blobs)."""

Field = tuple[str, str | bytes]



@dataclass(slots=True)
class SeedPair:
    pid: str
    server_seed: str
    server_seed_hash: str
    client_seed: str
    nonce: int = 0
    #: Run id of the Redis server the pair was installed on (bet-n answers EPOCH otherwise).
    rid: str = ""
    #: The pair this one replaced, as revealed: (pid, ss, sh, cs, n); kept for retries.
    prev: tuple[str, str, str, str, str] | None = None

    def as_hash(self) -> dict[str, str]:
        """The fields of the seed pair hash (KEYS[2] of bet-n) as Redis stores them."""
        fields = {
            "pid": self.pid,
            "ss": self.server_seed,
            "sh": self.server_seed_hash,
            "cs": self.client_seed,
            "n": str(self.nonce),
            "rid": self.rid,
        }
        if self.prev is not None:
            fields.update(zip(("ppid", "pss", "psh", "pcs", "pn"), self.prev, strict=True))
        return fields


@dataclass(frozen=True, slots=True)
class BetRecord:
    fingerprint: str
    balance: Minor
    #: The bet's outbox event blob (a replay answers from it).
    event: bytes

    def as_string(self) -> bytes:
        """bet-n.lua's record: ``fingerprint \\n balance \\n event``."""
        return f"{self.fingerprint}\n{self.balance}\n".encode() + self.event


@dataclass(frozen=True, slots=True)
class DepositRecord:
    fingerprint: str
    balance: Minor

    def as_hash(self) -> dict[str, str | bytes]:
        return {"f": self.fingerprint, "b": str(self.balance)}


@dataclass(frozen=True, slots=True)
class Event:
    """One outbox entry: the field/value list exactly as given to XADD."""

    fields: tuple[Field, ...]

    @property
    def kind(self) -> str:
        """``bet``, ``deposit`` or ``reveal`` (the ``k`` field)."""
        return str(self.fields[0][1])


@dataclass(frozen=True, slots=True)
class Settlement:
    """A settled bet in the ledger (what invariants 2 and 3 are computed from)."""

    pid: str
    nonce: int
    currency: str
    delta: int


@dataclass(slots=True)
class WalletModel:
    balances: dict[str, Minor] = field(default_factory=dict)
    pair: SeedPair | None = None
    bets: dict[str, BetRecord] = field(default_factory=dict)
    deposits: dict[str, DepositRecord] = field(default_factory=dict)
    outbox: list[Event] = field(default_factory=list)
    pushes: list[str] = field(default_factory=list)
    # The ledger: every money or nonce movement, never rewritten.
    settled: list[Settlement] = field(default_factory=list)
    credited: list[tuple[str, Minor]] = field(default_factory=list)
    revealed: list[SeedPair] = field(default_factory=list)
    healed: str | None = None

    # -- bet-n.lua --------------------------------------------------------------------

    def bet(
        self,
        bet_id: str,
        currency: str,
        stake: Minor,
        delta: int,
        pid: str,
        expected_nonce: int,
        fingerprint: str,
        event_blob: bytes,
        origin: str,
        run_id: str = "",
        local_others: int = 0,
        subscribers: int = 1,
    ) -> Reply:
        """Settle one bet, in bet-n.lua's order of checks (a call of
        several bets is these steps once per bet, in order).

        1. A record under ``bet_id``: REPLAY ``(1, balance_after, event_blob)`` with the same
           fingerprint, else CONFLICT ``(2,)``. Checked first, so a replay answers even
           after the pair rotated.
        2. No active pair: NO_SEED ``(5,)``. A pair installed under another Redis run id
           than ``run_id``: EPOCH ``(6, pid)``. Pair id or stored nonce differ from ``pid`` /
           ``expected_nonce``: STALE ``(4, pid, nonce)``.
        3. ``balance < stake`` (a missing currency is ``0``): INSUFFICIENT_FUNDS
           ``(3, balance)``.
        4. Else SETTLED ``(0, "balance_after", nonce)`` with ``nonce = expected_nonce + 1``:
           the nonce and the balance move, the record is stored, one ``bet`` event is
           appended, and one push published when someone else can receive it
           (``local_others`` sockets on the calling instance, or more than one instance
           among the channel's ``subscribers``).
        """
        if stake <= 0 or delta < -stake:
            raise ValueError("a stake is positive and delta = payout - stake >= -stake")
        rec = self.bets.get(bet_id)
        if rec is not None:
            if rec.fingerprint == fingerprint:
                return (BetCode.REPLAY, str(rec.balance), rec.event)
            return (BetCode.CONFLICT,)
        if self.healed != run_id:
            return (BetCode.HEAL,)
        if self.pair is None:
            return (BetCode.NO_SEED,)
        if self.pair.rid != run_id:
            return (BetCode.EPOCH, self.pair.pid)
        if self.pair.pid != pid or self.pair.nonce != expected_nonce:
            return (BetCode.STALE, self.pair.pid, str(self.pair.nonce))
        balance = self.balances.get(currency, Minor(0))
        if not self._covers(balance, stake):
            return (BetCode.INSUFFICIENT_FUNDS, str(balance))
        self.pair.nonce += 1
        after = Minor(balance + delta)
        self.balances[currency] = after
        self.bets[bet_id] = BetRecord(fingerprint, after, event_blob)
        self.outbox.append(Event((("k", "bet"), ("e", event_blob), ("b", str(after)))))
        if local_others > 0 or subscribers > 1:
            self.pushes.append(f"bet|{origin}|{currency}|{after}")
        self.settled.append(Settlement(pid, self.pair.nonce, currency, delta))
        return (BetCode.SETTLED, str(after), self.pair.nonce)

    def _covers(self, balance: Minor, stake: Minor) -> bool:
        """Whether ``balance`` pays ``stake``: exact integers, whatever their size."""
        return balance >= stake

    def expire(self, bet_id: str) -> None:
        """The idempotency window of ``bet_id`` passed (Redis expired its record)."""
        self.bets.pop(bet_id, None)

    # -- deposit-4.lua ----------------------------------------------------------------

    def deposit(
        self, key: str, currency: str, amount: Minor, fingerprint: str, event_blob: bytes,
        run_id: str = "",
    ) -> Reply:
        """Credit once per key: CREDITED ``(0, "balance_after")``; the same key again is
        REPLAY ``(1, balance_after_then)`` with the same fingerprint, else CONFLICT
        ``(2,)``; HEAL ``(3,)`` before anything while the marker is not ``run_id``."""
        if amount <= 0:
            raise ValueError("a deposit amount is positive")
        if self.healed != run_id:
            return (DepositCode.HEAL,)
        rec = self.deposits.get(key)
        if rec is not None:
            if rec.fingerprint == fingerprint:
                return (DepositCode.REPLAY, str(rec.balance))
            return (DepositCode.CONFLICT,)
        after = Minor(self.balances.get(currency, 0) + amount)
        self.balances[currency] = after
        self.deposits[key] = DepositRecord(fingerprint, after)
        self.outbox.append(Event((("k", "deposit"), ("e", event_blob), ("b", str(after)))))
        self.pushes.append(f"deposit|-|{currency}|{after}")
        self.credited.append((currency, amount))
        return (DepositCode.CREDITED, str(after))

    # -- rotate-2.lua -----------------------------------------------------------------

    def rotate(
        self,
        expected_pid: str,
        new_pid: str,
        server_seed: str,
        server_seed_hash: str,
        client_seed: str,
        ts: int,
        run_id: str = "",
    ) -> Reply:
        """Replace the active pair when ``expected_pid`` is it (``""``: when there is none).

        ROTATED ``(0, pid, ss, sh, cs, n)`` revealing the old pair, with one ``reveal``
        event; ROTATED ``(0, "", "", "", "", "")`` and no event when a first pair was
        installed; STALE ``(4, active_pid_or_empty)`` and no change otherwise. A retry of
        the rotation that installed the active pair (``new_pid`` is active) answers its
        reveal again and changes nothing.
        """
        if not new_pid:
            raise ValueError("a new pair id is not empty")
        if self.healed != run_id:
            return (RotateCode.HEAL,)
        old = self.pair
        if old is not None and old.pid == new_pid:
            return (RotateCode.ROTATED, *(old.prev or ("", "", "", "", "")))
        if (old.pid if old is not None else "") != expected_pid:
            return (RotateCode.STALE, old.pid if old is not None else "")
        prev = None if old is None else (
            old.pid, old.server_seed, old.server_seed_hash, old.client_seed, str(old.nonce)
        )
        self.pair = SeedPair(new_pid, server_seed, server_seed_hash, client_seed, 0, run_id, prev)
        if old is None:
            return (RotateCode.ROTATED, "", "", "", "", "")
        self.outbox.append(
            Event((("k", "reveal"), ("pid", old.pid), ("n", str(old.nonce)), ("ts", str(ts))))
        )
        self.revealed.append(old)
        return (RotateCode.ROTATED, old.pid, old.server_seed, old.server_seed_hash, old.client_seed,
                str(old.nonce))

    # -- heal-n.lua -------------------------------------------------------------------

    def heal(self, run_id: str, balances: dict[str, Minor],
             bets: dict[str, tuple[BetRecord, int]],
             deposits: dict[str, DepositRecord]) -> Reply:
        """Make the state equal to the ledger's truth, once per run id: ALREADY ``(0,)``
        when the marker is ``run_id`` (nothing changes), else HEALED ``(1,)``: the balances
        become ``balances`` exactly, each bet record of ``bets`` (with its remaining
        lifetime) is written over, each deposit record is added where none is, and the
        marker becomes ``run_id``. (Crediting a deposit neither store holds, and the
        commission markers, are left to the tests of plumbing/heal.py.)"""
        if self.healed == run_id:
            return (HealCode.ALREADY,)
        self.balances = dict(balances)
        for bet_id, (record, _) in bets.items():
            self.bets[bet_id] = record
        for key, dep in deposits.items():
            self.deposits.setdefault(key, dep)
        self.healed = run_id
        return (HealCode.HEALED,)

    # -- invariants -------------------------------------------------------------------

    def violations(self) -> list[str]:
        """The invariants of the module docstring that do not hold (none, normally)."""
        out: list[str] = []
        for cur, bal in self.balances.items():
            if bal < 0:
                out.append(f"negative balance {cur}={bal}")
        expected: Counter[str] = Counter()
        for cur, amount in self.credited:
            expected[cur] += amount
        for s in self.settled:
            expected[s.currency] += s.delta
        for cur in set(expected) | set(self.balances):
            if self.balances.get(cur, 0) != expected[cur]:
                out.append(f"{cur}: balance {self.balances.get(cur, 0)} != ledger {expected[cur]}")
        nonces: dict[str, list[int]] = {}
        for s in self.settled:
            nonces.setdefault(s.pid, []).append(s.nonce)
        for pid, ns in nonces.items():
            if ns != list(range(1, len(ns) + 1)):
                out.append(f"pair {pid}: nonces {ns} not contiguous from 1")
        final = {p.pid: p.nonce for p in self.revealed}
        if self.pair is not None:
            final[self.pair.pid] = self.pair.nonce
        for pid, n in final.items():
            if n != len(nonces.get(pid, [])):
                out.append(f"pair {pid}: nonce {n} but {len(nonces.get(pid, []))} settled bets")
        kinds = Counter(e.kind for e in self.outbox)
        want = {"bet": len(self.settled), "deposit": len(self.credited),
                "reveal": len(self.revealed)}
        if kinds != Counter({k: v for k, v in want.items() if v}):
            out.append(f"outbox kinds {dict(kinds)} != {want}")
        if len(self.pushes) > len(self.settled) + len(self.credited):
            out.append(f"{len(self.pushes)} pushes for {len(self.settled)} bets and "
                       f"{len(self.credited)} deposits")
        return out
