"""The reply codes of the Lua scripts (lua/*.lua), one enum per script.

Each script's header lists its codes; these enums are their one definition in Python. They
live in :mod:`games` because the pure model of the wallet (:mod:`games.wallet_model`)
answers with them too, and :mod:`games` imports nothing above it.
"""

from __future__ import annotations

import enum

__all__ = ["BetCode", "DepositCode", "HealCode", "RotateCode"]


class BetCode(enum.IntEnum):
    """First element of each of bet-n.lua's per-bet replies."""

    SETTLED = 0
    REPLAY = 1
    CONFLICT = 2
    INSUFFICIENT_FUNDS = 3
    STALE = 4
    NO_SEED = 5
    EPOCH = 6
    REFUSED = 7
    OUTBOX_FULL = 8
    HEAL = 9


class DepositCode(enum.IntEnum):
    """First element of deposit-5.lua's reply."""

    CREDITED = 0
    REPLAY = 1
    CONFLICT = 2
    OUTBOX_FULL = 3
    HEAL = 4


class RotateCode(enum.IntEnum):
    """First element of rotate-3.lua's reply."""

    ROTATED = 0
    STALE = 4
    HEAL = 5


class HealCode(enum.IntEnum):
    """First element of heal-n.lua's reply."""

    ALREADY = 0
    HEALED = 1


#: commission-credit-n.lua's reply when the ancestor must be healed first (otherwise the
#: number of batches it credited).
CREDIT_HEAL = -1

