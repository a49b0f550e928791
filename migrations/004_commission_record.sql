-- PostgreSQL is the record of which commissions are paid (workers/commissions.py).
--
-- Each bet carries the ancestors and rates that applied when it was persisted (written once,
-- with the row, by the outbox persister) and the flush that paid it, set by that flush's own
-- statement. A bet without commission_to owes nothing; a bet with commission_to and no
-- commission_flush is due, and the partial index lists exactly those.
ALTER TABLE bets
    ADD COLUMN commission_to    bigint[],
    ADD COLUMN commission_bps   integer[],
    ADD COLUMN commission_flush text,
    ADD CONSTRAINT bets_commission_arrays CHECK (
        cardinality(commission_to) = cardinality(commission_bps)
        AND cardinality(commission_to) > 0);
CREATE INDEX bets_commission_due ON bets (bet_id)
    WHERE commission_flush IS NULL AND commission_to IS NOT NULL;

-- One row per flush that paid something: its credit plan (what Redis must add, per ancestor
-- and currency, parallel arrays), written by the flush's statement. credited_at is set once
-- Redis has taken the plan (commission-credit-n.lua, by marker); until then any flusher
-- (re)credits it, which the markers make harmless.
CREATE TABLE commission_flushes (
    flush_id    text PRIMARY KEY CHECK (flush_id ~ '^[0-9A-Za-z._-]+$'),
    user_ids    bigint[] NOT NULL,
    currencies  text[] NOT NULL,
    amounts     bigint[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    credited_at timestamptz
);
CREATE INDEX commission_flushes_uncredited ON commission_flushes (created_at)
    WHERE credited_at IS NULL;

-- Bets persisted before this migration were paid (or are still accruing in Redis) by the
-- previous path, which kept no per-bet record: record the chain as it stands now and mark
-- them paid by the flush 'legacy', so no flush pays them again and the audit can recompute
-- them (it reports a difference if a rate changed since). Stop the old workers cleanly
-- before migrating: their last flush pays what they accrued.
WITH RECURSIVE up AS (
    SELECT u.user_id AS player, p.user_id, p.parent_id, p.commission_bps, 0 AS depth
    FROM users u JOIN users p ON p.user_id = u.parent_id
    WHERE u.user_id IN (SELECT DISTINCT user_id FROM bets)
    UNION ALL
    SELECT up.player, p.user_id, p.parent_id, p.commission_bps, up.depth + 1
    FROM up JOIN users p ON p.user_id = up.parent_id
    WHERE up.depth < 8
), chains AS (
    SELECT player, array_agg(user_id ORDER BY depth) AS ancestors,
           array_agg(commission_bps ORDER BY depth) AS rates
    FROM up WHERE commission_bps > 0
    GROUP BY player
)
UPDATE bets b
SET commission_to = c.ancestors, commission_bps = c.rates, commission_flush = 'legacy'
FROM chains c
WHERE c.player = b.user_id;
-- The flushes last recorded as credited: each flush checks that Redis still holds their
-- markers (a Redis rollback loses a credit and its marker together).
CREATE INDEX commission_flushes_credited ON commission_flushes (credited_at)
    WHERE credited_at IS NOT NULL;
