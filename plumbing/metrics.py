"""The counters the workers keep in Redis (``Keys.worker_stats()``) for the server's /metrics.

The workers serve no /metrics of their own: they HINCRBY these fields, and the server's
:class:`server.metrics.WorkerStats` exports each as ``stakepro_<name>_total``.
"""

from __future__ import annotations

#: Statements of the commission flush, and the bets whose commissions they paid.
FLUSH_STATEMENTS, UNITS_PAID = "commission_flush_statements", "commission_units_paid"
WORKER_COUNTERS = (
    (FLUSH_STATEMENTS, "Commission flush statements written to PostgreSQL (one per flush "
                       "window with something to pay)"),
    (UNITS_PAID, "Bets whose commissions a flush statement paid in PostgreSQL"),
)
