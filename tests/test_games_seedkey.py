"""games.dice.SeedKey: the per-pair prepared HMAC equals the plain one, always."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from games import dice


@given(
    server_seed=st.text(min_size=0, max_size=200),
    client_seed=st.text(max_size=80),
    nonce=st.integers(0, 2**63),
)
def test_seed_key_matches_hmac(server_seed: str, client_seed: str, nonce: int) -> None:
    key = dice.SeedKey(server_seed)
    assert key.hmac_hex(client_seed, nonce) == dice.hmac_hex(server_seed, client_seed, nonce)
    assert key.roll(client_seed, nonce) == dice.roll(server_seed, client_seed, nonce)


def test_seed_key_on_a_rejected_first_window() -> None:
    # From ../shared/vectors/dice.json: nonce 60559 rejects two windows, roll 2.03.
    seed = "86832a47cf91b293d1df743c12c4be5c0002fd2684fe7a25d549882750aacf40"
    assert dice.SeedKey(seed).roll("player-chosen-seed", 60559) == 203
