"""Who may fetch a node's boot config, with real peers: scapy-built DHCP packets to the proxy on loopback,
then tftp-hpa and curl (TFTP and HTTP) fetching the node's config from the address its DHCP named and
from other loopback addresses (curl --interface binds the source). The real store, provisioner, boot
policy, HTTP app, TFTP server and proxyDHCP; the policy refresh after template builds and deletes too.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from bootfiles.render import render_ipxe, render_pxelinux
from bootfiles.tftp_server import TftpServer
from bootfiles.tree import BootTree
from dhcp import packet as p
from dhcp import pxe
from dhcp.proxy import ProxyDHCP
from domain.store import TemplateVersion
from tests.integration.test_api_stack import INITRD, KERNEL, Stack, needs_tgt, open_stack, uuid_n
from tests.tools import require

pytestmark = needs_tgt

# tgtd control ports: iscsi tests 40-49, API tests 60-64, test_fatal 65, bench 66, this file 68
CONTROL_PORT = 68
PORTAL = "127.0.0.1:13283"
MAC = "52:54:00:77:0b:01"
DENIED_TEXT = "access denied: this boot config is served only to its node's own address"


def dhcp_packet(mtype: str, mac: str, uuid: str | None, *, requested: str | None = None, ciaddr: str = "0.0.0.0",
                giaddr: str = "0.0.0.0", xid: int = 0x0B0B0001) -> bytes:
    opts: list[tuple[str, object] | str] = [
        ("message-type", mtype),
        ("pxe_client_architecture", struct.pack("!H", 0)),
        ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
    ]
    if uuid is not None:
        opts.append(("pxe_client_machine_identifier", b"\x00" + pxe.guid_bytes(uuid)))
    if requested is not None:
        opts.append(("requested_addr", requested))
    chaddr = bytes.fromhex(mac.replace(":", "")) + bytes(10)
    return bytes(BOOTP(op=1, chaddr=chaddr, xid=xid, ciaddr=ciaddr, giaddr=giaddr, flags=0x8000)
                 / DHCP(options=[*opts, "end"]))


@dataclass
class Boot:
    s: Stack
    proxy: ProxyDHCP
    tftp: TftpServer
    events: list[dict[str, object]]
    client: socket.socket  # where proxy replies that would be broadcast go (127.0.0.1)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.s.client.port}"

    async def send(self, data: bytes, port: int, source: str = "127.0.0.1", wait: float = 0.5) -> bytes | None:
        """One datagram to the proxy from `source`, once the proxy has read it: its answer within `wait`
        seconds, or None."""
        before = self.proxy.stats.received
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.setblocking(False)
            await loop.sock_sendto(sock, data, ("127.0.0.1", port))
            for _ in range(1000):  # the proxy's reader runs on this loop: a few turns of it
                if self.proxy.stats.received > before:
                    break
                await asyncio.sleep(0.005)
            assert self.proxy.stats.received > before, "the proxy never read the datagram"
            receives = [asyncio.ensure_future(loop.sock_recv(r, 4096)) for r in (self.client, sock)]
            try:
                done, _ = await asyncio.wait(receives, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                return done.pop().result() if done else None
            finally:
                for task in receives:
                    task.cancel()
                await asyncio.gather(*receives, return_exceptions=True)

    async def tftp_hpa(self, name: str, out: Path) -> tuple[int, str]:
        """tftp-hpa's get (its source address is 127.0.0.1: it has no option to bind another)."""
        return await run("tftp", "-m", "binary", "127.0.0.1", str(self.tftp.address[1]), "-c", "get", name, str(out))

    async def curl(self, url: str, source: str) -> tuple[int, str]:
        """curl from `source`; (exit status, body). TFTP errors are exit statuses, HTTP ones are not."""
        return await run("curl", "-sS", "--interface", source, "--max-time", "10", "-w", "\n%{http_code}", url)

    async def curl_tftp(self, name: str, source: str) -> tuple[int, str]:
        return await self.curl(f"tftp://127.0.0.1:{self.tftp.address[1]}/{name}", source)

    def kinds(self, kind: str) -> list[Mapping[str, object]]:
        return [e for e in self.events if e["kind"] == kind] + [
            {"kind": kind, **e.data} for e in self.s.events.recent() if e.kind == kind]


async def run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.fixture
async def boot(tmp_path: Path) -> AsyncIterator[Boot]:
    require("tftp", "curl", packages="tftp-hpa curl")
    async with open_stack(tmp_path, control_port=CONTROL_PORT, portal=PORTAL) as s:
        await s.add_user("alice")
        events: list[dict[str, object]] = []
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        proxy = ProxyDHCP(s.policy, "127.0.0.1", listen="127.0.0.1", port=0, pxe_port=0,
                          reply_port=client.getsockname()[1], broadcast="127.0.0.1", raw_fallback=False,
                          events=lambda k, f: events.append({"kind": k, **f}))
        tftp = TftpServer("127.0.0.1", 0, BootTree([], s.files_root, s.policy),
                          events=lambda k, f: events.append({"kind": k, **f}))
        await proxy.start()
        await tftp.start()
        try:
            yield Boot(s, proxy, tftp, events, client)
        finally:
            await tftp.stop()
            await proxy.stop()
            client.close()


async def available(s: Stack, uuid: str, **body: Any) -> None:
    status, answer = await s.create(uuid, profile="pxelinux", **body)
    assert status == 202, answer
    assert (await s.wait_state(uuid))["state"] == "available"
    await s.policy.settled()


async def test_the_config_goes_only_to_the_address_the_nodes_dhcp_named(boot: Boot, tmp_path: Path) -> None:
    s = boot.s
    uuid = uuid_n(0xB01)
    await available(s, uuid, macs=[MAC])
    spec = s.policy.boot_spec(uuid=uuid, mac=None)
    assert spec is not None and spec.root is not None
    pxe_text, ipxe_text = render_pxelinux(spec), render_ipxe(spec)
    cfg = "pxelinux.cfg/01-" + MAC.replace(":", "-")
    script = f"{boot.http}/boot/{uuid}.ipxe"
    dhcp_port, pxe_port = boot.proxy.bound["dhcp"][1], boot.proxy.bound["pxe"][1]

    # No DHCP seen, no configured address: nobody gets it.
    _, text = await boot.tftp_hpa(cfg, tmp_path / "x")  # tftp-hpa exits 0 either way
    assert f"Error code 2: {DENIED_TEXT}" in text, text
    code, text = await boot.curl(script, "127.0.0.1")
    assert code == 0 and text.endswith("\n403") and '"error": "denied"' in text, text

    # The node's REQUEST to the site server on :67 (broadcast, option 50): not answered, but learned.
    reply = await boot.send(dhcp_packet("request", MAC, uuid, requested="127.0.0.2"), dhcp_port)
    assert reply is None
    code, text = await boot.curl_tftp(cfg, "127.0.0.2")
    assert code == 0 and text == pxe_text + "\n000", text  # curl prints no HTTP code for TFTP
    code, text = await boot.curl_tftp(f"pxelinux.cfg/{uuid}", "127.0.0.2")
    assert code == 0 and text.startswith(pxe_text), text
    code, text = await boot.curl(script, "127.0.0.2")
    assert code == 0 and text == ipxe_text + "\n200", text
    # ... and from anywhere else, no.
    _, text = await boot.tftp_hpa(cfg, tmp_path / "x")
    assert "Error code 2" in text, text
    code, text = await boot.curl_tftp(f"{uuid}/pxelinux.cfg/default", "127.0.0.3")
    assert code == 69, text  # CURLE_TFTP_PERM: the access violation
    code, text = await boot.curl(script, "127.0.0.3")
    assert code == 0 and text.endswith("\n403") and "not to 127.0.0.3" in text, text

    # The :4011 request comes unicast from the address the node holds now: re-DHCP moves the binding.
    reply = await boot.send(dhcp_packet("request", MAC, uuid, xid=0x0B0B0002), pxe_port, source="127.0.0.3")
    assert reply is not None and p.decode(reply).message_type == p.DHCPACK
    code, text = await boot.curl_tftp(cfg, "127.0.0.3")
    assert code == 0 and text.startswith(pxe_text), text
    code, text = await boot.curl_tftp(cfg, "127.0.0.2")
    assert code == 69, text  # the old address is not the node's any more

    # A relayed request: its source is the relay, which never becomes the node's address.
    await boot.send(dhcp_packet("request", MAC, uuid, giaddr="127.0.0.4", xid=0x0B0B0003), dhcp_port,
                    source="127.0.0.4")
    await boot.send(dhcp_packet("request", MAC, uuid, giaddr="127.0.0.4", xid=0x0B0B0004), pxe_port,
                    source="127.0.0.4")
    code, text = await boot.curl(script, "127.0.0.4")
    assert code == 0 and text.endswith("\n403"), text
    code, text = await boot.curl(script, "127.0.0.3")
    assert code == 0 and text.endswith("\n200"), text

    denied = boot.kinds("denied")
    assert {"kind": "denied", "server": uuid, "client": "127.0.0.1", "file": cfg, "via": "tftp"}.items() \
        <= denied[0].items()
    assert any(e["via"] == "http" and e["client"] == "127.0.0.3" and e["file"] == f"{uuid}.ipxe" for e in denied)
    assert any(e["via"] == "tftp" and e["client"] == "127.0.0.2" for e in denied)
    tftp_outcomes = [e["outcome"] for e in boot.kinds("tftp")]
    assert "denied" in tftp_outcomes and "ok" in tftp_outcomes
    assert 403 in [e["status"] for e in boot.kinds("http")]
    assert boot.proxy.stats.errors == 0


async def test_strangers_fill_nothing_and_a_configured_address_needs_no_dhcp(boot: Boot) -> None:
    s = boot.s
    uuid = uuid_n(0xB02)
    await available(s, uuid, macs=[MAC], address="127.0.0.5")
    code, text = await boot.curl_tftp(f"pxelinux.cfg/{uuid}", "127.0.0.5")
    assert code == 0 and "cello.server=" + uuid in text, text
    code, text = await boot.curl(f"{boot.http}/boot/{uuid}.ipxe", "127.0.0.5")
    assert code == 0 and text.endswith("\n200"), text
    code, text = await boot.curl(f"{boot.http}/boot/{uuid}.ipxe", "127.0.0.6")
    assert code == 0 and text.endswith("\n403"), text
    dhcp_port = boot.proxy.bound["dhcp"][1]
    for i in range(40):  # DHCP of unknown machines: not one binding
        await boot.send(dhcp_packet("request", f"02:00:00:00:0b:{i:02x}", uuid_n(0xC00 + i),
                                    requested=f"127.0.1.{i + 1}", xid=0x0C000000 + i), dhcp_port, wait=0)
    assert len(s.policy.bindings) == 0
    # a stranger claiming the node's UUID with its own MAC is a known UUID: that is what option 97
    # says, and the binding follows it (DHCP is not authenticated; README, "Who may fetch a boot config")
    await boot.send(dhcp_packet("request", "02:00:00:00:0b:ff", uuid, requested="127.0.0.7"), dhcp_port)
    assert len(s.policy.bindings) == 1


async def test_an_unknown_node_boots_a_template_built_while_running(boot: Boot) -> None:
    """dhcp.unknown = "ipxe" with the unknown-node template "mini": nothing to boot until mini is built,
    then (without a restart) every unknown node gets an offer; after mini's only version is deleted,
    none again. The refresh comes from the provisioner's build and delete."""
    s = boot.s
    s.policy.unknown = "ipxe"
    s.policy.unknown_template = "mini"
    await s.policy.refresh()  # as `cello serve` does at start
    stranger = uuid_n(0xD01)
    discover = dhcp_packet("discover", "02:00:00:00:0d:01", stranger)
    dhcp_port = boot.proxy.bound["dhcp"][1]
    assert await boot.send(discover, dhcp_port) is None

    async def builder(name: str, version: str, source: str, progress: Any) -> TemplateVersion:
        await s.backend.create_template(name, 1 << 20)
        await s.backend.snapshot_template(name, version)
        return TemplateVersion(name, version, source, 1 << 20, KERNEL.replace("tiny", name),
                               INITRD.replace("tiny", name), 0.0)

    s.use_builder(builder)
    status, job = await s.req("POST", "/api/v1/templates/mini/builds", json={"source": "tiny"})
    assert status == 202, job
    async with asyncio.timeout(10):
        while job["state"] == "running":
            await asyncio.sleep(0.02)
            status, job = await s.req("GET", f"/api/v1/templates/builds/{job['id']}")
    assert job["state"] == "done", job
    await s.policy.settled()
    reply = await boot.send(discover, dhcp_port)
    assert reply is not None and p.decode(reply).bootfile == "undionly.kpxe"
    # its diskless script (no root disk, no secret) is anyone's
    code, text = await boot.curl(f"{boot.http}/boot/{stranger}.ipxe", "127.0.0.9")
    assert code == 0 and text.endswith("\n200") and "templates/mini/v1/vmlinuz" in text and "sanhook" not in text, text

    status, body = await s.req("DELETE", "/api/v1/templates/mini/versions/v1")
    assert status == 204, body
    await s.policy.settled()
    assert await boot.send(discover, dhcp_port) is None
