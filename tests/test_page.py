"""The browser page (static/) in real headless Chromium through Playwright, against the real
server of the session: sign-in, bets, wins and losses, seed rotation and in-page verification,
autobet, the live feed, the standalone verifier opened from disk, and a 375 px phone screen.

Chromium is Debian's (/usr/bin/chromium); if it is missing the session installs it with apt-get
and fails with a clear message when that is impossible. Every page is watched for console
errors and uncaught exceptions, and a test fails if there is any. Waits use function
predicates (``"() => ..."``): the page's Content-Security-Policy forbids eval, which
Playwright needs for a bare expression."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright

from games import dice
from tests import vectors as known_answers
from tests.helpers import Api

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEMO_USDT = Decimal("1000.00")


@pytest_asyncio.fixture(scope="session")
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium_path, headless=True, args=ARGS)
        yield b
        await b.close()


class Watched:
    """A page in its own context (own localStorage: a fresh demo player) with its console
    errors and page errors collected."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors


@pytest_asyncio.fixture
async def open_page(browser: Browser) -> AsyncIterator[Any]:
    contexts = []

    async def opener(url: str, width: int = 1280, height: int = 900) -> Watched:
        context = await browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(15000)
        contexts.append(context)
        watched = Watched(await context.new_page())
        await watched.page.goto(url)
        return watched

    yield opener
    for context in contexts:
        await context.close()


def url(api: Api) -> str:
    return f"http://{api.address}/"


async def sign_in(page: Page) -> None:
    await page.click("#signin")
    await page.wait_for_selector("#wallet", state="visible")
    await page.wait_for_function("() => document.getElementById('conn').textContent === 'live'")


async def balance(page: Page) -> Decimal:
    return Decimal(await page.text_content("#balance") or "")


async def rows(page: Page) -> int:
    return int(await page.evaluate("document.querySelectorAll('#mybets tbody tr').length"))


async def set_bet(page: Page, amount: str, target: str, direction: str = "under") -> None:
    current = await page.evaluate("window.stakepro.state.direction")
    if current != direction:
        await page.click("#toggle-dir")
    await page.fill("#amount", amount)
    await page.fill("#target", target)
    await page.locator("#target").blur()


async def roll(page: Page, keyboard: bool = False) -> dict[str, Any]:
    """Roll once (button or Space) and return the bet as the page recorded it."""
    before = await rows(page)
    if keyboard:
        await page.evaluate("document.activeElement && document.activeElement.blur()")
        await page.keyboard.press("Space")
    else:
        await page.click("#roll")
    await page.wait_for_function(
        f"() => document.querySelectorAll('#mybets tbody tr').length > {before}")
    bet: dict[str, Any] = await page.evaluate("window.stakepro.state.history[0]")
    # The animated result settles on the roll, coloured as a win or a loss.
    await page.wait_for_function(
        "r => document.getElementById('result-roll').textContent === r.roll"
        " && document.getElementById('result').classList.contains(r.win ? 'win' : 'loss')",
        arg=bet,
    )
    return bet


async def user_id(page: Page) -> int:
    return int(await page.evaluate("window.stakepro.state.userId"))


# ---- 1. sign in, bet, balance, a win and a loss ---------------------------------------------

async def test_sign_in_bet_win_and_loss(api: Api, open_page: Any) -> None:
    w = await open_page(url(api))
    page = w.page
    await sign_in(page)
    assert await balance(page) == DEMO_USDT
    assert await page.evaluate("localStorage.getItem('stakepro.token')")

    # The panel follows PROTOCOL.md's rules as the user types.
    await set_bet(page, "1.00", "50.00")
    assert await page.input_value("#multiplier") == "1.9801"
    assert await page.input_value("#chance") == "50.00"
    assert await page.input_value("#profit") == "0.98"
    await page.click("#toggle-dir")
    assert await page.input_value("#target") == "50.00"
    await page.fill("#target", "97.99")
    assert await page.input_value("#multiplier") == "49.2586"
    await page.fill("#amount", "1.00")
    assert await page.input_value("#profit") == "48.25"
    await page.fill("#multiplier", "2")
    assert await page.input_value("#chance") == "49.50"

    expected = DEMO_USDT
    seen: set[bool] = set()
    for target, want in (("98.00", True), ("2.00", False)):
        await set_bet(page, "1.00", target, "under")
        for attempt in range(12):
            bet = await roll(page, keyboard=attempt % 2 == 1)
            expected += Decimal(bet["payout"]) - Decimal("1.00")
            await page.wait_for_function(
                f"() => document.getElementById('balance').textContent === '{expected:.2f}'")
            outcome = await page.get_attribute("#result", "data-outcome")
            assert outcome == ("win" if bet["win"] else "loss")
            assert await page.text_content("#marker-label") == bet["roll"]
            seen.add(bool(bet["win"]))
            if bet["win"] == want:
                break
        assert want in seen, f"no {'win' if want else 'loss'} in 12 tries at under {target}"
    view = await api.user(await user_id(page))
    assert Decimal(view["balances"]["USDT"]) == expected == await balance(page)

    # A deposit made elsewhere is pushed to the page.
    await api.deposit(await user_id(page), "5.00")
    expected += Decimal("5.00")
    await page.wait_for_function(
        f"() => document.getElementById('balance').textContent === '{expected:.2f}'")

    await page.screenshot(path="/tmp/stakepro-desktop.png", full_page=True)

    # Keyboard shortcuts (listed on the page) when no field has the focus.
    assert "Space" in (await page.text_content("#shortcuts") or "")
    await page.evaluate("document.activeElement && document.activeElement.blur()")
    await page.keyboard.press("m")
    assert await page.input_value("#amount") == f"{expected:.2f}"
    await page.keyboard.press("h")
    assert await page.input_value("#amount") == f"{(expected * 100 // 2) / 100:.2f}"
    await page.fill("#amount", "0.25")
    await page.evaluate("document.activeElement.blur()")
    await page.keyboard.press("d")
    assert await page.input_value("#amount") == "0.50"
    await page.keyboard.press("o")
    assert await page.text_content("#target-label") == "Roll over"
    assert await page.input_value("#target") == "98.00"  # under 2.00 <-> over 98.00: same odds
    await page.keyboard.press("u")
    assert await page.text_content("#target-label") == "Roll under"

    # The token is kept: a reload signs straight back in, with the bets still listed.
    listed = await rows(page)
    await page.reload()
    await page.wait_for_function("() => document.getElementById('conn').textContent === 'live'")
    assert await balance(page) == expected
    assert await rows(page) == listed

    # The currency switch shows the other wallet.
    await page.select_option("#currency", "BTC")
    assert await page.text_content("#balance") == "0.01000000"
    assert await page.text_content("#amount-cur") == "BTC"
    w.assert_clean()


# ---- 2. rotate the seed and verify a bet in the page ----------------------------------------

async def test_rotate_and_verify_in_page(api: Api, open_page: Any) -> None:
    w = await open_page(url(api))
    page = w.page
    await sign_in(page)
    await set_bet(page, "0.50", "60.00", "over")
    first = await roll(page)
    await roll(page)
    old_hash = await page.text_content("#seed-hash")
    assert old_hash == first["server_seed_hash"]
    assert await page.text_content("#seed-nonce") == "2"

    # A bet whose seed is still secret cannot be verified yet; the page says so.
    await page.click("#mybets tbody tr[data-nonce='1']")
    await page.wait_for_selector("[data-testid=proof-secret]")

    await page.click("#tab-seeds")
    await page.fill("#client-seed", "my-own-seed_1.0")
    await page.click("#rotate")
    await page.wait_for_selector("#revealed li")
    server_seed = (await page.text_content("#revealed li .revealed-seed") or "").strip()
    assert len(server_seed) == 64
    assert await page.text_content("#seed-hash") != old_hash
    assert await page.text_content("#seed-nonce") == "0"
    await page.wait_for_selector("#revealed li .ok")   # SHA-256(seed) == the old commitment

    await page.click("#mybets tbody tr[data-nonce='1']")
    await page.wait_for_selector("[data-testid=v-roll]")
    expected_roll = dice.format_hundredths(dice.roll(server_seed, first["client_seed"], 1))
    assert await page.text_content("[data-testid=v-roll]") == expected_roll == first["roll"]
    assert await page.text_content("[data-testid=v-hmac]") == dice.hmac_hex(
        server_seed, first["client_seed"], 1)
    assert "✓" in (await page.text_content("[data-testid=v-match]") or "")
    assert "✓" in (await page.text_content("[data-testid=v-hash-match]") or "")
    _, windows = dice.roll_from_hmac(dice.hmac_hex(server_seed, first["client_seed"], 1))
    shown = await page.eval_on_selector_all("[data-testid=v-windows] tbody tr",
                                            "rs => rs.map(r => r.dataset.window)")
    assert shown == windows

    await page.locator("#panel-verify").screenshot(path="/tmp/stakepro-verify.png")

    # The next pair uses the edited client seed, from nonce 1.
    bet = await roll(page)
    assert bet["client_seed"] == "my-own-seed_1.0" and bet["nonce"] == 1

    # A secret bet's proof offers the rotation itself, then shows the proof.
    await page.click("#mybets tbody tr[data-nonce='1']")
    await page.wait_for_selector("[data-testid=proof-secret]")
    await page.click("#proof-bet button")
    await page.wait_for_selector("[data-testid=v-roll]")
    assert await page.text_content("[data-testid=v-roll]") == bet["roll"]
    assert "✓" in (await page.text_content("[data-testid=v-match]") or "")
    assert await page.text_content("#seed-nonce") == "0"
    w.assert_clean()


# ---- 3. autobet ---------------------------------------------------------------------------

async def autobet(page: Page) -> str:
    """Start an autobet, wait until it stops, and return why it stopped."""
    await page.evaluate("document.getElementById('auto-status').dataset.state = 'starting'")
    await page.click("#auto-start")
    await page.wait_for_function(
        "() => document.getElementById('auto-status').dataset.state === 'stopped'", timeout=60000)
    return await page.text_content("#auto-status") or ""


async def test_autobet_twenty_bets_and_stop_conditions(api: Api, open_page: Any) -> None:
    w = await open_page(url(api))
    page = w.page
    await sign_in(page)
    await page.click("#mode-auto")
    await set_bet(page, "0.10", "50.00", "under")
    await page.fill("#ab-bets", "20")
    await page.click(".choice[data-for=loss][data-value=increase]")
    await page.fill("#ab-loss-pct", "10")
    status = await autobet(page)
    assert "Stopped: 20 of 20 bets placed" in status, status
    assert await rows(page) == 20
    history = await page.evaluate("window.stakepro.state.history")
    # Reset on win, +10 % on loss, from 0.10.
    amount = Decimal("0.10")
    for bet in reversed(history):
        assert Decimal(bet["amount"]) == amount, (bet, amount)
        amount = Decimal("0.10") if bet["win"] else (amount * Decimal("1.1")).quantize(
            Decimal("0.01"), rounding="ROUND_FLOOR")
    assert await page.input_value("#amount") == "0.10"

    # Stop on a maximum bet: +100 % on each loss at under 2.00 (a loss 98 % of the time)
    # goes 0.10, 0.20, 0.40, and 0.80 would exceed 0.50.
    await page.click(".choice[data-for=loss][data-value=increase]")
    await page.fill("#ab-loss-pct", "100")
    await page.fill("#ab-bets", "0")
    await page.fill("#ab-max-bet", "0.50")
    await set_bet(page, "0.10", "2.00", "under")
    status = await autobet(page)
    assert "next bet 0.80 would exceed the maximum bet (0.50)" in status, status
    last = await page.evaluate("window.stakepro.state.history[0]")
    assert (last["amount"], last["win"]) == ("0.40", False)

    # Stop on loss: 0.10 a bet at under 2.00. A rare early win (49.5x) can keep the walk
    # above the stop for long, so each run is capped at 30 bets and retried (bounded).
    await page.click(".choice[data-for=loss][data-value=reset]")
    await page.fill("#ab-max-bet", "")
    await page.fill("#ab-bets", "30")
    await page.fill("#ab-stop-loss", "0.30")
    for _ in range(4):
        status = await autobet(page)
        if "stop on loss" in status:
            break
    found = re.search(r"Stopped: loss ([0-9.]+) reached the stop on loss \(0\.30\)", status)
    assert found and Decimal(found.group(1)) >= Decimal("0.30"), status

    view = await api.user(await user_id(page))
    assert Decimal(view["balances"]["USDT"]) == await balance(page)
    w.assert_clean()


# ---- 4. the live feed ---------------------------------------------------------------------

async def test_feed_shows_another_players_bet(api: Api, open_page: Any) -> None:
    w = await open_page(url(api))
    page = w.page
    await page.click("#tab-high")
    await page.fill("#high-threshold", "5")
    await page.click("#tab-feed")
    await page.wait_for_function(
        "() => document.getElementById('feed-status').textContent.includes('live')")
    name = f"watched-{uuid.uuid4().hex[:8]}"
    _, token = await api.player(deposit="10.00", name=name)
    async with api.play(token) as p:
        small = await p.bet(amount="1.00", target="50.00")
        big = await p.bet(amount="5.00", target="50.00", direction="over")
    assert small["type"] == big["type"] == "bet_result"
    row = page.locator(f"#feed tbody tr[data-bet-id='{small['bet_id']}']")
    await row.wait_for(timeout=10000)
    assert name in (await row.text_content() or "")
    assert small["roll"] in (await row.text_content() or "")
    await page.locator(f"#feed tbody tr[data-bet-id='{big['bet_id']}']").wait_for()
    high = page.locator("#high tbody tr")
    assert await high.count() >= 1
    ids = await page.eval_on_selector_all("#high tbody tr", "rs => rs.map(r => r.dataset.betId)")
    assert str(big["bet_id"]) in ids and str(small["bet_id"]) not in ids
    w.assert_clean()


# ---- 5. the standalone verifier from disk -------------------------------------------------

def vectors() -> dict[str, Any]:
    return known_answers.load()


async def test_verify_page_from_disk_reproduces_vector(open_page: Any) -> None:
    data = vectors()
    vector = next(r for r in data["rolls"] if r["nonce"] == 60559)
    file_url = (ROOT / "static" / "verify.html").as_uri()
    assert file_url.startswith("file://")
    w = await open_page(file_url)
    page = w.page
    await page.fill("#server-seed", vector["server_seed"])
    await page.fill("#client-seed", vector["client_seed"])
    await page.fill("#nonce", str(vector["nonce"]))
    await page.fill("#commitment", data["server_seed_hash"])
    await page.click("#run")
    await page.wait_for_selector("#roll")
    assert await page.text_content("#hmac") == vector["hmac"]
    windows = await page.eval_on_selector_all("#windows tbody tr",
                                              "rs => rs.map(r => r.dataset.window)")
    assert windows == vector["windows_tried"] == ["fe13d", "fe9df", "64284"]
    assert await page.text_content("#roll") == vector["roll"] == "2.03"
    assert await page.text_content("#message") == f"{vector['client_seed']}:60559"
    assert "✓" in (await page.text_content("#commitment-check") or "")
    await page.screenshot(path="/tmp/stakepro-verify-file.png", full_page=True)

    # Prefilled from the address (as the page's link opens it), every known vector.
    for v in data["rolls"]:
        q = f"#server_seed={v['server_seed']}&client_seed={v['client_seed']}&nonce={v['nonce']}"
        await page.goto(file_url + q)
        await page.wait_for_selector("#roll")
        assert await page.text_content("#roll") == v["roll"]
        assert await page.text_content("#hmac") == v["hmac"]
    w.assert_clean()


async def test_page_rules_match_known_vectors(api: Api, open_page: Any) -> None:
    """The page's own rules module (bet panel and in-page verify) against dice.json."""
    w = await open_page(url(api))
    data = vectors()
    result = await w.page.evaluate(
        """async (data) => {
            const R = await import('./js/rules.js');
            const rolls = [];
            for (const v of data.rolls) {
                const r = await R.verifyRoll(v.server_seed, v.client_seed, String(v.nonce));
                rolls.push([r.hmac, r.windows.map(x => x.hex), r.rollText]);
            }
            const payouts = data.payouts.map(p => {
                const t = R.parseTarget(p.target);
                const wo = R.winningOutcomes(t, p.direction);
                const m = R.multiplierBp(wo);
                const d = R.decimalsOf(p.amount);
                const paid = R.payout(R.parseAmount(p.amount, d), m);
                return [wo, R.formatMultiplier(m), R.formatAmount(paid, d)];
            });
            const hash = await R.sha256Hex(data.rolls[0].server_seed);
            return {rolls, payouts, hash};
        }""",
        data,
    )
    assert result["rolls"] == [[v["hmac"], v["windows_tried"], v["roll"]] for v in data["rolls"]]
    assert result["payouts"] == [
        [p["winning_outcomes"], p["multiplier"], p["payout_if_win"]] for p in data["payouts"]]
    assert result["hash"] == data["server_seed_hash"]
    w.assert_clean()


# ---- 6. phone width -----------------------------------------------------------------------

async def test_phone_width_no_overflow(api: Api, open_page: Any) -> None:
    w = await open_page(url(api), width=375, height=812)
    page = w.page
    overflow = "document.scrollingElement.scrollWidth"
    assert await page.evaluate(overflow) <= 375
    await sign_in(page)
    await set_bet(page, "1.00", "50.00")
    await roll(page)
    assert await page.evaluate(overflow) <= 375
    for tab in ("tab-feed", "tab-high", "tab-mybets", "tab-seeds", "tab-verify"):
        await page.click(f"#{tab}")
        assert await page.evaluate(overflow) <= 375, tab
    await page.click("#mybets tbody tr")   # proof view (seed still secret)
    await page.click("#mode-auto")
    assert await page.evaluate(overflow) <= 375
    await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path="/tmp/stakepro-375.png")
    await page.screenshot(path="/tmp/stakepro-375-full.png", full_page=True)
    w.assert_clean()


# Where a cell of a bets table really is when its row is scrolled into view, but nothing is
# scrolled sideways (as a reader first sees it): its box, whether the point at its centre hits
# it (not clipped by its table's box, not under another element), whether its text fits it,
# and whether the table's box could scroll sideways at all.
CELL_SEEN = """td => {
    td.scrollIntoView({ block: "center" });
    const wrap = td.closest(".table-wrap");
    wrap.scrollLeft = 0;
    window.scrollTo(0, window.scrollY);
    const r = td.getBoundingClientRect();
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return { left: r.left, right: r.right, top: r.top, bottom: r.bottom, text: td.textContent,
             hit: td.contains(hit), fits: td.scrollWidth <= td.clientWidth,
             sideways: wrap.scrollWidth > wrap.clientWidth };
}"""

# How many "0" of an input's own font fit in its text box.
INPUT_CHARS = """input => {
    const style = getComputedStyle(input);
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.font = style.font;
    const padding = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
    const inner = input.clientWidth - padding;
    return inner / ctx.measureText("0").width;
}"""


async def test_phone_375_history_columns_and_client_seed_fit(api: Api, open_page: Any) -> None:
    """At 375x667, with bets in the history (the widest amounts too), nothing overflows the
    screen, every bet's Multiplier, Payout and Nonce are on screen and readable, and the client
    seed fields hold 20 characters."""
    width, height = 375, 667
    w = await open_page(url(api), width=width, height=height)
    page = w.page
    overflow = "document.scrollingElement.scrollWidth"
    await sign_in(page)
    await set_bet(page, "1000.00", "50.00")
    await roll(page)
    await page.select_option("#currency", "BTC")
    await set_bet(page, "0.00123456", "50.00")
    await roll(page)
    bets: list[dict[str, Any]] = await page.evaluate("window.stakepro.state.history")
    assert len(bets) == 2
    assert await page.evaluate(overflow) <= width

    for bet in bets:
        row = page.locator(f"#mybets tbody tr[data-nonce='{bet['nonce']}']")
        expected = {"multiplier": f"{bet['multiplier']}×",
                    "payout": f"{bet['payout']} {bet['currency']}",
                    "nonce": str(bet["nonce"])}
        for col, value in expected.items():
            seen = await row.locator(f"td[data-col={col}]").evaluate(CELL_SEEN)
            assert seen["text"] == value, (col, seen)
            assert 0 <= seen["left"] and seen["right"] <= width, (col, seen)
            assert 0 <= seen["top"] and seen["bottom"] <= height, (col, seen)
            assert seen["hit"] and seen["fits"] and not seen["sideways"], (col, seen)
    await page.locator("#panel-mybets").screenshot(path="/tmp/stakepro-375-mybets.png")

    # The feed's tables lay out the same way.
    await page.click("#tab-feed")
    feed_row = page.locator(f"#feed tbody tr[data-bet-id='{bets[0]['bet_id']}']")
    await feed_row.wait_for(timeout=10000)
    for col in ("multiplier", "payout"):
        seen = await feed_row.locator(f"td[data-col={col}]").evaluate(CELL_SEEN)
        assert 0 <= seen["left"] and seen["right"] <= width and seen["hit"], (col, seen)
    assert await page.evaluate(overflow) <= width

    await page.click("#tab-seeds")
    seed = page.locator("#client-seed")
    assert await seed.evaluate(INPUT_CHARS) >= 20
    await seed.fill("my-own-seed_2026.abc")
    assert await seed.evaluate("i => i.scrollWidth <= i.clientWidth")
    await page.locator("#panel-seeds").screenshot(path="/tmp/stakepro-375-seeds.png")
    await page.click("#tab-verify")
    assert await page.locator("#v-client-seed").evaluate(INPUT_CHARS) >= 20
    assert await page.evaluate(overflow) <= width
    w.assert_clean()

    # The standalone verifier, with its windows table, fits too.
    vector = vectors()["rolls"][0]
    q = (f"#server_seed={vector['server_seed']}&client_seed={vector['client_seed']}"
         f"&nonce={vector['nonce']}")
    v = await open_page((ROOT / "static" / "verify.html").as_uri() + q, width=width, height=height)
    await v.page.wait_for_selector("#roll")
    assert await v.page.evaluate(overflow) <= width
    assert await v.page.locator("#client-seed").evaluate(INPUT_CHARS) >= 20
    v.assert_clean()


async def test_bet_limits_shown_and_checked_before_sending(api: Api, open_page: Any) -> None:
    """The page reads GET /api/limits, shows the currency's limits under the amount, and a
    bet outside them is explained and not sent (the server would answer BET_LIMIT)."""
    w = await open_page(url(api))
    page = w.page
    await sign_in(page)
    limits = page.locator("#amount-limits")
    await limits.wait_for()
    assert await limits.text_content() == (
        "Min 0.01 · max 10000.00 · max profit 100000.00 USDT")
    sent = await page.evaluate("window.stakepro.state.seed.nonce")

    await set_bet(page, "10000.01", "50.00")
    assert await page.text_content("#bet-error") == "Amount: at most 10000.00 USDT a bet."
    assert "invalid" in (await page.get_attribute("#amount", "class") or "")
    await page.click("#roll")
    await set_bet(page, "1000.00", "0.50")  # profit 197,000 > 100,000
    assert (await page.text_content("#bet-error") or "").startswith(
        "Profit on win: at most 100000.00 USDT")
    await page.click("#roll")
    await page.wait_for_timeout(300)
    assert await page.evaluate("window.stakepro.state.history.length") == 0
    assert await page.evaluate("window.stakepro.state.seed.nonce") == sent
    assert await balance(page) == DEMO_USDT

    await set_bet(page, "1.00", "50.00")  # within the limits again: it rolls
    assert await page.text_content("#bet-error") == ""
    bet = await roll(page)
    assert bet["amount"] == "1.00"
    w.assert_clean()


# ---- 7. a dropped socket resends the unanswered bet with the same id ------------------------

async def test_reconnect_resends_unanswered_bet_once(api: Api, open_page: Any) -> None:
    w = await open_page(url(api))
    page = w.page
    await sign_in(page)
    await set_bet(page, "2.00", "50.00")
    bet = await page.evaluate(
        """async () => {
            const s = window.stakepro;
            const p = s.placeBet(200n);
            s.state.sock.drop();          // the socket dies with the bet unanswered
            return await p;
        }""")
    assert bet["nonce"] == 1
    await page.wait_for_function("() => document.getElementById('conn').textContent === 'live'")
    expected = DEMO_USDT - Decimal("2.00") + Decimal(bet["payout"])
    view = await api.user(await user_id(page))
    assert Decimal(view["balances"]["USDT"]) == expected == await balance(page)
    again = await roll(page)
    assert again["nonce"] == 2                     # exactly one bet was placed before
    w.assert_clean()
