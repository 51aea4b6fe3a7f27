"""The one settings class: NOTIFYHOOK_* environment variables, checked before anything runs."""

from __future__ import annotations

import difflib
import logging
import os
import socket
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from notifyhook import retry
from notifyhook.errors import ConfigurationError

ENV_PREFIX = "NOTIFYHOOK_"

USED_ELSEWHERE = frozenset(
    {"NOTIFYHOOK_TEST_DATABASE_URL", "NOTIFYHOOK_CLUSTER_USER", "NOTIFYHOOK_DASHBOARD_TOKEN"}
)
"""NOTIFYHOOK_* variables that are not settings but are read on purpose (tests, cluster.py,
and the dashboard's token, which only `notifyhook dashboard` reads: no worker needs it)."""

log = logging.getLogger("notifyhook.settings")

Seconds = Annotated[float, BeforeValidator(retry.parse_duration)]
"""A duration in seconds: plain seconds (`30`, `1.5`) or a number with s, m, h or d (`5m`)."""

Schedule = Annotated[tuple[float, ...], NoDecode, BeforeValidator(retry.parse_schedule)]

# Bounds on durations (DESIGN §8). PostgreSQL computes with them (now() - DISABLE_AFTER,
# now() + a retry delay, a lease): a value past what a timestamp can hold makes every
# statement that uses it fail, which a worker cannot tell from any other refusal.
HOUR = 3600.0
DAY = 86400.0
YEAR = 365.25 * DAY
MAX_RETRY_DELAY_S = 7 * DAY
MAX_RETRIES = 100
MAX_PAYLOAD_LIMIT = 16 * 1024 * 1024
"""Largest MAX_PAYLOAD_BYTES: a worker holds up to CONCURRENCY bodies at once (and
PostgreSQL's jsonb its own copy), so 100 MiB times 100 slots would be far past the unit's
MemoryMax; 16 MiB is already more than any receiver we know of accepts."""


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Settings(BaseSettings):
    """Everything a notifyhook process can be told, from NOTIFYHOOK_* variables."""

    # An empty value (`NOTIFYHOOK_METRICS_PORT=` in an environment file) means unset.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True
    )

    database_url: SecretStr = Field(
        description="libpq URL or key=value DSN of the database; multi-host DSNs work."
    )
    worker_id: str = Field(
        default_factory=_default_worker_id,
        min_length=1,
        max_length=200,
        description="Name of this worker in locked_by and attempts.worker; host:pid by default.",
    )
    concurrency: int = Field(
        100, ge=1, le=10_000, description="Most HTTP requests in flight in one worker process."
    )
    batch_size: int = Field(
        100, ge=1, le=10_000, description="Most deliveries claimed or recorded in one statement."
    )
    poll_interval: Seconds = Field(
        5.0,
        gt=0,
        le=HOUR,
        description="Seconds between backstop looks at the queue (retries, leases); at most 1 h.",
    )
    lease: Seconds = Field(
        60.0,
        # At least a second: the statements' timeouts are fractions of it, in whole
        # milliseconds, and 0 ms would mean no timeout at all (DESIGN §8).
        ge=1,
        le=DAY,
        description="Seconds a claimed delivery stays with its worker before others may take it; "
        "at least 1 s, at most 1 day.",
    )
    http_timeout: Seconds = Field(
        10.0,
        gt=0,
        le=HOUR,
        description="Seconds one HTTP attempt may take, all included; below LEASE, at most 1 h.",
    )
    retry_schedule: Schedule = Field(
        (30.0, 60.0, 120.0, 240.0, 480.0),
        description="Seconds to wait before each retry, comma-separated, each at most 7 days; "
        "attempts = retries + 1 (at most 101).",
    )
    jitter: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Fraction by which each retry delay is randomly varied (0.1 = ±10%).",
    )
    shutdown_grace: Seconds = Field(
        30.0,
        ge=0,
        le=HOUR,
        description="Seconds in-flight requests may finish after SIGTERM; at most 1 h.",
    )
    disable_after: Seconds = Field(
        5 * DAY,
        gt=0,
        le=10 * YEAR,
        description="Seconds of nothing but failures after which an endpoint is disabled; "
        "at most 10 years.",
    )
    max_payload_bytes: int = Field(
        262_144,
        ge=1,
        le=MAX_PAYLOAD_LIMIT,
        description="Largest event payload, in bytes of JSON text, at most 16 MiB; written to "
        "the database by migrate.",
    )
    allow_private_networks: bool = Field(
        False, description="Allow deliveries to loopback, private and link-local addresses."
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65_535,
        description="TCP port for Prometheus /metrics and /healthz; off when unset.",
    )
    sentry_dsn: SecretStr | None = Field(
        None, description="Sentry DSN; error reporting off when unset."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe level logged."
    )
    retention: Seconds = Field(
        30 * DAY,
        gt=0,
        le=100 * YEAR,
        description="Seconds delivered and dead deliveries are kept before prune; at most 100 years.",
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Fernet key: endpoint secrets written by the CLI are stored encrypted with it.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr) -> SecretStr:
        from notifyhook.store import check_conninfo

        check_conninfo(value.get_secret_value())
        return value

    @field_validator("sentry_dsn")
    @classmethod
    def _check_sentry_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        # sentry_sdk itself would raise only when the worker starts reporting.
        if value is not None:
            from sentry_sdk.utils import Dsn  # here: most commands never report to Sentry

            try:
                Dsn(value.get_secret_value())
            # BadDsn, or urllib's error for a bad port: neither quotes the key.
            except ValueError as error:
                raise ValueError(
                    f"is not a Sentry DSN ({error}); expected https://KEY@HOST/PROJECT_ID"
                ) from None
        return value

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from notifyhook.secrets import check_key

            check_key(value.get_secret_value())
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _bounded_schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) > MAX_RETRIES:
            raise ValueError(f"at most {MAX_RETRIES} retries, got {len(value)}")
        for position, delay in enumerate(value, start=1):
            if delay > MAX_RETRY_DELAY_S:
                raise ValueError(
                    f"retry schedule delay {position} must be at most 7 days "
                    f"({MAX_RETRY_DELAY_S:g}s), got {delay:g}s"
                )
        return value

    @model_validator(mode="after")
    def _timeout_below_lease(self) -> Settings:
        # A request that could outlive its lease would let a second worker send the
        # same delivery while the first is still waiting for an answer.
        if self.http_timeout >= self.lease:
            raise ValueError(
                f"NOTIFYHOOK_HTTP_TIMEOUT ({self.http_timeout:g}s) must be shorter than "
                f"NOTIFYHOOK_LEASE ({self.lease:g}s)"
            )
        return self

    @property
    def max_attempts(self) -> int:
        return retry.max_attempts(self.retry_schedule)

    @property
    def endpoint_timeout_cap_s(self) -> float:
        """Longest request an endpoint's timeout_ms may ask for: well inside the lease."""
        return self.lease * 0.9


_SECRET_FIELDS = {"database_url", "sentry_dsn", "secret_key"}


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, or raise ConfigurationError naming each wrong variable."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigurationError(describe_errors(error)) from None


def optional_database_url() -> str | None:
    """NOTIFYHOOK_DATABASE_URL checked as load_settings checks it, or None when unset.

    For demo and bench, which start a PostgreSQL of their own without one.
    """
    from notifyhook.store import check_conninfo

    variable = ENV_PREFIX + "DATABASE_URL"
    url = os.environ.get(variable) or None
    if url is not None:
        try:
            check_conninfo(url)
        except ValueError as error:
            raise ConfigurationError(f"{variable}: {error}") from None
    return url


def warn_unknown_variables() -> None:
    """Log a warning for each NOTIFYHOOK_* variable that is no setting: a typo, or one
    from another version (an environment file shared between versions must not stop workers)."""
    names = Settings.model_fields
    for variable in sorted(os.environ):
        upper = variable.upper()
        # pydantic-settings matches names regardless of case; so does this.
        if not upper.startswith(ENV_PREFIX) or upper in USED_ELSEWHERE:
            continue
        field = upper.removeprefix(ENV_PREFIX).lower()
        if field in names:
            continue
        # Matched without the prefix, which every name shares and would make all look close.
        close = difflib.get_close_matches(field, names, n=1)
        hint = f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""
        log.warning("%s is not a notifyhook setting; ignored%s", variable, hint)


def describe_errors(error: ValidationError) -> str:
    """One line naming every wrong variable and what is allowed, never a secret's value."""
    problems = []
    for item in error.errors(include_url=False):
        field = str(item["loc"][0]) if item["loc"] else ""
        message = " ".join(str(item["msg"]).removeprefix("Value error, ").split())
        if not field:
            problems.append(message)
            continue
        variable = ENV_PREFIX + field.upper()
        if item["type"] == "missing":
            problems.append(f"{variable} is required ({Settings.model_fields[field].description})")
        elif field in _SECRET_FIELDS:
            problems.append(f"{variable}: {message}")
        else:
            problems.append(f"{variable}: {message} (got {item.get('input')!r})")
    return "; ".join(problems)
