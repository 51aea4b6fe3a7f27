"""The CI chaos run: about a minute of kills, restarts, cut connections and bad receivers."""

from __future__ import annotations

import pytest
from conftest import SUMMARY

from .checks import judge, report
from .plan import CI
from .run import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_nothing_is_lost_under_faults(tmp_path, record_property):
    timeline: list[str] = []
    verdict = judge(run(CI, tmp_path, say=timeline.append))
    summary = report(verdict)
    # Shown at the end of the run, pass or fail, under xdist too: the numbers are the
    # point of the run (tests/conftest.py's pytest_terminal_summary prints it).
    record_property(SUMMARY, summary)
    assert not verdict.failures, "\n".join([*timeline, summary])
