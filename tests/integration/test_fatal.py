"""After start, the first service that fails for good stops the whole appliance, with one clear line.

The real process with its real tgtd: tgtd is killed and every restart fails, so the export service is
over and `cello serve` must exit 1 naming it. And in-process: a TFTP listener that asyncio closes
under the server takes everything down and releases every port.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from appliance.app import Appliance, FatalError
from appliance.config import load_config, split_host_port
from tests.integration.test_serve import _serve, free_port, wait_for_health, write_config

TGT_CONTROL_PORT = 65  # tgtd control ports: iscsi tests 40-49, API tests 60-64, this file 65


def tgtd_wrapper(tmp_path: Path) -> Path:
    """A `tgtd` first on PATH that runs the real one once and then refuses to start, like a tgtd whose
    config or portal went bad after the appliance started."""
    real = shutil.which("tgtd")
    if real is None or os.geteuid() != 0:
        pytest.fail("needs root and tgt (scripts/setup.sh installs it)")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "tgtd"
    marker = tmp_path / "tgtd-started-once"
    wrapper.write_text(f"""#!/bin/sh
if [ -e {marker} ]; then echo "tgtd: refusing to start (test)" >&2; exit 1; fi
touch {marker}
exec {real} "$@"
""")
    wrapper.chmod(0o755)
    return bindir


def tgtd_pid(control_port: int) -> int:
    out = subprocess.run(["pgrep", "-f", f"tgtd -f -C {control_port} "], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, f"expected one tgtd -C {control_port}, found {pids}"
    return pids[0]


def test_a_tgtd_that_cannot_be_restarted_stops_the_appliance(tmp_path: Path) -> None:
    bindir = tgtd_wrapper(tmp_path)
    config, api = write_config(tmp_path, iscsi=f"""driver = "tgt"
tgt_control_port = {TGT_CONTROL_PORT}
portals = ["127.0.0.1:{free_port()}"]""")
    tftp_port = split_host_port(load_config(config).tftp.listen)[1]
    env_path = f"{bindir}:{os.environ['PATH']}"
    proc = _serve("--config", str(config), env={"PATH": env_path})
    try:
        health = wait_for_health(f"http://{api}/api/v1/health", proc)
        assert health["services"]["export"]["state"] == "running", health  # type: ignore[index]
        os.kill(tgtd_pid(TGT_CONTROL_PORT), signal.SIGKILL)
        killed = time.monotonic()
        # 5 restarts with back-off 0.2 .. 3.2 s: about 6 s, then everything stops within 5 s
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("cello: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cello: fatal: export: tgtd -C {TGT_CONTROL_PORT} died and could not be "
                               "restarted (5 attempts): "), err
    assert "refusing to start (test)" in lines[0]
    assert "Traceback" not in err
    assert took < 20, took
    host, port = api.rsplit(":", 1)
    with socket.socket() as s:  # the API port is free again: the other services were stopped too
        # (SO_REUSEADDR as every server sets it: the health request's connection is in TIME_WAIT;
        # a listener still there would refuse the bind all the same)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
        s.listen()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", tftp_port))


async def test_a_lost_tftp_listener_stops_every_service_and_frees_its_ports(tmp_path: Path) -> None:
    config, api = write_config(tmp_path)
    cfg = load_config(config)
    api_port = split_host_port(api)[1]
    tftp_port = split_host_port(cfg.tftp.listen)[1]
    dhcp_port, pxe_port = cfg.dhcp.port, cfg.dhcp.pxe_port
    appliance = Appliance.build(load_config(config), config_path=config)
    await appliance.start()
    try:
        tftp = next(slot.service for slot in appliance.slots if slot.name == "tftp")
        # What asyncio does to a datagram transport on an error it cannot go on from: close it, which
        # calls the protocol's connection_lost.
        tftp.listener.transport.close()  # type: ignore[union-attr]
        with pytest.raises(FatalError, match=r"^tftp: listening socket closed"):
            await asyncio.wait_for(appliance.wait(), timeout=5)
        assert appliance.health()["tftp"]["state"] == "failed"
    finally:
        await asyncio.wait_for(appliance.stop(), timeout=5)
    assert {name: h["state"] for name, h in appliance.health().items() if name in ("api", "dhcp")} == \
        {"api": "off", "dhcp": "off"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", api_port))
    for port in (tftp_port, dhcp_port, pxe_port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", port))
