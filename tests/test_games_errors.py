"""The error tree and the commission split."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from games import errors
from games.commission import commission, split
from games.types import Minor, UserId

EXPECTED = {
    "BAD_MESSAGE": 400,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "INVALID_AMOUNT": 400,
    "INVALID_TARGET": 400,
    "UNKNOWN_CURRENCY": 400,
    "INSUFFICIENT_FUNDS": 409,
    "BET_LIMIT": 400,
    "INVALID_SEED": 400,
    "RATE_LIMITED": 429,
    "IDEMPOTENCY_CONFLICT": 409,
    "UNAVAILABLE": 503,
}


def test_one_class_per_code() -> None:
    assert {code: cls.http_status for code, cls in errors.ERRORS_BY_CODE.items()} == EXPECTED
    classes = errors.ERRORS_BY_CODE.values()
    assert len(set(classes)) == len(EXPECTED)
    for code, cls in errors.ERRORS_BY_CODE.items():
        assert issubclass(cls, errors.StakeProError)
        assert cls.code == code
        assert cls.__name__ in errors.__all__
        assert cls.__name__ in (errors.__doc__ or "")
        err = cls("some text")
        assert err.message == "some text"
        assert str(err) == "some text"


@given(st.integers(0, 10**22), st.integers(0, 10000))
def test_commission_is_floored_share(amount: int, bps: int) -> None:
    paid = commission(Minor(amount), bps)
    assert paid * 10000 <= amount * bps < (paid + 1) * 10000


@pytest.mark.parametrize("bps", [-1, 10001])
def test_commission_rate_out_of_range(bps: int) -> None:
    with pytest.raises(ValueError):
        commission(Minor(100), bps)


def test_split_keeps_order_and_zeros() -> None:
    chain = [(UserId(3), 50), (UserId(2), 0), (UserId(1), 30)]
    assert split(Minor(333), chain) == [(UserId(3), 1), (UserId(2), 0), (UserId(1), 0)]
    assert split(Minor(1999), chain) == [(UserId(3), 9), (UserId(2), 0), (UserId(1), 5)]
    assert split(Minor(100), []) == []
