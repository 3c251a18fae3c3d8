"""Headless Chromium driven by Selenium, and the dashboard page as the browser tests see it.

Debian's `chromium` and `chromium-driver` (installed by scripts/setup.sh; Selenium's own driver
download is never used). The flags keep Chromium off the network: without the background-networking
ones it opens connections of its own (updates, sync, field trials), which a closed network refuses.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.tools import require

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 20.0  # s: the longest any one thing on the page may take to show
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
def chromium(profile: Path, *flags: str) -> Iterator[object]:
    """A fresh headless Chromium (its own profile folder, `flags` added), quit on the way out."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in (*FLAGS, *flags, f"--user-data-dir={profile}"):
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


class Page:
    def __init__(self, driver: Any, logs: Path) -> None:
        self.d = driver
        self.logs = logs

    def wait(self, what: str, check: Callable[[], Any], within: float = WAIT) -> Any:
        deadline = time.monotonic() + within
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except Exception as e:  # an element replaced under us: the page re-rendered; ask again
                last = e
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.1)
        self.shot(f"timeout-{what.replace(' ', '-')[:40]}")
        raise AssertionError(f"{what}: not seen within {within} s (last: {last!r}); browser log: {self.console()}")

    def css(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.d.find_elements(By.CSS_SELECTOR, selector))

    def one(self, selector: str) -> Any:
        return self.wait(selector, lambda: (self.css(selector) or [None])[0])

    def text(self, selector: str) -> str:
        # read in one script: the page redraws its lists every few seconds, under any element held here
        return str(self.d.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText).join(' ')", selector))

    def click(self, selector: str) -> None:
        from selenium.common.exceptions import StaleElementReferenceException

        def once() -> bool:
            try:
                self.one(selector).click()
            except StaleElementReferenceException:
                return False
            return True

        self.wait(f"a click on {selector}", once)

    def steps(self, uuid: str) -> dict[str, tuple[str, str]]:
        """A timeline row's cells: step -> (class, text)."""
        cells = self.d.execute_script(
            "return Array.from(document.querySelectorAll(`tr[data-timeline='${arguments[0]}'] td[data-step]`))"
            ".map(c => [c.dataset.step, c.className, c.innerText])", uuid)
        return {step: (cls, text) for step, cls, text in cells}

    def login(self, url: str, token: str, *, load: bool = True) -> None:
        if load:
            self.d.get(url + "/")
        field = self.one("#token")
        field.send_keys(token)
        self.click("#login button[type=submit]")
        self.wait("the app view", lambda: self.one("#app-view").is_displayed())

    def shot(self, name: str) -> Path:
        path = self.logs / f"{name}.png"
        self.d.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path

    def console(self) -> list[str]:
        return [f"{e['level']} {e['message']}" for e in self.d.get_log("browser")]


def script_errors(lines: list[str]) -> list[str]:
    """The browser's own errors, less the refusals the page expects (403 of admin routes for a user
    token, 404 of routes this appliance does not serve yet)."""
    return [line for line in lines if line.startswith("SEVERE")
            and "Failed to load resource: the server responded with a status of 40" not in line]
