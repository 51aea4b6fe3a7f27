"""Standard Webhooks signatures: secrets, headers for senders, verification for receivers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets as random_secrets
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from notifyhook.errors import SecretError, VerificationError

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64
DEFAULT_TOLERANCE_S = 300

_ID_HEADER = "webhook-id"
_TIMESTAMP_HEADER = "webhook-timestamp"
_SIGNATURE_HEADER = "webhook-signature"
_UNIX_SECONDS = re.compile(r"[0-9]+")
_MAX_TIMESTAMP_DIGITS = 12  # unix seconds up to the year 33658


def generate_secret() -> str:
    """A fresh secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(random_secrets.token_bytes(32)).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """The HMAC key inside a `whsec_…` secret; `SecretError` when it is not one."""
    return _decode_secret(secret)


# Every HTTP attempt decodes its endpoint's secrets; a small cache makes that a dict lookup.
# A wrapper keeps decode_secret's signature typed (lru_cache's wrapper accepts any Hashable).
@lru_cache(maxsize=1024)
def _decode_secret(secret: str) -> bytes:
    # Messages never quote the secret: they end up in logs.
    if not secret.startswith(SECRET_PREFIX):
        raise SecretError(f"a webhook secret must start with {SECRET_PREFIX!r}")
    encoded = secret[len(SECRET_PREFIX) :]
    # Accept unpadded base64 as the reference implementation does, but nothing outside the alphabet.
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(
            f"a webhook secret must be {SECRET_PREFIX!r} followed by standard base64"
        ) from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise SecretError(
            f"a webhook secret must encode {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, "
            f"this one encodes {len(key)}"
        )
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64 HMAC-SHA256>` signature of `{msg_id}.{timestamp}.{body}`."""
    return _versioned(_digest(decode_secret(secret), msg_id, str(timestamp), body))


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one signature per secret, space-separated."""
    # A lone str is a Sequence[str] too; signing with each character would be a silent bug.
    if isinstance(secrets, str):
        raise TypeError("secrets must be a sequence of secrets, not a single string")
    if not secrets:
        raise ValueError("at least one secret is needed to sign a webhook")
    timestamp_text = str(timestamp)
    return " ".join(
        _versioned(_digest(decode_secret(secret), msg_id, timestamp_text, body))
        for secret in secrets
    )


def webhook_headers(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt."""
    return {
        _ID_HEADER: msg_id,
        _TIMESTAMP_HEADER: str(timestamp),
        _SIGNATURE_HEADER: signature_header(secrets, msg_id, timestamp, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance: int = DEFAULT_TOLERANCE_S,
) -> Any:
    """Check a received webhook and return its parsed JSON body; `VerificationError` if it fails.

    Rejects a missing header, a timestamp more than `tolerance` seconds from now (a replay),
    and a body that no `v1` signature in the header matches. Header names match in any case.
    """
    msg_id = _header(headers, _ID_HEADER)
    timestamp_text = _header(headers, _TIMESTAMP_HEADER)
    signatures = _header(headers, _SIGNATURE_HEADER)
    _check_timestamp(timestamp_text, tolerance)
    # Sign the header text as received: that is what the sender signed.
    expected = _digest(decode_secret(secret), msg_id, timestamp_text, body)
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue  # other schemes (e.g. v1a) are for other verifiers
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, candidate):
            return json.loads(body)
    raise VerificationError("no webhook-signature matches the body")


def _digest(key: bytes, msg_id: str, timestamp_text: str, body: bytes) -> bytes:
    # Feeding the body separately avoids copying up to 256 KiB per secret per attempt.
    mac = hmac.new(key, f"{msg_id}.{timestamp_text}.".encode(), hashlib.sha256)
    mac.update(body)
    return mac.digest()


def _versioned(digest: bytes) -> str:
    return "v1," + base64.b64encode(digest).decode("ascii")


def verified_by_any(secrets: Sequence[str], headers: Mapping[str, str], body: bytes) -> bool:
    """Whether any of `secrets` verifies the webhook (a receiver mid-rotation holds two)."""
    for secret in secrets:
        try:
            verify(secret, headers, body)
        except (VerificationError, ValueError):
            continue
        return True
    return False


def _header(headers: Mapping[str, str], name: str) -> str:
    # httpx and aiohttp headers are case-insensitive already; a plain dict may use any casing.
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    if not value:
        raise VerificationError(f"missing {name} header")
    return value


def _check_timestamp(timestamp_text: str, tolerance: int) -> None:
    if not _UNIX_SECONDS.fullmatch(timestamp_text):
        raise VerificationError("webhook-timestamp header is not an integer of unix seconds")
    if len(timestamp_text) > _MAX_TIMESTAMP_DIGITS:
        # int() refuses past 4,300 digits with a ValueError, and no time is this far off.
        raise VerificationError("webhook-timestamp is out of range")
    skew = int(timestamp_text) - int(time.time())
    if skew < -tolerance:
        raise VerificationError(f"webhook-timestamp is too old ({-skew} s > {tolerance} s)")
    if skew > tolerance:
        raise VerificationError(f"webhook-timestamp is too new ({skew} s > {tolerance} s)")
