"""/metrics on the real app (in-process tier): workflow durations and power-on -> root measured from what
the domain publishes, sessions per target from the export driver, and the services' own counters read
through WebDeps.collect."""

from __future__ import annotations

import asyncio
import re

from iscsi.model import Session
from tests.integration.test_api_lifecycle import exports, new_version
from tests.integration.test_api_stack import Stack, api_stack_in_memory, uuid_n

__all__ = ["api_stack_in_memory"]
U = uuid_n(77)
BOOT_DELAY = 0.3  # seconds the stand-in node takes from power-on to its iSCSI login


class SlowNode:
    """The node's BMC: power off ends its session; power on logs it in again BOOT_DELAY later."""

    def __init__(self, s: Stack) -> None:
        self.s = s
        self.iqn = s.servers.iqn(U)

    async def status(self) -> str:
        return "on" if exports(self.s).logged_in.get(self.iqn) else "off"

    async def power(self, action: str) -> str:
        if action == "off":
            exports(self.s).logged_in.pop(self.iqn, None)
            return "off"
        asyncio.get_running_loop().call_later(BOOT_DELAY, exports(self.s).logged_in.__setitem__, self.iqn,
                                              [Session(self.s.servers.initiator(U), "10.77.0.177")])
        return "on"

    async def boot_pxe_once(self) -> None:
        pass


def value(text: str, sample: str) -> float:
    found = [float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(sample + " ")]
    assert len(found) == 1, (sample, [line for line in text.splitlines() if sample.split("{")[0] in line])
    return found[0]


async def test_rebuild_with_reboot_gives_workflow_and_power_on_to_root_durations(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    status, body = await s.create(U, who="alice")
    assert status == 202, body
    await s.wait_state(U)
    await new_version(s, "v2", b"tiny-v2!")
    exports(s).logged_in[s.servers.iqn(U)] = [Session(s.servers.initiator(U), "10.77.0.177")]
    s.domain.lifecycle.power_for = lambda server: SlowNode(s)
    s.domain.lifecycle.poll = 0.02
    s.domain.census.fresh = 0.0  # every scrape reads the driver (the test changes sessions under it)

    status, text = await s.req("GET", "/metrics", None)
    iqn = s.servers.iqn(U)
    assert value(text, f'cello_iscsi_sessions{{target="{iqn}",server="{U}"}}') == 1
    assert value(text, "cello_boot_power_on_to_root_seconds_count") == 0

    status, report = await s.req("POST", f"/api/v1/servers/{U}/rebuild", "alice", json={"reboot": True})
    assert status == 200 and report["powered"][-1] == "reached root", report
    await asyncio.sleep(0)
    status, text = await s.req("GET", "/metrics", None)
    assert status == 200
    assert value(text, "cello_boot_power_on_to_root_seconds_count") == 1
    took = value(text, "cello_boot_power_on_to_root_seconds_sum")
    assert BOOT_DELAY <= took < BOOT_DELAY + 1.0, took
    assert value(text, 'cello_boot_power_on_to_root_seconds_bucket{le="5.0"}') == 1
    assert value(text, 'cello_workflow_duration_seconds_count{workflow="create",outcome="ok"}') == 1
    assert value(text, 'cello_workflow_duration_seconds_count{workflow="rebuild",outcome="ok"}') == 1
    rebuild = value(text, 'cello_workflow_duration_seconds_sum{workflow="rebuild",outcome="ok"}')
    assert 0 < rebuild < took  # unexport -> done: before the node was powered on again
    assert value(text, f'cello_iscsi_sessions{{target="{iqn}",server="{U}"}}') == 1

    # the export driver cannot answer: no session figure, and the page still renders
    async def broken(iqn: str) -> list[Session]:
        raise OSError("driver gone")
    exports(s).sessions = broken  # type: ignore[method-assign]
    status, text = await s.req("GET", "/metrics", None)
    assert status == 200 and value(text, "cello_iscsi_sessions_readable") == 0
    assert not re.search(r"^cello_iscsi_sessions\{", text, flags=re.M)


async def test_the_services_counters_before_any_traffic_and_service_up(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    status, text = await s.req("GET", "/metrics", None)
    assert status == 200
    # the stack's proxyDHCP and TFTP server are built (not started): their own counters, all zero
    for sample in ("cello_dhcp_received_total", "cello_tftp_transfers_started_total", "cello_tftp_transfers_active",
                   "cello_tftp_sent_bytes_total"):
        assert value(text, sample) == 0
    for family in ("cello_dhcp_offers_total", "cello_tftp_transfers_failed_total", "cello_http_boot_fetches_total"):
        assert f"# TYPE {family} counter" in text and not re.search(rf"^{family}[ {{]", text, flags=re.M)
    # the stack's health report says export and api run: both up
    assert value(text, 'cello_service_up{service="api"}') == 1
    s.health_report["export"] = {"state": "failed", "detail": "tgtd died"}
    status, text = await s.req("GET", "/metrics", None)
    assert value(text, 'cello_service_up{service="export"}') == 0
