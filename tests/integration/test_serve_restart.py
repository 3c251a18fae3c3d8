"""`cello serve` stopped, crashed and started again over a real tgtd (control port 68): the tgtd lives on
and is adopted, the restart after a SIGKILL succeeds the first time, one state dir has one appliance, and
`cello teardown` is the only thing that removes the exports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from iscsi.tgtd import process_start_time, read_record
from tests.integration.test_serve import ROOT, _serve, free_port, stop, wait_for_health, write_config
from tests.tools import require

TGT_CONTROL_PORT = 69  # tgtd control ports: iscsi 40-49, API 60-64, test_fatal 65, test_boot_binding 68, here 69


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def serving(config: Path, api: str) -> subprocess.Popen[str]:
    proc = _serve("--config", str(config))
    health = wait_for_health(f"http://{api}/api/v1/health", proc)
    assert health["services"]["export"]["state"] == "running", health  # type: ignore[index]
    return proc


def test_tgtd_outlives_stop_and_crash_and_only_teardown_removes_it(tmp_path: Path) -> None:
    require("tgtd", "tgtadm", root=True, packages="tgt")
    config, api = write_config(tmp_path, iscsi=f"""driver = "tgt"
tgt_control_port = {TGT_CONTROL_PORT}
portals = ["127.0.0.1:{free_port()}"]""")
    record_path = tmp_path / "state" / f"tgtd-{TGT_CONTROL_PORT}.json"
    proc = serving(config, api)
    try:
        record = read_record(record_path)
        assert record is not None and process_start_time(record.pid) == record.started
        pid = record.pid

        # one appliance per state dir; and no teardown under a running appliance
        second = _serve("--config", str(config))
        _, err = second.communicate(timeout=30)
        assert second.returncode == 2 and f"is in use by another cello process (pid {proc.pid})" in err, err
        torn = cli("teardown", "--config", str(config), "--yes")
        assert torn.returncode == 1 and "stop cello serve first" in torn.stderr, torn.stderr

        _, err = stop(proc)  # SIGTERM: a clean stop
        assert proc.returncode == 0, err
        assert process_start_time(pid) == record.started  # tgtd keeps running
        assert f"tgtd -C {TGT_CONTROL_PORT} (pid {pid}) keeps serving the exports" in err, err

        proc = serving(config, api)
        proc.send_signal(signal.SIGKILL)  # a crash: nothing of Cello's stop runs
        proc.wait(timeout=10)
        assert process_start_time(pid) == record.started

        proc = serving(config, api)  # the first start after the crash succeeds
        _, err = stop(proc)
        assert proc.returncode == 0 and "adopted the running tgtd" in err, err
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cli("teardown", "--config", str(config), "--yes")  # leave no tgtd behind a failed test
        raise
    assert process_start_time(pid) == record.started  # still the very first tgtd

    refused = cli("teardown", "--config", str(config))
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert process_start_time(pid) == record.started
    torn = cli("teardown", "--config", str(config), "--yes")
    assert torn.returncode == 0 and "0 target(s) removed (tgt)" in torn.stdout, torn.stderr
    assert process_start_time(pid) is None and read_record(record_path) is None
    again = cli("teardown", "--config", str(config), "--yes")  # nothing left: still fine
    assert again.returncode == 0, again.stderr
