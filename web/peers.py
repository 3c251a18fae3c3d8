"""The fleet channel's client side (domain.fleet.PeerChannel over HTTP): template versions and moving
volumes are pulled as streams from another appliance's `/fleet/v1/…`, each request signed with the
fleet's shared secret (web/fleetauth.py) and each answer sealed with it (web/fleetseal.py); boot
files (kernel, initrd) come from its public HTTP boot path and are written into this appliance's boot
tree at the same place, through a temporary file, so a broken copy never shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from domain.store import ApplianceRow
from iscsi.model import StorageError
from web import fleetauth, fleetseal

CHUNK = 1 << 20
# A stream may be long (a big template); a peer that goes silent for this long has failed.
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5, sock_read=120)


def peer_tls(peer: ApplianceRow) -> aiohttp.Fingerprint | bool:
    """How another appliance's https certificate is checked: pinned to the fingerprint it registered in
    the shared store (self-signed ones need no CA file: whoever can write that store runs the fleet
    anyway); one that registered none, against the system's CAs (True). Ignored for http URLs."""
    if peer.tls_fingerprint:
        return aiohttp.Fingerprint(bytes.fromhex(peer.tls_fingerprint.replace(":", "")))
    return True


class HttpChannel:
    def __init__(self, files_root: Path, secret: str) -> None:
        self.files_root = files_root
        self._secret = secret

    def _auth(self, method: str, url: str) -> dict[str, str]:
        parts = urllib.parse.urlsplit(url)
        path_qs = parts.path + (f"?{parts.query}" if parts.query else "")
        return {"Authorization": fleetauth.sign(self._secret, method, path_qs, time.time())}

    async def _get(self, peer: ApplianceRow, url: str, *, sealed: bool = True) -> AsyncIterator[bytes]:
        """The answer's bytes; `sealed`: a fleet-channel stream, opened with the secret (SealError when
        it does not open or was cut short)."""
        headers = self._auth("GET", url)
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as session, \
                session.get(url, headers=headers, ssl=peer_tls(peer)) as r:
            if r.status != 200:
                raise StorageError(f"GET {url}: {r.status} {(await r.text())[:300]}")
            raw = r.content.iter_chunked(CHUNK)
            chunks = fleetseal.unseal(raw, self._secret, headers["Authorization"]) if sealed else raw
            async for chunk in chunks:
                yield chunk

    def template_stream(self, peer: ApplianceRow, template: str, version: str,
                        base: str | None) -> AsyncIterator[bytes]:
        query = f"?base={base}" if base else ""
        return self._get(peer, f"{peer.api_url.rstrip('/')}/fleet/v1/templates/{template}/{version}/stream{query}")

    def volume_stream(self, peer: ApplianceRow, volume: str,
                      origin: tuple[str, str] | None) -> AsyncIterator[bytes]:
        return self._get(peer, f"{peer.api_url.rstrip('/')}/fleet/v1/volumes/{volume}/stream")

    async def fetch_file(self, peer: ApplianceRow, rel: str) -> None:
        dest = (self.files_root / rel).resolve()
        if not dest.is_relative_to(self.files_root.resolve()):
            raise StorageError(f"boot file {rel!r} is outside the boot tree")
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}.part")
        f = await asyncio.to_thread(open, part, "wb")
        try:
            async for chunk in self._get(peer, f"{peer.api_url.rstrip('/')}/boot/files/{rel}", sealed=False):
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(f.flush)
            await asyncio.to_thread(os.fsync, f.fileno())
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        f.close()
        await asyncio.to_thread(os.replace, part, dest)

    async def ask_pull(self, peer: ApplianceRow, uuid: str) -> None:
        url = f"{peer.api_url.rstrip('/')}/fleet/v1/servers/{uuid}/pull"
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=3600)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(url, headers=self._auth("POST", url), ssl=peer_tls(peer)) as r:
            if r.status != 204:
                raise StorageError(f"{peer.name} could not take the volumes: {r.status} {(await r.text())[:300]}")
