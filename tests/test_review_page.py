"""The review page (/ui/) in a real browser: Debian's Chromium and chromium-driver, driven by
selenium, headless and offline. Load the page with anomalies present (behind the token), click
"normal" on a group, see later records of that group unflagged; undo; forms from elsewhere refused."""

from __future__ import annotations

import json
import shutil
import urllib.parse

import pytest

from .sidecar_process import SidecarProcess, http_request, models_dir_with
from .test_feedback import attacks_on, compare_lines, monitor_lines
from .generate import shop_lines

TOKEN = "s3cret-review-token"


def browser(profile):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) drives the browser")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", "--window-size=1280,1800"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def shown(chrome, element_id: str, timeout: float = 10):
    """The element once the page showing it has loaded (a click on a form button navigates)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(chrome, timeout).until(expected_conditions.presence_of_element_located((By.ID, element_id)))


def score(sidecar, lines) -> list[dict]:
    status, body = sidecar.http_post("/v1/score", {"records": lines}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    return body["results"]


def test_review_page_groups_anomalies_and_its_normal_button_unflags_later_records(tmp_path, shop_model_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    sidecar = SidecarProcess(models_dir_with(tmp_path, shop_model_path, "shop"), tmp_path, token_file=str(token_file),
                             feedback_poll_s="0.2").start()
    chrome = browser(tmp_path / "chrome")
    base = f"http://127.0.0.1:{sidecar.http_port}"
    try:
        attacks = attacks_on(compare_lines(8, seed=31), seed=32)
        score(sidecar, shop_lines(300, seed=30) + compare_lines(12, seed=33) + attacks + monitor_lines(4, seed=34))

        chrome.get(f"{base}/ui/")
        assert "asks for its token" in chrome.page_source  # the page is behind the token
        chrome.find_element(By.NAME, "token").send_keys(TOKEN)
        chrome.find_element(By.TAG_NAME, "form").submit()
        shown(chrome, "feedback-list")
        groups = chrome.find_elements(By.CSS_SELECTOR, "div.group")
        assert len(groups) >= 3, chrome.page_source[:2000]
        chrome.save_screenshot(str(tmp_path / "1-groups.png"))

        compare = next(g for g in groups if "shape with=9" in g.text)
        assert compare.text.split()[0] == "12"  # the count: the twelve requests to the new page, no attack
        group_id = compare.get_attribute("data-group")
        attack_groups = [g for g in groups if g.get_attribute("data-group") != group_id and "compare" in g.text]
        assert sum(int(g.text.split()[0]) for g in attack_groups) == len(attacks)
        compare.find_element(By.NAME, "reason").send_keys("the new compare page")
        compare.find_element(By.CSS_SELECTOR, "button.normal").click()
        message = shown(chrome, "message").text
        assert message == f"Group {group_id} marked normal: feedback #1", message
        row = chrome.find_element(By.ID, "feedback-1").text
        assert "normal" in row and "the new compare page" in row and "review page" in row
        chrome.save_screenshot(str(tmp_path / "2-marked.png"))
        # The button again (a second click, another operator): the entry already made, no second one.
        cookie = f"logscore_token={urllib.parse.quote(TOKEN)}"
        form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie}
        body = urllib.parse.urlencode({"group": group_id, "verdict": "normal"}).encode()
        status, page = http_request(sidecar.http_port, "POST", "/ui/feedback", body, form)  # follows the redirect
        assert status == 200 and f"Group {group_id} was already marked normal: feedback #1 by review page" in (
            page.decode()) and 'id="feedback-2"' not in page.decode()
        # A link cannot make the page say what it likes (such as where to paste the token).
        chrome.get(f"{base}/ui/?message=Paste+the+token+at+evil.example&note=made-up")
        assert "evil.example" not in chrome.page_source and not chrome.find_elements(By.ID, "message")

        later = score(sidecar, compare_lines(10, seed=35))
        assert not any(r["is_anomaly"] for r in later)
        assert all(r["notes"] == ["suppressed by feedback #1"] for r in later)
        assert sum(r["is_anomaly"] for r in score(sidecar, attacks_on(compare_lines(10, seed=36), seed=37))) >= 9

        chrome.get(f"{base}/ui/")
        compare = chrome.find_element(By.ID, group_id)
        assert "marked normal #1" in compare.text and "10 suppressed" in compare.text
        chrome.save_screenshot(str(tmp_path / "3-after.png"))

        chrome.find_element(By.CSS_SELECTOR, "#feedback-1 button").click()
        WebDriverWait(chrome, 10).until(expected_conditions.text_to_be_present_in_element(
            (By.ID, "message"), "Feedback #1 undone"))  # the old page's message goes with the old page
        assert all(r["is_anomaly"] for r in score(sidecar, compare_lines(5, seed=38)))

        # A form posted from another site is refused, even carrying the cookie.
        status, answer = http_request(sidecar.http_port, "POST", "/ui/feedback", body,
                                      {**form, "Origin": "http://evil.example"})
        assert status == 401 and "may not change feedback here" in json.loads(answer)["error"]
        status, _ = http_request(sidecar.http_port, "GET", "/ui/", headers={"Cookie": "logscore_token=wrong"})
        assert status == 401
    finally:
        chrome.quit()
        assert sidecar.stop() == 0
