"""Background work on the outbox: persistence to PostgreSQL, commissions up the chain."""
