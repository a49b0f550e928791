"""The outbox events: their one definition, encoded by the server, decoded by the workers.

The money scripts append one entry per settled bet, credited deposit and revealed seed
pair to the bucket's outbox stream (docs/architecture.md). An entry's fields:

- ``k``: the kind, ``bet``, ``deposit`` or ``reveal``;
- ``e`` (bet, deposit): the event blob the server prepared, msgpack. A bet's is the list of
  :data:`BET_FIELDS` in that order (:func:`encode_bet`; a map with those keys, and a list
  or map without the last field, ``client_id``, are read too: docs/decisions.md, "Formats
  still read"), a deposit's the map :func:`encode_deposit` writes. Integers in a blob are
  msgpack integers, strings msgpack strings;
- ``b`` (bet, deposit): the balance after, written by the script (decimal digits);
- ``pid``, ``n``, ``ts`` (reveal): written by rotate-2.lua (decimal digits).

:func:`parse` decodes any entry and explains what is wrong with a bad one
(:class:`Malformed`); :func:`bet_row` is the persister's fast path for bets and accepts
exactly what :func:`parse` accepts, with the same values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

_I64 = (-(2**63), 2**63 - 1)
_I32 = (-(2**31), 2**31 - 1)
_DIRECTIONS = frozenset(("under", "over"))


class Malformed(ValueError):
    """An outbox entry that cannot be turned into rows."""


@dataclass(frozen=True, slots=True)
class SettledBet:
    """What a settled bet is, wherever it is read from: the outbox event that carries it
    (:class:`BetEvent`) or its stored row (the audit's ``StoredBet``)."""

    bet_id: str
    user_id: int
    pair_id: int
    currency: str
    amount: int
    payout: int
    roll: int
    target: int
    direction: str
    nonce: int
    multiplier: int
    server_seed_hash: str
    client_seed: str


@dataclass(frozen=True, slots=True)
class BetEvent(SettledBet):
    ts: int
    balance_after: int
    #: The player's id of the bet (:func:`client_ref`), None in events written before it
    #: travelled with the bet.
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class DepositEvent:
    key: str
    user_id: int
    currency: str
    amount: int
    ts: int
    balance_after: int


@dataclass(frozen=True, slots=True)
class RevealEvent:
    pair_id: int
    final_nonce: int
    ts: int


Event = BetEvent | DepositEvent | RevealEvent

#: The fields of a bet event's blob, in the order of its list. ``client_id`` is last so
#: that a blob without it (written before it existed) is the same list one shorter.
BET_FIELDS = ("bet_id", "user_id", "pair_id", "currency", "amount", "payout", "roll", "target",
              "direction", "nonce", "multiplier", "server_seed_hash", "client_seed", "ts",
              "client_id")
_OLD_BET_FIELDS = len(BET_FIELDS) - 1

#: The columns of one bet's row (:data:`BetRow`): the event's fields up to the client seed,
#: the balance after, the time, and the client's id of the bet.
BET_COLUMNS = (*BET_FIELDS[:13], "balance_after", "ts", "client_id")

#: One bet as the persister writes it: the values of :data:`BET_COLUMNS` in order.
BetRow = tuple[str, int, int, str, int, int, int, int, str, int, int, str, str, int, int,
               str | None]

#: Longest :func:`client_ref`: a tag, a colon, and an id of at most 64 characters (the
#: protocol's limit) or a 64-bit integer.
CLIENT_REF_MAX = 2 + 64


def client_ref(client_id: int | str) -> str:
    """The player's bet id as one string that keeps its type: ``1`` and ``"1"`` are
    different ids (PROTOCOL.md), ``i:1`` and ``s:1`` here. The same text ends the bet's
    idempotency key (:func:`plumbing.keys.bet_idem_key`), and PostgreSQL stores it with the
    bet (``bets.client_id``), so a record Redis lost can be rebuilt from the row."""
    return f"{'i' if isinstance(client_id, int) else 's'}:{client_id}"

#: One Packer for the process (msgpack.packb builds a Packer per call); the event loop is
#: the only thread that packs bets.
_pack = msgpack.Packer().pack


# -- encoding (the server) -------------------------------------------------------------------


def encode_bet(bet_id: str, user_id: int, pair_id: int, currency: str, amount: int,
               payout: int, roll: int, target: int, direction: str, nonce: int,
               multiplier: int, server_seed_hash: str, client_seed: str, ts: int,
               client_id: str | None = None) -> bytes:
    """A bet event's blob: the list of :data:`BET_FIELDS` (no keys: smaller, faster).
    ``client_id`` is :func:`client_ref` of the player's id of the bet."""
    return _pack([bet_id, user_id, pair_id, currency, amount, payout, roll, target, direction,
                  nonce, multiplier, server_seed_hash, client_seed, ts, client_id])


def encode_deposit(key: str, user_id: int, currency: str, amount: int, ts: int) -> bytes:
    """A deposit event's blob: a map."""
    return msgpack.packb(
        {"key": key, "user_id": user_id, "currency": currency, "amount": amount, "ts": ts}
    )


def unpack_bet(blob: bytes) -> dict[str, Any]:
    """The fields of a blob :func:`encode_bet` wrote, by name (a replay answers from them).

    Raises:
        Malformed: not such a blob.
    """
    try:
        event = msgpack.unpackb(blob, raw=False)
    except Exception as exc:
        raise Malformed(f"event blob is not msgpack: {exc}") from exc
    if not isinstance(event, list) or len(event) not in (len(BET_FIELDS), _OLD_BET_FIELDS):
        raise Malformed("not a bet event blob")
    if len(event) == _OLD_BET_FIELDS:
        event = [*event, None]
    return dict(zip(BET_FIELDS, event, strict=True))


# -- decoding (the workers, the audit) -------------------------------------------------------


def _int(value: Any, name: str, bounds: tuple[int, int] = _I64) -> int:
    """An integer of a blob: a msgpack integer, never a string or a boolean."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Malformed(f"{name} is not an integer: {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise Malformed(f"{name} out of range: {value}")
    return value


def _field(value: Any, name: str) -> int:
    """A number a script wrote as an entry field: decimal digits, never negative."""
    if isinstance(value, bytes) and value.isdigit():
        number = int(value)
        if number <= _I64[1]:
            return number
        raise Malformed(f"{name} out of range: {number}")
    raise Malformed(f"{name} is not a non-negative integer: {value!r}")


def _str(value: Any, name: str) -> str:
    """A string of a blob: a msgpack string (not binary), not empty."""
    if not isinstance(value, str) or not value:
        raise Malformed(f"{name} is not a non-empty string: {value!r}")
    return value


def _client_ref(value: Any) -> str | None:
    """A bet's client id in a blob: absent (None), or a :func:`client_ref` string."""
    if value is None:
        return None
    if not isinstance(value, str) or not 2 < len(value) <= CLIENT_REF_MAX \
            or value[:2] not in ("i:", "s:"):
        raise Malformed(f"client_id is not a client reference: {value!r}")
    return value


def _blob(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    raw = fields.get(b"e")
    if raw is None:
        raise Malformed("no event blob")
    try:
        event = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise Malformed(f"event blob is not msgpack: {exc}") from exc
    if isinstance(event, list) and fields.get(b"k") == b"bet" and len(event) in (
            len(BET_FIELDS), _OLD_BET_FIELDS):
        return dict(zip(BET_FIELDS, event, strict=False))
    if not isinstance(event, dict):
        raise Malformed("event blob is not a map")
    return event


def _get(event: Mapping[str, Any], name: str) -> Any:
    try:
        return event[name]
    except KeyError:
        raise Malformed(f"missing {name}") from None


def parse(fields: Mapping[bytes, bytes]) -> Event:
    """Turn one entry's fields into an event; raises :class:`Malformed`."""
    kind = fields.get(b"k")
    if kind == b"bet":
        e = _blob(fields)
        bet = BetEvent(
            bet_id=_str(_get(e, "bet_id"), "bet_id"),
            user_id=_int(_get(e, "user_id"), "user_id"),
            pair_id=_int(_get(e, "pair_id"), "pair_id"),
            currency=_str(_get(e, "currency"), "currency"),
            amount=_int(_get(e, "amount"), "amount"),
            payout=_int(_get(e, "payout"), "payout"),
            roll=_int(_get(e, "roll"), "roll", _I32),
            target=_int(_get(e, "target"), "target", _I32),
            direction=_str(_get(e, "direction"), "direction"),
            nonce=_int(_get(e, "nonce"), "nonce"),
            multiplier=_int(_get(e, "multiplier"), "multiplier", _I32),
            server_seed_hash=_str(_get(e, "server_seed_hash"), "server_seed_hash"),
            client_seed=_str(_get(e, "client_seed"), "client_seed"),
            ts=_int(_get(e, "ts"), "ts"),
            balance_after=_field(fields.get(b"b"), "b"),
            client_id=_client_ref(e.get("client_id")),
        )
        if bet.amount <= 0 or bet.payout < 0:
            raise Malformed(f"bet amounts out of range: {bet.amount} -> {bet.payout}")
        if bet.direction not in _DIRECTIONS:
            raise Malformed(f"bad direction {bet.direction!r}")
        return bet
    if kind == b"deposit":
        e = _blob(fields)
        dep = DepositEvent(
            key=_str(_get(e, "key"), "key"),
            user_id=_int(_get(e, "user_id"), "user_id"),
            currency=_str(_get(e, "currency"), "currency"),
            amount=_int(_get(e, "amount"), "amount"),
            ts=_int(_get(e, "ts"), "ts"),
            balance_after=_field(fields.get(b"b"), "b"),
        )
        if dep.amount <= 0:
            raise Malformed(f"deposit amount out of range: {dep.amount}")
        return dep
    if kind == b"reveal":
        return RevealEvent(
            pair_id=_field(fields.get(b"pid"), "pid"),
            final_nonce=_field(fields.get(b"n"), "n"),
            ts=_field(fields.get(b"ts"), "ts"),
        )
    raise Malformed(f"unknown kind {kind!r}")


def row_of(e: BetEvent) -> BetRow:
    """The bet's row, in :data:`BET_COLUMNS` order."""
    return (e.bet_id, e.user_id, e.pair_id, e.currency, e.amount, e.payout, e.roll, e.target,
            e.direction, e.nonce, e.multiplier, e.server_seed_hash, e.client_seed,
            e.balance_after, e.ts, e.client_id)


_unpackb = msgpack.unpackb


def bet_row(fields: Mapping[bytes, bytes]) -> BetRow:
    """A bet entry's row; raises :class:`Malformed` exactly when :func:`parse` does.

    The hot path of the persister: the blob is unpacked and its values checked in a few type
    tests; anything unusual (a missing field, a value out of range, a wrong type) goes
    through :func:`parse`, which accepts or explains it.
    """
    try:
        e = _unpackb(fields[b"e"])
        if type(e) is dict:
            bet_id = e["bet_id"]
            user_id = e["user_id"]
            pair_id = e["pair_id"]
            currency = e["currency"]
            amount = e["amount"]
            payout = e["payout"]
            roll = e["roll"]
            target = e["target"]
            direction = e["direction"]
            nonce = e["nonce"]
            multiplier = e["multiplier"]
            server_seed_hash = e["server_seed_hash"]
            client_seed = e["client_seed"]
            ts = e["ts"]
            client_id = e.get("client_id")
        else:
            (bet_id, user_id, pair_id, currency, amount, payout, roll, target, direction,
             nonce, multiplier, server_seed_hash, client_seed, ts, client_id) = e
        balance = fields[b"b"]
        if (
            type(bet_id) is str and type(currency) is str and type(server_seed_hash) is str
            and type(client_seed) is str and bet_id and currency and server_seed_hash
            and client_seed and direction in _DIRECTIONS
            and type(user_id) is int and type(pair_id) is int and type(amount) is int
            and type(payout) is int and type(roll) is int and type(target) is int
            and type(nonce) is int and type(multiplier) is int and type(ts) is int
            and type(balance) is bytes and balance.isdigit()
            and 0 < amount <= _I64[1] and 0 <= payout <= _I64[1]
            and _I64[0] <= min(user_id, pair_id, nonce, ts)
            and max(user_id, pair_id, nonce, ts) <= _I64[1]
            and _I32[0] <= min(roll, target, multiplier)
            and max(roll, target, multiplier) <= _I32[1]
            and (client_id is None or (type(client_id) is str
                                       and 2 < len(client_id) <= CLIENT_REF_MAX
                                       and client_id[:2] in ("i:", "s:")))
        ):
            balance_after = int(balance)
            if balance_after <= _I64[1]:
                return (bet_id, user_id, pair_id, currency, amount, payout, roll, target,
                        direction, nonce, multiplier, server_seed_hash, client_seed,
                        balance_after, ts, client_id)
    except Exception:
        pass
    event = parse(fields)
    if not isinstance(event, BetEvent):
        raise Malformed(f"not a bet: {fields.get(b'k')!r}")
    return row_of(event)
