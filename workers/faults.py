"""Fault points for the crash tests: ``point(name)`` does nothing unless asked to.

``STAKEPRO_FAULT`` names what to break, read once at import: ``name:action`` items separated
by commas, e.g. ``persist_after_commit:raise`` or
``persist_before_commit:kill,flush_after_take:kill``. Actions:

- ``kill``: SIGKILL this very process at that point (no finally, no atexit, no flush);
- ``raise``: raise :class:`FaultInjected` there (a job's exception: Dramatiq retries it).

Each point fires once per process, and, when ``STAKEPRO_FAULT_ONCE`` names a directory, once
over every process that shares it (a marker file created with O_EXCL), so a retry or a
restarted worker with the same environment gets through.

The points (where they are called):

- ``persist_before_commit``: workers/outbox.py, inside the batch's transaction, after its
  statements and before COMMIT;
- ``persist_after_commit``: workers/outbox.py, after COMMIT, before XACK;
- ``flush_after_take``: workers/commissions.py, after the pending hashes were taken, before
  the PostgreSQL statement that pays them;
- ``flush_after_write``: workers/commissions.py, after that statement committed, before
  Redis is credited.

Unset (production), ``point`` is one dictionary test of an empty dict.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "STAKEPRO_FAULT"
ONCE_ENV = "STAKEPRO_FAULT_ONCE"
ACTIONS = ("kill", "raise")


class FaultInjected(RuntimeError):
    """Raised by a ``raise`` fault point."""


def parse(spec: str) -> dict[str, str]:
    faults: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, action = item.partition(":")
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown action in {item!r} (use {'|'.join(ACTIONS)})")
        faults[name] = action
    return faults


_FAULTS: dict[str, str] = parse(os.environ.get(ENV, ""))
_ONCE_DIR = os.environ.get(ONCE_ENV, "")
_fired: set[str] = set()


def point(name: str) -> None:
    """The fault point ``name``: kill, raise or (normally) nothing."""
    if not _FAULTS:
        return
    action = _FAULTS.get(name)
    if action is None or not _first(name):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FaultInjected(f"fault injected at {name}")


def _first(name: str) -> bool:
    if name in _fired:
        return False
    _fired.add(name)
    if not _ONCE_DIR:
        return True
    try:
        fd = os.open(Path(_ONCE_DIR) / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True
