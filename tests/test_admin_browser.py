"""The admin pages in a real headless browser (Debian's chromium through chromedriver): log in through the form,
open every page, save a screenshot of each, check what each shows in the DOM, and check that the analytics charts,
drawn by the vendored Chart.js, hold the seeded numbers. The browser console must stay free of errors, Content
Security Policy violations included (no inline script, nothing from elsewhere)."""

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.admin_site import EXPECTED, PASSWORD, SEEDED_RANGE, seed, site  # noqa: F401  (site is a fixture)

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromium-driver are not installed "
                                "(just test installs them)")
KEEP = Path(__file__).parent.parent / "screenshots"  # git-ignored: the latest run's pages, to look at


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000", "--lang=en-US"):
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the box's self-signed certificate; its pinning is test_admin_tls's
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(DRIVER))


def _walk(url: str, shots: Path) -> dict:
    """Every page as an admin sees it; returns what the charts hold and what the console said."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as appears
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    found = {}
    try:
        def shot(name: str) -> None:
            driver.save_screenshot(str(shots / f"{name}.png"))

        def text(css: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, css).text

        def submit(button_id: str, then_css: str) -> str:
            """Clicks a form's button and reads `then_css` on the page the POST leads to: a click returns before the
            browser has navigated, so a plain find_element may still search (and miss on) the old page."""
            button = driver.find_element(By.ID, button_id)
            button.click()
            wait = WebDriverWait(driver, 20)
            wait.until(appears.staleness_of(button))
            return wait.until(appears.presence_of_element_located((By.CSS_SELECTOR, then_css))).text

        driver.get(url + "/login")
        shot("login")
        driver.find_element(By.ID, "name").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        WebDriverWait(driver, 20).until(lambda d: d.current_url.endswith("/analytics"))

        driver.get(f"{url}/analytics?from={SEEDED_RANGE['from']}&to={SEEDED_RANGE['to']}")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
            "data-charts-ready") == "1")
        shot("analytics")
        found["charts"] = driver.execute_script("""
            const data = (id) => Chart.getChart(id).data;
            return Object.fromEntries(["messages-per-day", "messages-per-hour", "active-users", "latency",
                "delivery", "problems", "commands"].map((id) => [id, {labels: data(id).labels,
                series: data(id).datasets.map((d) => d.data)}]));""")
        found["totals"] = [text(f"#total-{k}") for k in ("messages", "users", "filter-hits", "errors")]

        driver.get(url + "/words")
        found["words"] = driver.find_element(By.ID, "words-0").get_attribute("value")
        area = driver.find_element(By.ID, "words-0")
        area.clear()
        area.send_keys("违禁词\n新词")
        found["words_saved"] = submit("save-0", "#notice")
        shot("words")

        driver.get(url + "/outbox")
        shot("outbox")
        found["outbox"] = text("#outbox tbody")

        driver.get(url + "/users")
        driver.find_element(By.ID, "new-key-name").send_keys("nightly-export")
        found["new_key"] = submit("add-key", "#new-key")
        found["users"] = text("#users tbody")
        shot("users")

        driver.get(url + "/conversations")
        shot("conversations")
        found["conversations"] = text("#conversations tbody")
        driver.find_element(By.CSS_SELECTOR, "#conversations tbody a").click()
        WebDriverWait(driver, 20).until(lambda d: "/conversations/view" in d.current_url)
        shot("conversation")
        found["conversation"] = text("#turns")

        driver.get(url + "/audit?operation=conversation_viewed")
        shot("audit")
        found["audit"] = text("#audit tbody")

        driver.get(url + "/static/../server.py")
        shot("traversal")
        found["traversal"] = driver.page_source
        found["console"] = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
                            and "/static/../server.py" not in e["message"]
                            and "server.py - Failed to load resource" not in e["message"]]
    finally:
        driver.quit()
    return found


async def test_every_page_in_a_real_browser(site, tmp_path):
    await site.store.run(seed, site.store.vault)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    found = await asyncio.to_thread(_walk, site.url, shots)

    charts = found["charts"]
    assert charts["messages-per-day"] == {"labels": EXPECTED["days"], "series": [EXPECTED["messages"]["per_day"]]}
    assert charts["messages-per-hour"]["series"] == [EXPECTED["messages"]["per_hour"]]
    assert charts["active-users"]["series"] == [EXPECTED["active_users"]["per_day"]]
    assert charts["latency"]["series"] == [EXPECTED["latency"]["p50"], EXPECTED["latency"]["p99"]]
    assert charts["delivery"]["series"] == [[3, 1, 1]]
    assert charts["problems"]["series"] == [EXPECTED["filter_hits"], EXPECTED["errors"]]
    assert charts["commands"] == {"labels": ["help", "reset"], "series": [[3, 1]]}
    assert found["totals"] == ["6", "3", "2", "1"]

    assert found["words"].strip() == "违禁词" and "Saved 2 words" in found["words_saved"]
    assert site.words.read_text(encoding="utf-8") == "违禁词\n新词\n"
    assert "pending" in found["outbox"] and "回答" not in found["outbox"]  # contents are not shown there
    assert found["new_key"].startswith("r1a_") and "operator" in found["users"]
    assert "wx1" in found["conversations"] and "问题0" in found["conversation"] and "回答0" in found["conversation"]
    assert "conversation_viewed" in found["audit"] and "127.0.0.1" in found["audit"]
    assert "import" not in found["traversal"]
    assert found["console"] == []
    pngs = sorted(p.name for p in shots.glob("*.png"))
    assert pngs == sorted(f"{n}.png" for n in ("login", "analytics", "words", "outbox", "users", "conversations",
                                               "conversation", "audit", "traversal"))
    assert all((shots / p).stat().st_size > 5000 for p in pngs)
    shutil.rmtree(KEEP, ignore_errors=True)
    shutil.copytree(shots, KEEP)
