"""The SQL ships inside the wheel, and an editable install finds it in the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from notifyhook.migrate import migration_files, sql_directory

ROOT = Path(__file__).resolve().parent.parent


def test_an_editable_install_reads_the_checkouts_sql():
    assert sql_directory() == ROOT / "sql"
    names = [f.name for f in migration_files()]
    assert names[0] == "0001_schema.sql"
    assert "triggers/events.sql" in names


def test_the_wheel_carries_the_sql_and_finds_it(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("notifyhook-*.whl"))
    contents = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"notifyhook/sql/{f.name}" for f in migration_files()} | {"notifyhook/queries.sql"}
    # The dashboard's statements, templates and stylesheet: it loads nothing from elsewhere.
    expected |= {
        "notifyhook/dashboard/queries.sql",
        "notifyhook/dashboard/templates/base.html",
        "notifyhook/dashboard/static/dashboard.css",
    }
    assert expected <= contents

    target = tmp_path / "installed"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    probe = (
        "from notifyhook.migrate import sql_directory, migration_files; "
        "print(sql_directory()); print(len(migration_files()))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    directory, count = shown.stdout.split()
    assert Path(directory) == target / "notifyhook" / "sql"
    assert int(count) == len(migration_files())
