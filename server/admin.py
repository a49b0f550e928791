"""Admin routes (``Authorization: Bearer <ADMIN_TOKEN>``): users, deposits, the user view.

A ``parent_id`` naming no user is 400 ``BAD_MESSAGE``, like a parent at the wrong level: it
is a bad field value of this request, not a missing resource. Unknown body fields are
ignored (the protocol may add optional fields); ``null`` stands for an absent optional one.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from games.errors import BadMessage, InvalidAmount, NotFound
from games.money import format_amount, parse_amount, parse_currency
from server import users
from server.rest import MAX_BIGINT, endpoint, json_int, json_text, path_id, read_object, services_of

MAX_NAME = 64
MAX_IDEMPOTENCY_KEY = 128
MAX_BPS = 10000
#: One deposit credits at most this many minor units (10^13 USDT, 10^7 BTC), so balances
#: stay far from the 64-bit limits of Redis and PostgreSQL.
MAX_DEPOSIT = 10**15


@endpoint("/api/admin/users", "POST", admin=True)
async def create_user(request: Request) -> Response:
    body = await read_object(request)
    role = body.get("role")
    if not isinstance(role, str) or role not in users.ROLES:
        raise BadMessage(f"role must be one of {', '.join(users.ROLES)}")
    parent_id = json_int(body, "parent_id")
    bps = json_int(body, "commission_bps")
    bps = 0 if bps is None else bps
    if not 0 <= bps <= MAX_BPS:
        raise BadMessage(f"commission_bps must be an integer from 0 to {MAX_BPS}")
    name = json_text(body, "name", MAX_NAME)
    pool = services_of(request).pool
    if parent_id is not None:
        wanted = users.PARENT_ROLE.get(role)
        if wanted is None:
            raise BadMessage(f"a {role} heads its chain and has no parent")
        parent = await users.get(pool, parent_id) if 1 <= parent_id <= MAX_BIGINT else None
        if parent is None:
            raise BadMessage(f"parent_id {parent_id} does not exist")
        if parent.role != wanted:
            raise BadMessage(
                f"the parent of a {role} must have role {wanted};"
                f" user {parent_id} has role {parent.role}"
            )
    user, token = await users.create(pool, role, name, parent_id, bps)
    await services_of(request).wallet.mark_new(user.user_id)
    return JSONResponse({"user_id": user.user_id, "token": token})


@endpoint("/api/admin/deposits", "POST", admin=True)
async def deposit(request: Request) -> Response:
    body = await read_object(request)
    services = services_of(request)
    user_id = json_int(body, "user_id")
    if user_id is None:
        raise BadMessage("user_id must be an integer")
    key = body.get("idempotency_key")
    if not isinstance(key, str):
        raise BadMessage("idempotency_key must be a string")
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise BadMessage(f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
    if not isinstance(body.get("amount"), str):
        raise BadMessage("amount must be a decimal string")
    currency = parse_currency(body.get("currency"), services.settings.currencies)
    amount = parse_amount(body["amount"], currency)
    if amount > MAX_DEPOSIT:
        raise InvalidAmount(
            f"one deposit is at most {format_amount(MAX_DEPOSIT, currency)} {currency.code}"
        )
    if not 1 <= user_id <= MAX_BIGINT or await users.get(services.pool, user_id) is None:
        raise NotFound(f"no user {user_id}")
    balance = await services.wallet.deposit(user_id, currency, amount, key)
    return JSONResponse({"balance": format_amount(balance, currency)})


@endpoint("/api/admin/users/{user_id}", "GET", admin=True)
async def user_view(request: Request) -> Response:
    services = services_of(request)
    user_id = path_id(request, "user_id")
    user = await users.get(services.pool, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    currencies = services.settings.currencies
    balances = await services.wallet.balances(user_id)
    rows = await services.pool.fetch(
        "SELECT currency, SUM(delta) AS total FROM ledger"
        " WHERE user_id = $1 AND kind = 'commission' GROUP BY currency",
        user_id,
    )
    earned = {row["currency"]: int(row["total"]) for row in rows}
    return JSONResponse(
        {
            "user_id": user.user_id,
            "role": user.role,
            "name": user.name,
            "parent_id": user.parent_id,
            "commission_bps": user.commission_bps,
            "balances": {
                c: format_amount(balances.get(c, 0), spec) for c, spec in currencies.items()
            },
            "commission_earned": {
                c: format_amount(earned.get(c, 0), spec) for c, spec in currencies.items()
            },
        }
    )


@endpoint("/api/admin/users/{user_id}/revoke", "POST", admin=True)
async def revoke_token(request: Request) -> Response:
    """The user's token stops working: sign-in answers UNAUTHORIZED and its open sockets,
    on every instance, are closed (server/tokens.py). Repeating it is harmless."""
    services = services_of(request)
    user_id = path_id(request, "user_id")
    await services.tokens.revoke(user_id)
    return JSONResponse({"user_id": user_id, "revoked": True})


@endpoint("/api/admin/users/{user_id}/token", "POST", admin=True)
async def new_token(request: Request) -> Response:
    """A new token for the user (an expired or revoked one is replaced); the old token is
    revoked as by /revoke."""
    services = services_of(request)
    user_id = path_id(request, "user_id")
    token = await services.tokens.reissue(user_id)
    return JSONResponse({"user_id": user_id, "token": token})


ROUTES: list[Route] = [create_user, deposit, user_view, revoke_token, new_token]
