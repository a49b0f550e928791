"""``bets --report FILE.html``: throughput and p99 latency per second as one self-contained
HTML page (inline SVG and CSS, no scripts, no external assets)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class SeriesReport(Protocol):
    """What the page shows of a ``bets`` report (:class:`loadtest.bets.BetsReport`)."""

    @property
    def series(self) -> Sequence[dict[str, float | int | None]]: ...

    @property
    def window(self) -> tuple[float, float]: ...

    def table(self) -> str: ...

WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 40


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value``."""
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return float(step * exp)
    return float(10 * exp)


def svg_chart(
    points: Sequence[tuple[float, float | None]], title: str, unit: str, color: str,
    window: tuple[float, float] | None = None,
) -> str:
    """A line chart of ``(t seconds, value)`` (None: no sample that second) as inline SVG;
    the measured ``window`` is shaded."""
    xs = [t for t, _ in points] or [0.0]
    x_max = max(max(xs) + 1, window[1] if window else 0.0, 1.0)
    values = [v for _, v in points if v is not None]
    y_max = _nice_max(max(values, default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(t: float) -> float:
        return LEFT + plot_w * t / x_max

    def py(v: float) -> float:
        return TOP + plot_h * (1 - v / y_max)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}"'
             f' viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(title)}">',
             f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>']
    if window is not None:
        parts.append(f'<rect x="{px(window[0]):.1f}" y="{TOP}" width="'
                     f'{max(0.0, px(window[1]) - px(window[0])):.1f}" height="{plot_h}"'
                     ' fill="#eef4ff"><title>measured window</title></rect>')
    for i in range(5):  # horizontal grid and y labels
        tick = y_max * i / 4
        y = py(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"'
                     ' stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end"'
                     f' font-size="11">{tick:,.4g}</text>')
    step = max(1, math.ceil(x_max / 10))
    for second in range(0, int(x_max) + 1, step):  # x labels
        parts.append(f'<text x="{px(second):.1f}" y="{HEIGHT - BOTTOM + 16}"'
                     f' text-anchor="middle" font-size="11">{second}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle"'
                 ' font-size="11">seconds since the start of the run</text>')
    parts.append(f'<text x="14" y="{TOP + plot_h / 2:.1f}" font-size="11" text-anchor="middle"'
                 f' transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">{html.escape(unit)}</text>')
    segment: list[str] = []
    segments: list[list[str]] = []
    for t, value in points:
        if value is None:
            if segment:
                segments.append(segment)
            segment = []
            continue
        segment.append(f"{px(t + 0.5):.1f},{py(value):.1f}")  # the middle of its second
    if segment:
        segments.append(segment)
    for seg in segments:
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"'
                     f' points="{" ".join(seg)}"/>')
    for t, value in points:
        if value is not None:
            parts.append(f'<circle cx="{px(t + 0.5):.1f}" cy="{py(value):.1f}" r="2.5"'
                         f' fill="{color}"><title>{t:g}-{t + 1:g} s: {value:,.3f} '
                         f'{html.escape(unit)}</title></circle>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none"'
                 ' stroke="#999"/>')
    parts.append("</svg>")
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(parts)}</figure>"


def render_html(report: SeriesReport) -> str:
    series = report.series
    throughput = [(float(p["t"] or 0), float(p["bets"] or 0)) for p in series]
    p99 = [(float(p["t"] or 0),
            None if p["p99_ms"] is None else float(p["p99_ms"] or 0)) for p in series]
    summary = html.escape(report.table())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>StakePro loadtest bets</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
figure{{margin:1.5em 0}}figcaption{{font-weight:600;margin-bottom:.3em}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>python -m loadtest bets</h1>
<p>Every point is one second of the run (replies received in it). The shaded band is the
measured window; the summary below counts only replies inside it.</p>
{svg_chart(throughput, "Throughput (bet replies per second)", "bets/s", "#1f6feb",
           report.window)}
{svg_chart(p99, "p99 latency per second (client, send to reply)", "ms", "#d1242f",
           report.window)}
<h2>Summary</h2><pre>{summary}</pre>
</body></html>
"""


def write_html(report: SeriesReport, path: str) -> None:
    Path(path).write_text(render_html(report), encoding="utf-8")
