"""The dashboard as a person sees it: Debian's chromium, headless, through selenium.

No skip when chromium is missing: scripts/setup installs it (as root), and a browser
test that cannot run must say so by failing. Screenshots go to SCREENSHOTS.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from dashboard_support import HOSTILE_ANSWER, HOSTILE_NAME, TOKEN, Dashboard, populate
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from notifyhook.dashboard.auth import COOKIE, SESSION_LIFETIME_S

# A browser is seconds of CPU a page on two cores: end to end, out of the inner loop.
pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCREENSHOTS = Path(__file__).parent / "artifacts" / "screenshots"
RED = "rgba(198, 40, 40, 1)"  # --bad in dashboard.css
CHROMIUM_HINT = "apt-get install chromium chromium-driver (scripts/setup does it as root)"


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert chromium, f"chromium is needed: {CHROMIUM_HINT}"
    assert driver_path, f"chromedriver is needed: {CHROMIUM_HINT}"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root, in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1500,1100",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {SCREENSHOTS}")
    yield driver
    driver.quit()


@pytest.fixture
def dashboard(database_url, tmp_path):
    started: list[Dashboard] = []

    def start(token: str | None = None) -> Dashboard:
        running = Dashboard(tmp_path, "--database-url", database_url, token=token)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def screenshot(driver: WebDriver, name: str) -> Path:
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot saved at {path}"
    return path


def click_through(driver: WebDriver, element: WebElement) -> None:
    """Click a link or a submit button and wait for the next page: a click returns
    before the navigation it starts has finished."""
    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 15).until(lambda _: _detached(page))
    WebDriverWait(driver, 15).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def _detached(element: WebElement) -> bool:
    try:
        element.is_enabled()
    # Stale, or chromedriver's "Node with given id does not belong to the document":
    # either way the page it belonged to is gone.
    except (StaleElementReferenceException, WebDriverException):
        return True
    return False


def assert_no_alert(driver: WebDriver) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 (the property raises when there is none)


def test_the_overview_shows_health_states_and_a_chart(browser, db, receiver, run_worker, dashboard):
    scene = populate(db, receiver, run_worker)
    site = dashboard()
    browser.delete_all_cookies()
    browser.get(site.url + "/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Queue"

    gone = browser.find_element(By.ID, f"endpoint-{scene.gone}")
    assert "410 Gone received at" in gone.find_element(By.CLASS_NAME, "disabled-reason").text
    assert "disabled" in gone.find_element(By.CLASS_NAME, "badge").text

    billing = browser.find_element(By.ID, f"endpoint-{scene.billing}")
    assert "state-failing" in billing.get_attribute("class").split()
    badge = billing.find_element(By.CLASS_NAME, "badge")
    assert badge.text == "failing"
    assert badge.value_of_css_property("background-color") == RED
    assert billing.find_element(By.CLASS_NAME, "circuit-open").is_displayed()

    crm = browser.find_element(By.ID, f"endpoint-{scene.crm}")
    assert crm.find_element(By.CLASS_NAME, "badge").text == "healthy"
    assert crm.find_element(By.CLASS_NAME, "badge").value_of_css_property("background-color") != RED

    chart = browser.find_element(By.CSS_SELECTOR, "svg.per-minute")
    assert chart.is_displayed()
    bars = chart.find_elements(By.CSS_SELECTOR, "rect.bar")
    assert bars, "the chart has no bars"
    assert all(bar.size["height"] > 0 and bar.size["width"] > 0 for bar in bars)
    failed = chart.find_elements(By.CSS_SELECTOR, "rect.bar.http_error")
    assert failed
    assert failed[0].value_of_css_property("fill") == "rgb(198, 40, 40)"

    # The stylesheet loaded under the CSP: the header bar is dark, not the browser's default.
    header = browser.find_element(By.CSS_SELECTOR, "header.top")
    assert header.value_of_css_property("background-color") == "rgba(29, 35, 48, 1)"
    screenshot(browser, "overview")

    browser.find_element(By.CSS_SELECTOR, "select[name=tenant] option[value=globex]").click()
    click_through(browser, browser.find_element(By.CSS_SELECTOR, "form.filter button"))
    names = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "tr.endpoint td a")]
    assert "billing" in names
    assert "crm" not in names


def test_hostile_text_is_shown_as_text(browser, db, receiver, run_worker, dashboard):
    scene = populate(db, receiver, run_worker)
    site = dashboard()
    browser.delete_all_cookies()
    browser.get(f"{site.url}/endpoints/{scene.hostile}")
    assert_no_alert(browser)
    assert HOSTILE_NAME in browser.find_element(By.TAG_NAME, "h1").text
    excerpts = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "td.excerpt")]
    assert HOSTILE_ANSWER in excerpts
    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_element(By.CSS_SELECTOR, "svg.per-minute rect.bar.http_error")
    screenshot(browser, "endpoint-hostile")

    click_through(browser, browser.find_element(By.CSS_SELECTOR, "td a[href^='/deliveries/']"))
    assert_no_alert(browser)
    story = browser.find_elements(By.CSS_SELECTOR, "ol.story li.attempt")
    assert len(story) == 3
    assert all(
        HOSTILE_ANSWER in item.find_element(By.CSS_SELECTOR, "pre.excerpt").text for item in story
    )
    assert browser.find_elements(By.TAG_NAME, "img") == []
    screenshot(browser, "delivery-hostile")

    browser.get(site.url + "/")
    assert_no_alert(browser)
    assert HOSTILE_NAME in browser.find_element(By.ID, f"endpoint-{scene.hostile}").text


def test_without_the_token_a_person_gets_the_login_form(browser, db, dashboard):
    site = dashboard(token=TOKEN)
    browser.delete_all_cookies()
    browser.get(site.url + "/dead-letters")
    assert browser.current_url.startswith(site.url + "/login")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Log in"
    assert browser.find_elements(By.CSS_SELECTOR, "table") == []
    screenshot(browser, "login")

    browser.find_element(By.NAME, "token").send_keys("not-the-token")
    click_through(browser, browser.find_element(By.CSS_SELECTOR, "form.login button"))
    assert "That is not the token." in browser.find_element(By.ID, "login-error").text

    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    click_through(browser, browser.find_element(By.CSS_SELECTOR, "form.login button"))
    assert browser.current_url == site.url + "/dead-letters"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Dead letters"
    cookie = browser.get_cookie(COOKIE)
    assert cookie is not None
    assert cookie["httpOnly"] is True
    assert cookie["value"] != TOKEN
    # Kept for a working day at most, then dropped by the browser itself.
    assert 0 < cookie["expiry"] - time.time() <= SESSION_LIFETIME_S
    # Scripts on the page could not read it even if any ran.
    assert COOKIE not in browser.execute_script("return document.cookie")

    click_through(browser, browser.find_element(By.CSS_SELECTOR, "form.logout button"))
    browser.get(site.url + "/")
    assert browser.current_url.startswith(site.url + "/login")
