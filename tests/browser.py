"""A real headless Chromium for the web-page tests (Debian's chromium + chromium-driver, driven by
selenium). The README's test command installs both; without them these tests fail, never skip:
a skipped page test proves nothing."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The flags this machine needs: no sandbox as root, and no background traffic to Google's hosts
# (the network is closed; without them Chromium's refused connections pile up).
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900"]


@contextmanager
def chromium():
    """A selenium WebDriver on headless Chromium with the browser console log enabled
    (`console_errors(driver)` reads it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not shutil.which(CHROMIUM) or not shutil.which(CHROMEDRIVER):
        raise RuntimeError(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="dg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[str]:
    """The page's console messages at level SEVERE (errors and uncaught exceptions) so far."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
