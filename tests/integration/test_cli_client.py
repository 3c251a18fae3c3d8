"""The real `python -m appliance` client commands against the live app on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from appliance.cli import main as cli_main
from domain.store import TemplateVersion
from tests.integration.test_api_stack import INITRD, KERNEL, Stack, api_stack, needs_tgt, uuid_n

__all__ = ["api_stack"]
pytestmark = needs_tgt
ROOT = Path(__file__).resolve().parents[2]


async def cello(s: Stack, *argv: str, who: str = "admin", api: str | None = None,
                real: bool = False) -> tuple[int, str, str]:
    """`cello ARGV...`: in a real process (`real`), else cello's own parser and `run` on a worker thread
    (the same code, without paying a Python start-up per call)."""
    api = api or f"http://127.0.0.1:{s.client.port}"
    token = s.admin_token if who == "admin" else s.tokens[who]
    if not real:
        return await asyncio.to_thread(_in_thread, [*argv, "--api", api, "--token", token])
    env = {**os.environ, "CELLO_API": api, "CELLO_TOKEN": token, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "appliance", *argv, env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _in_thread(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


async def test_server_lifecycle_tables_and_json(api_stack: Stack) -> None:
    s = api_stack
    uuid = uuid_n(50)
    code, out, err = await cello(s, "server", "create", uuid, "--template", "tiny", "--data-gb", "2",
                                 "--mac", "52:54:00:77:00:50", "--hostname", "node50", "--address", "10.77.0.150",
                                 "--wait", who="alice", real=True)
    assert code == 0, err
    assert "state:     available" in out and "tiny-DATA-" + uuid in out
    await s.policy.settled()
    assert s.policy.names() == {"node50": "10.77.0.150"}  # what the DNS responder answers
    code, out, err = await cello(s, "server", "list")
    header, row = out.splitlines()
    assert header.split() == ["UUID", "USER", "TEMPLATE", "STATE", "VOLUMES", "LUNS", "REASON"]
    assert row.split() == [uuid, "alice", "tiny@v1", "available", "2", "1,2"]
    code, out, err = await cello(s, "server", "show", uuid, "--json", who="alice")
    assert code == 0 and json.loads(out)["target"]["luns"][1]["lun"] == 2
    code, out, err = await cello(s, "volume", "add", uuid, "3", who="alice")
    assert code == 0 and f"tiny-DATA-{uuid}-2" in out
    code, out, err = await cello(s, "volume", "list", "--json", who="alice")
    assert sorted(v["lun"] for v in json.loads(out)) == [1, 2, 3]
    code, out, err = await cello(s, "volume", "remove", uuid, f"tiny-DATA-{uuid}-2", who="alice")
    assert code == 0 and out.strip() == f"removed tiny-DATA-{uuid}-2"
    code, out, err = await cello(s, "server", "delete", uuid, who="bob", real=True)
    assert code == 1 and err.strip() == f"cello: not_found: no server {uuid}" and "Traceback" not in err
    code, out, err = await cello(s, "server", "delete", uuid, who="alice")
    assert code == 0
    await s.assert_clean()


async def test_errors_are_one_line_and_exit_1(api_stack: Stack) -> None:
    s = api_stack
    code, _out, err = await cello(s, "server", "create", uuid_n(51), "--template", "nope", "--user", "alice")
    assert code == 1 and err.count("\n") == 1 and err.startswith("cello: invalid: template:")
    code, _out, err = await cello(s, "user", "list", who="alice")
    assert code == 1 and err.strip() == "cello: forbidden: this needs an admin token"
    code, _out, err = await cello(s, "server", "list", api="http://127.0.0.1:9", real=True)
    assert code == 1 and err.startswith("cello: cannot reach the Cello API at http://127.0.0.1:9")
    assert "Traceback" not in err


async def test_users_services_reconcile(api_stack: Stack) -> None:
    s = api_stack
    code, out, err = await cello(s, "user", "create", "dave", "--max-volumes", "4", "--with-token")
    assert code == 0, err
    token = out.splitlines()[1].split(": ")[1]
    s.tokens["dave"] = token
    code, out, err = await cello(s, "server", "list", who="dave")
    assert code == 0 and out.split() == ["UUID", "USER", "TEMPLATE", "STATE", "VOLUMES", "LUNS", "REASON"]
    code, out, err = await cello(s, "user", "list")
    assert "dave   0/4" in out
    code, out, err = await cello(s, "service", "disable", "tftp")
    assert code == 0 and out.strip() == "tftp: disabled"
    code, out, err = await cello(s, "service", "list", "--json")
    assert {x["name"]: x["enabled"] for x in json.loads(out)}["tftp"] is False
    code, out, err = await cello(s, "service", "enable", "tftp")
    assert s.domain.services["tftp"] is True
    code, out, err = await cello(s, "reconcile")
    assert code == 0 and "repaired: exports applied: 0 target(s)" in out


async def test_template_build_follows_progress(api_stack: Stack) -> None:
    s = api_stack

    async def builder(name: str, version: str, source: str, progress: Any) -> TemplateVersion:
        progress("step one")
        await asyncio.sleep(0.3)
        if name == "broken":
            raise RuntimeError("mkfs.ext4 exited with 1")
        progress("step two")
        await s.backend.create_template(name, 1 << 20)
        await s.backend.snapshot_template(name, version)
        return TemplateVersion(name, version, source, 1 << 20, KERNEL, INITRD, 0.0)

    s.use_builder(builder)
    code, out, err = await cello(s, "template", "build", "mini", "--from", "tiny", "--poll", "0.05")
    assert code == 0, err
    assert out.splitlines() == ["step one", "step two", "built mini@v1"]
    code, out, err = await cello(s, "template", "build", "broken", "--from", "tiny", "--poll", "0.05")
    assert code == 1 and "build failed: mkfs.ext4 exited with 1" in out and "failed" in err
    code, out, err = await cello(s, "template", "list")
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["mini", "v1"], ["tiny", "v1"]]
    code, out, err = await cello(s, "template", "delete", "mini", "v1")
    assert code == 0 and out.strip() == "deleted mini@v1"


async def test_events_follow_is_a_live_boot_log(api_stack: Stack) -> None:
    s = api_stack
    env = {**os.environ, "CELLO_API": f"http://127.0.0.1:{s.client.port}", "CELLO_TOKEN": s.admin_token,
           "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "appliance", "events", "--follow", env=env,
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        await asyncio.sleep(1.0)  # let it connect
        uuid = uuid_n(52)
        await s.create(uuid, profile="ipxe", address="127.0.0.1")  # the node's address: this client's
        await s.wait_state(uuid)
        await s.policy.settled()
        async with s.client.get(f"/boot/{uuid}.ipxe") as resp:
            assert resp.status == 200
        lines: list[str] = []
        async with asyncio.timeout(20):
            while not any(" http " in line for line in lines):
                lines.append((await proc.stdout.readline()).decode().rstrip("\n"))
    finally:
        proc.kill()
        await proc.wait()
    workflow = [line for line in lines if " workflow " in line]
    assert any(f"{uuid}  workflow=create step=done" in line for line in workflow), lines
    http = next(line for line in lines if " http " in line)
    assert f"http      {uuid}  status=200 file={uuid}.ipxe" in http
    assert http[2] == ":" and http[8] == "."  # HH:MM:SS.mmm
