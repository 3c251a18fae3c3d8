"""Fixtures of the system tier: one lab (namespaces, site DHCP, Cello, taps) per test module.

The lab's folder is printed at the start; it is removed when every test of the module passed and kept
(serial consoles, Cello's log and event stream, dnsmasq's log, tgtadm output) when one failed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.lab import Lab, LabError


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the system tests need root (network namespaces, taps, tgtd, ports 67/69): run them as root, "
                    "as CI does", pytrace=False)


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    _require_root()
    workdir = Path(os.environ.get("CELLO_LAB_DIR", "/tmp")) / f"cello-e2e-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"\ncello lab: logs in {workdir / 'logs'}")
    the_lab = Lab(workdir)
    failed_before = request.session.testsfailed
    try:
        try:
            the_lab.up()
            the_lab.start_cello()
        except LabError as e:
            pytest.fail(f"{e}\nlogs in {the_lab.logs}\n{the_lab.log_tail()}", pytrace=False)
        yield the_lab
    finally:
        the_lab.down()
        if request.session.testsfailed == failed_before:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\ncello lab: a test failed; logs kept in {workdir / 'logs'}")
