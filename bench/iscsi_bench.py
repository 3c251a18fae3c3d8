"""iSCSI export and volume benchmarks (standalone: `.venv/bin/python bench/iscsi_bench.py [--quick]`).

1. Render N targets' ctl.conf (time, bytes); parse it back (peer: our own parser, for the round trip).
2. Apply 200 targets through a real tgtd with TgtDriver, vs tgt's own `tgt-admin -e` on the same
   targets (peer); then an idempotent re-apply, and 100 concurrent ExportManager.apply() calls.
3. Clone 100 OS volumes: file backend with reflink (loop-mounted xfs) vs sparse copy (host fs),
   vs `cp --reflink=always` / `cp --sparse=always` (peers); zfs-fuse `file` kind.
Uses tgtd control ports 46/47, portals 127.0.0.1:13266/13267, zfs-fuse pool `cellotbench`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iscsi import ctlconf
from iscsi.exports import ExportManager
from iscsi.file_backend import FileBackend
from iscsi.model import LunSpec, TargetAuth, TargetSpec
from iscsi.tgt import TgtDriver
from iscsi.zfs_backend import ZfsBackend

PREFIX = "iqn.2026-11.io.cello"
MB = 1 << 20


def uuids(n: int) -> list[str]:
    return [str(uuidlib.UUID(int=(0x3F1C2B4E9D8A4C6B8E2F << 48) + i, version=4)) for i in range(n)]


def specs(n: int, directory: Path | None = None, data: int = 1) -> list[TargetSpec]:
    out = []
    for i, u in enumerate(uuids(n)):
        vols = [f"tiny-OS-{u}"] + [f"tiny-DATA-{u}" + ("" if d == 1 else f"-{d}") for d in range(1, data + 1)]
        luns = tuple(
            LunSpec(v, str(directory / f"{v}.img") if directory else f"/dev/zvol/tank/cello/{v}", k, 1 << 30,
                    f"C{i:06d}L{k:03d}", f"cello:{u}:{k}")
            for k, v in enumerate(vols)
        )
        auth = TargetAuth(f"node{i}", f"secret-{i:07d}") if i % 2 else TargetAuth()
        out.append(TargetSpec(f"{PREFIX}:{u}", luns, auth))
    return out


def line(what: str, value: str) -> None:
    print(f"  {what:<52} {value}")


def bench_render(n: int) -> None:
    print(f"ctl.conf render: {n} targets (OS + 1 data LUN each, half with CHAP)")
    targets = specs(n)
    t0 = time.perf_counter()
    conf = ctlconf.from_specs(targets, ["0.0.0.0:3260", "[::]:3260"])
    t1 = time.perf_counter()
    text = ctlconf.render(conf)
    t2 = time.perf_counter()
    parsed = ctlconf.parse(text)
    t3 = time.perf_counter()
    assert parsed == conf
    line("build model from specs (validates every name)", f"{(t1 - t0) * 1e3:8.1f} ms")
    line("render (validates again)", f"{(t2 - t1) * 1e3:8.1f} ms  {len(text.encode()):,} bytes")
    line("per target (build + render)", f"{(t2 - t0) / n * 1e6:8.1f} µs")
    line("parse back (peer: round trip)", f"{(t3 - t2) * 1e3:8.1f} ms  ratio render/parse "
                                        f"{(t2 - t1) / (t3 - t2):.2f}")


async def wait_socket(port: int) -> None:
    for _ in range(200):
        r = await asyncio.create_subprocess_exec("tgtadm", "-C", str(port), "--op", "show", "--mode", "system",
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if await r.wait() == 0:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"tgtd -C {port} did not come up")


async def bench_tgt(n: int, tmp: Path) -> None:
    print(f"tgt apply: {n} targets, 1 LUN each, ACL ALL")
    vols = tmp / "tgtvols"
    vols.mkdir()
    targets = specs(n, vols, data=0)
    targets = [TargetSpec(t.iqn, t.luns) for t in targets]  # tgt-admin peer: no CHAP
    await asyncio.to_thread(make_images, [lun.path for t in targets for lun in t.luns])

    driver = TgtDriver(46, ["127.0.0.1:13266"], state_dir=tmp / "state")
    await driver.start()
    try:
        t0 = time.perf_counter()
        state = await driver.apply(targets)
        t1 = time.perf_counter()
        assert len(state.targets) == n
        cmds = driver.commands
        await driver.apply(targets)
        t2 = time.perf_counter()
        idle_cmds = driver.commands - cmds

        desired = list(targets)
        manager = ExportManager(driver, lambda: _ret(desired))
        extra = specs(n + 100, vols, data=0)[n:]
        await asyncio.to_thread(make_images, [t.luns[0].path for t in extra])

        async def add(t: TargetSpec) -> None:
            desired.append(TargetSpec(t.iqn, t.luns))
            await manager.apply()

        t3 = time.perf_counter()
        await asyncio.gather(*(add(t) for t in extra))
        t4 = time.perf_counter()
        assert len(manager.last_state.targets if manager.last_state else ()) == n + 100
    finally:
        await driver.teardown()

    conf = tmp / "targets.conf"
    conf.write_text("default-driver iscsi\n" + "".join(
        f"<target {t.iqn}>\n    backing-store {t.luns[0].path}\n    initiator-address ALL\n</target>\n"
        for t in targets))
    proc = await asyncio.create_subprocess_exec("tgtd", "-f", "-C", "47", "--iscsi", "portal=127.0.0.1:13267",
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_socket(47)
        p0 = time.perf_counter()
        r = await asyncio.create_subprocess_exec("tgt-admin", "-C", "47", "-c", str(conf), "-e",
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = await r.communicate()
        p1 = time.perf_counter()
        if r.returncode:
            print("  tgt-admin failed:", err.decode()[-300:])
    finally:
        for tid in range(1, n + 1):
            d = await asyncio.create_subprocess_exec("tgtadm", "-C", "47", "--op", "delete", "--force", "--mode",
                                                     "target", "--tid", str(tid), stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)
            await d.wait()
        d = await asyncio.create_subprocess_exec("tgtadm", "-C", "47", "--op", "delete", "--mode", "system",
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await d.wait()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    line("TgtDriver.apply, empty tgtd -> all targets", f"{(t1 - t0):8.2f} s  {(t1 - t0) / n * 1e3:.1f} ms/target, "
                                                      f"{cmds} tgtadm calls")
    line("peer tgt-admin -e (same targets)", f"{(p1 - p0):8.2f} s  ratio ours/peer {(t1 - t0) / (p1 - p0):.2f}")
    line("idempotent re-apply (no change)", f"{(t2 - t1) * 1e3:8.1f} ms  {idle_cmds} tgtadm calls (show only)")
    line("100 concurrent creates via ExportManager", f"{(t4 - t3):8.2f} s  {manager.applies} applies")


async def _ret(x: list[TargetSpec]) -> list[TargetSpec]:
    return list(x)


def make_template(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        for off in range(0, size, 8 * MB):  # 1 MB of data every 8 MB: a realistic sparse root
            f.seek(off)
            f.write(os.urandom(MB))


async def bench_clones(n: int, tmp: Path) -> None:
    size = 64 * MB
    print(f"clone {n} OS volumes from a {size // MB} MB template ({size // (8 * MB)} MB of data)")
    results: dict[str, float] = {}

    async def run_backend(label: str, backend: FileBackend | ZfsBackend) -> float:
        tpl = await backend.create_template("tiny", size)
        await asyncio.to_thread(make_template, Path(tpl.path), size)
        await backend.snapshot_template("tiny", "v1")
        t0 = time.perf_counter()
        for u in uuids(n):
            await backend.clone_os("tiny", "v1", u)
        dt = time.perf_counter() - t0
        method = backend.status()["clone_method"]
        line(f"{label} ({method})", f"{dt:8.2f} s  {dt / n * 1e3:.2f} ms/clone")
        results[label] = dt
        return dt

    def peer(label: str, directory: Path, flag: str) -> None:
        src = directory / "peer-src.img"
        with open(src, "wb") as f:
            f.truncate(size)
        make_template(src, size)
        t0 = time.perf_counter()
        for i in range(n):
            subprocess.run(["cp", flag, str(src), str(directory / f"peer-{i}.img")], check=True)
        dt = time.perf_counter() - t0
        line(f"peer cp {flag}", f"{dt:8.2f} s  {dt / n * 1e3:.2f} ms/clone; ratio ours/peer "
                                f"{results[label] / dt:.2f}")

    sparse_dir = tmp / "sparse"
    await run_backend("file backend, host fs", FileBackend(sparse_dir))
    await asyncio.to_thread(peer, "file backend, host fs", sparse_dir, "--sparse=always")

    if shutil.which("mkfs.xfs") and os.geteuid() == 0:
        mnt = await asyncio.to_thread(mount_xfs, tmp)
        try:
            await run_backend("file backend, loop xfs", FileBackend(mnt / "vols"))
            await asyncio.to_thread(peer, "file backend, loop xfs", mnt, "--reflink=always")
        finally:
            await asyncio.to_thread(subprocess.run, ["umount", str(mnt)], check=True)
        speedup = results["file backend, host fs"] / results["file backend, loop xfs"]
        line("reflink vs sparse copy", f"{speedup:8.2f}x faster")
    else:
        print("  (no xfs: needs root and xfsprogs)")

    if shutil.which("zfs-fuse") and os.geteuid() == 0:
        pool = "cellotbench"
        await asyncio.to_thread(create_pool, pool, tmp)
        try:
            await run_backend("zfs-fuse, file kind", ZfsBackend(pool, "file"))
            ratio = results["zfs-fuse, file kind"] / results.get("file backend, loop xfs", 1)
            line("zfs clone vs reflink", f"{ratio:8.2f}x the time")
        finally:
            await asyncio.to_thread(destroy_pool, pool)
    else:
        print("  (no zfs-fuse: needs root and zfs-fuse)")


def make_images(paths: list[str]) -> None:
    for path in paths:
        with open(path, "wb") as f:
            f.truncate(16 * MB)


def mount_xfs(tmp: Path) -> Path:
    mnt, img = tmp / "xfs", tmp / "xfs.img"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(1024 * MB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    return mnt


def create_pool(pool: str, tmp: Path) -> None:
    pimg = tmp / "zpool.img"
    with open(pimg, "wb") as f:
        f.truncate(512 * MB)
    if subprocess.run(["zpool", "list"], capture_output=True).returncode != 0:
        os.makedirs("/var/run/zfs", exist_ok=True)
        os.makedirs("/var/lock/zfs", exist_ok=True)
        subprocess.run(["zfs-fuse", "-p", "/run/zfs-fuse.pid", "--no-kstat-mount", "-m", "64"], check=True)
        time.sleep(1)
    subprocess.run(["zpool", "create", "-f", "-m", str(tmp / "zmnt"), pool, str(pimg)], check=True)


def destroy_pool(pool: str) -> None:
    for _ in range(10):
        if subprocess.run(["zpool", "destroy", "-f", pool], capture_output=True).returncode == 0:
            return
        time.sleep(0.3)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="about 20 seconds instead of about 2 minutes")
    args = ap.parse_args()
    render_n, tgt_n, clone_n = (2000, 20, 20) if args.quick else (10_000, 200, 100)
    bench_render(render_n)
    with tempfile.TemporaryDirectory(prefix="cello-iscsi-bench-") as d:
        tmp = Path(d)
        if shutil.which("tgtd") and os.geteuid() == 0:
            await bench_tgt(tgt_n, tmp)
        else:
            print("tgt: skipped (needs root and tgt)")
        await bench_clones(clone_n, tmp)


if __name__ == "__main__":
    asyncio.run(main())
