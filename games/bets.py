"""Validate a bet request and settle it against a roll.

:func:`validate_bet` runs PROTOCOL.md's checks in its order, and the first failing one
raises: every type check (``BAD_MESSAGE``) before any value check, then
``UNKNOWN_CURRENCY``, ``INVALID_AMOUNT``, ``INVALID_TARGET``, ``BET_LIMIT``. The later checks
(``IDEMPOTENCY_CONFLICT``, ``INSUFFICIENT_FUNDS``) need state and belong to the caller.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from games.dice import (
    OUTCOMES,
    format_hundredths,
    format_multiplier,
    is_win,
    multiplier_bp,
    parse_direction,
    parse_target,
    payout,
    winning_outcomes,
)
from games.errors import BadMessage, BetLimit
from games.money import Currency, format_amount, parse_amount, parse_currency
from games.types import Direction, Hundredths, Minor, MultiplierBp

__all__ = ["BetChecker", "BetSpec", "Checked", "Outcome", "fingerprint", "settle", "validate_bet"]


@dataclass(frozen=True, slots=True)
class BetSpec:
    """A valid bet: what was staked on what, and what it pays if it wins."""

    currency: Currency
    amount: Minor
    target: Hundredths
    direction: Direction
    winning: int
    multiplier: MultiplierBp

    @property
    def payout_if_win(self) -> Minor:
        return payout(self.amount, self.multiplier)


class Outcome(NamedTuple):
    """A settled roll (a named tuple: one is made per bet, and they are cheap to build)."""

    roll: Hundredths
    win: bool
    payout: Minor


def validate_bet(
    currency: object,
    amount: object,
    target: object,
    direction: object,
    currencies: Mapping[str, Currency],
    house_edge_bp: int = 100,
) -> BetSpec:
    """Check the fields of a ``bet`` request and price it.

    Raises:
        BadMessage: ``currency``, ``amount`` or ``target`` is not a string, or
            ``direction`` is not ``"under"``/``"over"``.
        UnknownCurrency: the currency is not configured.
        InvalidAmount: malformed, too many decimals, or zero.
        InvalidTarget: malformed, or winning on fewer than 1 or more than 9,800 outcomes.
        BetLimit: below the minimum bet, above the maximum bet, or its profit if it won
            (``payout - amount``) above the maximum profit.
    """
    for name, value in (("currency", currency), ("amount", amount), ("target", target)):
        if not isinstance(value, str):
            raise BadMessage(f"{name} must be a string")
    side = parse_direction(direction)
    cur = parse_currency(currency, currencies)
    stake = parse_amount(amount, cur)
    aim = parse_target(target)
    winning = winning_outcomes(aim, side)
    spec = BetSpec(
        currency=cur,
        amount=stake,
        target=aim,
        direction=side,
        winning=winning,
        multiplier=multiplier_bp(winning, house_edge_bp),
    )
    if stake < cur.min_bet:
        raise BetLimit(f"the minimum bet is {format_amount(cur.min_bet, cur)} {cur.code}")
    if stake > cur.max_bet:
        raise BetLimit(f"the maximum bet is {format_amount(cur.max_bet, cur)} {cur.code}")
    if spec.payout_if_win - stake > cur.max_profit:
        raise BetLimit(
            f"the maximum profit per bet is {format_amount(cur.max_profit, cur)} {cur.code}"
        )
    return spec


def fingerprint(spec: BetSpec) -> str:
    """The fields that make two requests "the same bet", e.g. ``"USDT|100|5000|under"``.

    Two requests with one idempotency key but different fingerprints are an
    ``IDEMPOTENCY_CONFLICT``. Built from parsed values, so ``"1.0"`` and ``"1.00"`` agree.
    """
    return f"{spec.currency.code}|{spec.amount}|{spec.target}|{spec.direction}"


def settle(spec: BetSpec, roll: Hundredths) -> Outcome:
    """The outcome of ``spec`` for ``roll``: its payout on a win, 0 on a loss.

    Raises:
        ValueError: ``roll`` is outside ``0 ... 10000``.
    """
    if not 0 <= roll < OUTCOMES:
        raise ValueError("a roll is within 0 ... 10000 hundredths")
    win = is_win(roll, spec.target, spec.direction)
    return Outcome(roll=roll, win=win, payout=spec.payout_if_win if win else Minor(0))


@dataclass(frozen=True, slots=True)
class Checked:
    """A valid bet together with the texts the bet path sends about it, made once."""

    spec: BetSpec
    fingerprint: str
    amount_text: str
    target_text: str
    multiplier_text: str


class BetChecker:
    """:func:`validate_bet` with a bounded memo of the requests that passed.

    Players and autobets repeat the same few bets (currency, amount, target, direction)
    thousands of times; parsing them again each time is a measurable share of a bet's CPU
    (docs/benchmarks.md). Only requests whose four fields are all strings are remembered
    (the key compares them exactly), and the memo is emptied when it reaches ``size``
    entries.
    """

    def __init__(
        self, currencies: Mapping[str, Currency], house_edge_bp: int, size: int = 4096
    ) -> None:
        self._currencies = currencies
        self._edge = house_edge_bp
        self._size = size
        self._memo: dict[tuple[str, str, str, str], Checked] = {}

    def check(self, currency: object, amount: object, target: object, direction: object) -> Checked:
        """Like :func:`validate_bet` (same errors)."""
        if (
            type(currency) is str and type(amount) is str and type(target) is str
            and type(direction) is str
        ):
            key = (currency, amount, target, direction)
            hit = self._memo.get(key)
            if hit is not None:
                return hit
        else:
            key = None
        spec = validate_bet(currency, amount, target, direction, self._currencies, self._edge)
        checked = Checked(
            spec, fingerprint(spec), format_amount(spec.amount, spec.currency),
            format_hundredths(spec.target), format_multiplier(spec.multiplier),
        )
        if key is not None:
            if len(self._memo) >= self._size:
                self._memo.clear()
            self._memo[key] = checked
        return checked
