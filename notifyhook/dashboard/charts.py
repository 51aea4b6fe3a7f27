"""Attempts per minute as stacked bars: the geometry of an SVG drawn on the server, no script."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from notifyhook.dashboard.data import MinuteCount

MINUTES = 60
WIDTH, HEIGHT = 640, 160
LEFT, RIGHT, TOP, BOTTOM = 40, 8, 8, 20
OUTCOMES = (
    ("delivered", "delivered"),
    ("http_error", "HTTP error"),
    ("no_answer", "no answer"),
)
"""(CSS class and field, label), stacked bottom up."""


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    outcome: str
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    bars: list[Bar]
    peak: int
    """The y axis' top, in attempts per minute."""
    total: int
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = RIGHT
    top: int = TOP
    bottom: int = BOTTOM

    @property
    def plot_bottom(self) -> int:
        return self.height - self.bottom

    @property
    def plot_right(self) -> int:
        return self.width - self.right


def per_minute(counts: Sequence[MinuteCount]) -> Chart:
    """The last hour, oldest minute on the left, the current one on the right."""
    by_minute = {c.minutes_ago: c for c in counts if 0 <= c.minutes_ago < MINUTES}
    totals = [c.delivered + c.http_error + c.no_answer for c in by_minute.values()]
    peak = _nice_ceiling(max(totals, default=0))
    column = (WIDTH - LEFT - RIGHT) / MINUTES
    scale = (HEIGHT - TOP - BOTTOM) / peak
    bars = []
    for minutes_ago, count in sorted(by_minute.items()):
        x = LEFT + (MINUTES - 1 - minutes_ago) * column + column * 0.1
        base = float(HEIGHT - BOTTOM)
        title = _title(minutes_ago, count)
        for outcome, _label in OUTCOMES:
            value = getattr(count, outcome)
            if value:
                height = value * scale
                base -= height
                bars.append(Bar(x, base, column * 0.8, height, outcome, title))
    return Chart(bars=bars, peak=peak, total=sum(totals))


def _title(minutes_ago: int, count: MinuteCount) -> str:
    when = "this minute" if minutes_ago == 0 else f"{minutes_ago} min ago"
    parts = ", ".join(f"{getattr(count, field)} {label}" for field, label in OUTCOMES)
    return f"{when}: {parts}"


def _nice_ceiling(value: int) -> int:
    """1, 2, 5, 10, 20, 50, …: the smallest at or above `value` (at least 1)."""
    if value <= 1:
        return 1
    magnitude = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude
