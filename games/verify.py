"""Recompute a roll step by step, so a player can check it without trusting the server.

Usage::

    python -m games.verify --server-seed S --client-seed C --nonce N

It prints the HMAC message, the HMAC, the server seed's hash (compare it with the
``server_seed_hash`` shown before the bets), every 5-character window tried with its
value, and the roll. It uses the same functions the server does.
"""

import argparse
import sys

from games.dice import (
    ACCEPT_BELOW,
    OUTCOMES,
    WINDOW_CHARS,
    WINDOWS,
    format_hundredths,
    hmac_hex,
    roll_from_hmac,
)
from games.seeds import server_seed_hash

__all__ = ["main"]


def _non_negative(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a decimal integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a nonce is never negative")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m games.verify",
        description="Recompute a StakePro dice roll from its seeds and nonce.",
    )
    parser.add_argument("--server-seed", required=True, help="the revealed server seed")
    parser.add_argument("--client-seed", required=True, help="your client seed")
    parser.add_argument("--nonce", required=True, type=_non_negative, help="the bet's nonce")
    args = parser.parse_args(argv)
    server_seed: str = args.server_seed
    client_seed: str = args.client_seed
    nonce: int = args.nonce

    h = hmac_hex(server_seed, client_seed, nonce)
    roll, windows = roll_from_hmac(h)
    print(f"server seed hash = SHA256(server_seed) = {server_seed_hash(server_seed)}")
    print(f'message          = client_seed ":" nonce = "{client_seed}:{nonce}"')
    print(f"hmac             = HMAC_SHA256(key=server_seed, message) = {h}")
    print(
        f"windows          = {WINDOW_CHARS} hex characters at a time, accepted when "
        f"v < {ACCEPT_BELOW} (= 104 x {OUTCOMES}), at most {WINDOWS}"
    )
    v = 0
    for index, window in enumerate(windows):
        start = index * WINDOW_CHARS
        v = int(window, 16)
        verdict = "accepted" if v < ACCEPT_BELOW else f"rejected (>= {ACCEPT_BELOW})"
        print(
            f"  window {index + 1:2d}: hmac[{start}:{start + WINDOW_CHARS}] = {window}"
            f" = {v} {verdict}"
        )
    if v >= ACCEPT_BELOW:
        print(f"  all {WINDOWS} windows rejected: the last window's value is used as it is")
    print(
        f"roll             = (v mod {OUTCOMES}) / 100 = ({v} mod {OUTCOMES}) / 100"
        f" = {roll} / 100 = {format_hundredths(roll)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
