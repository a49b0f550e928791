"""The counters the workers keep in Redis (``Keys.worker_stats()``) for the server's /metrics.

The workers serve no /metrics of their own: they HINCRBY these fields, and the server's
:class:`server.metrics.WorkerStats` exports each as ``stakepro_<name>_total``.
"""

from __future__ import annotations

#: Statements and paid units of the commission flush.
FLUSH_STATEMENTS, UNITS_PAID = "commission_flush_statements", "commission_units_paid"
WORKER_COUNTERS = (
    (FLUSH_STATEMENTS, "Commission flush statements written to PostgreSQL (one per flush "
                       "window with something to pay)"),
    (UNITS_PAID, "Commission units (one bucket's accruals of one window) paid in PostgreSQL"),
)
