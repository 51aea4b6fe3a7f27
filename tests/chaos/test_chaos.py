"""The CI chaos run: about a minute of kills, restarts, cut connections and bad receivers."""

from __future__ import annotations

import pytest

from .checks import judge, report
from .plan import CI
from .run import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_nothing_is_lost_under_faults(tmp_path, capsys):
    timeline: list[str] = []
    verdict = judge(run(CI, tmp_path, say=timeline.append))
    summary = report(verdict)
    assert not verdict.failures, "\n".join([*timeline, summary])
    # Shown even when pytest captures output: the numbers are the point of the run.
    with capsys.disabled():
        print("\n" + summary)
