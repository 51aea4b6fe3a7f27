"""Standard Webhooks signatures: secrets, headers for senders, verification for receivers.

Two schemes, chosen by the key's prefix: `whsec_` secrets sign `v1` (HMAC-SHA256, the
receiver holds the same secret); `whsk_` ed25519 signing keys sign `v1a`, and the
receiver verifies with the matching `whpk_` public key, which cannot sign.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets as random_secrets
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from notifyhook.errors import SecretError, VerificationError

SECRET_PREFIX = "whsec_"
SIGNING_KEY_PREFIX = "whsk_"
"""An ed25519 signing key: `whsk_` + base64 of its 32-byte seed (signs `v1a`)."""
PUBLIC_KEY_PREFIX = "whpk_"
"""An ed25519 public key: `whpk_` + base64 of its 32 bytes (verifies `v1a`)."""
ED25519_KEY_BYTES = 32
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


ENDPOINT_CACHE_SIZE = 32_768
"""Entries in each per-endpoint cache of a worker (a URL parsed, a secret decoded or
unsealed, a signing key loaded): room for every endpoint of a SaaS fleet, 10,000 tenants'
endpoints each mid-rotation with two secrets, and more."""


# Every HTTP attempt decodes its endpoint's secrets; a cache makes that a dict lookup.
# A wrapper keeps decode_secret's signature typed (lru_cache's wrapper accepts any Hashable).
@lru_cache(maxsize=ENDPOINT_CACHE_SIZE)
def _decode_secret(secret: str) -> bytes:
    # Messages never quote the secret: they end up in logs.
    if not secret.startswith(SECRET_PREFIX):
        raise SecretError(f"a webhook secret must start with {SECRET_PREFIX!r}")
    key = _base64_after(secret, SECRET_PREFIX, "a webhook secret")
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise SecretError(
            f"a webhook secret must encode {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, "
            f"this one encodes {len(key)}"
        )
    return key


def _base64_after(text: str, prefix: str, what: str) -> bytes:
    encoded = text[len(prefix) :]
    # Accept unpadded base64 as the reference implementation does, but nothing outside the alphabet.
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"{what} must be {prefix!r} followed by standard base64") from None


def generate_signing_key() -> str:
    """A fresh ed25519 signing key: `whsk_` + base64 of a random 32-byte seed."""
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    return SIGNING_KEY_PREFIX + base64.b64encode(seed).decode("ascii")


def public_key(signing_key: str) -> str:
    """The `whpk_` public key a receiver verifies a `whsk_` signing key's signatures with."""
    raw = _private_key(signing_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def is_signing_key(secret: str) -> bool:
    """Whether an (unsealed) endpoint secret is an ed25519 `whsk_` key rather than a `whsec_`."""
    return secret.startswith(SIGNING_KEY_PREFIX)


def check_secret(secret: str) -> None:
    """Raise `SecretError` unless `secret` is a usable `whsec_` secret or `whsk_` signing key."""
    if is_signing_key(secret):
        _private_key(secret)
    else:
        decode_secret(secret)


@lru_cache(maxsize=ENDPOINT_CACHE_SIZE)
def _private_key(signing_key: str) -> Ed25519PrivateKey:
    if not signing_key.startswith(SIGNING_KEY_PREFIX):
        raise SecretError(f"an ed25519 signing key must start with {SIGNING_KEY_PREFIX!r}")
    seed = _base64_after(signing_key, SIGNING_KEY_PREFIX, "an ed25519 signing key")
    if len(seed) != ED25519_KEY_BYTES:
        raise SecretError(
            f"an ed25519 signing key must encode a {ED25519_KEY_BYTES}-byte seed, "
            f"this one encodes {len(seed)}"
        )
    return Ed25519PrivateKey.from_private_bytes(seed)


@lru_cache(maxsize=1024)
def _public_key(key: str) -> Ed25519PublicKey:
    if key.startswith(SIGNING_KEY_PREFIX):
        return _private_key(key).public_key()
    if not key.startswith(PUBLIC_KEY_PREFIX):
        raise SecretError(f"an ed25519 public key must start with {PUBLIC_KEY_PREFIX!r}")
    raw = _base64_after(key, PUBLIC_KEY_PREFIX, "an ed25519 public key")
    if len(raw) != ED25519_KEY_BYTES:
        raise SecretError(
            f"an ed25519 public key must encode {ED25519_KEY_BYTES} bytes, "
            f"this one encodes {len(raw)}"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature of `{msg_id}.{timestamp}.{body}`: `v1,<base64 HMAC-SHA256>` with a
    `whsec_` secret, `v1a,<base64 ed25519>` with a `whsk_` signing key."""
    return _signature(secret, msg_id, str(timestamp), body)


def _signature(secret: str, msg_id: str, timestamp_text: str, body: bytes) -> str:
    if is_signing_key(secret):
        signed = _private_key(secret).sign(_message(msg_id, timestamp_text, body))
        return "v1a," + base64.b64encode(signed).decode("ascii")
    return _versioned(_digest(decode_secret(secret), msg_id, timestamp_text, body))


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one signature per secret, space-separated, each in its
    key's scheme (a rotation from a `whsec_` to a `whsk_` sends a `v1a` and a `v1`)."""
    # A lone str is a Sequence[str] too; signing with each character would be a silent bug.
    if isinstance(secrets, str):
        raise TypeError("secrets must be a sequence of secrets, not a single string")
    if not secrets:
        raise ValueError("at least one secret is needed to sign a webhook")
    timestamp_text = str(timestamp)
    return " ".join(_signature(secret, msg_id, timestamp_text, body) for secret in secrets)


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
    key: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance: int = DEFAULT_TOLERANCE_S,
) -> Any:
    """Check a received webhook and return its parsed JSON body; `VerificationError` if it fails.

    `key` is the endpoint's `whsec_` secret (checks `v1` signatures) or its `whpk_` public
    key (checks `v1a`; a `whsk_` signing key works too). Rejects a missing header, a
    timestamp more than `tolerance` seconds from now (a replay), and a body that no
    signature of the key's scheme matches. Header names match in any case.
    """
    msg_id = _header(headers, _ID_HEADER)
    timestamp_text = _header(headers, _TIMESTAMP_HEADER)
    signatures = _header(headers, _SIGNATURE_HEADER)
    _check_timestamp(timestamp_text, tolerance)
    # Check the header text as received: that is what the sender signed.
    version, matches = _matcher(key, msg_id, timestamp_text, body)
    for entry in signatures.split():
        entry_version, _, encoded = entry.partition(",")
        if entry_version != version:
            continue  # the other scheme's signatures are for other keys
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if matches(candidate):
            return json.loads(body)
    raise VerificationError("no webhook-signature matches the body")


def _matcher(
    key: str, msg_id: str, timestamp_text: str, body: bytes
) -> tuple[str, Callable[[bytes], bool]]:
    """The signature version `key` checks, and a test of one decoded signature."""
    if key.startswith((PUBLIC_KEY_PREFIX, SIGNING_KEY_PREFIX)):
        public = _public_key(key)
        message = _message(msg_id, timestamp_text, body)

        def ed25519_matches(candidate: bytes) -> bool:
            try:
                public.verify(candidate, message)
            except InvalidSignature:
                return False
            return True

        return "v1a", ed25519_matches
    expected = _digest(decode_secret(key), msg_id, timestamp_text, body)
    return "v1", lambda candidate: hmac.compare_digest(expected, candidate)


def _message(msg_id: str, timestamp_text: str, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp_text}.".encode() + body


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
