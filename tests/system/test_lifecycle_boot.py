"""A server's life on its clone, end to end: a real BMC power-cycles a real PXE node through upgrade,
rollback and capture (issue 13's system test).

One lab for the module (tests/system/conftest.py), one qemu node reused across the steps (TCG, BIOS,
pxelinux: the default `compute` profile put back on pxelinux over TFTP with `loader = "pxelinux"`, as a
site keeping hcc-cello's path does; CHAP on). Its BMC is OpenIPMI's `ipmi_sim`, run inside cel-cello
on 127.0.0.1 (the appliance's ipmitool reaches it on its own loopback); its chassis power on/off starts and
kills the node's qemu command line (`ip netns exec cel-site qemu-system-x86_64 …`, lab.Node's argv), and
`chassis bootdev pxe` adds `-boot once=n` to the next start only (tests/ipmi_sim_chassis.py).

The profile `compute` is given `cello.test=showdata` here: the tiny root's init then mounts each data LUN
read-only and prints `cello-data lun=<n> <first line of its /cello-data>`; every tiny root prints
`cello-template <os>@<version>` (its /etc/cello-template) before its marker `cello-root-ok <uuid>`.

  1. the server is created (a 1 GB data volume) and given the BMC with `cello server bmc`; power status off.
  2. its data volume gets an ext4 with /cello-data from the appliance side, node off (mkfs.ext4 -d on the
     file backend's image); `cello server power on` → the node boots tiny@v1 and prints the data line.
  3. tiny@v2 is built; `cello server upgrade --to tiny@v2` without --reboot is refused (409) naming the
     node's session (initiator and address); server, volumes, exports, session and node unchanged.
  4. `upgrade --to tiny@v2 --reboot`: BMC power off, swap, one-time PXE, power on, login; the console says
     tiny@v2 and shows the same data line; the data image's bytes are unchanged, at the same LUN.
  5. `rollback --reboot`: the console says tiny@v1 again (and it is the old root: its boot counter goes on).
  6. `template capture --as tiny --power-off` makes tiny@v3 (identity files scrubbed); a second server made
     from tiny@v3 boots with its own uuid and no trace of the first node's marker files.

Each step prints its time. Everything started here (ipmi_sim, the node's qemu, the second node) is stopped
here; the lab stops the rest (Cello, `cello teardown` of its tgtd, dnsmasq, the namespaces).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import bmc_lab
from tests.bmc_lab import PASSWORD, SimNode
from tests.bmc_lab import USER as BMC_USER
from tests.system.lab import NS_CELLO, Lab, LabError, Node, debugfs_cat, run
from tests.system.test_e2e_boot import (
    IQN_PREFIX,
    USER,
    api_ok,
    cli_ok,
    create_server,
    fail_with_logs,
    marker,
    target_block,
    volume_path,
    wait_until,
)

pytestmark = pytest.mark.system

NODE = ("lifecycle", "3f1c2b4e-0000-4000-8000-0000000013a1", "52:54:00:77:13:a1")
SECOND = ("fromv3", "3f1c2b4e-0000-4000-8000-0000000013b2", "52:54:00:77:13:b2")
PROFILE = "compute"  # the default profile, on pxelinux (its BIOS loader follows) + the tiny root's data view
SHOWDATA_PROFILE = (
    f"[boot.profiles.{PROFILE}]\n"
    'loader = "pxelinux"\n'
    'kernel_args = "console=ttyS0 quiet cello.test=showdata"\n'
)
BOOT_TIMEOUT = 150.0  # TCG: ~35 s from power-on to the marker here; more while the host is busy
SWAP_TIMEOUT = 420.0  # --reboot: power off, session gone, swap, PXE once, power on, login
BUILD_TIMEOUT = 300.0
DATA_FILE = "cello-data"
# The user's data quota: far below a root's size (100 GB sparse), which an upgrade's new root must not
# count against (it is a volume, not data; this once refused the upgrade: "needs 101").
MAX_DATA_GB = 16
RECOVERED = "is operational after recovery"  # iscsid has taken the initramfs's session over

# What the steps learn and later steps need.
seen: dict[str, Any] = {}
timings: list[tuple[str, float]] = []


@dataclass
class Rig:
    lab: Lab
    node: Node
    sim: SimNode
    console_parts: list[Path] = field(default_factory=list)


def need(key: str) -> Any:
    if key not in seen:
        pytest.fail(f"an earlier step of this module did not get as far as {key!r}", pytrace=False)
    return seen[key]


def timed(step: str, started: float) -> float:
    took = time.monotonic() - started
    timings.append((step, took))
    print(f"\n[{step}] {took:.1f} s")
    return took


def new_console(rig: Rig, label: str) -> None:
    """Keep the console so far as serial-<node>-<label>.log: the running qemu goes on writing there (same
    inode); the qemu of the next power-on makes a new serial log."""
    if rig.node.serial.exists():
        kept = rig.node.serial.with_name(f"{rig.node.serial.stem}-{label}.log")
        rig.node.serial.rename(kept)
        rig.console_parts.append(kept)
    rig.node.started = time.monotonic()


def wait_console(node: Node, text: str, timeout: float = BOOT_TIMEOUT) -> float:
    """Seconds until `text` is on the node's serial log (counted from `node.started`)."""
    deadline = time.monotonic() + timeout
    while text not in node.console():
        if "cello-initramfs-failed" in node.console():
            raise LabError(f"{node.name}: the initramfs failed:\n{node.console()[-2000:]}")
        if time.monotonic() > deadline:
            raise LabError(f"{node.name}: no {text!r} on the serial console within {timeout:.0f} s")
        time.sleep(0.3)
    return time.monotonic() - node.started


def wait_booted(lab: Lab, node: Node, timeout: float = BOOT_TIMEOUT) -> float:
    """Until the marker, then until iscsid has logged the root's session in again (its takeover), so that
    the session the appliance sees is the one that stays."""
    took = wait_console(node, marker(node.uuid), timeout)
    if "cello-iscsid: started" in node.console():
        wait_console(node, f"iscsid: connection1:0 {RECOVERED}", timeout)
    return took


def console_line(node: Node, prefix: str) -> str:
    # The node's processes share its serial console: iscsid's "iscsid: " can land in front of a line
    # the root's init prints (seen in CI), so the marker is taken wherever it starts in a line.
    lines = [line[line.index(prefix):].strip() for line in node.console().splitlines() if prefix in line]
    assert lines, f"{node.name}: no {prefix!r} line on the console:\n{node.console()[-2000:]}"
    return lines[-1]


def session(lab: Lab, uuid: str) -> tuple[str, str]:
    """(initiator, address) of the node's iSCSI session, as Cello's tgtd shows it."""
    block = target_block(lab.tgt_show(), f"{IQN_PREFIX}:{uuid}")
    initiator = re.search(r"Initiator: (\S+)", block)
    address = re.search(r"IP Address: (\S+)", block)
    assert initiator and address, f"no session on the target of {uuid}:\n{block}"
    return initiator.group(1), address.group(1)


def has_session(lab: Lab, uuid: str) -> bool:
    return "Initiator: " in target_block(lab.tgt_show(), f"{IQN_PREFIX}:{uuid}")


def exported_lun(lab: Lab, uuid: str, image: str) -> int:
    """The LUN at which tgtd exports `image` on the server's target."""
    block = target_block(lab.tgt_show(), f"{IQN_PREFIX}:{uuid}")
    for part in re.split(r"(?m)^\s*LUN: ", block)[1:]:
        if f"Backing store path: {image}\n" in part + "\n":
            return int(part.split("\n", 1)[0])
    raise AssertionError(f"tgtd does not export {image} on {uuid}'s target:\n{block}")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def volumes(server: dict[str, Any], kind: str) -> list[str]:
    return [v["name"] for v in server["volumes"] if v["kind"] == kind]


def template_image(lab: Lab, version: str) -> str:
    """The file backend's read-only copy of a tiny template version."""
    return str(Path(volume_path(lab, "tiny-template")).with_name(f"tiny-template@{version}.img"))


def check_swap_output(out: str, action: str, before: str, after: str) -> None:
    assert f"{action} {NODE[1]}: {before} -> {after}" in out, out
    assert "power: off, pxe-once, on, reached root" in out, out
    assert "problem:" not in out, out


# --- the node and its BMC ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rig(lab: Lab) -> Iterator[Rig]:
    """Cello with the data view on `compute`, tiny@v1 built, and the node's qemu behind ipmi_sim (off)."""
    lab.extra_config = SHOWDATA_PROFILE
    started = time.monotonic()
    try:
        lab.stop_cello()
        lab.start_cello()  # cello.toml now has the profile
        cli_ok(lab, "user", "create", USER, "--max-volumes", "16", "--max-data-gb", str(MAX_DATA_GB))
        cli_ok(lab, "template", "build", "tiny", "--from", "tiny", timeout=BUILD_TIMEOUT)
    except (LabError, AssertionError) as e:
        fail_with_logs(lab, f"the lab for the lifecycle test did not come up: {e}")
    timed("setup: cello with the profile, tiny@v1 built", started)
    node = lab.node(*NODE)
    bmc_dir = lab.logs / "bmc"
    bmc_dir.mkdir(exist_ok=True)
    try:
        with bmc_lab.ipmi_sim(bmc_dir, node.argv(), netns=NS_CELLO) as sim:
            yield Rig(lab, node, sim)
    finally:
        lab.release(node)


# --- the steps, in file order ------------------------------------------------------------------------


def test_1_server_with_a_data_volume_gets_its_bmc(rig: Rig) -> None:
    lab, (_, uuid, _) = rig.lab, NODE
    started = time.monotonic()
    server = create_server(lab, NODE, PROFILE, data_gb=(1,))
    assert server["profile"] == PROFILE and server["target"]["chap"] == "on", server
    assert (server["template"], server["version"]) == ("tiny", "v1"), server
    out = cli_ok(lab, "server", "bmc", uuid, rig.sim.url, "--user", BMC_USER, "--password", PASSWORD)
    assert f"{uuid}: BMC {rig.sim.url}" in out, out
    got = api_ok(lab, "GET", f"/api/v1/servers/{uuid}")
    assert got["bmc"] == rig.sim.url and PASSWORD not in str(got), got
    assert cli_ok(lab, "server", "power", uuid, "status").strip() == f"{uuid}: off"
    assert rig.sim.pid() is None and rig.sim.starts() == []
    seen["server"] = got
    timed("1. server + data volume created, BMC (ipmi_sim in cel-cello) registered", started)


def test_2_node_runs_v1_and_sees_its_data_file(rig: Rig) -> None:
    lab, node, (_, uuid, _) = rig.lab, rig.node, NODE
    server = need("server")
    started = time.monotonic()
    (data,) = volumes(server, "data")
    image = volume_path(lab, data)
    text = f"data of {uuid} written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
    with tempfile.TemporaryDirectory() as tree:
        Path(tree, DATA_FILE).write_text(text + "\n")
        run(["mkfs.ext4", "-q", "-F", "-L", "cello-data", "-d", tree, image], timeout=60)
    assert debugfs_cat(image, f"/{DATA_FILE}") == text + "\n"
    data_lun = exported_lun(lab, uuid, image)
    seen["data"] = (image, sha256(image), data_lun, text)

    new_console(rig, "off")
    assert cli_ok(lab, "server", "power", uuid, "on").strip() == f"{uuid}: on"
    try:
        took = wait_booted(lab, node)
        wait_until("the node's session", lambda: has_session(lab, uuid), 30)
    except LabError as e:
        fail_with_logs(lab, str(e))
    print(f"\npower-on through the BMC → root in {took:.1f} s")
    assert rig.sim.pid() is not None and len(rig.sim.starts()) == 1
    assert console_line(node, "cello-template ") == "cello-template tiny@v1"
    assert console_line(node, "cello-data ") == f"cello-data lun={data_lun} {text}"
    seen["v1"] = True
    timed("2. data file written (node off), power on through the BMC, node on tiny@v1 reads it", started)


def test_3_v2_built_and_an_upgrade_under_the_running_node_is_refused(rig: Rig) -> None:
    lab, node, (_, uuid, _) = rig.lab, rig.node, NODE
    need("v1")
    started = time.monotonic()
    cli_ok(lab, "template", "build", "tiny", "--from", "tiny", timeout=BUILD_TIMEOUT)
    assert "version=v2\n" in debugfs_cat(template_image(lab, "v2"), "/etc/cello-template")
    timed("3a. tiny@v2 built", started)

    started = time.monotonic()
    initiator, address = session(lab, uuid)
    assert initiator == f"{IQN_PREFIX}:node-{uuid}", initiator
    before = api_ok(lab, "GET", f"/api/v1/servers/{uuid}")
    files = sorted(p.name for p in Path(volume_path(lab, "tiny-template")).parent.iterdir())
    block = target_block(lab.tgt_show(), f"{IQN_PREFIX}:{uuid}")
    pid, starts = rig.sim.pid(), rig.sim.starts()

    done = lab.cli("server", "upgrade", uuid, "--to", "tiny@v2", timeout=120)
    said = done.stdout + done.stderr
    print(f"\ncello server upgrade {uuid} --to tiny@v2 (node running): exit {done.returncode}\n{said.strip()}")
    assert done.returncode != 0, said
    assert "in_use" in said and "holds an iSCSI session (" in said and f"{initiator} from {address}" in said, said

    after = api_ok(lab, "GET", f"/api/v1/servers/{uuid}")
    for key in ("template", "version", "state", "volumes", "target", "reason"):
        assert after[key] == before[key], f"{key}: {before[key]} -> {after[key]}"
    assert sorted(p.name for p in Path(volume_path(lab, "tiny-template")).parent.iterdir()) == files
    now = target_block(lab.tgt_show(), f"{IQN_PREFIX}:{uuid}")
    luns = re.compile(r"(?m)^\s*(LUN: \d+|Backing store path: .*)$")
    assert luns.findall(now) == luns.findall(block), f"the exports changed:\n{block}\n---\n{now}"
    assert session(lab, uuid) == (initiator, address)
    assert rig.sim.pid() == pid and rig.sim.starts() == starts, "the node was power-cycled"
    assert "cello-root-ok" in node.console() and "cello-initramfs-failed" not in node.console()
    seen["refused"] = True
    timed("3b. upgrade without --reboot refused, nothing changed", started)


def test_4_upgrade_with_reboot_power_cycles_the_node_onto_v2_with_its_data(rig: Rig) -> None:
    lab, node, (_, uuid, _) = rig.lab, rig.node, NODE
    need("refused")
    image, digest, data_lun, text = need("data")
    before = api_ok(lab, "GET", f"/api/v1/servers/{uuid}")
    (old_root,) = volumes(before, "os")
    first_qemu = rig.sim.pid()
    started = time.monotonic()
    new_console(rig, "v1")
    done = lab.cli("server", "upgrade", uuid, "--to", "tiny@v2", "--reboot", "--timeout", str(SWAP_TIMEOUT),
                   timeout=SWAP_TIMEOUT + 30)
    said = done.stdout + done.stderr
    print(f"\ncello server upgrade {uuid} --to tiny@v2 --reboot: exit {done.returncode} after "
          f"{time.monotonic() - started:.1f} s\n{said.strip()}")
    if done.returncode != 0:
        fail_with_logs(lab, f"upgrade --reboot failed: {said}")
    check_swap_output(done.stdout, "rebuild", "tiny@v1", "tiny@v2")
    try:
        took = wait_booted(lab, node)
    except LabError as e:
        fail_with_logs(lab, str(e))
    print(f"\nupgrade command → the node's marker on tiny@v2: {took:.1f} s (the CLI answered once it logged in)")
    assert console_line(node, "cello-template ") == "cello-template tiny@v2"
    assert console_line(node, "cello-data ") == f"cello-data lun={data_lun} {text}"
    # the BMC really cycled the node: a new qemu, started once with the one-time PXE boot
    assert first_qemu is not None and not bmc_lab.alive(first_qemu)
    starts = rig.sim.starts()
    assert len(starts) == 2 and starts[-1].endswith("-boot once=n"), starts
    after = api_ok(lab, "GET", f"/api/v1/servers/{uuid}")
    assert (after["template"], after["version"], after["state"]) == ("tiny", "v2", "available"), after
    (new_root,) = volumes(after, "os")
    assert new_root != old_root and volumes(after, "prev") == [old_root], after["volumes"]
    assert volumes(after, "data") == volumes(before, "data")
    assert exported_lun(lab, uuid, image) == data_lun and sha256(image) == digest, "the data volume changed"
    seen["v2"] = (old_root, new_root)
    timed("4. upgrade --reboot: off, swap, PXE once, on, node back on tiny@v2 with its data", started)


def test_5_rollback_with_reboot_brings_v1_back(rig: Rig) -> None:
    lab, node, (_, uuid, _) = rig.lab, rig.node, NODE
    old_root, new_root = need("v2")
    image, digest, data_lun, text = need("data")
    started = time.monotonic()
    new_console(rig, "v2")
    done = lab.cli("server", "rollback", uuid, "--reboot", "--timeout", str(SWAP_TIMEOUT), timeout=SWAP_TIMEOUT + 30)
    said = done.stdout + done.stderr
    print(f"\ncello server rollback {uuid} --reboot: exit {done.returncode} after "
          f"{time.monotonic() - started:.1f} s\n{said.strip()}")
    if done.returncode != 0:
        fail_with_logs(lab, f"rollback --reboot failed: {said}")
    check_swap_output(done.stdout, "rollback", "tiny@v2", "tiny@v1")
    try:
        took = wait_booted(lab, node)
    except LabError as e:
        fail_with_logs(lab, str(e))
    print(f"\nrollback command → the node's marker on tiny@v1: {took:.1f} s")
    assert console_line(node, "cello-template ") == "cello-template tiny@v1"
    assert console_line(node, "cello-data ") == f"cello-data lun={data_lun} {text}"
    starts = rig.sim.starts()
    assert len(starts) == 3 and starts[-1].endswith("-boot once=n"), starts
    after = api_ok(lab, "GET", f"/api/v1/servers/{uuid}")
    assert (after["template"], after["version"]) == ("tiny", "v1"), after
    assert volumes(after, "os") == [old_root] and volumes(after, "prev") == [new_root], after["volumes"]
    assert exported_lun(lab, uuid, image) == data_lun and sha256(image) == digest, "the data volume changed"
    seen["v1-again"] = old_root
    timed("5. rollback --reboot: node back on tiny@v1", started)


def test_6_capture_becomes_v3_and_a_second_server_boots_it_with_its_own_identity(rig: Rig) -> None:
    lab, (_, uuid, _) = rig.lab, NODE
    root = need("v1-again")
    started = time.monotonic()
    done = lab.cli("template", "capture", uuid, "--as", "tiny", "--power-off", timeout=SWAP_TIMEOUT)
    said = done.stdout + done.stderr
    print(f"\ncello template capture {uuid} --as tiny --power-off: exit {done.returncode}\n{said.strip()}")
    if done.returncode != 0:
        fail_with_logs(lab, f"capture failed: {said}")
    assert f"captured {uuid} as tiny@v3" in done.stdout, said
    assert rig.sim.pid() is None and not has_session(lab, uuid), "the node was not powered off"
    # the root the rollback brought back is the node's first one: booted twice now (steps 2 and 5)
    assert debugfs_cat(volume_path(lab, root), "/cello-booted") == f"uuid={uuid}\nboots=2\n"
    v3 = template_image(lab, "v3")
    for identity in ("/cello-booted", "/cello-booted.new", "/cello-writeloop", "/etc/machine-id"):
        assert debugfs_cat(v3, identity) == "", f"tiny@v3 keeps {identity}"
    print(f"\ntiny@v3's /etc/cello-template:\n{debugfs_cat(v3, '/etc/cello-template').strip()}")
    timed("6a. capture --power-off: tiny@v3, identity scrubbed", started)

    started = time.monotonic()
    _, second_uuid, _ = SECOND
    server = create_server(lab, SECOND, PROFILE)
    assert (server["template"], server["version"]) == ("tiny", "v3"), server
    second = lab.node(*SECOND)
    try:
        second.power_on()
        took = wait_console(second, marker(second_uuid))
    except LabError as e:
        fail_with_logs(lab, str(e))
    finally:
        lab.release(second)  # its last write was synced before the marker
    print(f"\nsecond server (tiny@v3): power-on → root in {took:.1f} s; "
          f"{console_line(second, 'cello-template ')}")
    assert console_line(second, "cello-template ") == "cello-template tiny@v3"  # stamped as what it is
    assert uuid not in second.console(), "the second node shows the first node's identity"
    assert console_line(second, "cello-data ") == "cello-data none"
    (second_root,) = volumes(server, "os")
    assert debugfs_cat(volume_path(lab, second_root), "/cello-booted") == f"uuid={second_uuid}\nboots=1\n"
    timed("6b. a second server from tiny@v3 boots with its own identity", started)
    print("\n" + "\n".join(f"{took:7.1f} s  {step}" for step, took in timings))
