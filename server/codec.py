"""Frames on the wire: a text frame is one JSON object, a binary frame one msgpack map.

Decoding checks the frame's shape and the envelope (a map with a string ``type`` and a
valid ``id``); each message's fields are checked by the handler that reads them. A frame from
a stranger may decode to anything msgpack or JSON can express: maps keyed by numbers, lists
or maps (unhashable, so the decoder itself fails), extension types, nesting deep enough to
exhaust the C stack. Whatever fails to decode, or decodes to a shape no message has, is
:class:`BadMessage`, so a handler only ever sees string keys and plain values.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import msgpack

from games.errors import BadMessage

Encoding = Literal["json", "msgpack"]
ClientId = int | str | None

MAX_ID_CHARS = 64
_INT64 = 2**63
#: What an id may not contain: control characters (C0, DEL, C1) and lone surrogates (JSON's
#: "\ud800" decodes to one; it cannot be encoded as UTF-8, so it could reach neither Redis
#: nor PostgreSQL, nor a msgpack reply).
_BAD_ID_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: The deepest nesting a frame may have (a message is one level; none nests today, so this
#: only leaves room for additions while refusing frames built to be costly to walk).
MAX_DEPTH = 32
#: The values a frame may carry besides maps and lists (msgpack's ``bin`` decodes to bytes).
_PLAIN = frozenset((str, int, float, bool, type(None), bytes))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(data: str | bytes) -> dict[str, Any]:
    """Parse one frame into a map, or raise BadMessage."""
    try:
        if isinstance(data, str):
            message = json.loads(data, parse_constant=_reject_constant)
        else:
            message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except RecursionError:
        raise BadMessage("frame could not be decoded: nested too deeply") from None
    except Exception as exc:  # a stranger's bytes may fail in any way: all are BAD_MESSAGE
        raise BadMessage(f"frame could not be decoded: {type(exc).__name__}: {exc}") from None
    if not isinstance(message, dict):
        raise BadMessage("a message must be a map")
    _check_shape(message)
    return message


def _check_shape(message: dict[Any, Any]) -> None:
    """Raise BadMessage unless every map key is a string, every value plain, a map or a
    list, and nothing nests deeper than :data:`MAX_DEPTH`. The top level (all there is in
    every message today) is one pass over its items; nesting is walked without recursion,
    so a frame cannot make it recurse."""
    nested: list[tuple[Any, int]] = []
    for key, value in message.items():
        if type(key) is not str:
            raise BadMessage(f"map keys must be strings, not {type(key).__name__}")
        kind = type(value)
        if kind not in _PLAIN:
            if kind is not dict and kind is not list:
                raise BadMessage(f"{kind.__name__} values are not part of the protocol")
            nested.append((value, 2))
    while nested:
        container, depth = nested.pop()
        if depth > MAX_DEPTH:
            raise BadMessage(f"a message may nest at most {MAX_DEPTH} levels")
        if type(container) is dict:
            for key in container:
                if type(key) is not str:
                    raise BadMessage(f"map keys must be strings, not {type(key).__name__}")
            container = container.values()
        for value in container:
            kind = type(value)
            if kind is dict or kind is list:
                nested.append((value, depth + 1))
            elif kind not in _PLAIN:
                raise BadMessage(f"{kind.__name__} values are not part of the protocol")


def client_id(message: dict[str, Any]) -> ClientId:
    """The request id, validated: a string of 1 to 64 characters (no control character or
    lone surrogate) or an int64."""
    value = message.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadMessage("id must be a string of at most 64 characters or an integer")
    if isinstance(value, str):
        if not 0 < len(value) <= MAX_ID_CHARS:
            raise BadMessage("id must be a string of 1 to 64 characters or an integer")
        if _BAD_ID_CHAR.search(value) is not None:
            raise BadMessage("id must not contain control characters or lone surrogates")
    if isinstance(value, int) and not -_INT64 <= value < _INT64:
        raise BadMessage("integer ids must fit in 64 bits")
    return value


def message_type(message: dict[str, Any]) -> str:
    kind = message.get("type")
    if not isinstance(kind, str):
        raise BadMessage("a message needs a string field 'type'")
    return kind


#: One Packer per process (msgpack.packb builds one per call); frames are encoded on the
#: event loop's thread only.
_pack = msgpack.Packer().pack


def encode(message: dict[str, Any], encoding: Encoding) -> str | bytes:
    if encoding == "json":
        return json.dumps(message, separators=(",", ":"))
    return _pack(message)


def error(code: str, message: str, request_id: ClientId) -> dict[str, Any]:
    return {"type": "error", "id": request_id, "code": code, "message": message}
