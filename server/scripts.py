"""The Lua scripts of lua/, loaded once, and the return codes they share with Python.

Scripts are read from disk at import, identified by their SHA-1 and run with EVALSHA; a
NOSCRIPT reply (a restarted or failed-over Redis) loads them again and retries once. That
retry is safe: NOSCRIPT means the script did not run.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path

LUA_DIR = Path(__file__).resolve().parent.parent / "lua"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, filename: str) -> Script:
        source = (LUA_DIR / filename).read_text()
        return cls(filename, source, hashlib.sha1(source.encode()).hexdigest())


BET = Script.load("bet-n.lua")
DEPOSIT = Script.load("deposit-4.lua")
ROTATE = Script.load("rotate-2.lua")
COMMISSION_ACCRUE = Script.load("commission-accrue-2.lua")
COMMISSION_TAKE = Script.load("commission-take-3.lua")
COMMISSION_CREDIT = Script.load("commission-credit-n.lua")
COMMISSION_UNLOCK = Script.load("commission-unlock-1.lua")
ALL = (BET, DEPOSIT, ROTATE, COMMISSION_ACCRUE, COMMISSION_TAKE, COMMISSION_CREDIT,
       COMMISSION_UNLOCK)


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


class DepositCode(enum.IntEnum):
    CREDITED = 0
    REPLAY = 1
    CONFLICT = 2


class RotateCode(enum.IntEnum):
    ROTATED = 0
    STALE = 4


class AccrueCode(enum.IntEnum):
    """Reply of commission-accrue-2.lua."""

    DUPLICATE = 0
    ACCRUED = 1


class TakeCode(enum.IntEnum):
    """First element of commission-take-3.lua's reply."""

    EMPTY = 0
    TAKEN = 1
    BUSY = 2
