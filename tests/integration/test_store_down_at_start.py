"""`cello serve` started while its PostgreSQL store is down (a real cluster of its own, halted; a real tgtd
on control port 71; curl's TFTP and HTTP as the node): it starts on the boot index it cached at its last
run and answers the node with the same config, leaves the exports as tgtd holds them, answers the API
503, and once the database is back reconciles and serves the store's index, with no restart. With no
cache it refuses to start, in one line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from domain.errors import StoreUnreachable
from domain.store import AsyncStore, open_store
from iscsi.file_backend import FileBackend
from tests.integration.test_api_stack import add_template, uuid_n
from tests.integration.test_serve import ROOT, free_port
from tests.pgserver import PgServer
from tests.tools import require

TGT_CONTROL_PORT = 71  # tgtd control ports: iscsi 40-49, API 60-64, test_fatal 65, … test_serve_restart 69, here 71
TOKEN = "store-down-admin-token-0123456789"
MAC = "52:54:00:5d:00:01"


def _config(tmp: Path, url: str) -> tuple[Path, str, int]:
    api, tftp = f"127.0.0.1:{free_port()}", free_port(2)  # 2: SOCK_DGRAM
    path = tmp / "cello.toml"
    path.write_text(f"""
[appliance]
state_dir = "{tmp / 'state'}"
advertise = "127.0.0.1"
[api]
listen = "{api}"
admin_token = "{TOKEN}"
[tftp]
listen = "127.0.0.1:{tftp}"
[dhcp]
enabled = false
[iscsi]
driver = "tgt"
tgt_control_port = {TGT_CONTROL_PORT}
portals = ["127.0.0.1:{free_port()}"]
[boot]
default_profile = "pxelinux"
[store]
url = "{url}"
[fleet]
name = "a"
""")
    return path, api, tftp


class Serve:
    """One `cello serve`, its log in a file (a pipe nobody reads could fill and stall it)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)],
                                     stdout=out, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        out.close()

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)


def _http(method: str, url: str, body: object | None = None, token: str | None = TOKEN) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            data = r.read()
            return r.status, json.loads(data) if data else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _until(what: str, check: Any, serve: Serve, within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert serve.proc.poll() is None, f"cello serve exited {serve.proc.returncode}: {serve.text()[-3000:]}"
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"not within {within} s: {what}\n{serve.text()[-3000:]}")


def _health(api: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{api}/api/v1/health", timeout=2) as r:
        return dict(json.load(r))["services"]


def _tftp(port: int, name: str) -> tuple[int, str]:
    done = subprocess.run(["curl", "-sS", "--max-time", "10", f"tftp://127.0.0.1:{port}/{name}"],
                          capture_output=True, text=True, timeout=20)
    return done.returncode, done.stdout + done.stderr


def _targets() -> str:
    return subprocess.run(["tgtadm", "-C", str(TGT_CONTROL_PORT), "--lld", "iscsi", "--op", "show", "--mode",
                           "target"], capture_output=True, text=True, timeout=20).stdout


def _teardown(config: Path) -> None:
    subprocess.run([sys.executable, "-m", "appliance", "teardown", "--config", str(config), "--yes"],
                   capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))


async def _seed(url: str, state: Path) -> None:
    store = AsyncStore(open_store(url, state / "cello.db"))
    try:
        await add_template(store, FileBackend(state / "volumes"), state / "boot")
    finally:
        store.close()


def test_serve_starts_on_its_cached_boot_index_while_the_database_is_down(tmp_path: Path) -> None:
    require("tgtd", "tgtadm", "curl", "iscsi-inq", root=True, packages="tgt curl libiscsi-bin")
    pg = PgServer.start()  # its own cluster: this test halts it
    config: Path | None = None
    serve: Serve | None = None
    try:
        url = pg.create_database("cello")
        config, api, tftp = _config(tmp_path, url)
        asyncio.run(_seed(url, tmp_path / "state"))
        uuid = uuid_n(0x5D)
        cfg = "pxelinux.cfg/01-" + MAC.replace(":", "-")

        # a first run with the database up: the server is made, its config served, the index cached
        serve = Serve(config, tmp_path / "serve-1.log")
        _until("the API", lambda: _health(api), serve)
        assert _health(api)["store"] == {"state": "running", "detail": "PostgreSQL"}
        assert _http("POST", f"http://{api}/api/v1/users", {"name": "alice"})[0] == 201
        status, body = _http("POST", f"http://{api}/api/v1/servers", {
            "uuid": uuid, "template": "tiny", "user": "alice", "macs": [MAC], "address": "127.0.0.1"})
        assert status == 202, body
        _until("available", lambda: _http("GET", f"http://{api}/api/v1/servers/{uuid}")[1]["state"] == "available",
               serve)
        code, before = _until("the node's config", lambda: (r := _tftp(tftp, cfg))[0] == 0 and r, serve)
        assert f"iqn.2026-11.io.cello:{uuid}" in before and "ISCSI_PASSWORD=" in before, before
        cache = tmp_path / "state" / "boot-index.json"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600  # it holds the node's CHAP secret
        assert uuid in cache.read_text()
        serve.stop()
        exported = _targets()
        assert uuid in exported  # tgtd outlives `cello serve`

        # the database goes down; `cello serve` starts all the same, on the cache
        pg.halt()
        serve = Serve(config, tmp_path / "serve-2.log")
        health = _until("the API without its store", lambda: _health(api), serve)
        assert health["store"]["state"] == "unavailable" and "store unreachable" in health["store"]["detail"]
        assert health["tftp"]["state"] == "running", health
        assert "Starting on the boot index cached at" in serve.text()
        code, during = _tftp(tftp, cfg)
        assert code == 0 and during == before  # the node gets the very same config
        code, _ = _tftp(tftp, "pxelinux.cfg/01-52-54-00-5d-00-99")
        assert code != 0  # and nothing else changed: no config for a MAC it does not know
        status, body = _http("GET", f"http://{api}/api/v1/servers")
        assert status == 503 and body["error"] == "store_unavailable", body
        assert _targets() == exported  # no export touched without the store
        for _ in range(20):  # it stays up, answering, however long the outage lasts (here: 2 s)
            assert serve.proc.poll() is None and _health(api)["store"]["state"] == "unavailable"
            time.sleep(0.1)

        assert "Traceback" not in serve.text(), serve.text()[-3000:]  # the outage is said in lines
        assert "exported" not in serve.text()  # tgtd held its targets: none made from the cache

        # the host restarts meanwhile (tgtd keeps no target across that; teardown stands in for it):
        # the next start exports the node's target as the cache has it, so the node finds its disk
        serve.stop()
        _teardown(config)
        assert uuid not in _targets()
        serve = Serve(config, tmp_path / "serve-2b.log")
        # the cached exports follow the listeners (a node retries its login), so the API may answer first
        _until("the cached target exported", lambda: "held no target (a host restart?): exported 1 target(s)"
               in serve.text(), serve)
        again = _targets()
        assert uuid in again and f"node-{uuid}" in again  # the target and the node's CHAP account
        # and the node logs in with what its boot config says, and reads its root disk's LUN
        args = dict(re.findall(r"(ISCSI_[A-Z_]+)=(\S+)", before))
        login = subprocess.run(["iscsi-inq", "-i", args["ISCSI_INITIATOR"],
                                f"iscsi://{args['ISCSI_USERNAME']}%{args['ISCSI_PASSWORD']}@{args['ISCSI_TARGET_IP']}:"
                                f"{args['ISCSI_TARGET_PORT']}/{args['ISCSI_TARGET_NAME']}/1"],
                               capture_output=True, text=True, timeout=30)
        assert login.returncode == 0 and "Peripheral Device Type" in login.stdout, login.stdout + login.stderr
        code, during = _tftp(tftp, cfg)
        assert code == 0 and during == before

        # the database is back: it reconciles and reads the store's index, no restart
        pg.resume()
        _until("the store back", lambda: _health(api)["store"]["state"] == "running", serve, within=60)
        status, body = _http("GET", f"http://{api}/api/v1/servers")
        assert status == 200 and [s["uuid"] for s in body] == [uuid], body
        assert "store: reachable again" in serve.text()
        assert "boot index cache not written" not in serve.text()  # every copy written whole, none failed
        code, after = _tftp(tftp, cfg)
        assert code == 0 and after == before
        serve.stop()
        assert serve.proc.returncode == 0, serve.text()[-3000:]

        # no cache and no database: no start, one line saying why
        cache.unlink()
        pg.halt()
        serve = Serve(config, tmp_path / "serve-3.log")
        serve.proc.wait(timeout=60)
        assert serve.proc.returncode == 2, serve.text()
        last = serve.text().strip().splitlines()[-1]
        assert last.startswith("cello: store unreachable") and "no boot index is cached" in last, serve.text()
        assert "Traceback" not in serve.text()
    finally:
        if serve is not None:
            serve.stop()
        pg.stop()
        if config is not None:
            _teardown(config)


async def test_a_start_refused_for_its_store_leaves_nothing_held(tmp_path: Path) -> None:
    """Without its database (and, for `cello serve`, without a cache) a start fails with one line and
    lets go of the state dir, so that the next try (or a teardown) is not told it is in use."""
    from appliance.app import Appliance, StartError
    from appliance.config import load_config
    from appliance.host import lock_state_dir

    pg = PgServer.start()
    try:
        url = pg.create_database("cello")
        pg.halt()
        config = load_config(_config(tmp_path, url)[0])
        with pytest.raises(StoreUnreachable, match="store unreachable"):  # any command but serve: at once
            Appliance.build(config)
        appliance = Appliance.build(config, wait_for_store=True)  # serve's
        with pytest.raises(StartError, match="no boot index is cached") as refused:
            await appliance.start()
        assert "\n" not in str(refused.value)
        os.close(lock_state_dir(tmp_path / "state"))  # not held any more: a teardown, a next try may run
    finally:
        pg.stop()
