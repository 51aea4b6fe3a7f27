"""`notifyhook stats` on a read-only hot standby: the same figures, and never a write."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import psycopg
import pytest
from conftest import add_endpoint, scalar, wait_until
from psycopg import errors
from psycopg.conninfo import make_conninfo
from test_cli import ok, one_line_error, run
from test_worker import insert_events

from notifyhook.store import connect, read_only
from notifyhook.tools.cluster import Cluster

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/nowhere?connect_timeout=2"


@pytest.fixture
def replicated(own_cluster: Cluster) -> Iterator[tuple[str, str]]:
    """A migrated primary with a little history, and a streaming standby that has replayed it."""
    with psycopg.connect(own_cluster.url(), autocommit=True) as db:
        add_endpoint(db, "acme", "hooks", "http://127.0.0.1:9/hooks")
        insert_events(db, "acme", 5)
        standby = own_cluster.start_standby()
        try:
            # One more row after the base backup: the standby shows it only by streaming.
            insert_events(db, "acme", 2)
            # The insert position, not pg_current_wal_lsn(): with synchronous_commit off
            # (own_cluster has fsync off) the commits may not be written yet, and the
            # write position can stand before them.
            primary_lsn = scalar(db, "SELECT pg_current_wal_insert_lsn()")
            with psycopg.connect(standby.url(), autocommit=True) as replica:
                wait_until(
                    lambda: scalar(
                        replica, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [primary_lsn]
                    ),
                    what="the standby to replay the primary's last commit",
                )
            yield own_cluster.url(), standby.url()
        finally:
            standby.stop()


@pytest.mark.slow
def test_stats_on_a_hot_standby_show_the_primary_figures(replicated):
    primary_url, standby_url = replicated
    on_primary = json.loads(ok(primary_url, "stats", "--json"))
    # --database-url stands above NOTIFYHOOK_DATABASE_URL, here a server that is not there.
    on_standby = json.loads(ok(UNREACHABLE, "stats", "--json", "--database-url", standby_url))
    # The same rows; only the age of the oldest due delivery grew between the two calls.
    for figures in (on_primary, on_standby):
        figures["queue"].pop("oldest_due_age_s")
    assert on_standby == on_primary
    assert on_standby["queue"]["pending_due"] == 7
    table = ok(UNREACHABLE, "stats", "--database-url", standby_url)
    assert "acme" in table
    assert "hooks" in table


@pytest.mark.slow
def test_stats_need_no_environment_url_when_given_one(replicated):
    _, standby_url = replicated
    assert json.loads(ok(None, "stats", "--json", "--database-url", standby_url))["endpoints"]


def test_a_wrong_database_url_option_is_a_usage_error_naming_it():
    url = "postgresql://127.0.0.1/x?target_session_attrs=sometimes"
    line = one_line_error(run(None, "stats", "--database-url", url), 2)
    assert "target_session_attrs" in line


def test_the_stats_connection_refuses_writes_even_on_a_primary(database_url):
    async def write_read_only() -> None:
        url = make_conninfo(database_url, options="-c statement_timeout=5000")
        async with connect(read_only(url)) as conn:
            # The user's own options survive: both settings are in force.
            cursor = await conn.execute("SHOW statement_timeout")
            assert await cursor.fetchone() == ("5s",)
            with pytest.raises(errors.ReadOnlySqlTransaction):
                await conn.execute("CREATE TABLE notifyhook.scratch (x int)")

    asyncio.run(write_read_only())
