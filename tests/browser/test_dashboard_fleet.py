"""The dashboard's view of a fleet: three appliances on one PostgreSQL in one process
(tests/integration/test_fleet.py's `fleet_of_three`), served from a loop in a thread as the other
browser tests serve one stack, and the page logged in to appliance a."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.chromium import Page, script_errors
from tests.browser.live import LiveLoop, LiveStack
from tests.integration.test_api_stack import Stack, uuid_n
from tests.integration.test_fleet import CAPACITY_GB, fleet_of_three
from tests.pgserver import PgServer


class LiveFleet(LiveLoop):
    def __init__(self, tmp: Path, pg: PgServer) -> None:
        super().__init__("dashboard-fleet")
        self.opened = fleet_of_three(tmp, pg)
        self.stacks: dict[str, Stack] = {}

    def start(self) -> None:
        self.start_loop()
        self.stacks = self.run(self.opened.__aenter__, within=90)

    def stop(self) -> None:
        try:
            if self.stacks:
                self.run(functools.partial(self.opened.__aexit__, None, None, None), within=60)
        finally:
            self.close_loop()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.stacks[name].client.port}"


@pytest.fixture
def fleet(tmp_path: Path, pg_server: PgServer) -> Iterator[LiveFleet]:
    live = LiveFleet(tmp_path / "fleet", pg_server)
    live.start()
    try:
        yield live
    finally:
        live.stop()


def _row(name: str) -> str:
    return f'#panel-appliances tr[data-appliance="{name}"]'


def _appliance_cell(page: Page, uuid: str) -> str:
    # the servers table's third column: the server's appliance
    return str(page.d.execute_script(
        "const c = document.querySelector(`tr[data-server='${arguments[0]}'] td:nth-child(3)`);"
        "return c ? c.innerText : '';", uuid))


def test_the_fleet_on_the_dashboard(fleet: LiveFleet, page: Page) -> None:
    a, b = fleet.stacks["a"], fleet.stacks["b"]
    page.login(fleet.url("a"), a.admin_token)
    for name, gb in CAPACITY_GB.items():
        page.wait(f"appliance {name} up", lambda n=name: page.css(f'{_row(n)}[data-state="up"]'))  # type: ignore[misc]
        assert f"/ {gb}.0 GiB" in page.text(_row(name)), page.text(_row(name))
    # b and c hold the template once it is replicated from a (the row says so)
    for name in ("b", "c"):
        page.wait(f"tiny@v1 on {name}", lambda n=name: "tiny@v1" in page.text(_row(n)), within=60)  # type: ignore[misc]
    assert not page.css("#panel-appliances table.single")

    # one server on each appliance: the servers table names where each one is
    made = {name: uuid_n(0xF0 + i) for i, name in enumerate(CAPACITY_GB)}
    for name, uuid in made.items():
        status, body = fleet.run(functools.partial(a.create, uuid, appliance=name))
        assert status == 202 and body["appliance"] == name, body
        fleet.run(functools.partial(fleet.stacks[name].wait_state, uuid, within=30))
    for name, uuid in made.items():
        page.wait(f"server {uuid} on {name}", lambda u=uuid, n=name: _appliance_cell(page, u) == n)  # type: ignore[misc]
    page.wait("one server on c", lambda: page.text(f"{_row('c')} td:nth-child(3)") == "1")

    # c disabled from the page: it asks for the reason, the row shows it, the API refuses a create pinned there
    page.click('button[data-action="disable-c"]')
    prompt = page.wait("the reason asked", lambda: page.d.switch_to.alert)
    prompt.send_keys("disk swap, back at noon")
    prompt.accept()
    page.wait("c disabled", lambda: page.css(f'{_row("c")}[data-state="disabled"]'))
    assert "disk swap, back at noon" in page.text(_row("c"))
    status, body = fleet.run(functools.partial(a.create, uuid_n(0xFA), appliance="c"))
    assert status == 409 and "disk swap" in body["detail"], body
    page.wait("the enable button", lambda: page.css('button[data-action="enable-c"]'))

    # b's fleet loop stops (no more heartbeats): down once its down_after_s has passed
    fleet.run(b.domain.fleet.stop)
    page.wait("b down", lambda: page.css(f'{_row("b")}[data-state="down"]'), within=15)
    page.shot("fleet-dashboard")

    page.click('button[data-action="enable-c"]')
    page.wait("c up again", lambda: page.css(f'{_row("c")}[data-state="up"]'))
    assert "disk swap" not in page.text(_row("c"))
    assert script_errors(page.console()) == []


def _asked_for_appliances(page: Page) -> bool:
    return bool(page.d.execute_script(
        "return performance.getEntriesByType('resource').some(e => e.name.includes('/api/v1/appliances'))"))


def test_a_fleet_of_one_is_one_small_row(live: LiveStack, page: Page) -> None:
    page.login(live.url, live.s.admin_token)
    page.wait("the one appliance", lambda: page.css("#panel-appliances table.single tr[data-appliance]"))
    assert len(page.css("#panel-appliances tr[data-appliance]")) == 1
    assert page.css('#panel-appliances button[data-action^="disable-"]')
    assert script_errors(page.console()) == []


def test_a_user_token_has_no_appliances_panel(live: LiveStack, page: Page) -> None:
    page.login(live.url, live.s.tokens["alice"])
    page.wait("the servers panel", lambda: page.css("#panel-servers table"))
    time.sleep(5.5)  # a whole refresh round: the user's page never asks (the route would say 403)
    assert not page.one("#panel-appliances").is_displayed()
    assert not page.css('button[data-action^="disable-"]') and not page.css('button[data-action^="enable-"]')
    assert not _asked_for_appliances(page)
    assert script_errors(page.console()) == []


def test_a_read_only_admin_token_sees_a_disabled_appliance_and_no_switch(live: LiveStack, page: Page) -> None:
    s = live.s
    status, appliances = live.run(lambda: s.req("GET", "/api/v1/appliances"))
    assert status == 200 and len(appliances) == 1, appliances
    name = appliances[0]["name"]
    status, body = live.run(lambda: s.req("POST", f"/api/v1/appliances/{name}/disable", json={"reason": "disk swap"}))
    assert status == 200, body
    status, made = live.run(lambda: s.req("POST", "/api/v1/admin/tokens", json={"scope": "read"}))
    assert status == 201, made
    page.login(live.url, made["token"])
    page.wait("the disabled appliance", lambda: "disk swap" in page.text(_row(name)))
    assert not page.css('button[data-action^="enable-"]') and not page.css('button[data-action^="disable-"]')
    assert script_errors(page.console()) == []
