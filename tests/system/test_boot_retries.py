"""A node whose first iSCSI login is refused retries and boots (issue 15).

One lab for the module. The node's target is removed behind the appliance's back (tgtadm, as a tgtd
restart would leave it) just before the node boots; its initramfs's first login fails; a reconcile puts
the target back while the node waits, and a later try logs in and boots its own clone. With the
root-on-iSCSI settings (replacement_timeout 86400) iscsistart itself goes on trying a refused login
(every ~30 s here) rather than exiting; the initramfs's own retry (image-build/tiny/init `retry`, unit-
tested in tests/unit/test_boot_retries.py) covers an iscsistart that does exit, as on a refused TCP
connection.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.system.lab import TGT_CONTROL_PORT, Lab
from tests.system.test_e2e_boot import (
    BOOT_TIMEOUT,
    IQN_PREFIX,
    USER,
    api_ok,
    check_logged_in,
    cli_ok,
    create_server,
    fail_with_logs,
    marker,
    target_block,
)

pytestmark = pytest.mark.system

NODE = ("retrier", "3f1c2b4e-0000-4000-8000-0000000000f1", "52:54:00:77:00:f1")
FIRST_FAILURE = "Kernel reported iSCSI connection 1:0 error"  # the target is not there: the login failed
RETRY_TIMEOUT = 200.0  # power-on → root with one refused login and iscsistart's ~30 s retry under TCG


def tid_of(lab: Lab, iqn: str) -> str:
    block = target_block(lab.tgt_show(), iqn)
    assert block, f"no target {iqn}"
    return block.split(":", 1)[0].split()[-1]


def test_a_node_whose_first_login_is_refused_retries_and_boots(lab: Lab) -> None:
    cli_ok(lab, "user", "create", USER, "--max-volumes", "4", "--max-data-gb", "4")
    cli_ok(lab, "template", "build", "tiny", "--from", "tiny", timeout=240)
    server = create_server(lab, NODE, "pxelinux")
    uuid, iqn = server["uuid"], f"{IQN_PREFIX}:{NODE[1]}"
    subprocess.run(["tgtadm", "-C", str(TGT_CONTROL_PORT), "--lld", "iscsi", "--op", "delete", "--force",
                    "--mode", "target", "--tid", tid_of(lab, iqn)], check=True, capture_output=True, timeout=30)
    assert not target_block(lab.tgt_show(), iqn)  # the node's target is away
    node = lab.node(*NODE)
    node.power_on()
    try:
        refused_after = node.wait_console(FIRST_FAILURE, BOOT_TIMEOUT)
        api_ok(lab, "POST", "/api/v1/reconcile")  # the appliance puts the target back while the node waits
        assert target_block(lab.tgt_show(), iqn)
        root_after = node.wait_console(marker(uuid), RETRY_TIMEOUT)
    except Exception as e:
        fail_with_logs(lab, f"{e}\n--- console\n{node.console()[-3000:]}")
    console = node.console()
    print(f"\nfirst login refused {refused_after:.1f} s after power-on; root reached at {root_after:.1f} s")
    assert "cello-initramfs-failed" not in console, console[-2000:]  # it never gave up
    check_logged_in(lab, uuid)
    lab.release(node)
