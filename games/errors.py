"""The one error tree of StakePro.

Every protocol error code of PROTOCOL.md maps to exactly one class, and every class carries
its wire ``code`` and the HTTP status that goes with it. The server turns any
:class:`StakeProError` into an ``error`` frame (or an HTTP body) and never re-implements a
rule; an error never changes a balance.

.. code-block:: text

    StakeProError
    ├── BadMessage            BAD_MESSAGE            400
    ├── Unauthorized          UNAUTHORIZED           401
    ├── Forbidden             FORBIDDEN              403
    ├── NotFound              NOT_FOUND              404
    ├── InvalidAmount         INVALID_AMOUNT         400
    ├── InvalidTarget         INVALID_TARGET         400
    ├── UnknownCurrency       UNKNOWN_CURRENCY       400
    ├── InsufficientFunds     INSUFFICIENT_FUNDS     409
    ├── BetLimit              BET_LIMIT              400
    ├── InvalidSeed           INVALID_SEED           400
    ├── RateLimited           RATE_LIMITED           429
    ├── IdempotencyConflict   IDEMPOTENCY_CONFLICT   409
    └── Unavailable           UNAVAILABLE            503

``FORBIDDEN`` and ``NOT_FOUND`` are HTTP-only codes (admin routes and ``GET /api/bets``).
"""

from typing import ClassVar

__all__ = [
    "ERRORS_BY_CODE",
    "BadMessage",
    "BetLimit",
    "Forbidden",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidAmount",
    "InvalidSeed",
    "InvalidTarget",
    "NotFound",
    "RateLimited",
    "StakeProError",
    "Unauthorized",
    "Unavailable",
    "UnknownCurrency",
]


class StakeProError(Exception):
    """Root of every domain error; ``message`` is human text for the client."""

    code: ClassVar[str]
    http_status: ClassVar[int]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadMessage(StakeProError):
    """Undecodable frame, not a map, unknown type, missing or mistyped field."""

    code = "BAD_MESSAGE"
    http_status = 400


class Unauthorized(StakeProError):
    code = "UNAUTHORIZED"
    http_status = 401


class Forbidden(StakeProError):
    code = "FORBIDDEN"
    http_status = 403


class NotFound(StakeProError):
    code = "NOT_FOUND"
    http_status = 404


class InvalidAmount(StakeProError):
    code = "INVALID_AMOUNT"
    http_status = 400


class InvalidTarget(StakeProError):
    code = "INVALID_TARGET"
    http_status = 400


class UnknownCurrency(StakeProError):
    code = "UNKNOWN_CURRENCY"
    http_status = 400


class InsufficientFunds(StakeProError):
    code = "INSUFFICIENT_FUNDS"
    http_status = 409


class BetLimit(StakeProError):
    """Below the minimum bet, above the maximum bet, or above the maximum profit."""

    code = "BET_LIMIT"
    http_status = 400


class InvalidSeed(StakeProError):
    code = "INVALID_SEED"
    http_status = 400


class RateLimited(StakeProError):
    """A limit was hit; nothing was done. ``retry_after_s``: when a retry can pass (HTTP
    sends it as ``Retry-After``, rounded up to whole seconds)."""

    code = "RATE_LIMITED"
    http_status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class IdempotencyConflict(StakeProError):
    """The same idempotency key (a bet's ``id``) came back with different fields."""

    code = "IDEMPOTENCY_CONFLICT"
    http_status = 409


class Unavailable(StakeProError):
    """A dependency is down or did not answer: the request was not confirmed and may have
    taken effect; a resend with the same id is safe (a settled bet answers its original
    result)."""

    code = "UNAVAILABLE"
    http_status = 503


ERRORS_BY_CODE: dict[str, type[StakeProError]] = {
    cls.code: cls
    for cls in (
        BadMessage,
        Unauthorized,
        Forbidden,
        NotFound,
        InvalidAmount,
        InvalidTarget,
        UnknownCurrency,
        InsufficientFunds,
        BetLimit,
        InvalidSeed,
        RateLimited,
        IdempotencyConflict,
        Unavailable,
    )
}
"""Every wire code to its class, e.g. to rebuild an error from a reply in tests and tools."""
