"""Settings: defaults, durations, and one clear line naming the variable when a value is wrong."""

from __future__ import annotations

import pytest

from notifyhook.errors import ConfigurationError
from notifyhook.settings import ENV_PREFIX, Settings, load_settings, warn_unknown_variables
from notifyhook.store import Timeouts

URL = "postgresql://app:s3cr3t-pw@127.0.0.1:5432/app"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NOTIFYHOOK_DATABASE_URL", URL)


def test_defaults_are_the_designs():
    settings = load_settings()
    assert settings.concurrency == 100
    assert settings.batch_size == 100
    assert settings.poll_interval == 5
    assert settings.lease == 60
    assert settings.http_timeout == 10
    assert settings.retry_schedule == (30, 60, 120, 240, 480)
    assert settings.max_attempts == 6
    assert settings.jitter == 0.1
    assert settings.shutdown_grace == 30
    assert settings.disable_after == 5 * 86400
    assert settings.max_payload_bytes == 262144
    assert settings.allow_private_networks is False
    assert settings.metrics_port is None
    assert settings.sentry_dsn is None
    assert (settings.log_format, settings.log_level) == ("text", "INFO")
    assert settings.retention == 30 * 86400
    assert settings.secret_key is None
    assert ":" in settings.worker_id


def test_durations_take_seconds_or_units(monkeypatch):
    monkeypatch.setenv("NOTIFYHOOK_POLL_INTERVAL", "1.5")
    monkeypatch.setenv("NOTIFYHOOK_DISABLE_AFTER", "2d")
    monkeypatch.setenv("NOTIFYHOOK_RETENTION", "12h")
    monkeypatch.setenv("NOTIFYHOOK_RETRY_SCHEDULE", "10s,1m,5m")
    monkeypatch.setenv("NOTIFYHOOK_LOG_LEVEL", "debug")
    settings = load_settings()
    assert (settings.poll_interval, settings.disable_after, settings.retention) == (
        1.5,
        172800,
        43200,
    )
    assert settings.retry_schedule == (10, 60, 300)
    assert settings.log_level == "DEBUG"


WRONG = [
    ("NOTIFYHOOK_CONCURRENCY", "abc", "NOTIFYHOOK_CONCURRENCY"),
    ("NOTIFYHOOK_CONCURRENCY", "0", "greater than or equal to 1"),
    ("NOTIFYHOOK_LEASE", "soon", "NOTIFYHOOK_LEASE"),
    ("NOTIFYHOOK_RETRY_SCHEDULE", "30,-1", "NOTIFYHOOK_RETRY_SCHEDULE"),
    ("NOTIFYHOOK_JITTER", "2", "NOTIFYHOOK_JITTER"),
    ("NOTIFYHOOK_LOG_FORMAT", "xml", "'text' or 'json'"),
    ("NOTIFYHOOK_METRICS_PORT", "70000", "NOTIFYHOOK_METRICS_PORT"),
    ("NOTIFYHOOK_ALLOW_PRIVATE_NETWORKS", "perhaps", "NOTIFYHOOK_ALLOW_PRIVATE_NETWORKS"),
    ("NOTIFYHOOK_SECRET_KEY", "not-a-key", "NOTIFYHOOK_SECRET_KEY: must be a Fernet key"),
    (
        "NOTIFYHOOK_HTTP_TIMEOUT",
        "60",
        "NOTIFYHOOK_HTTP_TIMEOUT (60s) must be shorter than NOTIFYHOOK_LEASE (60s)",
    ),
    ("NOTIFYHOOK_DATABASE_URL", "not a dsn", "NOTIFYHOOK_DATABASE_URL: is not a valid libpq URL"),
    (
        "NOTIFYHOOK_DATABASE_URL",
        "postgresql://app:s3cr3t-pw@db/app?sslmode=requre",
        "NOTIFYHOOK_DATABASE_URL: sslmode must be one of disable, allow, prefer",
    ),
    (
        "NOTIFYHOOK_DATABASE_URL",
        "host=db password=s3cr3t-pw target_session_attrs=writable",
        "NOTIFYHOOK_DATABASE_URL: target_session_attrs must be one of any, read-write",
    ),
    # An @ left unencoded in the password: libpq took the rest of it for the host, and
    # every connection error quoted it (review, session 8).
    (
        "NOTIFYHOOK_DATABASE_URL",
        "postgresql://app:s3cr3t@s3cr3t-pw@127.0.0.1/app",
        "NOTIFYHOOK_DATABASE_URL: has an @ after the host or more than one",
    ),
    # Below a second the statements' timeouts rounded to 0 ms: no timeout at all.
    ("NOTIFYHOOK_LEASE", "0.0009", "NOTIFYHOOK_LEASE"),
]


def test_statement_timeouts_are_never_zero():
    # PostgreSQL reads 0 as "no timeout": a bound of a fraction of a millisecond is 1 ms.
    options = Timeouts(statement_s=0.0004, lock_s=0.0001).options()
    assert "statement_timeout=1 " in options
    assert "lock_timeout=1 " in options


@pytest.mark.parametrize(("variable", "value", "message"), WRONG)
def test_a_wrong_value_names_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    text = str(raised.value)
    assert message in text
    assert "\n" not in text
    assert "s3cr3t-pw" not in text


def test_a_missing_database_url_says_what_is_required(monkeypatch):
    monkeypatch.delenv("NOTIFYHOOK_DATABASE_URL")
    with pytest.raises(ConfigurationError, match="NOTIFYHOOK_DATABASE_URL is required"):
        load_settings()


def test_a_bad_database_url_is_not_echoed(monkeypatch):
    monkeypatch.setenv("NOTIFYHOOK_DATABASE_URL", "postgresql://app:s3cr3t-pw@[bad/db")
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert "s3cr3t-pw" not in str(raised.value)


def test_secrets_do_not_show_in_the_settings_repr():
    assert "s3cr3t-pw" not in repr(Settings())


def test_every_setting_is_in_the_example_environment_file():
    from pathlib import Path

    example = (Path(__file__).parent.parent / "systemd" / "notifyhook.env.example").read_text()
    for name in Settings.model_fields:
        assert f"{ENV_PREFIX}{name.upper()}=" in example, name


def test_log_format_ignores_case_as_log_level_does(monkeypatch):
    monkeypatch.setenv("NOTIFYHOOK_LOG_FORMAT", "JSON")
    monkeypatch.setenv("NOTIFYHOOK_LOG_LEVEL", "warning")
    settings = load_settings()
    assert (settings.log_format, settings.log_level) == ("json", "WARNING")


@pytest.mark.parametrize(
    "dsn", ["not-a-dsn", "https://sentry.example.com/1", "https://key@sentry.example.com/x"]
)
def test_a_malformed_sentry_dsn_is_refused_at_load(monkeypatch, dsn):
    monkeypatch.setenv("NOTIFYHOOK_SENTRY_DSN", dsn)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    text = str(raised.value)
    assert text.startswith("NOTIFYHOOK_SENTRY_DSN: is not a Sentry DSN")
    assert "\n" not in text


def test_a_sentry_dsn_is_accepted_and_never_echoed(monkeypatch):
    monkeypatch.setenv("NOTIFYHOOK_SENTRY_DSN", "https://publickey@o1.ingest.sentry.example/42")
    settings = load_settings()
    assert settings.sentry_dsn is not None
    assert "publickey" not in repr(settings)


@pytest.mark.parametrize(
    "variable",
    ["NOTIFYHOOK_SENTRY_DSN", "NOTIFYHOOK_METRICS_PORT", "NOTIFYHOOK_SECRET_KEY",
     "NOTIFYHOOK_CONCURRENCY", "NOTIFYHOOK_LOG_FORMAT", "NOTIFYHOOK_WORKER_ID"],
)  # fmt: skip
def test_an_empty_variable_means_unset(monkeypatch, variable):
    # `VAR=` in an environment file is how operators leave a setting at its default.
    monkeypatch.setenv(variable, "")
    field = variable.removeprefix(ENV_PREFIX).lower()
    value = getattr(load_settings(), field)
    default = Settings.model_fields[field].get_default(call_default_factory=True)
    assert value == default


def test_an_empty_database_url_is_missing(monkeypatch):
    monkeypatch.setenv("NOTIFYHOOK_DATABASE_URL", "")
    with pytest.raises(ConfigurationError, match="NOTIFYHOOK_DATABASE_URL is required"):
        load_settings()


def test_unknown_variables_are_warned_about_with_the_closest_setting(monkeypatch, caplog):
    monkeypatch.setenv("NOTIFYHOOK_CONCURENCY", "5")
    monkeypatch.setenv("NOTIFYHOOK_COLOUR", "blue")
    monkeypatch.setenv("NOTIFYHOOK_TEST_DATABASE_URL", URL)
    monkeypatch.setenv("NOTIFYHOOK_CLUSTER_USER", "postgres")
    monkeypatch.setenv("notifyhook_log_level", "info")  # a setting: matched regardless of case
    warn_unknown_variables()
    assert [(r.levelname, r.name, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "notifyhook.settings",
            "NOTIFYHOOK_COLOUR is not a notifyhook setting; ignored",
        ),
        (
            "WARNING",
            "notifyhook.settings",
            "NOTIFYHOOK_CONCURENCY is not a notifyhook setting; ignored "
            "(did you mean NOTIFYHOOK_CONCURRENCY?)",
        ),
    ]


def test_known_variables_bring_no_warning(monkeypatch, caplog):
    monkeypatch.setenv("NOTIFYHOOK_CONCURRENCY", "5")
    warn_unknown_variables()
    assert caplog.records == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # 9999999d: accepted once, then now() - DISABLE_AFTER failed every batch with a
        # failure in it ("timestamp out of range") and healthy deliveries were resent.
        ("NOTIFYHOOK_DISABLE_AFTER", "9999999d"),
        ("NOTIFYHOOK_DISABLE_AFTER", "3700d"),
        ("NOTIFYHOOK_RETRY_SCHEDULE", "30,8d"),
        ("NOTIFYHOOK_RETRY_SCHEDULE", ",".join(["1"] * 101)),
        ("NOTIFYHOOK_LEASE", "2d"),
        ("NOTIFYHOOK_HTTP_TIMEOUT", "2h"),
        ("NOTIFYHOOK_POLL_INTERVAL", "2h"),
        ("NOTIFYHOOK_SHUTDOWN_GRACE", "2h"),
        ("NOTIFYHOOK_RETENTION", "40000d"),
        # A worker holds up to CONCURRENCY bodies: 100 MiB each is far past any MemoryMax.
        ("NOTIFYHOOK_MAX_PAYLOAD_BYTES", str(100 * 1024 * 1024)),
    ],
)
def test_durations_and_sizes_are_bounded(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    if variable == "NOTIFYHOOK_HTTP_TIMEOUT":
        monkeypatch.setenv("NOTIFYHOOK_LEASE", "1d")
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert str(raised.value).startswith(variable), raised.value


def test_the_bounds_themselves_are_accepted(monkeypatch):
    monkeypatch.setenv("NOTIFYHOOK_DISABLE_AFTER", "3650d")
    monkeypatch.setenv("NOTIFYHOOK_RETRY_SCHEDULE", "7d,7d")
    monkeypatch.setenv("NOTIFYHOOK_LEASE", "1d")
    monkeypatch.setenv("NOTIFYHOOK_HTTP_TIMEOUT", "1h")
    monkeypatch.setenv("NOTIFYHOOK_MAX_PAYLOAD_BYTES", str(16 * 1024 * 1024))
    settings = load_settings()
    assert settings.lease == 86400
    assert settings.retry_schedule == (604800, 604800)


def database_url_refusal(monkeypatch: pytest.MonkeyPatch, url: str) -> str:
    """What loading settings with NOTIFYHOOK_DATABASE_URL=`url` refuses it with."""
    monkeypatch.setenv("NOTIFYHOOK_DATABASE_URL", url)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    return str(raised.value)


MALFORMED = "is not a valid libpq URL"
# A base64 password with an unencoded / (and @ or :): libpq made a piece of it the host,
# the port or the database name, and connection errors quoted it.
UNENCODED = "a / : or @ in the user name or password is written %2F %3A %40"


@pytest.mark.parametrize(
    ("url", "said", "pieces"),
    [
        ("postgresql://u:pass word@h/db", MALFORMED, ("pass", "word")),
        ("postgresql://u:s3cr3t-pw@[h/db", MALFORMED, ("s3cr3t",)),
        ("host=h password='s3cr3t-pw", MALFORMED, ("s3cr3t", '"')),
        ("host=h password=s3cr3t-pw s3cr3t-pw", MALFORMED, ("s3cr3t",)),
        ("postgresql://u:s3cr3t%zzpw@h/db", MALFORMED, ("s3cr3t", "zz")),
        ("postgresql://u:p@h/db?s3cr3t-pw=1", MALFORMED, ("s3cr3t",)),
        ("host=h s3cr3t-pw=1", MALFORMED, ("s3cr3t",)),
        ("postgresql://notifyhook:S3cr@tPart/moreSecret@127.0.0.1:5432/app", UNENCODED,
         ("S3cr", "tPart", "moreSecret")),
        ("postgresql://notifyhook:S3cr@tPart:moreSecret@127.0.0.1:5432/app", UNENCODED,
         ("S3cr", "tPart", "moreSecret")),
        ("postgresql://notifyhook:Xk9pQ/Zr7vT2mW4s@127.0.0.1:5432/app", UNENCODED,
         ("Xk9pQ", "Zr7vT2mW4s")),
    ],
)  # fmt: skip
def test_a_refused_dsn_is_described_without_any_of_its_text(monkeypatch, url, said, pieces):
    text = database_url_refusal(monkeypatch, url)
    assert text.startswith("NOTIFYHOOK_DATABASE_URL: "), text
    assert said in text, text
    for piece in pieces:
        assert piece not in text, text


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("port=notaport", "port"),
        ("port=99999", "port"),
        ("connect_timeout=abc", "connect_timeout"),
        ("keepalives_idle=x", "keepalives_idle"),
    ],
)
def test_a_number_option_libpq_cannot_read_is_refused_at_load(monkeypatch, option, named):
    # libpq reads these only when it connects, and the worker took the failure for an
    # outage: it retried for ever instead of exiting 2.
    monkeypatch.setenv("NOTIFYHOOK_DATABASE_URL", f"{URL}?{option}")
    with pytest.raises(ConfigurationError, match=f"NOTIFYHOOK_DATABASE_URL: .*{named}"):
        load_settings()


def test_encoded_passwords_and_port_lists_still_load(monkeypatch):
    for url in (
        "postgresql://notifyhook:Xk9pQ%2FZr7vT2mW4s%40x@127.0.0.1:5432/app",
        "postgresql://app@db1:5432,db2:5433/app?target_session_attrs=read-write",
        "host=db1,db2 port=5432,5433 dbname=app connect_timeout=5 keepalives_idle=30",
        # What libpq takes too (review s12-rev3): a database named with an @, a Unix
        # socket, IPv6 literals, an @ in a query value, a signed or spaced number.
        "postgresql://h:5432/rev3@db",
        "postgresql:///db?host=/var/run/postgresql&port=5433",
        "postgresql://%2Fvar%2Frun%2Fpostgresql/db",
        "postgresql://[::1]:5432,[::2]:5433/db?target_session_attrs=read-write",
        "postgresql://u@h/db?sslrootcert=/etc/x@y/ca.pem",
        "host=h port=' 5432' connect_timeout=+10",
    ):
        monkeypatch.setenv("NOTIFYHOOK_DATABASE_URL", url)
        assert load_settings().database_url.get_secret_value() == url
