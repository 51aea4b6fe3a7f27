"""`notifyhook dashboard` over HTTP: a real server process on 127.0.0.1, real deliveries by a real worker."""

from __future__ import annotations

import asyncio
import html
import re
import subprocess
import time
from datetime import datetime, timedelta
from http.cookies import SimpleCookie
from urllib.parse import urljoin

import httpx
import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import add_endpoint, run_cli, scalar
from dashboard_support import (
    HOSTILE_ANSWER,
    HOSTILE_NAME,
    TOKEN,
    URL_TOKEN,
    Dashboard,
    populate,
)

from notifyhook.dashboard import app as dashboard_app
from notifyhook.dashboard import auth, charts
from notifyhook.dashboard.app import SECURITY_HEADERS
from notifyhook.dashboard.auth import COOKIE, SESSION_LIFETIME_S
from notifyhook.dashboard.data import MinuteCount, open_reader
from notifyhook.tools.receiver import Answer

CSP = SECURITY_HEADERS["Content-Security-Policy"]


@pytest.fixture
def dashboard(database_url, tmp_path):
    started: list[Dashboard] = []

    def start(*args: str, token: str | None = None, **kwargs) -> Dashboard:
        running = Dashboard(tmp_path, "--database-url", database_url, *args, token=token, **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, timeout=10, **kwargs)


def test_a_deliverys_story_shows_its_attempts_when_the_producer_dated_it_ahead(
    db, receiver, run_worker, dashboard
):
    # created_at is the event's, which a producer may fill from its own clock; the page
    # pruned the attempts' days before created_at less an hour, and so showed "No attempt
    # yet" for a delivery made by a producer two hours fast (review s12-rev2).
    add_endpoint(db, "t", "crm", receiver.url("crm"))
    worker = run_worker()
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload, created_at) "
        "VALUES ('t', 'call.completed', '{}', now() + interval '2 hours')"
    )
    delivery = worker.wait_recorded(
        lambda: scalar(db, "SELECT id FROM notifyhook.deliveries WHERE status = 'delivered'"),
        what="the delivery",
    )
    story = get(f"{dashboard().url}/deliveries/{delivery}").text
    assert story.count('<li class="attempt delivered">') == 1, story
    assert "No attempt yet" not in story


def test_the_pages_show_the_queue_every_endpoint_and_a_deliverys_story(
    db, receiver, run_worker, dashboard
):
    scene = populate(db, receiver, run_worker)
    site = dashboard()

    page = get(site.url + "/")
    assert page.status_code == 200, site.log()
    text = page.text
    # The queue: gone's second delivery (if any) waits paused; nothing is due.
    assert re.search(r'id="queue-due">0<', text)
    # Every endpoint, its host but never its URL's query, nor any secret.
    for name in ("crm", "flaky", "billing", "gone"):
        assert f'/endpoints/{scene.__dict__[name]}">{name}</a>' in text
    assert f"127.0.0.1:{receiver.port}" in text
    assert URL_TOKEN not in text
    assert not any(secret in text for secret in scene.secrets)
    # The 410 endpoint is disabled, saying why; the 503 one is failing with its circuit open.
    gone_row = _row(text, scene.gone)
    assert "state-disabled" in gone_row
    assert "no: 410 Gone received at" in gone_row
    billing_row = _row(text, scene.billing)
    assert 'class="endpoint state-failing"' in billing_row
    assert "open (6 failures)" in billing_row
    assert "HTTP 503" in billing_row
    assert "0.0%" in billing_row  # success over 1 h
    assert "state-healthy" in _row(text, scene.crm)
    assert "100.0%" in _row(text, scene.crm)
    # A chart with bars of each outcome seen: deliveries, HTTP errors, a dropped connection.
    for outcome in ("delivered", "http_error", "no_answer"):
        assert f'<rect class="bar {outcome}"' in text

    # The tenant filter.
    globex = get(site.url + "/", params={"tenant": "globex"}).text
    assert "billing</a>" in globex
    assert "crm</a>" not in globex

    # One endpoint: its attempts, each linking to its delivery, and its dead letters.
    billing = get(f"{site.url}/endpoints/{scene.billing}").text
    assert billing.count('<tr class="attempt http_error">') == 6
    assert '<rect class="bar http_error"' in billing
    assert 'id="dead"' in billing
    assert billing.count("/deliveries/") >= 2

    # One delivery's whole story.
    story = get(f"{site.url}/deliveries/{scene.hostile_delivery}").text
    assert story.count('<li class="attempt http_error">') == 3
    assert '<span class="status status-dead">dead</span>' in story

    dead = get(site.url + "/dead-letters").text
    assert f'/deliveries/{scene.hostile_delivery}"' in dead
    assert "HTTP 503" in dead


def _row(page: str, endpoint_id: int) -> str:
    start = page.index(f'id="endpoint-{endpoint_id}"')
    return page[page.rindex("<tr", 0, start) : page.index("</tr>", start)]


def test_hostile_names_and_answers_are_escaped(db, receiver, run_worker, dashboard):
    scene = populate(db, receiver, run_worker)
    site = dashboard()
    pages = [
        get(site.url + "/").text,
        get(f"{site.url}/endpoints/{scene.hostile}").text,
        get(f"{site.url}/deliveries/{scene.hostile_delivery}").text,
        get(site.url + "/dead-letters").text,
    ]
    for text in pages:
        assert "<script>alert" not in text
        assert "<img src=x" not in text
        assert "<script" not in text.lower()
    # Shown as text: escaped in the markup, the very characters once unescaped.
    for text in pages[:2]:
        assert "&lt;script&gt;alert(" in text
        assert HOSTILE_NAME in html.unescape(text)
    for text in pages[1:3]:  # the endpoint's attempts, the delivery's story
        assert "&lt;img src=x onerror=alert(1)&gt;" in text
        assert HOSTILE_ANSWER in html.unescape(text)


def test_every_answer_carries_a_strict_content_security_policy(db, dashboard):
    site = dashboard(token=TOKEN)
    answers = [
        get(site.url + "/login"),
        get(site.url + "/static/dashboard.css"),
        get(site.url + "/"),  # 401
        get(site.url + "/deliveries/1", headers={"Authorization": f"Bearer {TOKEN}"}),  # 404
    ]
    assert [a.status_code for a in answers] == [200, 200, 401, 404]
    for answer in answers:
        assert answer.headers["Content-Security-Policy"] == CSP
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answers[1].headers["Content-Type"].startswith("text/css")
    for directive in (
        "default-src 'none'",
        "style-src 'self'",
        "img-src 'self' data:",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ):
        assert directive in CSP
    assert "script-src" not in CSP  # no script at all, so none may run


def test_the_token_is_needed_by_bearer_or_login_cookie(db, dashboard):
    site = dashboard(token=TOKEN)

    refused = get(site.url + "/")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert (
        get(site.url + "/", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code
        == 401
    )
    assert get(site.url + "/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert (
        get(site.url + "/dead-letters", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
        == 200
    )

    browser = get(site.url + "/dead-letters?tenant=a", headers={"Accept": "text/html"})
    assert browser.status_code == 303
    location = httpx.URL(browser.headers["Location"])
    assert location.path == "/login"
    assert location.params["next"] == "/dead-letters?tenant=a"

    wrong = httpx.post(site.url + "/login", data={"token": "nope", "next": "/"}, timeout=10)
    assert wrong.status_code == 401
    assert "That is not the token." in wrong.text
    assert COOKIE not in wrong.headers.get("Set-Cookie", "")

    right = httpx.post(
        site.url + "/login", data={"token": TOKEN, "next": "/dead-letters"}, timeout=10
    )
    assert right.status_code == 303
    assert right.headers["Location"] == "/dead-letters"
    cookie = right.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
    proxied = httpx.post(
        site.url + "/login",
        data={"token": TOKEN},
        headers={"X-Forwarded-Proto": "https"},
        timeout=10,
    )
    assert "Secure" in proxied.headers["Set-Cookie"]
    with httpx.Client(base_url=site.url, cookies=right.cookies, timeout=10) as client:
        assert client.get("/").status_code == 200
        assert client.get("/dead-letters").status_code == 200
    forged = get(site.url + "/", cookies={COOKIE: TOKEN})
    assert forged.status_code == 401

    # After logging in, only a path of this site: never another host.
    elsewhere = httpx.post(
        site.url + "/login", data={"token": TOKEN, "next": "//evil.example/"}, timeout=10
    )
    assert elsewhere.headers["Location"] == "/"


def test_a_login_says_when_its_session_ends(db, dashboard):
    site = dashboard(token=TOKEN)
    before = time.time()
    right = httpx.post(site.url + "/login", data={"token": TOKEN, "next": "/"}, timeout=10)
    assert right.status_code == 303
    cookie = SimpleCookie(right.headers["Set-Cookie"])[COOKIE]
    assert cookie["max-age"] == str(SESSION_LIFETIME_S) == "43200"  # 12 hours
    expires = int(cookie.value.partition(".")[0])
    assert before + SESSION_LIFETIME_S - 1 <= expires <= time.time() + SESSION_LIFETIME_S
    assert TOKEN not in cookie.value
    with httpx.Client(base_url=site.url, cookies=right.cookies, timeout=10) as client:
        assert client.get("/").status_code == 200
        assert client.get("/dead-letters").status_code == 200


def test_a_session_cookie_past_its_expiry_is_refused(database_url, db):
    # What went wrong: a cookie copied from a browser (a stolen profile, a shared
    # machine) kept working until the operator changed the token.
    # In process, to sign with this server's own key: the expiry is the only difference.
    app = dashboard_app.build_app(database_url, TOKEN)
    door = app[dashboard_app.DOOR]

    async def statuses() -> tuple[int, int, int, str]:
        now = int(time.time())
        fresh, stale = door.session_value(now + 60), door.session_value(now - 1)
        async with TestClient(TestServer(app)) as client:
            current = await client.get("/", cookies={COOKIE: fresh})
            program = await client.get("/", cookies={COOKIE: stale})
            person = await client.get(
                "/", cookies={COOKIE: stale}, headers={"Accept": "text/html"}, allow_redirects=False
            )
            return current.status, program.status, person.status, person.headers["Location"]

    current, program, person, location = asyncio.run(statuses())
    assert current == 200
    assert program == 401
    assert person == 303
    assert httpx.URL(location).path == "/login"


def test_a_session_ends_with_its_dashboard_process(db, dashboard):
    # Another process with the same token stands for the same dashboard restarted: its
    # key is drawn anew, so no earlier cookie opens it.
    first, second = dashboard(token=TOKEN), dashboard(token=TOKEN)
    value = _log_in(first)
    assert _status(first, value) == 200
    assert _status(second, value) == 401
    assert _log_in(second) != value


def test_logging_out_ends_that_session_for_a_copy_of_its_cookie_too(db, dashboard):
    # What went wrong: logging out only asked the browser to forget its cookie; a copy
    # of it (a shared machine's profile, a proxy's log) kept opening the dashboard for
    # the rest of the working day. Another person's session is not ended by it.
    site = dashboard(token=TOKEN)
    mine, theirs = _log_in(site), _log_in(site)
    assert mine != theirs  # two logins in the same second are two sessions
    out = httpx.post(site.url + "/logout", headers={"Cookie": f"{COOKIE}={mine}"}, timeout=10)
    assert out.status_code == 303
    assert _status(site, mine) == 401
    assert _status(site, theirs) == 200
    # A logout without a session, or with a forged one, is no error and ends nothing.
    assert httpx.post(site.url + "/logout", timeout=10).status_code in (303, 401)
    assert _status(site, theirs) == 200


def test_logged_out_sessions_are_remembered_within_a_bound(monkeypatch):
    # Each logout is remembered until its session's own end; a flood of logins and
    # logouts must not grow that without end. Past the bound every session ends (a new
    # key, as at a restart) rather than one logged-out cookie working again.
    monkeypatch.setattr(auth, "MOST_ENDED_SESSIONS", 3)
    door = auth.Door(TOKEN)
    later = int(time.time()) + 60
    sessions = [door.session_value(later) for _ in range(5)]
    for value in sessions[:3]:
        door.end_session(value)
    assert [door.session_admits(v) for v in sessions] == [False, False, False, True, True]
    door.end_session(sessions[3])
    assert not any(door.session_admits(v) for v in sessions)
    assert door.session_admits(door.session_value(later))


def test_a_session_cookie_with_a_changed_expiry_is_refused(db, dashboard):
    site = dashboard(token=TOKEN)
    value = _log_in(site)
    expires, dot, mac = value.partition(".")
    assert dot, f"the cookie carries no expiry: {value!r}"
    assert expires.isdigit()
    assert _status(site, value) == 200
    later = f"{int(expires) + 365 * 24 * 3600}.{mac}"
    padded = f"0{expires}.{mac}"  # the same number, another string
    for altered in (later, padded, f"{int(expires) - 1}.{mac}"):
        assert _status(site, altered) == 401, altered


def test_a_malformed_session_cookie_is_refused_not_an_error(db, dashboard):
    site = dashboard(token=TOKEN)
    value = _log_in(site)
    expires, _, mac = value.partition(".")
    arabic_digits = "\u0661\u0662"  # str.isdigit() and int() take them
    malformed = ("", "garbage", expires, mac, f".{mac}", f"{value}.1", f"{arabic_digits}.{mac}")
    undecodable = (
        f"{expires}.".encode() + b"\xff\xfe",
        f"{expires}.".encode() + b"\xff." + mac.partition(".")[2].encode(),  # in the id
    )
    for session in (*(v.encode() for v in malformed), *undecodable):
        assert _status(site, session) == 401, session
    assert "Traceback" not in site.log()


def test_an_undecodable_bearer_token_is_refused_not_an_error(db, dashboard):
    # What went wrong: `Authorization: Bearer` followed by bytes that are not UTF-8
    # was a 500 and a traceback in the log, where any other wrong token is a 401.
    site = dashboard(token=TOKEN)
    answer = get(site.url + "/", headers={"Authorization": b"Bearer \xff\xfe"})
    assert answer.status_code == 401
    assert "Traceback" not in site.log()


def test_a_login_form_of_undecodable_bytes_is_refused_not_an_error(db, dashboard):
    site = dashboard(token=TOKEN)
    answer = httpx.post(
        site.url + "/login",
        content=b"token=\xff\xfe",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert answer.status_code == 400
    assert "Traceback" not in site.log()


def _log_in(site: Dashboard) -> str:
    """The session cookie's value after logging in with the right token."""
    answer = httpx.post(site.url + "/login", data={"token": TOKEN}, timeout=10)
    assert answer.status_code == 303, answer.text
    return SimpleCookie(answer.headers["Set-Cookie"])[COOKIE].value


def _status(site: Dashboard, session: str | bytes) -> int:
    """The answer to a program sending this session cookie: bytes go out as they are."""
    value = session if isinstance(session, bytes) else session.encode()
    return get(site.url + "/", headers={"Cookie": COOKIE.encode() + b"=" + value}).status_code


def test_without_a_token_it_binds_to_loopback_and_needs_none(database_url, db, tmp_path):
    site = Dashboard(tmp_path, env={"NOTIFYHOOK_DATABASE_URL": database_url})
    try:
        assert site.url.startswith("http://127.0.0.1:")
        assert get(site.url + "/").status_code == 200
        assert get(site.url + "/deliveries/999").status_code == 404
        assert get(site.url + "/endpoints/99999999999999999999").status_code == 404
    finally:
        site.stop()


def test_a_wrong_setting_or_schema_exits_2_saying_which(database_url, server):
    short = _run_dashboard(
        ["--database-url", database_url], {"NOTIFYHOOK_DASHBOARD_TOKEN": "short"}
    )
    assert short.returncode == 2
    assert "NOTIFYHOOK_DASHBOARD_TOKEN must be at least 16 characters" in short.stderr

    no_url = _run_dashboard([], {})
    assert no_url.returncode == 2
    assert "NOTIFYHOOK_DATABASE_URL is required" in no_url.stderr

    unmigrated = _run_dashboard(["--database-url", server.admin_url], {})
    assert unmigrated.returncode == 2
    assert "run `notifyhook migrate` first" in unmigrated.stderr


def test_a_database_gone_after_start_is_a_503_page_naming_no_host(database_url, server, dashboard):
    site = dashboard()
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(server.admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    page = get(site.url + "/")
    assert page.status_code == 503
    assert "The database could not be read." in page.text
    assert "127.0.0.1" not in page.text
    assert name not in page.text
    assert page.headers["Content-Security-Policy"] == CSP
    assert "the database could not be read" in site.log()


def test_help_needs_no_database_and_a_bad_port_is_usage():
    shown = _run_dashboard(["--help"], {})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: notifyhook dashboard")
    assert "NOTIFYHOOK_DASHBOARD_TOKEN" in shown.stdout
    assert "--database-url" in shown.stdout
    bad = _run_dashboard(["--port", "70000"], {})
    assert bad.returncode == 2
    assert "must be a TCP port" in bad.stderr


def _run_dashboard(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(None, "dashboard", "--port", "0", *args, **env)


def test_its_connection_is_read_only(database_url):
    async def write() -> None:
        async with open_reader(database_url) as reader:
            await reader._conn.execute("INSERT INTO notifyhook.config DEFAULT VALUES")

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        asyncio.run(write())


def test_chart_bars_stack_by_outcome_in_the_minute_they_happened():
    chart = charts.per_minute(
        [MinuteCount(0, delivered=30, http_error=10, no_answer=0), MinuteCount(59, 1, 0, 1)]
    )
    assert chart.peak == 50
    assert chart.total == 42
    now = [bar for bar in chart.bars if bar.x > chart.width / 2]
    oldest = [bar for bar in chart.bars if bar.x < chart.width / 2]
    assert [bar.outcome for bar in now] == ["delivered", "http_error"]
    assert [bar.outcome for bar in oldest] == ["delivered", "no_answer"]
    plot = chart.plot_bottom - chart.top
    assert now[0].height == pytest.approx(plot * 30 / 50)
    assert now[1].y + now[1].height == pytest.approx(now[0].y)  # stacked
    assert now[0].title == "this minute: 30 delivered, 10 HTTP error, 0 no answer"
    assert charts.per_minute([]).bars == []


@pytest.mark.parametrize("target", ["/\t/evil.example/login", "/\n/evil.example/login"])
def test_login_never_sends_the_browser_to_another_site(db, dashboard, target):
    # What a user sees: a link to their own dashboard's login form,
    # http://dashboard:8790/login?next=/%09/evil.example/login; they type the token,
    # and the dashboard sends them on to https://evil.example/login, a copy of the form
    # that says "wrong token, try again" and keeps what they type.
    # The promise broken: auth.safe_next, "a path on this site only, never another
    # host". It refuses "//" and "\", but a tab or newline between the slashes passes,
    # and the Location header comes out as "//evil.example/login" (yarl drops the
    # control character; browsers do the same, WHATWG URL parsing).
    site = dashboard(token=TOKEN)
    answer = httpx.post(site.url + "/login", data={"token": TOKEN, "next": target}, timeout=10)
    assert answer.status_code == 303, answer.text
    location = answer.headers["Location"]
    landed = httpx.URL(urljoin(site.url + "/login", location))
    assert landed.host == "127.0.0.1", (
        f"after logging in, Location: {location!r} sends the browser to {landed.host}"
    )


def test_the_tokenless_dashboard_refuses_a_foreign_host_header(db, dashboard):
    # What a user sees: nothing. They run `notifyhook dashboard` with no token, as the
    # docs recommend ("bound to loopback ... only someone on the machine reaches it"),
    # and browse any web page. That page's host name re-resolves to 127.0.0.1 (DNS
    # rebinding), so the browser sends it to the dashboard as a same-origin request
    # (Host: rebind.attacker.example:8790) and lets the page's script read the answer:
    # every tenant, endpoint name, host, error and receiver answer leaves the machine.
    # The promise broken: docs/dashboard.md "Access: bound to loopback ... by default
    # only someone on the machine reaches it". The server never looks at Host.
    add_endpoint(db, "acme", "crm-internal", "https://crm.internal.example/hook")
    site = dashboard()
    port = httpx.URL(site.url).port
    own = httpx.get(site.url + "/", timeout=10)
    assert own.status_code == 200, site.log()
    assert "crm-internal" in own.text

    rebound = httpx.get(
        site.url + "/", headers={"Host": f"rebind.attacker.example:{port}"}, timeout=10
    )
    assert "crm-internal" not in rebound.text, (
        f"a page served under Host: rebind.attacker.example answered {rebound.status_code} "
        "with the endpoint list: a DNS-rebinding page reads the loopback dashboard"
    )
    assert rebound.status_code == 421


class _FastDatetime(datetime):
    """datetime whose now() is an hour ahead: a dashboard host whose clock is off."""

    @classmethod
    def now(cls, tz=None):  # type: ignore[override]
        return datetime.now(tz) + timedelta(hours=1)


def test_the_dashboards_ago_is_counted_on_the_databases_clock(
    db, database_url, receiver, run_worker, monkeypatch
):
    # What a user sees: the endpoint list says an endpoint's last error happened
    # "60 min ago" when it failed a few seconds ago (or "0 s ago" for a failure an hour
    # old, on a host running slow), so a partner that is failing right now looks like
    # an old, settled incident. The dashboard runs on any host (a laptop at the end of
    # an SSH tunnel, a replica's host) and `_age` subtracts the database's timestamp
    # from that host's datetime.now(). The promise broken: the database's clock decides
    # every time (DESIGN §8, notifyhook/clock.py: "PostgreSQL ... its clock already
    # decides every other time"); every other figure of the page (oldest due, the 1 h
    # and 24 h windows, the chart's minutes) is counted on now() in SQL.
    receiver.sequence("crm", Answer(status=400))
    endpoint = add_endpoint(db, "acme", "crm", receiver.url("crm"))
    worker = run_worker()
    db.execute(
        "INSERT INTO notifyhook.events (tenant_id, event_type, payload) "
        "VALUES ('acme', 'call.completed', '{}')"
    )
    worker.wait_recorded(
        lambda: scalar(db, "SELECT count(*) FROM notifyhook.attempts") == 1, what="the 400"
    )
    age_s = scalar(
        db,
        "SELECT extract(epoch FROM now() - last_failure_at) FROM notifyhook.endpoint_state "
        "WHERE endpoint_id = %s",
        [endpoint],
    )
    assert age_s < 60

    monkeypatch.setattr(dashboard_app, "datetime", _FastDatetime)

    async def overview() -> str:
        app = dashboard_app.build_app(database_url, None)
        async with TestClient(TestServer(app)) as client:
            page = await client.get("/")
            assert page.status == 200
            return await page.text()

    text = asyncio.run(overview())
    shown = re.search(r"\(([^()]* ago)\)</span>", text)
    assert shown is not None, text
    assert shown.group(1) in {f"{s} s ago" for s in range(0, 120)}, (
        f"an error {age_s:.0f} s old by the database's clock is shown as "
        f"{shown.group(1)!r}: the dashboard host's clock (an hour fast) decided"
    )
