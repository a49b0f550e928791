"""BetChecker (the memo the bet path validates with) agrees with validate_bet exactly."""

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from games.bets import BetChecker, fingerprint, validate_bet
from games.dice import format_hundredths, format_multiplier
from games.errors import StakeProError
from games.money import DEFAULT_CURRENCIES, format_amount

_text = st.one_of(
    st.sampled_from(["USDT", "BTC", "EUR", "1.00", "0.01", "50.00", "49.5", "under", "over",
                     "0", "1.000", "100000000", "98.00", "1.9", "-1", "", " 1"]),
    st.from_regex(r"[0-9]{1,4}(\.[0-9]{0,3})?", fullmatch=True),
)
_field = st.one_of(_text, st.integers(-3, 3), st.none(), st.booleans(),
                   st.lists(st.integers(), max_size=2))


def _outcome(call: Any) -> Any:
    try:
        return call()
    except StakeProError as exc:
        return (type(exc), exc.code, exc.message)


@settings(max_examples=400)
@given(st.lists(st.tuples(_field, _field, _field, _field), min_size=1, max_size=30),
       st.integers(1, 8), st.sampled_from([0, 100, 250]))
def test_checker_agrees_with_validate_bet(
    requests: list[tuple[Any, Any, Any, Any]], size: int, edge: int
) -> None:
    checker = BetChecker(DEFAULT_CURRENCIES, edge, size=size)
    for request in requests * 2:  # the second pass hits the memo
        want = _outcome(lambda r=request: validate_bet(*r, DEFAULT_CURRENCIES, edge))
        got = _outcome(lambda r=request: checker.check(*r))
        if isinstance(want, tuple):
            assert got == want
            continue
        assert got.spec == want
        assert got.fingerprint == fingerprint(want)
        assert got.amount_text == format_amount(want.amount, want.currency)
        assert got.target_text == format_hundredths(want.target)
        assert got.multiplier_text == format_multiplier(want.multiplier)


def test_memo_is_bounded_and_keyed_by_exact_strings() -> None:
    checker = BetChecker(DEFAULT_CURRENCIES, 100, size=3)
    first = checker.check("USDT", "1.00", "50.00", "under")
    assert checker.check("USDT", "1.00", "50.00", "under") is first
    assert checker.check("USDT", "1.0", "50.00", "under").spec == first.spec  # same bet,
    for amount in ("2.00", "3.00", "4.00"):  # other text: its own entry; the memo empties
        checker.check("USDT", amount, "50.00", "under")
    assert len(checker._memo) <= 3
    assert checker.check("USDT", "1.00", "50.00", "under") is not first


@given(st.integers(-(10**30), 10**30), st.integers(0, 18))
def test_format_amount_is_the_exact_decimal(minor: int, places: int) -> None:
    from decimal import Decimal, localcontext

    from games.money import Currency

    text = format_amount(minor, Currency("X", places, 1, 10, 10))
    with localcontext() as context:
        context.prec = 100  # exact for these sizes
        assert Decimal(text) * 10**places == minor
    assert len(text.partition(".")[2]) == places
    assert not text.lstrip("-").startswith("0") or text.lstrip("-").partition(".")[0] == "0"
