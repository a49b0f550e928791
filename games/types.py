"""Domain types shared by every module of :mod:`games`.

Each ``NewType`` is an ``int`` at run time and a distinct type to mypy, so that a float (or
a count of hundredths passed where minor units belong) cannot slip into money unnoticed.
"""

from typing import Literal, NewType

__all__ = ["Direction", "Hundredths", "Minor", "MultiplierBp", "UserId"]

Minor = NewType("Minor", int)
"""An amount in integer minor units of its currency (cents of USDT, satoshis of BTC)."""

Hundredths = NewType("Hundredths", int)
"""A roll or a target times 100: ``37.21`` is ``Hundredths(3721)``, 0 ... 10000."""

MultiplierBp = NewType("MultiplierBp", int)
"""A payout multiplier times 10,000: ``1.9800`` is ``MultiplierBp(19800)``."""

UserId = NewType("UserId", int)
"""The id of a user (player or ancestor in the agent chain)."""

Direction = Literal["under", "over"]
"""Which side of the target wins."""
