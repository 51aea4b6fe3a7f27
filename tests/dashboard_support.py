"""What the dashboard tests share: a real `notifyhook dashboard` process, and real deliveries."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import add_endpoint, scalar

from notifyhook.tools.receiver import Answer

TOKEN = "test-dashboard-token-0123456789"
URL_TOKEN = "querytoken-must-never-show"
HOSTILE_NAME = '<script>alert("name")</script>'
HOSTILE_ANSWER = "<img src=x onerror=alert(1)>"


class Dashboard:
    """`python -m notifyhook dashboard --port 0` on 127.0.0.1; `url` is where it listens."""

    def __init__(
        self,
        tmp_path: Path,
        *args: str,
        token: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYHOOK_")}
        environment.update(env or {})
        if token is not None:
            environment["NOTIFYHOOK_DASHBOARD_TOKEN"] = token
        self.log_path = tmp_path / "dashboard.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "notifyhook", "dashboard", "--port", "0", *args],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # "notifyhook dashboard on http://…/", or EOF
        if not line.startswith("notifyhook dashboard on "):
            self.stop()
            raise AssertionError(f"the dashboard did not start: {line!r} {self.log()}")
        self.url = line.split(" on ", 1)[1].strip().rstrip("/")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


@dataclass(frozen=True)
class Scene:
    """The endpoints of `populate`, by role."""

    crm: int
    hostile: int
    flaky: int
    billing: int
    gone: int
    hostile_delivery: int
    secrets: list[str]


def populate(db: Any, receiver: Any, run_worker: Any) -> Scene:
    """Real deliveries by a real worker to a real receiver: a healthy endpoint (whose URL
    carries a token in its query), one with a hostile name whose receiver answers with
    HTML, one that drops a connection once, one failing with 503 (its circuit opens),
    one answering 410 Gone (disabled)."""
    receiver.sequence("crm", Answer(status=200))
    receiver.sequence("hostile", Answer(status=500, body=HOSTILE_ANSWER.encode()))
    receiver.sequence("flaky", Answer(kind="reset"), Answer(status=200))
    receiver.sequence("billing", Answer(status=503))
    receiver.sequence("gone", Answer(status=410))
    scene = {
        "crm": add_endpoint(db, "acme", "crm", receiver.url("crm") + f"?token={URL_TOKEN}"),
        "hostile": add_endpoint(db, "acme", HOSTILE_NAME, receiver.url("hostile")),
        "flaky": add_endpoint(db, "acme", "flaky", receiver.url("flaky")),
        "billing": add_endpoint(db, "globex", "billing", receiver.url("billing")),
        "gone": add_endpoint(db, "globex", "gone", receiver.url("gone")),
    }
    worker = run_worker()
    for tenant, count in (("acme", 3), ("globex", 2)):
        db.execute(
            "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
            "SELECT %s, 'call.completed', jsonb_build_object('n', n) FROM generate_series(1, %s) n",
            [tenant, count],
        )
    # Finished: nothing left to send to enabled endpoints (gone's rows wait, paused).
    worker.wait_recorded(
        lambda: (
            scalar(
                db,
                "SELECT count(*) = 0 FROM notifyhook.deliveries d JOIN notifyhook.endpoints e "
                "ON e.id = d.endpoint_id WHERE e.enabled AND d.status IN ('pending', 'processing')",
            )
            and not scalar(
                db, "SELECT enabled FROM notifyhook.endpoints WHERE id = %s", [scene["gone"]]
            )
        ),
        timeout=60,
        what="every delivery finished and the 410 endpoint disabled",
    )
    hostile_delivery = scalar(
        db,
        "SELECT min(id) FROM notifyhook.deliveries WHERE endpoint_id = %s",
        [scene["hostile"]],
    )
    secrets = [row[0] for row in db.execute("SELECT secret FROM notifyhook.endpoints")]
    return Scene(**scene, hostile_delivery=hostile_delivery, secrets=secrets)
