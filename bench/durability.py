"""Cost of Redis AOF fsync policies on the real bet script (lua/bet-n.lua): docs/durability.md.

python -m bench.durability bench  -> bets/s and latency per policy (C clients x P in flight)
python -m bench.durability kill 8 -> SIGKILL redis mid-stream (everysec): acked vs recovered
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parent.parent
BET = (REPO / "lua" / "bet-n.lua").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, policy: str, data: Path | None = None) -> None:
        self.policy = policy
        self.port = free_port()
        self.dir = data or Path(tempfile.mkdtemp(prefix="durbench-", dir="/var/tmp"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        aof = ["--appendonly", "no"] if self.policy == "off" else [
            "--appendonly", "yes", "--appendfsync", self.policy]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.dir), *aof], stdout=subprocess.DEVNULL)
        for _ in range(400):
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.025)
        raise RuntimeError("no redis")

    def stop(self, kill: bool = False) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.proc.wait(30)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def keys_of(u: int) -> list[str]:
    tag = f"{{b{u % 64}}}"
    return [f"sp:bal:{tag}:{u}", f"sp:seed:{tag}:{u}", f"sp:outbox:{tag}",
            f"sp:push:{tag}:{u}", f"sp:healed:{tag}:{u}", ""]


async def setup(r: aioredis.Redis, users: int) -> tuple[str, str]:
    sha = await r.script_load(BET)
    rid = (await r.info("server"))["run_id"]
    pipe = r.pipeline(transaction=False)
    for u in range(users):
        k = keys_of(u)
        pipe.hset(k[0], "USDT", 10**15)
        pipe.hset(k[1], mapping={"pid": str(u), "ss": "a" * 64, "sh": "b" * 64,
                                 "cs": "client", "n": "0", "rid": rid})
        pipe.set(k[4], rid)  # healed under this run: bet-n would answer HEAL otherwise
    await pipe.execute()
    return sha, rid


def encode(*args: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


async def client(port: int, sha: str, rid: str, users: list[int], depth: int,
                 until: float, lat: list[float]) -> int:
    """One connection, closed loop: send ``depth`` bets (distinct users) in one write, wait
    for the ``depth`` replies (raw RESP + hiredis: the client must not be the bottleneck)."""
    import hiredis

    reader_, writer = await asyncio.open_connection("127.0.0.1", port)
    parser = hiredis.Reader()
    nonce = dict.fromkeys(users, 0)
    done = 0
    i = 0
    event = msgpack.packb({"bet_id": "123-45", "user_id": 1, "pair_id": 123,
                           "currency": "USDT", "amount": 100, "payout": 198, "roll": 4410,
                           "target": 5000, "direction": "under", "nonce": 45,
                           "multiplier": 19801, "server_seed_hash": "b" * 64,
                           "client_seed": "client", "ts": 1764000000000})
    stored = msgpack.packb(["123-45", 4410, True, 19801, 198, 45, "b" * 64, "client"])
    while time.monotonic() < until:
        batch = []
        frames = []
        for _ in range(min(depth, len(users))):
            u = users[i % len(users)]
            i += 1
            batch.append(u)
            k = keys_of(u)
            k[5] = f"sp:idem:{k[0].split(':')[2]}:{u}:s:{nonce[u] + 1}"
            frames.append(encode("EVALSHA", sha, "6", *k, str(u), rid, "300000", "0",
                                 "USDT", "100", "-100", str(nonce[u]), "USDT|100|5000|under",
                                 stored, event, "bench:1"))
        t0 = time.perf_counter()
        writer.write(b"".join(frames))
        replies: list[Any] = []  # hiredis replies: nested lists of the bet-n results
        while len(replies) < len(batch):
            reply = parser.gets()
            if reply is False:
                parser.feed(await reader_.read(65536))
                continue
            replies.append(reply)
        lat.append(time.perf_counter() - t0)
        for u, reply in zip(batch, replies, strict=True):
            assert reply[0][0] == 0, reply
            nonce[u] += 1
        done += len(batch)
    writer.close()
    return done


async def bench_one(policy: str, clients: int, depth: int, seconds: float,
                    users: int = 2048) -> dict[str, float]:
    server = Server(policy)
    server.start()
    try:
        r = aioredis.Redis.from_url(server.url, max_connections=clients + 4)
        sha, rid = await setup(r, users)
        lat: list[float] = []
        per = users // clients
        until = time.monotonic() + seconds
        t0 = time.monotonic()
        counts = await asyncio.gather(*(
            client(server.port, sha, rid, list(range(c * per, (c + 1) * per)), depth, until, lat)
            for c in range(clients)))
        elapsed = time.monotonic() - t0
        info = await r.info("persistence")
        info["bytes_per_bet"] = info.get("aof_current_size", 0) / max(1, sum(counts))
        await r.aclose()
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
    lat.sort()

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    return {"ops": sum(counts) / elapsed, "p50": q(0.5), "p99": q(0.99), "max": lat[-1] * 1000,
            "aof_delayed_fsync": float(info.get("aof_delayed_fsync", 0)),
            "bpb": float(info["bytes_per_bet"])}


async def bench() -> None:
    seconds = float(os.environ.get("SECONDS_PER_RUN", "8"))
    print("policy    clients depth   bets/s   p50 ms   p99 ms   max ms  delayed_fsync")
    shapes = [tuple(map(int, x.split("x"))) for x in os.environ.get(
        "SHAPES", "1x1,16x1,64x1,8x32").split(",")]
    for clients, depth in shapes:
        for policy in os.environ.get("POLICIES", "off,everysec,always").split(","):
            m = await bench_one(policy, clients, depth, seconds)
            print(f"{policy:9} {clients:7} {depth:5} {m['ops']:8.0f} {m['p50']:8.3f} "
                  f"{m['p99']:8.3f} {m['max']:8.2f}  {m['aof_delayed_fsync']:.0f}  "
                  f"{m['bpb']:.0f} B/bet", flush=True)


async def kill(rounds: int) -> None:
    """A sequential writer INCRs a counter; SIGKILL the server at a random moment; the
    recovered counter must be >= the last acknowledged value (everysec, process crash)."""
    import random

    for n in range(rounds):
        server = Server("everysec")
        server.start()
        r = aioredis.Redis.from_url(server.url)
        acked = 0
        stop_at = time.monotonic() + random.uniform(0.5, 2.5)
        try:
            while True:
                if time.monotonic() >= stop_at and server.proc and server.proc.poll() is None:
                    server.proc.send_signal(signal.SIGKILL)
                acked = int(await r.incr("c"))
        except Exception:
            pass
        server.proc.wait(10)  # type: ignore[union-attr]
        await r.aclose()
        again = Server("everysec", server.dir)
        again.port = server.port
        again.start()
        r = aioredis.Redis.from_url(again.url)
        got = int(await r.get("c") or 0)
        await r.aclose()
        again.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
        print(f"round {n}: acknowledged {acked}, recovered {got}, lost "
              f"{max(0, acked - got)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "bench":
        asyncio.run(bench())
    else:
        asyncio.run(kill(int(sys.argv[2]) if len(sys.argv) > 2 else 5))
