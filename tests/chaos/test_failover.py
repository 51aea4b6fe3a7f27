"""The failover run: the primary stopped hard mid-stream, its synchronous standby promoted."""

from __future__ import annotations

import pytest

from .checks import judge, report
from .plan import FAILOVER
from .run import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_promoted_synchronous_standby_loses_nothing(tmp_path, capsys):
    timeline: list[str] = []
    observed = run(FAILOVER, tmp_path, say=timeline.append)
    verdict = judge(observed)
    summary = report(verdict)
    assert [fault.action for fault in observed.faults] == ["failover"]
    assert not verdict.failures, "\n".join([*timeline, summary])
    with capsys.disabled():
        print("\n" + summary)
