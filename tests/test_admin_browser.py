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
            wait.until(lambda d: _gone(button))
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


def seed_release(db, vault) -> int:
    """A release in shadow with answers of both variants and both evaluations, judged by the real rule."""
    from appliance.release.settings import ReleaseConfig
    from appliance.release import records, rule

    release = records.start(db, "candidate-int8", "http://127.0.0.1:8082", "", "/var/lib/r1box/int8", 0.05, 0.1,
                            False, "admin")
    for i in range(12):
        records.record_sample(db, vault, release.id, f"ref-{i}", "live", True, "local", 1.0 + i / 10, 0.3, "ok", None)
        records.record_sample(db, vault, release.id, f"ref-{i}", "candidate", False, "candidate-int8", 0.8 + i / 10,
                              0.2, "error" if i == 3 else "ok", None if i == 3 else f"影子回答{i}")
    for variant, passed in (("live", 6), ("candidate", 7)):
        records.record_eval(db, release.id, variant, variant, [
            {"id": f"item-{i}", "category": "hours", "passed": i < passed} for i in range(10)])
    figures = [records.figures(db, release.id, "live", True), records.figures(db, release.id, "candidate", True),
               records.figures(db, release.id, "candidate", False), records.shadowed_live(db, release.id)]
    decision = rule.decide("shadow", *figures, ReleaseConfig(shadow_min_samples=10))
    records.save_figures(db, release.id, {**decision.as_dict(), "proposed": "ab"})
    return release.id


def _gone(element) -> bool:
    """The element's page was replaced. Chrome says so as a stale reference, or, caught mid-navigation, as an
    inspector error ("Node with given id does not belong to the document")."""
    from selenium.common.exceptions import WebDriverException

    try:
        element.is_enabled()
    except WebDriverException:  # StaleElementReferenceException is one
        return True
    return False


def _walk_release(url: str, shots: Path) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as appears
    from selenium.webdriver.support.ui import WebDriverWait

    driver, found = _browser(), {}
    try:
        def click(button_id: str) -> str:
            """The form's POST answers with the page itself: wait until the new one has replaced the old whole."""
            button = driver.find_element(By.ID, button_id)
            button.click()
            wait = WebDriverWait(driver, 20)
            wait.until(lambda d: _gone(button))
            wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
            return wait.until(appears.presence_of_element_located((By.ID, "notice"))).text

        driver.get(url + "/login")
        driver.find_element(By.ID, "name").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        WebDriverWait(driver, 20).until(lambda d: d.current_url.endswith("/analytics"))
        driver.get(url + "/release")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
            "data-charts-ready") == "1")
        driver.save_screenshot(str(shots / "release.png"))
        found["phase"] = driver.find_element(By.ID, "phase").text
        found["decision"] = driver.find_element(By.ID, "decision").text
        found["variants"] = driver.find_element(By.CSS_SELECTOR, "#variants tbody").text
        found["checks"] = driver.find_element(By.CSS_SELECTOR, "#checks tbody").text
        found["chart"] = driver.execute_script("""
            const chart = Chart.getChart("release-chart");
            return chart.data.datasets.map((d) => [d.label, d.data]);""")
        found["to_ab"] = click("to-ab")
        found["phase_ab"] = driver.find_element(By.ID, "phase").text
        found["promoted"] = click("promote")
        found["after"] = driver.find_element(By.ID, "phase").text
        found["start_form"] = bool(driver.find_elements(By.ID, "start-release"))
        driver.save_screenshot(str(shots / "release-promoted.png"))
        found["console"] = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    return found


async def test_the_release_page_in_a_real_browser(site, tmp_path):
    release_id = await site.store.run(seed_release, site.store.vault)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    found = await asyncio.to_thread(_walk_release, site.url, shots)
    assert found["phase"].startswith("shadow") and "proposed: ab" in found["decision"]
    assert "live 12 0 0.0" in found["variants"] and "candidate" in found["variants"]
    assert "error_rate" in found["checks"]
    live_answers = next(data for label, data in found["chart"] if label == "live answers")
    assert sum(n or 0 for n in live_answers) == 12  # the served answers over time
    assert "ab" in found["to_ab"] and found["phase_ab"].startswith("ab")
    assert "promoted" in found["promoted"] and found["after"].startswith("promoted") and found["start_form"]
    assert found["console"] == []
    audit = [(r["operation"], r["user_id"]) for r in await site.audit_rows() if r["operation"].startswith("release")]
    assert audit == [("release_start", "admin"), ("release_ab", "admin"), ("release_promoted", "admin")]
    assert release_id == 1
    KEEP.mkdir(exist_ok=True)
    for png in ("release.png", "release-promoted.png"):
        shutil.copy(shots / png, KEEP / png)
