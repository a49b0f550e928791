"""Commissions up the agent chain (PROTOCOL.md, "Commissions").

Every settled bet pays each ancestor of the player ``floor(amount * bps / 10000)`` minor
units of the bet's currency, where ``bps`` is that ancestor's own rate. Each ancestor's
share is floored on its own (not a share of a floored total), so the split is exactly what
each ancestor would compute for itself, and the house keeps every remainder.
"""

from collections.abc import Sequence

from games.types import Minor, UserId

__all__ = ["MAX_BPS", "check_bps", "commission", "split"]

MAX_BPS = 10000


def check_bps(bps: int) -> int:
    """``bps`` itself when it is a commission rate (``0 ... 10000``).

    Raises:
        ValueError: it is not.
    """
    if not 0 <= bps <= MAX_BPS:
        raise ValueError("commission_bps must be within 0 ... 10000")
    return bps


def commission(amount: Minor, bps: int) -> Minor:
    """``floor(amount * bps / 10000)`` in minor units.

    Raises:
        ValueError: ``bps`` is outside ``0 ... 10000`` or ``amount`` is negative.
    """
    check_bps(bps)
    if amount < 0:
        raise ValueError("amount must not be negative")
    return Minor(amount * bps // MAX_BPS)


def split(amount: Minor, chain: Sequence[tuple[UserId, int]]) -> list[tuple[UserId, Minor]]:
    """What each ancestor earns on a stake of ``amount``.

    Args:
        amount: the stake in minor units.
        chain: ``(ancestor id, commission_bps)`` from the nearest ancestor up.

    Returns:
        One ``(ancestor id, commission)`` per ancestor in the same order, zeros included (so
        a worker can record every (bet, ancestor) pair as paid, even a zero).
    """
    return [(user_id, commission(amount, bps)) for user_id, bps in chain]

