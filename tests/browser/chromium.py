"""Headless Chromium driven by Selenium for the browser tests: Debian's `chromium` and `chromium-driver`
(installed by scripts/setup.sh; Selenium's own driver download is never used).

The flags keep Chromium off the network: without the background-networking ones it opens connections
of its own (updates, sync, field trials), which a closed network refuses.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tools import require

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--window-size=1600,1300")


def require_chromium() -> None:
    require("chromium", "chromedriver", packages="chromium chromium-driver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium not installed: run scripts/setup.sh (pip install -e '.[test]')", pytrace=False)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[object]:
    """A fresh headless Chromium (its own profile folder), quit on the way out."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver") or CHROMEDRIVER, log_output=str(profile) + ".log")
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
