"""``python -m loadtest page``: what the browser page costs a new player.

Each run opens the page in a fresh headless Chromium context (Debian's chromium, driven by
Playwright; no cache, no stored token), presses *Play demo*, waits for the socket to be live,
presses *Roll* and waits for the bet to appear in *My bets*. It reports the page weight (bytes
of every response the page loaded, bodies as received: the server does not compress) and the
time from navigation start to that first settled bet, min / median / max over the runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from loadtest import common

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass(frozen=True, slots=True)
class PageOptions:
    url: str
    runs: int = 3
    chromium: str = CHROMIUM
    timeout_s: float = 30.0


@dataclass(slots=True)
class PageReport:
    url: str
    weights: list[int] = field(default_factory=list)
    first_bet_ms: list[float] = field(default_factory=list)
    resources: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.first_bet_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "page_bytes": self.weights, "resources": self.resources,
                "first_settled_bet_ms": self.first_bet_ms, "errors": self.errors,
                "client_cpu_s": self.cpu_s}

    def table(self) -> str:
        def spread(xs: list[float], unit: str) -> str:
            if not xs:
                return "n/a"
            return (f"{min(xs):,.1f} / {statistics.median(xs):,.1f} / {max(xs):,.1f} {unit}"
                    " (min / median / max)")

        return common.table([
            ("page", self.url),
            ("runs", str(len(self.first_bet_ms))),
            ("page weight", spread([w / 1024 for w in self.weights], "KiB")),
            ("resources", ", ".join(str(r) for r in self.resources) or "n/a"),
            ("load to first bet", spread(self.first_bet_ms, "ms")),
            ("console errors", "; ".join(self.errors) or "none"),
            ("client CPU", f"{self.cpu_s:.2f} s (this process; Chromium not counted)"),
            ("result", "OK" if self.ok else "FAILED"),
        ])


async def run_page(options: PageOptions) -> PageReport:
    from playwright.async_api import async_playwright

    clock = common.CpuClock()
    report = PageReport(options.url)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=options.chromium, headless=True,
                                          args=ARGS)
        try:
            for _ in range(options.runs):
                context = await browser.new_context()
                page = await context.new_page()
                sizes: list[int] = []

                async def on_response(response: Any, sizes: list[int] = sizes) -> None:
                    try:
                        sizes.append(len(await response.body()))
                    except Exception:  # redirects and aborted loads have no body
                        pass

                page.on("response", on_response)
                page.on("pageerror", lambda exc: report.errors.append(str(exc)))
                page.on("console", lambda m: report.errors.append(m.text)
                        if m.type == "error" else None)
                start = time.perf_counter()
                await page.goto(options.url, timeout=options.timeout_s * 1000)
                await page.click("#signin")
                # A function, not a bare expression: the page's CSP forbids eval.
                await page.wait_for_function(
                    "() => document.getElementById('conn').textContent === 'live'",
                    timeout=options.timeout_s * 1000)
                await page.click("#roll")
                await page.wait_for_function(
                    "() => document.querySelectorAll('#mybets tbody tr').length > 0",
                    timeout=options.timeout_s * 1000)
                report.first_bet_ms.append((time.perf_counter() - start) * 1000)
                await page.wait_for_load_state("networkidle")
                report.weights.append(sum(sizes))
                report.resources.append(len(sizes))
                await context.close()
        finally:
            await browser.close()
    report.cpu_s = clock.cpu_s()
    return report
