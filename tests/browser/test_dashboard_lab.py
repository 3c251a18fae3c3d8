"""A qemu node's live boot in the dashboard's timeline (system tier: root, the netboot lab of tests/system).

`cello serve` runs in the lab's `cel-cello` namespace with its proxyDHCP, TFTP and tgtd; dnsmasq is the
site DHCP; a qemu node (TCG, iPXE ROM, pxelinux) boots from its own clone. Chromium and chromedriver run
inside `cel-cello` too (started from a thread that entered it with setns(2), as the lab reaches its API),
so the browser reaches the API at 10.77.0.2:8080 and nothing of the lab leaks into the host's namespace.
The page must show every step, timed, from the real events, and the node's iSCSI login (its session on
tgtd, through the diagnosis), while the node's console says it runs from its clone.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.browser.chromium import Page, chromium, require_chromium, script_errors
from tests.system import conftest as system_tier
from tests.system.lab import ADMIN_TOKEN, API, NS_CELLO, Lab, LabError, enter_netns

pytestmark = pytest.mark.system
lab = system_tier.lab  # the system tier's lab (namespaces, site DHCP, `cello serve`); its logs kept on a failure

NODE = ("dash", "3f1c2b4e-0000-4000-8000-0000000000da", "52:54:00:77:00:da")
BOOT_TIMEOUT = 120.0  # TCG: ~20-40 s for one node on 2 cores, more while other work runs
STEPS = ["dhcp", "loader", "config", "kernel", "initrd", "login"]


def api_ok(lab: Lab, method: str, path: str, body: object | None = None, status: int = 200) -> object:
    got, out = lab.api(method, path, body, timeout=60)
    assert got == status, f"{method} {path}: {got} {out}"
    return out


def build_tiny(lab: Lab, within: float = 240) -> None:
    job = api_ok(lab, "POST", "/api/v1/templates/tiny/builds", {"source": "tiny"}, status=202)
    assert isinstance(job, dict)
    deadline = time.monotonic() + within
    while True:
        state = api_ok(lab, "GET", f"/api/v1/templates/builds/{job['id']}")
        assert isinstance(state, dict)
        if state["state"] != "running":
            assert state["state"] == "done", state
            return
        assert time.monotonic() < deadline, f"the build of tiny is still running after {within:.0f} s"
        time.sleep(0.5)


def test_a_qemu_boot_fills_the_timeline_live(lab: Lab, tmp_path: Path) -> None:
    require_chromium()
    shots = tmp_path / "logs"
    shots.mkdir()
    print(f"\nbrowser test logs: {shots}")
    browser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dashboard-browser",
                                 initializer=enter_netns, initargs=(NS_CELLO,))
    name, uuid, mac = NODE
    watching = threading.Event()

    def watch() -> dict[str, tuple[str, str]]:
        with chromium(tmp_path / "chromium-profile") as driver:
            page = Page(driver, shots)
            page.login(API, ADMIN_TOKEN)
            page.wait("the server", lambda: page.css(f'tr[data-server="{uuid}"][data-state="available"]'))
            watching.set()
            page.wait("the boot's first steps", lambda: all(
                "done" in page.steps(uuid).get(s, ("", ""))[0] for s in STEPS[:3]), within=BOOT_TIMEOUT)
            page.shot("lab-boot-config")
            page.wait("the iSCSI login", lambda: all(
                "done" in page.steps(uuid).get(s, ("", ""))[0] for s in STEPS), within=BOOT_TIMEOUT)
            page.shot("lab-boot-done")
            assert script_errors(page.console()) == []
            return page.steps(uuid)

    try:
        api_ok(lab, "POST", "/api/v1/users", {"name": "lab", "max_volumes": 8, "max_data_gb": 8}, status=201)
        build_tiny(lab)
        api_ok(lab, "POST", "/api/v1/servers", {"uuid": uuid, "template": "tiny", "profile": "pxelinux",
                                                "macs": [mac], "user": "lab"}, status=202)
        seen = browser.submit(watch)
        if not watching.wait(90):
            seen.result(5)  # the browser's own error, if it failed
            pytest.fail("the page did not show the server within 90 s", pytrace=False)
        node = lab.node(name, uuid, mac)
        node.power_on()
        try:
            took = node.wait_console(f"cello-root-ok {uuid}", BOOT_TIMEOUT)
        except LabError as e:
            pytest.fail(f"{e}\n{lab.log_tail()}", pytrace=False)
        cells = seen.result(BOOT_TIMEOUT + 60)
        offsets = [float(cells[s][1].split()[0].lstrip("+")) for s in STEPS]
        print(f"\npower-on → root {took:.1f} s; the page's timeline: " +
              " → ".join(f"{s} {o:.1f} s" for s, o in zip(STEPS, offsets, strict=True)))
        assert offsets[0] == 0.0 and offsets == sorted(offsets), cells
        assert "pxelinux.0" in cells["loader"][1] and "vmlinuz" in cells["kernel"][1], cells
        assert f"node-{uuid}" in cells["login"][1], cells
        lab.release(node)
    finally:
        browser.shutdown(wait=True, cancel_futures=True)
