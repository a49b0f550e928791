"""``python -m loadtest double-spend``: the seed's Scenario 1 at scale.

Every round, each of ``players`` players is credited exactly ``amount`` (its balance was 0)
and then fires ``bets`` simultaneous bets of that full balance on each of its ``sockets``
sockets, all players at once. Exactly one bet per player may be accepted; every other one
must be refused with ``INSUFFICIENT_FUNDS``, and the balance must end at 0.

The bets are near-impossible wins (``under 0.01``: one outcome in 10,001). A win would fund
more bets, so a player whose first accepted bet (lowest nonce) WON makes its round
inconclusive: that trial is redone with a fresh player, and the number redone is reported.
In every conclusive trial: accepted == 1, no other error than ``INSUFFICIENT_FUNDS``, the
accepted bet's ``balance`` is 0, and the admin view shows 0 after the round. Exit 0 only
when all hold.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from loadtest import common
from loadtest.client import Socket
from loadtest.options import BetOptions
from loadtest.players import Admin, Player

#: A trial is redone at most this many times (a win has probability 1/10,001).
MAX_REDO = 5


@dataclass
class DoubleSpendOptions(BetOptions):
    players: int = 20
    rounds: int = 10
    sockets: int = 4
    bets: int = 16
    #: The deposit and the stake of every bet.
    amount: str = "1.00"
    target: str = "0.01"
    round_timeout: float = 15.0
    http_connections: int = 32

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "players": self.players, "rounds": self.rounds,
                "sockets_per_player": self.sockets, "bets_per_socket": self.bets,
                "currency": self.currency, "amount": self.amount, "target": self.target,
                "direction": self.direction, "encoding": self.encoding}


@dataclass
class Trial:
    """One player's volley in one round."""

    user_id: int | str
    accepted: list[dict[str, Any]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    balance_after: str | None = None
    deposit_balance: str | None = None

    @property
    def first_won(self) -> bool:
        if not self.accepted:
            return False
        first = min(self.accepted, key=lambda m: int(m.get("nonce", 0)))
        return bool(first.get("win"))

    @property
    def unexpected_errors(self) -> dict[str, int]:
        return {c: n for c, n in self.errors.items() if c != "INSUFFICIENT_FUNDS"}

    def problems(self, amount: str) -> list[str]:
        out: list[str] = []
        if len(self.accepted) != 1:
            out.append(f"user {self.user_id}: {len(self.accepted)} bets accepted")
        if self.unexpected_errors:
            out.append(f"user {self.user_id}: errors {self.unexpected_errors}")
        if self.deposit_balance is not None and Decimal(self.deposit_balance) != Decimal(amount):
            out.append(f"user {self.user_id}: balance {self.deposit_balance} after the deposit,"
                       f" expected {amount}")
        for m in self.accepted:
            if Decimal(str(m.get("balance"))) != 0 and len(self.accepted) == 1:
                out.append(f"user {self.user_id}: bet_result balance {m.get('balance')}")
        if self.balance_after is not None and Decimal(self.balance_after) != 0:
            out.append(f"user {self.user_id}: final balance {self.balance_after}")
        return out


@dataclass
class RoundResult:
    index: int
    trials: list[Trial]
    redone: int
    seconds: float

    def accepted(self) -> list[int]:
        return [len(t.accepted) for t in self.trials]

    def rejected(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for t in self.trials:
            total.update(t.errors)
        return total


class Slot:
    """A player and its open sockets."""

    def __init__(self, player: Player, sockets: list[Socket]) -> None:
        self.player = player
        self.sockets = sockets

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sockets))


async def _new_slot(admin: Admin, options: DoubleSpendOptions, name: str) -> Slot:
    player = await admin.create_user("player", name)
    sockets = await asyncio.gather(*(common.signed_in(options, player.token)
                                     for _ in range(options.sockets)))
    return Slot(player, list(sockets))


async def _volley(slot: Slot, options: DoubleSpendOptions, tag: str, trial: Trial) -> None:
    """Every socket of ``slot`` sends its bets at once, then reads every reply."""
    ids = [[f"{tag}-s{s}-b{b}" for b in range(options.bets)] for s in range(options.sockets)]

    async def fire(sock: Socket, wanted: list[str]) -> None:
        for bet_id in wanted:
            await sock.send({"type": "bet", "id": bet_id, "currency": options.currency,
                             "amount": options.amount, "target": options.target,
                             "direction": options.direction})

    async def collect(sock: Socket, wanted: list[str]) -> None:
        left = set(wanted)
        try:
            while left:
                message = await sock.recv()
                kind = message.get("type")
                if kind == "bet_result" and message.get("id") in left:
                    left.discard(str(message.get("id")))
                    trial.accepted.append(message)
                elif kind == "error" and message.get("id") in left:
                    left.discard(str(message.get("id")))
                    trial.errors[str(message.get("code"))] += 1
        except ConnectionError:
            trial.errors["CLOSED"] += len(left)

    await asyncio.gather(*(fire(s, w) for s, w in zip(slot.sockets, ids, strict=True)))
    try:
        async with asyncio.timeout(options.round_timeout):
            await asyncio.gather(*(collect(s, w) for s, w in zip(slot.sockets, ids,
                                                                 strict=True)))
    except TimeoutError:
        answered = len(trial.accepted) + sum(trial.errors.values())
        trial.errors["UNANSWERED"] += options.sockets * options.bets - answered


@dataclass
class DoubleSpendReport:
    options: DoubleSpendOptions
    rounds: list[RoundResult]
    problems: list[str]
    client_cpu_s: float
    wall_s: float
    setup_s: float

    @property
    def redone(self) -> int:
        return sum(r.redone for r in self.rounds)

    @property
    def ok(self) -> bool:
        return not self.problems and len(self.rounds) == self.options.rounds

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "double-spend", "options": self.options.public(), "ok": self.ok,
            "rounds": [{"round": r.index, "accepted": r.accepted(),
                        "rejected": dict(r.rejected()), "redone": r.redone,
                        "seconds": round(r.seconds, 3)} for r in self.rounds],
            "bets_sent": self.bets_sent(),
            "redone": self.redone, "problems": self.problems[:100],
            "problem_count": len(self.problems),
            "setup_s": round(self.setup_s, 3), "wall_s": round(self.wall_s, 3),
            "client": {"cpu_s": round(self.client_cpu_s, 3)},
        }

    def bets_sent(self) -> int:
        per_trial = self.options.sockets * self.options.bets
        return sum((len(r.trials) + r.redone) * per_trial for r in self.rounds)

    def table(self) -> str:
        o = self.options
        lines = [f"{o.players} players x {o.sockets} sockets x {o.bets} bets of the full"
                 f" balance ({o.amount} {o.currency} {o.direction} {o.target}) per round"]
        for r in self.rounds:
            spread = Counter(r.accepted())
            shown = ", ".join(f"{k} accepted x{v}" for k, v in sorted(spread.items()))
            rejected = ", ".join(f"{c} {n:,}" for c, n in sorted(r.rejected().items()))
            verdict = "ok" if set(spread) == {1} else "FAIL"
            lines.append(f"round {r.index:>3}: {shown}  (rejected {rejected or 'none'});"
                         f" redone {r.redone}; {r.seconds:.2f} s  {verdict}")
        rows = [
            ("rounds", f"{len(self.rounds)} of {o.rounds}, {self.bets_sent():,} bets sent"),
            ("redone", f"{self.redone} trial(s) whose accepted bet won (inconclusive)"),
            ("problems", "none" if not self.problems else
             f"{len(self.problems)}: " + "; ".join(self.problems[:10])),
            ("client CPU", f"{self.client_cpu_s:.2f} s (setup {self.setup_s:.1f} s,"
                           f" wall {self.wall_s:.1f} s)"),
            ("result", "OK: exactly one accepted per player in every conclusive round, final"
                       " balances 0" if self.ok else "FAIL"),
        ]
        return "\n".join(lines) + "\n" + common.table(rows)


async def run_double_spend(options: DoubleSpendOptions) -> DoubleSpendReport:
    if min(options.players, options.rounds, options.sockets, options.bets) < 1:
        raise ValueError("players, rounds, sockets and bets must be positive")
    clock = common.CpuClock()
    problems: list[str] = []
    results: list[RoundResult] = []
    async with Admin(options.http_url, options.admin_token,
                     options.http_connections) as admin:
        fresh = 0

        async def new_slot() -> Slot:
            nonlocal fresh
            fresh += 1
            return await _new_slot(admin, options, f"ds-{admin.run}-{fresh}")

        slots = list(await asyncio.gather(*(new_slot() for _ in range(options.players))))
        setup_s = clock.wall_s()
        try:
            async def trial(i: int, index: int) -> tuple[Trial, int]:
                """Slot ``i``'s volley of round ``index``, redone while its bet won."""
                for attempt in range(MAX_REDO + 1):
                    slot = slots[i]
                    t = Trial(slot.player.user_id)
                    t.deposit_balance = await admin.deposit(
                        slot.player.user_id, options.currency, options.amount)
                    await _volley(slot, options, f"r{index}a{attempt}", t)
                    if not t.first_won:
                        return t, attempt
                    await slot.close()  # the win funded more bets: a fresh player redoes it
                    slots[i] = await new_slot()
                problems.append(f"round {index}: player slot {i} won {MAX_REDO + 1} times")
                return t, MAX_REDO + 1

            for index in range(1, options.rounds + 1):
                started = time.perf_counter()
                done = await asyncio.gather(*(trial(i, index) for i in range(len(slots))))
                redone = sum(n for _, n in done)
                trials = [t for t, _ in done]
                views = await asyncio.gather(*(admin.user(t.user_id) for t in trials))
                for t, view in zip(trials, views, strict=True):
                    t.balance_after = str(view["balances"].get(options.currency))
                    if not t.first_won:
                        problems.extend(f"round {index}: {p}" for p in t.problems(options.amount))
                results.append(RoundResult(index, trials, redone,
                                           time.perf_counter() - started))
        finally:
            await asyncio.gather(*(s.close() for s in slots), return_exceptions=True)
    return DoubleSpendReport(options, results, problems, clock.cpu_s(), clock.wall_s(),
                             setup_s)
