"""The subcommands: each parses its arguments and makes one or two store calls.

The store (psycopg) and the tools load when a command runs, not when the parser is built:
`notifyhook --help` stays fast (docs/performance.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from notifyhook import retry, secrets, signing
from notifyhook.console import STDIN, Given, print_json, read_given, run_async
from notifyhook.errors import CommandError, SecretError, UsageError

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from notifyhook.settings import Settings

log = logging.getLogger("notifyhook.commands")

HIDDEN = "[hidden]"
"""What `endpoint show` prints in place of a header's value."""


def register_all(commands: Any) -> None:
    _register_migrate(commands)
    _register_worker(commands)
    _register_stats(commands)
    _register_endpoint(commands)
    _register_send(commands)
    _register_replay(commands)
    _register_prune(commands)
    _register_dashboard(commands)
    # The tools' entry points import only argparse; each tool loads when its command runs.
    from notifyhook.tools import bench, entry

    entry.register(commands)
    bench.register(commands)


def _url(settings: Settings) -> str:
    return settings.database_url.get_secret_value()


# -- migrate ---------------------------------------------------------------------


def _register_migrate(commands: Any) -> None:
    parser = commands.add_parser(
        "migrate",
        help="create or upgrade the notifyhook schema",
        description="Apply the SQL files shipped with this version (numbered migrations, then the "
        "functions, triggers and views that changed). Safe to run twice and from two places at once.",
    )
    parser.set_defaults(handler=migrate_command)


async def migrate_command(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.migrate import code_schema_version, migrate
    from notifyhook.store import connect

    async with connect(_url(settings)) as conn:
        # Only a limit the operator set: an unset variable must not undo an UPDATE of
        # notifyhook.config made in psql.
        given = "max_payload_bytes" in settings.model_fields_set
        applied = await migrate(
            conn, max_payload_bytes=settings.max_payload_bytes if given else None
        )
    version = code_schema_version()
    if applied:
        print(f"applied {len(applied)} file(s): {', '.join(applied)}; schema version {version}")
    else:
        print(f"schema is up to date (version {version})")
    return 0


# -- worker ----------------------------------------------------------------------


def _register_worker(commands: Any) -> None:
    parser = commands.add_parser(
        "worker",
        help="run one worker process",
        description="Deliver webhooks until SIGTERM: LISTEN for new events, claim due deliveries, "
        "POST them signed, record every attempt. Run as many as you like, on any number of hosts.",
    )
    parser.set_defaults(handler=worker_command)


def worker_command(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook import reporting
    from notifyhook.worker import serve

    try:
        run_async(serve(settings))
    except Exception as error:
        # Whatever stops the worker is worth a report (a no-op without a DSN);
        # the command line then prints it and picks the exit code.
        reporting.report_exception(error)
        raise
    finally:
        reporting.flush()
    return 0


# -- stats -----------------------------------------------------------------------


def _register_stats(commands: Any) -> None:
    parser = commands.add_parser(
        "stats",
        help="show the queue and every endpoint",
        description="Print notifyhook.queue_stats and notifyhook.endpoint_stats. Reads only, "
        "in read-only transactions: a hot standby's URL keeps these queries off the primary.",
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="the database to read, e.g. a read replica (default: NOTIFYHOOK_DATABASE_URL); "
        "a password here shows in the process list: prefer PGPASSWORD or ~/.pgpass",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--watch", type=_duration, metavar="SECONDS", help="print again every SECONDS until Ctrl-C"
    )
    parser.set_defaults(handler=stats_command)


async def stats_command(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.store import connect, fetch_dicts, read_only

    _warn_of_a_password_in(args.database_url)
    # Read-only sessions: on a standby any write would fail anyway, and on a primary
    # this keeps a view that someday calls a writing function from doing so unseen.
    async with connect(read_only(_url(settings))) as conn:
        while True:
            queue = await fetch_dicts(conn, "queue_stats")
            endpoints = await fetch_dicts(conn, "endpoint_stats")
            if args.json:
                print_json({"queue": queue[0], "endpoints": endpoints})
            else:
                print(format_table(queue))
                print()
                print(format_table(endpoints) if endpoints else "(no endpoints)")
            if not args.watch:
                return 0
            # Piped output is block-buffered: a watcher must see each round as it comes.
            print(flush=True)
            await asyncio.sleep(args.watch)


def _warn_of_a_password_in(given_url: str | None) -> None:
    """A --database-url's password is on the command line for as long as the command runs
    (a dashboard, a `stats --watch`: days); the command still runs."""
    from notifyhook.store import conninfo_credentials

    if given_url and conninfo_credentials(given_url):
        log.warning(
            "--database-url holds a password, visible to every user of this host (ps, "
            "/proc/PID/cmdline); give it with PGPASSWORD or ~/.pgpass instead"
        )


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table, like psql's."""
    if not rows:
        return "(none)"
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S%z")
    if isinstance(value, list | dict):
        return json.dumps(value)
    return _printable(str(value))


# C0 and C1 control characters and DEL: names and errors come from tenants and
# receivers, and printed raw an escape sequence is a command to the operator's
# terminal (clear the screen, retitle it, OSC 52: write the clipboard).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """`text` with its control characters written as escapes (\\x1b), as repr would."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# -- endpoint --------------------------------------------------------------------


def _register_endpoint(commands: Any) -> None:
    parser = commands.add_parser(
        "endpoint",
        help="add, list, show, disable, enable endpoints; rotate a secret; set a retry schedule",
        description="Manage endpoints (rows of notifyhook.endpoints). IDs are positional.",
    )
    actions = parser.add_subparsers(title="actions", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="add an endpoint and print a fresh secret once",
        description="Add an endpoint. A fresh secret is printed once: give it to the "
        "receiver (a secret given with --secret or --secret-file is not printed back). With "
        "--signature ed25519 its whpk_ public key is printed instead (the whsk_ signing key is "
        "never shown).",
    )
    add.add_argument("--tenant", required=True, help="tenant id")
    add.add_argument("--name", required=True, help="label, unique per tenant")
    url = add.add_mutually_exclusive_group(required=True)
    url.add_argument(
        "--url",
        help="http:// or https:// URL to POST to; - reads it from standard input. One whose "
        "path or query holds a token does not belong on the command line, which every user "
        "of the host can read: give it with - or --url-file",
    )
    url.add_argument("--url-file", metavar="PATH", help="read the --url from this file")
    add.add_argument(
        "--event-types",
        default="*",
        help="comma-separated patterns: call.completed, call.*, * (default *)",
    )
    extra = add.add_mutually_exclusive_group()
    extra.add_argument(
        "--extra-fields",
        type=_json_object_or_stdin,
        metavar="JSON",
        help="JSON object merged into every body; - reads it from standard input",
    )
    extra.add_argument(
        "--extra-fields-file", metavar="PATH", help="read the --extra-fields object from this file"
    )
    headers = add.add_mutually_exclusive_group()
    headers.add_argument(
        "--headers",
        type=_json_object_or_stdin,
        metavar="JSON",
        help="JSON object of extra request headers; - reads it from standard input. One "
        "holding a credential (Authorization: Bearer …) does not belong on the command "
        "line, which every user of the host can read: give it with - or --headers-file",
    )
    headers.add_argument(
        "--headers-file", metavar="PATH", help="read the --headers JSON object from this file"
    )
    add.add_argument(
        "--rate-limit", type=_positive_int, help="most requests per second, whole fleet"
    )
    add.add_argument("--max-in-flight", type=_positive_int, help="most concurrent requests")
    add.add_argument("--timeout-ms", type=_positive_int, help="request timeout for this endpoint")
    add.add_argument(
        "--signature",
        choices=SIGNATURE_SCHEMES,
        default="hmac",
        help="hmac: a whsec_ secret shared with the receiver (v1, the default); ed25519: a "
        "whsk_ signing key, the receiver verifying with its whpk_ public key (v1a)",
    )
    secret = add.add_mutually_exclusive_group()
    secret.add_argument(
        "--secret",
        metavar="SECRET",
        help="a whsec_ secret or whsk_ signing key to use instead of a fresh one. Give it as "
        "- to read it from standard input, e.g. `pass show crm | notifyhook endpoint add … "
        "--secret -`, or with --secret-file: a secret on the command line is visible to "
        "every user of the host (ps, /proc) and is warned about",
    )
    secret.add_argument(
        "--secret-file",
        metavar="PATH",
        help="read the secret from this file, e.g. a systemd credential or a mounted secret",
    )
    add.add_argument(
        "--retry-schedule",
        type=_retry_schedule,
        help="this endpoint's retry delays in whole seconds or with s, m, h, d, e.g. 10,60,10m "
        "(default: NOTIFYHOOK_RETRY_SCHEDULE); attempts = delays + 1",
    )
    add.set_defaults(handler=endpoint_add)

    listing = actions.add_parser("list", help="list endpoints")
    listing.add_argument("--tenant", help="only this tenant's")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=endpoint_list)

    show = actions.add_parser("show", help="show one endpoint and its health")
    show.add_argument("endpoint_id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=endpoint_show)

    disable = actions.add_parser("disable", help="stop sending to an endpoint; its deliveries wait")
    disable.add_argument("endpoint_id", type=int, metavar="ID")
    disable.add_argument("--reason", default="disabled by an operator", help="why (shown in stats)")
    disable.set_defaults(handler=endpoint_disable)

    enable = actions.add_parser("enable", help="resume an endpoint; its waiting deliveries go out")
    enable.add_argument("endpoint_id", type=int, metavar="ID")
    enable.set_defaults(handler=endpoint_enable)

    rotate = actions.add_parser(
        "rotate-secret",
        help="set a fresh secret; the old one keeps signing during a grace",
        description="Move the secret to previous_secret, valid for --grace, and set a fresh one. "
        "Until the grace ends both signatures are sent. Prints the new secret once.",
    )
    rotate.add_argument("endpoint_id", type=int, metavar="ID")
    rotate.add_argument(
        "--grace",
        type=_duration,
        default=86400.0,
        help="how long the old secret keeps signing: seconds or 30m, 24h, 7d (default 24h)",
    )
    rotate.add_argument(
        "--signature",
        choices=SIGNATURE_SCHEMES,
        help="the new key's kind (default: the current one's); during the grace each key "
        "signs in its own scheme, so a receiver can move between hmac and ed25519",
    )
    rotate.set_defaults(handler=endpoint_rotate_secret)

    schedule = actions.add_parser(
        "set-retry-schedule",
        help="give an endpoint its own retry delays, or the global ones back",
        description="Set endpoints.retry_schedule: the delays before each retry to this endpoint, "
        "its attempt budget being their number + 1. `default` clears it (NOTIFYHOOK_RETRY_SCHEDULE "
        "applies). Deliveries already waiting keep the retry time they have; the new delays "
        "and budget apply from their next attempt.",
    )
    schedule.add_argument("endpoint_id", type=int, metavar="ID")
    schedule.add_argument(
        "schedule",
        type=_retry_schedule_or_default,
        metavar="SCHEDULE",
        help="delays in whole seconds or with s, m, h, d, e.g. 10,60,10m; or `default`",
    )
    schedule.set_defaults(handler=endpoint_set_retry_schedule)


def _secret_key(settings: Settings) -> str | None:
    return settings.secret_key.get_secret_value() if settings.secret_key else None


SIGNATURE_SCHEMES = ("hmac", "ed25519")

MAX_COMMAND_DURATION_S = 10 * 365.25 * 86400.0
"""Longest duration a command takes (a rotation's grace, --since, --watch): 10 years."""


def _fresh_secret(scheme: str) -> str:
    return signing.generate_signing_key() if scheme == "ed25519" else signing.generate_secret()


def _print_new_secret(secret: str, *, given: bool) -> None:
    """Once, at creation: the receiver's half. An ed25519 signing key is never printed, nor
    a secret the operator gave: they have it, and printed it would sit in a terminal's
    scrollback or a provisioning job's log."""
    if signing.is_signing_key(secret):
        print(f"public key: {signing.public_key(secret)}")
        print("(signatures are ed25519, v1a: the receiver verifies with this public key)")
    elif given:
        print("secret: the one given (not shown)")
    else:
        print(f"secret: {secret}")
        print("(shown once: give it to the receiver, which verifies with it)")


async def endpoint_add(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.store import connect, fetch_dicts, json_param

    url, secret, given, headers, extra_fields = _given_options(args)
    params = {
        "tenant_id": args.tenant,
        "name": args.name,
        "url": url,
        "secret": secrets.seal(secret, _secret_key(settings)),
        "event_types": [p.strip() for p in args.event_types.split(",")],
        "extra_fields": json_param(extra_fields),
        "headers": json_param(headers),
        "rate_limit": args.rate_limit,
        "max_in_flight": args.max_in_flight,
        "timeout_ms": args.timeout_ms,
        "retry_schedule": args.retry_schedule,
    }
    async with connect(_url(settings)) as conn:
        rows = await fetch_dicts(conn, "add_endpoint", params)
    print(f"endpoint {rows[0]['id']} added")
    _print_new_secret(secret, given=given)
    return 0


def _given_secret(secret: str) -> str:
    """A --secret checked before it is sealed: encrypted, the database could not check it,
    and every delivery would fail. Checked without a key too, for one message either way."""
    try:
        signing.check_secret(secret)
    except SecretError as error:
        raise UsageError(f"--secret: {error}") from None
    return secret


JsonOption = dict[str, Any] | str | None
"""A JSON object option as argparse leaves it: parsed when given on the command line,
`-` for standard input, None when absent or given as its file."""


def _json_source(option: str, value: JsonOption, path: str | None) -> Given:
    """Where to read a JSON object option from: nothing to read when argparse parsed it."""
    return Given(option, None if isinstance(value, dict) else value, path)


def _json_value(option: str, value: JsonOption, text: str | None) -> dict[str, Any]:
    """The option's object: as parsed on the command line, or `text` read from standard
    input or its file, checked as argparse checks the command line ({} when absent)."""
    if isinstance(value, dict):
        return value
    if text is None:
        return {}
    try:
        return _json_object(text)
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"{option}: {error}") from None


def _given_options(
    args: argparse.Namespace,
) -> tuple[str, str, bool, dict[str, Any], dict[str, Any]]:
    """The endpoint's URL, its secret, whether the secret was given (or is fresh), its
    headers and extra fields, each from the command line, standard input or a file; a
    warning for a credential on the command line."""
    headers_on_command_line = isinstance(args.headers, dict)  # parsed there by argparse
    given_url = Given("--url", args.url, args.url_file)
    given_secret = Given("--secret", args.secret, args.secret_file)
    given_headers = _json_source("--headers", args.headers, args.headers_file)
    given_extra = _json_source("--extra-fields", args.extra_fields, args.extra_fields_file)
    url, secret_text, headers_text, extra_text = read_given(
        given_url, given_secret, given_headers, given_extra
    )
    assert url is not None  # argparse requires --url or --url-file
    from notifyhook.sender import url_pieces  # not at import: httpx, for one command

    if given_url.on_command_line and url_pieces(url):
        log.warning(
            "--url on the command line is visible to every user of this host (ps, "
            "/proc/PID/cmdline), and its path or query looks like it holds a token; give "
            "it on standard input (--url -) or with --url-file"
        )
    secret = _given_secret(secret_text) if secret_text else _fresh_secret(args.signature)
    headers = _json_value("--headers", args.headers, headers_text)
    extra_fields = _json_value("--extra-fields", args.extra_fields, extra_text)
    if given_secret.on_command_line:
        log.warning(
            "--secret on the command line is visible to every user of this host (ps, "
            "/proc/PID/cmdline); give it on standard input (--secret -) or with --secret-file"
        )
    if headers_on_command_line and (named := _credential_headers(headers)):
        log.warning(
            "--headers on the command line is visible to every user of this host (ps, "
            "/proc/PID/cmdline), and holds %s; give them on standard input (--headers -) "
            "or with --headers-file",
            ", ".join(named),
        )
    return url, secret, bool(secret_text), headers, extra_fields


# Header names that usually carry a credential: Authorization, Cookie, X-Api-Key,
# X-Auth-Token, a partner's X-Webhook-Secret.
_CREDENTIAL_HEADER = re.compile(r"auth|token|key|secret|passw|cookie|credential", re.IGNORECASE)


def _credential_headers(headers: dict[str, Any]) -> list[str]:
    return sorted(name for name in headers if _CREDENTIAL_HEADER.search(name))


async def endpoint_list(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.store import connect, fetch_dicts

    async with connect(_url(settings)) as conn:
        rows = await fetch_dicts(conn, "list_endpoints", {"tenant_id": args.tenant})
    print_json(rows) if args.json else print(format_table(rows))
    return 0


async def endpoint_show(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.store import connect, fetch_dicts

    async with connect(_url(settings)) as conn:
        rows = await fetch_dicts(conn, "show_endpoint", {"endpoint_id": args.endpoint_id})
        keys = await fetch_dicts(conn, "endpoint_secrets", {"endpoint_id": args.endpoint_id})
    if not rows:
        raise CommandError(f"no endpoint {args.endpoint_id}")
    rows[0].update(_public_keys(keys[0], _secret_key(settings)))
    # Header values are the receiver's credentials as often as not (Authorization,
    # X-Api-Key): shown by name, like the secret, never by value.
    if rows[0].get("headers"):
        rows[0]["headers"] = {name: HIDDEN for name in rows[0]["headers"]}
    if args.json:
        print_json(rows[0])
    else:
        width = max(len(k) for k in rows[0])
        print("\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in rows[0].items()))
    return 0


def _public_keys(stored: dict[str, Any], key: str | None) -> dict[str, str]:
    """The signature scheme and, for ed25519, the public keys: never a secret itself."""
    shown: dict[str, str] = {}
    for column, label in (("secret", ""), ("previous_secret", "previous_")):
        if stored[column] is None:
            continue
        try:
            plain = secrets.unseal(stored[column], key)
        except SecretError:
            shown[f"{label}signature"] = "unknown (sealed: set NOTIFYHOOK_SECRET_KEY to tell)"
            continue
        if signing.is_signing_key(plain):
            shown[f"{label}signature"] = "ed25519 (v1a)"
            shown[f"{label}public_key"] = signing.public_key(plain)
        else:
            shown[f"{label}signature"] = "hmac (v1)"
    return shown


async def _set_enabled(
    settings: Settings, endpoint_id: int, enabled: bool, reason: str | None
) -> int:
    from notifyhook.store import connect, fetch_dicts

    async with connect(_url(settings)) as conn:
        rows = await fetch_dicts(
            conn,
            "set_endpoint_enabled",
            {"endpoint_id": endpoint_id, "enabled": enabled, "reason": reason},
        )
    if not rows:
        raise CommandError(f"no endpoint {endpoint_id}")
    print(f"endpoint {endpoint_id} {'enabled' if enabled else 'disabled'}")
    return 0


async def endpoint_disable(args: argparse.Namespace, settings: Settings) -> int:
    return await _set_enabled(settings, args.endpoint_id, False, args.reason)


async def endpoint_enable(args: argparse.Namespace, settings: Settings) -> int:
    return await _set_enabled(settings, args.endpoint_id, True, None)


async def endpoint_rotate_secret(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.store import connect, fetch_dicts

    async with connect(_url(settings)) as conn:
        scheme = args.signature or await _current_scheme(conn, args.endpoint_id, settings)
        secret = _fresh_secret(scheme)
        params = {
            "endpoint_id": args.endpoint_id,
            "secret": secrets.seal(secret, _secret_key(settings)),
            "grace": timedelta(seconds=args.grace),
        }
        rows = await fetch_dicts(conn, "rotate_secret", params)
    if not rows:
        raise CommandError(f"no endpoint {args.endpoint_id}")
    expires = rows[0]["previous_secret_expires_at"]
    print(
        f"endpoint {args.endpoint_id}: new secret set; the previous one keeps signing until {_cell(expires)}"
    )
    _print_new_secret(secret, given=False)
    return 0


async def _current_scheme(conn: AsyncConnection[Any], endpoint_id: int, settings: Settings) -> str:
    """hmac or ed25519, as the endpoint's current secret: a rotation keeps the kind."""
    from notifyhook.store import fetch_dicts

    rows = await fetch_dicts(conn, "endpoint_secrets", {"endpoint_id": endpoint_id})
    if not rows:
        raise CommandError(f"no endpoint {endpoint_id}")
    try:
        plain = secrets.unseal(rows[0]["secret"], _secret_key(settings))
    except SecretError as error:
        raise UsageError(f"{error}; or say which kind of key to make with --signature") from None
    return "ed25519" if signing.is_signing_key(plain) else "hmac"


async def endpoint_set_retry_schedule(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.store import connect, fetch_dicts

    params = {"endpoint_id": args.endpoint_id, "retry_schedule": args.schedule}
    async with connect(_url(settings)) as conn:
        rows = await fetch_dicts(conn, "set_retry_schedule", params)
    if not rows:
        raise CommandError(f"no endpoint {args.endpoint_id}")
    if args.schedule is None:
        print(f"endpoint {args.endpoint_id}: retries on the global schedule")
    else:
        delays = ",".join(str(d) for d in args.schedule)
        print(
            f"endpoint {args.endpoint_id}: retries after {delays} seconds "
            f"({len(args.schedule) + 1} attempts in all)"
        )
    return 0


# -- send, replay, prune -----------------------------------------------------------


def _register_send(commands: Any) -> None:
    parser = commands.add_parser(
        "send",
        help="enqueue one event",
        description="Enqueue one event through notifyhook.enqueue(); prints its id (the webhook-id).",
    )
    parser.add_argument("--tenant", required=True, help="tenant id")
    parser.add_argument(
        "--type", required=True, dest="event_type", help="event type, e.g. call.completed"
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data",
        type=_json_object_or_stdin,
        metavar="JSON",
        help="the payload, a JSON object; - reads it from standard input",
    )
    data.add_argument("--data-file", metavar="PATH", help="read the payload from this file")
    parser.add_argument(
        "--idempotency-key", help="a repeated key enqueues nothing and prints the first id"
    )
    parser.add_argument(
        "--endpoint", type=int, dest="endpoint_id", help="send to this endpoint only"
    )
    parser.set_defaults(handler=send_command)


async def send_command(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.store import connect, fetch_dicts, json_param

    [text] = read_given(_json_source("--data", args.data, args.data_file))
    payload = _json_value("--data", args.data, text)
    params = {
        "tenant_id": args.tenant,
        "event_type": args.event_type,
        "payload": json_param(payload),
        "idempotency_key": args.idempotency_key,
        "endpoint_id": args.endpoint_id,
    }
    async with connect(_url(settings)) as conn:
        rows = await fetch_dicts(conn, "enqueue", params)
    print(rows[0]["enqueue"])
    return 0


def _register_replay(commands: Any) -> None:
    parser = commands.add_parser(
        "replay",
        help="send dead deliveries again",
        description="Put dead deliveries back to pending with a fresh attempt budget.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--delivery", type=int, metavar="ID", help="one delivery")
    which.add_argument(
        "--endpoint", type=int, metavar="ID", help="every dead delivery of an endpoint"
    )
    which.add_argument("--all", action="store_true", help="every dead delivery")
    parser.add_argument(
        "--since",
        type=_timestamp,
        metavar="TIME",
        help="only those that died at or after TIME: ISO 8601, e.g. 2026-11-28T10:00Z "
        "(local time without an offset)",
    )
    parser.set_defaults(handler=replay_command)


async def replay_command(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.store import connect, fetch_dicts

    if args.delivery is not None and args.since is not None:
        raise UsageError("--since goes with --endpoint or --all, not --delivery")
    async with connect(_url(settings)) as conn:
        if args.delivery is not None:
            rows = await fetch_dicts(conn, "replay_delivery", {"delivery_id": args.delivery})
            if not rows[0]["replay"]:
                raise CommandError(f"delivery {args.delivery} is not dead (or does not exist)")
            count = 1
        else:
            rows = await fetch_dicts(
                conn, "replay_dead", {"endpoint_id": args.endpoint, "since": args.since}
            )
            count = rows[0]["replay_dead"]
    print(f"replayed {count} dead deliver{'y' if count == 1 else 'ies'}")
    return 0


def _register_prune(commands: Any) -> None:
    parser = commands.add_parser(
        "prune",
        help="drop or delete finished deliveries older than RETENTION",
        description="Drop the day partitions of delivered and dead deliveries and of attempts "
        "that ended before NOTIFYHOOK_RETENTION, then delete older finished deliveries of the "
        "legacy partition (with their attempts) and events left with no delivery, in small "
        "batches.",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=1000, help="rows per batch (default 1000)"
    )
    parser.set_defaults(handler=prune_command)


async def prune_command(args: argparse.Namespace, settings: Settings) -> int:
    from notifyhook.store import connect, retire_partitions

    total = 0
    # One plain connection, not the worker's pool: a pool would hide an
    # unreachable database behind its own retries and a generic timeout.
    async with connect(_url(settings)) as conn:
        # Whole days first (a catalog change each), then the legacy rows one by one.
        dropped = await retire_partitions(conn, settings.retention)
        if dropped is None:
            raise CommandError("another prune is running (a worker's retention pass); try later")
        while deleted := await _prune_batch(conn, settings.retention, args.batch_size):
            total += deleted
    if dropped:
        print(
            f"dropped {len(dropped)} day partitions older than {settings.retention:g}s: "
            f"{', '.join(dropped)}"
        )
    print(f"deleted {total} rows older than {settings.retention:g}s")
    return 0


async def _prune_batch(conn: AsyncConnection[Any], retention_s: float, batch_size: int) -> int:
    """One batch, under the lock the workers' retention pass takes: one prune at a time."""
    from notifyhook.store import fetch_dicts

    async with conn.transaction():
        locked = await fetch_dicts(conn, "try_lock_prune")
        if not next(iter(locked[0].values())):
            raise CommandError("another prune is running (a worker's retention pass); try later")
        rows = await fetch_dicts(
            conn,
            "prune",
            {"older_than": timedelta(seconds=retention_s), "batch_size": batch_size},
        )
    return int(rows[0]["prune"])


# -- dashboard -------------------------------------------------------------------


def _register_dashboard(commands: Any) -> None:
    parser = commands.add_parser(
        "dashboard",
        help="serve a read-only web page of the queue and every endpoint",
        description="Serve the partner-health dashboard (docs/dashboard.md): the queue, every "
        "endpoint's health, attempts and dead letters. Read-only; with "
        "NOTIFYHOOK_DASHBOARD_TOKEN set, every request needs that token.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=_port, default=8790, help="TCP port (default 8790; 0: any free port)"
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="read this database (a replica will do) instead of NOTIFYHOOK_DATABASE_URL; "
        "a password here shows in the process list: prefer PGPASSWORD or ~/.pgpass",
    )
    # Standalone: NOTIFYHOOK_DATABASE_URL is not needed when --database-url is given.
    parser.set_defaults(handler=dashboard_command, standalone=True)


def dashboard_command(args: argparse.Namespace) -> int:
    from notifyhook import logs
    from notifyhook.dashboard.server import serve, token_from_environment
    from notifyhook.settings import load_settings, warn_unknown_variables

    given = {"database_url": args.database_url} if args.database_url else {}
    settings = load_settings(**given)
    logs.configure(settings.log_format, settings.log_level)
    warn_unknown_variables()
    _warn_of_a_password_in(args.database_url)
    token = token_from_environment()
    run_async(serve(_url(settings), args.host, args.port, token))
    return 0


# -- argument types ----------------------------------------------------------------


def _duration(text: str) -> float:
    try:
        seconds = retry.parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    # Past this, the database's timestamps (now() + a grace) and Python's timedelta fail.
    if seconds > MAX_COMMAND_DURATION_S:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than 10 years")
    return seconds


def _retry_schedule(text: str) -> list[int]:
    try:
        delays = retry.parse_schedule(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    # endpoints.retry_schedule is integer[]: say so rather than round 1.5 s to 2.
    for position, delay in enumerate(delays, start=1):
        if delay != int(delay):
            raise argparse.ArgumentTypeError(
                f"retry schedule delay {position} must be whole seconds, got {delay:g}"
            )
    return [int(delay) for delay in delays]


def _retry_schedule_or_default(text: str) -> list[int] | None:
    return None if text.strip() == "default" else _retry_schedule(text)


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    # Without an offset, the operator means their own clock, as journalctl --since does.
    return value if value.tzinfo is not None else value.astimezone()


def _port(text: str) -> int:
    value = _positive_int(text) if text != "0" else 0
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0 to 65535), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _json_object_or_stdin(text: str) -> dict[str, Any] | str:
    """A JSON object, or `-`: read from standard input when the command runs."""
    return text if text == STDIN else _json_object(text)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
