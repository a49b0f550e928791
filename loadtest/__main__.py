"""``python -m loadtest <command>``: load tools for a StakePro server.

Commands (``python -m loadtest COMMAND --help`` for each one's options):

  bets          closed-loop (or ``--rate``-paced) bets over many player sockets: throughput,
                HDR latency, server bet time from /metrics; ``--report FILE.html`` plots
                throughput and p99 per second; picows when installed (``--client``)
  double-spend  simultaneous full-balance bets of many players over several sockets, many
                rounds: exactly one accepted per player per round, final balance 0
  storm         10,000 players under one super master, 500 betting in the same second (or
                ``--sustained S`` at ``--rate``): commissions exact, flush metrics,
                persistence lag
  spectators    ``--count N`` /ws/feed sockets while bets run: batches/s, feed lag, every
                bet seen
  sockets       ``--count N`` authenticated idle sockets held ``--hold S``: server RSS per
                socket
  page          the browser page in headless Chromium: page weight, and time from load to
                the first settled bet of a new demo player

Every command prints a table (or one JSON object with ``--json``) including its own CPU
time, exits 0 when its checks passed, 1 when they failed, 2 when setup failed. Every run is
bounded in time and stops by itself; point it at loopback or a test host only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from loadtest import bets, common, doublespend, page, sockets, spectators, storm
from loadtest.client import CLIENTS, DEFAULT_CLIENT, picows_available
from loadtest.options import DEFAULT_URL, BetsOptions

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Opts = TypeVar("Opts", bound="DataclassInstance")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every command shares: where the server is and how to administer it."""
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"WebSocket base of the server (default {DEFAULT_URL})")
    parser.add_argument("--http", default=None,
                        help="HTTP base for the admin API and /metrics (default: from --url)")
    parser.add_argument("--admin-token", default=os.environ.get("ADMIN_TOKEN", "dev-admin-token"),
                        help="admin bearer token (default: $ADMIN_TOKEN, else dev-admin-token)")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="server pid for CPU/RSS (default: found by port when local)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                help: str, module: ModuleType, server: bool = True) -> argparse.ArgumentParser:
    """The parser of one command: its help line, its module's docstring as description,
    and (``server``) the arguments every server command shares."""
    p = sub.add_parser(name, help=help, description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if server:
        add_server_arguments(p)
    return p


def add_encoding(parser: argparse.ArgumentParser, default: str = "msgpack",
                 help: str | None = None) -> None:
    parser.add_argument("--encoding", choices=("json", "msgpack"), default=default, help=help)


def add_client(parser: argparse.ArgumentParser,
               help: str = f"socket implementation: picows or websockets ({DEFAULT_CLIENT})",
               ) -> None:
    parser.add_argument("--client", choices=CLIENTS, default=DEFAULT_CLIENT, help=help)


def options_from(cls: type[Opts], args: argparse.Namespace, **extra: Any) -> Opts:
    """``cls`` (an options dataclass) with every field that has a command-line argument of
    the same name taken from ``args``, then ``extra``; the others keep their defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if f.init and hasattr(args, f.name)}
    return cls(**given, **extra)


def add_bets(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(sub, "bets", "closed-loop bets over many player sockets", bets)
    p.add_argument("--connections", type=_positive_int, default=100, help="sockets (100)")
    p.add_argument("--inflight", type=_positive_int, default=4,
                   help="bets in flight on each socket (4)")
    p.add_argument("--duration", type=_positive_float, default=10.0,
                   help="measured seconds, after the ramp-up (10)")
    p.add_argument("--ramp-up", type=_non_negative_float, default=1.0,
                   help="seconds over which the sockets open (1)")
    p.add_argument("--currency", default="USDT")
    p.add_argument("--amount", default="0.01", help="stake of every bet (0.01)")
    p.add_argument("--target", default="50.00")
    p.add_argument("--direction", choices=("under", "over"), default="under")
    p.add_argument("--players", type=_positive_int, default=None,
                   help="distinct players (default: one per socket)")
    p.add_argument("--deposit", default="1000000",
                   help="credited to each player before the run (1000000)")
    add_encoding(p)
    p.add_argument("--max-error-rate", type=float, default=0.01,
                   help="exit 1 above this fraction of errors (0.01)")
    p.add_argument("--drain-timeout", type=_positive_float, default=5.0,
                   help="seconds to wait for the last replies (5)")
    add_client(p, "socket implementation: picows (the cheaper, when installed) or"
                  f" websockets ({DEFAULT_CLIENT})")
    p.add_argument("--rate", type=_positive_float, default=None,
                   help="paced: at most this many bets/s over all sockets (default: closed"
                        " loop)")
    p.add_argument("--report", metavar="FILE.html", default=None,
                   help="also write throughput and p99 per second as a self-contained HTML"
                        " page")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.set_defaults(run=run_bets)


def run_bets(args: argparse.Namespace) -> int:
    options = options_from(BetsOptions, args, progress=None if args.quiet else sys.stderr)
    return bets.main(options, args.json, args.report)


def add_double_spend(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(sub, "double-spend",
                    "simultaneous full-balance bets: exactly one accepted", doublespend)
    p.add_argument("--players", type=_positive_int, default=20,
                   help="players betting at once in every round (20)")
    p.add_argument("--rounds", type=_positive_int, default=10, help="rounds (10)")
    p.add_argument("--sockets", type=_positive_int, default=4, help="sockets per player (4)")
    p.add_argument("--bets", type=_positive_int, default=16,
                   help="simultaneous bets per socket (16; the server allows 64 in flight)")
    p.add_argument("--currency", default="USDT")
    p.add_argument("--amount", default="1.00",
                   help="the deposit and the stake of every bet (1.00)")
    p.add_argument("--target", default="0.01", help="under 0.01: a win is 1 in 10,001")
    add_encoding(p)
    add_client(p)
    p.add_argument("--round-timeout", type=_positive_float, default=15.0,
                   help="seconds to wait for every reply of a round (15)")
    p.set_defaults(run=run_double_spend)


def run_double_spend(args: argparse.Namespace) -> int:
    options = options_from(doublespend.DoubleSpendOptions, args)
    return common.cli_main(lambda: doublespend.run_double_spend(options), args.json)


def _bps(text: str) -> tuple[int, int, int]:
    parts = text.split("/")
    if len(parts) != 3 or not all(p.isdigit() and int(p) <= 10000 for p in parts):
        raise argparse.ArgumentTypeError(
            "three integers 0..10000: super/master/agent, e.g. 20/30/50")
    return int(parts[0]), int(parts[1]), int(parts[2])


def add_storm(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(sub, "storm", "10,000 players under one super master, 500 betting in"
                                  " one second: commissions exact, persistence lag", storm)
    p.add_argument("--players", type=_positive_int, default=10_000,
                   help="players in the tree (10000)")
    p.add_argument("--masters", type=_positive_int, default=10, help="masters (10)")
    p.add_argument("--agents", type=_positive_int, default=100,
                   help="agents in all, spread over the masters (100)")
    p.add_argument("--bps", type=_bps, default=(20, 30, 50),
                   help="commission_bps of super master/master/agent (20/30/50)")
    p.add_argument("--burst", type=_positive_int, default=500,
                   help="players that bet, one socket each (500)")
    p.add_argument("--window", type=_positive_float, default=1.0,
                   help="seconds the burst's bets are spread over (1)")
    p.add_argument("--sustained", type=_positive_float, default=None, metavar="S",
                   help="instead of one burst, bet for S seconds at --rate")
    p.add_argument("--rate", type=_positive_float, default=500.0,
                   help="bets/s over all betting players with --sustained (500)")
    p.add_argument("--currency", default="USDT")
    p.add_argument("--min-amount", default="1.00", help="smallest stake (1.00)")
    p.add_argument("--max-amount", default="50.00", help="largest stake (50.00)")
    p.add_argument("--lag-sample", type=int, default=100,
                   help="bets whose persistence lag is measured (100)")
    p.add_argument("--poll-interval", type=_positive_float, default=0.1,
                   help="seconds between two GET /api/bets/{id} of one sampled bet (0.1)")
    p.add_argument("--commission-timeout", type=_positive_float, default=30.0,
                   help="seconds to wait for exact commissions (30)")
    p.add_argument("--http-connections", type=_positive_int, default=32,
                   help="HTTP connections for the admin API (32)")
    add_encoding(p)
    add_client(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the random stakes")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run_storm)


def run_storm(args: argparse.Namespace) -> int:
    options = options_from(storm.StormOptions, args,
                           progress=storm.progress_stream(args.quiet))
    return common.cli_main(lambda: storm.run_storm(options), args.json)


def add_spectators(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(sub, "spectators", "many /ws/feed sockets while bets run: batches/s,"
                                       " feed lag, every bet seen", spectators)
    p.add_argument("--count", type=_positive_int, default=100, help="spectator sockets (100)")
    add_encoding(p, "json", "feed frames (json)")
    p.add_argument("--bet-rate", type=_positive_float, default=200.0,
                   help="bets/s of the bets load running meanwhile (200)")
    p.add_argument("--connections", type=_positive_int, default=20,
                   help="player sockets of the bets load (20)")
    p.add_argument("--inflight", type=_positive_int, default=4,
                   help="bets in flight per player socket at most (4)")
    p.add_argument("--duration", type=_positive_float, default=10.0,
                   help="seconds of betting (10)")
    p.add_argument("--grace", type=_non_negative_float, default=5.0,
                   help="seconds to wait for the last batches (5)")
    add_client(p, f"feed and player sockets: picows or websockets ({DEFAULT_CLIENT})")
    p.set_defaults(run=run_spectators)


def run_spectators(args: argparse.Namespace) -> int:
    options = options_from(spectators.SpectatorsOptions, args,
                           progress=None if args.json else sys.stderr)
    return common.cli_main(lambda: spectators.run_spectators(options), args.json)


def add_sockets(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(sub, "sockets",
                    "hold N authenticated idle sockets: server RSS per socket", sockets)
    p.add_argument("--count", type=_positive_int, default=1000, help="sockets (1000)")
    p.add_argument("--players", type=_positive_int, default=1,
                   help="players the sockets sign in as (1: one token for all)")
    p.add_argument("--hold", type=_non_negative_float, default=10.0,
                   help="seconds to hold them idle (10)")
    p.add_argument("--connect-concurrency", type=_positive_int, default=200,
                   help="handshakes at a time (200)")
    p.add_argument("--source-addresses", type=_positive_int, default=None,
                   help="client addresses 127.0.0.1.. on loopback (default: 1 per 20,000)")
    add_encoding(p)
    add_client(p)
    p.set_defaults(run=run_sockets)


def run_sockets(args: argparse.Namespace) -> int:
    options = options_from(sockets.SocketsOptions, args,
                           progress=None if args.json else sys.stderr)
    return common.cli_main(lambda: sockets.run_sockets(options), args.json)


def add_page(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(sub, "page", "the browser page: weight and load-to-first-bet time", page,
                    server=False)
    p.add_argument("--url", default="http://127.0.0.1:8000/",
                   help="the page (default http://127.0.0.1:8000/; demo mode must be on)")
    p.add_argument("--runs", type=_positive_int, default=3, help="fresh browser contexts (3)")
    p.add_argument("--chromium", default=page.CHROMIUM, help="Chromium executable")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_page)


def run_page(args: argparse.Namespace) -> int:
    options = options_from(page.PageOptions, args)
    return common.cli_main(lambda: page.run_page(options), args.json)


COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_bets,
    add_double_spend,
    add_storm,
    add_spectators,
    add_sockets,
    add_page,
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "client", None) == "picows" and not picows_available():
        print("--client picows: picows is not installed (pip install picows)", file=sys.stderr)
        return 2
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
