"""``python -m loadtest bets`` against the test server: a short run that must be correct
(bets settle, no errors, the report adds up). No speed thresholds."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from loadtest import serverstats
from loadtest.__main__ import parser
from loadtest.bets import run_bets
from loadtest.options import BetsOptions
from plumbing.settings import Settings
from tests.conftest import ADMIN_TOKEN, serve
from tests.helpers import Api


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def unlimited(settings: Settings) -> AsyncIterator[str]:
    """A server without a per-socket rate limit to speak of, for the closed-loop runs: on an
    idle machine one socket of them passes the default 2,000 messages a second, and the
    refusals that follow are the rate limit working, not the load tool failing."""
    own = settings.model_copy(update={"rate_per_socket": 1e9, "rate_burst": 10**9})
    async with serve(own) as served:
        yield served.address


async def test_bets_smoke(unlimited: str) -> None:
    options = BetsOptions(
        url=f"ws://{unlimited}", admin_token=ADMIN_TOKEN, connections=4, inflight=2,
        duration=2.0, ramp_up=0.2, encoding="msgpack",
        # Paced well under the server's per-socket message limit (RATE_PER_SOCKET): an
        # unpaced socket on a fast machine passes it and is rightly answered RATE_LIMITED.
        rate=2000.0,
    )
    report = await run_bets(options)
    assert report.bets > 0
    assert report.errors == {}, report.errors
    assert report.error_rate == 0
    assert report.ok
    assert not report.hard_timeout
    assert report.hist.get_total_count() == report.bets
    assert report.bets_all >= report.bets
    assert report.server_in_client  # the fixture serves from this process

    body = json.loads(json.dumps(report.to_dict()))
    for key in ("command", "options", "ok", "measured_s", "bets", "bets_per_s",
                "histogram_count", "latency_ms", "errors", "error_rate", "client", "server"):
        assert key in body, key
    assert body["command"] == "bets"
    assert body["histogram_count"] == body["bets"] == report.bets
    assert set(body["latency_ms"]) >= {"p50", "p90", "p99", "p99_9", "max"}
    lat = body["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    assert body["client"]["cpu_ms_per_1000_bets"] > 0
    bet_time = body["server"]["bet_time_ms"]
    assert bet_time["count"] >= report.bets_all  # other tests may bet on the shared server
    assert bet_time["median"] > 0
    assert "Authorization" not in json.dumps(body) and ADMIN_TOKEN not in json.dumps(body)
    assert "throughput" in report.table()


async def test_bets_json_encoding_and_shared_players(unlimited: str) -> None:
    """JSON frames, and two sockets per player (their balance pushes are skipped)."""
    report = await run_bets(BetsOptions(
        url=f"ws://{unlimited}", admin_token=ADMIN_TOKEN, connections=4, inflight=2,
        duration=1.0, ramp_up=0.0, encoding="json", players=2,
    ))
    assert report.bets > 0 and report.errors == {}, report.errors


async def test_bad_admin_token_is_a_setup_error(api: Api) -> None:
    from loadtest.players import SetupError

    try:
        await run_bets(BetsOptions(url=f"ws://{api.address}", admin_token="wrong",
                                   connections=1, duration=0.5))
    except SetupError as exc:
        assert "401" in str(exc) or "403" in str(exc)
    else:
        raise AssertionError("expected SetupError")


def test_cli_arguments() -> None:
    args = parser().parse_args(["bets", "--url", "ws://127.0.0.1:8011", "--connections", "7",
                                "--inflight", "3", "--duration", "5", "--json"])
    assert (args.command, args.connections, args.inflight, args.duration) == ("bets", 7, 3, 5.0)
    assert args.encoding == "msgpack" and args.json and args.max_error_rate == 0.01


def test_bucket_quantile() -> None:
    before = serverstats.parse_metrics(
        'stakepro_bet_seconds_bucket{le="0.001"} 5.0\n'
        'stakepro_bet_seconds_bucket{le="0.002"} 5.0\n'
        'stakepro_bet_seconds_bucket{le="+Inf"} 5.0\n'
        "stakepro_bet_seconds_count 5.0\nstakepro_bet_seconds_sum 0.004\n"
    )
    after = serverstats.parse_metrics(
        "# TYPE stakepro_bet_seconds histogram\n"
        'stakepro_bet_seconds_bucket{le="0.001"} 5.0\n'
        'stakepro_bet_seconds_bucket{le="0.002"} 105.0\n'
        'stakepro_bet_seconds_bucket{le="+Inf"} 105.0\n'
        "stakepro_bet_seconds_count 105.0\nstakepro_bet_seconds_sum 0.154\n"
    )
    t = serverstats.bet_time(before, after)
    assert t.count == 100
    assert t.p50_ms is not None and abs(t.p50_ms - 1.5) < 1e-9
    assert t.mean_ms is not None and abs(t.mean_ms - 1.5) < 1e-9
    assert t.top_ms == 2.0
    assert serverstats.bucket_quantile([(0.001, 1.0), (float("inf"), 10.0)], 0.99) == float("inf")
    assert serverstats.bucket_quantile([(0.001, 0.0), (float("inf"), 0.0)], 0.5) is None


async def test_error_replies_fail_the_run(api: Api) -> None:
    """Every bet refused (three decimals of USDT): counted by code, and the run fails."""
    report = await run_bets(BetsOptions(
        url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, connections=1, inflight=1,
        duration=0.5, ramp_up=0.0, amount="0.001",
    ))
    assert report.bets == 0 and report.errors.get("INVALID_AMOUNT", 0) > 0
    assert report.error_rate == 1.0 and not report.ok
    assert json.loads(json.dumps(report.to_dict()))["ok"] is False


# -- double-spend ----------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["picows", "websockets"])
async def test_double_spend_smoke(api: Api, client: Any) -> None:
    from loadtest.doublespend import DoubleSpendOptions, run_double_spend

    report = await run_double_spend(DoubleSpendOptions(
        url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, players=3, rounds=3, sockets=3,
        bets=8, client=client,
    ))
    assert report.ok, report.problems
    assert len(report.rounds) == 3
    for r in report.rounds:
        conclusive = [t for t in r.trials if not t.first_won]
        assert conclusive
        assert all(len(t.accepted) == 1 for t in conclusive), r.accepted()
        assert all(t.balance_after is not None and float(t.balance_after) == 0
                   for t in conclusive)
        assert set(r.rejected()) <= {"INSUFFICIENT_FUNDS"}, r.rejected()
        assert sum(r.rejected().values()) == 3 * (3 * 8 - 1)
    body = json.loads(json.dumps(report.to_dict()))
    assert body["command"] == "double-spend" and body["ok"] is True
    assert body["client"]["cpu_s"] >= 0
    assert "round   1" in report.table()


# -- bets --report, --rate, --client ----------------------------------------------------


async def test_bets_paced_with_html_report(api: Api, tmp_path: Path) -> None:
    from loadtest.report import write_html

    seen: list[Any] = []
    report = await run_bets(BetsOptions(
        url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, connections=3, inflight=2,
        duration=2.0, ramp_up=0.0, rate=60.0, on_result=lambda m, _ns: seen.append(m["bet_id"]),
    ))
    assert report.ok and report.errors == {}, report.errors
    assert report.bets_all == len(seen) == len(set(seen)) > 0
    assert report.bets_all <= 60 * 2.5  # paced: the rate is a ceiling
    assert sum(int(p["bets"] or 0) for p in report.series) == report.bets_all
    path = tmp_path / "bets.html"
    write_html(report, str(path))
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2
    assert "<polyline" in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")  # no external assets


def test_report_flag_via_cli(tmp_path: Path) -> None:
    args = parser().parse_args(["bets", "--report", str(tmp_path / "r.html"), "--rate", "100",
                                "--client", "websockets"])
    assert args.report.endswith("r.html") and args.rate == 100.0


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_bets_websockets_client(api: Api, encoding: str) -> None:
    """The fallback client (picows is the default when installed)."""
    report = await run_bets(BetsOptions(
        url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, connections=2, inflight=2,
        duration=1.0, ramp_up=0.0, client="websockets", encoding=encoding,
    ))
    assert report.bets > 0 and report.errors == {}, report.errors
    assert report.hist.get_total_count() == report.bets


async def test_bets_picows_paced_and_shared_players(api: Api) -> None:
    """picows' callback driver, paced, two sockets per player, every result handed over."""
    from loadtest.client import picows_available

    assert picows_available()  # in the dev extras: the default client of bets
    assert BetsOptions().client == "picows"
    seen: list[Any] = []
    report = await run_bets(BetsOptions(
        url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, connections=4, inflight=2,
        duration=1.5, ramp_up=0.0, client="picows", rate=80.0, players=2,
        on_result=lambda m, _ns: seen.append(m["bet_id"]),
    ))
    assert report.ok and report.errors == {}, report.errors
    assert report.bets_all == len(seen) == len(set(seen)) > 0
    assert report.bets_all <= 80 * 2.0
    assert sum(int(p["bets"] or 0) for p in report.series) == report.bets_all


def test_tally_folds_like_recording_every_value() -> None:
    """Latencies counted per HDR bucket and folded give the very histograms that recording
    every value does (the report's percentiles, min, max and mean, and the series)."""
    import random

    from hdrh.histogram import HdrHistogram

    from loadtest.tally import HIST_MAX_US, SERIES_DIGITS, Tally

    rng = random.Random(5)
    t0 = 1000.0
    tally = Tally(t0 + 0.5, t0 + 2.5, t0)
    direct = HdrHistogram(1, HIST_MAX_US, 3)
    seconds = [HdrHistogram(1, HIST_MAX_US, SERIES_DIGITS) for _ in range(3)]
    now_ns = int(t0 * 1e9)
    for _ in range(20_000):
        now_ns += rng.randrange(1, 300_000)
        if now_ns >= int((t0 + 3) * 1e9):
            break
        micros = int(rng.lognormvariate(8, 1.5)) + rng.choice((0, 0, 0, 70_000_000))
        tally.reply(now_ns - micros * 1000, now_ns)
        value = min(max(1, micros), HIST_MAX_US)
        if int((t0 + 0.5) * 1e9) <= now_ns < int((t0 + 2.5) * 1e9):
            direct.record_value(value)
        seconds[(now_ns - int(t0 * 1e9)) // 1_000_000_000].record_value(value)
        if rng.random() < 0.001:
            tally.fold()  # as the progress line does
    series = tally.series()
    hist = tally.hist
    assert hist.get_total_count() == direct.get_total_count() > 1000
    for p in (0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0):
        assert hist.get_value_at_percentile(p) == direct.get_value_at_percentile(p), p
    assert hist.get_min_value() == direct.get_min_value()
    assert hist.get_max_value() == direct.get_max_value() >= HIST_MAX_US
    assert hist.get_mean_value() == direct.get_mean_value()
    assert [p["bets"] for p in series] == [h.get_total_count() for h in seconds]
    assert [p["p99_ms"] for p in series] == [h.get_value_at_percentile(99.0) / 1000
                                             for h in seconds]


def test_picows_bet_frames() -> None:
    """The bet frames written by the picows driver: masked client frames whose payload is
    the template with the id spliced in; a reply's id is read at its fixed offset."""
    import msgpack

    from loadtest.picows_bets import _MSGPACK_ID_AT, _MSGPACK_RESULT, BetTemplate, Masker

    for encoding, bet_id in (("msgpack", (7 << 32) + 12345), ("json", (7 << 32) + 12345),
                             ("json", 10**12), ("json", 5)):
        template = BetTemplate(BetsOptions(encoding=encoding))  # type: ignore[arg-type]
        masker = Masker(template)
        for _ in range(2):  # the second one from the cached pieces
            frame = masker.frame(bet_id)
            assert frame[0] == (0x82 if encoding == "msgpack" else 0x81)
            n = frame[1] & 0x7F
            assert frame[1] & 0x80 and n == len(frame) - 6
            key = frame[2:6]
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(frame[6:]))
            message = (msgpack.unpackb(payload) if encoding == "msgpack"
                       else json.loads(payload))
            assert message == {"type": "bet", "id": bet_id, "currency": "USDT",
                               "amount": "0.01", "target": "50.00", "direction": "under"}
    bet_id = (1 << 32) + 1
    reply = msgpack.packb({"type": "bet_result", "id": bet_id, "bet_id": "1-1"})
    assert reply.startswith(_MSGPACK_RESULT, 1)
    assert int.from_bytes(reply[_MSGPACK_ID_AT:_MSGPACK_ID_AT + 8], "big") == bet_id
    template = BetTemplate(BetsOptions(target="5" * 300))
    long = Masker(template).frame(1 << 40)
    assert long[1] == 0x80 | 126 and int.from_bytes(long[2:4], "big") == len(long) - 8


# -- storm -----------------------------------------------------------------------------------


async def test_storm_commissions_exact(api: Api) -> None:
    """~50 players under one super master, 30 betting in one second: every ancestor's
    commission_earned is the exact sum of floored shares (the fixture flushes every 2 s)."""
    from loadtest.storm import StormOptions, run_storm

    report = await run_storm(StormOptions(
        url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, players=50, masters=2, agents=5,
        burst=30, window=1.0, lag_sample=10, commission_timeout=30.0, seed=7,
        http_connections=8,
    ))
    print(report.table())
    assert report.users_created == 1 + 2 + 5 + 50
    assert report.errors == {} and report.accepted == report.bets_sent == 30
    assert report.commissions_exact, [(a.role, a.earned, a.expected) for a in report.ancestors]
    assert all(a.expected > 0 for a in report.ancestors)
    assert len(report.lags_ms) == 10 and report.lag_timeouts == 0
    assert report.ok
    body = json.loads(json.dumps(report.to_dict()))
    assert body["commission"]["exact"] is True
    # The fixture's in-process flusher paid them: its statements reach /metrics via Redis.
    flush = body["flush_metrics"]
    assert flush["stakepro_commission_flush_statements_total"] >= 1, flush
    assert flush["stakepro_commission_units_paid_total"] >= 1, flush
    assert body["persistence_lag_ms"]["p50"] <= body["persistence_lag_ms"]["p99"]


async def test_storm_sustained(api: Api) -> None:
    from loadtest.storm import StormOptions, run_storm

    report = await run_storm(StormOptions(
        url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, players=12, masters=1, agents=3,
        burst=6, sustained=1.0, rate=30.0, lag_sample=3, seed=3, http_connections=4,
        client="websockets",  # the fallback; the burst test above runs the default (picows)
    ))
    assert report.bets_sent == 30 and report.accepted == 30, report.errors
    assert report.commissions_exact and report.ok


# -- spectators ------------------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "client"), [("json", "picows"), ("msgpack", "picows"),
                                                  ("json", "websockets"),
                                                  ("msgpack", "websockets")])
async def test_spectators_see_every_bet(api: Api, encoding: str, client: Any) -> None:
    from loadtest.spectators import SpectatorsOptions, run_spectators

    report = await run_spectators(SpectatorsOptions(
        url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, count=5, encoding=encoding,
        bet_rate=40.0, connections=2, inflight=2, duration=1.5, grace=5.0, client=client,
    ))
    print(report.table())
    assert report.bets.ok and report.results > 0, report.bets.errors
    assert report.frames_in_window > 0 and report.closed == {}
    assert report.every_bet_seen, (report.union_missing, report.first_missing,
                                   report.shared_counts, report.results)
    assert report.lag.get_total_count() >= report.results * 5
    assert report.ok
    body = json.loads(json.dumps(report.to_dict()))
    assert body["every_bet_seen"] is True and body["batches_per_s"] > 0
    assert body["feed_lag_ms"]["p50"] <= body["feed_lag_ms"]["p99"]


# -- sockets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("players", "client"), [(1, "picows"), (3, "websockets")])
async def test_sockets_held(api: Api, players: int, client: Any) -> None:
    from loadtest.sockets import SocketsOptions, run_sockets

    report = await run_sockets(SocketsOptions(
        url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, count=40, players=players,
        hold=0.5, settle=0.1, client=client,
    ))
    print(report.table())
    assert report.opened == 40 and report.alive == 40, report.failures
    assert report.ok and report.server_in_client and report.rss_before is not None
    body = json.loads(json.dumps(report.to_dict()))
    assert body["held"] == 40 and body["server"]["rss_bytes"]["all_open"] > 0
    assert body["client"]["nofile"][0] >= 40


def test_double_spend_verdicts() -> None:
    """A round is inconclusive only when the FIRST accepted bet (lowest nonce) won."""
    from loadtest.doublespend import Trial

    lost = {"nonce": 3, "win": False, "balance": "0.00"}
    won_first = Trial(1, accepted=[{"nonce": 2, "win": True, "balance": "99.00"},
                                   {"nonce": 3, "win": False, "balance": "98.00"}])
    assert won_first.first_won
    two_after_loss = Trial(2, accepted=[lost, {"nonce": 4, "win": True, "balance": "9.00"}])
    assert not two_after_loss.first_won and two_after_loss.problems("1.00")
    good = Trial(3, accepted=[lost], balance_after="0.00", deposit_balance="1.00")
    good.errors["INSUFFICIENT_FUNDS"] += 63
    assert good.problems("1.00") == []
    none = Trial(4)
    assert none.problems("1.00") == ["user 4: 0 bets accepted"]
    other = Trial(5, accepted=[lost], balance_after="0.00")
    other.errors["RATE_LIMITED"] += 1
    assert other.problems("1.00")


def test_cli_every_command_has_json() -> None:
    p = parser()
    for argv in (["double-spend", "--players", "2"], ["storm", "--players", "50", "--bps",
                                                      "1/2/3", "--sustained", "2"],
                 ["spectators", "--count", "3", "--bet-rate", "10"],
                 ["sockets", "--count", "3", "--hold", "1"]):
        args = p.parse_args([*argv, "--json"])
        assert args.json and callable(args.run)
    assert p.parse_args(["storm", "--bps", "1/2/3"]).bps == (1, 2, 3)
    with pytest.raises(SystemExit):
        p.parse_args(["storm", "--bps", "1/2"])


def test_cli_fills_every_option_from_its_flag() -> None:
    """Every flag of a command lands in the field of the same name of its options (the
    command line fills them by name: a flag without its field would be dropped silently)."""
    import dataclasses

    from loadtest import __main__ as cli

    not_options = {"json", "quiet", "report", "run", "command"}
    classes = {"bets": BetsOptions, "double-spend": cli.doublespend.DoubleSpendOptions,
               "storm": cli.storm.StormOptions, "spectators": cli.spectators.SpectatorsOptions,
               "sockets": cli.sockets.SocketsOptions, "page": cli.page.PageOptions}
    p = parser()
    for command, cls in classes.items():
        args = p.parse_args([command])
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(vars(args)) - not_options <= fields, command
    args = p.parse_args(["double-spend", "--url", "ws://127.0.0.1:9", "--players", "3",
                         "--amount", "2.50", "--client", "websockets", "--encoding", "json"])
    options = cli.options_from(cli.doublespend.DoubleSpendOptions, args)
    assert (options.url, options.players, options.amount, options.client, options.encoding) == (
        "ws://127.0.0.1:9", 3, "2.50", "websockets", "json")
    assert options.play_url == "ws://127.0.0.1:9/ws/play"
    assert options.http_url == "http://127.0.0.1:9"
    assert options.target == "0.01" and options.round_timeout == 15.0  # the defaults


@pytest.mark.parametrize(("low", "high", "refused"), [
    ("1.005", "50.00", "--min-amount 1.005"),  # more decimals than USDT has
    ("1.00", "0", "--max-amount 0"),
    ("5.00", "1.00", "above --max-amount"),
])
async def test_storm_refuses_bad_stakes_before_creating_anyone(
    api: Api, low: str, high: str, refused: str
) -> None:
    from loadtest.players import SetupError
    from loadtest.storm import StormOptions, run_storm

    before, _ = await api.create_user()
    with pytest.raises(SetupError, match=refused):
        await run_storm(StormOptions(
            url=f"ws://{api.address}", admin_token=ADMIN_TOKEN, players=3, masters=1,
            agents=1, burst=1, min_amount=low, max_amount=high,
        ))
    after, _ = await api.create_user()
    assert after == before + 1  # the storm made no user


async def test_page_command_measures_a_first_bet(api: Api, chromium_path: str) -> None:
    from loadtest.page import PageOptions, run_page

    report = await run_page(PageOptions(url=f"http://{api.address}/", runs=1,
                                        chromium=chromium_path))
    assert report.ok, report.errors
    assert report.weights[0] > 10_000 and report.resources[0] >= 3
    assert report.first_bet_ms[0] > 0
    assert json.loads(json.dumps(report.to_dict()))["first_settled_bet_ms"]


# -- the picows driver against a misbehaving server -------------------------------------------


@pytest.mark.parametrize("client", ["picows", "websockets"])
@pytest.mark.parametrize("mode", ["silent", "silent_paced", "close", "errors"])
async def test_bets_count_misbehaving_server(api: Api, mode: str, client: Any) -> None:
    """A server that never answers bets (all UNANSWERED after the drain), one that drops
    the socket at the second bet (CLOSED), one that refuses every bet and sends one reply with
    an id never sent (errors by code, UNKNOWN_ID): counted alike by both clients."""
    import msgpack
    import picows

    class Fake(picows.WSListener):  # type: ignore[misc]
        bets = 0

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type != picows.WSMsgType.BINARY:
                return
            message = msgpack.unpackb(frame.get_payload_as_bytes())
            if message["type"] == "auth":
                transport.send(picows.WSMsgType.BINARY,
                               msgpack.packb({"type": "welcome", "user_id": 1}))
                return
            self.bets += 1
            if mode == "close" and self.bets == 2:
                transport.disconnect()
            elif mode == "errors":
                transport.send(picows.WSMsgType.BINARY, msgpack.packb(
                    {"type": "error", "id": message["id"], "code": "RATE_LIMITED",
                     "message": "no"}))
                if self.bets == 1:
                    transport.send(picows.WSMsgType.BINARY, msgpack.packb(
                        {"type": "bet_result", "id": 12345, "bet_id": "1-1"}))

    server = await picows.ws_create_server(lambda _request: Fake(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        report = await run_bets(BetsOptions(
            url=f"ws://127.0.0.1:{port}", http=f"http://{api.address}",
            admin_token=ADMIN_TOKEN, connections=3, inflight=2, duration=0.5, ramp_up=0.0,
            drain_timeout=0.5, client=client, rate=100.0 if mode == "silent_paced" else None,
        ))
    finally:
        server.close()
    assert report.bets_all == 0 and not report.ok and not report.hard_timeout
    if mode.startswith("silent"):
        assert report.errors == {"UNANSWERED": 3 * 2}
    elif mode == "close":
        assert report.errors == {"CLOSED": 3}
    else:
        assert report.errors["UNKNOWN_ID"] == 3
        assert report.errors["RATE_LIMITED"] > 3 * 2
        assert set(report.errors) == {"UNKNOWN_ID", "RATE_LIMITED"}
