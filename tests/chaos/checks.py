"""The verdict on a chaos run, from the receivers' records and the database, and its summary."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from notifyhook.tools.receiver import Arrival

from .plan import MAX_ATTEMPTS, RETRY_AFTER_S
from .run import Observed

LEASE_EXPIRED = "lease expired"
CLAIM_LOST = "claim lost"
"""A claim whose answer its worker never got, given back unsent (release_lost_claims)."""

Key = tuple[str, str]
"""A delivery as the receiver knows it: (endpoint name, event id)."""


@dataclass
class Delivery:
    id: int
    status: str
    attempts: int
    last_status_code: int | None
    recorded: list[tuple[int, int | None, str | None, str]] = field(default_factory=list)
    """(attempt, status_code, error, worker) of the rows written by workers after an answer."""
    lost: list[int] = field(default_factory=list)
    """Attempt numbers reclaim_expired wrote off: claims whose worker never recorded them."""
    unsent: list[int] = field(default_factory=list)
    """Attempt numbers of claims given back unsent, their answer lost: no request went."""
    arrivals: list[Arrival] = field(default_factory=list)

    @property
    def successes(self) -> int:
        return sum(1 for a in self.arrivals if a.answered is not None and 200 <= a.answered < 300)


@dataclass
class Verdict:
    summary: list[tuple[str, str]]
    endpoints: list[tuple[str, ...]]
    failures: list[str]


def judge(observed: Observed) -> Verdict:
    deliveries = _deliveries(observed)
    failures: list[str] = []
    failures += _check_run(observed)
    failures += _check_fan_out(observed, deliveries)
    failures += _check_fates(observed, deliveries)
    failures += _check_audit_log(deliveries)
    duplicates = sum(max(0, d.successes - 1) for d in deliveries.values())
    lost = sum(len(d.lost) for d in deliveries.values())
    if duplicates > lost:
        failures.append(f"{duplicates} duplicates, more than the {lost} claims lost by kills")
    failures += _check_failover(observed, duplicates)
    failures += _check_signatures_and_retry_after(observed)
    return Verdict(
        _summary(observed, deliveries, duplicates, lost),
        _per_endpoint(observed, deliveries),
        failures,
    )


def _deliveries(observed: Observed) -> dict[Key, Delivery]:
    names = {endpoint_id: name for name, endpoint_id in observed.endpoint_ids.items()}
    deliveries: dict[Key, Delivery] = {}
    by_id: dict[int, Delivery] = {}
    for row_id, event_id, endpoint_id, status, attempts, code, _error in observed.tables[
        "deliveries"
    ]:
        delivery = Delivery(row_id, status, attempts, code)
        deliveries[(names[endpoint_id], event_id)] = by_id[row_id] = delivery
    for delivery_id, attempt, code, error, worker in observed.tables["attempts"]:
        if error is not None and error.startswith(LEASE_EXPIRED):
            by_id[delivery_id].lost.append(attempt)
        elif error is not None and error.startswith(CLAIM_LOST):
            by_id[delivery_id].unsent.append(attempt)
        else:
            by_id[delivery_id].recorded.append((attempt, code, error, worker))
    for arrival in observed.arrivals:
        key = (arrival.path, arrival.webhook_id)
        if key in deliveries:
            deliveries[key].arrivals.append(arrival)
    return deliveries


def _check_run(observed: Observed) -> list[str]:
    failures = []
    if not observed.settled:
        failures.append("the queue did not settle before the drain timeout")
    for worker_id, code in observed.exit_codes.items():
        if code != 0:
            failures.append(f"{worker_id} exited {code} after SIGTERM, not 0")
    for path in observed.logs:
        if "Traceback" in path.read_text(errors="replace"):
            failures.append(f"a traceback in {path}")
    produced = {event.event_id for event in observed.events}
    stored = {event_id for event_id, _ in observed.tables["events"]}
    if produced != stored or len(produced) != len(observed.events):
        failures.append(f"{len(observed.events)} events enqueued, {len(stored)} stored")
    return failures


def _check_fan_out(observed: Observed, deliveries: dict[Key, Delivery]) -> list[str]:
    expected = observed.expected()
    if set(deliveries) == expected:
        return []
    return [
        f"fan-out: {len(expected - set(deliveries))} deliveries missing, "
        f"{len(set(deliveries) - expected)} unexpected"
    ]


def _check_fates(observed: Observed, deliveries: dict[Key, Delivery]) -> list[str]:
    failures = []
    by_endpoint: dict[str, list[Delivery]] = defaultdict(list)
    for (name, _), delivery in deliveries.items():
        by_endpoint[name].append(delivery)
    processing = [d.id for d in deliveries.values() if d.status == "processing"]
    if processing:
        failures.append(f"{len(processing)} deliveries left in processing: {processing[:10]}")
    for name, plan in observed.plans.items():
        rows = by_endpoint[name]
        if plan.fate == "delivered":
            failures += _check_delivered(name, rows)
        elif plan.fate == "dead":
            wrong = [d.id for d in rows if d.status != "dead" or d.attempts != MAX_ATTEMPTS]
            if wrong:
                failures.append(
                    f"{name}: {len(wrong)} deliveries not dead after {MAX_ATTEMPTS} attempts"
                )
        else:
            failures += _check_gone(observed, name, rows)
    return failures


def _check_delivered(name: str, rows: list[Delivery]) -> list[str]:
    failures = []
    undelivered = Counter(d.status for d in rows if d.status != "delivered")
    if undelivered:
        failures.append(f"{name}: deliveries not delivered: {dict(undelivered)}")
    unseen = [d.id for d in rows if d.successes == 0]
    if unseen:
        failures.append(f"{name}: {len(unseen)} deliveries never answered 2xx by the receiver")
    return failures


def _check_gone(observed: Observed, name: str, rows: list[Delivery]) -> list[str]:
    """The first 410 kills its delivery and disables the endpoint; the rest wait, untouched."""
    failures = []
    endpoint = next(row for row in observed.tables["endpoints"] if row[1] == name)
    if endpoint[2] or "410 Gone" not in (endpoint[3] or ""):
        failures.append(f"{name}: not disabled for 410 Gone: enabled={endpoint[2]} {endpoint[3]!r}")
    dead = [d for d in rows if d.status == "dead"]
    others = Counter(d.status for d in rows if d.status != "dead")
    if set(others) - {"pending"}:
        failures.append(f"{name}: besides the dead letter, expected only pending: {dict(others)}")
    if any(d.successes for d in rows):
        failures.append(f"{name}: a 2xx answer from an endpoint that only answers 410")
    if len(dead) > 1 or any(d.last_status_code != 410 for d in dead):
        failures.append(f"{name}: dead letters {[(d.id, d.last_status_code) for d in dead]}")
    # No dead letter only if the 410 that disabled the endpoint came from a worker that had
    # lost its lease meanwhile: its answer disables the endpoint, but the delivery had been
    # taken back, so its state was no longer that worker's to write.
    stale_410 = any(
        code == 410 and attempt in d.lost for d in rows for attempt, code, _, _ in d.recorded
    )
    if not dead and rows and not stale_410:
        failures.append(f"{name}: no dead letter, and no stale 410 to explain it")
    return failures


def _check_audit_log(deliveries: dict[Key, Delivery]) -> list[str]:
    """Every attempt has its row; the rows match what the receivers saw, but for lost claims."""
    failures = []
    gaps = [
        d.id
        for d in deliveries.values()
        if {row[0] for row in d.recorded} | set(d.lost) != set(range(1, d.attempts + 1))
    ]
    if gaps:
        failures.append(
            f"{len(gaps)} deliveries whose attempts rows do not number 1..attempts: {gaps[:10]}"
        )
    # A request the receiver saw was either recorded by its worker, or its claim was lost
    # (the worker was killed or cut off past its lease); a recorded attempt was seen.
    unmatched = [
        f"{name} delivery {d.id}: recorded {sorted(d.recorded, key=str)}, lost {d.lost}, "
        f"seen {[a.answered for a in d.arrivals]}"
        for (name, _), d in deliveries.items()
        if not len(d.recorded) <= len(d.arrivals) <= len(d.recorded) + len(d.lost)
    ]
    if unmatched:
        failures.append(
            f"{len(unmatched)} deliveries whose attempts rows do not match the requests seen: "
            + "; ".join(unmatched[:10])
        )
    return failures


def _check_failover(observed: Observed, duplicates: int) -> list[str]:
    """A promoted synchronous standby has every claim the workers saw committed: only the
    requests in flight at that moment (and those of killed workers) may be sent twice."""
    failovers = [f for f in observed.faults if f.action == "failover"]
    if not failovers:
        return []
    bound = sum(f.count or 0 for f in observed.faults if f.action in ("failover", "SIGKILL"))
    if duplicates > bound:
        return [
            f"{duplicates} duplicates, more than the {bound} requests in flight at the failover"
        ]
    return []


def _check_signatures_and_retry_after(observed: Observed) -> list[str]:
    failures = []
    unverified = [a for a in observed.arrivals if a.verified is not True]
    if unverified:
        failures.append(f"{len(unverified)} requests whose signature did not verify")
    by_delivery: dict[Key, list[Arrival]] = defaultdict(list)
    for arrival in observed.arrivals:
        by_delivery[(arrival.path, arrival.webhook_id)].append(arrival)
    early = 0
    for arrivals in by_delivery.values():
        arrivals.sort(key=lambda a: a.received_at)
        for first, second in itertools.pairwise(arrivals):
            if (
                first.answered == 429
                and second.received_at - first.received_at < RETRY_AFTER_S * 0.9
            ):
                early += 1
    if early:
        failures.append(f"{early} retries came sooner than the Retry-After of a 429")
    return failures


def _summary(
    observed: Observed, deliveries: dict[Key, Delivery], duplicates: int, lost: int
) -> list[tuple[str, str]]:
    statuses = Counter(d.status for d in deliveries.values())
    created = dict(observed.tables["events"])
    to_first_arrival = [
        min(a.received_at for a in d.arrivals) - created[event_id]
        for (_, event_id), d in deliveries.items()
        if d.arrivals
    ]
    kills = [f for f in observed.faults if f.action == "SIGKILL"]
    cuts = [f for f in observed.faults if f.action == "pg_terminate_backend"]
    restarts = [f for f in observed.faults if f.action.startswith("restart")]
    held = sum(f.count or 0 for f in kills)
    recorded = sum(len(d.recorded) for d in deliveries.values())
    unsent = sum(len(d.unsent) for d in deliveries.values())
    return [
        (
            "scenario",
            f"{observed.config.name}: {observed.config.seconds:g}s at {observed.config.rate:g} events/s, {observed.config.workers} workers",
        ),
        ("events", str(len(observed.events))),
        ("deliveries", str(len(deliveries))),
        ("delivered", str(statuses["delivered"])),
        ("duplicates", f"{duplicates} (bound: {lost} claims lost; {held} held at the kills)"),
        ("dead", str(statuses["dead"])),
        ("pending (410 endpoint)", str(statuses["pending"])),
        ("kills", str(len(kills))),
        ("restarts", ", ".join(f.action.removeprefix("restart ") for f in restarts)),
        ("failovers", "; ".join(f.detail for f in observed.faults if f.action == "failover")),
        ("connection cuts", f"{len(cuts)} ({sum(f.count or 0 for f in cuts)} connections)"),
        ("requests seen", str(len(observed.arrivals))),
        (
            "attempts recorded",
            f"{recorded} (+{lost} written off by reclaim_expired, "
            f"+{unsent} claims given back unsent, their answer lost)",
        ),
        ("producer retries", str(observed.producer_errors)),
        ("commit-to-arrival", _latency(to_first_arrival)),
        ("run time", f"{observed.seconds:.1f}s"),
    ]


def _latency(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"longest {ordered[-1]:.2f}s, p50 {statistics.median(ordered):.3f}s, p99 {p99:.2f}s"


ENDPOINT_COLUMNS = (
    "endpoint",
    "fate",
    "deliveries",
    "delivered",
    "dead",
    "pending",
    "requests",
    "2xx",
    "other",
)


def _per_endpoint(observed: Observed, deliveries: dict[Key, Delivery]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for name, plan in observed.plans.items():
        mine = [d for (endpoint, _), d in deliveries.items() if endpoint == name]
        statuses = Counter(d.status for d in mine)
        seen = [a for a in observed.arrivals if a.path == name]
        ok = sum(1 for a in seen if a.answered is not None and 200 <= a.answered < 300)
        rows.append(
            (
                f"{plan.tenant}/{name}",
                plan.fate,
                *(
                    str(n)
                    for n in (
                        len(mine),
                        statuses["delivered"],
                        statuses["dead"],
                        statuses["pending"],
                    )
                ),
                *(str(n) for n in (len(seen), ok, len(seen) - ok)),
            )
        )
    return rows


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]


def report(verdict: Verdict) -> str:
    lines = ["chaos summary:"]
    width = max(len(label) for label, _ in verdict.summary)
    lines += [f"  {label:<{width}}  {value}" for label, value in verdict.summary]
    lines += ["per endpoint (requests: as the receiver saw them; other: not answered 2xx):"]
    lines += _table([ENDPOINT_COLUMNS, *verdict.endpoints])
    if verdict.failures:
        lines.append("FAILED:")
        lines += [f"  - {failure}" for failure in verdict.failures]
    return "\n".join(lines)
