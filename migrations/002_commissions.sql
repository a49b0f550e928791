-- Commission flushes (workers/commissions.py). A batch is one bucket's pending hash taken
-- by one flush: (batch_id, bucket). Inserting it here is what makes a batch paid, in the
-- same statement as its ledger rows and totals, so a batch written twice pays once.
CREATE TABLE commission_batches (
    batch_id   text NOT NULL,
    bucket     integer NOT NULL,
    -- The statement that paid it; its ledger rows are 'com:<write_id>:<user>:<currency>'.
    write_id   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, bucket)
);

-- Running total per ancestor; always equal to SUM(ledger.delta) WHERE kind = 'commission'.
CREATE TABLE commission_totals (
    user_id  bigint NOT NULL,
    currency text NOT NULL,
    earned   bigint NOT NULL CHECK (earned >= 0),
    PRIMARY KEY (user_id, currency)
);
