"""Endpoint secrets at rest: `enc:` + a Fernet token when NOTIFYHOOK_SECRET_KEY is set."""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken

from notifyhook.errors import SecretError
from notifyhook.signing import ENDPOINT_CACHE_SIZE

ENCRYPTED_PREFIX = "enc:"


def check_key(key: str) -> None:
    """Raise ValueError unless `key` is a Fernet key (urlsafe base64 of 32 bytes)."""
    try:
        Fernet(key.encode())
    except (ValueError, TypeError):
        raise ValueError(
            "must be a Fernet key: 32 bytes of urlsafe base64, as made by Fernet.generate_key()"
        ) from None


def seal(secret: str, key: str | None) -> str:
    """The form to store: encrypted when a key is configured, the plain secret otherwise."""
    if key is None:
        return secret
    return ENCRYPTED_PREFIX + Fernet(key.encode()).encrypt(secret.encode()).decode("ascii")


def unseal(stored: str, key: str | None) -> str:
    """The plain `whsec_…` secret from its stored form; SecretError when it cannot be read."""
    if not stored.startswith(ENCRYPTED_PREFIX):
        return stored
    if key is None:
        raise SecretError(
            "an endpoint secret is encrypted (enc:) but NOTIFYHOOK_SECRET_KEY is not set"
        )
    try:
        return _decrypt(stored, key)
    except InvalidToken:
        raise SecretError(
            "an endpoint secret cannot be decrypted with NOTIFYHOOK_SECRET_KEY"
        ) from None


# The worker unseals its endpoint's secrets for every attempt, and Fernet costs tens of
# microseconds (a key derivation, an HMAC, AES): remember them, per endpoint.
# A failure is not cached: an operator may be fixing the key.
@lru_cache(maxsize=ENDPOINT_CACHE_SIZE)
def _decrypt(stored: str, key: str) -> str:
    return Fernet(key.encode()).decrypt(stored[len(ENCRYPTED_PREFIX) :].encode()).decode()
