-- bets partitioned by time: RANGE on created_at, one partition per calendar month (UTC),
-- named bets_pYYYY_MM, plus bets_default for anything no month partition covers yet.
-- docs/partitions.md has the why, the commands and what the audit does with detached months.
--
-- Written to keep whatever bets has when it runs (other migrations add columns, checks and
-- indexes): the new table is LIKE the old one (columns, defaults, NOT NULL and CHECK
-- constraints), the rows are copied, the old table dropped, and every index and foreign key
-- of the old table is created again, on the partitioned table, from its own definition.
--
-- PostgreSQL enforces a unique key across partitions only when it holds the partition key,
-- so the primary key is (bet_id, created_at). A bet id is unique by construction
-- (<pair_id>-<nonce>) and a bet's created_at comes from its outbox event, so a replayed
-- event meets its own row (ON CONFLICT (bet_id, created_at) in workers/outbox.py); its
-- ledger row 'bet:<bet_id>' stays globally unique (ledger is not partitioned). Any other
-- unique key without created_at cannot be kept: the migration stops and names it.

DO $$
DECLARE
    def record;
BEGIN
    FOR def IN
        SELECT c.conname FROM pg_constraint c
        WHERE c.conrelid = 'bets'::regclass AND c.contype IN ('u', 'x')
        UNION ALL
        SELECT i.indexrelid::regclass::text FROM pg_index i
        WHERE i.indrelid = 'bets'::regclass AND i.indisunique AND NOT i.indisprimary
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
          AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                          WHERE a.attrelid = i.indrelid AND a.attname = 'created_at'
                            AND a.attnum = ANY (i.indkey))
    LOOP
        RAISE EXCEPTION 'bets has the unique key or exclusion constraint %, which a table '
            'partitioned by created_at cannot enforce: change it before migration 006', def.conname;
    END LOOP;
END
$$;

-- What to create again once the old table is gone (its names are free then).
CREATE TEMP TABLE bets_006_defs ON COMMIT DROP AS
SELECT 1 AS step, pg_get_indexdef(i.indexrelid) AS ddl
FROM pg_index i
WHERE i.indrelid = 'bets'::regclass AND NOT i.indisprimary
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
UNION ALL
SELECT 2, format('ALTER TABLE bets ADD CONSTRAINT %I %s', c.conname,
                 pg_get_constraintdef(c.oid))
FROM pg_constraint c
WHERE c.conrelid = 'bets'::regclass AND c.contype = 'f';

CREATE TABLE bets_006 (LIKE bets INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE
                       INCLUDING COMMENTS)
    PARTITION BY RANGE (created_at);
CREATE TABLE bets_006_default PARTITION OF bets_006 DEFAULT;

-- One month's partition, for the month holding month_start (UTC). Rows of that month that
-- went to the default partition meanwhile are moved into it in the same transaction, so it
-- never fails for them and nothing is lost. Returns the partition's name, or NULL when it
-- already existed.
CREATE FUNCTION bets_create_partition(month_start timestamptz, parent text = 'bets')
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    low  timestamptz := date_trunc('month', month_start, 'UTC');
    high timestamptz := low + interval '1 month';
    name text := 'bets_p' || to_char(low AT TIME ZONE 'UTC', 'YYYY_MM');
    fallback regclass;
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    SELECT i.inhrelid::regclass INTO fallback
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = parent::regclass
      AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT';
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                   'INCLUDING STORAGE)', name, parent);
    IF fallback IS NOT NULL THEN
        EXECUTE format('WITH moved AS (DELETE FROM %s WHERE created_at >= $1 AND created_at < $2'
                       ' RETURNING *) INSERT INTO %I SELECT * FROM moved', fallback, name)
            USING low, high;
    END IF;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, name, low, high);
    RETURN name;
END
$$;

-- This month's partition and the next `ahead` months' (UTC): the ones missing are created.
CREATE FUNCTION bets_ensure_partitions(ahead integer = 3) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    made text;
BEGIN
    IF ahead < 0 OR ahead > 120 THEN
        RAISE EXCEPTION 'months ahead must be 0 to 120, got %', ahead;
    END IF;
    FOR i IN 0 .. ahead LOOP
        made := bets_create_partition(now() + make_interval(months => i));
        IF made IS NOT NULL THEN
            RETURN NEXT made;
        END IF;
    END LOOP;
END
$$;

-- A partition for every month holding existing rows (and this one), then the rows.
SELECT bets_create_partition(m, 'bets_006')
FROM generate_series(
    date_trunc('month', LEAST(COALESCE((SELECT min(created_at) FROM bets), now()), now()),
               'UTC'),
    GREATEST(COALESCE((SELECT max(created_at) FROM bets), now()), now()),
    interval '1 month') AS m;
INSERT INTO bets_006 SELECT * FROM bets;

DROP TABLE bets;
ALTER TABLE bets_006 RENAME TO bets;
ALTER TABLE bets_006_default RENAME TO bets_default;
ALTER TABLE bets ADD CONSTRAINT bets_pkey PRIMARY KEY (bet_id, created_at);

DO $$
DECLARE
    ddl text;
BEGIN
    FOR ddl IN SELECT d.ddl FROM bets_006_defs d ORDER BY d.step LOOP
        EXECUTE ddl;
    END LOOP;
END
$$;

SELECT bets_ensure_partitions(3);

-- Detached months (docs/partitions.md). The audit counts a detached month's stakes and
-- payouts from bets_archived and does not ask for the bets behind its ledger rows.
CREATE TABLE bets_detached (
    partition   text PRIMARY KEY,
    range_from  timestamptz NOT NULL,
    range_to    timestamptz NOT NULL CHECK (range_to > range_from),
    bets        bigint NOT NULL,
    detached_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE bets_archived (
    partition text NOT NULL REFERENCES bets_detached (partition),
    user_id   bigint NOT NULL,
    currency  text NOT NULL,
    bets      bigint NOT NULL,
    stakes    numeric NOT NULL,
    payouts   numeric NOT NULL,
    PRIMARY KEY (partition, user_id, currency)
);

CREATE TABLE bets_archived_pairs (
    partition text NOT NULL REFERENCES bets_detached (partition),
    pair_id   bigint NOT NULL,
    bets      bigint NOT NULL,
    nonce_min bigint NOT NULL,
    nonce_max bigint NOT NULL,
    PRIMARY KEY (partition, pair_id)
);

-- Detach every month partition that ends at or before `cutoff`, after writing what the audit
-- keeps of it (per user and currency: bets, stakes, payouts; per seed pair: bets and nonce
-- range) in the same transaction. The
-- detached table stays, as a plain table, for the operator to dump and drop. Returns the
-- names detached, oldest first.
CREATE FUNCTION bets_detach_before(cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    counted bigint;
BEGIN
    IF cutoff > date_trunc('month', now(), 'UTC') THEN
        RAISE EXCEPTION 'cutoff % is past the start of this month: only whole past months '
            'can be detached', cutoff;
    END IF;
    -- Persisters insert bets meanwhile; one lock order (parent first, as an INSERT takes).
    LOCK TABLE bets IN SHARE ROW EXCLUSIVE MODE;
    FOR part IN
        SELECT c.relname::text AS name,
               make_timestamptz(substr(c.relname, 7, 4)::int, substr(c.relname, 12, 2)::int,
                                1, 0, 0, 0, 'UTC') AS low
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'bets'::regclass AND c.relname ~ '^bets_p[0-9]{4}_[0-9]{2}$'
        ORDER BY 2
    LOOP
        CONTINUE WHEN part.low + interval '1 month' > cutoff;
        EXECUTE format('SELECT count(*) FROM %I', part.name) INTO counted;
        INSERT INTO bets_detached (partition, range_from, range_to, bets)
        VALUES (part.name, part.low, part.low + interval '1 month', counted);
        EXECUTE format('INSERT INTO bets_archived (partition, user_id, currency, bets, stakes,'
                       ' payouts) SELECT %L, user_id, currency, count(*), sum(amount),'
                       ' sum(payout) FROM %I GROUP BY user_id, currency', part.name, part.name);
        EXECUTE format('INSERT INTO bets_archived_pairs (partition, pair_id, bets, nonce_min,'
                       ' nonce_max) SELECT %L, pair_id, count(*), min(nonce), max(nonce)'
                       ' FROM %I GROUP BY pair_id', part.name, part.name);
        EXECUTE format('ALTER TABLE bets DETACH PARTITION %I', part.name);
        RETURN NEXT part.name;
    END LOOP;
END
$$;
