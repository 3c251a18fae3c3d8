"""Who is logged in to a target, as each driver reads it: tgt's I_T nexus list, ctld's `ctladm islist -x`."""

from __future__ import annotations

import pytest

from iscsi.ctld import CtladmParseError, parse_islist
from iscsi.model import Session
from iscsi.tgt_show import parse_show

TGT_SHOW = """Target 1: iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000001
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 3
            Initiator: iqn.2026-11.io.cello:node-3f1c2b4e-0000-4000-8000-000000000001 alias: none
            Connection: 0
                IP Address: 10.77.0.104
        I_T nexus: 7
            Initiator: iqn.1993-08.org.debian:01:stranger alias: box
            Connection: 0
                IP Address: 10.77.0.200
            Connection: 1
                IP Address: 10.77.0.201
    LUN information:
        LUN: 0
            Type: controller
    Account information:
    ACL information:
        ALL
Target 2: iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000002
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
    Account information:
    ACL information:
        ALL
"""

ISLIST = """<ctlislist>
<connection id="5"><initiator>iqn.2026-11.io.cello:node-3f1c2b4e-0000-4000-8000-000000000001</initiator>\
<initiator_addr>10.77.0.104</initiator_addr><initiator_alias></initiator_alias>\
<target>iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000001</target><target_alias></target_alias>\
<target_portal_group_tag>257</target_portal_group_tag><header_digest>None</header_digest>\
<data_digest>None</data_digest><offload>None</offload></connection>
<connection id="6"><initiator>iqn.1998-01.com.vmware:esx</initiator><initiator_addr>10.77.0.9</initiator_addr>\
<target>iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000002</target></connection>
</ctlislist>
"""


def test_tgt_show_reads_every_nexus_with_its_first_address() -> None:
    targets = parse_show(TGT_SHOW)
    assert targets[1].nexus == {
        "3": ["iqn.2026-11.io.cello:node-3f1c2b4e-0000-4000-8000-000000000001", "10.77.0.104"],
        "7": ["iqn.1993-08.org.debian:01:stranger", "10.77.0.200"],
    }
    assert targets[2].nexus == {}


def test_ctladm_islist_by_target() -> None:
    found = parse_islist(ISLIST)
    assert found == [
        ("iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000001",
         Session("iqn.2026-11.io.cello:node-3f1c2b4e-0000-4000-8000-000000000001", "10.77.0.104")),
        ("iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000002",
         Session("iqn.1998-01.com.vmware:esx", "10.77.0.9")),
    ]
    assert str(found[1][1]) == "iqn.1998-01.com.vmware:esx from 10.77.0.9"
    assert parse_islist("<ctlislist>\n</ctlislist>\n") == []


@pytest.mark.parametrize("bad", ["", "<ctlportlist></ctlportlist>", "<ctlislist><connection>"])
def test_ctladm_islist_refuses_what_is_not_its_xml(bad: str) -> None:
    with pytest.raises(CtladmParseError):
        parse_islist(bad)
