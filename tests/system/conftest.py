"""Fixtures of the system tier: one lab (namespaces, site DHCP, Cello, taps) per test module.

The lab's folder is printed at the start; it is removed when every test of the module passed and kept
(serial consoles, Cello's log and event stream, dnsmasq's log, tgtadm output) when one failed.

`lab` is Lab (one appliance); `fleet` is FleetLab (three appliances, tests/system/fleet_lab.py), on one
PostgreSQL database when the test module sets FLEET_SHARED_STORE = True.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.system.fleet_lab import FleetLab
from tests.system.lab import Lab, LabError, SiteLab

L = TypeVar("L", bound=SiteLab)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the system tests need root (network namespaces, taps, tgtd, ports 67/69): run them as root, "
                    "as CI does", pytrace=False)


def _module_lab(request: pytest.FixtureRequest, make: Callable[[Path], L], start: Callable[[L], None],
                prefix: str) -> Iterator[L]:
    """Builds the lab, starts what `start` starts, yields it; down() after, its folder kept on a failure."""
    _require_root()
    workdir = Path(os.environ.get("CELLO_LAB_DIR", "/tmp")) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"\ncello lab: logs in {workdir / 'logs'}")
    the_lab = make(workdir)
    failed_before = request.session.testsfailed
    try:
        try:
            the_lab.up()
            start(the_lab)
            print(f"\ncello lab: up in {time.monotonic() - the_lab.locked_at:.1f} s (from taking the lock)")
        except LabError as e:
            pytest.fail(f"{e}\nlogs in {the_lab.logs}\n{the_lab.log_tail()}", pytrace=False)
        yield the_lab
    finally:
        the_lab.down()
        if request.session.testsfailed == failed_before:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\ncello lab: a test failed; logs kept in {workdir / 'logs'}")


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    yield from _module_lab(request, Lab, Lab.start_cello, "cello-e2e")


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest) -> Iterator[FleetLab]:
    shared = bool(getattr(request.module, "FLEET_SHARED_STORE", False))
    yield from _module_lab(request, lambda workdir: FleetLab(workdir, shared_store=shared),
                           FleetLab.start_all, "cello-fleet")
