"""Background work on the outbox: persistence to PostgreSQL (and later commissions)."""
