"""System test: a real iPXE ROM (qemu) boots from Cello's proxyDHCP offer while dnsmasq is the site DHCP.

    netns dhcpt-site : bridge dhbr0 10.78.0.1/24 + fd78::1/64, dnsmasq (addresses + RA), tap dhtap0 → qemu
    netns dhcpt-cello: veth dhc0 10.78.0.2/24 — Cello's proxy (python -m tests.dhcp_lab) and a TFTP server

The TFTP side is swappable (CELLO_LAB_TFTP=tftpd-hpa | dnsmasq; the appliance's own server can be added
to `start_tftp`): the check reads the RRQs off the wire with tcpdump, not from the server's log.
CELLO_CAPTURE_DIR=DIR keeps the DHCP capture (for tests/data/dhcp/ipxe-rom-cello.pcap).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dhcp import pxe
from tests.tools import require

pytestmark = pytest.mark.system

ROOT = pathlib.Path(__file__).resolve().parents[2]
SITE, CELLO = "dhcpt-site", "dhcpt-cello"
UUID = "3f1c2a4b-5d6e-4f70-8192-a3b4c5d6e7f8"
MAC = "52:54:00:78:00:10"
PXELINUX = pathlib.Path("/usr/lib/PXELINUX/pxelinux.0")
LDLINUX = pathlib.Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
IPXE_EFI = pathlib.Path("/usr/lib/ipxe/ipxe.efi")
OVMF = pathlib.Path("/usr/share/ovmf/OVMF.fd")
TOOLS = ("ip", "dnsmasq", "qemu-system-x86_64", "tcpdump", "in.tftpd")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def ns(name: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


@dataclass
class Lab:
    work: pathlib.Path
    procs: list[subprocess.Popen[bytes]]

    def spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.work / log, "wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def _delete_namespaces() -> None:
    for name in (SITE, CELLO):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def lab(tmp_path: pathlib.Path) -> Iterator[Lab]:
    require(root=True)  # network namespaces
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"install {missing} (Debian: iproute2 dnsmasq qemu-system-x86 ipxe-qemu tcpdump tftpd-hpa)"
    _delete_namespaces()
    lab = Lab(tmp_path, [])
    try:
        sh("ip", "netns", "add", SITE)
        sh("ip", "netns", "add", CELLO)
        for name in (SITE, CELLO):
            sh(*ns(name, "ip", "link", "set", "lo", "up"))
        sh(*ns(SITE, "ip", "link", "add", "dhbr0", "type", "bridge"))
        sh(*ns(SITE, "ip", "addr", "add", "10.78.0.1/24", "dev", "dhbr0"))
        sh(*ns(SITE, "ip", "-6", "addr", "add", "fd78::1/64", "dev", "dhbr0"))
        sh(*ns(SITE, "ip", "link", "set", "dhbr0", "up"))
        sh(*ns(SITE, "ip", "tuntap", "add", "dev", "dhtap0", "mode", "tap"))
        sh(*ns(SITE, "ip", "link", "set", "dhtap0", "master", "dhbr0"))
        sh(*ns(SITE, "ip", "link", "set", "dhtap0", "up"))
        sh("ip", "link", "add", "dhc0", "netns", CELLO, "type", "veth", "peer", "name", "dhc0br", "netns", SITE)
        sh(*ns(SITE, "ip", "link", "set", "dhc0br", "master", "dhbr0"))
        sh(*ns(SITE, "ip", "link", "set", "dhc0br", "up"))
        sh(*ns(CELLO, "ip", "addr", "add", "10.78.0.2/24", "dev", "dhc0"))
        sh(*ns(CELLO, "ip", "link", "set", "dhc0", "up"))
        yield lab
    finally:
        lab.stop_all()
        _delete_namespaces()


def start_site_dhcp(lab: Lab) -> None:
    conf = lab.work / "site.conf"
    conf.write_text(
        "port=0\ninterface=dhbr0\nbind-interfaces\nno-resolv\nno-hosts\n"
        "dhcp-range=10.78.0.100,10.78.0.150,255.255.255.0,1h\nenable-ra\ndhcp-range=fd78::,ra-only\n"
        f"log-dhcp\nlog-facility={lab.work / 'site-dnsmasq.log'}\n"
    )
    lab.spawn(ns(SITE, "dnsmasq", f"--conf-file={conf}", "--keep-in-foreground",
                 f"--pid-file={lab.work / 'site.pid'}"), "site-dnsmasq.out")


def start_tftp(lab: Lab, root: pathlib.Path) -> None:
    kind = os.environ.get("CELLO_LAB_TFTP", "tftpd-hpa")
    if kind == "tftpd-hpa":
        lab.spawn(ns(CELLO, "in.tftpd", "--foreground", "--listen", "--address", "10.78.0.2:69",
                     "--secure", "-u", "root", str(root)), "tftpd.out")
    elif kind == "dnsmasq":
        conf = lab.work / "tftp.conf"
        conf.write_text(f"port=0\nuser=root\ninterface=dhc0\nbind-interfaces\nenable-tftp\ntftp-root={root}\n"
                        f"log-facility={lab.work / 'tftp-dnsmasq.log'}\n")
        lab.spawn(ns(CELLO, "dnsmasq", f"--conf-file={conf}", "--keep-in-foreground",
                     f"--pid-file={lab.work / 'tftp.pid'}"), "tftp-dnsmasq.out")
    else:
        raise AssertionError(f"CELLO_LAB_TFTP={kind!r}: tftpd-hpa or dnsmasq")


def start_proxy(lab: Lab, *args: str, netns: str = CELLO, log: str = "proxy.out") -> dict[str, object]:
    proc = lab.spawn(ns(netns, sys.executable, "-m", "tests.dhcp_lab", "--events", *args), log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in (lab.work / log).read_text().splitlines():
            if line.startswith("{") and json.loads(line)["kind"] == "ready":
                return dict(json.loads(line))
        assert proc.poll() is None, (lab.work / log).read_text()
        time.sleep(0.1)
    raise AssertionError("proxy did not start: " + (lab.work / log).read_text())


def start_qemu(lab: Lab, netns: str = SITE, *, uefi: bool = False) -> None:
    """BIOS: SeaBIOS + qemu's iPXE ROM. UEFI: OVMF, whose own PXE client (EDK2 PxeBcDxe, arch 7) runs on
    the NIC's EFI driver."""
    sercon = lab.work / "sercon.bin"
    sercon.write_bytes(b"\xf8\x03")
    firmware = ["-bios", str(OVMF), "-m", "512"] if uefi else ["-m", "256", "-boot", "n"]
    lab.spawn(ns(netns, "qemu-system-x86_64", "-accel", "tcg", *firmware, "-nodefaults", "-display", "none",
                 "-no-reboot", "-serial", f"file:{lab.work / 'serial.log'}", "-uuid", UUID,
                 "-netdev", "tap,id=n0,ifname=dhtap0,script=no,downscript=no",
                 "-device", f"e1000,netdev=n0,mac={MAC},bootindex=1",
                 "-fw_cfg", f"name=opt/org.cello/sercon,file={sercon}",
                 "-fw_cfg", f"name=etc/sercon-port,file={sercon}"), "qemu.out")


def tftp_rrqs(pcap: pathlib.Path) -> list[str]:
    """File names of the TFTP read requests in a capture (pure pcap parsing: no dependency on the server)."""
    from scapy.layers.inet import UDP
    from scapy.utils import rdpcap

    names = []
    for pkt in rdpcap(str(pcap)):
        if UDP in pkt and pkt[UDP].dport == 69:
            data = bytes(pkt[UDP].payload)
            if len(data) > 2 and struct.unpack("!H", data[:2])[0] == 1:
                names.append(data[2:].split(b"\0")[0].decode("latin-1"))
    return names


def wait_for_rrq(lab: Lab, tcpdump_pcap: pathlib.Path, want: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        time.sleep(1)
        if tcpdump_pcap.exists() and tcpdump_pcap.stat().st_size > 24:
            try:
                seen = tftp_rrqs(tcpdump_pcap)
            except Exception:  # a capture being written can end mid-record
                continue
            if want in seen:
                return seen
    serial = (lab.work / "serial.log").read_text(errors="replace") if (lab.work / "serial.log").exists() else ""
    raise AssertionError(f"no RRQ for {want!r} (seen {seen}); serial:\n{serial[-2000:]}\n"
                         f"proxy:\n{(lab.work / 'proxy.out').read_text()[-2000:]}")


def test_ipxe_rom_boots_from_cello_offer(lab: Lab) -> None:
    root = lab.work / "tftproot"
    root.mkdir()
    shutil.copy(PXELINUX, root / "pxelinux.0")
    shutil.copy(LDLINUX, root / "ldlinux.c32")
    start_site_dhcp(lab)
    start_tftp(lab, root)
    pcap = lab.work / "cello.pcap"
    lab.spawn(ns(CELLO, "tcpdump", "-i", "dhc0", "-U", "-n", "-w", str(pcap),
                 "udp port 69 or udp port 67 or udp port 68 or udp port 4011"), "tcpdump.out")
    ready = start_proxy(lab, "--advertise", "10.78.0.2", "--interface", "dhc0", "--profile", "pxelinux",
                        "--node", f"{UUID}={MAC}")
    assert ready["raw"] is False
    time.sleep(1)  # tcpdump attached
    start_qemu(lab)
    # The ROM (iPXE, user class "iPXE", BIOS) is told pxelinux.0 over TFTP by Cello and takes the offer
    # as it is (siaddr + file present: iPXE makes no port-4011 request then). pxelinux then asks for its
    # per-node configs, the UUID one first.
    seen = wait_for_rrq(lab, pcap, "pxelinux.cfg/default", timeout=90)
    assert seen[:2] == ["pxelinux.0", "ldlinux.c32"], seen
    # Finding: pxelinux 6.04 prints option 97's bytes in wire order, so its UUID text is the byte-swapped
    # form of qemu's -uuid (the SMBIOS UUID) — the TFTP side must answer that name (pxe.pxelinux_uuid).
    assert seen[2] == f"pxelinux.cfg/{pxe.pxelinux_uuid(UUID)}" == "pxelinux.cfg/4b2a1c3f-6e5d-704f-8192-a3b4c5d6e7f8"
    assert seen[3] == "pxelinux.cfg/01-52-54-00-78-00-10"
    events = [json.loads(line) for line in (lab.work / "proxy.out").read_text().splitlines()
              if line.startswith('{"kind": "dhcp"')]
    offers = [e for e in events if e["reply"] == "offer"]
    # The policy was asked with the canonical SMBIOS UUID (what the operator registered) and matched.
    assert offers and offers[0]["server"] == UUID and offers[0]["mac"] == MAC and offers[0]["arch"] == 0
    assert offers[0]["file"] == "pxelinux.0"
    if os.environ.get("CELLO_CAPTURE_DIR"):
        time.sleep(1)
        shutil.copy(pcap, pathlib.Path(os.environ["CELLO_CAPTURE_DIR"]) / "ipxe-rom-cello.pcap")


def test_unknown_node_gets_no_offer(lab: Lab) -> None:
    """The site server still gives an address; Cello stays silent for a node its policy does not know."""
    start_site_dhcp(lab)
    start_proxy(lab, "--advertise", "10.78.0.2", "--interface", "dhc0", "--node",
                "00000000-1111-4222-8333-444444444444")
    start_qemu(lab)
    deadline = time.monotonic() + 90
    serial = ""
    while time.monotonic() < deadline and "Nothing to boot" not in serial and "No more network" not in serial:
        time.sleep(1)
        serial = (lab.work / "serial.log").read_text(errors="replace") if (lab.work / "serial.log").exists() else ""
    assert "10.78.0.1" in serial or "ok" in serial, serial  # it did get an address from the site server
    assert "Nothing to boot" in serial or "No more network" in serial, serial
    lab.stop_all()
    stats = [json.loads(line) for line in (lab.work / "proxy.out").read_text().splitlines()
             if line.startswith('{"kind": "stats"')]
    assert stats and stats[0]["offers"] == 0 and stats[0]["received"] > 0


def test_raw_fallback_next_to_a_local_dhcp_server(lab: Lab) -> None:
    """dnsmasq holds :67 in the same namespace as Cello (the appliance host runs the site DHCP): Cello
    listens on a raw socket, and the ROM still boots from its offer."""
    root = lab.work / "tftproot"
    root.mkdir()
    shutil.copy(PXELINUX, root / "pxelinux.0")
    shutil.copy(LDLINUX, root / "ldlinux.c32")
    start_site_dhcp(lab)
    time.sleep(0.5)
    pcap = lab.work / "site.pcap"
    lab.spawn(ns(SITE, "tcpdump", "-i", "dhbr0", "-U", "-n", "-w", str(pcap), "udp port 69"), "tcpdump.out")
    lab.spawn(ns(SITE, "in.tftpd", "--foreground", "--listen", "--address", "10.78.0.1:69", "--secure",
                 "-u", "root", str(root)), "tftpd.out")
    ready = start_proxy(lab, "--advertise", "10.78.0.1", "--interface", "dhbr0", "--profile", "pxelinux",
                        "--node", f"{UUID}={MAC}", netns=SITE)
    assert ready["raw"] is True, ready
    time.sleep(1)
    start_qemu(lab)
    seen = wait_for_rrq(lab, pcap, "pxelinux.0", timeout=120)
    assert seen[0] == "pxelinux.0"


def test_unprivileged_start_names_address_and_reason(lab: Lab) -> None:
    """Without root, start() fails with a message naming the address and what is missing (inside our own
    namespace, so the host's port 67 is never touched)."""
    code = (
        "import asyncio\n"
        "from tests.dhcp_lab import StaticPolicy\n"
        "from dhcp.proxy import ProxyDHCP\n"
        "from udpio.udp import BindError\n"
        "async def main():\n"
        "    proxy = ProxyDHCP(StaticPolicy(), '10.78.0.2', raw_fallback=False)\n"
        "    try:\n"
        "        await proxy.start()\n"
        "    except BindError as e:\n"
        "        print('BindError:', e)\n"
        "    assert proxy.bound == {}\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        ns(CELLO, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code),
        capture_output=True, text=True, timeout=30, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert ("BindError: cannot listen on 0.0.0.0:67: Permission denied "
            "(port 67 needs root or CAP_NET_BIND_SERVICE)") in out.stdout


def test_uefi_pxe_gets_ipxe_efi_then_its_script(lab: Lab) -> None:
    """OVMF's UEFI PXE client (arch 7) is offered ipxe.efi over TFTP; the iPXE it loads asks again with
    user class "iPXE" and is given its per-node script URL (so chainloading cannot loop)."""
    root = lab.work / "tftproot"
    root.mkdir()
    shutil.copy(IPXE_EFI, root / "ipxe.efi")
    start_site_dhcp(lab)
    start_tftp(lab, root)
    pcap = lab.work / "cello.pcap"
    lab.spawn(ns(CELLO, "tcpdump", "-i", "dhc0", "-U", "-n", "-w", str(pcap),
                 "udp port 69 or udp port 67 or udp port 68 or udp port 4011"), "tcpdump.out")
    start_proxy(lab, "--advertise", "10.78.0.2", "--interface", "dhc0", "--profile", "ipxe",
                "--http-base", "http://10.78.0.2:8080", "--node", f"{UUID}={MAC}")
    time.sleep(1)
    start_qemu(lab, uefi=True)
    wait_for_rrq(lab, pcap, "ipxe.efi", timeout=150)
    script = f"http://10.78.0.2:8080/boot/{UUID}.ipxe"
    deadline = time.monotonic() + 90
    offers: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        events = [json.loads(line) for line in (lab.work / "proxy.out").read_text().splitlines()
                  if line.startswith('{"kind": "dhcp"')]
        offers = [e for e in events if e["reply"] == "offer"]
        files = [(e["arch"], e["file"]) for e in offers]
        if (7, "ipxe.efi") in files and (7, script) in files[files.index((7, "ipxe.efi")) + 1 :]:
            break
        time.sleep(1)
    files = [(e["arch"], e["file"]) for e in offers]
    assert (7, "ipxe.efi") in files, files
    # After EDK2 fetched ipxe.efi, the iPXE it loaded asked again and got the script, not ipxe.efi again.
    # (The NIC's own iPXE EFI ROM may have asked before EDK2 did, hence "after".)
    first_efi = files.index((7, "ipxe.efi"))
    assert (7, script) in files[first_efi + 1 :], files
    assert all(e["server"] == UUID for e in offers)
    # EDK2 makes the :4011 boot server request even though the offer named the file; it was answered
    # (and the RRQ for ipxe.efi above shows the ACK was taken).
    acks = [e for e in events if e["reply"] == "ack"]
    assert acks and acks[0]["file"] == "ipxe.efi" and acks[0]["arch"] == 7 and acks[0]["client"] != "0.0.0.0"
    if os.environ.get("CELLO_CAPTURE_DIR"):
        time.sleep(1)
        shutil.copy(pcap, pathlib.Path(os.environ["CELLO_CAPTURE_DIR"]) / "ovmf-cello.pcap")
