"""Server and client seeds, and the server seed's commitment (PROTOCOL.md, "Dice rules").

The server seed is 32 random bytes as 64 hex characters; before any bet uses it the player
sees only ``SHA256(server_seed)``, and the seed itself is revealed when the pair rotates, so
the player can check that every roll of the pair came from the seed committed to.
"""

import hashlib
import re
import secrets

from games.errors import BadMessage, InvalidSeed

__all__ = [
    "CLIENT_SEED_ALPHABET",
    "new_client_seed",
    "new_server_seed",
    "parse_client_seed",
    "server_seed_hash",
]

CLIENT_SEED_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
CLIENT_SEED_MAX = 64

_CLIENT_SEED_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}", re.ASCII)


def new_server_seed() -> str:
    """32 bytes from the OS's CSPRNG as 64 lowercase hex characters."""
    return secrets.token_hex(32)


def server_seed_hash(server_seed: str) -> str:
    """The commitment: ``SHA256(server_seed as UTF-8)`` in lowercase hex."""
    return hashlib.sha256(server_seed.encode()).hexdigest()


def new_client_seed() -> str:
    """A random 16-character client seed from the allowed alphabet."""
    return "".join(secrets.choice(CLIENT_SEED_ALPHABET) for _ in range(16))


def parse_client_seed(value: object) -> str:
    """Check a player's client seed: 1 to 64 characters of ``A-Z a-z 0-9 - _ .``.

    Raises:
        BadMessage: ``value`` is not a string.
        InvalidSeed: empty, too long, or another character.
    """
    if not isinstance(value, str):
        raise BadMessage("client_seed must be a string")
    if _CLIENT_SEED_RE.fullmatch(value) is None:
        raise InvalidSeed(
            f"client_seed must be 1 to {CLIENT_SEED_MAX} characters of A-Z a-z 0-9 - _ ."
        )
    return value
