"""The operator's view with real peers: discovered nodes and "why didn't it boot?".

scapy-built DHCP packets go to the real proxyDHCP on loopback; curl fetches over TFTP and HTTP from the
address the node's DHCP named (curl --interface binds the source); libiscsi's iscsi-inq logs in to a
real tgtd with a wrong CHAP secret. The rest is the appliance as `Appliance.build` makes it (store,
boot policy, discovered nodes, workflows, the aiohttp app).

The broken setups diagnosed: no site DHCP (the proxy offers, the node never takes an address), TFTP
disabled, a wrong CHAP secret (everything fetched, the login refused), the template version deleted
under the server (which the API refuses while clones exist: here it goes behind the appliance's back,
straight from the store, as an out-of-band edit or an old backup would), plus the working boot.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from appliance.cli_client import add_client_commands
from appliance.cli_client import run as run_cli
from bootfiles.tftp_server import TftpServer
from bootfiles.tree import BootTree
from dhcp import packet as p
from dhcp.proxy import ProxyDHCP
from domain.discovered import AdoptRule
from iscsi.model import Session
from tests.export_standin import InMemoryExports
from tests.integration.test_api_stack import INITRD, KERNEL, Stack, open_stack, uuid_n
from tests.integration.test_boot_binding import Boot, dhcp_packet, run
from tests.tools import require

CONTROL_PORT = 71  # tgtd control ports: iscsi 40-49, API 60-64, 65 test_fatal, 66 bench, 68 boot_binding, 69, 71 here
PORTAL = "127.0.0.1:13291"
NODE = "127.0.0.2"  # the address the site DHCP "gives" the node (a loopback address curl can bind)


@dataclass
class Lan(Boot):
    """test_boot_binding's LAN (proxy, TFTP server, the client socket) with the fetches and the diagnosis."""

    async def dhcp(self, data: bytes, port: Literal["dhcp", "pxe"] = "dhcp") -> bytes | None:
        return await self.send(data, self.proxy.bound[port][1])

    async def fetch(self, name: str, source: str = NODE, max_time: float = 5) -> tuple[int, str]:
        """curl over TFTP from `source` (exit status 0 = fetched)."""
        return await run("curl", "-sS", "--interface", source, "--max-time", str(max_time), "-o", "/dev/null",
                         f"tftp://127.0.0.1:{self.tftp.address[1]}/{name}")

    async def diagnose(self, uuid: str) -> dict[str, Any]:
        status, body = await self.s.req("GET", f"/api/v1/servers/{uuid}/diagnose")
        assert status == 200, body
        return body  # type: ignore[no-any-return]


@asynccontextmanager
async def lan(tmp: Path, exports: Literal["tgt", "memory"] = "memory",
              before_start: Callable[[Stack], None] = lambda s: None) -> AsyncIterator[Lan]:
    require("curl", packages="curl")
    async with open_stack(tmp, control_port=CONTROL_PORT, portal=PORTAL, exports=exports) as s:
        await s.add_user("alice")
        before_start(s)
        loaders = tmp / "loaders"
        loaders.mkdir()
        (loaders / "pxelinux.0").write_bytes(b"\xeb" * 40_000)  # what the proxy offers BIOS nodes (pxelinux profile)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        events = s.appliance._event_sink()  # the events go to the appliance's bus, as under `cello serve`
        proxy = ProxyDHCP(s.policy, "127.0.0.1", listen="127.0.0.1", port=0, pxe_port=0,
                          reply_port=client.getsockname()[1], broadcast="127.0.0.1", raw_fallback=False, events=events,
                          enabled=s.appliance._enabled("dhcp"))
        tftp = TftpServer("127.0.0.1", 0, BootTree([loaders], s.files_root, s.policy), events=events,
                          enabled=s.appliance._enabled("tftp"))
        await proxy.start()
        await tftp.start()
        try:
            yield Lan(s, proxy, tftp, [], client)
        finally:
            await tftp.stop()
            await proxy.stop()
            client.close()
            assert proxy.stats.errors == 0


async def available(s: Stack, uuid: str, mac: str) -> None:
    status, answer = await s.create(uuid, profile="pxelinux", macs=[mac])
    assert status == 202, answer
    assert (await s.wait_state(uuid))["state"] == "available"
    await s.policy.settled()


async def boot_to_initrd(net: Lan, uuid: str, mac: str) -> None:
    """What a pxelinux node does up to its initramfs: DHCP (the site server gives it NODE), then its loader,
    config, kernel and initrd over TFTP from that address."""
    await net.dhcp(dhcp_packet("discover", mac, uuid))
    await net.dhcp(dhcp_packet("request", mac, uuid, requested=NODE, xid=2))
    for name in ("pxelinux.0", cfg_of(mac), KERNEL, INITRD):
        code, text = await net.fetch(name)
        assert code == 0, (name, text)


def mac_n(n: int) -> str:
    return f"52:54:00:77:0e:{n:02x}"


def cfg_of(mac: str) -> str:
    return "pxelinux.cfg/01-" + mac.replace(":", "-")


# --- discovered nodes ---------------------------------------------------------------------------------


async def test_an_unknown_pxe_client_is_discovered_listed_and_adopted_onto_its_own_clone(tmp_path: Path) -> None:
    async with lan(tmp_path) as net:
        s = net.s
        mac, uuid = mac_n(1), uuid_n(0xE01)
        assert await net.dhcp(dhcp_packet("discover", mac, uuid)) is None  # unknown: no answer ...
        await net.dhcp(dhcp_packet("discover", mac, uuid, xid=2))
        # ... its REQUEST to the site server names the address it got
        await net.dhcp(dhcp_packet("request", mac, uuid, requested=NODE, xid=3))
        assert any(e.kind == "discovered" and e.data["mac"] == mac for e in s.events.recent())
        assert sum(e.kind == "discovered" for e in s.events.recent()) == 1
        status, body = await s.req("GET", "/api/v1/discovered")
        assert status == 200
        assert len(body) == 1
        node = body[0]
        assert (node["mac"], node["uuid"], node["arch"], node["address"], node["count"]) == (mac, uuid, 0, NODE, 2)
        assert node["vendor_class"] == "PXEClient:Arch:00000:UNDI:002001" and node["first_seen"] <= node["last_seen"]
        await s.domain.discovered.flush()
        stored = await s.store.call(s.store.sync.discovered_node, mac)
        assert stored is not None and stored.count == 2 and stored.address == NODE

        # A user token sees none of it; an unknown MAC is 404, a bad one 422.
        assert (await s.req("GET", "/api/v1/discovered", who="alice"))[0] == 403
        assert (await s.req("POST", f"/api/v1/discovered/{mac_n(99)}/adopt",
                            json={"template": "tiny", "user": "alice"}))[0] == 404
        assert (await s.req("DELETE", "/api/v1/discovered/not-a-mac"))[0] == 422

        status, server = await s.req("POST", f"/api/v1/discovered/{mac.replace(':', '-')}/adopt",
                                     json={"template": "tiny", "user": "alice", "profile": "pxelinux"})
        assert status == 202, server
        assert server["uuid"] == uuid and server["macs"] == [mac] and server["state"] == "creating"
        assert (await s.wait_state(uuid))["state"] == "available"
        await s.policy.settled()
        assert (await s.req("GET", "/api/v1/discovered"))[1] == []
        assert await s.store.call(s.store.sync.discovered_node, mac) is None

        # Now it is a server: the proxy answers it, and it is not discovered again.
        reply = await net.dhcp(dhcp_packet("discover", mac, uuid, xid=4))
        assert reply is not None and p.decode(reply).bootfile == "pxelinux.0"
        assert (await s.req("GET", "/api/v1/discovered"))[1] == []
        # Its address was learned while it was a stranger, which gives it nothing: its config is refused
        # until its DHCP names the address again (a reboot), and diagnose says so.
        code, text = await net.fetch(cfg_of(mac))
        assert code != 0, text
        d = await net.diagnose(uuid)
        assert (d["reached"], d["problem"]) == ("dhcp", "config_denied"), d
        await net.dhcp(dhcp_packet("request", mac, uuid, requested=NODE, xid=5))
        code, text = await net.fetch(cfg_of(mac))
        assert code == 0, text
        d = await net.diagnose(uuid)
        assert (d["reached"], d["problem"]) == ("config", "no_kernel"), d


async def test_a_node_with_a_broken_uuid_is_adopted_under_a_new_one_and_forget_works(tmp_path: Path) -> None:
    async with lan(tmp_path) as net:
        s = net.s
        await net.dhcp(dhcp_packet("discover", mac_n(2), "00000000-0000-0000-0000-000000000000"))
        await net.dhcp(dhcp_packet("discover", mac_n(3), None))
        status, body = await s.req("GET", "/api/v1/discovered")
        assert status == 200 and {n["mac"]: n["uuid"] for n in body} == {mac_n(2): None, mac_n(3): None}
        status, server = await s.req("POST", f"/api/v1/discovered/{mac_n(2)}/adopt",
                                     json={"template": "tiny", "user": "alice", "data_volumes": [{"size_gb": 1}]})
        assert status == 202, server
        assert server["uuid"] not in ("00000000-0000-0000-0000-000000000000", "") and server["macs"] == [mac_n(2)]
        assert len(server["volumes"]) == 2
        assert (await s.wait_state(server["uuid"]))["state"] == "available"
        assert (await s.req("DELETE", f"/api/v1/discovered/{mac_n(3)}"))[0] == 204
        assert (await s.req("DELETE", f"/api/v1/discovered/{mac_n(3)}"))[0] == 404
        assert (await s.req("GET", "/api/v1/discovered"))[1] == []


async def test_the_adopt_rule_adopts_matching_clients_only(tmp_path: Path) -> None:
    def rule(s: Stack) -> None:
        s.domain.adoption.rule = AdoptRule(template="tiny", user="alice", mac_prefix="52:54:00:77:0e", arch=0,
                                           profile="pxelinux")

    async with lan(tmp_path, before_start=rule) as net:
        s = net.s
        await net.dhcp(dhcp_packet("discover", mac_n(4), uuid_n(0xE04)))
        await net.dhcp(dhcp_packet("discover", "52:54:00:99:00:01", uuid_n(0xE05)))  # another prefix: only listed
        assert (await s.wait_state(uuid_n(0xE04)))["state"] == "available"
        server = (await s.req("GET", f"/api/v1/servers/{uuid_n(0xE04)}"))[1]
        assert server["macs"] == [mac_n(4)] and server["user"] == "alice" and server["profile"] == "pxelinux"
        assert [n["mac"] for n in (await s.req("GET", "/api/v1/discovered"))[1]] == ["52:54:00:99:00:01"]
        assert any(e.kind == "adopted" and e.data["auto"] is True for e in s.events.recent())


# --- diagnose -----------------------------------------------------------------------------------------


async def test_diagnose_no_site_dhcp(tmp_path: Path) -> None:
    async with lan(tmp_path) as net:
        uuid, mac = uuid_n(0xD01), mac_n(0x11)
        await available(net.s, uuid, mac)
        d = await net.diagnose(uuid)
        assert (d["reached"], d["problem"]) == (None, "no_dhcp")
        # The node's DISCOVERs get the proxy's offer; no site server answers, so it never REQUESTs an address.
        for xid in (1, 2, 3):
            reply = await net.dhcp(dhcp_packet("discover", mac, uuid, xid=xid))
            assert reply is not None and p.decode(reply).message_type == p.DHCPOFFER
        d = await net.diagnose(uuid)
        assert (d["reached"], d["problem"]) == ("dhcp", "no_site_dhcp"), d
        assert "never took an address" in d["summary"]
        # The site server answers after all: the node takes an address, and the next step is named.
        await net.dhcp(dhcp_packet("request", mac, uuid, requested=NODE, xid=4))
        assert (await net.diagnose(uuid))["problem"] == "no_tftp"


async def test_diagnose_tftp_disabled(tmp_path: Path) -> None:
    async with lan(tmp_path) as net:
        s = net.s
        uuid, mac = uuid_n(0xD02), mac_n(0x12)
        await available(s, uuid, mac)
        assert (await s.req("PUT", "/api/v1/services/tftp", json={"enabled": False}))[0] == 200
        await net.dhcp(dhcp_packet("discover", mac, uuid))
        await net.dhcp(dhcp_packet("request", mac, uuid, requested=NODE, xid=2))
        code, _ = await net.fetch("pxelinux.0", max_time=2)
        assert code != 0  # no answer at all
        d = await net.diagnose(uuid)
        assert (d["reached"], d["problem"]) == ("dhcp", "tftp_disabled"), d
        assert d["hints"] == ["cello service enable tftp"]
        assert (await s.req("PUT", "/api/v1/services/tftp", json={"enabled": True}))[0] == 200
        code, text = await net.fetch("pxelinux.0")
        assert code == 0, text
        d = await net.diagnose(uuid)
        assert (d["reached"], d["problem"]) == ("loader", "no_config"), d


async def test_diagnose_template_version_deleted(tmp_path: Path) -> None:
    async with lan(tmp_path) as net:
        s = net.s
        uuid, mac = uuid_n(0xD03), mac_n(0x13)
        await available(s, uuid, mac)
        assert (await s.req("DELETE", "/api/v1/templates/tiny/versions/v1"))[0] == 409  # the API refuses
        await s.store.call(s.store.sync.delete_template_version, "tiny", "v1")  # behind its back
        s.policy.changed()
        await s.policy.settled()
        assert await net.dhcp(dhcp_packet("discover", mac, uuid)) is None  # no boot spec any more
        assert (await s.req("GET", "/api/v1/discovered"))[1] == []  # but still a known node
        d = await net.diagnose(uuid)
        assert d["problem"] == "template_version_deleted", d
        assert "tiny@v1 was deleted" in d["summary"] and "cello server upgrade" in d["hints"][0]


async def test_diagnose_the_whole_boot_then_logged_in(tmp_path: Path) -> None:
    async with lan(tmp_path) as net:
        s = net.s
        uuid, mac = uuid_n(0xD04), mac_n(0x14)
        await available(s, uuid, mac)
        await boot_to_initrd(net, uuid, mac)
        d = await net.diagnose(uuid)
        assert (d["reached"], d["problem"]) == ("initrd", "logging_in"), d  # seconds ago: give it a moment
        assert [st["seen"] for st in d["steps"]] == [True] * 5 + [False]
        driver = s.driver
        assert isinstance(driver, InMemoryExports)
        driver.logged_in[s.servers.iqn(uuid)] = [Session(s.servers.initiator(uuid), NODE)]
        d = await net.diagnose(uuid)
        assert d["ok"] and d["reached"] == "iscsi" and d["problem"] is None
        # Another user's server is not found, as everywhere.
        await s.add_user("bob")
        assert (await s.req("GET", f"/api/v1/servers/{uuid}/diagnose", who="bob"))[0] == 404
        assert (await s.req("GET", f"/api/v1/servers/{uuid}/diagnose", who="alice"))[0] == 200


@pytest.mark.usefixtures("tgt_installed")
async def test_diagnose_wrong_chap_with_a_real_tgtd(tmp_path: Path) -> None:
    require("iscsi-inq", packages="libiscsi-bin")
    async with lan(tmp_path, exports="tgt") as net:
        s = net.s
        uuid, mac = uuid_n(0xD05), mac_n(0x15)
        await available(s, uuid, mac)
        row = await s.store.call(s.store.sync.server, uuid)
        assert row is not None and row.chap_secret
        await boot_to_initrd(net, uuid, mac)
        # The initramfs logs in with a secret that is not the one the target has (an old config's, say).
        rc, out = await run("iscsi-inq", "-i", s.servers.initiator(uuid),
                            f"iscsi://{row.chap_user}%not-the-secret1@{PORTAL}/{s.servers.iqn(uuid)}/1")
        assert rc != 0, out
        d = await net.diagnose(uuid)
        assert (d["reached"], d["problem"]) == ("initrd", "login_refused"), d
        assert "refused its iSCSI login" in d["summary"] and s.servers.initiator(uuid) in d["summary"]
        assert "CHAP secret" in d["hints"][0]


# --- the CLI --------------------------------------------------------------------------------------


async def test_the_cli_lists_adopts_and_diagnoses(tmp_path: Path) -> None:
    import argparse
    import io

    async with lan(tmp_path) as net:
        s = net.s
        mac, uuid = mac_n(0x21), uuid_n(0xE21)
        await net.dhcp(dhcp_packet("discover", mac, uuid))
        api = f"http://127.0.0.1:{s.client.port}"

        def cli(*argv: str) -> tuple[int, str]:
            parser = argparse.ArgumentParser(prog="cello")
            add_client_commands(parser.add_subparsers(dest="command", required=True))
            out = io.StringIO()
            code = run_cli(parser.parse_args([*argv, "--api", api, "--token", s.admin_token]), out)
            return code, out.getvalue()

        code, text = await asyncio.to_thread(cli, "discovered", "list")
        assert code == 0 and mac in text and uuid in text and "0 (bios)" in text, text
        code, text = await asyncio.to_thread(cli, "server", "adopt", mac, "--template", "tiny", "--user", "alice",
                                             "--profile", "pxelinux")
        assert code == 0 and f"adopted {mac} as server {uuid}" in text, text
        assert (await s.wait_state(uuid))["state"] == "available"
        await s.policy.settled()
        code, text = await asyncio.to_thread(cli, "server", "diagnose", uuid)
        assert code == 1 and "problem: no_dhcp" in text and "DHCP offer sent" in text, text


async def test_a_failing_adopt_rule_is_published_once_and_the_node_stays_listed(tmp_path: Path) -> None:
    def rule(s: Stack) -> None:
        s.domain.adoption.rule = AdoptRule(template="tiny", user="nobody", arch=0)  # no such user

    async with lan(tmp_path, before_start=rule) as net:
        s = net.s
        for xid in (1, 2, 3):
            await net.dhcp(dhcp_packet("discover", mac_n(5), uuid_n(0xE06), xid=xid))
        await s.domain.tasks.drain()
        failures = [e for e in s.events.recent() if e.kind == "adopted"]
        assert len(failures) == 1 and failures[0].data["error"] and failures[0].data["server"] is None
        assert (await s.req("GET", f"/api/v1/servers/{uuid_n(0xE06)}"))[0] == 404
        assert [(n["mac"], n["count"]) for n in (await s.req("GET", "/api/v1/discovered"))[1]] == [(mac_n(5), 3)]
