"""API benchmark: N servers created, then deleted, through the HTTP API.

The `file` backend lives on reflink storage: a loop-mounted xfs (mkfs.xfs -m reflink=1) made here and
unmounted afterwards. Exports go through the real tgt driver when tgtd is installed (else the
NullDriver; the output says which). Prints p50/p99 latency of each POST and DELETE, the time until every
server is `available`, and how many export applies it took — against the naive peer, one apply per
change (N per phase), measured as the ratio in the same run.

    .venv/bin/python bench/api_bench.py            # 1000 servers (needs root: loop mount)
    .venv/bin/python bench/api_bench.py --quick    # 100 servers, a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from aiohttp import web

from appliance.app import Appliance
from appliance.config import load_config
from domain.servers import ServerWorkflows
from domain.store import TemplateVersion, User
from iscsi.exports import NullDriver
from iscsi.file_backend import FileBackend
from iscsi.model import ExportDriver
from iscsi.tgt import TgtDriver

# tgtd control port and portal of its own: the tests use 40-49 and 60-65, and 13260-13279.
TGT_CONTROL_PORT = 66
PORTAL = "127.0.0.1:13290"
TEMPLATE_SIZE = 256 << 20
IQN = "iqn.2026-11.io.cello"


def _run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, timeout=120)


@contextlib.contextmanager
def reflink_xfs(size: str = "6G") -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="cello-api-bench-"))
    image, mnt = work / "xfs.img", work / "mnt"
    mnt.mkdir()
    _run("truncate", "-s", size, str(image))
    _run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    _run("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def _fill(image: Path) -> None:
    with open(image, "r+b") as f:  # some real data, so that a clone has extents to share
        f.write(b"\xa5" * (32 << 20))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def timed_all(n: int, concurrency: int, one: Callable[[int], Awaitable[int]]) -> tuple[list[float], float]:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def run(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            status = await one(i)
            latencies.append(time.perf_counter() - t0)
            assert status in (202, 204), status

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(n)))
    return latencies, time.perf_counter() - t0


@contextlib.asynccontextmanager
async def appliance(root: Path, use_tgt: bool) -> AsyncIterator[tuple[str, str, ServerWorkflows, ExportDriver]]:
    backend = FileBackend(root / "volumes")
    await backend.create_template("tiny", TEMPLATE_SIZE)
    await asyncio.to_thread(_fill, Path(backend.path("tiny-template")))
    await backend.snapshot_template("tiny", "v1")
    driver: ExportDriver = (TgtDriver(TGT_CONTROL_PORT, [PORTAL], state_dir=root / "state") if use_tgt
                            else NullDriver("bench: no tgtd"))
    await driver.start()
    config = root / "cello.toml"
    config.write_text(f'[appliance]\nstate_dir = "{root}"\nadvertise = "127.0.0.1"\n'
                      f'[iscsi]\nportals = ["{PORTAL}"]\n[boot]\ndefault_profile = "ipxe"\n')
    built = Appliance.build(load_config(config), backend=backend, driver=driver)  # as `cello serve` builds
    domain = built.built
    store = domain.store
    await store.call(store.sync.add_template_version,
                     TemplateVersion("tiny", "v1", "tiny", TEMPLATE_SIZE, "k/vmlinuz", "k/initrd", time.time()))
    await store.call(store.sync.put_user, User("bench", 1_000_000, 1_000_000))
    await domain.start()
    token = await domain.users.ensure_admin_token("")
    assert token is not None
    runner = web.AppRunner(built.web_app(health=lambda: {}, version="bench"), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", token, domain.servers, driver
    finally:
        await runner.cleanup()
        await domain.stop()
        await driver.teardown()
        print(f"clone method: {backend.status()['clone_method']}")


def tgtadm_runs(driver: ExportDriver) -> int:
    return driver.commands if isinstance(driver, TgtDriver) else 0


def commands_note(driver: ExportDriver, before: int) -> str:
    # tgtd serves one management request at a time: its runs bound what an apply can cost
    return f"; {tgtadm_runs(driver) - before} tgtadm runs" if isinstance(driver, TgtDriver) else ""


async def bench(n: int, concurrency: int, use_tgt: bool, root: Path) -> None:
    async with appliance(root, use_tgt) as (base, token, prov, driver), aiohttp.ClientSession(
            base, headers={"Authorization": f"Bearer {token}"}) as http:
        real = f" (real tgtd -C {TGT_CONTROL_PORT})" if use_tgt else " (NullDriver: nothing exported)"
        print(f"driver: {driver.name}{real}; "
              f"{n} servers, {concurrency} concurrent clients")

        def uuid(i: int) -> str:
            return f"b0000000-0000-4000-8000-{i:012x}"

        async def create(i: int) -> int:
            async with http.post("/api/v1/servers", json={"uuid": uuid(i), "template": "tiny", "user": "bench"}) as r:
                await r.read()
                return r.status

        applies0, commands0 = prov.exports.applies, tgtadm_runs(driver)
        t0 = time.perf_counter()
        lat, post_total = await timed_all(n, concurrency, create)
        await prov.tasks.drain()
        ready = time.perf_counter() - t0
        async with http.get("/api/v1/servers") as r:
            servers = await r.json()
        states = {s["state"] for s in servers}
        applies = prov.exports.applies - applies0
        exported = len((await driver.actual()).targets)
        print(f"create: POST p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms; all {n} POSTs {post_total:.2f} s; "
              f"all available after {ready:.2f} s ({n / ready:.0f} servers/s); states {sorted(states)}; "
              f"{exported} targets exported")
        print(f"create: {applies} export applies vs {n} for one apply per create (naive peer): "
              f"ratio {applies / n:.3f}{commands_note(driver, commands0)}")

        async def delete(i: int) -> int:
            async with http.delete(f"/api/v1/servers/{uuid(i)}") as r:
                await r.read()
                return r.status

        applies0, commands0 = prov.exports.applies, tgtadm_runs(driver)
        lat, total = await timed_all(n, concurrency, delete)
        applies = prov.exports.applies - applies0
        print(f"delete: DELETE p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms; all {n} in {total:.2f} s "
              f"({n / total:.0f} servers/s); mean {statistics.mean(lat) * 1000:.1f} ms")
        print(f"delete: {applies} export applies vs {n} naive: ratio {applies / n:.3f}; "
              f"{len((await driver.actual()).targets)} targets left{commands_note(driver, commands0)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 servers (a few seconds)")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--driver", choices=("auto", "tgt", "none"), default="auto")
    args = p.parse_args()
    n = 100 if args.quick else args.n
    use_tgt = args.driver == "tgt" or (args.driver == "auto" and shutil.which("tgtd") is not None)
    with reflink_xfs() as mnt:
        asyncio.run(asyncio.wait_for(bench(n, args.concurrency, use_tgt, mnt), 600))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
