"""The whole game server on one Redis against the same server on a 3-master Redis Cluster,
alternated in one run on one box, so their ratio survives a noisy machine (issue 13).

Each run starts a stack of its own with scripts/benchstack.sh (``start serve``: the game
server alone, ``INPROCESS_PERSISTER=false``, a fresh database, and either one Redis or,
with ``BENCH_REDIS=cluster``, a cluster of 3 masters and 3 replicas from
bench/clusterstack.py; both with AOF and the same ``appendfsync``), drives it with
``python -m loadtest bets`` over the wire (``--connections`` sockets x ``--inflight`` bets
in flight, ``--duration`` s), and stops it. Rounds alternate single, cluster, single, ...

While the load runs, every process of the stack (the game server, each redis-server, the
load client) is sampled once a second from /proc: CPU cores busy per process, and the
whole machine's busy cores ("box": every process, other people's included). The figures
reported are the median of the seconds in which the server was at least half as busy as
in its busiest second (the measured window; the players' creation, the ramp-up
and the drain fall outside it). Redis CPU per bet = the redis-servers' cores (all six
nodes on the cluster: replicas apply the stream too) / bets per second.

    python -m bench.ab_cluster --rounds 3 --duration 20 [--appendfsync always]

Everything goes into ``--out`` (default /tmp/stakepro-abcluster): ``machine.txt``, one
``<target>-<round>.json`` per run (the load client's JSON plus ``cpu``), and the summary
printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def box_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every core; /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def listening_pid(port: int) -> int:
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


def redis_processes(state: Path, target: str, redis_port: int) -> dict[str, int]:
    """name -> pid of every redis-server of the stack ('master:<port>', 'replica:<port>')."""
    if target == "single":
        info = subprocess.run(["redis-cli", "-p", str(redis_port), "INFO", "server"],
                              capture_output=True, text=True, check=True).stdout
        pid = int(info.split("process_id:")[1].split()[0])
        return {f"master:{redis_port}": pid}
    masters = set(subprocess.run(
        [sys.executable, "-m", "bench.clusterstack", "ports", str(state)], cwd=ROOT,
        capture_output=True, text=True, check=True).stdout.split())
    found = {}
    for pidfile in state.glob("cluster-node-*.pid"):
        port = pidfile.stem.rsplit("-", 1)[1]
        role = "master" if port in masters else "replica"
        found[f"{role}:{port}"] = int(pidfile.read_text())
    return found


class Sampler(threading.Thread):
    """CPU cores busy per process, once a second, until stopped."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.rows: list[dict[str, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        last = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        box = box_busy_seconds()
        t0 = time.monotonic()
        while not self.halt.wait(1.0):
            now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
            box_now = box_busy_seconds()
            t1 = time.monotonic()
            row = {name: ((now[name] or 0.0) - (last[name] or 0.0)) / (t1 - t0)
                   for name in self.pids if now[name] is not None}
            row["box"] = (box_now - box) / (t1 - t0)
            self.rows.append(row)
            last, box, t0 = now, box_now, t1

    def steady(self) -> dict[str, float]:
        """Median cores per process over the seconds the server was at least half as busy
        as in its busiest second."""
        if not self.rows:
            return {}
        peak = max(r.get("server", 0.0) for r in self.rows)
        busy = [r for r in self.rows if r.get("server", 0.0) >= peak / 2] or self.rows
        return {name: round(statistics.median(r.get(name, 0.0) for r in busy), 3)
                for name in [*self.pids, "box"]}


def stack(action: str, target: str, args: argparse.Namespace) -> str:
    env = {**os.environ, "BENCH_REDIS": target, "BENCH_PORT": str(args.port),
           "BENCH_REDIS_PORT": str(args.redis_port), "BENCH_DIR": str(args.state),
           "BENCH_APPENDFSYNC": args.appendfsync, "ADMIN_TOKEN": "bench"}
    done = subprocess.run(["scripts/benchstack.sh", action, *(["serve"] if action == "start"
                                                               else [])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"benchstack {action} {target} failed:\n{done.stdout}{done.stderr}")
    return done.stdout.strip()


def one_run(target: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    said = stack("start", target, args)
    try:
        pids = {"server": listening_pid(args.port),
                **redis_processes(args.state, target, args.redis_port)}
        load_at_start = Path("/proc/loadavg").read_text().split()[0]
        print(f"== {name}: {said} (load {load_at_start})", file=sys.stderr, flush=True)
        client = subprocess.Popen(
            [sys.executable, "-m", "loadtest", "bets", "--url", f"ws://127.0.0.1:{args.port}",
             "--admin-token", "bench", "--connections", str(args.connections),
             "--inflight", str(args.inflight), "--duration", str(args.duration), "--json"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        sampler = Sampler({**pids, "client": client.pid})
        sampler.start()
        try:
            out, _ = client.communicate(timeout=args.duration + 300)
        finally:
            sampler.halt.set()
            sampler.join()
        report: dict[str, Any] = json.loads(out) if out.strip() else {"error": "no output"}
        report["exit"] = client.returncode
        report["target"] = target
        report["load_at_start"] = float(load_at_start)
        report["cpu"] = sampler.steady()
        report["cpu_seconds"] = sampler.rows
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
        return report
    finally:
        stack("stop", target, args)


def row(name: str, r: dict[str, Any]) -> str:
    if "bets_per_s" not in r:
        return f"{name}: failed ({r.get('error')}, exit {r.get('exit')})"
    cpu = r["cpu"]
    redis = sum(v for k, v in cpu.items() if k.startswith(("master", "replica")))
    masters = [v for k, v in cpu.items() if k.startswith("master")]
    rate = r["bets_per_s"]
    errors = r.get("error_count", "?")
    return (f"{name:10} {rate:9,.0f} bets/s  p50 {r['latency_ms']['p50']:6.1f}"
            f"  p99 {r['latency_ms']['p99']:6.1f} ms  server {cpu.get('server', 0):.2f}"
            f"  redis {redis:.2f} (masters {'/'.join(f'{m:.2f}' for m in masters)})"
            f"  client {cpu.get('client', 0):.2f}  box {cpu.get('box', 0):.2f} cores"
            f"  redis {redis / rate * 1e6 if rate else 0:5.1f} us/bet"
            f"  server {cpu.get('server', 0) / rate * 1e6 if rate else 0:5.1f} us/bet"
            f"  errors {errors}  exit {r['exit']}  load {r['load_at_start']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--appendfsync", default="always",
                        choices=("always", "everysec", "no"))
    parser.add_argument("--targets", default="single,cluster")
    parser.add_argument("--port", type=int, default=int(os.environ.get("BENCH_PORT", 8030)))
    parser.add_argument("--redis-port", type=int,
                        default=int(os.environ.get("BENCH_REDIS_PORT", 6398)))
    parser.add_argument("--state", type=Path, default=Path("/tmp/stakepro-abcluster/stack"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/stakepro-abcluster"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "?")
    machine = [f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", f"nproc: {os.cpu_count()}",
               f"cpu: {cpu_model}", f"kernel: {platform.system()} {platform.release()}",
               f"commit: {head}", f"command: {' '.join(sys.argv)}",
               f"load at start: {Path('/proc/loadavg').read_text().strip()}"]
    (args.out / "machine.txt").write_text("\n".join(machine) + "\n")
    print("\n".join(machine), flush=True)
    results: list[tuple[str, dict[str, Any]]] = []
    for i in range(1, args.rounds + 1):
        for target in args.targets.split(","):
            name = f"{target}-{i}"
            try:
                results.append((name, one_run(target, name, args)))
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                results.append((name, {"error": repr(exc)}))
            print(row(*results[-1]), flush=True)
    print("\nsummary", flush=True)
    for name, r in results:
        print(row(name, r), flush=True)
    return 0 if all(r.get("exit") == 0 for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
