"""The error hierarchy.

    NotifyhookError                  root of everything notifyhook raises on purpose
    ├── ConfigurationError           a setting is wrong; the process stops before doing anything (exit 2)
    ├── SchemaVersionError           the database schema is older or newer than this code (exit 2)
    ├── VerificationError            a webhook's signature, timestamp or headers do not check out
    └── SecretError                  a stored endpoint secret cannot be read (bad format, wrong key)

Outcomes of deliveries are values (see `notifyhook.delivery`), never exceptions.
"""


class NotifyhookError(Exception):
    """Root of the errors notifyhook raises on purpose."""


class ConfigurationError(NotifyhookError):
    """A setting is missing or wrong; the message names the variable."""


class SchemaVersionError(NotifyhookError):
    """The database schema is not the version this code understands."""


class VerificationError(NotifyhookError):
    """A webhook failed verification: bad signature, missing header or stale timestamp."""


class SecretError(NotifyhookError):
    """An endpoint secret is malformed or cannot be decrypted."""


class UsageError(NotifyhookError):
    """The command line asks for something that cannot be done as asked (exit 2)."""


class CommandError(NotifyhookError):
    """The command was well formed but could not do its work: no such row, a lock held (exit 1)."""
