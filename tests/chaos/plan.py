"""What a chaos run does: its sizes and timeline, the tenants' endpoints and the receivers' scripts."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from notifyhook.tools.receiver import OK, Answer

EVENT_TYPES = (
    "call.completed",
    "call.started",
    "call.transcript.ready",
    "billing.invoice.paid",
    "billing.refund",
    "user.signup",
)

RETRY_SCHEDULE = (0.3, 0.6, 1.0, 1.5, 2.0, 2.5, 3.0)
MAX_ATTEMPTS = len(RETRY_SCHEDULE) + 1
LEASE_S = 3.0
HTTP_TIMEOUT_S = 2.0
RETRY_AFTER_S = 1

WORKER_SETTINGS = {
    "allow_private_networks": "true",
    "lease": str(LEASE_S),
    "http_timeout": str(HTTP_TIMEOUT_S),
    # Longer than the timeout: at the final SIGTERM every request in flight finishes and is
    # recorded, so no attempt goes unrecorded (a released claim has no attempts row).
    "shutdown_grace": str(HTTP_TIMEOUT_S + 1.5),
    "poll_interval": "1",
    "retry_schedule": ",".join(f"{delay:g}" for delay in RETRY_SCHEDULE),
    "jitter": "0.1",
    "concurrency": "20",
    "batch_size": "20",
    "log_level": "INFO",
}


@dataclass(frozen=True)
class Config:
    """The sizes of one run. The CI run and the long run differ only in these numbers."""

    name: str
    seconds: float
    """How long the producer enqueues; the faults happen during this time."""
    rate: float
    """Events per second."""
    workers: int
    kill_every: tuple[float, float] | None
    """A random worker is SIGKILLed after a random pause in this range (seconds); None: never."""
    restarts: tuple[str, ...]
    """PostgreSQL restart modes, spread over the run."""
    terminations: int
    """How many times the workers' connections are cut with pg_terminate_backend."""
    burst_period: int
    """A receiver's fault bursts repeat every this many requests to it."""
    drain_timeout: float
    seed: int = 7
    failover_at: float | None = None
    """With a synchronous standby: when the primary is stopped hard and the standby promoted."""


CI = Config(
    name="ci",
    seconds=40,
    rate=20,
    workers=3,
    kill_every=(2.0, 4.0),
    restarts=("fast", "immediate"),
    terminations=3,
    burst_period=60,
    drain_timeout=90,
)

FAILOVER = Config(
    name="failover",
    seconds=16,
    rate=20,
    workers=2,
    kill_every=None,
    restarts=(),
    terminations=0,
    burst_period=60,
    drain_timeout=60,
    failover_at=8,
)

LONG = Config(
    name="long",
    seconds=300,
    rate=40,
    workers=4,
    kill_every=(2.0, 5.0),
    restarts=("fast", "immediate", "fast", "immediate"),
    terminations=10,
    burst_period=150,
    drain_timeout=180,
)

Script = Callable[[int], Answer]


@dataclass(frozen=True)
class EndpointPlan:
    """One endpoint of the run, with how its receiver behaves and what must become of it."""

    tenant: str
    name: str
    event_types: tuple[str, ...]
    fate: str
    """delivered: every delivery arrives; gone: the first dies, the endpoint is disabled,
    the rest wait; dead: every delivery dies after the whole schedule."""
    script: Script
    columns: dict[str, object] = field(default_factory=dict)


def bursts(period: int, start: int, length: int, answer: Answer) -> Script:
    """`answer` for `length` requests every `period` requests from `start`, 200 otherwise.

    Why every delivery of such an endpoint must still succeed: it has MAX_ATTEMPTS (8)
    attempts over about 11 s; a burst is 2 or 3 requests, and bursts come `period` requests
    apart, at least 9 s on the busiest endpoint of either run. A delivery meets at most two
    bursts, and a retry (0.3 s or more later) rarely lands twice in one, so it draws a few
    failures at most; a kill takes one attempt from each delivery in flight, rarely twice
    from the same one.
    """

    def script(count: int) -> Answer:
        return answer if start <= count % period < start + length else OK

    return script


def every(nth: int, answer: Answer) -> Script:
    def script(count: int) -> Answer:
        return answer if count % nth == nth - 1 else OK

    return script


def always(answer: Answer) -> Script:
    return lambda _count: answer


def endpoints(config: Config) -> list[EndpointPlan]:
    """Three tenants, each with endpoints that misbehave in their own way."""
    period = config.burst_period
    return [
        EndpointPlan("acme", "steady", ("*",), "delivered", every(5, Answer("slow", seconds=0.2))),
        EndpointPlan(
            "acme",
            "bursts-5xx",
            ("call.*",),
            "delivered",
            bursts(period, 20, 3, Answer(status=503)),
        ),
        EndpointPlan(
            "acme",
            "hangs",
            ("call.completed", "billing.*"),
            "delivered",
            bursts(period, 10, 2, Answer("hang", seconds=HTTP_TIMEOUT_S + 3)),
        ),
        EndpointPlan("beta", "resets", ("*",), "delivered", bursts(period, 15, 3, Answer("reset"))),
        EndpointPlan(
            "beta", "slow", ("call.*",), "delivered", every(3, Answer("slow", seconds=0.8))
        ),
        # One request at a time: the 410 disables the endpoint in the transaction that kills
        # its delivery, before a second one can be claimed. One dead letter, the rest pending
        # (none dead if that 410 came from a worker that had lost its lease: see checks.py).
        EndpointPlan(
            "beta",
            "gone",
            ("billing.invoice.paid",),
            "gone",
            always(Answer(status=410)),
            {"max_in_flight": 1},
        ),
        EndpointPlan(
            "gamma",
            "throttled",
            ("*",),
            "delivered",
            bursts(period, 5, 3, Answer(status=429, headers={"Retry-After": str(RETRY_AFTER_S)})),
        ),
        EndpointPlan("gamma", "down", ("billing.refund",), "dead", always(Answer(status=503))),
        EndpointPlan("gamma", "signups", ("user.signup",), "delivered", always(OK)),
    ]


def matches(patterns: tuple[str, ...], event_type: str) -> bool:
    """The subscription rule: `*` matches all; exact; `p.*` matches `p.x` and `p.x.y`, not `p`."""
    return any(
        pattern == "*"
        or pattern == event_type
        or (pattern.endswith(".*") and event_type.startswith(pattern[:-1]))
        for pattern in patterns
    )


@dataclass(frozen=True)
class Step:
    """One fault at a time offset from the start of production."""

    at: float
    action: str
    """kill, terminate, restart-fast / restart-immediate, or failover."""


def timeline(config: Config, rng: random.Random) -> list[Step]:
    """Kills every few seconds; restarts and connection cuts spread evenly over the run."""
    steps: list[Step] = []
    if config.kill_every is not None:
        at = rng.uniform(*config.kill_every)
        while at < config.seconds:
            steps.append(Step(at, "kill"))
            at += rng.uniform(*config.kill_every)
    if config.failover_at is not None:
        steps.append(Step(config.failover_at, "failover"))
    for index, mode in enumerate(config.restarts):
        steps.append(
            Step(config.seconds * (index + 1) / (len(config.restarts) + 1), f"restart-{mode}")
        )
    for index in range(config.terminations):
        at = config.seconds * (index + 0.5) / config.terminations
        steps.append(Step(at, "terminate"))
    return sorted(steps, key=lambda step: step.at)
