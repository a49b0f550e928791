"""Currencies and amounts: decimal strings on the wire, integer minor units inside.

No float ever touches money: an amount is parsed from its decimal string by integer
arithmetic and formatted back the same way, so ``format_amount(parse_amount(s, c), c)`` is
``s`` padded to the currency's decimals.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass

from games.errors import BadMessage, InvalidAmount, UnknownCurrency
from games.types import Minor

__all__ = [
    "DEFAULT_CURRENCIES",
    "Currency",
    "format_amount",
    "parse_amount",
    "parse_currency",
]

# ASCII digits only (``\d`` would accept "١٢"), no sign, exponent, space or underscore.
_AMOUNT_RE = re.compile(r"([0-9]{1,20})(?:\.([0-9]+))?", re.ASCII)


@dataclass(frozen=True, slots=True)
class Currency:
    """A configured currency and its per-bet limits, all in minor units."""

    code: str
    decimals: int
    min_bet: Minor
    max_bet: Minor
    max_profit: Minor


DEFAULT_CURRENCIES: dict[str, Currency] = {
    "USDT": Currency(
        code="USDT",
        decimals=2,
        min_bet=Minor(1),  # 0.01
        max_bet=Minor(1_000_000),  # 10,000.00
        max_profit=Minor(10_000_000),  # 100,000.00
    ),
    "BTC": Currency(
        code="BTC",
        decimals=8,
        min_bet=Minor(1),  # 0.00000001
        max_bet=Minor(100_000_000),  # 1
        max_profit=Minor(1_000_000_000),  # 10
    ),
}


def parse_amount(value: object, currency: Currency) -> Minor:
    """Parse a positive decimal string into minor units of ``currency``.

    Raises:
        BadMessage: ``value`` is not a string.
        InvalidAmount: not a plain decimal (``^[0-9]{1,20}(\\.[0-9]+)?$``), more decimals
            than the currency has (even trailing zeros: ``"1.000"`` for USDT), or zero.
    """
    if not isinstance(value, str):
        raise BadMessage("amount must be a decimal string")
    match = _AMOUNT_RE.fullmatch(value)
    if match is None:
        raise InvalidAmount(f"amount must be a plain decimal string like {_example(currency)}")
    whole, fraction = match.group(1), match.group(2) or ""
    if len(fraction) > currency.decimals:
        raise InvalidAmount(f"{currency.code} amounts have at most {currency.decimals} decimals")
    minor = int(whole) * 10**currency.decimals + int(fraction.ljust(currency.decimals, "0") or "0")
    if minor == 0:
        raise InvalidAmount("amount must be positive")
    return Minor(minor)


def parse_currency(value: object, currencies: Mapping[str, Currency]) -> Currency:
    """Look up a currency code.

    Raises:
        BadMessage: ``value`` is not a string.
        UnknownCurrency: no such currency is configured.
    """
    if not isinstance(value, str):
        raise BadMessage("currency must be a string")
    try:
        return currencies[value]
    except KeyError:
        raise UnknownCurrency(f"unknown currency; known: {', '.join(sorted(currencies))}") from None


def format_amount(minor: int, currency: Currency) -> str:
    """Format minor units with exactly ``currency.decimals`` places: 5 sats -> "0.00000005".

    Done on the integer's digits (it runs twice per bet): no division, no rounding."""
    if minor < 0:
        return "-" + format_amount(-minor, currency)
    digits = str(minor)
    places = currency.decimals
    if places == 0:
        return digits
    if len(digits) <= places:
        digits = "0" * (places + 1 - len(digits)) + digits
    return f"{digits[:-places]}.{digits[-places:]}"


def _example(currency: Currency) -> str:
    return '"' + format_amount(10**currency.decimals, currency) + '"'
