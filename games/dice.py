"""The provably fair dice roll, the multiplier and the payout (PROTOCOL.md, "Dice rules").

The roll
========

For each bet the server computes::

    h = HMAC_SHA256(key = server_seed (UTF-8), message = f"{client_seed}:{nonce}")

as 64 lowercase hex characters. The server committed to ``server_seed`` in advance by
publishing ``SHA256(server_seed)``; the player chose ``client_seed``; the nonce counts the
bets of the seed pair. Neither side alone can steer ``h``, and once the server seed is
revealed anyone can recompute every roll (:mod:`games.verify`).

There are 10,001 outcomes, ``0.00`` to ``100.00`` in steps of ``0.01``, held here as
:data:`~games.types.Hundredths` ``0 ... 10000``. To turn ``h`` into one of them we cut it into
5-character windows, each an integer ``v`` uniform on ``[0, 16**5) = [0, 1048576)``.

Why ``v mod 10001`` alone is biased
-----------------------------------

The seed document's recipe is ``int(h[:5], 16) % 10001``. But 16**5 is not a multiple of
10,001::

    1048576 = 104 * 10001 + 8472

so as ``v`` runs over its 1,048,576 values the residues ``0 ... 8471`` are hit 105 times and
the residues ``8472 ... 10000`` only 104 times: the rolls 0.00 to 84.71 come up
105/104 - 1 ~ 0.96 % more often than 84.72 to 100.00. A player betting "under" gets a
slightly better game than the house edge says.

Why the rejection removes it
----------------------------

Accept a window only when ``v < ACCEPT_BELOW = 104 * 10001 = 1040104``. The accepted range is
exactly 104 whole cycles of the residues, so given acceptance every residue has exactly 104
pre-images: ``v mod 10001`` is uniform on the 10,001 outcomes. A rejected window
(``v >= 1040104``, probability ``q = 8472 / 1048576 ~ 0.81 %``) is thrown away and the next
5 characters are tried. The windows of an HMAC are independent uniform values, so the first
accepted one is uniform too, whatever happened before it.

Twelve windows use 60 of the 64 characters. All twelve fail with probability
``q**12 < 1e-25``; then (and only then) the last window's ``v mod 10001`` is used, so the
function is total. That fall-back keeps a bias of the order of 1e-25 on the distribution,
far below anything observable.

Compatibility: when the first window is accepted (probability ``1 - q ~ 99.19 %``) the roll
equals the seed document's recipe exactly.

The multiplier and the payout
=============================

A bet wins on ``W`` of the 10,001 equally likely outcomes (``under T``: rolls ``< T``, so
``W = T``; ``over T``: rolls ``> T``, so ``W = 10000 - T``; both in hundredths). The fair
multiplier is ``10001 / W``; the house keeps ``house_edge``, so::

    multiplier = floor((1 - house_edge) * 10001 / W, 4 decimals)
               = floor((10000 - house_edge_bp) * 10001 / W) / 10000

computed in integers (:data:`~games.types.MultiplierBp`, units of 1e-4). Both floors (the
multiplier to 4 decimals, the payout to a minor unit) round in the house's favour, so the
expected return ``W / 10001 * multiplier`` never exceeds ``1 - house_edge``.
"""

import hashlib
import hmac
import re

from games.errors import BadMessage, InvalidTarget
from games.types import Direction, Hundredths, Minor, MultiplierBp

__all__ = [
    "ACCEPT_BELOW",
    "MAX_WINNING",
    "OUTCOMES",
    "WINDOWS",
    "WINDOW_CHARS",
    "format_hundredths",
    "format_multiplier",
    "hmac_hex",
    "is_win",
    "multiplier_bp",
    "parse_direction",
    "parse_target",
    "payout",
    "roll",
    "roll_from_hmac",
    "winning_outcomes",
]

WINDOW_CHARS = 5
"""Hex characters per window: ``v`` is uniform on ``[0, 16**5)``."""

WINDOWS = 12
"""Windows tried at most (60 of the 64 hex characters)."""

OUTCOMES = 10001
"""Outcomes ``0.00 ... 100.00``."""

ACCEPT_BELOW = 1040104
"""``104 * OUTCOMES``: the largest multiple of 10,001 not above ``16**5``."""

MAX_WINNING = 9800
"""A bet may win on 1 to 9,800 outcomes (win chance 0.01 % to 98 %)."""

_BP = 10000  # basis points in one; also hundredths in 100.00 and 1e-4 units in 1.0

assert ACCEPT_BELOW == (16**WINDOW_CHARS // OUTCOMES) * OUTCOMES

_HMAC_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_TARGET_RE = re.compile(r"([0-9]{1,3})(?:\.([0-9]{1,2}))?", re.ASCII)


def hmac_hex(server_seed: str, client_seed: str, nonce: int) -> str:
    """``HMAC_SHA256(key=server_seed, msg=f"{client_seed}:{nonce}")`` as 64 lowercase hex."""
    if nonce < 0:
        raise ValueError("nonce must be non-negative")
    message = f"{client_seed}:{nonce}".encode()
    return hmac.digest(server_seed.encode(), message, "sha256").hex()


def roll_from_hmac(h: str) -> tuple[Hundredths, list[str]]:
    """Turn an HMAC into a roll by rejection sampling over 5-character windows.

    Args:
        h: 64 lowercase hex characters, as returned by :func:`hmac_hex`.

    Returns:
        The roll in hundredths, and the windows tried in order (the last one is the one the
        roll came from; one window for ~99.19 % of HMACs).

    Raises:
        ValueError: ``h`` is not 64 lowercase hex characters.
    """
    if _HMAC_RE.fullmatch(h) is None:
        raise ValueError("an HMAC is 64 lowercase hex characters")
    tried: list[str] = []
    v = 0
    for i in range(0, WINDOWS * WINDOW_CHARS, WINDOW_CHARS):
        window = h[i : i + WINDOW_CHARS]
        tried.append(window)
        v = int(window, 16)
        if v < ACCEPT_BELOW:
            break
    # Either v was accepted (uniform), or all 12 windows failed (p < 1e-25) and the last
    # window's value is used as it is.
    return Hundredths(v % OUTCOMES), tried


def roll(server_seed: str, client_seed: str, nonce: int) -> Hundredths:
    """The roll of one bet, in hundredths (0 ... 10000)."""
    return roll_from_hmac(hmac_hex(server_seed, client_seed, nonce))[0]


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_BLOCK = 64  # SHA-256's block size in bytes


class SeedKey:
    """A server seed prepared for many HMACs of one seed pair.

    HMAC (RFC 2104) hashes ``key XOR ipad`` and ``key XOR opad`` before the message; those
    two SHA-256 states depend only on the server seed, so they are computed once per pair
    and copied per bet. :meth:`hmac_hex` equals :func:`hmac_hex` for every input (a
    property test holds them together); this is only the faster way to the same bytes.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, server_seed: str) -> None:
        key = server_seed.encode()
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def hmac_hex(self, client_seed: str, nonce: int) -> str:
        if nonce < 0:
            raise ValueError("nonce must be non-negative")
        inner = self._inner.copy()
        inner.update(f"{client_seed}:{nonce}".encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    def roll(self, client_seed: str, nonce: int) -> Hundredths:
        """Same as :func:`roll`; the first window is accepted 99.19 % of the time."""
        h = self.hmac_hex(client_seed, nonce)
        v = int(h[:WINDOW_CHARS], 16)
        if v < ACCEPT_BELOW:
            return Hundredths(v % OUTCOMES)
        return roll_from_hmac(h)[0]


def parse_target(value: object) -> Hundredths:
    """Parse a target decimal string with at most 2 decimals (``"49.5"``, ``"49.50"``).

    Only the format is checked here; whether the bet may be placed at that target depends
    on the direction (:func:`winning_outcomes`).

    Raises:
        BadMessage: ``value`` is not a string.
        InvalidTarget: not ``^[0-9]{1,3}(\\.[0-9]{1,2})?$``.
    """
    if not isinstance(value, str):
        raise BadMessage("target must be a decimal string")
    match = _TARGET_RE.fullmatch(value)
    if match is None:
        raise InvalidTarget('target must be a decimal string with at most 2 decimals, like "49.50"')
    whole, fraction = match.group(1), match.group(2) or ""
    return Hundredths(int(whole) * 100 + int(fraction.ljust(2, "0")))


def parse_direction(value: object) -> Direction:
    """``"under"`` or ``"over"``; anything else is :class:`BadMessage` (PROTOCOL.md)."""
    if isinstance(value, str):
        if value == "under":
            return "under"
        if value == "over":
            return "over"
    raise BadMessage('direction must be "under" or "over"')


def winning_outcomes(target: Hundredths, direction: Direction) -> int:
    """How many of the 10,001 outcomes win: ``T`` for under, ``10000 - T`` for over.

    Raises:
        InvalidTarget: the count is outside ``1 ... 9800`` (win chance 0.01 % to 98 %).
    """
    winning = target if direction == "under" else _BP - target
    if not 1 <= winning <= MAX_WINNING:
        raise InvalidTarget(
            f"target {format_hundredths(target)} {direction} must win on 1 to "
            f"{MAX_WINNING} of the {OUTCOMES} outcomes (win chance 0.01 % to 98 %)"
        )
    return winning


def multiplier_bp(winning: int, house_edge_bp: int = 100) -> MultiplierBp:
    """``floor((1 - edge) * 10001 / W)`` to 4 decimals, in units of 1e-4, integers only.

    It satisfies ``m * W <= (10000 - edge_bp) * 10001 < (m + 1) * W``.

    Raises:
        ValueError: ``winning`` is outside ``1 ... 10001`` or the edge outside ``0 ... 9999``.
    """
    if not 1 <= winning <= OUTCOMES:
        raise ValueError("winning outcomes must be within 1 ... 10001")
    if not 0 <= house_edge_bp < _BP:
        raise ValueError("house edge must be within 0 ... 9999 basis points")
    return MultiplierBp((_BP - house_edge_bp) * OUTCOMES // winning)


def is_win(roll: Hundredths, target: Hundredths, direction: Direction) -> bool:
    """``under`` wins when ``roll < target``, ``over`` when ``roll > target``."""
    return roll < target if direction == "under" else roll > target


def payout(amount: Minor, mult: MultiplierBp) -> Minor:
    """``floor(amount * multiplier)`` in minor units (the payout of a winning bet)."""
    return Minor(amount * mult // _BP)


def format_hundredths(h: int) -> str:
    """3721 -> ``"37.21"``, 0 -> ``"0.00"``, 10000 -> ``"100.00"``."""
    sign = "-" if h < 0 else ""
    whole, fraction = divmod(abs(h), 100)
    return f"{sign}{whole}.{fraction:02d}"


def format_multiplier(m: int) -> str:
    """19800 -> ``"1.9800"``."""
    sign = "-" if m < 0 else ""
    whole, fraction = divmod(abs(m), _BP)
    return f"{sign}{whole}.{fraction:04d}"
