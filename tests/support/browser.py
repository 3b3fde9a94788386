"""A real browser for the web UI tests: Debian's chromium, driven by Selenium through Debian's
chromium-driver (the same version as the browser). Missing either fails the test (scripts/setup.sh
installs both)."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "var" / "test-artifacts"


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError("Debian chromium and chromium-driver are needed: apt-get install chromium chromium-driver "
                           "(scripts/setup.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2400"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def screenshot(driver, name: str) -> Path:
    """Keep a screenshot as a test artefact (var/test-artifacts/<name>.png) and say where."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path
