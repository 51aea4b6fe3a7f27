"""notifyhook: webhook delivery straight out of PostgreSQL."""

__version__ = "0.1.0"
