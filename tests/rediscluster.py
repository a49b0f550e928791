"""A real Redis Cluster for the tests: 3 masters and 3 replicas on free loopback ports.

Each node is ``redis-server --cluster-enabled yes`` in a temporary directory of its own
(its ``nodes.conf`` lives there); ``redis-cli --cluster create ... --cluster-replicas 1
--cluster-yes`` assigns the 16,384 slots and the replicas, and :meth:`RedisCluster.start`
returns only once every node's ``CLUSTER INFO`` says ``cluster_state:ok``, every slot is
assigned and every node knows all six. :meth:`RedisCluster.cleanup` stops every process
and removes the directories.

Used by the ``redis_cluster`` fixture of tests/conftest.py (session-scoped, started only
by the tests that ask for it) and by ``python -m bench.clusterbench``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import redis_pongs

MASTERS = 3
REPLICAS_PER_MASTER = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_port_pair() -> int:
    """A free port p whose cluster bus port p + 10000 is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def command(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command through redis-cli, its reply as text (raises when redis-cli fails)."""
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True, text=True, timeout=timeout, check=True,
    )
    return done.stdout


class ClusterNode:
    def __init__(self, root: Path) -> None:
        self.port = cluster_port_pair()
        self.dir = root / str(self.port)
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "2000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def ping(self) -> bool:
        return redis_pongs(self.port)

    def info(self) -> dict[str, str]:
        text = command(self.port, "CLUSTER", "INFO")
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line
        )

    def run_id(self) -> str:
        """This server's run id (``INFO server``)."""
        for line in command(self.port, "INFO", "server").splitlines():
            if line.startswith("run_id:"):
                return line.split(":", 1)[1].strip()
        raise LookupError(f"{self.port}: no run_id in INFO server")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class RedisCluster:
    """Six nodes on loopback; ``url`` names one of them (any node will do)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="stakepro-cluster-"))
        self.nodes = [ClusterNode(self.root) for _ in range(MASTERS * (1 + REPLICAS_PER_MASTER))]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout
        while not all(node.ping() for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster nodes did not start")
            time.sleep(0.025)
        subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", str(REPLICAS_PER_MASTER), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, check=True,
        )
        self.wait_ok(deadline)

    def wait_ok(self, deadline: float) -> None:
        """Until every node says the cluster is ok with every slot served, every node sees
        all six with their roles (gossip spreads the replicas' roles after ``--cluster
        create`` returns) and every replica's link to its master is up."""
        state = "not asked yet"
        while time.monotonic() < deadline:
            try:
                state = self._not_ready()
            except subprocess.SubprocessError as exc:
                state = repr(exc)
            if not state:
                return
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ready: {state}")

    def _not_ready(self) -> str:
        """What is not ready yet ("" when all is)."""
        want_replicas = MASTERS * REPLICAS_PER_MASTER
        for node in self.nodes:
            info = node.info()
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return f"{node.port}: {info}"
            flags = [line.split()[2] for line in
                     command(node.port, "CLUSTER", "NODES").splitlines()]
            replicas = sum("slave" in f.split(",") for f in flags)
            if len(flags) != len(self.nodes) or replicas != want_replicas:
                return f"{node.port} sees {len(flags)} nodes, {replicas} replicas"
            replication = command(node.port, "INFO", "replication")
            if "role:slave" in replication and "master_link_status:up" not in replication:
                return f"{node.port}: replica not in sync"
        return ""

    def masters(self) -> list[ClusterNode]:
        """The nodes that serve slots as masters now (after a failover, not the ones first
        made), as one node sees them."""
        by_port = {node.port: node for node in self.nodes}
        found = []
        for line in command(self.nodes[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" in fields[2].split(",") and len(fields) > 8:
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                found.append(by_port[port])
        return found

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        """A replica of ``master`` now."""
        master_id = command(master.port, "CLUSTER", "MYID").strip()
        by_port = {node.port: node for node in self.nodes}
        for line in command(master.port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if fields[3] == master_id and "fail" not in fields[2]:
                return by_port[int(fields[1].split("@")[0].rsplit(":", 1)[1])]
        raise LookupError(f"no replica of {master.port}")

    def is_master(self, node: ClusterNode) -> bool:
        """Whether every running node sees ``node`` as a master serving slots and the
        cluster as ok (a promotion has spread)."""
        for other in self.nodes:
            if other.proc is None:
                continue
            if other.info().get("cluster_state") != "ok":
                return False
            for line in command(other.port, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if fields[1].split("@")[0].endswith(f":{node.port}"):
                    if "master" not in fields[2].split(",") or len(fields) < 9:
                        return False
        return True

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)
