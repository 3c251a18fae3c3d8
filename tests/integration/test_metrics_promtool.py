"""`/metrics` of a running appliance after real traffic, checked by Prometheus' own promtool; the alert rules
shipped in contrib/ checked and unit-tested by promtool too.

The stack is `Appliance.build` + `start()` as `cello serve` runs it, every listener on loopback: proxyDHCP
(scapy-built DISCOVER and PXE REQUEST), TFTP and HTTP boot (curl), and a supervised tgtd (control port 72,
portal 127.0.0.1:13292) holding a real initiator's session (libiscsi's iscsi-perf, CHAP) after refusing a
login with a wrong secret (iscsi-inq).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.app import Appliance
from appliance.config import load_config
from dhcp import pxe
from tests.integration.test_api_stack import add_template
from tests.integration.test_dhcp_proxy import Client, discover, uuid_for
from tests.integration.test_serve import free_port
from tests.tools import require

ROOT = Path(__file__).resolve().parents[2]
CONTROL_PORT = 72  # tgtd control ports: iscsi 40-49, API 60-64, 65 test_fatal, 66 bench, 68, 69, 71; 72 here
PORTAL = "127.0.0.1:13292"
N = 7  # the node: uuid_for(7), MAC 52:54:00:78:03:07 (tests/integration/test_dhcp_proxy.py's packets)
UUID = uuid_for(N)
MAC = f"52:54:00:78:03:{N:02x}"
PREFIX = "iqn.2026-11.io.cello"


def promtool() -> str:
    require("promtool", packages="prometheus")
    found = shutil.which("promtool")
    assert found is not None
    return found


@dataclass
class Running:
    appliance: Appliance
    api: str
    token: str
    tftp_port: int
    dhcp_port: int
    pxe_port: int

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.request(
                method, self.api + path, json=body, headers={"Authorization": f"Bearer {self.token}"}) as resp:
            return resp.status, await (resp.json() if resp.content_type == "application/json" else resp.text())


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    require("tgtd", "tgtadm", "iscsi-perf", "iscsi-inq", "curl", root=True, packages="tgt libiscsi-bin curl")
    api_port, tftp_port = free_port(), free_port(socket.SOCK_DGRAM)
    dhcp_port, pxe_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    config = tmp_path / "cello.toml"
    config.write_text(f"""
[appliance]
state_dir = "{tmp_path / 'state'}"
advertise = "127.0.0.1"
[api]
listen = "127.0.0.1:{api_port}"
[tftp]
listen = "127.0.0.1:{tftp_port}"
[dhcp]
listen = "127.0.0.1"
port = {dhcp_port}
pxe_port = {pxe_port}
[iscsi]
driver = "tgt"
portals = ["{PORTAL}"]
tgt_control_port = {CONTROL_PORT}
[boot]
default_profile = "ipxe"
""")
    appliance = Appliance.build(load_config(config), config_path=config)
    domain = appliance.built
    await add_template(domain.store, domain.backend, appliance.files_root)
    await appliance.start()
    try:
        assert appliance.admin_token_printed is not None
        yield Running(appliance, f"http://127.0.0.1:{api_port}", appliance.admin_token_printed, tftp_port,
                      dhcp_port, pxe_port)
    finally:
        await appliance.stop()
        await domain.driver.teardown()


async def run(*argv: str, stdin: bytes | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line of the exposition text."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def total(found: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a family's samples whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in found.items() if re.fullmatch(rf"{re.escape(name)}(\{{.*\}})?", k)
               and all(w in k for w in want))


async def test_metrics_after_dhcp_tftp_http_and_a_session_pass_promtool(running: Running, tmp_path: Path) -> None:
    tool = promtool()
    r = running
    assert (await r.call("POST", "/api/v1/users", {"name": "alice"}))[0] == 201
    status, body = await r.call("POST", "/api/v1/servers", {"uuid": UUID, "template": "tiny", "macs": [MAC],
                                                            "user": "alice"})
    assert status == 202, body
    for _ in range(200):
        status, server = await r.call("GET", f"/api/v1/servers/{UUID}")
        if server["state"] == "available":
            break
        await asyncio.sleep(0.05)
    assert server["state"] == "available", server
    await r.appliance.built.policy.refresh()

    # proxyDHCP: the node's DISCOVER (UEFI x64, arch 7) and its boot-server REQUEST, and a stranger's
    client = Client()
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(client.sock, discover(N, pxe.ARCH_EFI_BC, b"PXEClient:Arch:00007:UNDI:003016",
                                                 ciaddr="127.0.0.1"), ("127.0.0.1", r.dhcp_port))
    ack = await client.ask(discover(N, pxe.ARCH_EFI_BC, b"PXEClient:Arch:00007:UNDI:003016", mtype="request",
                                    ciaddr="127.0.0.1"), r.pxe_port)
    assert ack.bootfile, ack
    await client.silent(discover(200, pxe.ARCH_BIOS, b"PXEClient:Arch:00000:UNDI:002001", ciaddr="127.0.0.1"),
                        r.dhcp_port)

    # TFTP: a loader (ok), and a name that is not there (failed: not-found); HTTP boot: script and kernel
    code, out = await run("curl", "-sS", "-o", str(tmp_path / "loader"), f"tftp://127.0.0.1:{r.tftp_port}/pxelinux.0")
    assert code == 0, out
    code, out = await run("curl", "-sS", "-o", str(tmp_path / "none"), f"tftp://127.0.0.1:{r.tftp_port}/no-such")
    assert code != 0
    code, out = await run("curl", "-sSf", "-o", str(tmp_path / "script"), f"{r.api}/boot/{UUID}.ipxe?mac={MAC}")
    assert code == 0, out
    code, out = await run("curl", "-sSf", "-o", str(tmp_path / "kernel"),
                          f"{r.api}/boot/files/templates/tiny/v1/vmlinuz")
    assert code == 0, out

    # iSCSI: a login with a wrong CHAP secret is refused; the node's initiator, with its own, holds a session
    row = await r.appliance.built.store.call(r.appliance.built.store.sync.server, UUID)
    assert row is not None and row.chap_user
    initiator = r.appliance.built.servers.initiator(UUID)
    code, out = await run("iscsi-inq", "-i", initiator, f"iscsi://{row.chap_user}%not-the-secret@{PORTAL}/{PREFIX}:{UUID}/1")
    assert code != 0, out
    perf = await asyncio.create_subprocess_exec(
        "iscsi-perf", "-i", initiator, "-x", "0", "-m", "2",
        f"iscsi://{row.chap_user}%{row.chap_secret}@{PORTAL}/{PREFIX}:{UUID}/1",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            if await r.appliance.built.driver.sessions(f"{PREFIX}:{UUID}"):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(5.5)  # past the census' reuse window, so this scrape reads the session
        status, text = await r.call("GET", "/metrics")
    finally:
        if perf.returncode is None:
            perf.send_signal(signal.SIGINT)
        await asyncio.wait_for(perf.communicate(), 20)
    assert status == 200
    (tmp_path / "metrics.txt").write_text(text)

    code, out = await run(tool, "check", "metrics", stdin=text.encode())
    assert code == 0, f"promtool check metrics:\n{out}"

    found = samples(text)
    assert total(found, "cello_dhcp_received_total") >= 3
    assert total(found, "cello_dhcp_boot_requests_total", arch="efi-bc") == 2
    assert total(found, "cello_dhcp_offers_total", arch="efi-bc") == 1
    assert total(found, "cello_dhcp_acks_total", arch="efi-bc") == 1
    assert total(found, "cello_dhcp_ignored_total", reason="no boot spec (unknown node)") == 1
    assert total(found, "cello_tftp_transfers_started_total") == 2
    assert total(found, "cello_tftp_transfers_finished_total", outcome="ok") == 1
    assert total(found, "cello_tftp_transfers_failed_total", outcome="not-found") == 1
    assert total(found, "cello_tftp_sent_bytes_total") == (tmp_path / "loader").stat().st_size > 0
    assert "cello_tftp_transfers_active 0" in text.splitlines()
    assert total(found, "cello_http_boot_fetches_total", kind="script", status="200") == 1
    assert total(found, "cello_http_boot_fetches_total", kind="file", status="200") == 1
    assert total(found, "cello_http_boot_bytes_total") == \
        (tmp_path / "script").stat().st_size + (tmp_path / "kernel").stat().st_size
    assert total(found, "cello_iscsi_sessions", server=UUID) == 1
    assert total(found, "cello_iscsi_sessions_readable") == 1
    assert total(found, "cello_iscsi_login_failures_total") == 1
    assert total(found, "cello_workflow_duration_seconds_count", workflow="create", outcome="ok") == 1
    assert total(found, "cello_server_last_dhcp_reply_timestamp_seconds", server=UUID) > 0
    assert total(found, "cello_service_up", service="dhcp") == 1
    assert total(found, "cello_service_up", service="tftp") == 1


ALERTS = ROOT / "contrib" / "prometheus" / "cello-alerts.yml"
ALERT_TESTS = ROOT / "contrib" / "prometheus" / "cello-alerts.test.yml"


def test_alert_rules_pass_promtool_check() -> None:
    proc = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_each_alert_fires_on_a_crafted_series() -> None:
    proc = subprocess.run([promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                          cwd=ALERT_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = set(re.findall(r"^\s*- alert: (\w+)", ALERTS.read_text(), flags=re.M))
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert names and names <= tested, f"alerts without a test: {sorted(names - tested)}"


def test_the_grafana_dashboard_is_valid_promql_over_series_that_exist(tmp_path: Path) -> None:
    import json

    board = json.loads((ROOT / "contrib" / "grafana" / "cello.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = {m for e in exprs for m in re.findall(r"\bcello_[a-z_]+", e)}
    source = (ROOT / "web" / "metrics.py").read_text()
    for name in used:
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f'"{family}"' in source, f"the dashboard uses {name}, which /metrics does not have"
    # promtool parses each query as a recording rule (the dashboard's $instance variable made a regex)
    rules = tmp_path / "panels.yml"
    rules.write_text(json.dumps({"groups": [{"name": "panels", "rules": [
        {"record": f"cello:panel_{i}", "expr": e.replace("$instance", ".*")} for i, e in enumerate(exprs)]}]}))
    proc = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
