"""The two encodings of StakePro frames as the load tools see them: every socket
implementation (loadtest/client.py, loadtest/picows_client.py, loadtest/picows_bets.py)
decodes with :func:`decode`."""

from __future__ import annotations

import json
from typing import Any, Literal

import msgpack

#: JSON text frames, or msgpack binary frames.
Encoding = Literal["json", "msgpack"]


def decode(frame: str | bytes) -> dict[str, Any]:
    """A frame's payload as a message map (bytes are msgpack, text is JSON)."""
    decoded = msgpack.unpackb(frame) if isinstance(frame, bytes) else json.loads(frame)
    if not isinstance(decoded, dict):
        raise ValueError(f"a frame that is not a map: {decoded!r:.80}")
    return decoded
