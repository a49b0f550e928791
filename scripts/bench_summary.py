"""Summarise a scripts/bench-all.sh results folder: min / median / max of every figure.

    .venv/bin/python scripts/bench_summary.py /tmp/stakepro-bench-results
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _runs(folder: Path, prefix: str) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(folder.glob(f"{prefix}-*.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except ValueError:
            print(f"{path.name}: not JSON (the run failed)")
    return runs


def _spread(values: list[float | None], fmt: str = "{:,.1f}") -> str:
    have = [v for v in values if v is not None]
    if not have:
        return "n/a"
    each = " / ".join(fmt.format(v) for v in have)
    return (f"min {fmt.format(min(have))}, median {fmt.format(statistics.median(have))}, "
            f"max {fmt.format(max(have))}  ({each})")


def _line(name: str, runs: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any],
          fmt: str = "{:,.1f}") -> None:
    values = []
    for run in runs:
        try:
            values.append(get(run))
        except (KeyError, TypeError):
            values.append(None)
    print(f"  {name:<34} {_spread(values, fmt)}")


def main(folder: Path) -> None:
    machine = folder / "machine.txt"
    if machine.exists():
        print(machine.read_text().strip(), end="\n\n")
    for prefix in ("bets", "echo", "refecho", "two", "full", "unqueued"):
        runs = _runs(folder, prefix) if prefix != "unqueued" else [
            json.loads((folder / "unqueued.json").read_text())
        ] if (folder / "unqueued.json").exists() else []
        if not runs:
            continue
        print(f"{prefix} ({len(runs)} runs, ok: {[r.get('ok') for r in runs]})")
        _line("bets/s", runs, lambda r: r["bets_per_s"])
        _line("client p50 ms", runs, lambda r: r["latency_ms"]["p50"], "{:,.2f}")
        _line("client p99 ms", runs, lambda r: r["latency_ms"]["p99"], "{:,.2f}")
        _line("server bet time median ms", runs,
              lambda r: r["server"]["bet_time_ms"]["median"], "{:,.2f}")
        _line("server cores", runs, lambda r: r["server"]["cpu_cores"], "{:,.2f}")
        _line("server CPU ms / 1,000 bets", runs,
              lambda r: r["server"]["cpu_ms_per_1000_bets"])
        _line("client CPU ms / 1,000 bets", runs,
              lambda r: r["client"]["cpu_ms_per_1000_bets"])
        _line("errors", runs, lambda r: r["error_count"], "{:,.0f}")
    bets = _runs(folder, "bets")
    for prefix, what in (("refecho", "stock uvicorn echo (the issue's)"),
                         ("echo", "/debug/echo (own socket layer)")):
        echo = _runs(folder, prefix)
        if bets and echo:
            ratios: list[float | None] = [
                b["bets_per_s"] / e["bets_per_s"] for b, e in zip(bets, echo, strict=False)
            ]
            print(f"ratio bets / {what}, run by run\n  {'':<34} {_spread(ratios, '{:.3f}')}")
    spectators = _runs(folder, "spectators")
    if spectators:
        print(f"spectators ({len(spectators)} runs, ok: {[r.get('ok') for r in spectators]})")
        _line("bets/s settled", spectators, lambda r: r["bets"]["bets_per_s"])
        _line("feed lag p50 ms", spectators, lambda r: r["feed_lag_ms"]["p50"])
        _line("feed lag p99 ms", spectators, lambda r: r["feed_lag_ms"]["p99"])
        _line("feed lag max ms", spectators, lambda r: r["feed_lag_ms"]["max"])
        _line("frames/s per socket", spectators, lambda r: r["batches_per_s_per_socket"],
              "{:,.2f}")
        _line("every bet seen", spectators, lambda r: float(r["every_bet_seen"]), "{:.0f}")
    persist = _runs(folder, "persist")
    if persist:
        print(f"persistence ({len(persist)} runs, ok: {[r.get('ok') for r in persist]})")
        _line("bets accepted", persist, lambda r: r["accepted"], "{:,.0f}")
        _line("bets/s", persist, lambda r: r["accepted"] / r["options"]["sustained_s"])
        _line("lag p50 ms", persist, lambda r: r["persistence_lag_ms"]["p50"])
        _line("lag p99 ms", persist, lambda r: r["persistence_lag_ms"]["p99"])
        _line("lag max ms", persist, lambda r: r["persistence_lag_ms"]["max"])
        _line("commissions exact after s", persist,
              lambda r: r["commission"]["exact_after_s"], "{:,.2f}")
    storm = _runs(folder, "storm")
    if storm:
        print(f"storm, 10,000 players ({len(storm)} runs, ok: {[r.get('ok') for r in storm]})")
        _line("bets accepted", storm, lambda r: r["accepted"], "{:,.0f}")
        _line("commissions exact after s", storm,
              lambda r: r["commission"]["exact_after_s"], "{:,.2f}")
        _line("flush statements", storm,
              lambda r: r["flush_metrics"]["stakepro_commission_flush_statements_total"],
              "{:,.0f}")
        _line("lag p99 ms", storm, lambda r: r["persistence_lag_ms"]["p99"])
    sockets = _runs(folder, "sockets")
    if sockets:
        print(f"sockets ({len(sockets)} runs, ok: {[r.get('ok') for r in sockets]})")
        _line("held", sockets, lambda r: r["held"], "{:,.0f}")
        _line("server RSS all open MiB", sockets,
              lambda r: r["server"]["rss_bytes"]["all_open"] / 2**20)
        _line("server RSS after hold MiB", sockets,
              lambda r: r["server"]["rss_bytes"]["after_hold"] / 2**20)
        _line("KiB per socket (all open)", sockets,
              lambda r: r["server"]["rss_bytes_per_socket"]["all_open"] / 1024)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stakepro-bench-results"))
