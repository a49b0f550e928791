"""``python -m loadtest storm``: the seed's Scenario 2, commissions under a bet storm.

Setup: one super master, ``masters`` masters under it, ``agents`` agents spread over the
masters, and ``players`` players spread over the agents, all through the admin API
(concurrently, at most ``http_connections`` HTTP connections), with ``commission_bps`` set
on the super master, masters and agents (``--bps 20/30/50``). The first ``burst`` players
(spread over every agent) are credited and open one socket each.

The storm: each of those ``burst`` players sends one bet, all inside the same ``window``
(1 s), with stakes drawn between ``min_amount`` and ``max_amount`` so the per-bet flooring
of commissions shows. ``--sustained S`` instead sends ``rate`` bets/s for S seconds over the
same sockets (open loop: bets are sent on schedule, not on replies).

Then it reports:

- **commission exactness**: every ancestor's ``commission_earned`` (``GET
  /api/admin/users/{id}``) against the exact expected sum of ``floor(amount * bps / 10000)``
  over its descendants' accepted bets, polled until all match or ``commission_timeout``;
- **flush statements**: the change of every ``/metrics`` sample whose name contains
  ``commission`` over the run: ``stakepro_commission_flush_statements_total`` (one
  PostgreSQL statement per flush window with something to pay) and
  ``stakepro_commission_units_paid_total``, which the workers count in Redis and the server
  exports ("n/a" from a server that exports none);
- **persistence lag**: for ``lag_sample`` bets picked at random, the time from the
  ``bet_result`` to the first 200 of ``GET /api/bets/{bet_id}`` (polled every
  ``poll_interval``, so the resolution is about that), p50 / p99 / max.

Exit 0 only when every commission is exact, every sampled bet became visible and no bet was
refused or left unanswered.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from games.commission import commission
from games.errors import StakeProError
from games.money import Currency, format_amount, parse_amount
from games.types import Minor
from loadtest import common, serverstats
from loadtest.client import Socket
from loadtest.options import BetOptions
from loadtest.players import Admin, Player, SetupError


@dataclass
class StormOptions(BetOptions):
    players: int = 10_000
    masters: int = 10
    agents: int = 100
    #: commission_bps of the super master, each master, each agent.
    bps: tuple[int, int, int] = (20, 30, 50)
    burst: int = 500
    window: float = 1.0
    #: Seconds of sustained betting at ``rate``; None: one burst.
    sustained: float | None = None
    rate: float = 500.0
    min_amount: str = "1.00"
    max_amount: str = "50.00"
    deposit: str = "100000"
    lag_sample: int = 100
    poll_interval: float = 0.1
    persist_timeout: float = 30.0
    commission_timeout: float = 30.0
    reply_timeout: float = 15.0
    http_connections: int = 32
    seed: int | None = None
    progress: TextIO | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "players": self.players, "masters": self.masters,
                "agents": self.agents, "bps": list(self.bps), "burst": self.burst,
                "window_s": self.window, "sustained_s": self.sustained,
                "rate": self.rate if self.sustained else None, "currency": self.currency,
                "min_amount": self.min_amount, "max_amount": self.max_amount,
                "lag_sample": self.lag_sample, "poll_interval_s": self.poll_interval}


@dataclass
class Tree:
    super_master: Player
    masters: list[Player]
    agents: list[Player]
    players: list[Player]

    def agent_of(self, player_index: int) -> int:
        return player_index % len(self.agents)

    def master_of(self, agent_index: int) -> int:
        return agent_index % len(self.masters)


@dataclass
class Ancestor:
    role: str
    user_id: int | str
    expected: int = 0
    earned: int | None = None

    @property
    def exact(self) -> bool:
        return self.earned == self.expected


@dataclass
class StormReport:
    options: StormOptions
    setup_s: float
    users_created: int
    bets_sent: int
    accepted: int
    errors: dict[str, int]
    send_spread_s: float
    ancestors: list[Ancestor]
    commission_exact_after_s: float | None
    flush: dict[str, float] | None
    lags_ms: list[float]
    lag_timeouts: int
    client_cpu_s: float
    wall_s: float

    @property
    def commissions_exact(self) -> bool:
        return all(a.exact for a in self.ancestors)

    @property
    def ok(self) -> bool:
        return (self.commissions_exact and self.accepted > 0 and not self.errors
                and self.lag_timeouts == 0)

    def lag(self) -> dict[str, float | None]:
        values = sorted(self.lags_ms)
        return {"p50": common.r3(common.quantile(values, 0.5)),
                "p99": common.r3(common.quantile(values, 0.99)),
                "max": common.r3(values[-1] if values else None)}

    def mismatches(self) -> list[Ancestor]:
        return [a for a in self.ancestors if not a.exact]

    def to_dict(self) -> dict[str, Any]:
        by_role = Counter(a.role for a in self.ancestors)
        exact_by_role = Counter(a.role for a in self.ancestors if a.exact)
        return {
            "command": "storm", "options": self.options.public(), "ok": self.ok,
            "setup_s": round(self.setup_s, 3), "users_created": self.users_created,
            "bets_sent": self.bets_sent, "accepted": self.accepted, "errors": self.errors,
            "send_spread_s": round(self.send_spread_s, 3),
            "commission": {
                "exact": self.commissions_exact,
                "exact_by_role": {r: f"{exact_by_role[r]}/{n}" for r, n in by_role.items()},
                "exact_after_s": common.r3(self.commission_exact_after_s),
                "mismatches": [{"role": a.role, "user_id": a.user_id, "expected": a.expected,
                                "earned": a.earned} for a in self.mismatches()[:50]],
                "super_master_expected_minor": next(
                    (a.expected for a in self.ancestors if a.role == "super_master"), None),
            },
            "flush_metrics": self.flush if self.flush else "n/a",
            "persistence_lag_ms": {**self.lag(), "samples": len(self.lags_ms),
                                   "timeouts": self.lag_timeouts,
                                   "resolution_ms": round(self.options.poll_interval * 1000)},
            "wall_s": round(self.wall_s, 3),
            "client": {"cpu_s": round(self.client_cpu_s, 3)},
        }

    def table(self) -> str:
        o = self.options
        by_role = Counter(a.role for a in self.ancestors)
        exact_by_role = Counter(a.role for a in self.ancestors if a.exact)
        mode = (f"sustained {o.sustained:g} s at {o.rate:g} bets/s" if o.sustained
                else f"one bet each inside {o.window:g} s (sent over {self.send_spread_s:.2f} s)")
        exact = ", ".join(f"{r} {exact_by_role[r]}/{n}" for r, n in by_role.items())
        when = (f"exact {self.commission_exact_after_s:.2f} s after the last reply"
                if self.commission_exact_after_s is not None
                else f"NOT exact after {o.commission_timeout:g} s")
        lag = self.lag()
        errs = ", ".join(f"{c} {n:,}" for c, n in sorted(self.errors.items())) or "none"
        rows = [
            ("tree", f"1 super master / {len([a for a in self.ancestors if a.role == 'master'])}"
                     f" masters / {by_role['agent']} agents / {o.players:,} players, bps"
                     f" {'/'.join(map(str, o.bps))} ({self.users_created:,} users in"
                     f" {self.setup_s:.1f} s with setup)"),
            ("storm", f"{min(o.burst, o.players)} players betting, {mode}"),
            ("bets", f"{self.bets_sent:,} sent, {self.accepted:,} accepted; errors {errs}"),
            ("commissions", f"{when}: {exact}"),
        ]
        for a in self.mismatches()[:5]:
            rows.append(("  mismatch", f"{a.role} {a.user_id}: earned {a.earned} expected"
                                       f" {a.expected} (minor units)"))
        rows.append(("flush statements", ", ".join(f"{k} +{v:g}" for k, v in self.flush.items())
                     if self.flush else "n/a (no commission metric on /metrics)"))
        rows.append(("persistence lag", f"p50 {common.fmt_ms(lag['p50'])}, p99"
                     f" {common.fmt_ms(lag['p99'])}, max {common.fmt_ms(lag['max'])} over"
                     f" {len(self.lags_ms)} sampled bets, {self.lag_timeouts} not visible"
                     f" (polled every {o.poll_interval * 1000:.0f} ms)"))
        rows.append(("client CPU", f"{self.client_cpu_s:.2f} s (wall {self.wall_s:.1f} s)"))
        rows.append(("result", "OK" if self.ok else "FAIL"))
        return common.table(rows)


def _say(options: StormOptions, text: str) -> None:
    if options.progress is not None:
        print(text, file=options.progress, flush=True)


async def build_tree(admin: Admin, options: StormOptions) -> Tree:
    n = options.players
    masters_n = max(1, min(options.masters, n))
    agents_n = max(masters_n, min(options.agents, n))
    run = admin.run
    top = await admin.create_user("super_master", f"storm-{run}-sm", None, options.bps[0])
    masters = list(await asyncio.gather(*(
        admin.create_user("master", f"storm-{run}-m{i}", top.user_id, options.bps[1])
        for i in range(masters_n))))
    agents = list(await asyncio.gather(*(
        admin.create_user("agent", f"storm-{run}-a{i}", masters[i % masters_n].user_id,
                          options.bps[2])
        for i in range(agents_n))))
    created = 0
    started = time.perf_counter()

    async def player(i: int) -> Player:
        nonlocal created
        p = await admin.create_user("player", f"storm-{run}-p{i}", agents[i % agents_n].user_id)
        created += 1
        if created % 1000 == 0:
            rate = created / max(time.perf_counter() - started, 1e-9)
            _say(options, f"  {created:,}/{n:,} players created ({rate:,.0f}/s)")
        return p

    players = list(await asyncio.gather(*(player(i) for i in range(n))))
    return Tree(top, masters, agents, players)


def _stake(text: str, currency: Currency, flag: str) -> Minor:
    try:
        return parse_amount(text, currency)
    except StakeProError as exc:
        raise SetupError(f"{flag} {text}: {exc}") from None


def _earned(text: str, currency: Currency) -> int:
    """A ``commission_earned`` amount in minor units (zero too, which is no stake)."""
    return 0 if text.strip("0.") == "" else parse_amount(text, currency)


async def _sign_in(options: StormOptions, player: Player, gate: asyncio.Semaphore) -> Socket:
    async with gate:
        return await common.signed_in(options, player.token)


#: The /metrics sample of the commission flush's statements (server/metrics.py).
STATEMENTS_SAMPLE = "stakepro_commission_flush_statements_total"


async def _flush_delta(http_url: str, before: dict[str, float] | None,
                       settle: bool) -> dict[str, float] | None:
    """The change of every ``commission`` sample of /metrics over the run; None when the
    server exports none. The workers count a statement just after it commits, a moment after
    the ledger shows it: once the commissions are exact (``settle``), a count that has not
    moved yet is read again, for up to a second."""
    for attempt in range(5):
        after = await serverstats.scrape_samples(http_url, "commission")
        if not after:
            return None
        delta = {k: v - (before or {}).get(k, 0.0) for k, v in after.items()}
        if not settle or delta.get(STATEMENTS_SAMPLE, 0.0) > 0 or attempt == 4:
            return delta
        await asyncio.sleep(0.25)
    return None


async def run_storm(options: StormOptions) -> StormReport:
    if min(options.players, options.burst, options.masters, options.agents) < 1:
        raise ValueError("players, burst, masters and agents must be positive")
    clock = common.CpuClock()
    rng = random.Random(options.seed)
    http_url = options.http_url
    async with Admin(http_url, options.admin_token, options.http_connections) as admin, \
            Admin(http_url, options.admin_token, min(8, options.http_connections)) as poller:
        currency = await admin.currency(options.currency)
        lo = _stake(options.min_amount, currency, "--min-amount")
        hi = _stake(options.max_amount, currency, "--max-amount")
        if lo > hi:
            raise SetupError(f"--min-amount {options.min_amount} is above --max-amount"
                             f" {options.max_amount}")
        _say(options, f"creating 1 + {options.masters} + {options.agents} + {options.players:,}"
                      " users ...")
        tree = await build_tree(admin, options)
        users_created = 1 + len(tree.masters) + len(tree.agents) + len(tree.players)
        betters = tree.players[:min(options.burst, len(tree.players))]
        await asyncio.gather(*(admin.deposit(p.user_id, options.currency, options.deposit)
                               for p in betters))
        gate = asyncio.Semaphore(64)
        sockets = list(await asyncio.gather(*(_sign_in(options, p, gate) for p in betters)))
        setup_s = clock.wall_s()
        _say(options, f"setup done in {setup_s:.1f} s; {len(sockets)} sockets open")

        # the plan: (seconds from start, better index, amount in minor units)
        if options.sustained:
            total = max(1, int(options.rate * options.sustained))
            plan = [(k / options.rate, k % len(betters), rng.randint(lo, hi))
                    for k in range(total)]
        else:
            plan = [(i * options.window / len(betters), i, rng.randint(lo, hi))
                    for i in range(len(betters))]
        sampled = set(rng.sample(range(len(plan)), min(options.lag_sample, len(plan))))
        per_socket: list[list[tuple[float, str, int, bool]]] = [[] for _ in betters]
        for k, (t, who, minor) in enumerate(plan):
            per_socket[who].append((t, f"storm-{k}", minor, k in sampled))

        accepted: dict[int, int] = {}  # better index -> bets accepted
        shares_agent: Counter[int] = Counter()
        shares_master: Counter[int] = Counter()
        share_super = 0
        errors: Counter[str] = Counter()
        lags_ms: list[float] = []
        lag_timeouts = 0
        lag_tasks: list[asyncio.Task[None]] = []
        last_reply = time.perf_counter()
        sent_times: list[float] = []
        bps_super, bps_master, bps_agent = options.bps

        async def poll_persisted(bet_id: Any, received: float) -> None:
            nonlocal lag_timeouts
            deadline = received + options.persist_timeout
            while time.perf_counter() < deadline:
                if await poller.bet_status(bet_id) == 200:
                    lags_ms.append((time.perf_counter() - received) * 1000)
                    return
                await asyncio.sleep(options.poll_interval)
            lag_timeouts += 1

        def settled(who: int, minor: int) -> None:
            nonlocal share_super
            agent = tree.agent_of(who)
            stake = Minor(minor)
            shares_agent[agent] += commission(stake, bps_agent)
            shares_master[tree.master_of(agent)] += commission(stake, bps_master)
            share_super += commission(stake, bps_super)
            accepted[who] = accepted.get(who, 0) + 1

        start = time.perf_counter() + 0.2
        flush_before = await serverstats.scrape_samples(http_url, "commission")

        async def drive(who: int) -> None:
            nonlocal last_reply
            sock = sockets[who]
            mine = per_socket[who]
            waiting: dict[str, tuple[int, bool]] = {}

            async def send_all() -> None:
                for t, bet_id, minor, sample in mine:
                    await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
                    waiting[bet_id] = (minor, sample)
                    sent_times.append(time.perf_counter())
                    await sock.send({"type": "bet", "id": bet_id, "currency": options.currency,
                                     "amount": format_amount(minor, currency),
                                     "target": options.target, "direction": options.direction})

            sender = asyncio.create_task(send_all())
            try:
                async with asyncio.timeout(
                        (mine[-1][0] if mine else 0) + 0.2 + options.reply_timeout):
                    while not sender.done() or waiting:
                        if not waiting:
                            await asyncio.wait([sender], timeout=0.05)
                            if sender.done() and sender.exception() is not None:
                                break
                            continue
                        message = await sock.recv()
                        kind = message.get("type")
                        if kind == "bet_result" and message.get("id") in waiting:
                            minor, sample = waiting.pop(str(message["id"]))
                            settled(who, minor)
                            last_reply = time.perf_counter()
                            if sample:
                                lag_tasks.append(asyncio.create_task(
                                    poll_persisted(message["bet_id"], last_reply)))
                        elif kind == "error" and message.get("id") in waiting:
                            waiting.pop(str(message["id"]))
                            errors[str(message.get("code"))] += 1
            except TimeoutError:
                errors["UNANSWERED"] += len(waiting)
            except (ConnectionError, ValueError):
                errors["CLOSED"] += len(waiting)
            finally:
                sender.cancel()
                if not sender.cancelled() and sender.done() and sender.exception() is not None:
                    errors["SEND_FAILED"] += 1

        _say(options, f"storm: {len(plan):,} bets from {len(betters)} players ...")
        try:
            await asyncio.gather(*(drive(i) for i in range(len(betters))))
        finally:
            await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
        spread = (max(sent_times) - min(sent_times)) if sent_times else 0.0
        _say(options, f"{sum(accepted.values()):,} accepted; waiting for commissions ...")

        ancestors = [Ancestor("super_master", tree.super_master.user_id, share_super)]
        ancestors += [Ancestor("master", m.user_id, shares_master[i])
                      for i, m in enumerate(tree.masters)]
        ancestors += [Ancestor("agent", a.user_id, shares_agent[i])
                      for i, a in enumerate(tree.agents)]
        exact_after: float | None = None
        deadline = time.perf_counter() + options.commission_timeout
        while True:
            views = await asyncio.gather(*(admin.user(a.user_id) for a in ancestors))
            for a, view in zip(ancestors, views, strict=True):
                a.earned = _earned(str(view["commission_earned"][options.currency]), currency)
            if all(a.exact for a in ancestors):
                exact_after = time.perf_counter() - last_reply
                break
            if time.perf_counter() >= deadline:
                break
            await asyncio.sleep(0.25)
        if lag_tasks:
            await asyncio.gather(*lag_tasks)
        flush = await _flush_delta(http_url, flush_before, settle=exact_after is not None)
    return StormReport(
        options=options, setup_s=setup_s, users_created=users_created, bets_sent=len(sent_times),
        accepted=sum(accepted.values()), errors=dict(errors), send_spread_s=spread,
        ancestors=ancestors, commission_exact_after_s=exact_after, flush=flush,
        lags_ms=lags_ms, lag_timeouts=lag_timeouts, client_cpu_s=clock.cpu_s(),
        wall_s=clock.wall_s(),
    )


def progress_stream(quiet: bool) -> TextIO | None:
    return None if quiet else sys.stderr
