"""Applies the numbered files in sql/ and the definitions beside them, under an advisory lock.

Numbered files (`sql/NNNN_name.sql`) run once each, in order, and set the schema
version. The definitions in `sql/functions/`, `sql/triggers/` and `sql/views/`
are written to be re-run (CREATE OR REPLACE, DROP … IF EXISTS) and are applied
again whenever their text changes, after the numbered files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from notifyhook.errors import SchemaVersionError
from notifyhook.store import PARTITIONS_AHEAD, queries, read_schema_version

DEFINITION_DIRECTORIES = ("functions", "triggers", "views")

_NUMBERED = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class SqlFile:
    name: str
    """Relative to sql/: `0001_schema.sql`, `triggers/events.sql`."""
    version: int | None
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def sql_directory() -> Path:
    """sql/ as shipped in the wheel (notifyhook/sql), or at the top of a source checkout."""
    packaged = Path(str(resources.files("notifyhook"))) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def migration_files(directory: Path | None = None) -> list[SqlFile]:
    """Every file migrate applies, in the order it applies them."""
    root = directory or sql_directory()
    numbered = sorted(p for p in root.glob("*.sql") if _NUMBERED.match(p.name))
    files = [SqlFile(p.name, int(p.name[:4]), p.read_text(encoding="utf-8")) for p in numbered]
    for folder in DEFINITION_DIRECTORIES:
        for path in sorted((root / folder).glob("*.sql")):
            files.append(SqlFile(f"{folder}/{path.name}", None, path.read_text(encoding="utf-8")))
    if not numbered:
        raise FileNotFoundError(f"no migration files in {root}")
    return files


def code_schema_version() -> int:
    """The schema version this code understands: the highest numbered file shipped."""
    return max(f.version for f in migration_files() if f.version is not None)


async def migrate(conn: Any, *, max_payload_bytes: int | None) -> list[str]:
    """Bring the schema up to date on an autocommit connection; returns the files applied.

    `max_payload_bytes`, when given, is written to notifyhook.config; None keeps what is
    there (the schema's default at first, or what an operator set with UPDATE).
    """
    sql = queries()
    await conn.execute(sql["lock_migrations"])
    try:
        found = await read_schema_version(conn)
        known = code_schema_version()
        if found is not None and found > known:
            raise SchemaVersionError(
                f"the database schema is version {found}, newer than this notifyhook "
                f"(which knows up to {known}): upgrade notifyhook"
            )
        applied: dict[str, str] = {}
        if found is not None:
            rows = await (await conn.execute(sql["applied_migrations"])).fetchall()
            applied = {name: checksum for name, _version, checksum in rows}
        done: list[str] = []
        for file in migration_files():
            # After a numbered file every definition is applied again, changed or not:
            # a view is bound to the table it was created on, which the numbered file may
            # have renamed or replaced (0006_partitioned_history.sql).
            if file.name in applied and (
                file.version is not None
                or (applied[file.name] == file.checksum and not _numbered_applied(done))
            ):
                continue
            async with conn.transaction():
                await conn.execute(file.text)
                await conn.execute(
                    sql["record_migration"],
                    {"name": file.name, "version": file.version, "checksum": file.checksum},
                )
            done.append(file.name)
        # The history's day partitions, a week ahead (0006_partitioned_history.sql);
        # the workers keep them so (notifyhook/maintenance.py).
        await conn.execute(sql["create_partitions"], {"ahead": PARTITIONS_AHEAD})
        if max_payload_bytes is not None:
            await conn.execute(
                sql["set_max_payload_bytes"], {"max_payload_bytes": max_payload_bytes}
            )
        return done
    finally:
        await conn.execute(sql["unlock_migrations"])


def _numbered_applied(done: list[str]) -> bool:
    return any(_NUMBERED.match(name) for name in done)


async def check_schema(conn: Any) -> int:
    """The schema version, or SchemaVersionError saying which versions were found and known."""
    found = await read_schema_version(conn)
    known = code_schema_version()
    if found is None:
        raise SchemaVersionError(
            f"the database has no notifyhook schema (this notifyhook knows version {known}): "
            "run `notifyhook migrate`"
        )
    if found != known:
        newer_or_older = "newer" if found > known else "older"
        advice = "upgrade notifyhook" if found > known else "run `notifyhook migrate`"
        raise SchemaVersionError(
            f"the database schema is version {found}, {newer_or_older} than the version "
            f"this notifyhook knows ({known}): {advice}"
        )
    await _check_definitions(conn)
    return found


async def _check_definitions(conn: Any) -> None:
    """Refuse functions, triggers or views other than this code's: the worker calls them.

    A package upgraded without `notifyhook migrate` keeps the schema version but
    not the functions it was written against.
    """
    rows = await (await conn.execute(queries()["applied_migrations"])).fetchall()
    found = {name: checksum for name, version, checksum in rows if version is None}
    shipped = {f.name: f.checksum for f in migration_files() if f.version is None}
    differing = sorted(name for name in shipped if found.get(name) != shipped[name])
    if differing:
        raise SchemaVersionError(
            f"the database's {', '.join(differing)} differ from this notifyhook's: "
            "run `notifyhook migrate` with this version"
        )
