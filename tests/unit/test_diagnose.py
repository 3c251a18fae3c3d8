"""`diagnose` case by case: one snapshot of facts per broken setup, the step it reached and the problem named.

Times are absolute (NOW) so the plain-words summaries are stable; a boot attempt is the run of events
no more than BOOT_GAP apart, so an old successful boot does not hide today's failure."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from domain.diagnose import BOOT_GAP, BootFacts, diagnose, latest_attempt, login_refusals, node_events

NOW = 1_800_000_000.0
UUID = "3f1c2b4e-0000-4000-8000-0000000d1a01"
MAC = "52:54:00:d1:a0:01"
KERNEL = "templates/tiny/v1/vmlinuz"
INITRD = "templates/tiny/v1/initrd.img"
SERVICES = {"dhcp": True, "tftp": True, "http-boot": True, "export": True}


def facts(*events: dict[str, Any], **changes: Any) -> BootFacts:
    base = BootFacts(
        server=UUID, state="available", reason="", template="tiny", version="v1", profile_loader="pxelinux",
        version_present=True, kernel=KERNEL, initrd=INITRD, root_volume=f"tiny-OS-{UUID}", root_state="available",
        root_on_backend=True, target=f"iqn.2026-11.io.cello:{UUID}", exported=True, export_available=True,
        export_detail="", services=SERVICES, macs=(MAC,), configured_address="", bound_address="",
        sessions=(), events=tuple(events), chap=True, now=NOW)
    return dataclasses.replace(base, **changes)


def offer(at: float = NOW - 30, reply: str = "offer") -> dict[str, Any]:
    return {"kind": "dhcp", "at": at, "server": UUID, "mac": MAC, "file": "pxelinux.0", "client": "0.0.0.0",
            "reply": reply}


def tftp(file: str, at: float, outcome: str = "ok", client: str = "10.0.0.9:2070") -> dict[str, Any]:
    return {"kind": "tftp", "at": at, "server": UUID, "file": file, "client": client, "outcome": outcome, "bytes": 1}


def http(file: str, at: float, status: int = 200) -> dict[str, Any]:
    return {"kind": "http", "at": at, "server": UUID, "file": file, "client": "10.0.0.9", "status": status}


def fetched_all(at: float = NOW - 30) -> list[dict[str, Any]]:
    return [offer(at), tftp("pxelinux.0", at + 1), tftp(f"pxelinux.cfg/01-{MAC.replace(':', '-')}", at + 2),
            tftp(KERNEL, at + 3), tftp(INITRD, at + 4)]


def test_no_dhcp_seen() -> None:
    d = diagnose(facts())
    assert (d.reached, d.problem) == (None, "no_dhcp")
    assert "no DHCP request of the node was seen" in d.summary and any("this LAN" in h for h in d.hints)
    assert [s.seen for s in d.steps] == [False] * 6


def test_no_dhcp_with_the_dhcp_service_disabled() -> None:
    assert diagnose(facts(services={**SERVICES, "dhcp": False})).problem == "dhcp_disabled"


def test_an_offer_and_no_address_taken_is_no_site_dhcp() -> None:
    d = diagnose(facts(offer(NOW - 40), offer(NOW - 30)))
    assert (d.reached, d.problem) == ("dhcp", "no_site_dhcp")
    assert "never took an address" in d.summary and "30 s ago" in d.summary
    assert any("site's DHCP server" in h for h in d.hints)


def test_an_offer_an_address_and_no_tftp_fetch() -> None:
    d = diagnose(facts(offer(), bound_address="10.0.0.9"))
    assert (d.reached, d.problem) == ("dhcp", "no_tftp")
    assert any("next-server" in h for h in d.hints) and any("firewall" in h for h in d.hints)
    # The :4011 ack says the node holds an address too (its binding may have expired since).
    assert diagnose(facts(offer(), offer(NOW - 29, reply="ack"))).problem == "no_tftp"


def test_tftp_disabled() -> None:
    refused = tftp("pxelinux.0", NOW - 29, outcome="disabled")
    d = diagnose(facts(offer(), refused, services={**SERVICES, "tftp": False}, bound_address="10.0.0.9"))
    assert (d.reached, d.problem) == ("dhcp", "tftp_disabled")
    assert d.hints == ("cello service enable tftp",)
    # Switched on again since: the refusal in the attempt still names it.
    assert diagnose(facts(offer(), refused, bound_address="10.0.0.9")).problem == "tftp_disabled"


def test_loader_fetched_but_no_config() -> None:
    d = diagnose(facts(offer(), tftp("pxelinux.0", NOW - 29)))
    assert (d.reached, d.problem) == ("loader", "no_config")
    ipxe = facts(offer(), tftp("undionly.kpxe", NOW - 29), profile_loader="ipxe",
                 services={**SERVICES, "http-boot": False})
    assert diagnose(ipxe).problem == "http_boot_disabled"


def test_config_denied_names_the_address_it_went_to_and_why() -> None:
    denied = {"kind": "denied", "at": NOW - 28, "server": UUID, "client": "10.0.0.50", "via": "tftp",
              "file": f"pxelinux.cfg/{UUID}"}
    d = diagnose(facts(offer(), tftp("pxelinux.0", NOW - 29), denied, bound_address="10.0.0.9"))
    assert (d.reached, d.problem) == ("loader", "config_denied")
    assert "refused to 10.0.0.50 over tftp" in d.summary and "10.0.0.9" in d.summary
    d = diagnose(facts(offer(), tftp("pxelinux.0", NOW - 29), denied))
    assert "no DHCP of the node was seen recently" in d.summary


def test_config_fetched_then_kernel_and_initrd() -> None:
    steps = fetched_all()
    assert diagnose(facts(*steps[:3])).problem == "no_kernel"
    assert diagnose(facts(*steps[:4])).problem == "no_initrd"


def test_ipxe_over_http() -> None:
    at = NOW - 30
    d = diagnose(facts(offer(at), tftp("undionly.kpxe", at + 1), http(f"{UUID}.ipxe", at + 2), http(KERNEL, at + 3),
                       http(INITRD, at + 4), profile_loader="ipxe"))
    assert (d.reached, d.problem) == ("initrd", "no_iscsi_login")
    # A failed fetch is no step reached.
    d = diagnose(facts(offer(at), tftp("undionly.kpxe", at + 1), http(f"{UUID}.ipxe", at + 2, status=503)))
    assert d.reached == "loader"


def test_everything_fetched_but_no_session_is_a_refused_login() -> None:
    d = diagnose(facts(*fetched_all()))
    assert (d.reached, d.problem) == ("initrd", "no_iscsi_login")
    assert "holds no iSCSI session" in d.summary and "CHAP" in d.summary
    assert "CHAP secret" in d.hints[0]
    assert not any("CHAP secret" in h for h in diagnose(facts(*fetched_all(), chap=False)).hints)


def test_logged_in_is_booted() -> None:
    d = diagnose(facts(*fetched_all(), sessions=("iqn.node from 10.0.0.9",)))
    assert d.ok and d.reached == "iscsi" and d.problem is None
    assert [s.seen for s in d.steps] == [True] * 6


@pytest.mark.parametrize(("changes", "problem", "words"), [
    ({"state": "creating"}, "not_ready", "still being made"),
    ({"state": "error", "reason": "clone failed: no space"}, "not_available", "clone failed: no space"),
    ({"version_present": False}, "template_version_deleted", "tiny@v1 was deleted"),
    ({"root_on_backend": False}, "root_disk_missing", "gone from the storage backend"),
    ({"root_volume": "", "root_state": ""}, "root_disk_missing", "record is missing"),
    ({"export_available": False, "export_detail": "tgtd died"}, "export_unavailable", "tgtd died"),
    ({"exported": False}, "not_exported", "is not exported"),
])
def test_the_records_problems_come_before_the_boot_path(changes: dict[str, Any], problem: str, words: str) -> None:
    d = diagnose(facts(*fetched_all(), **changes))  # the node did its part: the record is what is wrong
    assert d.problem == problem and words in d.summary
    assert d.reached == "initrd"


def test_an_old_boot_does_not_hide_the_latest_attempt() -> None:
    old = fetched_all(NOW - 3 * BOOT_GAP)
    d = diagnose(facts(*old, offer(NOW - 10)))
    assert (d.reached, d.problem) == ("dhcp", "no_site_dhcp")
    assert len(latest_attempt([*old, offer(NOW - 10)])) == 1


def test_node_events_add_the_fetches_that_named_no_server_from_its_addresses() -> None:
    own = [offer(), {"kind": "workflow", "at": NOW, "server": UUID, "step": "done"}]
    loader = {**tftp("pxelinux.0", NOW - 29, client="10.0.0.9:2070"), "server": None, "id": 7}
    stranger = {**tftp("pxelinux.0", NOW - 29, client="10.0.0.77:2070"), "server": None, "id": 8}
    other_server = {**tftp("pxelinux.0", NOW - 29), "server": "someone-else", "id": 9}
    got = node_events(own, [loader, stranger, other_server], UUID, {"10.0.0.9"})
    assert [e.get("id") for e in got] == [None, 7]
    assert diagnose(facts(*got)).reached == "loader"


def test_a_config_denied_right_after_the_offer_is_not_taken_for_no_site_dhcp() -> None:
    denied = {"kind": "denied", "at": NOW - 29, "server": UUID, "client": "10.0.0.50", "via": "http",
              "file": f"{UUID}.ipxe"}
    d = diagnose(facts(offer(), denied))
    assert (d.reached, d.problem) == ("dhcp", "config_denied")
    # A failed fetch says the node had an address too.
    assert diagnose(facts(offer(), tftp("pxelinux.0", NOW - 29, outcome="not-found"))).problem == "no_tftp"


def test_a_login_the_targets_log_refused_is_named() -> None:
    initiator = f"iqn.2026-11.io.cello:node-{UUID}"
    log = ("tgtd: bs_thread_open(409) 16\n"
           "tgtd: CHAP initiator auth.: authentication of iqn.2026-11.io.cello:node-someone-else failed\n"
           f"tgtd: CHAP initiator auth.: authentication of {initiator} failed (wrong secret!?)\n")
    refusals = login_refusals(log, initiator)
    assert refusals == (f"tgtd: CHAP initiator auth.: authentication of {initiator} failed (wrong secret!?)",)
    d = diagnose(facts(*fetched_all(), login_refusals=refusals))
    assert (d.reached, d.problem) == ("initrd", "login_refused")
    assert "wrong secret" in d.summary and "CHAP secret" in d.hints[0]
    assert login_refusals(log, f"iqn.2026-11.io.cello:node-{UUID[:-1]}9") == ()


def test_a_node_that_just_fetched_its_initrd_is_still_logging_in() -> None:
    d = diagnose(facts(*fetched_all(NOW - 10)))
    assert (d.reached, d.problem) == ("initrd", "logging_in") and not d.ok
    assert diagnose(facts(*fetched_all(NOW - 10), sessions=("iqn.node from 10.0.0.9",))).ok
