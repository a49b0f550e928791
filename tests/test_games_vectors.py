"""Known answers from shared/vectors/dice.json, computed independently of this project.

Read through tests/vectors (``$STAKEPRO_VECTORS``, else ``../shared/vectors/dice.json``, else
the copy kept in tests/vectors/); they are never skipped.
"""

import hashlib
from typing import Any

import pytest

from games.bets import settle, validate_bet
from games.commission import commission, split
from games.dice import format_hundredths, format_multiplier, hmac_hex, roll, roll_from_hmac
from games.money import DEFAULT_CURRENCIES, format_amount, parse_amount
from games.seeds import server_seed_hash
from games.types import Hundredths, UserId
from tests import vectors as known_answers


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return known_answers.load()


def test_the_kept_copy_of_the_vectors_is_the_contracts() -> None:
    kept = known_answers.KEPT.read_bytes()
    assert hashlib.sha256(kept).hexdigest() == known_answers.KEPT_SHA256
    if known_answers.CONTRACT.is_file():  # beside the repository: the same file
        assert known_answers.CONTRACT.read_bytes() == kept


def test_rolls(vectors: dict[str, Any]) -> None:
    rows = vectors["rolls"]
    assert rows
    for row in rows:
        where = f"nonce {row['nonce']}"
        h = hmac_hex(row["server_seed"], row["client_seed"], row["nonce"])
        assert h == row["hmac"], where
        value, windows = roll_from_hmac(h)
        assert windows == row["windows_tried"], where
        assert format_hundredths(value) == row["roll"], where
        assert roll(row["server_seed"], row["client_seed"], row["nonce"]) == value, where
    # the vectors include the rejection path, not only first-window rolls
    assert any(len(row["windows_tried"]) > 1 for row in rows)


def test_server_seed_hash(vectors: dict[str, Any]) -> None:
    seeds = {row["server_seed"] for row in vectors["rolls"]}
    assert {server_seed_hash(seed) for seed in seeds} == {vectors["server_seed_hash"]}


def test_payouts(vectors: dict[str, Any]) -> None:
    rows = vectors["payouts"]
    assert rows
    for row in rows:
        where = f"{row['direction']} {row['target']}"
        spec = validate_bet(
            row["currency"], row["amount"], row["target"], row["direction"], DEFAULT_CURRENCIES
        )
        assert spec.winning == row["winning_outcomes"], where
        assert format_multiplier(spec.multiplier) == row["multiplier"], where
        winning_roll = Hundredths(0 if spec.direction == "under" else 10000)
        outcome = settle(spec, winning_roll)
        assert outcome.win, where
        assert format_amount(outcome.payout, spec.currency) == row["payout_if_win"], where
        assert outcome.payout == spec.payout_if_win, where


def test_commissions(vectors: dict[str, Any]) -> None:
    rows = vectors["commissions"]
    assert rows
    usdt = DEFAULT_CURRENCIES["USDT"]
    for row in rows:
        amount = parse_amount(row["amount"], usdt)
        paid = commission(amount, row["commission_bps"])
        assert format_amount(paid, usdt) == row["paid"], row
        assert split(amount, [(UserId(7), row["commission_bps"])]) == [(UserId(7), paid)]
