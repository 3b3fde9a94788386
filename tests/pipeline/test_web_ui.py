"""The operations UI in a real browser (Debian chromium through Selenium) against the whole local
stack with real jobs: one reported back to the PACS with its prior, one failed. Assertions are on
what the pages show; screenshots are kept under var/test-artifacts/."""

from __future__ import annotations

import time

import pytest
from selenium.webdriver.common.by import By
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.support.ui import WebDriverWait

from dicom_node.local_stack.scenario import acquire, seed_pacs, wait_for_report, write_history
from dicom_node.local_stack.stack import LocalStack, Ports
from tests.support.browser import chromium, screenshot
from tests.support.pipeline import jobs_of, poison_study, send_to_node
from tests.support.waiting import wait_until

TOKEN = "web-ui-test-token-0123456789abcdef"


@pytest.fixture
def stack(tmp_path):
    token_file = tmp_path / "http-token"
    token_file.write_text(TOKEN + "\n")
    stack = LocalStack(tmp_path / "stack", Ports.free(), extra_env={
        "DICOM_NODE_HTTP_TOKEN_FILE": str(token_file), "DICOM_NODE_TASK_MAX_RETRIES": "1"})
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture
def browser():
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def texts(driver, css: str) -> list[str]:
    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, css)]


def test_operator_sees_jobs_priors_overlay_failures_and_retries(stack, browser, tmp_path):
    scenario = write_history(tmp_path / "data", "new_nodule", size=512)
    seed_pacs(stack.orthanc, scenario)
    acquire(stack.orthanc, scenario)
    poison_uid, poison = poison_study(tmp_path / "in", 7)
    send_to_node(stack, poison)
    sr = wait_for_report(stack.orthanc, scenario.current_study_uid, timeout=150)
    good = wait_until(lambda: [j for j in jobs_of(stack, scenario.current_study_uid) if j.state == "done"],
                      timeout=60, what="the reported job to finish")[0]
    failed = wait_until(lambda: [j for j in jobs_of(stack, poison_uid) if j.state == "failed"],
                        timeout=90, what="the poison job to fail")[0]
    base = f"http://127.0.0.1:{stack.ports.http}"

    # Not logged in: the browser is sent to the login form; a wrong token is refused.
    browser.get(base + "/")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys("not-the-token-at-all")
    browser.find_element(By.ID, "login").click()  # returns before the answer page is loaded: wait for it
    error = WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.ID, "login-error"))[0]
    assert "not the one configured" in error.text
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()

    # Dashboard: what was received, jobs by state, queues, latencies, the failure and its reason.
    WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda b: [h for h in b.find_elements(By.TAG_NAME, "h1") if h.text == "Dashboard"])
    assert int(browser.find_element(By.ID, "instances").text) >= 2  # the current study and the poison one, plus priors
    assert int(browser.find_element(By.ID, "studies").text) >= 3
    assert browser.find_element(By.ID, "jobs-failed").text == "1"
    assert browser.find_element(By.ID, "jobs-done").text == "1"
    assert browser.find_element(By.ID, "queue-io").text == "0" and browser.find_element(By.ID, "queue-gpu").text == "0"
    latency = browser.find_element(By.ID, "latency").text
    assert "compare" in latency and " s" in latency
    failures = browser.find_element(By.ID, "failures").text
    assert failed.job_key[:12] in failures and "PixelSpacing" in failures
    screenshot(browser, "web-ui-dashboard")

    # Jobs list: both jobs, each with its stage timeline; the failed one shows where it failed.
    browser.get(base + "/jobs")
    rows = {row.get_attribute("data-job"): row for row in browser.find_elements(By.CSS_SELECTOR, "tr.job")}
    assert {good.job_key, failed.job_key} <= set(rows)
    done_steps = [step.text for step in rows[good.job_key].find_elements(By.CSS_SELECTOR, ".step.done")]
    assert [step.split()[0] for step in done_steps] == ["priors", "compare", "report", "deliver", "notify"]
    assert all(step.endswith(" s") for step in done_steps)  # each with its duration
    assert [s.text for s in rows[failed.job_key].find_elements(By.CSS_SELECTOR, ".step.failed")] == ["compare failed"]

    # The reported job: the prior chosen and why the others were not, the overlay, findings,
    # delivery to the PACS, the audit rows.
    browser.get(f"{base}/jobs/{good.job_key}")
    assert browser.find_element(By.ID, "job-state").text == "done"
    chosen = texts(browser, "#priors tr.chosen")
    assert len(chosen) == 1 and scenario.expected_prior_uid in chosen[0] and "20251118" in chosen[0]
    dropped = " ".join(texts(browser, "#candidates tr.dropped"))
    assert "view differs" in dropped  # the newer lateral study
    overlay = browser.find_element(By.ID, "overlay")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0
    changes = texts(browser, "#finding-rows td.change")
    assert scenario.expected_status in changes, changes
    # The trend: the finding at each time point, the prior's date (absent then) and the current one's size.
    row = [r for r in browser.find_elements(By.CSS_SELECTOR, "#finding-rows tr.finding")
           if r.find_element(By.CSS_SELECTOR, "td.change").text == scenario.expected_status][0]
    points = row.find_element(By.CSS_SELECTOR, "td.timepoints").text.splitlines()
    assert points[0] == "2025-11-18: absent" and points[-1].startswith("2026-11-20: ") and points[-1].endswith(" mm"), points
    assert row.find_element(By.CSS_SELECTOR, "td.trend").text not in ("", "-")
    assert sr.SOPInstanceUID in browser.find_element(By.ID, "findings").text
    assert "accepted" in texts(browser, "#delivery td.delivery-status") or "committed" in texts(browser, "#delivery td.delivery-status")
    audit = browser.find_element(By.ID, "audit").text
    assert "report_sent" in audit and "archive_query" in audit and "image_read" in audit
    browser.refresh()  # showing the page was itself audited (the row is written once it was shown)
    assert "operator_view" in browser.find_element(By.ID, "audit").text
    assert "QS-0001" not in browser.page_source.split('id="audit"')[1]  # patients only as pseudonyms
    assert not browser.find_elements(By.ID, "retry")  # a done job offers no retry
    screenshot(browser, "web-ui-job")

    # The failed job: its reason, and Retry runs it again from the first stage.
    browser.get(f"{base}/jobs/{failed.job_key}")
    assert "PixelSpacing" in browser.find_element(By.ID, "last-error").text
    clicked = time.time()
    browser.find_element(By.ID, "retry").click()
    # The POST redirects back to the job page: wait for that page, not the one the click left.
    retried = WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.ID, "retried"))
    assert "Queued again" in retried[0].text
    wait_until(lambda: [j for j in jobs_of(stack, poison_uid) if j.timings.get("priors", {}).get("started", 0) > clicked],
               timeout=60, what="the retried job's priors stage to run again")
    screenshot(browser, "web-ui-retried")
