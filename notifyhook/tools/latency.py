"""Commit-to-arrival latencies, and their percentiles."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from notifyhook.tools.receiver_process import Hit


def first_arrivals(hits: Iterable[Hit]) -> dict[tuple[str, str], float]:
    """(path, webhook-id) -> when its first attempt arrived."""
    first: dict[tuple[str, str], float] = {}
    for hit in hits:
        key = (hit.path, hit.webhook_id)
        if key not in first or hit.received_at < first[key]:
            first[key] = hit.received_at
    return first


def latencies(
    committed: Mapping[str, float],
    arrivals: Mapping[tuple[str, str], float],
    paths: Iterable[str] | None = None,
) -> list[float]:
    """Seconds from an event's COMMIT to the first request for it, per (path, event)."""
    wanted = None if paths is None else set(paths)
    return sorted(
        at - committed[webhook_id]
        for (path, webhook_id), at in arrivals.items()
        if webhook_id in committed and (wanted is None or path in wanted)
    )


def percentile(ordered: Sequence[float], point: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default; `ordered` sorted."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * point / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(ordered: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and max of sorted seconds, in milliseconds."""
    result = {f"p{p}_ms": percentile(ordered, p) * 1000 for p in (50, 95, 99)}
    result["max_ms"] = (ordered[-1] if ordered else math.nan) * 1000
    return result
