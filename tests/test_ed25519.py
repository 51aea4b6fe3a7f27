"""ed25519 `v1a` signatures (Standard Webhooks asymmetric): keys, signing checked by the
`cryptography` package's own Ed25519 verify, our verify, the SQL checks, the CLI, and a
real worker signing for a real receiver that verifies with the public key."""

from __future__ import annotations

import base64
import json
import re
import time

import psycopg
import pytest
import standardwebhooks
from conftest import add_endpoint, scalar
from cryptography.exceptions import InvalidSignature
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import ok, one_line_error, run
from test_worker import insert_events, statuses

from notifyhook.errors import SecretError, VerificationError
from notifyhook.signing import (
    generate_secret,
    generate_signing_key,
    public_key,
    sign,
    verify,
    webhook_headers,
)

MSG_ID = "0b5e3c5a-6a53-4b8e-9d0c-6f3f1f0e2a11"
BODY = json.dumps({"type": "call.completed", "data": {"name": "Zoë"}}).encode()

# RFC 8032, section 7.1, TEST 1: a seed and the public key it derives.
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")

quick = settings(database=None, max_examples=50)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def raw_public(key: str) -> Ed25519PublicKey:
    """The public key as the cryptography package reads its 32 raw bytes."""
    assert key.startswith("whpk_")
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(key.removeprefix("whpk_")))


def v1a_signatures(header: str) -> list[bytes]:
    return [base64.b64decode(e[4:]) for e in header.split() if e.startswith("v1a,")]


def check_with_cryptography(key: str, headers: dict[str, str], body: bytes) -> None:
    """Verify every v1a signature by hand: Ed25519 over the raw bytes `id.timestamp.body`."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    signatures = v1a_signatures(headers["webhook-signature"])
    assert signatures
    raw_public(key).verify(signatures[0], signed)


# --- keys ----------------------------------------------------------------------------


def test_a_signing_key_is_whsk_and_a_32_byte_seed():
    first, second = generate_signing_key(), generate_signing_key()
    assert first.startswith("whsk_")
    assert len(base64.b64decode(first.removeprefix("whsk_"))) == 32
    assert first != second


def test_the_public_key_is_the_rfc_8032_derivation():
    assert public_key("whsk_" + b64(RFC_SEED)) == "whpk_" + b64(RFC_PUBLIC)


@pytest.mark.parametrize(
    ("key", "complaint"),
    [
        ("whsk_" + b64(bytes(31)), "32-byte seed, this one encodes 31"),
        ("whsk_" + b64(bytes(64)), "32-byte seed, this one encodes 64"),
        ("whsk_not*base64", "followed by standard base64"),
        ("whsec_" + b64(bytes(32)), "must start with 'whsk_'"),
    ],
)
def test_a_malformed_signing_key_is_refused_without_quoting_it(key, complaint):
    with pytest.raises(SecretError, match=complaint) as raised:
        public_key(key)
    assert key[5:] not in str(raised.value)


def test_a_malformed_public_key_is_refused():
    headers = webhook_headers([generate_signing_key()], MSG_ID, int(time.time()), BODY)
    with pytest.raises(SecretError, match="32 bytes, this one encodes 16"):
        verify("whpk_" + b64(bytes(16)), headers, BODY)


# --- signing, checked by an implementation we did not write ----------------------------


@quick
@given(body=st.binary(max_size=2000), msg_id=st.uuids().map(str), timestamp=st.integers(0, 2**40))
def test_cryptography_verifies_what_we_sign(body, msg_id, timestamp):
    key = generate_signing_key()
    signature = sign(key, msg_id, timestamp, body)
    assert signature.startswith("v1a,")
    raw = base64.b64decode(signature.removeprefix("v1a,"), validate=True)
    assert len(raw) == 64
    raw_public(public_key(key)).verify(raw, f"{msg_id}.{timestamp}.".encode() + body)
    with pytest.raises(InvalidSignature):
        raw_public(public_key(key)).verify(raw, f"{msg_id}.{timestamp + 1}.".encode() + body)


def test_signing_is_deterministic_as_ed25519_is():
    key = "whsk_" + b64(RFC_SEED)
    assert sign(key, MSG_ID, 1700000000, BODY) == sign(key, MSG_ID, 1700000000, BODY)


def test_the_reference_library_does_not_know_v1a():
    # standardwebhooks (1.3.0, our dev dependency) verifies v1 only: it has no ed25519
    # support at all, so it cannot check v1a. What it can check: a v1a beside a v1 (a
    # rotation from whsec_ to whsk_) does not disturb its v1 verification.
    assert not hasattr(standardwebhooks, "AsymmetricWebhook")
    old, new = generate_secret(), generate_signing_key()
    headers = webhook_headers([new, old], MSG_ID, int(time.time()), BODY)
    assert [e.split(",")[0] for e in headers["webhook-signature"].split()] == ["v1a", "v1"]
    assert standardwebhooks.Webhook(old).verify(BODY, headers) == json.loads(BODY)
    check_with_cryptography(public_key(new), headers, BODY)


# --- verify ------------------------------------------------------------------------------


def test_verify_accepts_v1a_with_the_public_key_or_the_signing_key():
    key = generate_signing_key()
    headers = webhook_headers([key], MSG_ID, int(time.time()), BODY)
    assert verify(public_key(key), headers, BODY) == json.loads(BODY)
    assert verify(key, headers, BODY) == json.loads(BODY)


def test_verify_with_a_public_key_rejects_tampering_other_keys_and_v1_only():
    key = generate_signing_key()
    headers = webhook_headers([key], MSG_ID, int(time.time()), BODY)
    for bad_headers, body in [
        (headers, BODY + b" "),
        ({**headers, "webhook-id": "other"}, BODY),
        (webhook_headers([generate_signing_key()], MSG_ID, int(time.time()), BODY), BODY),
        # An HMAC signature proves nothing to a holder of the public key.
        (webhook_headers([generate_secret()], MSG_ID, int(time.time()), BODY), BODY),
        ({**headers, "webhook-signature": "v1a,!!!"}, BODY),
        ({**headers, "webhook-signature": headers["webhook-signature"].replace("v1a", "v1")}, BODY),
    ]:
        with pytest.raises(VerificationError, match="no webhook-signature matches"):
            verify(public_key(key), bad_headers, body)


def test_verify_with_a_public_key_rejects_a_stale_timestamp():
    key = generate_signing_key()
    headers = webhook_headers([key], MSG_ID, int(time.time()) - 301, BODY)
    with pytest.raises(VerificationError, match="too old"):
        verify(public_key(key), headers, BODY)


def test_an_hmac_secret_ignores_v1a_signatures():
    secret = generate_secret()
    headers = webhook_headers([generate_signing_key()], MSG_ID, int(time.time()), BODY)
    with pytest.raises(VerificationError):
        verify(secret, headers, BODY)


@pytest.mark.parametrize(
    "kinds", [("ed25519", "ed25519"), ("ed25519", "hmac"), ("hmac", "ed25519")]
)
def test_during_a_rotation_each_key_verifies_its_own_signature(kinds):
    new, old = (generate_signing_key() if k == "ed25519" else generate_secret() for k in kinds)
    headers = webhook_headers([new, old], MSG_ID, int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for key in (new, old):
        verifying = public_key(key) if key.startswith("whsk_") else key
        assert verify(verifying, headers, BODY) == json.loads(BODY)


# --- the database ------------------------------------------------------------------------


def test_the_database_accepts_a_whsk_key_and_refuses_malformed_ones(db):
    key = generate_signing_key()
    endpoint = add_endpoint(db, "t", "ok", "https://example.com/", secret=key)
    assert scalar(db, "SELECT secret FROM notifyhook.endpoints WHERE id = %s", [endpoint]) == key
    for secret, message in [
        ("whsk_" + b64(bytes(31)), "32-byte seed, got 31 bytes"),
        ("whsk_" + b64(bytes(64)), "32-byte seed, got 64 bytes"),
        ("whsk_!!notbase64", "the part after whsk_ is not valid base64"),
        (public_key(key), "holds a whpk_ public key, which cannot sign"),
        ("wh_" + b64(bytes(32)), "must start with whsec_ (Standard Webhooks secret) or whsk_"),
    ]:
        with pytest.raises(psycopg.errors.CheckViolation, match=re.escape(message)):
            add_endpoint(db, "t", "bad", "https://example.com/", secret=secret)
    with pytest.raises(psycopg.errors.CheckViolation, match="previous_secret: a whsk_"):
        db.execute(
            "UPDATE notifyhook.endpoints SET previous_secret = %s, "
            "previous_secret_expires_at = now() + interval '1 hour' WHERE id = %s",
            ["whsk_" + b64(bytes(8)), endpoint],
        )


def test_generated_secrets_stay_whsec(db):
    endpoint = add_endpoint(db, "t", "default", "https://example.com/")
    assert scalar(
        db, "SELECT secret FROM notifyhook.endpoints WHERE id = %s", [endpoint]
    ).startswith("whsec_")


# --- the CLI and a real worker ----------------------------------------------------------


def printed(stdout: str, label: str) -> str:
    return next(
        line.removeprefix(f"{label}: ") for line in stdout.splitlines() if line.startswith(label)
    )


def test_endpoint_add_ed25519_prints_only_the_public_key_and_show_repeats_it(db, database_url):
    key = Fernet.generate_key().decode()
    stdout = ok(
        database_url,
        "endpoint", "add", "--tenant", "t", "--name", "signed", "--url", "https://example.com/",
        "--signature", "ed25519", secret_key=key,
    )  # fmt: skip
    public = printed(stdout, "public key")
    assert public.startswith("whpk_")
    assert "whsk_" not in stdout
    assert "secret:" not in stdout
    stored = scalar(db, "SELECT secret FROM notifyhook.endpoints WHERE name = 'signed'")
    assert stored.startswith("enc:")
    plain = Fernet(key.encode()).decrypt(stored.removeprefix("enc:").encode()).decode()
    assert plain.startswith("whsk_")
    assert public_key(plain) == public
    endpoint_id = stdout.split()[1]
    shown = json.loads(ok(database_url, "endpoint", "show", endpoint_id, "--json", secret_key=key))
    assert (shown["signature"], shown["public_key"]) == ("ed25519 (v1a)", public)
    assert plain.removeprefix("whsk_") not in json.dumps(shown)
    # Without the key, show cannot tell, and says so instead of failing.
    shown = json.loads(ok(database_url, "endpoint", "show", endpoint_id, "--json"))
    assert "sealed" in shown["signature"]
    assert "public_key" not in shown


def test_endpoint_add_takes_a_given_whsk_key_and_refuses_a_malformed_one(db, database_url):
    key = generate_signing_key()
    stdout = ok(database_url, "endpoint", "add", "--tenant", "t", "--name", "given",
                "--url", "https://example.com/", "--secret", "-", stdin=key)  # fmt: skip
    assert printed(stdout, "public key") == public_key(key)
    bad = run(database_url, "endpoint", "add", "--tenant", "t", "--name", "bad",
              "--url", "https://example.com/", "--secret", "whsk_" + b64(bytes(20)),
              secret_key=Fernet.generate_key().decode())  # fmt: skip
    assert "32-byte seed" in one_line_error(bad, 2)


def test_a_worker_signs_v1a_for_a_receiver_holding_the_public_key_through_a_rotation(
    db, database_url, receiver, run_worker
):
    key = Fernet.generate_key().decode()
    stdout = ok(
        database_url,
        "endpoint", "add", "--tenant", "t", "--name", "signed", "--url", receiver.url("signed"),
        "--signature", "ed25519", secret_key=key,
    )  # fmt: skip
    endpoint_id, old = stdout.split()[1], printed(stdout, "public key")
    receiver.trust("signed", old)
    worker = run_worker(secret_key=key)
    insert_events(db, "t", 1)
    first = worker.wait_recorded(lambda: receiver.received("signed"), what="a webhook")[0]
    assert first.verified is True
    assert first.headers["webhook-signature"].startswith("v1a,")
    check_with_cryptography(old, first.headers, first.body)

    # A rotation keeps the kind; during the grace both keys sign, each a v1a.
    rotated = ok(database_url, "endpoint", "rotate-secret", endpoint_id, "--grace", "1h",
                 secret_key=key)  # fmt: skip
    new = printed(rotated, "public key")
    assert new.startswith("whpk_")
    assert new != old
    shown = json.loads(ok(database_url, "endpoint", "show", endpoint_id, "--json", secret_key=key))
    assert (shown["public_key"], shown["previous_public_key"]) == (new, old)
    insert_events(db, "t", 1)
    second = worker.wait_recorded(lambda: receiver.received("signed")[1:], what="a second webhook")[
        0
    ]
    signatures = v1a_signatures(second.headers["webhook-signature"])
    assert len(signatures) == 2
    signed = f"{second.webhook_id}.{second.headers['webhook-timestamp']}.".encode() + second.body
    raw_public(new).verify(signatures[0], signed)
    raw_public(old).verify(signatures[1], signed)
    for public in (old, new):
        assert verify(public, second.headers, second.body) == json.loads(second.body)
    worker.wait_recorded(lambda: statuses(db) == {"delivered": 2}, what="both recorded")

    # Moving the receiver to HMAC: the new whsec_ signs v1 beside the old key's v1a.
    moved = ok(database_url, "endpoint", "rotate-secret", endpoint_id, "--signature", "hmac",
               secret_key=key)  # fmt: skip
    secret = printed(moved, "secret")
    insert_events(db, "t", 1)
    third = worker.wait_recorded(lambda: receiver.received("signed")[2:], what="a third webhook")[0]
    assert [e[:3] for e in third.headers["webhook-signature"].split()] == ["v1,", "v1a"]
    standardwebhooks.Webhook(secret).verify(third.body, third.headers)
    check_with_cryptography(new, third.headers, third.body)
