"""What the server says about a run: its ``/metrics`` before and after (bet-time histogram,
counters), and the CPU time and memory of its process when it runs on this machine."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

BET_SECONDS = "stakepro_bet_seconds"


@dataclass
class Scrape:
    """The parts of one ``/metrics`` page the load tester uses."""

    #: ``stakepro_bet_seconds`` cumulative bucket counts by upper bound (``inf`` last).
    buckets: dict[float, float] = field(default_factory=dict)
    bet_sum: float = 0.0
    bets: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)


def parse_metrics(text: str) -> Scrape:
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == f"{BET_SECONDS}_bucket":
                scrape.buckets[float(labels["le"])] = value
            elif name == f"{BET_SECONDS}_sum":
                scrape.bet_sum = value
            elif name == "stakepro_bets_total":
                scrape.bets += value
            elif name == "stakepro_errors_total":
                code = str(labels.get("code", "?"))
                scrape.errors[code] = scrape.errors.get(code, 0.0) + value
    return scrape


async def metrics_text(http_url: str, request_timeout: float = 10.0) -> str | None:
    """The body of ``GET /metrics``, or None when the server does not serve it to us."""
    try:
        async with httpx.AsyncClient(base_url=http_url, timeout=request_timeout) as http:
            r = await http.get("/metrics")
    except httpx.HTTPError:
        return None
    return r.text if r.status_code == 200 else None


async def scrape(http_url: str, request_timeout: float = 10.0) -> Scrape | None:
    """``GET /metrics``, or None when the server does not serve it to us."""
    text = await metrics_text(http_url, request_timeout)
    return None if text is None else parse_metrics(text)


@dataclass(frozen=True)
class ServerBetTime:
    """Server-side bet time over the run, from bucket deltas (an estimate: linear
    interpolation inside the bucket that holds the quantile)."""

    count: int
    mean_ms: float | None
    #: ``inf`` when the quantile lies above ``top_ms``, the last finite bucket bound.
    p50_ms: float | None
    p99_ms: float | None
    top_ms: float | None
    errors: dict[str, int]


def bucket_quantile(deltas: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile (seconds) of a cumulative histogram [(upper bound, count)], sorted
    by bound; linear inside the bucket. In the ``+Inf`` bucket: ``inf`` (only known to be
    above the last finite bound)."""
    if not deltas:
        return None
    total = deltas[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in deltas:
        if cumulative >= rank:
            if math.isinf(upper):
                return math.inf
            inside = cumulative - below
            fraction = (rank - below) / inside if inside > 0 else 1.0
            return lower + (upper - lower) * fraction
        lower, below = upper, cumulative
    return lower


def bet_time(before: Scrape, after: Scrape) -> ServerBetTime:
    deltas = sorted(
        (bound, after.buckets[bound] - before.buckets.get(bound, 0.0)) for bound in after.buckets
    )
    count = int(deltas[-1][1]) if deltas else 0
    top = max((bound for bound, _ in deltas if not math.isinf(bound)), default=None)
    p50 = bucket_quantile(deltas, 0.5)
    p99 = bucket_quantile(deltas, 0.99)
    errors = {
        code: int(value - before.errors.get(code, 0.0))
        for code, value in after.errors.items()
        if value - before.errors.get(code, 0.0) > 0
    }
    return ServerBetTime(
        count=count,
        mean_ms=(after.bet_sum - before.bet_sum) / count * 1000 if count else None,
        p50_ms=None if p50 is None else p50 * 1000,
        p99_ms=None if p99 is None else p99 * 1000,
        top_ms=None if top is None else top * 1000,
        errors=errors,
    )


# -- the server process -------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(inode)
    return inodes


def find_listening_pids(port: int) -> list[int]:
    """Pids of the processes (readable by us) holding a socket listening on ``port``."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return []
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        pids.append(int(entry.name))
                        break
    return sorted(pids)


@dataclass(frozen=True)
class ProcessSample:
    cpu_s: float
    rss_bytes: int


def sample_process(pid: int) -> ProcessSample | None:
    """CPU time (user + system, seconds) and resident memory of ``pid`` from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return ProcessSample(cpu, rss)


def parse_samples(text: str, containing: str) -> dict[str, float]:
    """Every sample whose name contains ``containing``, as ``name{label="v",...}`` -> value."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if containing not in sample.name:
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return found


async def scrape_samples(http_url: str, containing: str,
                         request_timeout: float = 10.0) -> dict[str, float] | None:
    """:func:`parse_samples` of ``GET /metrics``; None when it cannot be read."""
    text = await metrics_text(http_url, request_timeout)
    return None if text is None else parse_samples(text, containing)
