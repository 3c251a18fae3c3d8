"""Knowing a node's MAC and UUID grants nothing: a second host on the boot LAN gets neither its boot config
nor its root disk.

One lab for the module (tests/system/conftest.py). A qemu node (TCG, BIOS, pxelinux) boots the tiny
template from its own clone, with per-server CHAP (the default): its config reached it, so the DHCP
binding the proxy learned works for the node; an iPXE node and a UEFI node get their scripts over HTTP
the same way. Then, with the node powered off, a stranger host
(tests/system/stranger.py: its own namespace on the lab's bridge, 10.77.0.66, wearing the node's MAC)
asks for the node's config by every name over TFTP (tftp-hpa, curl) and HTTP (curl): each is refused
(TFTP access violation, HTTP 403) and a `denied` event names the stranger. It logs in to the node's
target with the predictable initiator name `<iqn_prefix>:node-<uuid>` (libiscsi's iscsi-inq) with no
CHAP and with a wrong secret: both fail; with the real secret (read from the appliance's store, as a
control that the portal is reachable from there) the login works.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

import pytest

from dhcp.pxe import pxelinux_uuid
from tests.system.lab import API, CELLO_IP, Lab, LabError
from tests.system.stranger import STRANGER_IP, Stranger, stranger_host
from tests.system.test_e2e_boot import (
    IQN_PREFIX,
    USER,
    boot,
    check_boot_path,
    check_logged_in,
    cli_ok,
    create_server,
    fail_with_logs,
    node_address,
    wait_until,
)

pytestmark = pytest.mark.system

NODE = ("known", "3f1c2b4e-0000-4000-8000-0000000000e1", "52:54:00:77:00:e1")
IPXE_NODE = ("ipxenode", "3f1c2b4e-0000-4000-8000-0000000000e2", "52:54:00:77:00:e2")
UEFI_NODE = ("uefinode", "3f1c2b4e-0000-4000-8000-0000000000e3", "52:54:00:77:00:e3")
DENIED = "Error code 2: access denied"

seen: dict[str, Any] = {}


def need(key: str) -> Any:
    if key not in seen:
        pytest.fail(f"an earlier test of this module did not get as far as {key!r}", pytrace=False)
    return seen[key]


def chap_secret(lab: Lab, uuid: str) -> tuple[str, str]:
    """The server's CHAP account as the store holds it (the API never shows the secret)."""
    db = sqlite3.connect(f"file:{lab.state_dir / 'cello.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT chap_user, chap_secret FROM servers WHERE uuid = ?", (uuid,)).fetchone()
    finally:
        db.close()
    assert row is not None and row[1], f"server {uuid} has no CHAP secret in the store"
    return str(row[0]), str(row[1])


def logged_in(lab: Lab, uuid: str) -> bool:
    try:
        check_logged_in(lab, uuid)
    except AssertionError:
        return False
    return True


def test_the_node_boots_with_chap_from_its_own_clone(lab: Lab) -> None:
    cli_ok(lab, "user", "create", USER, "--max-volumes", "4", "--max-data-gb", "4")
    cli_ok(lab, "template", "build", "tiny", "--from", "tiny", timeout=240)
    server = create_server(lab, NODE, "pxelinux")
    assert server["target"]["chap"] == "on" and server["target"]["chap_user"], server
    node = lab.node(*NODE)
    assert lab.events is not None
    since = int(lab.events.snapshot()[-1]["id"]) if lab.events.snapshot() else 0
    try:
        took = boot(lab, node)
        # the initramfs' session hands over to iscsid after switch_root, which logs in again: a moment
        wait_until("the node's session on its target", lambda: logged_in(lab, NODE[1]), 20, every=0.5)
    except LabError as e:
        fail_with_logs(lab, str(e))
    steps = check_boot_path(lab.events.snapshot(), node, since, "pxelinux")
    print(f"\n{NODE[0]}: power-on → root in {took:.1f} s; " + " → ".join(steps))
    lab.release(node)  # off: the stranger may wear its MAC
    target = server["target"]
    os_volume = next(v["name"] for v in server["volumes"] if v["kind"] == "os")
    os_lun = next(lun["lun"] for lun in target["luns"] if lun["volume"] == os_volume)
    seen["server"] = server
    seen["iscsi"] = (target["iqn"], int(os_lun))


def test_ipxe_and_uefi_nodes_get_their_scripts_from_their_bindings(lab: Lab) -> None:
    """The HTTP side of the binding with real firmware: a BIOS node on the ipxe profile (qemu's iPXE ROM
    asks for its script by URL) and a UEFI node (OVMF's PXE → ipxe.efi over TFTP → iPXE's DHCP → the
    script), both with CHAP, booting at once."""
    need("server")
    for who in (IPXE_NODE, UEFI_NODE):
        server = create_server(lab, who, "ipxe")
        assert server["target"]["chap"] == "on", server
    nodes = [lab.node(*IPXE_NODE), lab.node(*UEFI_NODE, firmware="uefi-pxe", nic="virtio-net-pci")]
    assert lab.events is not None
    since = int(lab.events.snapshot()[-1]["id"])
    try:
        for node in nodes:
            node.power_on()
        for node in nodes:
            node.wait_console(f"cello-root-ok {node.uuid}", 150)
            wait_until(f"{node.name}'s session on its target", lambda n=node: logged_in(lab, n.uuid), 20, every=0.5)
    except LabError as e:
        fail_with_logs(lab, str(e))
    finally:
        for node in nodes:
            lab.release(node)
    events = lab.events.snapshot()
    for node in nodes:
        ip = node_address(node)
        scripts = [e for e in events if e.get("id", 0) > since and e["kind"] == "http"
                   and e.get("file") == f"{node.uuid}.ipxe"]
        assert scripts and all(e["client"] == ip and e["status"] == 200 for e in scripts), scripts
    assert not [e for e in events if e.get("id", 0) > since and e["kind"] == "denied"]


def test_a_stranger_with_the_nodes_mac_and_uuid_gets_no_config(lab: Lab) -> None:
    need("server")
    uuid, mac = NODE[1], NODE[2]
    _, secret = chap_secret(lab, uuid)
    names = [f"pxelinux.cfg/01-{mac.replace(':', '-')}", f"pxelinux.cfg/{uuid}",
             f"pxelinux.cfg/{pxelinux_uuid(uuid)}", f"{uuid}/pxelinux.cfg/default", f"grub/grub.cfg-{uuid}",
             f"ipxe/{uuid}.ipxe", f"boot/{uuid}.ipxe"]
    assert lab.events is not None
    since = int(lab.events.snapshot()[-1]["id"])
    with stranger_host(lab, mac=mac) as stranger:
        outputs = [fetch_refused(stranger, name, lab) for name in names]
        for url in (f"{API}/boot/{uuid}.ipxe", f"{API}/boot/{uuid}.ipxe?mac={mac}",
                    f"{API}/boot/00000000-0000-0000-0000-000000000000.ipxe?mac={mac}"):
            done = stranger.run("curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", url)
            assert done.returncode == 0 and done.stdout.endswith("\n403"), done.stdout + done.stderr
            assert f"not to {STRANGER_IP}" in done.stdout, done.stdout
            outputs.append(done.stdout)
        # the stranger reaches Cello fine: a loader file (no secret in it) is anyone's
        done = stranger.run("curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                            f"tftp://{CELLO_IP}/pxelinux.0")
        assert done.returncode == 0, done.stderr
    assert not [out for out in outputs if secret in out], "the stranger saw the node's CHAP secret"

    events_log = lab.events

    def denied() -> list[dict[str, Any]] | None:
        found = [e for e in events_log.snapshot() if e.get("id", 0) > since and e["kind"] == "denied"]
        return found if len(found) >= 2 * len(names) + 3 else None  # tftp-hpa + curl per name, 3 HTTP

    events: list[dict[str, Any]] = wait_until("a denied event for every refused fetch", denied, 10)
    assert {e["client"] for e in events} == {STRANGER_IP}, events
    assert {e["server"] for e in events} == {uuid}, events
    assert {e["file"] for e in events if e["via"] == "tftp"} == set(names), events
    assert len([e for e in events if e["via"] == "http"]) == 3, events


def fetch_refused(stranger: Stranger, name: str, lab: Lab) -> str:
    """`name` over TFTP from the stranger with tftp-hpa and curl: both refused (access violation)."""
    local = lab.logs / "stranger-got"
    hpa = stranger.run("tftp", "-m", "binary", CELLO_IP, "-c", "get", name, str(local))
    assert DENIED in hpa.stdout + hpa.stderr, f"tftp-hpa {name}: {hpa.stdout}{hpa.stderr}"
    got = local.read_text(errors="replace") if local.exists() else ""
    assert got == "", f"tftp-hpa {name} got {got[:200]!r}"
    curl = stranger.run("curl", "-sS", "--max-time", "10", f"tftp://{CELLO_IP}/{name}")
    assert curl.returncode == 69, f"curl tftp {name}: exit {curl.returncode}: {curl.stdout}{curl.stderr}"
    return hpa.stdout + hpa.stderr + got + curl.stdout + curl.stderr


def test_a_stranger_cannot_log_in_to_the_nodes_target(lab: Lab) -> None:
    iqn, lun = need("iscsi")
    uuid = NODE[1]
    user, secret = chap_secret(lab, uuid)
    initiator = f"{IQN_PREFIX}:node-{uuid}"
    wrong = "x" + secret[1:] if secret[0] != "x" else "y" + secret[1:]
    with stranger_host(lab, mac=NODE[2]) as stranger:
        no_chap = stranger.run("iscsi-inq", "-i", initiator, f"iscsi://{CELLO_IP}/{iqn}/{lun}")
        bad_chap = stranger.run("iscsi-inq", "-i", initiator, f"iscsi://{user}%{wrong}@{CELLO_IP}/{iqn}/{lun}")
        control = stranger.run("iscsi-inq", "-i", initiator, f"iscsi://{user}%{secret}@{CELLO_IP}/{iqn}/{lun}")
    for what, done in (("no CHAP", no_chap), ("a wrong CHAP secret", bad_chap)):
        text = done.stdout + done.stderr
        assert done.returncode != 0, f"login with {what} worked:\n{text}"
        assert re.search(r"(?i)log ?in|auth", text), f"login with {what} failed, but not at the login:\n{text}"
        assert "Vendor" not in text, text
    assert control.returncode == 0 and "Vendor" in control.stdout, \
        f"the control login with the real secret failed (is the portal reachable?):\n{control.stdout}{control.stderr}"
