-- The player's own id of each bet (plumbing/events.py client_ref: "i:<integer>" or
-- "s:<string>", so 1 and "1" stay different), stored with the bet so that a resend after
-- Redis lost its idempotency record is answered from PostgreSQL, not settled again.
-- Unique per player only within the idempotency window, which Redis enforces: no unique
-- constraint here (clients, load testers among them, reuse ids across runs). NULL for bets
-- settled before the id travelled with the event.
ALTER TABLE bets ADD COLUMN client_id text;
CREATE INDEX bets_user_client ON bets (user_id, client_id, created_at);
