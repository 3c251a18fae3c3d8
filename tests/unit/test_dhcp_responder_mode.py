"""`[dhcp] responder` and the boot policy's snapshot, what the responder's own process answers from."""

from __future__ import annotations

import pickle
import re

import pytest

from appliance.config import ConfigError, parse_config
from domain.bootpolicy import node_access
from tests.unit.test_bootpolicy import U1, U2, V1, _index, _policy, _server

MAC1 = "52:54:00:77:00:10"


def test_the_responder_mode_defaults_to_its_own_process_and_refuses_others() -> None:
    assert parse_config({}).dhcp.responder == "process"
    assert parse_config({"dhcp": {"responder": "loop"}}).dhcp.responder == "loop"
    with pytest.raises(ConfigError, match=re.escape("dhcp.responder: must be one of 'process', 'thread', 'loop'")):
        parse_config({"dhcp": {"responder": "fork"}})


def test_the_snapshot_answers_as_the_policy_does_and_survives_pickling() -> None:
    policy = _policy("compute", [V1])
    servers = [_server(U1, macs=(MAC1,)), _server(U2, state="creating", macs=("52:54:00:77:00:20",))]
    policy.index = _index(servers, None)  # type: ignore[assignment]
    policy.nodes = node_access(servers)
    policy._known_macs = frozenset(m for s in servers for m in s.macs)
    snapshot = pickle.loads(pickle.dumps(policy.snapshot()))
    asks = [(U1, None), (None, MAC1), (U1.upper(), None), (U2, None), (None, "52:54:00:77:00:20"),
            ("3f1c2b4e-0000-4000-8000-0000000000ff", "52:54:00:00:00:99"), (None, None)]
    for uuid, mac in asks:
        assert snapshot.boot_spec(uuid=uuid, mac=mac) == policy.boot_spec(uuid=uuid, mac=mac), (uuid, mac)
    assert snapshot.boot_spec(uuid=U2, mac=None) is None  # named, not ready: never the strangers' boot
    stranger = snapshot.boot_spec(uuid=None, mac="52:54:00:00:00:99")
    assert stranger is not None and stranger.root is None  # the unknown-node profile's diskless boot


def test_the_snapshot_is_new_only_when_something_in_it_is() -> None:
    policy = _policy("ignore", [V1])
    first = policy.snapshot()
    assert policy.snapshot() is first  # nothing replaced: the same object, not sent again
    policy.index = _index([_server(U1, macs=(MAC1,))], None)  # type: ignore[assignment]
    second = policy.snapshot()
    assert second is not first and second.boot_spec(uuid=None, mac=MAC1) is not None
