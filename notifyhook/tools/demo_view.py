"""What `notifyhook demo` prints: live progress (a rich table on a terminal, plain lines
elsewhere) and the closing summary as plain lines."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from notifyhook.tools import latency
from notifyhook.tools.receiver_process import Hit

PLAIN_EVERY_S = 2.0


def _has_rich() -> bool:
    """rich is the `demo` extra (`pip install 'notifyhook[demo]'`; scripts/setup installs
    it): without it a terminal gets the plain lines a pipe gets."""
    return importlib.util.find_spec("rich") is not None


class Progress:
    """Delivered, retrying, dead and the rate, refreshed in place on a terminal; a line every
    couple of seconds when the output is a file or a pipe."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._delivered: deque[tuple[float, int]] = deque()
        self._live: Any = None
        self._last_line = 0.0
        self._verified = 0
        self._requests = 0

    def __enter__(self) -> Progress:
        if sys.stdout.isatty() and _has_rich():
            from rich.live import Live

            self._live = Live(self._table({}), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(kind, error, trace)

    def update(
        self, events: int, totals: Mapping[str, int], hits: Sequence[Hit], alerts: int = 0
    ) -> None:
        now = time.monotonic()
        self._delivered.append((now, totals["delivered"]))
        while len(self._delivered) > 2 and now - self._delivered[0][0] > 1.0:
            self._delivered.popleft()
        self._requests = len(hits)
        self._verified = sum(1 for h in hits if h.verified)
        figures = self._figures(now, events, totals)
        figures["alerts"] = str(alerts)
        if self._live is not None:
            self._live.update(self._table(figures))
        elif now - self._last_line >= PLAIN_EVERY_S:
            self._last_line = now
            print("  " + "  ".join(f"{k} {v}" for k, v in figures.items()), flush=True)

    def _figures(self, now: float, events: int, totals: Mapping[str, int]) -> dict[str, str]:
        (then, before), (_, after) = self._delivered[0], self._delivered[-1]
        rate = (after - before) / (now - then) if now > then else 0.0
        return {
            "elapsed": f"{now - self._started:.1f}s",
            "events": str(events),
            "deliveries": str(totals["deliveries"]),
            "delivered": str(totals["delivered"]),
            "in flight": str(totals["processing"]),
            "retrying": str(totals["retrying"]),
            "dead": str(totals["dead"]),
            "rate": f"{rate:.0f}/s",
            "requests": f"{self._requests} ({self._verified} verified)",
        }

    @staticmethod
    def _table(figures: Mapping[str, str]) -> Any:
        from rich.table import Table

        table = Table(title="notifyhook demo", show_header=False, min_width=44)
        table.add_column(style="bold")
        table.add_column(justify="right")
        for name, value in figures.items():
            table.add_row(name, value)
        return table


def print_summary(
    committed: Mapping[str, float],
    totals: Mapping[str, int],
    hits: Sequence[Hit],
    stats: Sequence[Mapping[str, Any]],
    dead: Sequence[Mapping[str, Any]],
    says: Mapping[int, Sequence[str]],
    alerts: Sequence[Mapping[str, Any]] = (),
) -> None:
    verified = sum(1 for h in hits if h.verified)
    first = latency.latencies(committed, latency.first_arrivals(hits))
    spread = latency.summarize(first)
    unfinished = totals["deliveries"] - totals["delivered"] - totals["dead"]
    reasons = ", ".join(
        f"{says[r['endpoint_id']][0]}: {r['deliveries']} after {r['last_status_code'] or 'errors'}"
        for r in dead
    )
    lines = [
        "",
        "Summary",
        f"  events enqueued      {len(committed)}",
        f"  deliveries           {totals['deliveries']}",
        f"  delivered            {totals['delivered']}",
        f"  dead letters         {totals['dead']}" + (f" ({reasons})" if reasons else ""),
        f"  HTTP attempts        {totals['attempts']}"
        f" (retries: {totals['attempts'] - totals['deliveries']})",
        f"  signatures verified  {verified} of {len(hits)} requests",
        f"  latency, COMMIT to first request: p50 {spread['p50_ms']:.1f} ms, "
        f"p95 {spread['p95_ms']:.1f} ms, p99 {spread['p99_ms']:.1f} ms, "
        f"max {spread['max_ms']:.1f} ms (over {len(first)} deliveries)",
    ]
    lines += _alert_lines(alerts, says)
    if unfinished:
        lines.append(f"  NOT FINISHED         {unfinished} deliveries still pending or in flight")
    lines += ["", "  endpoint   delivered  dead  attempts  first request p50/p99 ms  behaviour"]
    arrivals = latency.first_arrivals(hits)
    for row in stats:
        name, behaviour = says[row["endpoint_id"]]
        attempts = row["delivered_24h"] + row["failed_attempts_24h"]
        state = "" if row["enabled"] else " [disabled]"
        own = latency.summarize(latency.latencies(committed, arrivals, [name]))
        lines.append(
            f"  {name:<9}  {row['delivered_24h']:>9}  {row['dead']:>4}  {attempts:>8}  "
            f"{own['p50_ms']:>11.1f} / {own['p99_ms']:<11.1f}  {behaviour}{state}"
        )
    lines += [
        "",
        "Look further with psql, against your own database once a worker runs there",
        "(this demo's database is removed now):",
        "  psql \"$NOTIFYHOOK_DATABASE_URL\" -c 'select * from notifyhook.queue_stats'",
        "  psql \"$NOTIFYHOOK_DATABASE_URL\" -c 'select * from notifyhook.endpoint_stats'",
        "  psql \"$NOTIFYHOOK_DATABASE_URL\" -c 'select * from notifyhook.dead_letters limit 20'",
        "  notifyhook replay --endpoint ID    # dead letters of one endpoint back to the queue",
        '  psql "$NOTIFYHOOK_DATABASE_URL", then LISTEN notifyhook_alerts;   # alerts as they come',
        "",
    ]
    print("\n".join(lines), flush=True)


def _alert_lines(
    alerts: Sequence[Mapping[str, Any]], says: Mapping[int, Sequence[str]]
) -> list[str]:
    """How many alerts came (NOTIFY notifyhook_alerts), and the first of each kind."""
    kinds = {kind: [a for a in alerts if a.get("kind") == kind] for kind in ("dead", "disabled")}
    lines = [
        f"  alerts (NOTIFY)      {len(alerts)}"
        f" ({len(kinds['dead'])} dead, {len(kinds['disabled'])} disabled)"
    ]
    for found in kinds.values():
        if found:
            first = found[0]
            name = says.get(first.get("endpoint_id", 0), ("?",))[0]
            lines.append(f"    e.g. {first['kind']} at {name}: {first.get('reason', '')[:100]}")
    return lines
