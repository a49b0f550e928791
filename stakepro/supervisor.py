"""The supervisor's children: started, watched, restarted with backoff, stopped in order.

A child that dies on its own is started again; the others keep running. A worker or the
scheduler dying is a background matter: the players' sockets on the game server must not
close because of it. The game server dying closes its sockets anyway; restarting it lets
clients reconnect (and resend unanswered bets, which the idempotency records make safe).
Only the supervisor's own SIGINT / SIGTERM stops the whole stack.

Each death gives one line (who, how it ended, after how long, when it comes back) and each
restart one more. The delay before a restart is :class:`Backoff`'s: :data:`FIRST_S`, doubled
for every death in a row, at most :data:`CAP_S`; a child that stayed up :data:`STABLE_S`
counts as healthy again. So a crash now and then costs half a second, and a child that
cannot start at all (a bad setting, a port taken) is retried twice a minute, not in a loop.

Every child leads a process group of its own (so Ctrl-C at the terminal reaches only the
supervisor, which then stops the children in order). When a child's leader has died, what
is left in its group (Dramatiq's worker processes, uvicorn's with ``SERVER_PROCESSES`` > 1)
gets SIGTERM, and SIGKILL after :data:`STOP_TIMEOUT_S`, before the child starts again: an
orphaned uvicorn worker would keep the port bound, and orphaned Dramatiq workers would go
on consuming beside the new ones.

Dramatiq's main process exits (code 1) as soon as one of its worker processes dies, after
stopping the others: Dramatiq 2.2's CLI has no option to replace a worker process in
place. So :mod:`stakepro.run` starts one ``dramatiq`` child per worker process
(``--processes 1``): a killed worker process takes down only its own main process, which
is restarted here, and its siblings carry on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Seconds before the first restart of a child that died.
FIRST_S = 0.5
#: The longest wait before a restart.
CAP_S = 30.0
#: A child up this many seconds counts as healthy: its next death restarts after FIRST_S.
STABLE_S = 30.0
#: Seconds a child (or what its dead leader left behind) gets to stop after SIGTERM.
STOP_TIMEOUT_S = 20.0


class Backoff:
    """The delays between the restarts of one child (pure: the caller passes the uptime)."""

    def __init__(self, first: float = FIRST_S, cap: float = CAP_S,
                 stable: float = STABLE_S) -> None:
        if not 0 < first <= cap:
            raise ValueError("need 0 < first <= cap")
        self.first, self.cap, self.stable = first, cap, stable
        #: Deaths in a row, each within ``stable`` seconds of its start.
        self.in_a_row = 0

    def delay(self, uptime: float) -> float:
        """Seconds to wait before restarting a child that died after ``uptime`` seconds."""
        if uptime >= self.stable:
            self.in_a_row = 0
        delay = self.first
        for _ in range(self.in_a_row):  # doubling stops at the cap: no overflow
            delay = min(self.cap, delay * 2)
            if delay == self.cap:
                break
        self.in_a_row += 1
        return delay


@dataclass(frozen=True)
class Spec:
    """What to run: a name for the log lines, the command line, its environment."""

    name: str
    argv: Sequence[str]
    env: dict[str, str]


def _die_with_parent() -> None:
    """In the child, before exec: own process group, SIGTERM when the supervisor dies."""
    os.setpgrp()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def ending(returncode: int) -> str:
    """How a process ended, for a log line."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Child:
    """One supervised process: :meth:`poll` notices its death and restarts it when due."""

    def __init__(self, spec: Spec, say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.say = say
        self.clock = clock
        self.backoff = Backoff()
        self.restarts = 0
        self.proc = self._spawn()
        self.started_at = clock()
        #: While dead: when it died and when it may start again.
        self.died_at: float | None = None
        self.restart_at = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(list(self.spec.argv), env=self.spec.env,
                                preexec_fn=_die_with_parent)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _group(self, signum: int) -> bool:
        """Send ``signum`` to the child's process group; False when the group is empty."""
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def poll(self) -> None:
        """Notice a death (one line), then restart once the backoff and the group allow."""
        if self.alive():
            return
        now = self.clock()
        if self.died_at is None:
            self.died_at = now
            uptime = now - self.started_at
            delay = self.backoff.delay(uptime)
            self.restart_at = now + delay
            self._group(signal.SIGTERM)  # whatever the dead leader left behind
            self.say(f"{self.name} (pid {self.proc.pid}) {ending(self.proc.returncode)} "
                     f"after {uptime:.1f}s up: restarting in {delay:.1f}s")
            return
        if now < self.restart_at:
            return
        if self._group(0):
            if now - self.died_at < STOP_TIMEOUT_S:
                return
            self._group(signal.SIGKILL)
        try:
            proc = self._spawn()
        except OSError as exc:  # no memory, no process slot: try again later
            delay = self.backoff.delay(0.0)
            self.restart_at = now + delay
            self.say(f"{self.name} could not be started ({exc}): retrying in {delay:.1f}s")
            return
        self.proc = proc
        self.started_at = self.clock()
        self.died_at = None
        self.restarts += 1
        self.say(f"{self.name} restarted (pid {self.proc.pid}, restart {self.restarts})")

    def terminate(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        """Wait for the leader to stop (killing it after ``timeout``), then its group."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.say(f"{self.name} did not stop within {timeout:.0f}s: killing it")
            self.proc.kill()
            self.proc.wait()
        if self._group(0):
            self._group(signal.SIGTERM)
            deadline = self.clock() + timeout
            while self._group(0) and self.clock() < deadline:
                time.sleep(0.05)
            if self._group(signal.SIGKILL):
                self.say(f"{self.name}: killed what its process group still held")


class Children:
    """The supervised set: :meth:`poll` on each tick, :meth:`stop` once, in order."""

    def __init__(self, specs: Sequence[Spec], say: Callable[[str], None]) -> None:
        self.children = [Child(spec, say) for spec in specs]

    def named(self, prefix: str) -> list[Child]:
        return [c for c in self.children if c.name.split("-")[0] == prefix]

    def poll(self) -> None:
        for child in self.children:
            child.poll()

    def stop(self, order: Sequence[str], timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the children named in ``order`` (name or name prefix), one kind at a time;
        the children of one kind stop side by side."""
        for prefix in order:
            kind = self.named(prefix)
            for child in kind:
                child.terminate()
            for child in kind:
                child.wait(timeout)
