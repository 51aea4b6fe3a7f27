"""Error reports to Sentry when NOTIFYHOOK_SENTRY_DSN is set: bugs and lost databases, never a payload or secret."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.atexit import AtexitIntegration
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.integrations.excepthook import ExcepthookIntegration
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger

from notifyhook import __version__
from notifyhook.settings import Settings
from notifyhook.store import Trouble, conninfo_credentials, server_words

FLUSH_TIMEOUT_S = 2.0
"""How long shutdown waits for reports still being sent."""

REDACTED = "[redacted]"

UNEXPECTED_LOGGER = "notifyhook.worker.unexpected"
"""Where the worker logs a bug met in a delivery, which it reports with report_exception:
not captured again as a message event."""

# Secrets whose values no code here knows in advance: endpoint secrets as stored
# (whsec_…, whsk_…, or enc: + a Fernet token) and the password part of any URL.
_SECRET_PATTERNS = (
    re.compile(r"wh(?:sec|sk)_[A-Za-z0-9+/=_-]+"),
    re.compile(r"enc:[A-Za-z0-9_=-]+"),
    re.compile(r"gAAAAA[A-Za-z0-9_=-]{20,}"),
    re.compile(r"(?<=://)[^/@\s:]*:[^/@\s]+(?=@)"),
    re.compile(r"(?<=password=)\S+"),
)

# The path and query of a web address: an endpoint's may hold tokens (the host stays, to
# tell endpoints apart).
# Schemes are case-insensitive, and endpoints accept HTTPS://… as written.
_URL_PATH = re.compile(r"(https?://[^/?#\s'\"<>]+)[/?#][^\s'\"<>]*", re.IGNORECASE)

# Event fields that can carry request bodies, headers, cookies, users or variables.
_DROPPED_FIELDS = ("request", "user", "extra")


def start(settings: Settings) -> bool:
    """Initialise the Sentry client when a DSN is set; returns whether reporting is on."""
    if settings.sentry_dsn is None:
        return False
    known = _known_secrets(settings)
    worker_id = settings.worker_id

    def before_send(event: Any, hint: Any) -> Any:
        event = scrub(event, known)
        event.setdefault("tags", {})["worker_id"] = worker_id
        return event

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        release=f"notifyhook@{__version__}",
        send_default_pii=False,
        include_local_variables=False,
        max_request_body_size="never",
        # Only what is listed: the auto-enabled httpx and aiohttp integrations
        # would add tracing headers to webhook requests and record their URLs.
        default_integrations=False,
        integrations=[
            AtexitIntegration(),
            DedupeIntegration(),
            ExcepthookIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
        traces_sample_rate=None,
        before_send=before_send,
        shutdown_timeout=FLUSH_TIMEOUT_S,
    )
    ignore_logger(UNEXPECTED_LOGGER)
    # The global scope: events captured outside the worker's task (an uncaught
    # exception reaching the interpreter) carry the tag too.
    sentry_sdk.get_global_scope().set_tag("worker_id", worker_id)
    return True


def report_database_trouble(what: str, trouble: Trouble, error: BaseException) -> None:
    """One report per outage, or per run of timeouts: the worker calls this when database
    calls start failing. Grouped by what went wrong (an outage, a statement_timeout, a
    lock_timeout), each saying so."""
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["notifyhook", trouble.kind]
        scope.set_tag("failed_operation", what)
        sentry_sdk.capture_message(
            f"{trouble.text}: {what} failed: {server_words(error)[:200]}", level="warning"
        )


def report_refused_outcome(sqlstate: str, reason: str) -> None:
    """One report per outcome the database refused (the recorder isolated it from its batch)."""
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["notifyhook", "outcome-refused", sqlstate]
        scope.set_tag("sqlstate", sqlstate)
        sentry_sdk.capture_message(reason, level="error")


def report_exception(error: BaseException) -> None:
    """Report an unexpected exception: one that stops the worker, or a bug met in a delivery."""
    sentry_sdk.capture_exception(error)


def flush() -> None:
    """Wait (briefly) for queued reports to go out; a no-op when reporting is off."""
    sentry_sdk.flush(timeout=FLUSH_TIMEOUT_S)


def scrub(event: dict[str, Any], known_secrets: Iterable[str] = ()) -> dict[str, Any]:
    """The event without request data, variables or anything that looks like a secret."""
    for field in _DROPPED_FIELDS:
        event.pop(field, None)
    for exception in (event.get("exception") or {}).get("values") or []:
        for frame in (exception.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    crumbs = event.get("breadcrumbs")
    for crumb in (crumbs or {}).get("values", []) if isinstance(crumbs, dict) else crumbs or []:
        crumb.pop("data", None)
    secrets = sorted({s for s in known_secrets if s}, key=len, reverse=True)
    return _redact(event, secrets)  # type: ignore[no-any-return]


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        for pattern in _SECRET_PATTERNS:
            value = pattern.sub(REDACTED, value)
        return _URL_PATH.sub(rf"\1/{REDACTED}", value)
    if isinstance(value, dict):
        return {key: _redact(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(item, secrets) for item in value]
    return value


def _known_secrets(settings: Settings) -> list[str]:
    """Values that must never leave the process: URLs, the database password, keys."""
    known = [settings.database_url.get_secret_value()]
    # Parsed again here (settings has checked it) because the password alone
    # can appear in a message where the whole DSN does not.
    known.extend(conninfo_credentials(known[0]))
    for secret in (settings.sentry_dsn, settings.secret_key):
        if secret is not None:
            known.append(secret.get_secret_value())
    return known
