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
from collections.abc import Callable
from pathlib import Path

import pytest

from bootfiles.spec import PxeClient
from domain.store import TemplateVersion
from iscsi.model import Session
from tests.browser.chromium import WAIT, Page, script_errors
from tests.browser.live import LiveStack
from tests.export_standin import InMemoryExports
from tests.integration.test_api_stack import INITRD, KERNEL, uuid_n

# --- the page -----------------------------------------------------------------------------------


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


def log_in_to_target(live: LiveStack, uuid: str, address: str) -> None:
    """The node's initramfs logs in: its target now has a session (the in-memory exports' `logged_in`
    is what tgtd's I_T nexus list is to the tgt driver)."""
    exports = live.s.driver
    assert isinstance(exports, InMemoryExports)
    iqn, initiator = live.s.servers.iqn(uuid), live.s.servers.initiator(uuid)
    live.loop.call_soon_threadsafe(exports.logged_in.__setitem__, iqn, [Session(initiator, address)])


def log_out_of_target(live: LiveStack, uuid: str) -> None:
    exports = live.s.driver
    assert isinstance(exports, InMemoryExports)
    live.loop.call_soon_threadsafe(exports.logged_in.pop, live.s.servers.iqn(uuid), None)


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

    # its initramfs logs in to its target: the page sees the session (through the diagnosis) and says why
    log_in_to_target(live, uuid, "10.77.0.120")
    page.wait("the iSCSI login", lambda: "done" in page.steps(uuid).get("login", ("", ""))[0], within=15)
    assert "node-" in page.steps(uuid)["login"][1]
    page.click(f'button[data-action="diagnose-{uuid}"]')
    page.wait("the diagnosis", lambda: page.css(f'#panel-diagnosis .diagnosis[data-server="{uuid}"]'))
    assert "logged in" in page.text("#panel-diagnosis"), page.text("#panel-diagnosis")

    # a second node boots over HTTP for real (iPXE script, kernel, initrd from the stack's HTTP boot)
    other = uuid_n(0xD2)
    status, body = live.run(lambda: s.create(other, "bob", address="127.0.0.1"))
    assert status == 202, body
    live.run(lambda: s.wait_state(other))
    live.publish("dhcp", {"server": other, "mac": "52:54:00:77:00:d2", "arch": 7, "file": "ipxe.efi",
                          "client": "0.0.0.0", "reply": "offer", "uuid": other})
    for path in (f"/boot/{other}.ipxe", f"/boot/files/{KERNEL}", f"/boot/files/{INITRD}"):
        time.sleep(0.15)
        with urllib.request.urlopen(live.url + path, timeout=10) as resp:  # read whole, as iPXE does
            assert resp.status == 200 and resp.read()
    page.wait("the HTTP boot's steps", lambda: all("done" in page.steps(other).get(st, ("", ""))[0]
                                                   for st in ("dhcp", "config", "kernel", "initrd")))
    http = page.steps(other)
    assert "http" in http["config"][1] and "293.0 KiB" in http["kernel"][1] and "120.6 KiB" in http["initrd"][1], http
    page.wait("the event list", lambda: page.css('#event-list li[data-kind="http"]'))
    page.shot("admin-dashboard")

    # a service off and on again from the page
    page.click('button[data-action="service-tftp"]')
    page.wait("tftp disabled", lambda: "disabled" in page.text('tr[data-service="tftp"]'))
    assert live.run(lambda: s.req("GET", "/api/v1/services"))[1][1]["enabled"] is False
    page.click('button[data-action="service-tftp"]')
    page.wait("tftp enabled", lambda: "yes" in page.text('tr[data-service="tftp"]'))

    # delete it from the page (the button asks twice; the node logged out first)
    log_out_of_target(live, uuid)
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
    # an admin's page first, then logged out: nothing of it may stay for alice's token
    page.login(live.url, s.admin_token)
    page.wait("bob's server for the admin", lambda: page.css(f'tr[data-server="{theirs}"]'))
    page.click("#logout")
    page.wait("the login form again", lambda: page.one("#login-view").is_displayed())
    assert page.d.execute_script("return sessionStorage.getItem('cello.token')") is None
    page.login(live.url, s.tokens["alice"], load=False)
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
    assert not page.css("#create-user")  # a user token creates servers for itself only
    assert script_errors(page.console()) == []


def test_a_refused_token_stays_on_the_login(live: LiveStack, page: Page) -> None:
    page.d.get(live.url + "/")
    page.one("#token").send_keys("not-a-token")
    page.click("#login button[type=submit]")
    page.wait("the refusal", lambda: "refused" in page.text("#login-error"))
    assert not page.one("#app-view").is_displayed()
    assert page.d.execute_script("return sessionStorage.getItem('cello.token')") is None


def test_adopt_a_discovered_node(live: LiveStack, page: Page) -> None:
    s = live.s
    mac, uuid = "52:54:00:77:00:e7", uuid_n(0xE7)
    page.login(live.url, s.admin_token)
    page.wait("the discovered panel", lambda: "no unknown PXE client" in page.text("#panel-discovered"))
    # an unknown PXE client asks for a boot: the proxyDHCP records it (as its policy does for a stranger)
    client = PxeClient(mac=mac, uuid=uuid, arch=7, vendor_class="PXEClient:Arch:00007:UNDI:003016",
                       user_class="", address=None)
    live.loop.call_soon_threadsafe(lambda: s.domain.discovered.seen(client))
    page.wait("the discovered node", lambda: page.css(f'#panel-discovered tr[data-mac="{mac}"]'))
    row = page.text(f'#panel-discovered tr[data-mac="{mac}"]')
    assert uuid in row and "7" in row, row
    page.click(f'#panel-discovered tr[data-mac="{mac}"] option[value="bob"]')
    page.click(f'button[data-action="adopt-{mac}"]')
    page.wait("the adopted server", lambda: page.css(f'tr[data-server="{uuid}"][data-state="available"]'))
    assert "bob" in page.text(f'tr[data-server="{uuid}"]')
    page.wait("the node leaving the discovered list", lambda: not page.css(f'#panel-discovered tr[data-mac="{mac}"]'))
    assert script_errors(page.console()) == []


def test_a_template_build_shows_its_progress_live(live: LiveStack, page: Page) -> None:
    s = live.s
    release = threading.Event()

    async def builder(name: str, version: str, source: str, progress: Callable[[str], None]) -> TemplateVersion:
        # a stand-in for images.build (test_template_build runs the real one): it waits for the test
        progress(f"build {name} {version} from {source}")
        progress("rootfs: busybox root with the Cello marker init and iscsid")
        await s.backend.create_template(name, 1 << 20)
        await asyncio.to_thread(release.wait, WAIT)
        await s.backend.snapshot_template(name, version)
        progress(f"snapshot: {name}-template@{version}")
        return TemplateVersion(name, version, source, 1 << 20, KERNEL, INITRD, time.time())

    live.loop.call_soon_threadsafe(s.use_builder, builder)
    page.login(live.url, s.admin_token)
    name = page.one("#build-name")
    name.clear()
    name.send_keys("mini")
    page.click("#build-template button[type=submit]")
    page.wait("the running build", lambda: "rootfs: busybox" in page.text('.build[data-state="running"]'))
    assert "mini" in page.text('.build[data-state="running"]') and page.css(".build progress")
    release.set()
    page.wait("the finished build", lambda: "built mini@v1" in page.text('.build[data-state="done"]'))
    page.wait("the new template", lambda: "v1" in page.text('tr[data-template="mini"]'))
    assert script_errors(page.console()) == []


DATA = Path(__file__).parent / "data"
LAB_NODE = "3f1c2b4e-0000-4000-8000-0000000000e1"


def test_the_timeline_of_a_captured_lab_boot(live: LiveStack, page: Page) -> None:
    """The page's timeline module (web/static/timeline.js, pure) over a lab run's events.log: a pxelinux
    boot of node e1 from 10.77.0.120, then a stranger at 10.77.0.66 asking for e1's configs (refused)
    and for pxelinux.0. The loader fetches name no server; the stranger's refusals change nothing."""
    lines = (DATA / "lab-boot-events.jsonl").read_text().splitlines()
    page.d.get(live.url + "/")
    got = page.d.execute_async_script("""
        const [lines, uuid, done] = arguments;
        import("/ui/timeline.js").then((m) => {
          const t = new m.Timelines();
          for (const line of lines) t.add(JSON.parse(line));
          const boot = t.get(uuid);
          done({ reached: boot.reached, servers: t.all().map((b) => b.server), steps: Object.fromEntries(
            Object.entries(boot.steps).map(([k, v]) => [k, [m.offset(boot, k), v.ok, v.detail]])) });
        }).catch((e) => done(String(e)));""", lines, LAB_NODE)
    assert isinstance(got, dict), got
    assert got["servers"] == [LAB_NODE]
    steps = got["steps"]
    assert {k: v[0] for k, v in steps.items()} == {
        "dhcp": "+0.0 s", "loader": "+3.6 s", "config": "+3.7 s", "kernel": "+5.1 s", "initrd": "+6.1 s"}, steps
    assert all(ok for _, ok, _ in steps.values()), steps
    assert "pxelinux.0" in steps["loader"][2] and "01-52-54-00-77-00-e1" in steps["config"][2], steps
    assert got["reached"] == 4  # initrd: the login is asked of the target, not in the events


# Every control of the page that writes (each a 403 "read-only token" for a token of scope read).
WRITE_CONTROLS = {
    "the services' Disable/Enable": 'button[data-action^="service-"]',
    "the appliances' Disable/Enable": "#panel-appliances button",
    "the create-server form": "#create-server",
    "a server's Delete": 'button[data-action^="delete-"]',
    "the template build form": "#build-template",
    "a discovered node's Adopt": 'button[data-action^="adopt-"]',
}


@pytest.mark.parametrize("scope", ["read", "full"])
def test_a_read_only_admin_token_sees_all_and_no_write_control(live: LiveStack, page: Page, scope: str) -> None:
    s = live.s
    uuid, mac = uuid_n(0xC1), "52:54:00:77:00:c7"
    status, body = live.run(functools.partial(s.create, uuid, "alice"))
    assert status == 202, body
    live.run(functools.partial(s.wait_state, uuid))
    client = PxeClient(mac=mac, uuid=uuid_n(0xC7), arch=7, vendor_class="PXEClient", user_class="", address=None)
    live.loop.call_soon_threadsafe(lambda: s.domain.discovered.seen(client))
    status, made = live.run(lambda: s.req("POST", "/api/v1/admin/tokens", json={"scope": scope}))
    assert status == 201, made
    page.login(live.url, made["token"])
    # the read path: every panel lists what it lists for any admin
    page.wait("the services", lambda: page.css('#panel-services tr[data-service="tftp"]'))
    page.wait("the appliance", lambda: page.css("#panel-appliances tr[data-appliance]"))
    page.wait("alice's server", lambda: page.css(f'tr[data-server="{uuid}"][data-state="available"]'))
    page.wait("template tiny", lambda: "v1" in page.text('#panel-templates tr[data-template="tiny"]'))
    page.wait("the discovered node", lambda: page.css(f'#panel-discovered tr[data-mac="{mac}"]'))
    page.wait("users and quotas", lambda: page.css('#panel-users tr[data-user="alice"]'))
    assert page.css(f'button[data-action="diagnose-{uuid}"]')  # a diagnosis only reads
    shown = {what: bool(page.css(css)) for what, css in WRITE_CONTROLS.items()}
    page.shot(f"admin-{scope}-token")
    if scope == "read":
        assert not any(shown.values()), shown
        assert page.text("#role") == "admin token (read-only)"
        # where the Adopt form would be, what it would act on: this node is not adopted yet
        assert page.text(f'#panel-discovered tr[data-mac="{mac}"] td:last-child') == "not adopted"
    else:
        assert all(shown.values()), shown
        assert page.text("#role") == "admin token"
    assert script_errors(page.console()) == []


def test_a_read_only_user_token_sees_its_servers_and_no_write_control(live: LiveStack, page: Page) -> None:
    s = live.s
    uuid = uuid_n(0xA2)
    status, body = live.run(functools.partial(s.create, uuid, "alice"))
    assert status == 202, body
    live.run(functools.partial(s.wait_state, uuid))
    status, made = live.run(lambda: s.req("POST", "/api/v1/users/alice/tokens", json={"scope": "read"}))
    assert status == 201, made
    page.login(live.url, made["token"])
    page.wait("alice's server", lambda: page.css(f'tr[data-server="{uuid}"][data-state="available"]'))
    page.wait("the services", lambda: page.css('#panel-services tr[data-service="tftp"]'))
    assert page.text("#role") == "user token (read-only)"
    assert page.css(f'button[data-action="diagnose-{uuid}"]')
    assert not page.css("#create-server") and not page.css('button[data-action^="delete-"]')
    assert script_errors(page.console()) == []
