"""Frames on the wire: a text frame is one JSON object, a binary frame one msgpack map.

Decoding checks only the envelope (a map with a string ``type`` and a valid ``id``); each
message's fields are checked by the handler that reads them.
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(data: str | bytes) -> dict[str, Any]:
    """Parse one frame into a map, or raise BadMessage."""
    try:
        if isinstance(data, str):
            message = json.loads(data, parse_constant=_reject_constant)
        else:
            message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BadMessage(f"frame could not be decoded: {exc}") from None
    if not isinstance(message, dict):
        raise BadMessage("a message must be a map")
    return message


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
