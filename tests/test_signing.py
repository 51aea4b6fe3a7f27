"""Standard Webhooks signing: interoperability with the reference package, rotation, rejection."""

import base64
import json
import time
from datetime import UTC, datetime

import httpx
import multidict
import pytest
import standardwebhooks
from hypothesis import given, settings
from hypothesis import strategies as st

from notifyhook.errors import SecretError, VerificationError
from notifyhook.signing import (
    decode_secret,
    generate_secret,
    sign,
    signature_header,
    verify,
    webhook_headers,
)

# The published Standard Webhooks example (also in Svix's documentation).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

MSG_ID = "0b5e3c5a-6a53-4b8e-9d0c-6f3f1f0e2a11"
BODY = json.dumps({"type": "call.completed", "data": {"id": 7, "name": "Zoë"}}).encode()

# No example database: tests must not leave files in the tree.
quick = settings(database=None, max_examples=50)

secrets_strategy = st.binary(min_size=24, max_size=64).map(
    lambda key: "whsec_" + base64.b64encode(key).decode()
)
json_bodies = st.dictionaries(
    st.text(max_size=10),
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
    max_size=5,
).map(lambda payload: json.dumps(payload, ensure_ascii=False).encode())


def now() -> int:
    return int(time.time())


def b64(size: int) -> str:
    return base64.b64encode(b"k" * size).decode()


# --- secrets ---------------------------------------------------------------------------


def test_generate_secret_is_whsec_and_32_random_bytes():
    first, second = generate_secret(), generate_secret()
    assert first.startswith("whsec_")
    assert len(decode_secret(first)) == 32
    assert first != second


def test_decode_secret_returns_the_key_bytes():
    assert decode_secret("whsec_" + base64.b64encode(bytes(range(40))).decode()) == bytes(range(40))


def test_decode_secret_accepts_unpadded_base64():
    key = bytes(range(25))  # 25 bytes: base64 would end in "=="
    unpadded = base64.b64encode(key).decode().rstrip("=")
    assert decode_secret("whsec_" + unpadded) == key


@pytest.mark.parametrize("size", [24, 64])
def test_decode_secret_accepts_the_size_limits(size):
    assert len(decode_secret("whsec_" + b64(size))) == size


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [
        (b64(32), "must start with 'whsec_'"),
        ("sk_" + b64(32), "must start with 'whsec_'"),
        ("WHSEC_" + b64(32), "must start with 'whsec_'"),
        ("enc:gAAAAABl", "must start with 'whsec_'"),
        ("whsec_" + b64(32)[:-4] + "!!!!", "base64"),
        ("whsec_" + b64(32) + "\n", "base64"),
        ("whsec_" + b64(32)[:-1] + "=a", "base64"),
        ("whsec_", "encode 24 to 64 bytes, this one encodes 0"),
        ("whsec_" + b64(23), "encode 24 to 64 bytes, this one encodes 23"),
        ("whsec_" + b64(65), "encode 24 to 64 bytes, this one encodes 65"),
    ],
)
def test_decode_secret_rejects_malformed_secrets(secret, complaint):
    with pytest.raises(SecretError, match=complaint) as raised:
        decode_secret(secret)
    # The message ends up in logs: it must not carry the key material.
    assert b64(23)[:12] not in str(raised.value)


# --- signing ---------------------------------------------------------------------------


def test_sign_matches_the_published_example():
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_webhook_headers_are_the_three_standard_headers():
    headers = webhook_headers([SPEC_SECRET], SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": "1614265330",
        "webhook-signature": SPEC_SIGNATURE,
    }


def test_signature_header_signs_once_per_secret_in_order():
    new, old = generate_secret(), generate_secret()
    header = signature_header([new, old], MSG_ID, 1700000000, BODY)
    assert header.split(" ") == [
        sign(new, MSG_ID, 1700000000, BODY),
        sign(old, MSG_ID, 1700000000, BODY),
    ]


def test_signature_header_needs_a_secret():
    with pytest.raises(ValueError, match="at least one secret"):
        signature_header([], MSG_ID, now(), BODY)


def test_signature_header_refuses_a_bare_string():
    with pytest.raises(TypeError, match="not a single string"):
        signature_header(SPEC_SECRET, MSG_ID, now(), BODY)


# --- interoperability with the reference implementation --------------------------------


@quick
@given(secret=secrets_strategy, body=json_bodies, msg_id=st.uuids().map(str))
def test_the_reference_verifier_accepts_what_we_sign(secret, body, msg_id):
    headers = webhook_headers([secret], msg_id, now(), body)
    assert standardwebhooks.Webhook(secret).verify(body, headers) == json.loads(body)


@quick
@given(secret=secrets_strategy, body=json_bodies, msg_id=st.uuids().map(str))
def test_we_accept_what_the_reference_signs(secret, body, msg_id):
    timestamp = now()
    signature = standardwebhooks.Webhook(secret).sign(
        msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode()
    )
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }
    assert verify(secret, headers, body) == json.loads(body)


# --- rotation --------------------------------------------------------------------------


def test_during_rotation_either_secret_verifies_and_a_third_does_not():
    new, old, other = generate_secret(), generate_secret(), generate_secret()
    headers = webhook_headers([new, old], MSG_ID, now(), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verify(new, headers, BODY) == json.loads(BODY)
    assert verify(old, headers, BODY) == json.loads(BODY)
    assert standardwebhooks.Webhook(old).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(VerificationError, match="no webhook-signature matches"):
        verify(other, headers, BODY)


# --- verification ----------------------------------------------------------------------


@pytest.fixture
def secret():
    return generate_secret()


@pytest.fixture
def headers(secret):
    return webhook_headers([secret], MSG_ID, now(), BODY)


def test_verify_returns_the_parsed_body(secret, headers):
    assert verify(secret, headers, BODY) == {
        "type": "call.completed",
        "data": {"id": 7, "name": "Zoë"},
    }


def test_verify_rejects_a_tampered_body(secret, headers):
    with pytest.raises(VerificationError, match="no webhook-signature matches"):
        verify(secret, headers, BODY.replace(b"7", b"8"))


def test_verify_rejects_a_tampered_id(secret, headers):
    headers["webhook-id"] = MSG_ID.replace("0b5e", "0b5f")
    with pytest.raises(VerificationError, match="no webhook-signature matches"):
        verify(secret, headers, BODY)


def test_verify_rejects_a_tampered_timestamp(secret, headers):
    headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    with pytest.raises(VerificationError, match="no webhook-signature matches"):
        verify(secret, headers, BODY)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_a_missing_header(secret, headers, name):
    del headers[name]
    with pytest.raises(VerificationError, match=f"missing {name} header"):
        verify(secret, headers, BODY)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_an_empty_header(secret, headers, name):
    headers[name] = ""
    with pytest.raises(VerificationError, match=f"missing {name} header"):
        verify(secret, headers, BODY)


@pytest.mark.parametrize(
    ("offset", "complaint"),
    [(-301 - 60, "too old"), (301 + 60, "too new"), (-86400 * 365, "too old")],
)
def test_verify_rejects_timestamps_beyond_the_tolerance(secret, offset, complaint):
    headers = webhook_headers([secret], MSG_ID, now() + offset, BODY)
    with pytest.raises(VerificationError, match=complaint):
        verify(secret, headers, BODY)


@pytest.mark.parametrize("offset", [-300 + 60, 300 - 60])
def test_verify_accepts_timestamps_within_the_tolerance(secret, offset):
    headers = webhook_headers([secret], MSG_ID, now() + offset, BODY)
    assert verify(secret, headers, BODY) == json.loads(BODY)


def test_verify_honours_a_custom_tolerance(secret):
    headers = webhook_headers([secret], MSG_ID, now() - 120, BODY)
    assert verify(secret, headers, BODY, tolerance=600) == json.loads(BODY)
    with pytest.raises(VerificationError, match="too old"):
        verify(secret, headers, BODY, tolerance=30)


@pytest.mark.parametrize("timestamp", ["soon", "1700000000.5", "-1700000000", "1e9", " 17 "])
def test_verify_rejects_a_timestamp_that_is_not_an_integer(secret, headers, timestamp):
    headers["webhook-timestamp"] = timestamp
    with pytest.raises(VerificationError, match="not an integer"):
        verify(secret, headers, BODY)


def test_verify_ignores_other_signature_versions(secret, headers):
    valid = headers["webhook-signature"]
    digest = valid.removeprefix("v1,")
    headers["webhook-signature"] = f"v1a,{digest} v2,{digest}"
    with pytest.raises(VerificationError, match="no webhook-signature matches"):
        verify(secret, headers, BODY)
    headers["webhook-signature"] = f"v1a,{digest} v2,{digest} {valid}"
    assert verify(secret, headers, BODY) == json.loads(BODY)


def test_verify_skips_garbled_signatures_without_crashing(secret, headers):
    valid = headers["webhook-signature"]
    headers["webhook-signature"] = "garbage v1,!!!not-base64 v1,"
    with pytest.raises(VerificationError, match="no webhook-signature matches"):
        verify(secret, headers, BODY)
    headers["webhook-signature"] = f"garbage v1,!!!not-base64  {valid}"
    assert verify(secret, headers, BODY) == json.loads(BODY)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda h: {name.title(): value for name, value in h.items()},
        lambda h: {name.upper(): value for name, value in h.items()},
        httpx.Headers,
        lambda h: multidict.CIMultiDictProxy(
            multidict.CIMultiDict({name.title(): value for name, value in h.items()})
        ),
    ],
    ids=["title-case dict", "upper-case dict", "httpx.Headers", "aiohttp CIMultiDictProxy"],
)
def test_verify_finds_headers_in_any_case_and_any_headers_object(secret, headers, wrap):
    assert verify(secret, wrap(headers), BODY) == json.loads(BODY)


def test_verify_rejects_a_malformed_secret(headers):
    with pytest.raises(SecretError):
        verify("not-a-secret", headers, BODY)


@pytest.mark.parametrize("digits", [13, 5000])
def test_verify_rejects_an_absurdly_long_timestamp_as_a_verification_error(secret, headers, digits):
    # int() raised ValueError past 4,300 digits: a caller catching VerificationError,
    # as the contract says, let a 500 out of its endpoint.
    headers["webhook-timestamp"] = "9" * digits
    with pytest.raises(VerificationError, match="out of range"):
        verify(secret, headers, BODY)
