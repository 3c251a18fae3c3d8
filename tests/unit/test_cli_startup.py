"""`cello --version` and the API client commands load only the stdlib (no aiohttp, asyncio or drivers)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import contextlib, io, sys
from appliance import cli
for argv in (["--version"], ["server", "list", "--help"], ["template", "build", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        cli.main(argv)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in
               {"aiohttp", "asyncio", "iscsi", "web", "bootfiles", "dhcp", "sqlite3"} or m == "appliance.app")
print(heavy)
"""


def test_client_commands_import_nothing_of_the_appliance() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_version_is_pyprojects() -> None:
    from appliance.version import VERSION

    with open(ROOT / "pyproject.toml", "rb") as f:
        assert VERSION == tomllib.load(f)["project"]["version"]
    out = subprocess.run([sys.executable, "-m", "appliance", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.strip() == f"cello {VERSION}"
