"""The dashboard in a real browser (headless Chromium) against the real appliance stack on loopback.

The stack (`open_stack`: Appliance.build, SQLite store, file backend, exports in memory) runs its event
loop in a thread of its own, so that Selenium's blocking calls do not stall the API. Boot events reach
the page the way they do in production: published on the domain's event bus with the fields the proxyDHCP
and TFTP services give them (copied from a lab boot's events.log), and real HTTP boot fetches (the iPXE
script, kernel, initrd) sent to the stack's own HTTP boot routes. Screenshots go to the test's folder.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.browser.chromium import chromium
from tests.integration.test_api_stack import INITRD, KERNEL, Stack, open_stack, uuid_n

T = TypeVar("T")
WAIT = 20.0  # s: the longest any one thing on the page may take to show


class LiveStack:
    """The appliance stack serving on 127.0.0.1 from a loop that runs in a thread; `run` calls into it."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dashboard-stack", daemon=True)
        self.opened = open_stack(tmp, exports="memory")
        self.stack: Stack | None = None

    def start(self) -> None:
        self.thread.start()
        self.stack = self.run(self.opened.__aenter__, within=60)
        for user in ("alice", "bob"):
            self.run(functools.partial(self.s.add_user, user))

    def stop(self) -> None:
        try:
            if self.stack is not None:
                self.run(functools.partial(self.opened.__aexit__, None, None, None), within=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()

    @property
    def s(self) -> Stack:
        assert self.stack is not None
        return self.stack

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.s.client.port}"

    def run(self, make: Callable[[], Coroutine[Any, Any, T]], within: float = WAIT) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(within)

    def publish(self, kind: str, data: dict[str, object]) -> None:
        """As the DHCP/TFTP services publish: on the loop, through the domain's event bus."""
        self.run(lambda: _publish(self.s, kind, data))


async def _publish(stack: Stack, kind: str, data: dict[str, object]) -> None:
    stack.domain.events.publish(kind, data)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveStack]:
    stack = LiveStack(tmp_path / "stack")
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


# --- the page -----------------------------------------------------------------------------------


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

    def login(self, url: str, token: str) -> None:
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


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    logs = tmp_path / "logs"
    logs.mkdir()
    print(f"browser test logs: {logs}")
    with chromium(tmp_path / "chromium-profile") as driver:
        yield Page(driver, logs)


def _offsets(cells: dict[str, tuple[str, str]], steps: list[str]) -> list[float]:
    return [float(cells[s][1].split()[0].lstrip("+")) for s in steps]


# The events of a pxelinux boot as the proxyDHCP and the TFTP server publish them (a lab boot's
# events.log): the loader fetches name no server (pxelinux.0 is anyone's); the node is known by its address.
def lab_boot(uuid: str, mac: str, ip: str) -> list[tuple[str, dict[str, object]]]:
    mac_file = "01-" + mac.replace(":", "-")
    return [
        ("dhcp", {"server": uuid, "mac": mac, "arch": 0, "file": "pxelinux.0", "client": "0.0.0.0", "reply": "offer",
                  "uuid": uuid}),
        ("tftp", {"server": None, "client": f"{ip}:26550", "file": "pxelinux.0", "bytes": 42430,
                  "duration_ms": 24.7, "outcome": "ok"}),
        ("tftp", {"server": None, "client": f"{ip}:49152", "file": "ldlinux.c32", "bytes": 119524,
                  "duration_ms": 27.1, "outcome": "ok"}),
        ("tftp", {"server": uuid, "client": f"{ip}:49153", "file": f"pxelinux.cfg/{mac_file}", "bytes": 750,
                  "duration_ms": 0.97, "outcome": "ok"}),
        ("tftp", {"server": uuid, "client": f"{ip}:49154", "file": "/templates/tiny/v1/vmlinuz", "bytes": 8247232,
                  "duration_ms": 1382.2, "outcome": "ok"}),
        ("tftp", {"server": uuid, "client": f"{ip}:49155", "file": "/templates/tiny/v1/initrd.img",
                  "bytes": 6190344, "duration_ms": 1008.6, "outcome": "ok"}),
    ]


STEPS_SEEN = ["dhcp", "loader", "config", "kernel", "initrd"]


def _panel_shown(page: Page, panel: str) -> bool:
    return bool(page.css(f"#panel-{panel} table")) or "not available" in page.text(f"#panel-{panel}")


def test_admin_creates_sees_boot_and_deletes(live: LiveStack, page: Page) -> None:
    s = live.s
    page.login(live.url, s.admin_token)
    # services, pools, templates, users: the admin's panels fill in
    page.wait("the services", lambda: page.css('#panel-services tr[data-service="tftp"]'))
    page.wait("the pool", lambda: "GB" in page.text("#panel-pools tbody"))
    page.wait("template tiny", lambda: "v1" in page.text('#panel-templates tr[data-template="tiny"]'))
    page.wait("users and quotas", lambda: page.css('#panel-users tr[data-user="alice"]'))
    page.wait("the event stream", lambda: "live" in page.text("#stream"))
    for panel in ("discovered", "audit"):  # an appliance without these routes says "not available"
        page.wait(f"the {panel} panel", functools.partial(_panel_shown, page, panel))

    # create a server from the page
    uuid = uuid_n(0xD1)
    page.one("#create-uuid").send_keys(uuid)
    page.one("#create-macs").send_keys("52:54:00:77:00:d1")
    page.click('#create-user option[value="alice"]')
    page.click("#create-server button[type=submit]")
    page.wait("the new server available", lambda: page.css(f'tr[data-server="{uuid}"][data-state="available"]'))
    row = page.text(f'tr[data-server="{uuid}"]')
    assert "alice" in row and "tiny@v1" in row and f"iqn.2026-11.io.cello:{uuid}" in row and "on" in row, row

    # its node boots: the timeline fills in live, step by step, timed from the first DHCP offer
    events = lab_boot(uuid, "52:54:00:77:00:d1", "10.77.0.120")
    live.publish(*events[0])
    page.wait("the DHCP step", lambda: "done" in page.steps(uuid).get("dhcp", ("", ""))[0])
    assert "waiting" in page.steps(uuid)["loader"][0]
    for kind, data in events[1:]:
        time.sleep(0.15)
        live.publish(kind, data)
    page.wait("kernel and initrd", lambda: all("done" in page.steps(uuid).get(st, ("", ""))[0]
                                               for st in STEPS_SEEN))
    cells = page.steps(uuid)
    offsets = _offsets(cells, STEPS_SEEN)
    assert offsets[0] == 0.0 and offsets == sorted(offsets) and offsets[-1] >= 0.6, cells
    assert "pxelinux.0" in cells["loader"][1] and "MiB" in cells["kernel"][1], cells
    assert "waiting" in cells["login"][0], cells

    # a second node boots over HTTP for real (iPXE script, kernel, initrd from the stack's HTTP boot)
    other = uuid_n(0xD2)
    status, body = live.run(lambda: s.create(other, "bob", address="127.0.0.1"))
    assert status == 202, body
    live.run(lambda: s.wait_state(other))
    live.publish("dhcp", {"server": other, "mac": "52:54:00:77:00:d2", "arch": 7, "file": "ipxe.efi",
                          "client": "0.0.0.0", "reply": "offer", "uuid": other})
    for path in (f"/boot/{other}.ipxe", f"/boot/files/{KERNEL}", f"/boot/files/{INITRD}"):
        time.sleep(0.15)
        with urllib.request.urlopen(live.url + path, timeout=10) as resp:
            assert resp.status == 200
    page.wait("the HTTP boot's steps", lambda: all("done" in page.steps(other).get(st, ("", ""))[0]
                                                   for st in ("dhcp", "config", "kernel", "initrd")))
    assert "http" in page.steps(other)["config"][1]
    page.wait("the event list", lambda: page.css('#event-list li[data-kind="http"]'))
    page.shot("admin-dashboard")

    # a service off and on again from the page
    page.click('button[data-action="service-tftp"]')
    page.wait("tftp disabled", lambda: "disabled" in page.text('tr[data-service="tftp"]'))
    assert live.run(lambda: s.req("GET", "/api/v1/services"))[1][1]["enabled"] is False
    page.click('button[data-action="service-tftp"]')
    page.wait("tftp enabled", lambda: "yes" in page.text('tr[data-service="tftp"]'))

    # delete it from the page (the button asks twice)
    page.click(f'button[data-action="delete-{uuid}"]')
    page.wait("the confirmation", lambda: "Really" in page.text(f'button[data-action="delete-{uuid}"]'))
    page.click(f'button[data-action="delete-{uuid}"]')
    page.wait("the server gone", lambda: not page.css(f'tr[data-server="{uuid}"]'))
    status, _ = live.run(lambda: s.req("GET", f"/api/v1/servers/{uuid}"))
    assert status == 404
    assert script_errors(page.console()) == []


def test_a_user_token_sees_only_its_own(live: LiveStack, page: Page) -> None:
    s = live.s
    mine, theirs = uuid_n(0xA1), uuid_n(0xB1)
    for uuid, user in ((mine, "alice"), (theirs, "bob")):
        status, body = live.run(functools.partial(s.create, uuid, user))
        assert status == 202, body
        live.run(functools.partial(s.wait_state, uuid))
    page.login(live.url, s.tokens["alice"])
    page.wait("alice's server", lambda: page.css(f'tr[data-server="{mine}"]'))
    for kind, data in lab_boot(theirs, "52:54:00:77:00:b1", "10.77.0.121") + lab_boot(
            mine, "52:54:00:77:00:a1", "10.77.0.122"):
        live.publish(kind, data)
    page.wait("alice's boot", lambda: "done" in page.steps(mine).get("kernel", ("", ""))[0])
    page.wait("alice's quota", lambda: page.css('#panel-users tr[data-user="alice"]'))
    page.shot("user-dashboard")
    assert "user token" in page.text("#role")
    assert not page.css(f'tr[data-server="{theirs}"]') and not page.css(f'tr[data-timeline="{theirs}"]')
    assert theirs not in page.d.page_source and "bob" not in page.text("#app-view")
    for panel in ("pools", "discovered", "audit"):  # admin routes: hidden, not broken
        assert not page.one(f"#panel-{panel}").is_displayed(), panel
    assert not page.css("#build-template") and not page.css('button[data-action^="service-"]')
    assert script_errors(page.console()) == []


def test_a_refused_token_stays_on_the_login(live: LiveStack, page: Page) -> None:
    page.d.get(live.url + "/")
    page.one("#token").send_keys("not-a-token")
    page.click("#login button[type=submit]")
    page.wait("the refusal", lambda: "refused" in page.text("#login-error"))
    assert not page.one("#app-view").is_displayed()
    assert page.d.execute_script("return sessionStorage.getItem('cello.token')") is None

