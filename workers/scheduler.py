"""``python -m workers.scheduler``: enqueue the periodic jobs, forever.

Every ``settings.persist_every_s`` one ``persist_outbox(shard)`` per shard, and every half
``settings.commission_flush_s`` one ``flush_commissions()``. It only sends messages: the
work, and its exclusion, is in the actors (a persist job without its shard's lease returns
at once; a flush inside a window whose lease is taken does nothing). So a duplicated tick, a
second scheduler (two ``make run``, a restarted one whose predecessor lives on) or a backlog
of ticks after an outage is harmless, and no scheduler at all only delays the work.

Why flushes are enqueued twice per window: the window lease (workers/commissions.py) lives
exactly one window from when it was taken; a tick that arrives a millisecond early finds it
still held and skips, so with one tick per window the flush would sometimes wait two
windows. Two ticks per window keep the delay between one and one and a half windows, and
still at most one statement per window.

Driven by APScheduler 3 (BlockingScheduler, interval triggers; coalesced, one instance of a
job at a time). periodiq, the Dramatiq companion, schedules in cron syntax to the minute:
too coarse for a half-second tick. A job that cannot reach the broker logs and the next tick
tries again. SIGINT / SIGTERM stop it.
"""

from __future__ import annotations

# The broker first (workers.actors imports it too, before defining the actors).
from workers.broker import SETTINGS  # isort: skip

import logging
import signal
import sys
import threading
from datetime import UTC, datetime
from types import FrameType

from apscheduler.schedulers.blocking import BlockingScheduler

from plumbing.settings import Settings
from workers.actors import flush_commissions, persist_outbox

log = logging.getLogger("workers.scheduler")


def enqueue_persist(shards: int) -> None:
    for shard in range(shards):
        persist_outbox.send(shard)


def enqueue_flush() -> None:
    flush_commissions.send()


def build(settings: Settings) -> BlockingScheduler:
    scheduler = BlockingScheduler(
        timezone=UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 5},
    )
    now = datetime.now(UTC)
    scheduler.add_job(enqueue_persist, "interval", args=(settings.persist_shards,),
                      seconds=settings.persist_every_s, id="persist", next_run_time=now)
    scheduler.add_job(enqueue_flush, "interval", seconds=settings.commission_flush_s / 2,
                      id="flush", next_run_time=now)
    return scheduler


def main() -> int:
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every tick would log at INFO: keep APScheduler to warnings (missed runs, job errors).
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    scheduler = build(SETTINGS)

    def stop(signum: int, frame: FrameType | None) -> None:
        # Not from inside the handler: it may have interrupted the scheduler holding a lock.
        threading.Thread(target=scheduler.shutdown, kwargs={"wait": False}).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"scheduler: persist x{SETTINGS.persist_shards} every {SETTINGS.persist_every_s}s, "
          f"commission flush every {SETTINGS.commission_flush_s}s", flush=True)
    scheduler.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
