"""An endpoint the endpoints trigger accepts is one the sender can send to: headers, URLs, secrets."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
import pytest
import yarl
from conftest import add_endpoint, scalar
from psycopg.types.json import Jsonb

from notifyhook.sender import _RESERVED_HEADERS, _checked_endpoint_headers, _target

SECRET = "whsec_" + "QUJD" * 8
OTHER_SECRET = "whsec_" + "REVG" * 8
_names = itertools.count()


def refusal(db: psycopg.Connection[Any], **columns: Any) -> str | None:
    """The trigger's message for an endpoint with these columns, or None when it is accepted."""
    values = {"tenant_id": "t", "name": f"n{next(_names)}", "url": "https://example.com/h"}
    values |= columns
    try:
        add_endpoint(db, values.pop("tenant_id"), values.pop("name"), values.pop("url"), **values)
    except psycopg.errors.CheckViolation as error:
        return str(error)
    return None


# -- headers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("a\r\nX-Injected: 1", "CR LF"),
        ("a\nb", "LF"),
        ("a\x01b", "control character"),
        ("a\x1bb", "escape"),
        ("a\x7fb", "DEL"),
        ("Zoë", "non-ASCII"),
        ("a\u2028b", "Unicode line separator"),
    ],
)
def test_a_header_value_the_sender_refuses_fails_the_insert(db, value, kind):
    message = refusal(db, headers=Jsonb({"X-Ok": "fine", "X-Token": value}))
    assert message is not None, kind
    assert 'endpoints.headers "X-Token": a value must be printable ASCII or tabs' in message
    assert value not in message  # values are often credentials
    assert scalar(db, "SELECT count(*) FROM notifyhook.endpoints") == 0


def test_a_header_value_is_checked_on_update_too(db):
    endpoint = add_endpoint(db, "t", "a", "https://example.com/h", headers=Jsonb({"X-A": "1"}))
    with pytest.raises(psycopg.errors.CheckViolation, match='"X-A": a value must be printable'):
        db.execute(
            "UPDATE notifyhook.endpoints SET headers = %s WHERE id = %s",
            [Jsonb({"X-A": "1\r\nX-B: 2"}), endpoint],
        )


ODD_CHARACTERS = [chr(c) for c in range(1, 0x80)] + ["\x80", "\x85", "\xa0", "é", "\u2028", "😀"]


def sender_accepts(name: str, value: str) -> bool:
    try:
        _checked_endpoint_headers(((name, value),))
    except OSError:  # the sender's refusal
        return False
    return True


def test_the_trigger_and_the_sender_agree_on_header_values(db):
    disagreements = [
        (c, accepted)
        for c in ODD_CHARACTERS
        if (accepted := refusal(db, headers=Jsonb({"X-Test": f"a{c}b"})) is None)
        != sender_accepts("X-Test", f"a{c}b")
    ]
    assert disagreements == []


def test_the_trigger_and_the_sender_agree_on_header_names(db):
    disagreements = [
        (c, accepted)
        for c in ODD_CHARACTERS
        if (accepted := refusal(db, headers=Jsonb({f"X{c}Y": "v"})) is None)
        != sender_accepts(f"X{c}Y", "v")
    ]
    assert disagreements == []


def test_the_trigger_refuses_exactly_what_the_sender_drops(db):
    reserved = {row[0] for row in db.execute("SELECT name FROM notifyhook.reserved_headers()")}
    assert reserved == _RESERVED_HEADERS


@pytest.mark.parametrize("name", sorted(_RESERVED_HEADERS))
def test_a_reserved_header_fails_the_insert_saying_why(db, name):
    message = refusal(db, headers=Jsonb({"X-Tenant": "acme", name.title(): "x"}))
    assert message is not None
    reason = scalar(db, "SELECT reason FROM notifyhook.reserved_headers() WHERE name = %s", [name])
    assert f'endpoints.headers must not set "{name.title()}" ({reason})' in message


# -- URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1/", "has a [ without its ] in the host"),
        ("http://[::1]x/", "has a malformed port"),
        ("http://[v1.x]/", "[v1.x] is not an IPv6 address"),
        ("http://[fe80::1%25eth0]/", "is not an IPv6 address"),
        ("http://::1/", "has no host"),
        ("http://host]/", "has a malformed host"),
        ("http://host:99999/", "port out of range (1 to 65535)"),
        ("http://host:65536/", "port out of range (1 to 65535)"),
        ("http://host:0/", "port out of range (1 to 65535)"),
        ("http://host:+80/", "has a malformed port"),
        ("http://host:8080:90/", "has a malformed port"),
        ("http://1.2.3.999/", "1.2.3.999 is not an IPv4 address"),
        ("http://01.2.3.4/", "01.2.3.4 is not an IPv4 address"),
        ("http://127.1/", "127.1 is not an IPv4 address"),
        ("http://host\\evil.example/", "has a malformed host"),
        ("http://bücher.example/", "write the host bücher.example in its ASCII (xn--) form"),
        ("http://example.com/a\x01b", "must not contain control characters"),
        ("http://example.com/a\x7fb", "must not contain control characters"),
        ("http://example.com/a\tb", "must not contain white space"),
        ("https://example.com/" + "a" * 8200, "at most 8192 characters"),
        # IDNA cannot encode these: accepted once, they failed every attempt at send time.
        ("http://" + "a" * 64 + ".com/", "is not a DNS name"),
        ("http://a..b.com/", "the host a..b.com is not a DNS name"),
        ("http://.com/", "the host .com is not a DNS name"),
        ("http://example.com../", "is not a DNS name"),
        ("http://" + "a." * 126 + "ab/", "is not a DNS name"),
    ],
)
def test_a_url_the_sender_cannot_use_fails_the_insert(db, url, message):
    refused = refusal(db, url=url)
    assert refused is not None
    assert message in refused


@pytest.mark.parametrize(
    "host", ["a" * 64 + ".com", "a..b.com", ".com", "example.com..", "a." * 126 + "ab"]
)
def test_the_sender_refuses_the_hosts_the_trigger_refuses(host):
    assert "labels of 1 to 63 characters" in (sender_parse_error(f"http://{host}/") or "")


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook",
        "http://example.com:8080/a/b?c=d&e=f#g",
        "http://[::1]:8080/",
        "http://[2001:db8::1]/",
        "http://[::ffff:192.0.2.1]/",
        "http://192.0.2.1:65535/",
        "http://host:1/",
        "http://host:/",
        "http://xn--bcher-kva.example/",
        "https://hooks.example.com/path/with/ünïcode?q=ä",
        "HTTPS://Example.COM/",
        "http://" + "a" * 63 + ".com/",
        "http://example.com./",
        "http://" + "a." * 126 + "a/",
    ],
)
def test_an_ordinary_url_is_accepted(db, url):
    assert refusal(db, url=url) is None
    assert sender_parse_error(url) is None


def sender_parse_error(url: str) -> str | None:
    """Why the sender could not send to `url` (its own parse, then aiohttp's), or None."""
    try:
        target = _target(url, True)
        assert target.url.host  # decoded on access, as the sender does
        parsed = yarl.URL(str(target.url))  # what aiohttp does with it
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    if not parsed.host or parsed.port is None or not 1 <= parsed.port <= 65535:
        return f"aiohttp would get host {parsed.host!r}, port {parsed.port!r}"
    return None


HOSTS = [
    "example.com",
    "EXAMPLE.com",
    "a..b",
    ".com",
    "a" * 64 + ".com",
    "a" * 63 + ".com",
    "example.com.",
    "h_o~st",
    "xn--bcher-kva.example",
    "bücher.example",
    "☃.com",
    "127.0.0.1",
    "255.255.255.255",
    "1.2.3.256",
    "01.2.3.4",
    "127.1",
    "1.2.3.4.",
    "0x7f.0.0.1",
    "[::1]",
    "[::1",
    "::1]",
    "::1",
    "[::1]]",
    "[[::1]]",
    "[::ffff:1.2.3.4]",
    "[::1.2.3]",
    "[::1/128]",
    "[1:2:3:4:5:6:7:8:9]",
    "[fe80::1%25eth0]",
    "[v1.x]",
    "[]",
    "",
    "host\\evil",
    "ex<am>ple",
    "%41.com",
    "a b",
]
PORTS = ["", ":", ":0", ":1", ":80", ":0080", ":65535", ":65536", ":99999", ":+80", ":8_0", ":٣"]
PATHS = ["/", "", "/a b", "/ä", "/a\x7f", "?q=1", "#frag", "/%zz", "/[x]"]


def test_every_url_the_trigger_accepts_the_sender_can_send_to(db):
    # Punycode labels (xn--) are accepted unchecked: PostgreSQL has no IDNA decoder.
    urls = [
        f"http://{host}{port}{path}" for host, port, path in itertools.product(HOSTS, PORTS, PATHS)
    ]
    accepted = [url for url in urls if refusal(db, url=url) is None]
    assert len(accepted) > 100  # the list has ordinary URLs too
    assert {url: error for url in accepted if (error := sender_parse_error(url))} == {}


# -- secrets -------------------------------------------------------------------------------


def test_a_previous_secret_without_an_expiry_fails_the_insert(db):
    message = refusal(db, secret=SECRET, previous_secret=OTHER_SECRET)
    assert message is not None
    assert "endpoints.previous_secret needs endpoints.previous_secret_expires_at" in message
    assert (
        refusal(db, previous_secret=OTHER_SECRET, previous_secret_expires_at="2100-01-01") is None
    )


def test_a_rotation_by_hand_must_say_when_the_old_secret_expires(db):
    endpoint = add_endpoint(db, "t", "a", "https://example.com/h", secret=SECRET)
    rotate = "UPDATE notifyhook.endpoints SET previous_secret = secret, secret = %s{} WHERE id = %s"
    with pytest.raises(
        psycopg.errors.CheckViolation, match=r"needs endpoints\.previous_secret_expires_at"
    ):
        db.execute(rotate.format(""), [OTHER_SECRET, endpoint])
    db.execute(
        rotate.format(", previous_secret_expires_at = now() + interval '1 day'"),
        [OTHER_SECRET, endpoint],
    )
    with pytest.raises(
        psycopg.errors.CheckViolation, match=r"needs endpoints\.previous_secret_expires_at"
    ):
        db.execute(
            "UPDATE notifyhook.endpoints SET previous_secret_expires_at = NULL WHERE id = %s",
            [endpoint],
        )
    db.execute(
        "UPDATE notifyhook.endpoints SET previous_secret = NULL, previous_secret_expires_at = NULL "
        "WHERE id = %s",
        [endpoint],
    )


# -- rows written under older rules --------------------------------------------------------


def test_an_endpoint_written_under_older_rules_can_still_be_disabled(db):
    """An UPDATE checks only the url, secrets and headers it changes: a worker disabling an
    endpoint on 410 Gone must not fail on a value today's rules refuse."""
    db.execute("ALTER TABLE notifyhook.endpoints DISABLE TRIGGER endpoints_validate")
    try:
        endpoint = add_endpoint(
            db,
            "t",
            "legacy",
            "http://host:99999/",
            previous_secret=OTHER_SECRET,
            headers=Jsonb({"Webhook-Id": "x", "User-Agent": "x", "X-Name": "Zoë"}),
        )
    finally:
        db.execute("ALTER TABLE notifyhook.endpoints ENABLE TRIGGER endpoints_validate")
    db.execute(
        "UPDATE notifyhook.endpoints SET enabled = false, disabled_reason = '410 Gone' "
        "WHERE id = %s",
        [endpoint],
    )
    assert scalar(db, "SELECT enabled FROM notifyhook.endpoints WHERE id = %s", [endpoint]) is False
    with pytest.raises(psycopg.errors.CheckViolation, match="must not set"):
        db.execute(
            'UPDATE notifyhook.endpoints SET headers = headers || \'{"X-More": "1"}\' '
            "WHERE id = %s",
            [endpoint],
        )
