"""A Redis Cluster (3 masters, 3 replicas on loopback) that outlives this command, for
scripts/benchstack.sh (``BENCH_REDIS=cluster``) and bench/ab_cluster.sh.

``start DIR``: starts the cluster of tests/rediscluster.py, then turns on every node's AOF
with the fsync policy the single Redis of the same benchmark keeps (``--appendfsync``,
default ``always`` as ``make run``; no automatic rewrite, as scripts/benchstack.sh says
why), waits until each node's AOF is on, and writes what ``stop`` needs into DIR: one
``cluster-node-<port>.pid`` per node (benchstack's ``stop`` kills every ``DIR/*.pid``),
``cluster.root`` (the nodes' data directories) and ``cluster.url`` (a node's URL: any node
will do for ``REDIS_URL``). It prints that URL.

``ports DIR``: the masters' ports now, one a line (for measuring their CPU).
``stop DIR``: SIGTERM to every node, then removes the data directories.

The nodes are started by this process and keep running after it exits; run it under
``setsid`` so a Ctrl-C meant for the load client does not reach them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.rediscluster import RedisCluster, command

POLICIES = ("always", "everysec", "no")


def aof_on(port: int) -> bool:
    """Whether the node at ``port`` writes its AOF (the initial rewrite is over)."""
    info = command(port, "INFO", "persistence")
    return "aof_enabled:1" in info and "aof_rewrite_in_progress:0" in info


def start(state: Path, appendfsync: str) -> str:
    state.mkdir(parents=True, exist_ok=True)
    cluster = RedisCluster()
    try:
        cluster.start()
        for node in cluster.nodes:
            command(node.port, "CONFIG", "SET", "appendfsync", appendfsync)
            command(node.port, "CONFIG", "SET", "auto-aof-rewrite-percentage", "0")
            command(node.port, "CONFIG", "SET", "appendonly", "yes")
        deadline = time.monotonic() + 60
        while not all(aof_on(node.port) for node in cluster.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the nodes' AOF did not come on within 60 s")
            time.sleep(0.1)
        cluster.wait_ok(time.monotonic() + 60)
    except BaseException:
        cluster.cleanup()
        raise
    for node in cluster.nodes:
        assert node.proc is not None
        (state / f"cluster-node-{node.port}.pid").write_text(f"{node.proc.pid}\n")
    (state / "cluster.root").write_text(str(cluster.root))
    (state / "cluster.url").write_text(cluster.url)
    return cluster.url


def master_ports(state: Path) -> list[int]:
    port = int((state / "cluster.url").read_text().rsplit(":", 1)[1].split("/")[0])
    ports = []
    for line in command(port, "CLUSTER", "NODES").splitlines():
        fields = line.split()
        if "master" in fields[2].split(",") and len(fields) > 8:
            ports.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
    return sorted(ports)


def stop(state: Path) -> None:
    pids = []
    for pidfile in state.glob("cluster-node-*.pid"):
        pids.append(int(pidfile.read_text()))
        pidfile.unlink()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    root = state / "cluster.root"
    if root.exists():
        shutil.rmtree(root.read_text().strip(), ignore_errors=True)
        root.unlink()
    (state / "cluster.url").unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "ports", "stop"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--appendfsync", choices=POLICIES, default="always")
    args = parser.parse_args()
    if args.action == "start":
        print(start(args.dir, args.appendfsync))
    elif args.action == "ports":
        print("\n".join(map(str, master_ports(args.dir))))
    else:
        stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
