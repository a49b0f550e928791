-- Users, their agent chain, seed pairs, deposits, settled bets and the ledger.
-- Money is always bigint minor units; rolls and targets are integer hundredths.

CREATE TABLE users (
    user_id        bigserial PRIMARY KEY,
    role           text NOT NULL CHECK (role IN ('player', 'agent', 'master', 'super_master')),
    parent_id      bigint REFERENCES users (user_id),
    commission_bps integer NOT NULL DEFAULT 0 CHECK (commission_bps BETWEEN 0 AND 10000),
    name           text NOT NULL,
    token_hash     bytea NOT NULL UNIQUE,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_parent ON users (parent_id);

-- server_seed is secret until revealed_at is set; the API never shows it before.
CREATE TABLE seed_pairs (
    pair_id          bigserial PRIMARY KEY,
    user_id          bigint NOT NULL REFERENCES users (user_id),
    server_seed      text NOT NULL,
    server_seed_hash text NOT NULL,
    client_seed      text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    revealed_at      timestamptz,
    final_nonce      bigint
);
CREATE INDEX seed_pairs_user ON seed_pairs (user_id, pair_id);

-- Written by the admin endpoint before the Redis credit; the credit itself reaches the
-- ledger through the outbox.
CREATE TABLE deposits (
    idempotency_key text PRIMARY KEY,
    user_id         bigint NOT NULL REFERENCES users (user_id),
    currency        text NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bets (
    bet_id           text PRIMARY KEY,
    user_id          bigint NOT NULL,
    pair_id          bigint NOT NULL,
    currency         text NOT NULL,
    amount           bigint NOT NULL CHECK (amount > 0),
    payout           bigint NOT NULL CHECK (payout >= 0),
    roll             integer NOT NULL,
    target           integer NOT NULL,
    direction        text NOT NULL CHECK (direction IN ('under', 'over')),
    nonce            bigint NOT NULL,
    multiplier       integer NOT NULL,
    server_seed_hash text NOT NULL,
    client_seed      text NOT NULL,
    balance_after    bigint NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX bets_user ON bets (user_id, created_at);
CREATE INDEX bets_pair ON bets (pair_id, nonce);

-- Every balance change, one row per (event, user): a balance is the sum of its deltas.
CREATE TABLE ledger (
    entry_id   text PRIMARY KEY,
    user_id    bigint NOT NULL,
    currency   text NOT NULL,
    delta      bigint NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('bet', 'deposit', 'commission')),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_user ON ledger (user_id, currency);
