"""Users and their agent chain in PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from server.auth import new_token, token_hash

ROLES = ("player", "agent", "master", "super_master")
#: The role a parent must have, one level up the chain.
PARENT_ROLE = {"player": "agent", "agent": "master", "master": "super_master"}


@dataclass(frozen=True, slots=True)
class User:
    user_id: int
    role: str
    name: str
    parent_id: int | None
    commission_bps: int


_COLUMNS = "user_id, role, name, parent_id, commission_bps"


async def create(
    conn: asyncpg.Connection | asyncpg.Pool,
    role: str,
    name: str | None,
    parent_id: int | None,
    commission_bps: int,
) -> tuple[User, str]:
    """Insert a user and return it with its token (shown once; only its hash is kept)."""
    token = new_token()
    row = await conn.fetchrow(
        "INSERT INTO users (role, parent_id, commission_bps, name, token_hash)"
        " VALUES ($1, $2, $3, COALESCE($4, ''), $5)"
        f" RETURNING {_COLUMNS}",
        role, parent_id, commission_bps, name, token_hash(token),
    )
    assert row is not None
    user = User(*row)
    if not user.name:
        # A display name never reveals the id's neighbours: derive it from the token hash.
        user = User(user.user_id, user.role, f"{role}-{token_hash(token).hex()[:6]}",
                    user.parent_id, user.commission_bps)
        await conn.execute("UPDATE users SET name = $2 WHERE user_id = $1",
                           user.user_id, user.name)
    return user, token


async def get(conn: asyncpg.Connection | asyncpg.Pool, user_id: int) -> User | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE user_id = $1", user_id)
    return User(*row) if row else None


async def ancestors(conn: asyncpg.Connection | asyncpg.Pool, user_id: int) -> list[User]:
    """The chain above a user, nearest first (agent, master, super master)."""
    rows = await conn.fetch(
        f"""WITH RECURSIVE up AS (
                SELECT {_COLUMNS}, 0 AS depth FROM users WHERE user_id =
                    (SELECT parent_id FROM users WHERE user_id = $1)
                UNION ALL
                SELECT u.user_id, u.role, u.name, u.parent_id, u.commission_bps, up.depth + 1
                FROM users u JOIN up ON u.user_id = up.parent_id WHERE up.depth < 8
            ) SELECT {_COLUMNS} FROM up ORDER BY depth""",
        user_id,
    )
    return [User(*r) for r in rows]
