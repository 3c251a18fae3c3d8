"""Issue 16's system test: three appliances (a, b, c) in their own namespaces on one PostgreSQL database
(tests/system/fleet_lab.py), one qemu node (TCG, BIOS, iPXE) on the site's wire.

The steps run in file order on one fleet:
  1. the tiny template is built on a and replicates to b and c (a verified copy on each);
  2. six servers asked of a are placed across the three by capacity (40/80/120 GiB);
  3. the node's server is pinned to b; with a stopped, the node boots from b's clone (b's tgtd holds
     its session; only b answered it);
  4. c disabled: placement avoids it, a create pinned to it is refused with the reason;
  5. the node powered off, its server moves from b to c, and the node boots from c's clone;
  6. the database down and c restarted on an empty tgtd (a host restart): c starts on its cached boot
     index, exports the node's target from it, and the node boots again.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.system.fleet_lab import FleetLab
from tests.system.lab import LabError, Node
from tests.system.test_e2e_boot import BOOT_TIMEOUT, IQN_PREFIX, marker, target_block, wait_until

pytestmark = pytest.mark.system

FLEET_SHARED_STORE = True  # tests/system/conftest.py: the three appliances share one PostgreSQL database
USER = "fleet"
NODE = ("fleetnode", "3f1c2b4e-0000-4000-8000-0000000000e1", "52:54:00:77:00:e1")
IQN = f"{IQN_PREFIX}:{NODE[1]}"
seen: dict[str, Any] = {}


def ok(fleet: FleetLab, name: str, method: str, path: str, body: object | None = None, *,
       status: int = 200) -> Any:
    got, answer = fleet.api(name, method, path, body)
    assert got == status, f"{name}: {method} {path}: {got} {answer}"
    return answer


def wait_available(fleet: FleetLab, name: str, uuid: str, timeout: float = 90) -> dict[str, Any]:
    def available() -> dict[str, Any] | None:
        server = ok(fleet, name, "GET", f"/api/v1/servers/{uuid}")
        assert server["state"] != "error", server
        return server if server["state"] == "available" else None
    got: dict[str, Any] = wait_until(f"server {uuid} available", available, timeout)
    return got


def boot_from(fleet: FleetLab, node: Node, owner: str) -> float:
    """Power on, wait for the root's marker; the node's session is on `owner`'s tgtd (the initiator
    logged in to its target there), and on nobody else's."""
    node.power_on()
    try:
        took = node.wait_console(marker(node.uuid), BOOT_TIMEOUT)
    except LabError as e:
        raise AssertionError(f"{e}\nlogs in {fleet.logs}") from None
    initiator = f"Initiator: {IQN_PREFIX}:node-{node.uuid}"
    wait_until(f"{owner}'s tgtd holds the node's session",
          lambda: initiator in target_block(fleet.tgt_show(owner), IQN), 30)
    for other in fleet.names:
        if other != owner:
            assert initiator not in fleet.tgt_show(other), f"{other} holds a session of the node too"
    return took


def test_1_a_template_built_on_a_replicates_to_b_and_c(fleet: FleetLab) -> None:
    ok(fleet, "a", "POST", "/api/v1/users", {"name": USER, "max_volumes": 64, "max_data_gb": 1024}, status=201)
    built = fleet.cli("a", "template", "build", "tiny", "--from", "tiny", timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr

    def replicated() -> dict[str, Any] | None:
        view = {v["name"]: v for v in ok(fleet, "a", "GET", "/api/v1/appliances")}
        return view if len(view) == 3 and all("tiny@v1" in v["templates"] for v in view.values()) else None
    view = wait_until("tiny@v1 held (verified) by a, b and c", replicated, 180)
    assert {v["state"] for v in view.values()} == {"up"}, view
    print("\nfleet: " + "; ".join(f"{n}: {v['templates']} {v['capacity_bytes'] >> 30} GiB" for n, v in view.items()))


def test_2_six_servers_are_placed_by_capacity(fleet: FleetLab) -> None:
    placed: dict[str, str] = {}
    for n in range(6):
        uuid = f"3f1c2b4e-0000-4000-8000-0000000000{0xa0 + n:02x}"
        body = ok(fleet, "a", "POST", "/api/v1/servers",
                  {"uuid": uuid, "template": "tiny", "user": USER, "data_volumes": [{"size_gb": 8}]}, status=202)
        placed[uuid] = body["placement"]["chosen"]
        print(f"\nfleet: {uuid} → {body['placement']['explain']}")
    counts = {name: list(placed.values()).count(name) for name in fleet.names}
    assert counts["c"] >= counts["b"] >= counts["a"] and counts["c"] > counts["a"], counts
    for uuid, where in placed.items():
        wait_available(fleet, where, uuid)
        assert f"{IQN_PREFIX}:{uuid}" in fleet.tgt_show(where)
    seen["placed"] = placed


def test_3_the_node_boots_from_bs_clone_while_a_is_stopped(fleet: FleetLab) -> None:
    name, uuid, mac = NODE
    body = ok(fleet, "a", "POST", "/api/v1/servers", {"uuid": uuid, "template": "tiny", "user": USER,
                                                     "profile": "ipxe", "macs": [mac], "appliance": "b"},
              status=202)
    assert body["appliance"] == "b", body
    wait_available(fleet, "b", uuid)
    fleet.stop("a")
    node = fleet.node(name, uuid, mac)
    try:
        took = boot_from(fleet, node, "b")
    finally:
        fleet.release(node)
    assert IQN not in fleet.tgt_show("c")
    print(f"\nfleet: power-on → root from b's clone in {took:.1f} s, a stopped")
    seen["booted-b"] = took


def test_4_disabling_c_stops_placement_there(fleet: FleetLab) -> None:
    ok(fleet, "b", "POST", "/api/v1/appliances/c/disable", {"reason": "maintenance"})
    got, answer = fleet.api("b", "POST", "/api/v1/servers", {
        "uuid": "3f1c2b4e-0000-4000-8000-0000000000b1", "template": "tiny", "user": USER, "appliance": "c"})
    assert got == 409 and "maintenance" in answer["detail"], answer
    body = ok(fleet, "b", "POST", "/api/v1/servers", {
        "uuid": "3f1c2b4e-0000-4000-8000-0000000000b2", "template": "tiny", "user": USER}, status=202)
    assert body["placement"]["chosen"] == "b", body  # a is down (stopped), c disabled
    assert "down" in body["placement"]["rejected"]["a"] and "maintenance" in body["placement"]["rejected"]["c"]
    ok(fleet, "b", "POST", "/api/v1/appliances/c/enable")


def test_5_moved_from_b_to_c_while_off_it_boots_from_c(fleet: FleetLab) -> None:
    assert "booted-b" in seen, "needs step 3"
    name, uuid, mac = NODE
    # the node was killed: tgtd drops its session after its NOP-Ins go unanswered (a move waits for that)
    initiator = f"Initiator: {IQN_PREFIX}:node-{uuid}"
    wait_until("b's tgtd drops the powered-off node's session",
          lambda: initiator not in target_block(fleet.tgt_show("b"), IQN), 60)
    moved = ok(fleet, "b", "POST", f"/api/v1/servers/{uuid}/move", {"appliance": "c"})
    assert moved["appliance"] == "c" and moved["state"] == "available", moved
    wait_until("c exports the moved server", lambda: IQN in fleet.tgt_show("c"), 30)
    wait_until("b no longer exports it", lambda: IQN not in fleet.tgt_show("b"), 30)
    node = fleet.node(name, uuid, mac)
    try:
        took = boot_from(fleet, node, "c")
    finally:
        fleet.release(node)
    print(f"\nfleet: after the move, power-on → root from c's clone in {took:.1f} s")
    seen["booted-c"] = took


def test_6_with_the_database_down_c_restarted_on_an_empty_tgtd_still_boots_the_node(fleet: FleetLab) -> None:
    """A site outage: c's host restarts (its tgtd, and every target with it, gone) while the database
    is still down. c starts on its cached boot index, exports the node's target from it, and the node
    boots from its clone; once the database is back, c finishes its start."""
    assert "booted-c" in seen, "needs step 5"
    name, uuid, mac = NODE
    initiator = f"Initiator: {IQN_PREFIX}:node-{uuid}"
    wait_until("c's tgtd drops the powered-off node's session",
               lambda: initiator not in target_block(fleet.tgt_show("c"), IQN), 60)
    fleet.stop("c")
    fleet.teardown("c")  # what a host restart leaves of tgtd: nothing
    fleet.store_outage()
    try:
        fleet.start("c")
        health = ok(fleet, "c", "GET", "/api/v1/health")["services"]
        assert health["store"]["state"] == "unavailable", health
        wait_until("c exports the node's target from its cache", lambda: IQN in fleet.tgt_show("c"), 30)
        got, answer = fleet.api("c", "GET", "/api/v1/servers")
        assert got == 503 and answer["error"] == "store_unavailable", answer
        node = fleet.node(name, uuid, mac)
        try:
            took = boot_from(fleet, node, "c")
        finally:
            fleet.release(node)
    finally:
        fleet.store_back()
    wait_until("c reaches the database again",
               lambda: ok(fleet, "c", "GET", "/api/v1/health")["services"]["store"]["state"] == "running", 90)
    assert ok(fleet, "c", "GET", f"/api/v1/servers/{uuid}")["appliance"] == "c"
    print(f"\nfleet: database down, c restarted on an empty tgtd: power-on → root from c's clone in {took:.1f} s")
