"""Fleet channel benchmark: what sealing a stream (web/fleetseal.py) costs against the same stream sent
in clear, same run, same path.

One aiohttp server on 127.0.0.1 answers `GET /stream` with N MiB of random bytes in 1 MiB chunks (what a
template or volume stream is: web/api_fleet.py `_stream`); the client reads it whole, as web/peers.py does.
Two ways, interleaved over rounds: `clear` (the bytes as they are; the channel before the seal) and
`sealed` (fleetseal.seal on the server, fleetseal.unseal on the client, the client checking the plaintext's
length). Printed: MB/s of plaintext per round and the median, CPU seconds per GB of this process (server
and client are one process here: both ends' work), and the sealed/clear ratio.

    .venv/bin/python bench/fleet_seal_bench.py            # 512 MiB, 5 rounds
    .venv/bin/python bench/fleet_seal_bench.py --quick    # 64 MiB, 2 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from aiohttp import web

from web import fleetauth, fleetseal

SECRET = "bench-fleet-secret-0123456789abcdef"
CHUNK = 1 << 20


async def _chunks(data: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in data:
        yield chunk


def _app(data: list[bytes]) -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        chunks = _chunks(data)
        if request.query.get("sealed") == "1":
            chunks = fleetseal.seal(chunks, SECRET, request.headers["Authorization"])
        async for chunk in chunks:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/stream", stream)
    return app


async def _fetch(session: aiohttp.ClientSession, url: str, sealed: bool) -> int:
    path = "/stream" + ("?sealed=1" if sealed else "")
    auth = fleetauth.sign(SECRET, "GET", path, time.time())
    got = 0
    async with session.get(url + path, headers={"Authorization": auth}) as r:
        raw = r.content.iter_chunked(CHUNK)
        chunks = fleetseal.unseal(raw, SECRET, auth) if sealed else raw
        async for chunk in chunks:
            got += len(chunk)
    return got


async def run(size_mib: int, rounds: int) -> int:
    data = [os.urandom(CHUNK) for _ in range(size_mib)]
    runner = web.AppRunner(_app(data))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    results: dict[str, list[tuple[float, float]]] = {"clear": [], "sealed": []}
    try:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await _fetch(session, url, True)  # warm: imports, key derivation paths
            for r in range(rounds):
                order = ["clear", "sealed"] if r % 2 == 0 else ["sealed", "clear"]
                for way in order:
                    cpu0, t0 = time.process_time(), time.perf_counter()
                    got = await _fetch(session, url, way == "sealed")
                    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                    if got != size_mib * CHUNK:
                        print(f"{way}: got {got} bytes, wanted {size_mib * CHUNK}", file=sys.stderr)
                        return 1
                    results[way].append((got / wall / 1e6, cpu / (got / 1e9)))
                    print(f"round {r + 1} {way:6}: {got / wall / 1e6:8.1f} MB/s, {cpu / (got / 1e9):.2f} CPU s/GB",
                          flush=True)
    finally:
        await runner.cleanup()
    clear = statistics.median(x for x, _ in results["clear"])
    sealed = statistics.median(x for x, _ in results["sealed"])
    ratios = [s[0] / c[0] for s, c in zip(results["sealed"], results["clear"], strict=True)]
    print(f"\n{size_mib} MiB over HTTP on 127.0.0.1, {rounds} rounds, medians:")
    print(f"  clear  {clear:8.1f} MB/s, {statistics.median(c for _, c in results['clear']):.2f} CPU s/GB")
    print(f"  sealed {sealed:8.1f} MB/s, {statistics.median(c for _, c in results['sealed']):.2f} CPU s/GB")
    print(f"  sealed/clear x{statistics.median(ratios):.2f} (median of the per-round ratios)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB, 2 rounds")
    ap.add_argument("--mib", type=int, default=None, help="MiB per stream (default 512)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    args = ap.parse_args()
    size = args.mib or (64 if args.quick else 512)
    rounds = args.rounds or (2 if args.quick else 5)
    return asyncio.run(run(size, rounds))


if __name__ == "__main__":
    sys.exit(main())
